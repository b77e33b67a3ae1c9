//! Weight matrices kept in their stored format, borrowed from a memory map or owned.

use std::any::Any;
use std::sync::{Arc, OnceLock};

use crate::dtype::{bf16_to_f32, f16_to_f32, WeightFormat, FP8_E4M3_TABLE};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum WeightError {
    #[error("{rows}x{cols} {format} matrix needs {expected} bytes, got {actual}")]
    ByteLength {
        rows: usize,
        cols: usize,
        format: &'static str,
        expected: usize,
        actual: usize,
    },
    #[error("block scales for a {rows}x{cols} matrix in {block_rows}x{block_cols} blocks must have {expected} values, got {actual}")]
    ScaleLength {
        rows: usize,
        cols: usize,
        block_rows: usize,
        block_cols: usize,
        expected: usize,
        actual: usize,
    },
    #[error("{rows}x{cols} FP8 block-scaled weights need their block scales (WeightMatrix::new_fp8_block)")]
    MissingBlockScales { rows: usize, cols: usize },
    #[error("block size {block_rows}x{block_cols} must be non-zero")]
    ZeroBlock { block_rows: usize, block_cols: usize },
    #[error("{rows}x{cols} matrix size overflows")]
    Overflow { rows: usize, cols: usize },
    #[error("{format} stores values in blocks of {block}, but a row has {cols} values (not a multiple of {block})")]
    NotBlockMultiple {
        cols: usize,
        format: &'static str,
        block: usize,
    },
}

impl WeightError {
    /// A row of `cols` values that does not fill whole blocks of `format`.
    pub fn not_block_multiple(format: WeightFormat, cols: usize) -> Self {
        WeightError::NotBlockMultiple {
            cols,
            format: format.name(),
            block: format.block_size(),
        }
    }
}

/// A shared, immutable byte range: a slice of a memory-mapped file, or owned bytes.
#[derive(Clone)]
pub struct ByteView {
    owner: Arc<dyn AsRef<[u8]> + Send + Sync>,
    start: usize,
    len: usize,
}

impl ByteView {
    /// A view of `owner[start..start + len]`; `None` when the range is out of bounds.
    pub fn new(owner: Arc<dyn AsRef<[u8]> + Send + Sync>, start: usize, len: usize) -> Option<Self> {
        let end = start.checked_add(len)?;
        if end > owner.as_ref().as_ref().len() {
            return None;
        }
        Some(Self { owner, start, len })
    }

    pub fn from_vec(bytes: Vec<u8>) -> Self {
        let len = bytes.len();
        Self {
            owner: Arc::new(bytes),
            start: 0,
            len,
        }
    }

    pub fn from_f32(values: &[f32]) -> Self {
        Self::from_vec(values.iter().flat_map(|v| v.to_le_bytes()).collect())
    }

    #[inline]
    pub fn bytes(&self) -> &[u8] {
        &self.owner.as_ref().as_ref()[self.start..self.start + self.len]
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl std::fmt::Debug for ByteView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ByteView({} bytes)", self.len)
    }
}

/// A backend's own form of a matrix (repacked for its kernels), built once on first use and
/// shared by the matrix's clones.
#[derive(Clone, Default)]
struct BackendCopy(Arc<OnceLock<Box<dyn Any + Send + Sync>>>);

impl std::fmt::Debug for BackendCopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = if self.0.get().is_some() { "built" } else { "none" };
        write!(f, "BackendCopy({state})")
    }
}

/// A `[rows, cols]` row-major weight matrix (rows = output features, as in `nn.Linear`).
#[derive(Clone, Debug)]
pub struct WeightMatrix {
    rows: usize,
    cols: usize,
    format: WeightFormat,
    data: ByteView,
    /// FP8 only: `[ceil(rows / block_rows), ceil(cols / block_cols)]` multipliers.
    block_scales: Option<Arc<[f32]>>,
    backend_copy: BackendCopy,
}

impl WeightMatrix {
    /// Wraps stored bytes; checks that their length matches the shape. FP8 block-scaled weights
    /// come with their scales through [`WeightMatrix::new_fp8_block`].
    pub fn new(rows: usize, cols: usize, format: WeightFormat, data: ByteView) -> Result<Self, WeightError> {
        if matches!(format, WeightFormat::F8E4M3Block { .. }) {
            return Err(WeightError::MissingBlockScales { rows, cols });
        }
        Self::checked(rows, cols, format, data)
    }

    /// A matrix of `data` in `format` (scales, if any, still to be set).
    fn checked(rows: usize, cols: usize, format: WeightFormat, data: ByteView) -> Result<Self, WeightError> {
        if !cols.is_multiple_of(format.block_size()) {
            return Err(WeightError::not_block_multiple(format, cols));
        }
        let expected = format
            .row_bytes(cols)
            .and_then(|width| width.checked_mul(rows))
            .ok_or(WeightError::Overflow { rows, cols })?;
        if data.len() != expected {
            return Err(WeightError::ByteLength {
                rows,
                cols,
                format: format.name(),
                expected,
                actual: data.len(),
            });
        }
        if let WeightFormat::F8E4M3Block { block_rows, block_cols } = format {
            if block_rows == 0 || block_cols == 0 {
                return Err(WeightError::ZeroBlock { block_rows, block_cols });
            }
        }
        Ok(Self {
            rows,
            cols,
            format,
            data,
            block_scales: None,
            backend_copy: BackendCopy::default(),
        })
    }

    /// An FP8 block-scaled matrix: `value[i][j] = fp8[i][j] * scales[i / block_rows][j / block_cols]`.
    pub fn new_fp8_block(
        rows: usize,
        cols: usize,
        block_rows: usize,
        block_cols: usize,
        data: ByteView,
        scales: Vec<f32>,
    ) -> Result<Self, WeightError> {
        let format = WeightFormat::F8E4M3Block { block_rows, block_cols };
        let mut matrix = Self::checked(rows, cols, format, data)?;
        let expected = rows.div_ceil(block_rows) * cols.div_ceil(block_cols);
        if scales.len() != expected {
            return Err(WeightError::ScaleLength {
                rows,
                cols,
                block_rows,
                block_cols,
                expected,
                actual: scales.len(),
            });
        }
        matrix.block_scales = Some(scales.into());
        Ok(matrix)
    }

    pub fn from_f32(rows: usize, cols: usize, values: &[f32]) -> Result<Self, WeightError> {
        Self::new(rows, cols, WeightFormat::F32, ByteView::from_f32(values))
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn format(&self) -> WeightFormat {
        self.format
    }

    /// The backend's own copy of this matrix, built by `build` on the first call. A matrix serves
    /// one backend: asking for a different type than the one built is a bug.
    pub fn backend_copy<T: Any + Send + Sync>(&self, build: impl FnOnce() -> T) -> &T {
        self.backend_copy
            .0
            .get_or_init(|| Box::new(build()))
            .downcast_ref()
            .expect("a weight matrix keeps one backend's copy")
    }

    /// The backend's copy of this matrix, if one was built.
    pub fn built_backend_copy<T: Any + Send + Sync>(&self) -> Option<&T> {
        self.backend_copy.0.get().and_then(|copy| copy.downcast_ref())
    }

    /// Bytes a full pass over this matrix reads (weights and scales).
    pub fn stored_bytes(&self) -> usize {
        self.data.len() + self.block_scales.as_ref().map_or(0, |s| s.len() * 4)
    }

    /// Bytes one stored row takes.
    #[inline]
    pub fn stored_row_bytes(&self) -> usize {
        // Checked in `new`: the block size divides `cols` and `rows * width` does not overflow.
        self.cols / self.format.block_size() * self.format.block_bytes()
    }

    /// The stored bytes of one row.
    #[inline]
    pub fn row_bytes(&self, row: usize) -> &[u8] {
        let width = self.stored_row_bytes();
        &self.data.bytes()[row * width..(row + 1) * width]
    }

    /// FP8 only: the scales of the block row that `row` falls in, one per column block.
    #[inline]
    pub fn row_block_scales(&self, row: usize) -> &[f32] {
        match (self.format, self.block_scales.as_deref()) {
            (WeightFormat::F8E4M3Block { block_rows, block_cols }, Some(scales)) => {
                let per_row = self.cols.div_ceil(block_cols);
                let start = (row / block_rows) * per_row;
                &scales[start..start + per_row]
            }
            _ => &[],
        }
    }

    /// Decodes one row into f32 (`out.len() == cols`).
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) {
        debug_assert_eq!(out.len(), self.cols);
        let bytes = self.row_bytes(row);
        match self.format {
            WeightFormat::F32 => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            WeightFormat::Bf16 => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = bf16_to_f32(u16::from_le_bytes([b[0], b[1]]));
                }
            }
            WeightFormat::F16 => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = f16_to_f32(u16::from_le_bytes([b[0], b[1]]));
                }
            }
            WeightFormat::F8E4M3Block { block_cols, .. } => {
                let scales = self.row_block_scales(row);
                for (j, (o, &b)) in out.iter_mut().zip(bytes).enumerate() {
                    *o = FP8_E4M3_TABLE[b as usize] * scales[j / block_cols];
                }
            }
            WeightFormat::Q8_0 | WeightFormat::Q4_0 | WeightFormat::Q4K | WeightFormat::Q6K => {
                crate::quant::dequantize(self.format, bytes, out);
            }
        }
    }

    /// The whole matrix in f32, for small matrices that an algorithm needs decoded (MLA absorption).
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.rows * self.cols];
        for (r, chunk) in out.chunks_exact_mut(self.cols.max(1)).enumerate().take(self.rows) {
            self.dequantize_row(r, chunk);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_wrong_byte_length() {
        let err = WeightMatrix::new(2, 3, WeightFormat::Bf16, ByteView::from_vec(vec![0; 10])).unwrap_err();
        assert_eq!(
            err,
            WeightError::ByteLength {
                rows: 2,
                cols: 3,
                format: "BF16",
                expected: 12,
                actual: 10
            }
        );
    }

    #[test]
    fn block_formats_check_length_and_block_multiple() {
        use crate::quant::{QK, QK_K};
        for (format, block, block_bytes) in [
            (WeightFormat::Q8_0, QK, 34),
            (WeightFormat::Q4_0, QK, 18),
            (WeightFormat::Q4K, QK_K, 144),
            (WeightFormat::Q6K, QK_K, 210),
        ] {
            let (rows, cols) = (3, 2 * block);
            let ok = ByteView::from_vec(vec![0; rows * 2 * block_bytes]);
            let w = WeightMatrix::new(rows, cols, format, ok).unwrap();
            assert_eq!(w.row_bytes(2).len(), 2 * block_bytes);
            assert_eq!(w.stored_bytes(), rows * 2 * block_bytes);

            let short = ByteView::from_vec(vec![0; rows * 2 * block_bytes - 1]);
            let err = WeightMatrix::new(rows, cols, format, short).unwrap_err();
            assert_eq!(
                err,
                WeightError::ByteLength {
                    rows,
                    cols,
                    format: format.name(),
                    expected: rows * 2 * block_bytes,
                    actual: rows * 2 * block_bytes - 1
                }
            );

            let err = WeightMatrix::new(rows, cols + 1, format, ByteView::from_vec(vec![])).unwrap_err();
            assert_eq!(
                err,
                WeightError::NotBlockMultiple {
                    cols: cols + 1,
                    format: format.name(),
                    block
                }
            );
            let message = err.to_string();
            assert!(
                message.contains(format.name()) && message.contains(&(cols + 1).to_string()),
                "{message}"
            );
        }
        let err = WeightMatrix::new(usize::MAX / 8, 256, WeightFormat::Q4K, ByteView::from_vec(vec![])).unwrap_err();
        assert!(matches!(err, WeightError::Overflow { .. }));
    }

    /// FP8 block weights without scales used to be accepted and failed an assert in the kernel.
    #[test]
    fn fp8_blocks_need_their_scales() {
        let format = WeightFormat::F8E4M3Block {
            block_rows: 2,
            block_cols: 2,
        };
        let err = WeightMatrix::new(5, 5, format, ByteView::from_vec(vec![0; 25])).unwrap_err();
        assert_eq!(err, WeightError::MissingBlockScales { rows: 5, cols: 5 });
        assert!(err.to_string().contains("block scales"), "{err}");
    }

    #[test]
    fn rejects_wrong_scale_count() {
        let err = WeightMatrix::new_fp8_block(5, 5, 2, 2, ByteView::from_vec(vec![0; 25]), vec![1.0; 4]).unwrap_err();
        assert!(matches!(
            err,
            WeightError::ScaleLength {
                expected: 9,
                actual: 4,
                ..
            }
        ));
    }

    #[test]
    fn byte_view_bounds() {
        let owner: Arc<dyn AsRef<[u8]> + Send + Sync> = Arc::new(vec![0u8; 8]);
        assert!(ByteView::new(owner.clone(), 4, 4).is_some());
        assert!(ByteView::new(owner.clone(), 5, 4).is_none());
        assert!(ByteView::new(owner, usize::MAX, 2).is_none());
    }
}

//! The tensors of a GGUF file under their HF names, served as the architectures ask for them:
//! memory-mapped views where the bytes can be used as stored, owned copies where rows must be
//! gathered (llama q/k) or a tensor rebuilt (deepseek2 `kv_b_proj` from `attn_k_b` / `attn_v_b`).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use r1serve_kernels::{ByteView, WeightFormat, WeightMatrix};

use super::error::GgufError;
use super::mapping::{map_tensors, stored_row, Entry, MappingParams, Source};
use super::reader::TensorInfo;
use super::types::SUPPORTED;
use super::GgufFile;
use crate::error::{ModelError, Result};
use crate::weights::{HeadMatrices, KvBShape};

/// A GGUF file's tensors by HF name.
pub struct GgufWeights {
    path: PathBuf,
    map: Arc<Mmap>,
    tensors: Vec<TensorInfo>,
    entries: HashMap<String, Entry>,
    unmapped: Vec<String>,
}

impl GgufWeights {
    /// Maps and parses `path` and names its tensors as the HF checkpoint would.
    pub fn open(path: &Path) -> Result<Self> {
        Self::from_file(GgufFile::open(path)?)
    }

    pub fn from_file(file: GgufFile) -> Result<Self> {
        let wrap = |source| ModelError::Gguf {
            path: file.path.clone(),
            source,
        };
        let meta = &file.header.metadata;
        let arch = meta.str("general.architecture").map_err(wrap)?.unwrap_or_default();
        let heads = meta
            .usize(&format!("{arch}.attention.head_count"))
            .map_err(wrap)?
            .unwrap_or(0);
        let kv_heads = meta
            .usize(&format!("{arch}.attention.head_count_kv"))
            .map_err(wrap)?
            .unwrap_or(heads);
        let params = MappingParams {
            permute_qk: arch == "llama",
            heads,
            kv_heads,
        };
        let mapping = map_tensors(&file.header.tensors, &params).map_err(wrap)?;
        Ok(Self {
            path: file.path,
            map: file.map,
            tensors: file.header.tensors,
            entries: mapping.entries,
            unmapped: mapping.unmapped,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name) || self.unmapped.iter().any(|n| n == name)
    }

    /// HF names, then the GGUF names that have no HF counterpart.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries
            .keys()
            .map(String::as_str)
            .chain(self.unmapped.iter().map(String::as_str))
    }

    /// Element count per GGML type over the file's tensors.
    pub fn dtype_counts(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for t in &self.tensors {
            let n: u64 = t.dims.iter().product();
            let slot = counts.entry(t.ggml_type.name.to_owned()).or_insert(0usize);
            *slot = slot.saturating_add(usize::try_from(n).unwrap_or(usize::MAX));
        }
        counts
    }

    fn entry(&self, name: &str, shape: &[usize]) -> Result<&Entry> {
        let entry = self.entries.get(name).ok_or_else(|| ModelError::MissingTensor {
            name: name.to_owned(),
            dir: self.path.clone(),
        })?;
        if entry.shape != shape {
            return Err(ModelError::Shape {
                name: name.to_owned(),
                path: self.path.clone(),
                expected: shape.to_vec(),
                found: entry.shape.clone(),
            });
        }
        Ok(entry)
    }

    fn format(&self, name: &str, t: &TensorInfo) -> Result<WeightFormat> {
        t.ggml_type.weight_format().ok_or_else(|| ModelError::DType {
            name: name.to_owned(),
            path: self.path.clone(),
            dtype: format!("{} (GGUF tensor `{}`)", t.ggml_type.name, t.name),
            expected: SUPPORTED,
        })
    }

    fn bad(&self, t: &TensorInfo, message: String) -> ModelError {
        ModelError::Gguf {
            path: self.path.clone(),
            source: GgufError::BadTensor {
                tensor: t.name.clone(),
                dims: t.dims.clone(),
                message,
            },
        }
    }

    fn weight_err(&self, name: &str) -> impl Fn(r1serve_kernels::WeightError) -> ModelError + '_ {
        let name = name.to_owned();
        move |source| ModelError::Weight {
            name: name.clone(),
            path: self.path.clone(),
            source,
        }
    }

    /// Stored bytes of one row of `t`.
    fn row_bytes(&self, t: &TensorInfo) -> Result<usize> {
        t.ggml_type
            .bytes_for(t.row_len())
            .and_then(|b| usize::try_from(b).ok())
            .ok_or_else(|| self.bad(t, "row size overflows".into()))
    }

    /// Rows `first..first + rows` of `t`, as mapped bytes.
    fn rows_view(&self, t: &TensorInfo, first: usize, rows: usize) -> Result<ByteView> {
        let row_bytes = self.row_bytes(t)?;
        let range = first
            .checked_mul(row_bytes)
            .zip(rows.checked_mul(row_bytes))
            .filter(|(offset, len)| offset.checked_add(*len).is_some_and(|end| end <= t.len));
        let (offset, len) =
            range.ok_or_else(|| self.bad(t, format!("rows {first}..+{rows} lie outside the tensor")))?;
        ByteView::new(self.map.clone(), t.start + offset, len)
            .ok_or_else(|| self.bad(t, "lies outside the file".into()))
    }

    /// Every value of `t`, decoded to f32.
    fn decode_all(&self, name: &str, t: &TensorInfo) -> Result<Vec<f32>> {
        let (rows, cols) = (t.rows() as usize, t.row_len() as usize);
        let view = self.rows_view(t, 0, rows)?;
        let matrix = WeightMatrix::new(rows, cols, self.format(name, t)?, view).map_err(self.weight_err(name))?;
        Ok(matrix.to_f32())
    }

    /// A `[rows, cols]` weight, kept in its stored format when the rows can be used as they are.
    pub fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<WeightMatrix> {
        let entry = self.entry(name, &[rows, cols])?;
        let weight_err = self.weight_err(name);
        match entry.source {
            Source::Rows { tensor, first } => {
                let t = &self.tensors[tensor];
                let view = self.rows_view(t, first, rows)?;
                WeightMatrix::new(rows, cols, self.format(name, t)?, view).map_err(weight_err)
            }
            Source::PermutedRows { tensor, first, heads } => {
                let t = &self.tensors[tensor];
                let format = self.format(name, t)?;
                self.check_heads(t, rows, heads)?;
                let view = self.rows_view(t, first, rows)?;
                let row_bytes = self.row_bytes(t)?;
                let stored = view.bytes();
                let mut bytes = Vec::with_capacity(stored.len());
                for r in 0..rows {
                    let s = stored_row(r, rows, heads);
                    bytes.extend_from_slice(&stored[s * row_bytes..(s + 1) * row_bytes]);
                }
                WeightMatrix::new(rows, cols, format, ByteView::from_vec(bytes)).map_err(weight_err)
            }
            Source::KvB { k_b, v_b } => {
                let values = self.kv_b(name, k_b, v_b)?;
                WeightMatrix::from_f32(rows, cols, &values).map_err(weight_err)
            }
        }
    }

    fn check_heads(&self, t: &TensorInfo, rows: usize, heads: usize) -> Result<()> {
        if heads == 0 || !rows.is_multiple_of(heads) || !(rows / heads).is_multiple_of(2) {
            return Err(self.bad(
                t,
                format!("{rows} rows cannot be un-permuted as {heads} heads of even size (llama q/k rope layout)"),
            ));
        }
        Ok(())
    }

    /// Any tensor of the given HF shape, decoded to f32 and flattened.
    pub fn vector_shaped(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let entry = self.entry(name, shape)?;
        let (tensor, first, heads) = match entry.source {
            Source::KvB { k_b, v_b } => return self.kv_b(name, k_b, v_b),
            Source::Rows { tensor, first } => (tensor, first, None),
            Source::PermutedRows { tensor, first, heads } => (tensor, first, Some(heads)),
        };
        let t = &self.tensors[tensor];
        if t.dims.len() > 1 {
            let cols = shape.last().copied().unwrap_or(1);
            let rows = shape.iter().rev().skip(1).product();
            return Ok(self.matrix(name, rows, cols)?.to_f32());
        }
        // A 1-D tensor: its "rows" are values.
        let len = shape.iter().product::<usize>();
        let all = self.decode_all(name, t)?;
        let values = all
            .get(first..)
            .and_then(|rest| rest.get(..len))
            .ok_or_else(|| self.bad(t, format!("values {first}..+{len} lie outside the tensor")))?;
        match heads {
            None => Ok(values.to_vec()),
            Some(heads) => {
                self.check_heads(t, len, heads)?;
                Ok((0..len).map(|r| values[stored_row(r, len, heads)]).collect())
            }
        }
    }

    /// `kv_b_proj` as the per-head matrices absorbed attention multiplies by, where the file keeps
    /// it split (`attn_k_b`: per head `W_UK_hᵀ`, `[kv_lora, nope]`; `attn_v_b`: per head `W_UV_h`,
    /// `[v, kv_lora]`): each head's rows as stored, in their format. `None` where `kv_b_proj` is
    /// one tensor.
    pub fn split_kv_b(&self, name: &str, shape: KvBShape) -> Result<Option<HeadMatrices>> {
        let KvBShape { heads, nope, v, rank } = shape;
        let rows = nope.checked_add(v).and_then(|width| width.checked_mul(heads));
        let entry = self.entry(name, &[rows.unwrap_or(usize::MAX), rank])?;
        let Source::KvB { k_b, v_b } = entry.source else {
            return Ok(None);
        };
        let (k, vt) = (&self.tensors[k_b], &self.tensors[v_b]);
        let expected = |dims: [usize; 3]| dims.map(|d| d as u64);
        if k.dims[..] != expected([nope, rank, heads]) || vt.dims[..] != expected([rank, v, heads]) {
            return Err(self.bad(
                k,
                format!(
                    "attn_k_b / attn_v_b dims {:?} / {:?} do not split {heads} heads of {nope} key and {v} value rows over rank {rank}",
                    k.dims, vt.dims
                ),
            ));
        }
        let per_head = |t: &TensorInfo, rows: usize, cols: usize| -> Result<Vec<WeightMatrix>> {
            let format = self.format(name, t)?;
            (0..heads)
                .map(|h| {
                    let view = self.rows_view(t, h * rows, rows)?;
                    WeightMatrix::new(rows, cols, format, view).map_err(self.weight_err(name))
                })
                .collect()
        };
        Ok(Some((per_head(k, rank, nope)?, per_head(vt, v, rank)?)))
    }

    /// `kv_b_proj` `[heads·(nope+v), kv_lora]` from `attn_k_b` (per head `[kv_lora, nope]`, the
    /// nope rows transposed) and `attn_v_b` (per head `[v, kv_lora]`).
    fn kv_b(&self, name: &str, k_b: usize, v_b: usize) -> Result<Vec<f32>> {
        let (k, v) = (&self.tensors[k_b], &self.tensors[v_b]);
        let (nope, rank, heads) = (k.dims[0] as usize, k.dims[1] as usize, k.dims[2] as usize);
        let v_dim = v.dims[1] as usize;
        let kf = self.decode_all(name, k)?; // [heads, rank, nope]
        let vf = self.decode_all(name, v)?; // [heads, v, rank]
        let width = nope + v_dim;
        let mut out = vec![0.0f32; heads * width * rank]; // [heads · (nope + v), rank]
        for h in 0..heads {
            for n in 0..nope {
                let row = &mut out[(h * width + n) * rank..][..rank];
                for (c, slot) in row.iter_mut().enumerate() {
                    *slot = kf[(h * rank + c) * nope + n];
                }
            }
            for j in 0..v_dim {
                let src = &vf[(h * v_dim + j) * rank..][..rank];
                out[(h * width + nope + j) * rank..][..rank].copy_from_slice(src);
            }
        }
        Ok(out)
    }
}

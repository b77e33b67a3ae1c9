//! FP8 E4M3 block-scaled weights from f32, as DeepSeek-V3 quantises its weights: per block, the
//! scale is the block's largest magnitude over 448 (E4M3's largest finite value), and each value
//! over the scale is rounded to the nearest E4M3 (ties to even).

use crate::dtype::WeightFormat;
use crate::weight::{ByteView, WeightError, WeightMatrix};

/// E4M3's largest finite magnitude (`0x7e`).
const MAX: f32 = 448.0;

/// `v` rounded to the nearest E4M3FN byte, ties to even; beyond ±448 saturates to ±448 (E4M3FN has
/// no infinities), NaN becomes `0x7f`.
pub fn fp8_e4m3_from_f32(v: f32) -> u8 {
    if v.is_nan() {
        return 0x7f;
    }
    let sign = if v.is_sign_negative() { 0x80 } else { 0 };
    let a = v.abs();
    if a >= MAX {
        return sign | 0x7e;
    }
    // Subnormals step by 2⁻⁹ below 2⁻⁶; a count of 8 steps is the first normal, code 0x08.
    // Adding 2²³ rounds to an integer, ties to even (f32 arithmetic rounds so).
    if a < 1.0 / 64.0 {
        const WHOLE: f32 = (1u32 << 23) as f32;
        return sign | ((a * 512.0 + WHOLE) - WHOLE) as u8;
    }
    // Keep 3 of f32's 23 mantissa bits, rounding the 20 dropped ones to nearest, ties to even; a
    // carry moves into the exponent, as it should.
    let bits = a.to_bits();
    let rounded = bits + 0x7_ffff + ((bits >> 20) & 1);
    let code = (((rounded >> 23) + 7 - 127) << 3) | ((rounded >> 20) & 7);
    // Rounding up past 448 lands on 480's NaN code: keep 448 (|v| < 448 here rounds at most to it).
    sign | code.min(0x7e) as u8
}

/// `values` (`rows × cols`, row-major) as an FP8 matrix in `block_rows × block_cols` blocks, each
/// scaled by its largest magnitude over 448 (an all-zero block gets scale 1).
pub fn quantize_fp8_blocks(
    rows: usize,
    cols: usize,
    block_rows: usize,
    block_cols: usize,
    values: &[f32],
) -> Result<WeightMatrix, WeightError> {
    if block_rows == 0 || block_cols == 0 {
        return Err(WeightError::ZeroBlock { block_rows, block_cols });
    }
    let expected = rows.checked_mul(cols).ok_or(WeightError::Overflow { rows, cols })?;
    if values.len() != expected {
        return Err(WeightError::ByteLength {
            rows,
            cols,
            format: WeightFormat::F32.name(),
            expected: expected * 4,
            actual: values.len() * 4,
        });
    }
    let per_row = cols.div_ceil(block_cols);
    let mut scales = vec![0.0f32; rows.div_ceil(block_rows) * per_row];
    for (r, row) in values.chunks(cols.max(1)).enumerate() {
        let block_row = &mut scales[r / block_rows * per_row..][..per_row];
        for (s, part) in block_row.iter_mut().zip(row.chunks(block_cols)) {
            *s = part.iter().fold(*s, |m, v| m.max(v.abs()));
        }
    }
    for s in &mut scales {
        *s = if *s > 0.0 { *s / MAX } else { 1.0 };
    }
    let mut bytes = Vec::with_capacity(values.len());
    for (r, row) in values.chunks(cols.max(1)).enumerate() {
        let block_row = &scales[r / block_rows * per_row..][..per_row];
        for (&s, part) in block_row.iter().zip(row.chunks(block_cols)) {
            bytes.extend(part.iter().map(|&v| fp8_e4m3_from_f32(v / s)));
        }
    }
    WeightMatrix::new_fp8_block(rows, cols, block_rows, block_cols, ByteView::from_vec(bytes), scales)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::fp8_e4m3_to_f32;

    /// Every finite code comes back from its own value; each midpoint between neighbours goes to
    /// the even code; beyond the range saturates; NaN stays NaN.
    #[test]
    fn rounds_to_nearest_even() {
        for code in (0..=255u8).filter(|c| c & 0x7f != 0x7f) {
            let v = fp8_e4m3_to_f32(code);
            assert_eq!(fp8_e4m3_from_f32(v), code, "{code:#04x} = {v}");
        }
        for code in 0..0x7eu8 {
            let (low, high) = (fp8_e4m3_to_f32(code), fp8_e4m3_to_f32(code + 1));
            let middle = (low + high) / 2.0;
            let even = if code % 2 == 0 { code } else { code + 1 };
            assert_eq!(fp8_e4m3_from_f32(middle), even, "between {low} and {high}");
            assert_eq!(fp8_e4m3_from_f32(-middle), 0x80 | even);
            assert_eq!(fp8_e4m3_from_f32(middle * 0.999_9), code);
            assert_eq!(fp8_e4m3_from_f32(middle * 1.000_1), code + 1);
        }
        assert_eq!(fp8_e4m3_from_f32(460.0), 0x7e);
        assert_eq!(fp8_e4m3_from_f32(-1e9), 0xfe);
        assert_eq!(fp8_e4m3_from_f32(f32::INFINITY), 0x7e);
        assert_eq!(fp8_e4m3_from_f32(f32::NAN), 0x7f);
        assert_eq!(fp8_e4m3_from_f32(1e-30), 0);
    }

    /// Each value comes back within half a step of its block's grid: `|v − q| ≤ 2⁻⁴ · |v|` for
    /// normals, `2⁻¹⁰ · scale` below them; the block's largest magnitude exactly.
    #[test]
    fn blocks_scale_by_their_largest_value() {
        let (rows, cols) = (5, 7);
        let values: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.013)
            .collect();
        let w = quantize_fp8_blocks(rows, cols, 2, 3, &values).unwrap();
        let back = w.to_f32();
        for (i, (&v, &q)) in values.iter().zip(&back).enumerate() {
            let (r, c) = (i / cols, i % cols);
            let scale = w.row_block_scales(r)[c / 3];
            assert!(
                (v - q).abs() <= (v.abs() / 16.0).max(scale / 1024.0) * 1.0001,
                "[{r}][{c}] {v} → {q}"
            );
        }
        let block_max = (0..2)
            .flat_map(|r| (0..3).map(move |c| (r, c)))
            .map(|(r, c)| values[r * cols + c].abs())
            .fold(0.0, f32::max);
        assert_eq!(w.row_block_scales(0)[0], block_max / 448.0);
        let zeros = quantize_fp8_blocks(2, 2, 2, 2, &[0.0; 4]).unwrap();
        assert_eq!(zeros.row_block_scales(0), [1.0]);
        assert_eq!(zeros.to_f32(), [0.0; 4]);
    }

    #[test]
    fn refuses_bad_shapes() {
        assert!(matches!(
            quantize_fp8_blocks(2, 2, 0, 2, &[0.0; 4]),
            Err(WeightError::ZeroBlock { .. })
        ));
        assert!(matches!(
            quantize_fp8_blocks(2, 3, 2, 2, &[0.0; 4]),
            Err(WeightError::ByteLength { .. })
        ));
    }
}

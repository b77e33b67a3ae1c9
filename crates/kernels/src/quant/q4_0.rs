//! `Q4_0`: blocks of 32 values stored as `d: f16` then `qs: [u8; 16]`; value `i` is
//! `(q_i − 8) · d`, where `q_i` is the low nibble of `qs[i]` for `i < 16` and the high nibble of
//! `qs[i − 16]` for `i ≥ 16`.

use super::{f16_at, f16_bits, QK};

/// Bytes per block: the f16 scale and 32 nibbles.
pub const BLOCK_BYTES: usize = 2 + QK / 2;

/// Decodes whole blocks (`bytes` in blocks of 18, `out` in blocks of 32).
pub fn dequantize(bytes: &[u8], out: &mut [f32]) {
    for (block, out) in bytes.chunks_exact(BLOCK_BYTES).zip(out.chunks_exact_mut(QK)) {
        let d = f16_at(block, 0);
        let (lo, hi) = out.split_at_mut(QK / 2);
        for ((l, h), &q) in lo.iter_mut().zip(hi).zip(&block[2..]) {
            *l = ((q & 0x0f) as i32 - 8) as f32 * d;
            *h = ((q >> 4) as i32 - 8) as f32 * d;
        }
    }
}

/// Appends one block for 32 values. As ggml's reference: the value of largest magnitude `m`
/// (first on ties) sets `d = m / −8` so that it maps to nibble 0 exactly; others get
/// `min(15, trunc(x / d + 8.5))`. The bytes match ggml's.
pub(crate) fn quantize_block(values: &[f32], out: &mut Vec<u8>) {
    let mut max = 0.0f32;
    for &v in values {
        if v.abs() > max.abs() {
            max = v;
        }
    }
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out.extend_from_slice(&f16_bits(d).to_le_bytes());
    let q = |v: f32| ((v * id + 8.5).trunc() as u8).min(15);
    let (lo, hi) = values.split_at(QK / 2);
    out.extend(lo.iter().zip(hi).map(|(&l, &h)| q(l) | (q(h) << 4)));
}

/// Scalar reference: whole blocks against `Q8_0` activations, `Σ_b d_w · d_x · Σ (q_w − 8) · q_x`.
pub(crate) fn dot_q8(bytes: &[u8], qs: &[i8], d: &[f32]) -> f32 {
    let mut sum = 0.0f32;
    for ((block, qx), &dx) in bytes.chunks_exact(BLOCK_BYTES).zip(qs.chunks_exact(QK)).zip(d) {
        let (xlo, xhi) = qx.split_at(QK / 2);
        let isum: i32 = block[2..]
            .iter()
            .zip(xlo.iter().zip(xhi))
            .map(|(&q, (&l, &h))| ((q & 0x0f) as i32 - 8) * l as i32 + ((q >> 4) as i32 - 8) * h as i32)
            .sum();
        sum += f16_at(block, 0) * dx * isum as f32;
    }
    sum
}

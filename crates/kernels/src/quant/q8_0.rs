//! `Q8_0`: blocks of 32 values stored as `d: f16` then `qs: [i8; 32]`; value `i` is `qs[i] · d`.

use super::{f16_at, f16_bits, QK};

/// Bytes per block: the f16 scale and 32 × i8.
pub const BLOCK_BYTES: usize = 2 + QK;

/// Decodes whole blocks (`bytes` in blocks of 34, `out` in blocks of 32).
pub fn dequantize(bytes: &[u8], out: &mut [f32]) {
    for (block, out) in bytes.chunks_exact(BLOCK_BYTES).zip(out.chunks_exact_mut(QK)) {
        let d = f16_at(block, 0);
        for (o, &q) in out.iter_mut().zip(&block[2..]) {
            *o = q as i8 as f32 * d;
        }
    }
}

/// Appends one block for 32 values: `d = max|x| / 127`, `q = round(x / d)` (half away from
/// zero) — the same arithmetic as ggml's reference quantizer, so the bytes match it.
pub(crate) fn quantize_block(values: &[f32], out: &mut Vec<u8>) {
    let amax = values.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out.extend_from_slice(&f16_bits(d).to_le_bytes());
    out.extend(
        values
            .iter()
            .map(|&v| (v * id).round().clamp(-128.0, 127.0) as i8 as u8),
    );
}

/// Scalar reference: whole blocks against `Q8_0` activations, `Σ_b d_w · d_x · Σ q_w · q_x`.
pub(crate) fn dot_q8(bytes: &[u8], qs: &[i8], d: &[f32]) -> f32 {
    let mut sum = 0.0f32;
    for ((block, qx), &dx) in bytes.chunks_exact(BLOCK_BYTES).zip(qs.chunks_exact(QK)).zip(d) {
        let isum: i32 = block[2..]
            .iter()
            .zip(qx)
            .map(|(&w, &x)| w as i8 as i32 * x as i32)
            .sum();
        sum += f16_at(block, 0) * dx * isum as f32;
    }
    sum
}

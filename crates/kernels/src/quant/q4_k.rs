//! `Q4_K`: super-blocks of 256 values, 144 bytes each:
//!
//! | bytes    | field                                                        |
//! |----------|--------------------------------------------------------------|
//! | 0..2     | `d: f16`, the scale of the sub-block scales                  |
//! | 2..4     | `dmin: f16`, the scale of the sub-block mins                 |
//! | 4..16    | 8 six-bit scales `sc[j]` and 8 six-bit mins `m[j]`, packed   |
//! | 16..144  | 256 nibbles                                                  |
//!
//! Sub-block `j` (values `32j..32j+32`) decodes as `d·sc[j] · q − dmin·m[j]`, with `q` from the
//! nibbles of byte range `32·(j/2)..+32`: the low nibbles for even `j`, the high for odd `j`.
//! The 12 scale bytes `s`: for `j < 4`, `sc[j] = s[j] & 63` and `m[j] = s[j+4] & 63`; for `j ≥ 4`
//! the low four bits come from `s[j+4]` (scale: low nibble, min: high nibble) and the top two from
//! the spare top bits of `s[j−4]` (scale) and `s[j]` (min).

use super::{f16_at, f16_bits_up, QK_K};

/// Bytes per super-block.
pub const BLOCK_BYTES: usize = 2 + 2 + 12 + QK_K / 2;

/// The 8 scales and 8 mins of a super-block, from its 12 packed bytes. Also usable on 32-bit
/// words: see [`scales_mins_words`].
pub fn scales_mins(packed: &[u8]) -> ([u8; 8], [u8; 8]) {
    let words = scales_mins_words(packed);
    let bytes = |lo: u32, hi: u32| {
        let mut out = [0u8; 8];
        out[..4].copy_from_slice(&lo.to_le_bytes());
        out[4..].copy_from_slice(&hi.to_le_bytes());
        out
    };
    (bytes(words[0], words[1]), bytes(words[2], words[3]))
}

/// The unpacked scales and mins as four little-endian words: `sc[0..4]`, `sc[4..8]`, `m[0..4]`,
/// `m[4..8]` (one byte each).
#[inline(always)]
pub fn scales_mins_words(packed: &[u8]) -> [u32; 4] {
    let w = |i: usize| u32::from_le_bytes([packed[4 * i], packed[4 * i + 1], packed[4 * i + 2], packed[4 * i + 3]]);
    let (w0, w1, w2) = (w(0), w(1), w(2));
    const LOW6: u32 = 0x3f3f_3f3f;
    const LOW4: u32 = 0x0f0f_0f0f;
    const BITS45: u32 = 0x3030_3030;
    [
        w0 & LOW6,
        (w2 & LOW4) | ((w0 >> 2) & BITS45),
        w1 & LOW6,
        ((w2 >> 4) & LOW4) | ((w1 >> 2) & BITS45),
    ]
}

/// Packs 8 six-bit scales and mins (each < 64) into the 12-byte field.
fn pack_scales_mins(sc: &[u8; 8], m: &[u8; 8]) -> [u8; 12] {
    let mut out = [0u8; 12];
    for j in 0..4 {
        out[j] = (sc[j] & 63) | ((sc[j + 4] >> 4) << 6);
        out[j + 4] = (m[j] & 63) | ((m[j + 4] >> 4) << 6);
        out[j + 8] = (sc[j + 4] & 15) | ((m[j + 4] & 15) << 4);
    }
    out
}

/// Decodes whole super-blocks. Arithmetic as ggml's (`(d·sc)·q − dmin·m`, each product rounded
/// to f32), so results are bit-equal to it.
pub fn dequantize(bytes: &[u8], out: &mut [f32]) {
    for (block, out) in bytes.chunks_exact(BLOCK_BYTES).zip(out.chunks_exact_mut(QK_K)) {
        let (d, dmin) = (f16_at(block, 0), f16_at(block, 2));
        let (sc, m) = scales_mins(&block[4..16]);
        let qs = &block[16..];
        for (j, out) in out.chunks_exact_mut(32).enumerate() {
            let (scale, min) = (d * sc[j] as f32, dmin * m[j] as f32);
            let shift = 4 * (j % 2);
            for (o, &q) in out.iter_mut().zip(&qs[32 * (j / 2)..32 * (j / 2) + 32]) {
                *o = scale * ((q >> shift) & 0x0f) as f32 - min;
            }
        }
    }
}

/// Least-squares fit of `x ≈ a·q − b` with `q ∈ 0..=15`, `a ≥ 0`, `b ≥ 0`: tries a range of grid
/// steps around `(max − min) / 15`, refits `a` and `b` to each rounding, keeps the best.
fn fit_sub_block(xs: &[f32]) -> (f32, f32) {
    let min = xs.iter().fold(0.0f32, |m, &v| m.min(v));
    let max = xs.iter().fold(min, |m, &v| m.max(v));
    if max <= min {
        return (0.0, -min);
    }
    let error = |a: f32, b: f32| -> f32 {
        xs.iter()
            .map(|&x| {
                let q = if a > 0.0 {
                    ((x + b) / a).round().clamp(0.0, 15.0)
                } else {
                    0.0
                };
                (a * q - b - x).powi(2)
            })
            .sum()
    };
    let mut best = ((max - min) / 15.0, -min);
    let mut best_err = error(best.0, best.1);
    for step in 0..=24 {
        let levels = 13.5 + step as f32 * 0.125;
        let inv = levels / (max - min);
        let (mut n, mut sq, mut sqq, mut sx, mut sqx) = (0.0f32, 0.0f32, 0.0f32, 0.0f32, 0.0f32);
        for &x in xs {
            let q = ((x - min) * inv).round().clamp(0.0, 15.0);
            n += 1.0;
            sq += q;
            sqq += q * q;
            sx += x;
            sqx += q * x;
        }
        let det = n * sqq - sq * sq;
        if det <= 0.0 {
            continue;
        }
        let mut a = (n * sqx - sq * sx) / det;
        let mut offset = (sqq * sx - sq * sqx) / det;
        if offset > 0.0 {
            offset = 0.0;
            a = sqx / sqq;
        }
        if a <= 0.0 || !a.is_finite() {
            continue;
        }
        let err = error(a, -offset);
        if err < best_err {
            best = (a, -offset);
            best_err = err;
        }
    }
    best
}

/// Appends one super-block for 256 values: a fitted scale and min per sub-block, both rounded to
/// six bits against f16 `d` / `dmin`, then every value re-rounded with the stored scales.
pub(crate) fn quantize_block(values: &[f32], out: &mut Vec<u8>) {
    let mut scale = [0.0f32; 8];
    let mut offset = [0.0f32; 8];
    for (j, xs) in values.chunks_exact(32).enumerate() {
        (scale[j], offset[j]) = fit_sub_block(xs);
    }
    let d_bits = f16_bits_up(scale.iter().fold(0.0f32, |m, &v| m.max(v)) / 63.0);
    let dmin_bits = f16_bits_up(offset.iter().fold(0.0f32, |m, &v| m.max(v)) / 63.0);
    let (d, dmin) = (crate::dtype::f16_to_f32(d_bits), crate::dtype::f16_to_f32(dmin_bits));
    let six = |v: f32, unit: f32| {
        if unit > 0.0 {
            (v / unit).round().clamp(0.0, 63.0) as u8
        } else {
            0
        }
    };
    let sc: [u8; 8] = std::array::from_fn(|j| six(scale[j], d));
    let m: [u8; 8] = std::array::from_fn(|j| six(offset[j], dmin));

    out.extend_from_slice(&d_bits.to_le_bytes());
    out.extend_from_slice(&dmin_bits.to_le_bytes());
    out.extend_from_slice(&pack_scales_mins(&sc, &m));
    let mut q = [0u8; QK_K];
    for (j, (xs, qs)) in values.chunks_exact(32).zip(q.chunks_exact_mut(32)).enumerate() {
        let (a, b) = (d * sc[j] as f32, dmin * m[j] as f32);
        for (q, &x) in qs.iter_mut().zip(xs) {
            *q = if a > 0.0 {
                ((x + b) / a).round().clamp(0.0, 15.0) as u8
            } else {
                0
            };
        }
    }
    for pair in q.chunks_exact(64) {
        out.extend(pair[..32].iter().zip(&pair[32..]).map(|(&lo, &hi)| lo | (hi << 4)));
    }
}

/// Scalar reference against `Q8_K` activations:
/// `Σ_blocks d_x · (d · Σ_j sc[j]·Σ q·q_x − dmin · Σ_j m[j]·Σ q_x)`.
pub(crate) fn dot_q8k(bytes: &[u8], qs: &[i8], bsums: &[i16], d: &[f32]) -> f32 {
    let mut sum = 0.0f32;
    for (((block, qx), bsums), &dx) in bytes
        .chunks_exact(BLOCK_BYTES)
        .zip(qs.chunks_exact(QK_K))
        .zip(bsums.chunks_exact(QK_K / 16))
        .zip(d)
    {
        let (sc, m) = scales_mins(&block[4..16]);
        let qs = &block[16..];
        let (mut scaled, mut mins) = (0i32, 0i32);
        for j in 0..8 {
            let shift = 4 * (j % 2);
            let isum: i32 = qs[32 * (j / 2)..32 * (j / 2) + 32]
                .iter()
                .zip(&qx[32 * j..32 * j + 32])
                .map(|(&q, &x)| ((q >> shift) & 0x0f) as i32 * x as i32)
                .sum();
            scaled += sc[j] as i32 * isum;
            mins += m[j] as i32 * (bsums[2 * j] as i32 + bsums[2 * j + 1] as i32);
        }
        sum += dx * (f16_at(block, 0) * scaled as f32 - f16_at(block, 2) * mins as f32);
    }
    sum
}

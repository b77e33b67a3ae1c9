//! `Q6_K`: super-blocks of 256 values, 210 bytes each:
//!
//! | bytes    | field                                              |
//! |----------|----------------------------------------------------|
//! | 0..128   | `ql`: low four bits of each value                  |
//! | 128..192 | `qh`: high two bits of each value                  |
//! | 192..208 | `scales: [i8; 16]`, one per 16 values              |
//! | 208..210 | `d: f16`                                           |
//!
//! Value `e` is `d · scales[e / 16] · (q − 32)` with the six-bit `q` found as follows: in half
//! `h = e / 128` at `r = e % 128`, quarter `k = r / 32`, lane `l = r % 32`, the low four bits are
//! nibble `k / 2` (low, then high) of `ql[64h + 32·(k % 2) + l]` and the top two are bits
//! `2k..2k+2` of `qh[32h + l]`.

use super::{f16_at, f16_bits_up, QK_K};

/// Bytes per super-block.
pub const BLOCK_BYTES: usize = QK_K / 2 + QK_K / 4 + QK_K / 16 + 2;

/// Where value `e` (0..256) of a super-block keeps its bits: `(ql index, nibble shift, qh index,
/// qh shift)`.
#[inline(always)]
fn position(e: usize) -> (usize, u32, usize, u32) {
    let (h, r) = (e / 128, e % 128);
    let (k, l) = (r / 32, r % 32);
    (
        64 * h + 32 * (k % 2) + l,
        4 * (k as u32 / 2),
        128 + 32 * h + l,
        2 * k as u32,
    )
}

/// Decodes whole super-blocks. Arithmetic as ggml's (`(d·scale)·(q − 32)`), bit-equal to it.
pub fn dequantize(bytes: &[u8], out: &mut [f32]) {
    for (block, out) in bytes.chunks_exact(BLOCK_BYTES).zip(out.chunks_exact_mut(QK_K)) {
        let d = f16_at(block, 208);
        for (g, out) in out.chunks_exact_mut(16).enumerate() {
            let scale = d * block[192 + g] as i8 as f32;
            for (i, o) in out.iter_mut().enumerate() {
                *o = scale * (six_bit(block, 16 * g + i) - 32) as f32;
            }
        }
    }
}

/// The stored six-bit value (0..64) of element `e`.
#[inline(always)]
pub(crate) fn six_bit(block: &[u8], e: usize) -> i32 {
    let (ql, shift, qh, hshift) = position(e);
    (((block[ql] >> shift) & 0x0f) | (((block[qh] >> hshift) & 3) << 4)) as i32
}

/// Best scale `a` for `x ≈ a·q`, `q ∈ −32..=31`, over a few grid sizes around the one that maps
/// the largest-magnitude value to −32, each refitted by least squares to its rounding.
fn fit_group(xs: &[f32]) -> f32 {
    let mut max = 0.0f32;
    for &v in xs {
        if v.abs() > max.abs() {
            max = v;
        }
    }
    if max == 0.0 {
        return 0.0;
    }
    let error = |a: f32| -> f32 {
        xs.iter()
            .map(|&x| (a * (x / a).round().clamp(-32.0, 31.0) - x).powi(2))
            .sum()
    };
    let mut best = max / -32.0;
    let mut best_err = error(best);
    for step in 0..=16 {
        let levels = -32.0 + step as f32 * 0.25;
        let a0 = max / levels;
        let (mut sqq, mut sqx) = (0.0f32, 0.0f32);
        for &x in xs {
            let q = (x / a0).round().clamp(-32.0, 31.0);
            sqq += q * q;
            sqx += q * x;
        }
        if sqq <= 0.0 {
            continue;
        }
        let a = sqx / sqq;
        let err = error(a);
        if a.is_finite() && a != 0.0 && err < best_err {
            best = a;
            best_err = err;
        }
    }
    best
}

/// Appends one super-block for 256 values: a fitted scale per 16, rounded to i8 against an f16
/// `d`, then every value re-rounded with the stored scales.
pub(crate) fn quantize_block(values: &[f32], out: &mut Vec<u8>) {
    let scale: [f32; 16] = std::array::from_fn(|g| fit_group(&values[16 * g..16 * g + 16]));
    let amax = scale.iter().fold(0.0f32, |m, &v| m.max(v.abs()));
    let d_bits = f16_bits_up(amax / 127.0);
    let d = crate::dtype::f16_to_f32(d_bits);
    let sc: [i8; 16] = std::array::from_fn(|g| {
        if d > 0.0 {
            (scale[g] / d).round().clamp(-127.0, 127.0) as i8
        } else {
            0
        }
    });

    let mut block = [0u8; BLOCK_BYTES];
    for (e, &x) in values.iter().enumerate() {
        let a = d * sc[e / 16] as f32;
        let q = if a != 0.0 {
            (x / a).round().clamp(-32.0, 31.0) as i32 + 32
        } else {
            32
        } as u8;
        let (ql, shift, qh, hshift) = position(e);
        block[ql] |= (q & 0x0f) << shift;
        block[qh] |= (q >> 4) << hshift;
    }
    for (dst, &s) in block[192..208].iter_mut().zip(&sc) {
        *dst = s as u8;
    }
    block[208..].copy_from_slice(&d_bits.to_le_bytes());
    out.extend_from_slice(&block);
}

/// Scalar reference against `Q8_K` activations: `Σ_blocks d_x · d · Σ_g sc[g]·Σ (q − 32)·q_x`.
pub(crate) fn dot_q8k(bytes: &[u8], qs: &[i8], d: &[f32]) -> f32 {
    let mut sum = 0.0f32;
    for ((block, qx), &dx) in bytes.chunks_exact(BLOCK_BYTES).zip(qs.chunks_exact(QK_K)).zip(d) {
        let mut isum = 0i32;
        for g in 0..16 {
            let group: i32 = (16 * g..16 * g + 16)
                .map(|e| (six_bit(block, e) - 32) * qx[e] as i32)
                .sum();
            isum += block[192 + g] as i8 as i32 * group;
        }
        sum += dx * f16_at(block, 208) * isum as f32;
    }
    sum
}

//! Row-wise and element-wise ops.

use super::dot::{isa, Isa};
use super::pool;

/// Row-wise RMS norm with the sum of squares in f64 for a stable reference-grade mean.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let dim = weight.len();
    for (xr, or) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
        let mean_sq = xr.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / dim as f64;
        let inv = 1.0 / (mean_sq as f32 + eps).sqrt();
        for ((o, &v), &w) in or.iter_mut().zip(xr).zip(weight) {
            *o = w * (v * inv);
        }
    }
}

/// `eˣ` within two ulp, branch-free so that loops over it vectorize (`f32::exp` is a libm call
/// per value): `x = n·ln 2 + r` with `|r| ≤ ln 2 / 2` (ln 2 split in two so that `n · LN2_HI` is
/// exact), a degree-7 Taylor polynomial for `eʳ` (truncation below 3·10⁻⁹), and `2ⁿ` built
/// from its exponent bits. Inputs are clamped to `[-87, 88]`, where `2ⁿ` stays a normal float:
/// below, the result is ~10⁻³⁸ instead of a subnormal or zero; NaN stays NaN.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4; // 355/512
    const LN2_LO: f32 = -2.121_944_4e-4; // ln 2 − 355/512
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2²³: adding it rounds to an integer
    let x = x.clamp(-87.0, 88.0);
    let t = x * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let mut p = 1.0 / 5040.0;
    for c in [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = p * r + c;
    }
    // `t`'s low mantissa bits hold `n` (|n| ≤ 127 ≪ 2²²).
    let n = t.to_bits() as i32 - ROUND.to_bits() as i32;
    p * f32::from_bits(((n + 127) << 23) as u32)
}

#[inline(always)]
fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

/// Elements per parallel task of [`silu_mul`] (a prompt's FFN activations are millions).
const SILU_CHUNK: usize = 1 << 14;

pub fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    let isa = isa();
    if out.len() <= SILU_CHUNK {
        silu_mul_with(isa, out, gate, up);
    } else {
        pool::for_each_chunk_mut(out, SILU_CHUNK, |i, o| {
            let at = i * SILU_CHUNK;
            let end = (at + o.len()).min(gate.len()).min(up.len());
            silu_mul_with(isa, o, &gate[at.min(end)..end], &up[at.min(end)..end]);
        });
    }
}

fn silu_mul_with(isa: Isa, out: &mut [f32], gate: &[f32], up: &[f32]) {
    #[inline(always)]
    fn body(out: &mut [f32], gate: &[f32], up: &[f32]) {
        for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
            *o = silu(g) * u;
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    unsafe fn body_avx512(out: &mut [f32], gate: &[f32], up: &[f32]) {
        body(out, gate, up)
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn body_avx2(out: &mut [f32], gate: &[f32], up: &[f32]) {
        body(out, gate, up)
    }
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx512*` come from `Isa::available` after detecting these features.
        Isa::Avx512 | Isa::Avx512Vnni => unsafe { body_avx512(out, gate, up) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2` comes from `Isa::available` after detecting avx2 and fma.
        Isa::Avx2 => unsafe { body_avx2(out, gate, up) },
        _ => body(out, gate, up),
    }
}

pub fn add_assign(acc: &mut [f32], x: &[f32]) {
    for (a, &v) in acc.iter_mut().zip(x) {
        *a += v;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_matches_f64_reference() {
        let x = [1.0f32, -2.0, 3.0, 0.5, 4.0, -1.0];
        let w = [0.5f32, 2.0, 1.0];
        let mut out = [0.0f32; 6];
        rms_norm(&x, &w, 1e-6, &mut out);
        for r in 0..2 {
            let row = &x[r * 3..r * 3 + 3];
            let ms = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / 3.0;
            for j in 0..3 {
                let expected = w[j] as f64 * row[j] as f64 / (ms + 1e-6).sqrt();
                assert!((out[r * 3 + j] as f64 - expected).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn exp_is_within_two_ulp_of_f64() {
        let mut worst = 0.0f64;
        for i in 0..=200_000 {
            let x = -87.0 + 175.0 * i as f64 / 200_000.0;
            let (got, want) = (exp(x as f32) as f64, (x as f32 as f64).exp());
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 2.4e-7, "relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(f32::NEG_INFINITY) < 1e-37 && exp(f32::NEG_INFINITY) >= 0.0);
        assert!(exp(-1000.0) < 1e-37);
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn silu_mul_values() {
        let mut out = [0.0f32; 2];
        silu_mul(&[0.0, 2.0], &[3.0, 0.5], &mut out);
        assert_eq!(out[0], 0.0);
        assert!((out[1] as f64 - 0.5 * 2.0 / (1.0 + (-2.0f64).exp())).abs() < 1e-6);
    }
}

//! Row-wise and element-wise ops.

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

#[inline]
fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// Elements per parallel task of [`silu_mul`] (a prompt's FFN activations are millions).
const SILU_CHUNK: usize = 1 << 14;

pub fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    let run = |o: &mut [f32], g: &[f32], u: &[f32]| {
        for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
            *o = silu(g) * u;
        }
    };
    if out.len() <= SILU_CHUNK {
        run(out, gate, up);
    } else {
        pool::for_each_chunk_mut(out, SILU_CHUNK, |i, o| {
            let at = i * SILU_CHUNK;
            let end = (at + o.len()).min(gate.len()).min(up.len());
            run(o, &gate[at.min(end)..end], &up[at.min(end)..end]);
        });
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
    fn silu_mul_values() {
        let mut out = [0.0f32; 2];
        silu_mul(&[0.0, 2.0], &[3.0, 0.5], &mut out);
        assert_eq!(out[0], 0.0);
        assert!((out[1] as f64 - 0.5 * 2.0 / (1.0 + (-2.0f64).exp())).abs() < 1e-6);
    }
}

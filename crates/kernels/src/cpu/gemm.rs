//! Matrix-matrix product for prefill and batched decode, any weight format: a panel of weight rows
//! is decoded once into f32 (so every format shares one fast kernel) and multiplied with all the
//! batch's tokens by a register-blocked micro-kernel that reuses each loaded value 4 times.

use std::cell::RefCell;

use super::dot::{isa, Isa};
use super::pack::for_each_panel;
use super::SharedMut;
use crate::weight::WeightMatrix;

/// Weight rows decoded together; 16 rows of a 9k-wide matrix stay inside a core's L2.
const PANEL_ROWS: usize = 16;
/// Rows and tokens per micro-kernel tile.
const TILE: usize = 4;

thread_local! {
    static PANEL: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// The batch's tokens padded with zero rows to whole tiles (caller's thread).
    static PADDED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `out[n, rows] = x[n, cols] · wᵀ` for `n ≥ 1`; best from a few tokens up.
pub fn gemm(x: &[f32], w: &WeightMatrix, out: &mut [f32]) {
    let cols = w.cols();
    let n = x.len() / cols;
    // Tokens padded to whole tiles with zeros, so the micro-kernel never needs a remainder path.
    let n_padded = n.div_ceil(TILE) * TILE;
    PADDED.with_borrow_mut(|padded| {
        let xs: &[f32] = if n_padded == n {
            x
        } else {
            padded.clear();
            padded.extend_from_slice(x);
            padded.resize(n_padded * cols, 0.0);
            padded
        };
        gemm_padded(xs, n, n_padded, w, out);
    });
}

fn gemm_padded(xs: &[f32], n: usize, n_padded: usize, w: &WeightMatrix, out: &mut [f32]) {
    let (rows, cols) = (w.rows(), w.cols());
    let dst = SharedMut::new(out);
    let isa = isa();
    for_each_panel(rows.div_ceil(PANEL_ROWS), |panel_index| {
        let first = panel_index * PANEL_ROWS;
        let count = PANEL_ROWS.min(rows - first);
        let count_padded = count.div_ceil(TILE) * TILE;
        PANEL.with_borrow_mut(|panel| {
            // Every real row is overwritten below; only the padding rows need zeros.
            panel.resize(count_padded * cols, 0.0);
            for (i, row) in panel.chunks_exact_mut(cols).take(count).enumerate() {
                w.dequantize_row(first + i, row);
            }
            panel[count * cols..].fill(0.0);
            let mut tile = [[0.0f32; TILE]; TILE];
            for r in (0..count_padded).step_by(TILE) {
                let w_rows = &panel[r * cols..(r + TILE) * cols];
                for t in (0..n_padded).step_by(TILE) {
                    let x_rows = &xs[t * cols..(t + TILE) * cols];
                    micro_kernel(isa, w_rows, x_rows, cols, &mut tile);
                    for (i, tile_row) in tile.iter().enumerate().take(count.saturating_sub(r).min(TILE)) {
                        for (j, &value) in tile_row.iter().enumerate().take(n.saturating_sub(t).min(TILE)) {
                            // SAFETY: row `first + r + i < rows` and token `t + j < n`, so the
                            // index is inside `out`; rows of this panel belong to this task only.
                            unsafe { dst.write((t + j) * rows + first + r + i, value) };
                        }
                    }
                }
            }
        });
    });
}

/// `tile[i][j] = w_rows[i] · x_rows[j]` for 4 weight rows and 4 tokens of length `k`.
#[inline]
fn micro_kernel(isa: Isa, w_rows: &[f32], x_rows: &[f32], k: usize, tile: &mut [[f32; TILE]; TILE]) {
    assert!(w_rows.len() >= TILE * k && x_rows.len() >= TILE * k);
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the AVX-512 variants are only chosen after the features were detected; the
        // assert above keeps every load inside the slices.
        Isa::Avx512 | Isa::Avx512Vnni => unsafe { x86::micro_kernel_avx512(w_rows, x_rows, k, tile) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above for AVX2.
        Isa::Avx2 => unsafe { x86::micro_kernel_avx2(w_rows, x_rows, k, tile) },
        #[cfg(not(target_arch = "x86_64"))]
        Isa::Avx512 | Isa::Avx512Vnni | Isa::Avx2 => unreachable!("x86 instruction sets are never detected here"),
        Isa::Scalar => {
            for (i, tile_row) in tile.iter_mut().enumerate() {
                let w = &w_rows[i * k..(i + 1) * k];
                for (j, value) in tile_row.iter_mut().enumerate() {
                    *value = w.iter().zip(&x_rows[j * k..(j + 1) * k]).map(|(a, b)| a * b).sum();
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::TILE;

    /// 4×4 tile, 16 zmm accumulators, masked tail. Callers guarantee 4 rows of `k` in each slice.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    pub unsafe fn micro_kernel_avx512(w: &[f32], x: &[f32], k: usize, tile: &mut [[f32; TILE]; TILE]) {
        let (wp, xp) = (w.as_ptr(), x.as_ptr());
        let mut acc = [[_mm512_setzero_ps(); TILE]; TILE];
        let mut p = 0;
        while p < k {
            let mask: __mmask16 = if k - p >= 16 {
                0xffff
            } else {
                ((1u32 << (k - p)) - 1) as u16
            };
            let wv = [
                _mm512_maskz_loadu_ps(mask, wp.add(p)),
                _mm512_maskz_loadu_ps(mask, wp.add(k + p)),
                _mm512_maskz_loadu_ps(mask, wp.add(2 * k + p)),
                _mm512_maskz_loadu_ps(mask, wp.add(3 * k + p)),
            ];
            // acc[j][i]: token j, weight row i.
            for (j, acc_j) in acc.iter_mut().enumerate() {
                let xv = _mm512_maskz_loadu_ps(mask, xp.add(j * k + p));
                for (a, &wi) in acc_j.iter_mut().zip(&wv) {
                    *a = _mm512_fmadd_ps(wi, xv, *a);
                }
            }
            p += 16;
        }
        for (j, acc_j) in acc.iter().enumerate() {
            for (i, &a) in acc_j.iter().enumerate() {
                tile[i][j] = _mm512_reduce_add_ps(a);
            }
        }
    }

    /// 4×4 tile as two 4×2 halves (AVX2 has 16 registers: 8 accumulators + 6 loads).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn micro_kernel_avx2(w: &[f32], x: &[f32], k: usize, tile: &mut [[f32; TILE]; TILE]) {
        let (wp, xp) = (w.as_ptr(), x.as_ptr());
        let full = k / 8 * 8;
        for half in 0..2 {
            let mut acc = [[_mm256_setzero_ps(); 2]; TILE];
            let mut p = 0;
            while p < full {
                let x0 = _mm256_loadu_ps(xp.add(2 * half * k + p));
                let x1 = _mm256_loadu_ps(xp.add((2 * half + 1) * k + p));
                for (i, a) in acc.iter_mut().enumerate() {
                    let wv = _mm256_loadu_ps(wp.add(i * k + p));
                    a[0] = _mm256_fmadd_ps(wv, x0, a[0]);
                    a[1] = _mm256_fmadd_ps(wv, x1, a[1]);
                }
                p += 8;
            }
            for (i, a) in acc.iter().enumerate() {
                for (jj, v) in a.iter().enumerate() {
                    let j = 2 * half + jj;
                    let mut lanes = [0.0f32; 8];
                    _mm256_storeu_ps(lanes.as_mut_ptr(), *v);
                    let mut sum: f32 = lanes.iter().sum();
                    for q in full..k {
                        sum += *wp.add(i * k + q) * *xp.add(j * k + q);
                    }
                    tile[i][j] = sum;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn micro_kernel_every_isa_matches_f64() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        for &k in &[1usize, 8, 15, 16, 37, 300] {
            let w: Vec<f32> = (0..TILE * k).map(|_| rng.random_range(-1.0..1.0)).collect();
            let x: Vec<f32> = (0..TILE * k).map(|_| rng.random_range(-1.0..1.0)).collect();
            for isa in Isa::available() {
                let mut tile = [[0.0f32; TILE]; TILE];
                micro_kernel(isa, &w, &x, k, &mut tile);
                for i in 0..TILE {
                    for j in 0..TILE {
                        let expected: f64 = (0..k).map(|p| w[i * k + p] as f64 * x[j * k + p] as f64).sum();
                        assert!(
                            (tile[i][j] as f64 - expected).abs() < 1e-4 * (1.0 + k as f64).sqrt(),
                            "{} k={k} [{i}][{j}]: {} vs {expected}",
                            isa.name(),
                            tile[i][j]
                        );
                    }
                }
            }
        }
    }
}

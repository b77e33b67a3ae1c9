//! FP8 E4M3 weights with block scales (DeepSeek-V3/R1's format) × tokens, over panels of the
//! stored bytes: decode, batched decode and prefill.
//!
//! Each panel of 32 rows is transposed once ([`super::pack::transpose16`]) into steps of 4 bytes
//! × 16 rows and kept with the matrix (1 byte per weight, as stored). A weight byte `b` becomes
//! the f32 whose bits are `(b << 24) >>ₐ 4 & 0x87F0_0000`: sign in place, the 7 exponent and
//! mantissa bits at the bottom of the f32 exponent. That is exactly `fp8(b) · 2⁻¹²⁰` (FP8's bias
//! is 7, f32's 127; FP8 subnormals land on f32 subnormals with the same spacing), three integer
//! instructions per 16 weights instead of a table or a conversion. Per 128-value block the
//! products accumulate in f32, then `acc += block · 2¹²⁰ · scale` (a power of two, so exact).
//! The NaN bytes `0x7f`/`0xff` decode as ±480 here, as in the row kernel (`dot/fp8.rs`); FP8
//! checkpoints do not contain them.
//!
//! Accuracy: the same products as the row kernel, summed in f32 in another order.

use super::dot::Isa;
use super::pack::{for_each_panel, tiles, StoredPanels, PANEL_ROWS};
use super::SharedMut;
use crate::dtype::WeightFormat;
use crate::weight::WeightMatrix;

/// Tokens per micro-kernel tile.
const TILE_TOKENS: usize = 4;

/// Whether this kernel runs on `isa` (AVX-512) for `w`: FP8 blocks of whole panels of rows and
/// whole 4-byte steps of columns.
pub fn supports(isa: Isa, w: &WeightMatrix) -> bool {
    let blocks_fit = match w.format() {
        WeightFormat::F8E4M3Block { block_rows, block_cols } => {
            block_rows.is_multiple_of(PANEL_ROWS) && block_cols.is_multiple_of(4)
        }
        _ => false,
    };
    cfg!(target_arch = "x86_64")
        && matches!(isa, Isa::Avx512 | Isa::Avx512Vnni)
        && blocks_fit
        && w.cols().is_multiple_of(4)
}

/// Builds and keeps `w`'s panels now (where [`supports`] holds).
pub(crate) fn prepare(isa: Isa, w: &WeightMatrix) {
    w.backend_copy(|| StoredPanels::build(isa, w));
}

/// `out[n, rows] = x[n, cols] · wᵀ` for FP8 block-scaled `w` where [`supports`] holds. The first
/// call builds the panels and keeps them with `w`.
pub fn gemm_fp8(isa: Isa, x: &[f32], w: &WeightMatrix, out: &mut [f32]) {
    assert!(supports(isa, w), "gemm_fp8 takes FP8 blocks of whole panels on AVX-512");
    let WeightFormat::F8E4M3Block { block_cols, .. } = w.format() else {
        unreachable!("checked by supports")
    };
    let (rows, k) = (w.rows(), w.cols());
    let n = x.len() / k.max(1);
    assert_eq!(out.len(), n * rows, "gemm output must be [n, rows]");
    let panels = w.backend_copy(|| StoredPanels::build(isa, w));
    let dst = SharedMut::new(out);
    for_each_panel(rows.div_ceil(PANEL_ROWS), |p| {
        let first = p * PANEL_ROWS;
        for (t, size) in tiles(n, TILE_TOKENS) {
            let tile = Tile {
                w: panels.panel(p),
                scales: w.row_block_scales(first),
                block_steps: block_cols / 4,
                k,
                x: &x[t * k..(t + size) * k],
                out: dst,
                out_at: t * rows + first,
                out_stride: rows,
                count: PANEL_ROWS.min(rows - first),
            };
            tile.run(size);
        }
    });
}

/// A tile of tokens against one panel, written to `out[out_at + t·out_stride + r]` for
/// `r < count`.
struct Tile<'a> {
    w: &'a [u32],
    /// The panel's block row: one scale per block of columns.
    scales: &'a [f32],
    /// 4-byte steps per block of columns.
    block_steps: usize,
    k: usize,
    x: &'a [f32],
    out: SharedMut,
    out_at: usize,
    out_stride: usize,
    count: usize,
}

impl Tile<'_> {
    fn run(&self, size: usize) {
        let steps = self.k / 4;
        assert!(
            self.w.len() >= PANEL_ROWS * steps
                && self.x.len() >= size * self.k
                && self.block_steps > 0
                && self.scales.len() >= steps.div_ceil(self.block_steps)
        );
        #[cfg(target_arch = "x86_64")]
        {
            macro_rules! dispatch {
                ($($t:literal)*) => {
                    match size {
                        // SAFETY: `supports` checked AVX-512 (the caller's `isa` comes from
                        // detection); the assert above bounds every load, and the caller owns
                        // rows `..count` of these tokens' outputs.
                        $($t => unsafe { x86::tile::<$t>(self) },)*
                        _ => unreachable!("tiles hold 1..=TILE_TOKENS tokens"),
                    }
                };
            }
            dispatch!(1 2 3 4);
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("gemm_fp8 runs on x86_64 only (see supports)");
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::Tile;

    /// `T` tokens × 32 rows.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn tile<const T: usize>(tile: &Tile<'_>) {
        let (k, steps) = (tile.k, tile.k / 4);
        let q0 = tile.w.as_ptr();
        let q1 = q0.wrapping_add(16 * steps);
        let x = tile.x.as_ptr();
        let field = _mm512_set1_epi32(0x87f0_0000u32 as i32);
        let unbias = _mm512_set1_ps(f32::from_bits((127 + 120) << 23));
        // Byte `e` of each dword moved to the top, then into the f32 exponent and sign.
        let widen = |v: __m512i, e: usize| -> __m512 {
            let top = match e {
                0 => _mm512_slli_epi32::<24>(v),
                1 => _mm512_slli_epi32::<16>(v),
                2 => _mm512_slli_epi32::<8>(v),
                _ => v,
            };
            _mm512_castsi512_ps(_mm512_and_si512(_mm512_srai_epi32::<4>(top), field))
        };
        let mut acc = [[_mm512_setzero_ps(); 2]; T];
        let mut start = 0;
        let mut block = 0;
        while start < steps {
            let end = (start + tile.block_steps).min(steps);
            let mut part = [[_mm512_setzero_ps(); 2]; T];
            for j in start..end {
                // SAFETY: `j < steps`: both groups' step `j` and the tokens' values `4j..4j + 4`
                // are in bounds (checked by `Tile::run`).
                unsafe {
                    let v = [
                        _mm512_loadu_si512(q0.add(16 * j) as *const _),
                        _mm512_loadu_si512(q1.add(16 * j) as *const _),
                    ];
                    for e in 0..4 {
                        let w = [widen(v[0], e), widen(v[1], e)];
                        for (t, part) in part.iter_mut().enumerate() {
                            let xv = _mm512_set1_ps(*x.add(t * k + 4 * j + e));
                            part[0] = _mm512_fmadd_ps(w[0], xv, part[0]);
                            part[1] = _mm512_fmadd_ps(w[1], xv, part[1]);
                        }
                    }
                }
            }
            // SAFETY: `block < steps.div_ceil(block_steps) ≤ scales.len()` (checked by `Tile::run`).
            let scale = _mm512_set1_ps(unsafe { *tile.scales.as_ptr().add(block) });
            for (acc, part) in acc.iter_mut().zip(&part) {
                for g in 0..2 {
                    acc[g] = _mm512_fmadd_ps(_mm512_mul_ps(part[g], unbias), scale, acc[g]);
                }
            }
            start = end;
            block += 1;
        }
        // SAFETY: AVX-512F is enabled here; the caller owns outputs `out_at + t·stride + r`.
        unsafe { crate::cpu::pack::store_tile(tile.out.ptr(), tile.out_at, tile.out_stride, tile.count, &acc) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weight::ByteView;
    use rand::{Rng, SeedableRng};

    /// Every AVX-512 level present, partial panels, block columns that end mid-row, one to 9
    /// tokens, weights across the whole FP8 range (zeros and subnormals included), against f64
    /// sums over the dequantised weights: within `1e-5 · Σ|w·x|`.
    #[test]
    fn matches_f64_reference() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(23);
        for &(rows, k, block_rows, block_cols, n) in &[
            (5usize, 8usize, 32usize, 4usize, 1usize),
            (37, 260, 64, 128, 9),
            (70, 128, 32, 128, 4),
            (130, 384, 128, 128, 3),
        ] {
            // Every byte but the NaN codes 0x7f/0xff.
            let bytes: Vec<u8> = (0..rows * k)
                .map(|_| loop {
                    let b: u8 = rng.random();
                    if b & 0x7f != 0x7f {
                        break b;
                    }
                })
                .collect();
            let scales: Vec<f32> = (0..rows.div_ceil(block_rows) * k.div_ceil(block_cols))
                .map(|_| rng.random_range(1e-4f32..4.0))
                .collect();
            let x: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0..1.0)).collect();
            let matrix = || {
                WeightMatrix::new_fp8_block(
                    rows,
                    k,
                    block_rows,
                    block_cols,
                    ByteView::from_vec(bytes.clone()),
                    scales.clone(),
                )
                .unwrap()
            };
            let decoded: Vec<f64> = matrix().to_f32().iter().map(|&v| v as f64).collect();
            let isas: Vec<Isa> = Isa::available()
                .into_iter()
                .filter(|&i| supports(i, &matrix()))
                .collect();
            for isa in isas {
                let w = matrix();
                let mut out = vec![f32::NAN; n * rows];
                gemm_fp8(isa, &x, &w, &mut out);
                assert!(w.built_backend_copy::<StoredPanels>().is_some());
                for t in 0..n {
                    for r in 0..rows {
                        let (mut exact, mut magnitude) = (0.0, 0.0);
                        for c in 0..k {
                            let term = decoded[r * k + c] * x[t * k + c] as f64;
                            exact += term;
                            magnitude += term.abs();
                        }
                        let got = out[t * rows + r] as f64;
                        assert!(
                            (got - exact).abs() <= 1e-5 * magnitude + 1e-30,
                            "{} rows {rows} k {k} blocks {block_rows}x{block_cols} n {n} [{t}][{r}]: {got} vs {exact}",
                            isa.name()
                        );
                    }
                }
            }
        }
    }
}

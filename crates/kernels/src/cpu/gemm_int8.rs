//! Block-quantised weights (`Q8_0`, `Q4_0`, `Q4_K`, `Q6_K`) × many tokens with integer
//! multiply-adds (`vpdpbusd`, AVX512-VNNI): prefill and batched decode.
//!
//! Activations are rounded to i8 once per matmul (blocks of 32, see `int8_pack.rs`). Each panel
//! of 32 weight rows is decoded once to unsigned bytes plus per-block scales and transposed into
//! steps of 4 bytes × 16 rows ([`super::pack::transpose16`]). The micro-kernel keeps up to 6
//! tokens × 32 rows in registers: per weight block, exact i32 sums `Σ (u − z)·q_x` (started at
//! `−z·Σq_x`; one `vpdpbusd` per 4 values of `k` per token and 16 rows, the token's 4 bytes
//! broadcast), then `acc += f32(sum) · s·d_x (+ o · d_x·Σq_x)` in f32. A weight block is thus
//! unpacked once per matmul instead of once per token.
//!
//! Accuracy: the integer sums are exact and the weights exact; each activation moves by at most
//! half its block's step `d_x / 2` (`d_x = max|x| / 127` over 32 values), so a result is within
//! `Σ_blocks d_x/2 · Σ|w|` (plus f32 rounding) of the exact product — the same bound as the
//! integer dot products of `dot_row_prepared`.

use std::cell::RefCell;

use rayon::prelude::*;

use super::dot::Isa;
use super::int8_pack::{block_and_zero, decode_row, QuantTokens};
use super::pack::{transpose16, AlignedBuf};
use super::SharedMut;
use crate::weight::WeightMatrix;

/// Rows per panel: two 16-row groups.
const PANEL_ROWS: usize = 32;
/// Tokens per micro-kernel tile (12 integer and 12 f32 accumulators).
const TILE_TOKENS: usize = 6;

/// One panel: transposed bytes of both groups, and per group `[blocks][16]` scales and offsets.
#[derive(Default)]
struct Panel {
    q: AlignedBuf,
    s: Vec<f32>,
    o: Vec<f32>,
    /// Decoding scratch: 32 rows of `u`.
    rows: Vec<u8>,
}

thread_local! {
    static TOKENS: RefCell<QuantTokens> = RefCell::new(QuantTokens::default());
    static PANEL: RefCell<Panel> = RefCell::new(Panel::default());
}

/// Whether this GEMM runs on `isa` with its integer instructions (AVX512-VNNI). (The scalar
/// micro-kernel exists as the reference for tests.)
pub fn available(isa: Isa) -> bool {
    isa == Isa::Avx512Vnni
}

/// Whether `w` can go through [`gemm_int8`]: a block-quantised format.
pub fn supports(w: &WeightMatrix) -> bool {
    block_and_zero(w.format()).is_some()
}

/// `out[n, rows] = x[n, cols] · wᵀ` for block-quantised `w` (see [`supports`]), with activations
/// rounded to 8 bits. `isa` must be one of [`Isa::available`]; the VNNI kernel runs when
/// [`available`] says so, the scalar reference kernel otherwise.
pub fn gemm_int8(isa: Isa, x: &[f32], w: &WeightMatrix, out: &mut [f32]) {
    let (bk, zero) = block_and_zero(w.format()).expect("gemm_int8 takes block-quantised weights");
    let (rows, k) = (w.rows(), w.cols());
    let n = x.len() / k.max(1);
    assert_eq!(out.len(), n * rows, "gemm output must be [n, rows]");
    let fast = available(isa);
    TOKENS.with_borrow_mut(|tokens| {
        tokens.prepare(isa, x, k, bk, zero);
        let tokens = &*tokens;
        let dst = SharedMut::new(out);
        (0..rows.div_ceil(PANEL_ROWS)).into_par_iter().for_each(|p| {
            let first = p * PANEL_ROWS;
            let count = PANEL_ROWS.min(rows - first);
            PANEL.with_borrow_mut(|panel| {
                pack_panel(isa, w, first, count, bk, panel);
                let mut t = 0;
                while t < n {
                    let size = TILE_TOKENS.min(n - t);
                    let tile = Tile {
                        panel,
                        tokens,
                        first_token: t,
                        out: dst,
                        out_at: t * rows + first,
                        out_stride: rows,
                        count,
                    };
                    tile.run(fast, size, bk, zero == 0);
                    t += size;
                }
            });
        });
    });
}

/// Decodes rows `first..first + count` (≤ 32) and transposes them into two 16-row groups; rows
/// past `count` have zero scales and offsets, so they contribute nothing.
fn pack_panel(isa: Isa, w: &WeightMatrix, first: usize, count: usize, bk: usize, panel: &mut Panel) {
    let k = w.cols();
    let blocks = k / bk;
    panel.rows.resize(PANEL_ROWS * k, 0);
    // Scales of missing rows must be zero; offsets are only read for formats that have them.
    panel.s.resize(2 * blocks * 16, 0.0);
    panel.o.resize(2 * blocks * 16, 0.0);
    if count < PANEL_ROWS {
        panel.s.fill(0.0);
        panel.o.fill(0.0);
    }
    for r in 0..count {
        let (g, i) = (r / 16, r % 16);
        let at = g * blocks * 16 + i;
        decode_row(
            isa,
            w.format(),
            w.row_bytes(first + r),
            &mut panel.rows[r * k..(r + 1) * k],
            &mut panel.s[at..],
            &mut panel.o[at..],
        );
    }
    let steps = k / 4;
    panel.q.resize(2 * 16 * steps);
    for (g, dst) in panel.q.as_mut_slice().chunks_exact_mut(16 * steps).enumerate() {
        // Rows past `count` keep stale bytes: their zero scales cancel them.
        let rows: [&[u8]; 16] = std::array::from_fn(|i| &panel.rows[(16 * g + i) * k..(16 * g + i + 1) * k]);
        transpose16(isa, &rows, dst);
    }
}

/// A tile of tokens against one packed panel, written to `out[out_at + t·out_stride + r]` for
/// `r < count`.
struct Tile<'a> {
    panel: &'a Panel,
    tokens: &'a QuantTokens,
    first_token: usize,
    out: SharedMut,
    out_at: usize,
    out_stride: usize,
    count: usize,
}

impl Tile<'_> {
    fn run(&self, fast: bool, size: usize, bk: usize, offsets: bool) {
        let (k, blocks) = (self.tokens.k, self.tokens.blocks);
        let last = self.first_token + size;
        assert!(
            self.panel.q.as_slice().len() >= 2 * 4 * k
                && self.panel.s.len() >= 32 * blocks
                && self.panel.o.len() >= 32 * blocks
                && self.tokens.qx.len() >= last * k
                && self.tokens.init.len() >= last * blocks
                && self.tokens.dx.len() >= last * blocks
                && self.tokens.dxs.len() >= last * blocks
                && blocks * bk == k
        );
        #[cfg(target_arch = "x86_64")]
        if fast {
            macro_rules! dispatch {
                ($($t:literal)*) => {
                    match (size, bk, offsets) {
                        // SAFETY: `fast` means AVX512-VNNI was detected; the assert above bounds
                        // every load, and the caller owns rows `..count` of these tokens' outputs.
                        $(
                            ($t, 32, false) => unsafe { x86::tile::<$t, 32, false>(self) },
                            ($t, 32, true) => unsafe { x86::tile::<$t, 32, true>(self) },
                            ($t, 16, false) => unsafe { x86::tile::<$t, 16, false>(self) },
                        )*
                        _ => unreachable!("tiles hold 1..=TILE_TOKENS tokens; blocks of 16 have no offsets"),
                    }
                };
            }
            dispatch!(1 2 3 4 5 6);
            return;
        }
        let _ = fast;
        let (q, panel, tokens) = (self.panel.q.as_slice(), self.panel, self.tokens);
        for t in self.first_token..last {
            for r in 0..self.count {
                let (g, i) = (r / 16, r % 16);
                let mut acc = 0.0f32;
                for b in 0..blocks {
                    let mut sum = tokens.init[t * blocks + b];
                    for j in b * bk / 4..(b + 1) * bk / 4 {
                        let wq = q[(g * k / 4 + j) * 16 + i].to_le_bytes();
                        for (e, &u) in wq.iter().enumerate() {
                            sum += u as i32 * tokens.qx[t * k + 4 * j + e] as i32;
                        }
                    }
                    let (s, o) = (panel.s[(g * blocks + b) * 16 + i], panel.o[(g * blocks + b) * 16 + i]);
                    acc += sum as f32 * (s * tokens.dx[t * blocks + b]);
                    if offsets {
                        acc += o * tokens.dxs[t * blocks + b];
                    }
                }
                // SAFETY: the caller owns rows `..count` of this tile's tokens in the output.
                unsafe {
                    self.out
                        .write(self.out_at + (t - self.first_token) * self.out_stride + r, acc)
                };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::Tile;

    /// `T` tokens × 32 rows, blocks of `BK` values, with or without offsets.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn tile<const T: usize, const BK: usize, const OFFSETS: bool>(tile: &Tile<'_>) {
        let (k, blocks) = (tile.tokens.k, tile.tokens.blocks);
        let t0 = tile.first_token;
        let q0 = tile.panel.q.as_slice().as_ptr();
        let q1 = q0.wrapping_add(4 * k);
        let (s, o) = (tile.panel.s.as_ptr(), tile.panel.o.as_ptr());
        let qx = tile.tokens.qx.as_ptr().wrapping_add(t0 * k);
        let (init, dx, dxs) = (
            tile.tokens.init.as_ptr().wrapping_add(t0 * blocks),
            tile.tokens.dx.as_ptr().wrapping_add(t0 * blocks),
            tile.tokens.dxs.as_ptr().wrapping_add(t0 * blocks),
        );
        let mut acc = [[_mm512_setzero_ps(); 2]; T];
        for b in 0..blocks {
            // SAFETY (whole block): `b < blocks`, steps `b·BK/4..(b+1)·BK/4 ≤ k/4` of both groups,
            // and this tile's `T` tokens are in bounds (checked by `Tile::run`).
            unsafe {
                let mut sums = [[_mm512_setzero_si512(); 2]; T];
                for (t, sums) in sums.iter_mut().enumerate() {
                    let start = _mm512_set1_epi32(*init.add(t * blocks + b));
                    *sums = [start, start];
                }
                for j in b * BK / 4..(b + 1) * BK / 4 {
                    let w0 = _mm512_loadu_si512(q0.add(16 * j) as *const _);
                    let w1 = _mm512_loadu_si512(q1.add(16 * j) as *const _);
                    for (t, sums) in sums.iter_mut().enumerate() {
                        let x = _mm512_set1_epi32((qx.add(t * k + 4 * j) as *const i32).read_unaligned());
                        sums[0] = _mm512_dpbusd_epi32(sums[0], w0, x);
                        sums[1] = _mm512_dpbusd_epi32(sums[1], w1, x);
                    }
                }
                let scales = [
                    _mm512_loadu_ps(s.add(16 * b)),
                    _mm512_loadu_ps(s.add(16 * (blocks + b))),
                ];
                let offsets = if OFFSETS {
                    [
                        _mm512_loadu_ps(o.add(16 * b)),
                        _mm512_loadu_ps(o.add(16 * (blocks + b))),
                    ]
                } else {
                    [_mm512_setzero_ps(); 2]
                };
                for (t, (acc, sums)) in acc.iter_mut().zip(&sums).enumerate() {
                    let d = _mm512_set1_ps(*dx.add(t * blocks + b));
                    for g in 0..2 {
                        acc[g] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums[g]), _mm512_mul_ps(scales[g], d), acc[g]);
                    }
                    if OFFSETS {
                        let m = _mm512_set1_ps(*dxs.add(t * blocks + b));
                        for g in 0..2 {
                            acc[g] = _mm512_fmadd_ps(offsets[g], m, acc[g]);
                        }
                    }
                }
            }
        }
        // SAFETY: AVX-512F is enabled here; the caller owns outputs `out_at + t·stride + r`.
        unsafe { crate::cpu::pack::store_tile(tile.out.ptr(), tile.out_at, tile.out_stride, tile.count, &acc) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::WeightFormat;
    use crate::quant::{PreparedActivations, QK};
    use crate::weight::ByteView;
    use rand::{Rng, SeedableRng};

    /// Every ISA (VNNI where available, the scalar reference otherwise), every format, partial
    /// panels and every tile size, against f64 sums over the dequantised weights: within
    /// `1e-5 · Σ|w·x̂|` of the exact product with the rounded activations `x̂`, and within
    /// `Σ_blocks d_x/2 · Σ|w| + 1e-5 · Σ|w·x|` of the product with the f32 activations.
    #[test]
    fn every_isa_matches_f64_reference() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(13);
        for format in [
            WeightFormat::Q8_0,
            WeightFormat::Q4_0,
            WeightFormat::Q4K,
            WeightFormat::Q6K,
        ] {
            let block = format.block_size();
            for &(rows, blocks, n) in &[(5usize, 1usize, 1usize), (37, 3, 13), (16, 2, 6), (70, 1, 8)] {
                let k = blocks * block;
                let values: Vec<f32> = (0..rows * k).map(|_| rng.random_range(-1.0f32..1.0).powi(3)).collect();
                let bytes = crate::quant::quantize(format, &values).unwrap();
                let w = WeightMatrix::new(rows, k, format, ByteView::from_vec(bytes)).unwrap();
                let decoded: Vec<f64> = w.to_f32().iter().map(|&v| v as f64).collect();
                // Zero blocks and outliers next to ordinary values.
                let x: Vec<f32> = (0..n * k)
                    .map(|i| match (i / 32) % 5 {
                        0 => 0.0,
                        1 if i % 97 == 3 => 40.0,
                        _ => rng.random_range(-1.0..1.0),
                    })
                    .collect();
                let rounded: Vec<PreparedActivations> = x
                    .chunks_exact(k)
                    .map(|t| PreparedActivations::new(WeightFormat::Q8_0, t))
                    .collect();
                for isa in Isa::available() {
                    let mut out = vec![f32::NAN; n * rows];
                    gemm_int8(isa, &x, &w, &mut out);
                    for t in 0..n {
                        let xq = rounded[t].dequantized();
                        for r in 0..rows {
                            let wr = &decoded[r * k..(r + 1) * k];
                            let xt = &x[t * k..(t + 1) * k];
                            let dot = |a: &dyn Fn(usize) -> f64| -> (f64, f64) {
                                (0..k).fold((0.0, 0.0), |(s, m), c| (s + wr[c] * a(c), m + (wr[c] * a(c)).abs()))
                            };
                            let (exact, magnitude) = dot(&|c| xt[c] as f64);
                            let (exact_q, magnitude_q) = dot(&|c| xq[c] as f64);
                            let bound: f64 = (0..k / QK)
                                .map(|b| {
                                    rounded[t].d[b] as f64 / 2.0
                                        * wr[b * QK..(b + 1) * QK].iter().map(|v| v.abs()).sum::<f64>()
                                })
                                .sum();
                            let got = out[t * rows + r] as f64;
                            let name = format!("{} {} rows {rows} k {k} n {n} [{t}][{r}]", isa.name(), format.name());
                            assert!(
                                (got - exact_q).abs() <= 1e-5 * magnitude_q + 1e-30,
                                "{name}: {got} vs {exact_q}"
                            );
                            assert!(
                                (got - exact).abs() <= bound + 1e-5 * magnitude + 1e-30,
                                "{name}: {got} vs {exact} (bound {bound})"
                            );
                        }
                    }
                }
            }
        }
    }
}

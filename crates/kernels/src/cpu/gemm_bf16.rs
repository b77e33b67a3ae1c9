//! BF16 weights × many tokens with `vdpbf16ps` (AVX512-BF16): prefill and batched decode.
//!
//! Weights are used as stored (no f32 decode): each panel of 32 rows is transposed once into
//! steps of one BF16 pair per row ([`super::pack::transpose16`]), and activations are converted
//! once per matmul to BF16 pairs. The micro-kernel holds up to 12 tokens × 32 rows of f32
//! accumulators in zmm registers; per pair of `k` it loads two 16-row weight vectors and
//! broadcasts each token's pair against them, so no horizontal sums are needed.
//!
//! Two ways to multiply (the packing is the same), as the caller's
//! [`MatmulPrecision`](crate::MatmulPrecision) says:
//! - `Bf16` (the default): activations are rounded once to BF16 (relative error ≤ 2⁻⁹ each) and
//!   multiplied by `vdpbf16ps`, llama.cpp's choice: twice the multiply-adds per instruction,
//!   results within `2⁻⁹ · Σ|w·x|` (plus f32 summation error) of the exact product;
//! - `F32`: the BF16 weight pairs are widened in registers (a shift and a mask) and multiplied
//!   with the f32 activations by `vfmadd231ps`: the very products of the f32 path, summed in f32
//!   in another order, at the f32 FMA peak (about half the speed).

use std::cell::RefCell;

use super::dot::Isa;
use super::pack::{for_each_panel, pack_stored_panel, panel_words, tiles, AlignedBuf, StoredPanels, PANEL_ROWS};
use super::{pool, SharedMut};
use crate::dtype::WeightFormat;
use crate::weight::WeightMatrix;

/// Tokens per micro-kernel tile (24 accumulators).
const TILE_TOKENS: usize = 12;

thread_local! {
    /// The batch's activations as BF16 pairs or as f32 bits padded to whole pairs, `[token][..]`
    /// (caller's thread).
    static ACTIVATIONS: RefCell<AlignedBuf> = RefCell::new(AlignedBuf::default());
    /// One packed weight panel, and zero rows for a partial one (worker threads).
    static PANEL: RefCell<(AlignedBuf, Vec<u8>)> = RefCell::new((AlignedBuf::default(), Vec::new()));
}

/// Whether this GEMM runs on `isa` on this CPU: AVX-512 with AVX512-BF16. (The scalar
/// micro-kernel exists as the reference for tests.)
pub fn available(isa: Isa) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        matches!(isa, Isa::Avx512 | Isa::Avx512Vnni) && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = isa;
        false
    }
}

/// Builds and keeps `w`'s panels now (BF16 weights).
pub(crate) fn prepare(isa: Isa, w: &WeightMatrix) {
    w.backend_copy(|| StoredPanels::build(isa, w));
}

/// `out[n, rows] = x[n, cols] · wᵀ` for BF16 `w`, activations rounded to BF16 if `bf16` (f32
/// otherwise), keeping the packed panels with `w` if `repack`. `isa` must be one of
/// [`Isa::available`]; the BF16 instructions are used when [`available`] says so, the scalar
/// reference kernel otherwise.
pub fn gemm_bf16_with(isa: Isa, bf16: bool, repack: bool, x: &[f32], w: &WeightMatrix, out: &mut [f32]) {
    assert_eq!(w.format(), WeightFormat::Bf16);
    let (rows, k) = (w.rows(), w.cols());
    let n = x.len() / k.max(1);
    assert_eq!(out.len(), n * rows, "gemm output must be [n, rows]");
    let pairs = k.div_ceil(2);
    let stride = if bf16 { pairs } else { 2 * pairs };
    let fast = available(isa);
    let packed = repack.then(|| w.backend_copy(|| StoredPanels::build(isa, w)));
    ACTIVATIONS.with_borrow_mut(|xb| {
        xb.resize(n * stride);
        let xb = xb.as_mut_slice();
        pool::for_each_chunk_mut(xb, stride, |t, dst| {
            let token = &x[t * k..(t + 1) * k];
            if bf16 {
                to_bf16_pairs(fast, token, dst);
            } else {
                for (d, &v) in dst.iter_mut().zip(token.iter().chain(std::iter::repeat(&0.0))) {
                    *d = v.to_bits();
                }
            }
        });
        let xb: &[u32] = xb;
        let dst = SharedMut::new(out);
        let run_panel = |p: usize, panel: &[u32]| {
            let first = p * PANEL_ROWS;
            for (t, tokens) in tiles(n, TILE_TOKENS) {
                let tile = Tile {
                    w: panel,
                    pairs,
                    bf16,
                    x: &xb[t * stride..(t + tokens) * stride],
                    out: dst,
                    out_at: t * rows + first,
                    out_stride: rows,
                    count: PANEL_ROWS.min(rows - first),
                };
                tile.run(fast, tokens);
            }
        };
        for_each_panel(rows.div_ceil(PANEL_ROWS), |p| match packed {
            Some(packed) => run_panel(p, packed.panel(p)),
            None => PANEL.with_borrow_mut(|(panel, zeros)| {
                panel.resize(panel_words(w));
                pack_stored_panel(isa, w, p, panel.as_mut_slice(), zeros);
                run_panel(p, panel.as_slice());
            }),
        });
    });
}

/// One token's activations rounded (to nearest even) to BF16, as little-endian pairs; an odd
/// length ends in a pair whose high half is zero.
fn to_bf16_pairs(fast: bool, x: &[f32], dst: &mut [u32]) {
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if fast {
        // SAFETY: `fast` means AVX512-BF16 was detected; the function bounds its accesses.
        done = unsafe { x86::to_bf16_pairs(x, dst) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = fast;
    let bits = |i: usize| x.get(i).map_or(0, |&v| half::bf16::from_f32(v).to_bits() as u32);
    for (j, d) in dst.iter_mut().enumerate().skip(done / 2) {
        *d = bits(2 * j) | (bits(2 * j + 1) << 16);
    }
}

/// A tile of tokens against one packed panel, written to `out[out_at + t·out_stride + r]` for
/// `r < count`.
struct Tile<'a> {
    w: &'a [u32],
    pairs: usize,
    /// Whether each token holds `pairs` BF16 pairs rather than `2 · pairs` f32 bits.
    bf16: bool,
    x: &'a [u32],
    out: SharedMut,
    out_at: usize,
    out_stride: usize,
    count: usize,
}

impl Tile<'_> {
    fn stride(&self) -> usize {
        if self.bf16 {
            self.pairs
        } else {
            2 * self.pairs
        }
    }

    fn run(&self, fast: bool, tokens: usize) {
        assert!(self.w.len() >= PANEL_ROWS * self.pairs && self.x.len() >= tokens * self.stride());
        #[cfg(target_arch = "x86_64")]
        if fast {
            macro_rules! dispatch {
                ($($t:literal)*) => {
                    match (tokens, self.bf16) {
                        // SAFETY: `fast` means AVX512-BF16 was detected; the assert above bounds
                        // the loads, and the caller owns rows `count` of the output for `tokens`.
                        $(
                            ($t, false) => unsafe { x86::tile::<$t, false>(self) },
                            ($t, true) => unsafe { x86::tile::<$t, true>(self) },
                        )*
                        _ => unreachable!("tiles hold 1..=TILE_TOKENS tokens"),
                    }
                };
            }
            dispatch!(1 2 3 4 5 6 7 8 9 10 11 12);
            return;
        }
        let _ = fast;
        let bf = |v: u32| half::bf16::from_bits(v as u16).to_f32();
        for t in 0..tokens {
            for r in 0..self.count {
                let (g, i) = (r / 16, r % 16);
                let wg = &self.w[g * 16 * self.pairs..];
                let mut sum = 0.0f32;
                for j in 0..self.pairs {
                    let a = wg[16 * j + i];
                    let at = t * self.stride();
                    sum += if self.bf16 {
                        let b = self.x[at + j];
                        bf(a) * bf(b) + bf(a >> 16) * bf(b >> 16)
                    } else {
                        let (b0, b1) = (self.x[at + 2 * j], self.x[at + 2 * j + 1]);
                        bf(a) * f32::from_bits(b0) + bf(a >> 16) * f32::from_bits(b1)
                    };
                }
                // SAFETY: the caller owns rows `..count` of this tile's tokens in the output.
                unsafe { self.out.write(self.out_at + t * self.out_stride + r, sum) };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::Tile;

    /// Rounds 16 floats at a time; returns how many values were converted (a multiple of 32, so
    /// that every pair written is whole).
    #[target_feature(enable = "avx512f,avx512bf16,avx512vl")]
    pub(super) unsafe fn to_bf16_pairs(x: &[f32], dst: &mut [u32]) -> usize {
        let full = (x.len() / 32 * 32).min(dst.len() * 2 / 32 * 32);
        let mut i = 0;
        while i < full {
            // SAFETY: `i + 32 <= full`: 32 floats in `x`, 16 dwords in `dst`.
            unsafe {
                let lo = _mm512_loadu_ps(x.as_ptr().add(i));
                let hi = _mm512_loadu_ps(x.as_ptr().add(i + 16));
                // The second operand fills the low half: x[i..i + 16] first, in order.
                let v = _mm512_cvtne2ps_pbh(hi, lo);
                _mm512_storeu_si512(
                    dst.as_mut_ptr().add(i / 2) as *mut _,
                    std::mem::transmute::<__m512bh, __m512i>(v),
                );
            }
            i += 32;
        }
        full
    }

    /// `T` tokens × 32 rows: 2·T accumulators; per pair of `k`, two weight loads and `T`
    /// broadcasts (`BF16`: `vdpbf16ps` on the pairs) or `2·T` (f32: both weights of each pair
    /// widened, two `vfmadd231ps`).
    #[target_feature(enable = "avx512f,avx512bf16,avx512vl")]
    pub(super) unsafe fn tile<const T: usize, const BF16: bool>(tile: &Tile<'_>) {
        let (pairs, stride) = (tile.pairs, tile.stride());
        let (w0, w1) = (tile.w.as_ptr(), tile.w[16 * pairs..].as_ptr());
        let x = tile.x.as_ptr();
        let mut acc = [[_mm512_setzero_ps(); 2]; T];
        for j in 0..pairs {
            // SAFETY: `j < pairs`: both groups hold `16 · pairs` dwords and each of the `T`
            // tokens `stride` (checked by `Tile::run`).
            unsafe {
                let a0 = _mm512_loadu_si512(w0.add(16 * j) as *const _);
                let a1 = _mm512_loadu_si512(w1.add(16 * j) as *const _);
                if BF16 {
                    let (a0, a1) = (
                        std::mem::transmute::<__m512i, __m512bh>(a0),
                        std::mem::transmute::<__m512i, __m512bh>(a1),
                    );
                    for (t, acc) in acc.iter_mut().enumerate() {
                        let b: __m512bh = std::mem::transmute(_mm512_set1_epi32(*x.add(t * stride + j) as i32));
                        acc[0] = _mm512_dpbf16_ps(acc[0], a0, b);
                        acc[1] = _mm512_dpbf16_ps(acc[1], a1, b);
                    }
                } else {
                    // BF16 → f32 is a 16-bit shift: even elements from the low halves, odd
                    // from the high halves.
                    let high = _mm512_set1_epi32(0xffff_0000u32 as i32);
                    let even =
                        [_mm512_slli_epi32::<16>(a0), _mm512_slli_epi32::<16>(a1)].map(|v| _mm512_castsi512_ps(v));
                    let odd = [_mm512_and_si512(a0, high), _mm512_and_si512(a1, high)].map(|v| _mm512_castsi512_ps(v));
                    let xf = x as *const f32;
                    for (t, acc) in acc.iter_mut().enumerate() {
                        let b0 = _mm512_set1_ps(*xf.add(t * stride + 2 * j));
                        let b1 = _mm512_set1_ps(*xf.add(t * stride + 2 * j + 1));
                        for g in 0..2 {
                            acc[g] = _mm512_fmadd_ps(even[g], b0, acc[g]);
                            acc[g] = _mm512_fmadd_ps(odd[g], b1, acc[g]);
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
    use crate::weight::ByteView;
    use rand::{Rng, SeedableRng};

    /// Every ISA (the BF16 instructions where available, the scalar reference otherwise), both
    /// activation precisions, against f64 sums. BF16 activations: within `1e-5 · Σ|w·x̂|` of the
    /// exact product with the rounded activations `x̂`, and within `(2⁻⁹ + 1e-5) · Σ|w·x|` of
    /// the product with the f32 activations. f32 activations: within `1e-5 · Σ|w·x|` of it.
    #[test]
    fn every_isa_matches_f64_reference() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        // Odd k, k not a multiple of 32, partial panels (rows % 32, rows < 16), every tile size.
        for &(rows, k, n) in &[
            (5usize, 7usize, 1usize),
            (33, 64, 13),
            (70, 131, 25),
            (16, 300, 12),
            (47, 96, 3),
            (37, 261, 5),
        ] {
            let bf: Vec<u16> = (0..rows * k)
                .map(|_| half::bf16::from_f32(rng.random_range(-2.0..2.0)).to_bits())
                .collect();
            let bytes: Vec<u8> = bf.iter().flat_map(|b| b.to_le_bytes()).collect();
            // A fresh matrix per run, so that each ISA packs the panels it keeps.
            let matrix = || WeightMatrix::new(rows, k, WeightFormat::Bf16, ByteView::from_vec(bytes.clone())).unwrap();
            let wf: Vec<f64> = bf.iter().map(|&b| half::bf16::from_bits(b).to_f64()).collect();
            let x: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0..1.0)).collect();
            let xr: Vec<f64> = x.iter().map(|&v| half::bf16::from_f32(v).to_f64()).collect();
            let runs = Isa::available()
                .into_iter()
                .flat_map(|i| [(i, false), (i, true)])
                .flat_map(|(i, bf16)| [(i, bf16, false), (i, bf16, true)]);
            for (isa, bf16, repack) in runs {
                let w = matrix();
                let mut out = vec![f32::NAN; n * rows];
                gemm_bf16_with(isa, bf16, repack, &x, &w, &mut out);
                if repack {
                    // The second call multiplies with the panels the first one kept.
                    assert!(w.built_backend_copy::<StoredPanels>().is_some());
                    let mut again = vec![f32::NAN; n * rows];
                    gemm_bf16_with(isa, bf16, repack, &x, &w, &mut again);
                    assert_eq!(again, out);
                }
                for t in 0..n {
                    for r in 0..rows {
                        let (mut exact, mut exact_r, mut mag) = (0.0, 0.0, 0.0);
                        for c in 0..k {
                            exact += wf[r * k + c] * x[t * k + c] as f64;
                            exact_r += wf[r * k + c] * xr[t * k + c];
                            mag += (wf[r * k + c] * x[t * k + c] as f64).abs();
                        }
                        let got = out[t * rows + r] as f64;
                        let name = format!(
                            "{} bf16 {bf16} repack {repack} rows {rows} k {k} n {n} [{t}][{r}]",
                            isa.name()
                        );
                        if !bf16 {
                            assert!((got - exact).abs() <= 1e-5 * mag + 1e-30, "{name}: {got} vs {exact}");
                        } else {
                            assert!(
                                (got - exact_r).abs() <= 1e-5 * mag + 1e-30,
                                "{name}: {got} vs {exact_r}"
                            );
                            let bound = (1.0 / 512.0 + 1e-5) * mag;
                            assert!((got - exact).abs() <= bound, "{name}: {got} vs {exact}");
                        }
                    }
                }
            }
        }
    }
}

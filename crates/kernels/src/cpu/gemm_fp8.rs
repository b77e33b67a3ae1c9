//! FP8 E4M3 weights with block scales (DeepSeek-V3/R1's format) × tokens, over panels of the
//! stored bytes: decode, batched decode and prefill.
//!
//! Each panel of 32 rows is transposed once ([`super::pack::transpose16`]) into steps of 4 bytes
//! × 16 rows and kept with the matrix (1 byte per weight, as stored). Two ways to multiply, as the
//! caller's [`MatmulPrecision`](crate::MatmulPrecision) says:
//! - `Bf16` (the default, where AVX512-BF16 is present): a 16-bit lane of a step vector holds two
//!   weights (bytes 1 and 3 of a row's four, or bytes 0 and 2 after a shift left by 8); an
//!   arithmetic shift right by 4 and a mask put the byte's sign on the BF16 sign and its 7
//!   exponent and mantissa bits at the bottom of the BF16 exponent: exactly `fp8(b) · 2⁻¹²⁰`, so
//!   64 weights take 5 integer instructions and two `vdpbf16ps` (the f32 way: 11 and four FMAs;
//!   from L3 on 2 threads, 2× the speed). The activations are rounded once to BF16 and scaled by
//!   2⁶⁴ (so the products stay clear of f32's subnormals, which `vdpbf16ps` flushes), arranged per
//!   step as the pairs `(x₀, x₂), (x₁, x₃)`; per 128-value block `acc += block · 2⁵⁶ · scale`.
//!   `vdpbf16ps` also reads subnormal inputs as zero, so the FP8 subnormals (exponent 0: below
//!   2⁻⁶ of the block scale, about one weight in several thousand of a trained block) are listed
//!   per panel when it is built and added after the panel's tile: every weight counts, and the
//!   result is the exact product with the rounded activations, up to f32 summation.
//! - `F32`: a weight byte `b` becomes the f32 whose bits are `(b << 24) >>ₐ 4 & 0x87F0_0000`:
//!   sign in place, the 7 exponent and mantissa bits at the bottom of the f32 exponent. That is
//!   exactly `fp8(b) · 2⁻¹²⁰` (FP8's bias is 7, f32's 127; FP8 subnormals land on f32 subnormals
//!   with the same spacing), three integer instructions per 16 weights instead of a table or a
//!   conversion. Per 128-value block the products accumulate in f32, then
//!   `acc += block · 2¹²⁰ · scale` (a power of two, so exact).
//!
//! The NaN bytes `0x7f`/`0xff` decode as ±480 on both ways, as in the row kernel (`dot/fp8.rs`);
//! FP8 checkpoints do not contain them.
//!
//! Accuracy: `F32`, the same products as the row kernel, summed in f32 in another order; `Bf16`,
//! within `2⁻⁹ · Σ|w·x|` (the activations' rounding) of that.

use std::cell::RefCell;

use super::dot::Isa;
use super::pack::{for_each_panel, tiles, AlignedBuf, StoredPanels, PANEL_ROWS};
use super::{pool, SharedMut};
use crate::dtype::{fp8_e4m3_to_f32, WeightFormat};
use crate::weight::WeightMatrix;

/// Tokens per micro-kernel tile.
const TILE_TOKENS: usize = 4;

/// What the BF16 way scales the activations by (2⁶⁴), and what a block's sum is multiplied by to
/// undo it and the weights' 2⁻¹²⁰ (2⁵⁶).
const ACTIVATION_SCALE: f32 = (1u128 << 64) as f32;
const BF16_UNBIAS: f32 = (1u64 << 56) as f32;

thread_local! {
    /// The batch's activations as arranged BF16 pairs, `[token][step][2]` (caller's thread).
    static ACTIVATIONS: RefCell<AlignedBuf> = RefCell::new(AlignedBuf::default());
}

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

/// Whether the BF16 way runs on `isa` on this CPU (AVX512-BF16).
pub fn bf16_available(isa: Isa) -> bool {
    super::gemm_bf16::available(isa)
}

/// Builds and keeps `w`'s panels now (where [`supports`] holds).
pub(crate) fn prepare(isa: Isa, w: &WeightMatrix) {
    w.backend_copy(|| Fp8Panels::build(isa, w));
}

/// A matrix's panels and each panel's subnormal weights, which the BF16 way adds on its own.
pub(crate) struct Fp8Panels {
    stored: StoredPanels,
    subnormals: Vec<Vec<Subnormal>>,
    /// Whether the subnormals are few enough for the BF16 way (see [`MAX_SUBNORMAL_SHARE`]).
    bf16_way: bool,
}

/// Above one subnormal in this many weights, adding them one by one would cost more than the
/// BF16 way saves (at this share, an estimated 5% of the tile's time: a few nanoseconds each
/// against ~0.02 per weight); such a matrix takes the f32 way with the rounded activations
/// instead. A trained block scaled to its largest value holds about one in 5000.
const MAX_SUBNORMAL_SHARE: usize = 2048;

/// A subnormal weight: its row in the panel, its column, and its value times the block scale.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Subnormal {
    row: usize,
    col: usize,
    value: f32,
}

impl Fp8Panels {
    fn build(isa: Isa, w: &WeightMatrix) -> Self {
        let stored = StoredPanels::build(isa, w);
        let mut subnormals = vec![Vec::new(); w.rows().div_ceil(PANEL_ROWS)];
        pool::for_each_chunk_mut(&mut subnormals, 1, |p, list| list[0] = panel_subnormals(w, p));
        let count: usize = subnormals.iter().map(Vec::len).sum();
        let bf16_way = count * MAX_SUBNORMAL_SHARE <= w.rows() * w.cols();
        Self {
            stored,
            subnormals,
            bf16_way,
        }
    }
}

/// The subnormal weights of panel `p` of `w`, looked for 8 bytes at a time (they are rare).
fn panel_subnormals(w: &WeightMatrix, p: usize) -> Vec<Subnormal> {
    let WeightFormat::F8E4M3Block { block_cols, .. } = w.format() else {
        unreachable!("Fp8Panels hold FP8 block weights")
    };
    let first = p * PANEL_ROWS;
    let mut found = Vec::new();
    for row in 0..PANEL_ROWS.min(w.rows() - first) {
        let (bytes, scales) = (w.row_bytes(first + row), w.row_block_scales(first + row));
        for (at, chunk) in bytes.chunks(8).enumerate() {
            if let Ok(word) = <[u8; 8]>::try_from(chunk) {
                if !has_subnormal(u64::from_le_bytes(word)) {
                    continue;
                }
            }
            for (e, &b) in chunk.iter().enumerate() {
                if b & 0x78 == 0 && b & 0x07 != 0 {
                    let col = 8 * at + e;
                    let value = fp8_e4m3_to_f32(b) * scales[col / block_cols];
                    found.push(Subnormal { row, col, value });
                }
            }
        }
    }
    found
}

/// Whether any of the 8 FP8 bytes in `v` is subnormal: exponent bits (`0x78`) zero, mantissa
/// bits (`0x07`) not. Per byte, without carries into the next.
fn has_subnormal(v: u64) -> bool {
    const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
    let exponent = v & 0x7878_7878_7878_7878;
    let zero_exponent = !(exponent.wrapping_add(LOW7) | LOW7);
    let nonzero_mantissa = (v & 0x0707_0707_0707_0707).wrapping_add(LOW7) & !LOW7;
    zero_exponent & nonzero_mantissa != 0
}

/// `out[n, rows] = x[n, cols] · wᵀ` for FP8 block-scaled `w` where [`supports`] holds, the
/// activations rounded to BF16 if `bf16` (which needs [`bf16_available`]), f32 otherwise. The
/// first call builds the panels and keeps them with `w`.
pub fn gemm_fp8(isa: Isa, bf16: bool, x: &[f32], w: &WeightMatrix, out: &mut [f32]) {
    assert!(supports(isa, w), "gemm_fp8 takes FP8 blocks of whole panels on AVX-512");
    assert!(!bf16 || bf16_available(isa), "gemm_fp8's BF16 way needs AVX512-BF16");
    let WeightFormat::F8E4M3Block { block_cols, .. } = w.format() else {
        unreachable!("checked by supports")
    };
    let (rows, k) = (w.rows(), w.cols());
    let n = x.len() / k.max(1);
    assert_eq!(out.len(), n * rows, "gemm output must be [n, rows]");
    let panels = w.backend_copy(|| Fp8Panels::build(isa, w));
    let dst = SharedMut::new(out);
    let run = |x: &[f32], pairs: Option<&[u32]>| {
        for_each_panel(rows.div_ceil(PANEL_ROWS), |p| {
            let first = p * PANEL_ROWS;
            for (t, size) in tiles(n, TILE_TOKENS) {
                let tile = Tile {
                    w: panels.stored.panel(p),
                    scales: w.row_block_scales(first),
                    block_steps: block_cols / 4,
                    k,
                    x: &x[t * k..(t + size) * k],
                    pairs: pairs.map(|pairs| &pairs[t * k / 2..(t + size) * k / 2]),
                    subnormals: &panels.subnormals[p],
                    out: dst,
                    out_at: t * rows + first,
                    out_stride: rows,
                    count: PANEL_ROWS.min(rows - first),
                };
                tile.run(size);
            }
        })
    };
    if !bf16 {
        return run(x, None);
    }
    if !panels.bf16_way {
        return super::matmul::with_bf16_rounded(x, |rounded| run(rounded, None));
    }
    ACTIVATIONS.with_borrow_mut(|pairs| {
        pairs.resize(n * k / 2);
        pool::for_each_chunk_mut(pairs.as_mut_slice(), k / 2, |t, dst| {
            arrange_bf16_pairs(&x[t * k..(t + 1) * k], dst)
        });
        run(x, Some(pairs.as_slice()))
    });
}

/// One token's activations (`k` a multiple of 4) rounded to BF16, times 2⁶⁴, as the pairs
/// `(x₀, x₂), (x₁, x₃)` of each step of 4.
fn arrange_bf16_pairs(x: &[f32], dst: &mut [u32]) {
    #[cfg(target_arch = "x86_64")]
    let done = if std::arch::is_x86_feature_detected!("avx512bf16") {
        // SAFETY: AVX512-BF16 (and so AVX-512F) was just detected; the function bounds its accesses.
        unsafe { x86::arrange_bf16_pairs(x, dst) }
    } else {
        0
    };
    #[cfg(not(target_arch = "x86_64"))]
    let done = 0;
    let bits = |v: f32| half::bf16::from_f32(v * ACTIVATION_SCALE).to_bits() as u32;
    for (step, values) in x.chunks_exact(4).enumerate().skip(done / 4) {
        dst[2 * step] = bits(values[0]) | (bits(values[2]) << 16);
        dst[2 * step + 1] = bits(values[1]) | (bits(values[3]) << 16);
    }
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
    /// The BF16 way: the tokens' arranged pairs, `k / 2` each.
    pairs: Option<&'a [u32]>,
    subnormals: &'a [Subnormal],
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
                && self.pairs.is_none_or(|pairs| pairs.len() >= size * self.k / 2)
                && self.block_steps > 0
                && self.scales.len() >= steps.div_ceil(self.block_steps)
        );
        #[cfg(target_arch = "x86_64")]
        {
            macro_rules! dispatch {
                ($($t:literal)*) => {
                    match (size, self.pairs.is_some()) {
                        // SAFETY: `supports` checked AVX-512 and `gemm_fp8` AVX512-BF16 for the
                        // BF16 way (the caller's `isa` comes from detection); the assert above
                        // bounds every load, and the caller owns rows `..count` of these tokens'
                        // outputs.
                        $(
                            ($t, false) => unsafe { x86::tile::<$t>(self) },
                            ($t, true) => unsafe { x86::tile_bf16::<$t>(self) },
                        )*
                        _ => unreachable!("tiles hold 1..=TILE_TOKENS tokens"),
                    }
                };
            }
            dispatch!(1 2 3 4);
            if self.pairs.is_some() {
                self.add_subnormals(size);
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("gemm_fp8 runs on x86_64 only (see supports)");
    }

    /// The BF16 way's subnormal weights, times the tokens' rounded activations.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    fn add_subnormals(&self, size: usize) {
        for s in self.subnormals {
            assert!(s.row < self.count, "a panel's subnormals lie in its rows");
            for t in 0..size {
                let x = half::bf16::from_f32(self.x[t * self.k + s.col]).to_f32();
                let at = self.out_at + t * self.out_stride + s.row;
                // SAFETY: the caller owns rows `..count` of these tokens' outputs, which the tile
                // has just written.
                unsafe { *self.out.ptr().add(at) += s.value * x };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Tile, ACTIVATION_SCALE, BF16_UNBIAS};

    /// `T` tokens × 32 rows, f32 activations.
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

    /// `T` tokens × 32 rows, BF16 activations (see the module doc): per step, each group's vector
    /// gives its odd bytes (a shift and a mask) and its even bytes (one more shift) as BF16, and
    /// two `vdpbf16ps` per token take them against the token's pairs `(x₁, x₃)` and `(x₀, x₂)`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub(super) unsafe fn tile_bf16<const T: usize>(tile: &Tile<'_>) {
        let (half_k, steps) = (tile.k / 2, tile.k / 4);
        let q0 = tile.w.as_ptr();
        let q1 = q0.wrapping_add(16 * steps);
        let Some(pairs) = tile.pairs else {
            unreachable!("the BF16 way has its pairs")
        };
        let x = pairs.as_ptr();
        let field = _mm512_set1_epi16(0x87f0u16 as i16);
        let odd = |v: __m512i| -> __m512bh {
            // SAFETY: bit patterns of the same width.
            unsafe { std::mem::transmute(_mm512_and_si512(_mm512_srai_epi16::<4>(v), field)) }
        };
        let even = |v: __m512i| odd(_mm512_slli_epi16::<8>(v));
        let mut acc = [[_mm512_setzero_ps(); 2]; T];
        let mut start = 0;
        let mut block = 0;
        while start < steps {
            let end = (start + tile.block_steps).min(steps);
            // Even and odd bytes in chains of their own: one token's two groups alone would
            // leave `vdpbf16ps` waiting on its own latency.
            let mut part = [[[_mm512_setzero_ps(); 2]; 2]; T];
            for j in start..end {
                // SAFETY: `j < steps`: both groups' step `j` and the tokens' pairs `2j..2j + 2`
                // are in bounds (checked by `Tile::run`).
                unsafe {
                    let v = [
                        _mm512_loadu_si512(q0.add(16 * j) as *const _),
                        _mm512_loadu_si512(q1.add(16 * j) as *const _),
                    ];
                    let (w_even, w_odd) = ([even(v[0]), even(v[1])], [odd(v[0]), odd(v[1])]);
                    for (t, [part_even, part_odd]) in part.iter_mut().enumerate() {
                        let at = x.add(t * half_k + 2 * j);
                        let x_even: __m512bh = std::mem::transmute(_mm512_set1_epi32(*at as i32));
                        let x_odd: __m512bh = std::mem::transmute(_mm512_set1_epi32(*at.add(1) as i32));
                        for g in 0..2 {
                            part_even[g] = _mm512_dpbf16_ps(part_even[g], w_even[g], x_even);
                            part_odd[g] = _mm512_dpbf16_ps(part_odd[g], w_odd[g], x_odd);
                        }
                    }
                }
            }
            // SAFETY: `block < steps.div_ceil(block_steps) ≤ scales.len()` (checked by `Tile::run`).
            let scale = _mm512_set1_ps(unsafe { *tile.scales.as_ptr().add(block) } * BF16_UNBIAS);
            for (acc, [part_even, part_odd]) in acc.iter_mut().zip(&part) {
                for g in 0..2 {
                    acc[g] = _mm512_fmadd_ps(_mm512_add_ps(part_even[g], part_odd[g]), scale, acc[g]);
                }
            }
            start = end;
            block += 1;
        }
        // SAFETY: AVX-512F is enabled here; the caller owns outputs `out_at + t·stride + r`.
        unsafe { crate::cpu::pack::store_tile(tile.out.ptr(), tile.out_at, tile.out_stride, tile.count, &acc) };
    }

    /// Arranges 32 activations at a time (see `super::arrange_bf16_pairs`); returns how many were
    /// done.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn arrange_bf16_pairs(x: &[f32], dst: &mut [u32]) -> usize {
        let full = (x.len() / 32 * 32).min(dst.len() * 2 / 32 * 32);
        let scale = _mm512_set1_ps(ACTIVATION_SCALE);
        // x₀ x₂ x₁ x₃ within each step of 4.
        let order = _mm512_setr_epi32(0, 2, 1, 3, 4, 6, 5, 7, 8, 10, 9, 11, 12, 14, 13, 15);
        let load = |at: usize| {
            // SAFETY: `at + 16 <= full <= x.len()` (below).
            let v = unsafe { _mm512_loadu_ps(x.as_ptr().add(at)) };
            _mm512_permutexvar_ps(order, _mm512_mul_ps(v, scale))
        };
        let mut i = 0;
        while i < full {
            // The second operand fills the low half: x[i..i + 16] first.
            let v = _mm512_cvtne2ps_pbh(load(i + 16), load(i));
            // SAFETY: `i + 32 <= full`: 16 dwords of `dst` from `i / 2`.
            unsafe {
                _mm512_storeu_si512(
                    dst.as_mut_ptr().add(i / 2) as *mut _,
                    std::mem::transmute::<__m512bh, __m512i>(v),
                )
            };
            i += 32;
        }
        full
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weight::ByteView;
    use rand::{Rng, SeedableRng};

    /// Every AVX-512 level present and both ways, partial panels, block columns that end mid-row,
    /// one to 9 tokens, against f64 sums over the dequantised weights: within `1e-5 · Σ|w·x|`,
    /// where the BF16 way's `x` is the activations rounded to BF16. Matrices of normal weights
    /// with one row of zeros but for two subnormals (which the BF16 way must add back to pass),
    /// and matrices of every byte (a subnormal in 18: the f32 way with rounded activations).
    #[test]
    fn matches_f64_reference() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(23);
        for &(rows, k, block_rows, block_cols, n, every_byte) in &[
            (5usize, 8usize, 32usize, 4usize, 1usize, true),
            (37, 260, 64, 128, 9, false),
            (70, 128, 32, 128, 4, false),
            (130, 384, 128, 128, 3, false),
            (64, 256, 32, 128, 2, true),
        ] {
            // Every byte but the NaN codes 0x7f/0xff, or normal ones only.
            let mut bytes: Vec<u8> = (0..rows * k)
                .map(|_| loop {
                    let b: u8 = rng.random();
                    if b & 0x7f != 0x7f && (every_byte || b & 0x78 != 0) {
                        break b;
                    }
                })
                .collect();
            if !every_byte {
                let row = &mut bytes[(rows - 2) * k..(rows - 1) * k];
                row.fill(0);
                row[3] = 0x05;
                row[k - 2] = 0x81;
            }
            let scales: Vec<f32> = (0..rows.div_ceil(block_rows) * k.div_ceil(block_cols))
                .map(|_| rng.random_range(1e-4f32..4.0))
                .collect();
            let x: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0..1.0)).collect();
            let rounded: Vec<f32> = x.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect();
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
                for bf16 in [false, true].into_iter().filter(|&b| !b || bf16_available(isa)) {
                    let w = matrix();
                    let mut out = vec![f32::NAN; n * rows];
                    gemm_fp8(isa, bf16, &x, &w, &mut out);
                    assert_eq!(w.built_backend_copy::<Fp8Panels>().unwrap().bf16_way, !every_byte);
                    let seen = if bf16 { &rounded } else { &x };
                    for t in 0..n {
                        for r in 0..rows {
                            let (mut exact, mut magnitude) = (0.0, 0.0);
                            for c in 0..k {
                                let term = decoded[r * k + c] * seen[t * k + c] as f64;
                                exact += term;
                                magnitude += term.abs();
                            }
                            let got = out[t * rows + r] as f64;
                            assert!(
                                (got - exact).abs() <= 1e-5 * magnitude + 1e-30,
                                "{} bf16 {bf16} rows {rows} k {k} blocks {block_rows}x{block_cols} n {n} [{t}][{r}]: \
                                 {got} vs {exact}",
                                isa.name()
                            );
                        }
                    }
                }
            }
        }
    }

    /// The 8-byte test finds a subnormal in any byte, and nothing else: zero, normals of every
    /// exponent, NaN.
    #[test]
    fn finds_subnormal_bytes() {
        for b in 0..=255u8 {
            let subnormal = b & 0x78 == 0 && b & 0x07 != 0;
            for at in 0..8 {
                let word = u64::from(b) << (8 * at) | 0x3838_3838_3838_3838 & !(0xff << (8 * at));
                assert_eq!(has_subnormal(word), subnormal, "{b:#04x} at byte {at}");
            }
        }
        let w = WeightMatrix::new_fp8_block(
            33,
            16,
            32,
            8,
            ByteView::from_vec(
                (0..33 * 16)
                    .map(|i| if i == 32 * 16 + 9 { 0x83 } else { 0x40 })
                    .collect(),
            ),
            vec![2.0, 3.0, 5.0, 7.0],
        )
        .unwrap();
        assert!(panel_subnormals(&w, 0).is_empty());
        assert_eq!(
            panel_subnormals(&w, 1),
            [Subnormal {
                row: 0,
                col: 9,
                value: -3.0 / 512.0 * 7.0
            }]
        );
    }
}

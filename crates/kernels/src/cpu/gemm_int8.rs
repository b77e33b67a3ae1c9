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

use super::dot::Isa;
use super::int8_pack::{block_and_zero, decode_row, QuantTokens};
use super::pack::{for_each_panel, for_each_panel_with, tiles, transpose16, AlignedBuf, PANEL_ROWS};
use super::pool::DisjointChunks;
use super::SharedMut;
use crate::dtype::WeightFormat;
use crate::weight::WeightMatrix;

/// Tokens per micro-kernel tile (12 integer and 12 f32 accumulators).
const TILE_TOKENS: usize = 6;

/// Every 32-row panel of a matrix, decoded and transposed once and kept: the CPU backend's copy
/// of block-quantised weights for this GEMM (decoding a panel per matmul costs as much as the
/// multiply-adds when a batch holds few tokens). Per panel: both groups' transposed bytes, and per
/// group `[blocks][16]` scales and (formats with offsets only) offsets. (`Q4_K` and `Q6_K` keep
/// panels of their own, at the file's size, in `gemm_q4k.rs` and `gemm_q6k.rs` when the matmul
/// picks those kernels.)
pub(crate) struct Int8Panels {
    q: AlignedBuf,
    /// Scales as f32, or (formats whose block scale is a stored f16: `Q8_0`, `Q4_0`) as those
    /// f16 bits, so that the panels take no more bytes than the stored rows.
    s: OwnedScales,
    o: Vec<f32>,
    /// Words of `q` per panel (`2 · 16 · k/4`) and floats of `s` (and `o`) per panel.
    panel_words: usize,
    panel_scales: usize,
}

impl Int8Panels {
    /// The packed form of `w` (see [`supports`]), panels spread over the thread pool.
    pub(crate) fn build(isa: Isa, w: &WeightMatrix) -> Self {
        let (bk, _) = block_and_zero(w.format()).expect("panels hold block-quantised weights");
        let (rows, k) = (w.rows(), w.cols());
        let panels = rows.div_ceil(PANEL_ROWS);
        let (panel_words, panel_scales) = (2 * 16 * (k / 4), PANEL_ROWS * (k / bk));
        let offsets = has_offsets(w);
        let mut q = AlignedBuf::default();
        q.resize(panels * panel_words);
        // Rows past the matrix's end keep zero scales and offsets, so they contribute nothing.
        let mut s = vec![0.0; panels * panel_scales];
        let mut o = if offsets {
            vec![0.0; panels * panel_scales]
        } else {
            Vec::new()
        };
        let (q_panels, s_panels) = (
            DisjointChunks::new(q.as_mut_slice(), panel_words),
            DisjointChunks::new(&mut s, panel_scales),
        );
        // Empty pieces when the format has no offsets.
        let o_panels = DisjointChunks::new(&mut o, panel_scales);
        for_each_panel_with(panels, |scratch: &mut Vec<u8>, p| {
            let first = p * PANEL_ROWS;
            // SAFETY: `for_each_panel_with` runs each panel index once.
            let (q, s, o) = unsafe { (q_panels.get(p), s_panels.get(p), o_panels.get(p)) };
            pack_panel(isa, w, first, PANEL_ROWS.min(rows - first), bk, scratch, q, s, o);
        });
        let s = if matches!(w.format(), WeightFormat::Q8_0 | WeightFormat::Q4_0) {
            // Exact: each scale was read from an f16.
            OwnedScales::F16(s.iter().map(|&v| half::f16::from_f32(v).to_bits()).collect())
        } else {
            OwnedScales::F32(s)
        };
        Self {
            q,
            s,
            o,
            panel_words,
            panel_scales,
        }
    }

    /// Panel `p`'s transposed bytes, scales and offsets.
    fn panel(&self, p: usize) -> (&[u32], Scales<'_>, &[f32]) {
        let scales = p * self.panel_scales..(p + 1) * self.panel_scales;
        let offsets = if self.o.is_empty() { 0..0 } else { scales.clone() };
        let s = match &self.s {
            OwnedScales::F32(s) => Scales::F32(&s[scales]),
            OwnedScales::F16(s) => Scales::F16(&s[scales]),
        };
        (
            &self.q.as_slice()[p * self.panel_words..(p + 1) * self.panel_words],
            s,
            &self.o[offsets],
        )
    }
}

enum OwnedScales {
    F32(Vec<f32>),
    F16(Vec<u16>),
}

/// A panel's block scales, `[group][blocks][16]`.
#[derive(Clone, Copy)]
enum Scales<'a> {
    F32(&'a [f32]),
    F16(&'a [u16]),
}

impl Scales<'_> {
    fn len(&self) -> usize {
        match self {
            Scales::F32(s) => s.len(),
            Scales::F16(s) => s.len(),
        }
    }

    fn get(&self, at: usize) -> f32 {
        match self {
            Scales::F32(s) => s[at],
            Scales::F16(s) => half::f16::from_bits(s[at]).to_f32(),
        }
    }
}

/// Whether `w`'s format has per-block offsets (`Q4_K`'s mins).
fn has_offsets(w: &WeightMatrix) -> bool {
    block_and_zero(w.format()).is_some_and(|(_, zero)| zero == 0)
}

thread_local! {
    static TOKENS: RefCell<QuantTokens> = RefCell::new(QuantTokens::default());
    static SCRATCH: RefCell<PanelScratch> = RefCell::new(PanelScratch::default());
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

/// Builds and keeps `w`'s panels now (see [`supports`]).
pub(crate) fn prepare(isa: Isa, w: &WeightMatrix) {
    w.backend_copy(|| Int8Panels::build(isa, w));
}

/// `out[n, rows] = x[n, cols] · wᵀ` for block-quantised `w` (see [`supports`]), with activations
/// rounded to 8 bits. `isa` must be one of [`Isa::available`]; the VNNI kernel runs when
/// [`available`] says so, the scalar reference kernel otherwise. With [`super::weight_repacking`]
/// the first call packs all of `w`'s panels and keeps them with the matrix; otherwise each call
/// packs one panel at a time into scratch.
pub fn gemm_int8(isa: Isa, x: &[f32], w: &WeightMatrix, out: &mut [f32]) {
    gemm_int8_with(isa, super::weight_repacking(), x, w, out)
}

/// [`gemm_int8`], keeping the packed panels with `w` or not as the caller says (`repack`).
pub fn gemm_int8_with(isa: Isa, repack: bool, x: &[f32], w: &WeightMatrix, out: &mut [f32]) {
    let (bk, zero) = block_and_zero(w.format()).expect("gemm_int8 takes block-quantised weights");
    let (rows, k) = (w.rows(), w.cols());
    let n = x.len() / k.max(1);
    assert_eq!(out.len(), n * rows, "gemm output must be [n, rows]");
    let fast = available(isa);
    let packed = repack.then(|| w.backend_copy(|| Int8Panels::build(isa, w)));
    TOKENS.with_borrow_mut(|tokens| {
        tokens.prepare(isa, x, k, bk, zero);
        let tokens = &*tokens;
        let dst = SharedMut::new(out);
        let run_panel = |p: usize, q: &[u32], s: Scales<'_>, o: &[f32]| {
            let first = p * PANEL_ROWS;
            for (t, size) in tiles(n, TILE_TOKENS) {
                let tile = Tile {
                    q,
                    s,
                    o,
                    tokens,
                    first_token: t,
                    out: dst,
                    out_at: t * rows + first,
                    out_stride: rows,
                    count: PANEL_ROWS.min(rows - first),
                };
                tile.run(fast, size, bk, zero == 0);
            }
        };
        for_each_panel(rows.div_ceil(PANEL_ROWS), |p| match packed {
            Some(packed) => {
                let (q, s, o) = packed.panel(p);
                run_panel(p, q, s, o);
            }
            None => SCRATCH.with_borrow_mut(|scratch| {
                let (q, s, o) = scratch.pack(isa, w, p);
                run_panel(p, q, s, o);
            }),
        });
    });
}

/// One panel packed per call (when weights are not repacked once), reused across calls.
#[derive(Default)]
struct PanelScratch {
    rows: Vec<u8>,
    q: AlignedBuf,
    s: Vec<f32>,
    o: Vec<f32>,
}

impl PanelScratch {
    fn pack(&mut self, isa: Isa, w: &WeightMatrix, p: usize) -> (&[u32], Scales<'_>, &[f32]) {
        let (bk, _) = block_and_zero(w.format()).expect("panels hold block-quantised weights");
        let (first, k) = (p * PANEL_ROWS, w.cols());
        let scales = PANEL_ROWS * (k / bk);
        self.q.resize(2 * 16 * (k / 4));
        // Scales (and offsets) of rows past the end must be zero.
        self.s.clear();
        self.s.resize(scales, 0.0);
        self.o.clear();
        self.o.resize(if has_offsets(w) { scales } else { 0 }, 0.0);
        let count = PANEL_ROWS.min(w.rows() - first);
        pack_panel(
            isa,
            w,
            first,
            count,
            bk,
            &mut self.rows,
            self.q.as_mut_slice(),
            &mut self.s,
            &mut self.o,
        );
        (self.q.as_slice(), Scales::F32(&self.s), &self.o)
    }
}

/// Decodes rows `first..first + count` (≤ 32) and transposes them into two 16-row groups:
/// `q` (`2 · 16 · k/4` words), `s` and `o` (`[group][blocks][16]`; `o` empty for formats without
/// offsets). Scales and offsets of rows past `count` are left as they are (zero).
#[allow(clippy::too_many_arguments)]
fn pack_panel(
    isa: Isa,
    w: &WeightMatrix,
    first: usize,
    count: usize,
    bk: usize,
    scratch: &mut Vec<u8>,
    q: &mut [u32],
    s: &mut [f32],
    o: &mut [f32],
) {
    let k = w.cols();
    let blocks = k / bk;
    scratch.resize(PANEL_ROWS * k, 0);
    let mut no_offsets = vec![0.0; if o.is_empty() { 16 * blocks } else { 0 }];
    for r in 0..count {
        let (g, i) = (r / 16, r % 16);
        let at = g * blocks * 16 + i;
        let o = if o.is_empty() {
            &mut no_offsets[i..]
        } else {
            &mut o[at..]
        };
        decode_row(
            isa,
            w.format(),
            w.row_bytes(first + r),
            &mut scratch[r * k..(r + 1) * k],
            &mut s[at..],
            o,
        );
    }
    let steps = k / 4;
    for (g, dst) in q.chunks_exact_mut(16 * steps).enumerate() {
        // Rows past `count` keep stale bytes: their zero scales cancel them.
        let rows: [&[u8]; 16] = std::array::from_fn(|i| &scratch[(16 * g + i) * k..(16 * g + i + 1) * k]);
        transpose16(isa, &rows, dst);
    }
}

/// A tile of tokens against one packed panel, written to `out[out_at + t·out_stride + r]` for
/// `r < count`.
struct Tile<'a> {
    q: &'a [u32],
    s: Scales<'a>,
    o: &'a [f32],
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
            self.q.len() >= 2 * 4 * k
                && self.s.len() >= 32 * blocks
                && (!offsets || self.o.len() >= 32 * blocks)
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
                    match (size, bk, offsets, matches!(self.s, Scales::F16(_))) {
                        // SAFETY: `fast` means AVX512-VNNI was detected; the assert above bounds
                        // every load, and the caller owns rows `..count` of these tokens' outputs.
                        $(
                            ($t, 32, false, false) => unsafe { x86::tile::<$t, 32, false, false>(self) },
                            ($t, 32, false, true) => unsafe { x86::tile::<$t, 32, false, true>(self) },
                            ($t, 32, true, false) => unsafe { x86::tile::<$t, 32, true, false>(self) },
                            ($t, 16, false, false) => unsafe { x86::tile::<$t, 16, false, false>(self) },
                        )*
                        _ => unreachable!("tiles hold 1..=TILE_TOKENS tokens; only Q8_0/Q4_0 keep f16 scales"),
                    }
                };
            }
            dispatch!(1 2 3 4 5 6);
            return;
        }
        let _ = fast;
        let (q, tokens) = (self.q, self.tokens);
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
                    let at = (g * blocks + b) * 16 + i;
                    acc += sum as f32 * (self.s.get(at) * tokens.dx[t * blocks + b]);
                    if offsets {
                        acc += self.o[at] * tokens.dxs[t * blocks + b];
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

    use super::{Scales, Tile};

    /// `T` tokens × 32 rows, blocks of `BK` values, with or without offsets, scales as f32 or
    /// (`HALF`) f16.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
    pub(super) unsafe fn tile<const T: usize, const BK: usize, const OFFSETS: bool, const HALF: bool>(tile: &Tile<'_>) {
        let (k, blocks) = (tile.tokens.k, tile.tokens.blocks);
        let t0 = tile.first_token;
        let q0 = tile.q.as_ptr();
        let q1 = q0.wrapping_add(4 * k);
        let (s, s16) = match tile.s {
            Scales::F32(s) => (s.as_ptr(), std::ptr::null()),
            Scales::F16(s) => (std::ptr::null(), s.as_ptr()),
        };
        let o = tile.o.as_ptr();
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
                let scales = if HALF {
                    let group = |at: usize| _mm512_cvtph_ps(_mm256_loadu_si256(s16.add(at) as *const _));
                    [group(16 * b), group(16 * (blocks + b))]
                } else {
                    [
                        _mm512_loadu_ps(s.add(16 * b)),
                        _mm512_loadu_ps(s.add(16 * (blocks + b))),
                    ]
                };
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
    use crate::cpu::int8_pack::reference;
    use crate::dtype::WeightFormat;
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
                // A fresh matrix per run, so that each ISA packs the panels it keeps.
                let matrix = || WeightMatrix::new(rows, k, format, ByteView::from_vec(bytes.clone())).unwrap();
                let decoded: Vec<f64> = matrix().to_f32().iter().map(|&v| v as f64).collect();
                let x = reference::activations(&mut rng, n, k);
                for (isa, repack) in Isa::available().into_iter().flat_map(|i| [(i, false), (i, true)]) {
                    let w = matrix();
                    let mut out = vec![f32::NAN; n * rows];
                    gemm_int8_with(isa, repack, &x, &w, &mut out);
                    if repack {
                        // The second call multiplies with the panels the first one kept.
                        assert!(w.built_backend_copy::<Int8Panels>().is_some());
                        let mut again = vec![f32::NAN; n * rows];
                        gemm_int8_with(isa, repack, &x, &w, &mut again);
                        assert_eq!(again, out);
                    }
                    let what = format!("{} {} repack {repack}", isa.name(), format.name());
                    reference::check(&out, &decoded, &x, rows, k, &what);
                }
            }
        }
    }
}

//! `Q6_K` weights × tokens over panels that keep the six bits: decode and batched decode.
//!
//! The integer GEMM (`gemm_int8.rs`) decodes `Q6_K` to one byte per value plus an f32 scale per
//! 16 values (1.25 bytes per value against the file's 0.82), so its panels could not serve a
//! one-token decode, and a batch read half as many bytes again as the file holds. These panels
//! keep exactly the file's 210 bytes per 256 values, in the nibble layout of `gemm_q4k.rs`, and
//! serve every token count:
//!
//! Per panel of 32 rows, per 16-row group `g`, per 32-value block `b`, six 64-byte vectors:
//! - vectors `0..4` (`i`): row `r`'s 4 bytes `e` of vector `i` hold the low 4 bits of value
//!   `32b + 4i + e` in the low nibble and those of value `32b + 16 + 4i + e` in the high one;
//! - vectors `4 + h` (`h < 2`): row `r`'s byte `e` holds the top 2 bits of the values above for
//!   `i = 2h` (bits 0–1 the low nibble's value, 2–3 the high one's) and `i = 2h + 1` (bits 4–7);
//!
//! and per block, 2 × 16 `i8` scales (one per row: the block's first 16 values, then its last
//! 16), per super-block 16 f16 `d`. A 16-value sub-block is thus one `vpdpbusd` chain: the low
//! nibbles' chain takes the block's first scale, the high nibbles' chain its second.
//!
//! Activations are rounded as for `Q4_K` (`Q8_K`: one scale `d_x` per 256 values). A stored value
//! `q` (0..64) means `q − 32`, so each chain starts at `−32·Σq_x` of its 16 activations and sums
//! `Σ q·q_x` exactly in i32. The tiles add `f32(chain)·(d·scale)` per sub-block and token into a
//! super-block accumulator and multiply by `d_x` once per super-block. A one-token tile (decode) takes
//! its own kernel (`x86::gemv_group`), which scales the chains in i32 and converts once per
//! super-block, on 16 rows at once: 2.4× the row dots' speed from L3 (see `matmul.rs`).
//! Accuracy: the integer sums are exact, so a result is within
//! `Σ_super-blocks d_x/2 · Σ|w|` (plus f32 rounding) of the exact product.

use super::dot::Isa;
use super::int8_pack::Q8kTokens;
use super::pack::{for_each_kquant_tile, AlignedBuf, KquantPanel, KquantTile, PANEL_ROWS};
use super::pool::{self, DisjointChunks};
use super::SharedMut;
use crate::dtype::{f16_to_f32, WeightFormat};
use crate::quant::{q6_k, QK, QK_K};
use crate::weight::WeightMatrix;

/// 64-byte vectors per block and group: four of nibbles, two of top bits.
const BLOCK_VECTORS: usize = 6;

/// Whether this kernel runs on `isa` with its integer instructions (AVX512-VNNI).
pub fn available(isa: Isa) -> bool {
    isa == Isa::Avx512Vnni
}

/// Every panel of a `Q6_K` matrix in the layout above: the CPU backend's copy of the weights.
pub(crate) struct Q6kPanels {
    q: AlignedBuf,
    scales: Vec<i8>,
    d: Vec<u16>,
    blocks: usize,
}

impl Q6kPanels {
    fn build(w: &WeightMatrix) -> Self {
        assert_eq!(w.format(), WeightFormat::Q6K, "Q6_K panels hold Q6_K weights");
        let (rows, k) = (w.rows(), w.cols());
        let (blocks, supers) = (k / QK, k / QK_K);
        let panels = rows.div_ceil(PANEL_ROWS);
        let (panel_words, panel_scales, panel_supers) =
            (2 * blocks * BLOCK_VECTORS * 16, 2 * blocks * 2 * 16, 2 * supers * 16);
        let mut q = AlignedBuf::default();
        q.resize(panels * panel_words);
        // Rows past the matrix's end keep zero scales, so they contribute nothing.
        let mut scales = vec![0i8; panels * panel_scales];
        let mut d = vec![0u16; panels * panel_supers];
        let q_panels = DisjointChunks::new(q.as_mut_slice(), panel_words);
        let scale_panels = DisjointChunks::new(&mut scales, panel_scales);
        let d_panels = DisjointChunks::new(&mut d, panel_supers);
        pool::for_each(panels, |p| {
            // SAFETY: `for_each` runs each panel index once.
            let (q, scales, d) = unsafe { (q_panels.get(p), scale_panels.get(p), d_panels.get(p)) };
            for r in 0..PANEL_ROWS.min(rows - p * PANEL_ROWS) {
                let (g, i) = (r / 16, r % 16);
                let row = w.row_bytes(p * PANEL_ROWS + r);
                for (sb, block) in row.chunks_exact(q6_k::BLOCK_BYTES).enumerate() {
                    d[(g * supers + sb) * 16 + i] = u16::from_le_bytes([block[208], block[209]]);
                    for j in 0..8 {
                        let b = 8 * sb + j;
                        for half in 0..2 {
                            scales[((g * blocks + b) * 2 + half) * 16 + i] = block[192 + 2 * j + half] as i8;
                        }
                        let value = |c: usize| q6_k::six_bit(block, 32 * j + c) as u8;
                        let at = |v: usize| ((g * blocks + b) * BLOCK_VECTORS + v) * 16 + i;
                        for v in 0..4 {
                            let nibbles: [u8; 4] =
                                std::array::from_fn(|e| (value(4 * v + e) & 0x0f) | (value(16 + 4 * v + e) << 4));
                            q[at(v)] = u32::from_le_bytes(nibbles);
                            let top: [u8; 4] = std::array::from_fn(|e| {
                                ((value(4 * v + e) >> 4) | ((value(16 + 4 * v + e) >> 4) << 2)) << (4 * (v % 2))
                            });
                            q[at(4 + v / 2)] |= u32::from_le_bytes(top);
                        }
                    }
                }
            }
        });
        Self { q, scales, d, blocks }
    }

    /// Panel `p`'s share of each array.
    fn panel(&self, p: usize) -> PanelRef<'_> {
        let blocks = self.blocks;
        let (words, scales, supers) = (
            2 * blocks * BLOCK_VECTORS * 16,
            2 * blocks * 2 * 16,
            2 * (blocks / 8) * 16,
        );
        PanelRef {
            q: &self.q.as_slice()[p * words..(p + 1) * words],
            scales: &self.scales[p * scales..(p + 1) * scales],
            d: &self.d[p * supers..(p + 1) * supers],
        }
    }
}

#[derive(Clone, Copy)]
struct PanelRef<'a> {
    q: &'a [u32],
    scales: &'a [i8],
    d: &'a [u16],
}

impl PanelRef<'_> {
    /// Whether the panel holds both groups of a matrix with `blocks` blocks per row.
    fn holds(&self, blocks: usize) -> bool {
        blocks.is_multiple_of(8)
            && self.q.len() >= 2 * blocks * BLOCK_VECTORS * 16
            && self.scales.len() >= 2 * blocks * 2 * 16
            && self.d.len() >= 2 * (blocks / 8) * 16
    }

    /// The stored six-bit value `c` of block `b` of row `i` in group `g` (of a matrix with
    /// `blocks` blocks per row), read back out of the layout in the module doc: the scalar
    /// kernel's decoder.
    fn six_bit(&self, g: usize, blocks: usize, b: usize, i: usize, c: usize) -> i32 {
        let (v, e, high) = ((c % 16) / 4, c % 4, c >= 16);
        let word = |vector: usize| self.q[((g * blocks + b) * BLOCK_VECTORS + vector) * 16 + i].to_le_bytes()[e];
        let low = if high { word(v) >> 4 } else { word(v) & 0x0f };
        let top = (word(4 + v / 2) >> (4 * (v % 2) + 2 * high as usize)) & 3;
        (low | (top << 4)) as i32
    }

    /// The scale of the 16 values `16·half..` of block `b` of row `i` in group `g`.
    fn scale(&self, g: usize, blocks: usize, b: usize, half: usize, i: usize) -> i8 {
        self.scales[((g * blocks + b) * 2 + half) * 16 + i]
    }
}

/// Builds and keeps `w`'s panels now (`Q6_K` weights).
pub(crate) fn prepare(w: &WeightMatrix) {
    w.backend_copy(|| Q6kPanels::build(w));
}

/// `out[n, rows] = x[n, cols] · wᵀ` for `Q6_K` `w`, activations rounded as `Q8_K`. The first call
/// builds the panels and keeps them with `w`. `isa` must be one of [`Isa::available`]; the VNNI
/// kernel runs when [`available`] says so, the scalar reference kernel otherwise.
pub fn gemm_q6k(isa: Isa, x: &[f32], w: &WeightMatrix, out: &mut [f32]) {
    assert_eq!(w.format(), WeightFormat::Q6K, "gemm_q6k takes Q6_K weights");
    let (rows, k) = (w.rows(), w.cols());
    let n = x.len() / k.max(1);
    assert_eq!(out.len(), n * rows, "gemm output must be [n, rows]");
    let fast = available(isa);
    let panels = w.backend_copy(|| Q6kPanels::build(w));
    Q8kTokens::with_prepared(WeightFormat::Q6K, x, k, |tokens| {
        for_each_kquant_tile(rows, tokens, SharedMut::new(out), |p| panels.panel(p), fast);
    });
}

/// A tile of this GEMM: see [`KquantTile`].
type Tile<'a> = KquantTile<'a, PanelRef<'a>>;

impl KquantPanel for PanelRef<'_> {
    fn fits(&self, tokens: &Q8kTokens, last: usize) -> bool {
        self.holds(tokens.blocks) && tokens.offsets.len() >= last * 2 * tokens.blocks
    }

    #[cfg(target_arch = "x86_64")]
    unsafe fn vnni(tile: &KquantTile<'_, Self>) {
        // SAFETY: the caller meets `x86::tile`'s contract (`KquantPanel::vnni`'s).
        unsafe { super::pack::dispatch_tile_tokens!(x86::tile, tile) }
    }

    #[cfg(target_arch = "x86_64")]
    unsafe fn vnni_one_token(tile: &KquantTile<'_, Self>) {
        // SAFETY: the caller meets `x86::gemv_group`'s contract (`KquantPanel::vnni_one_token`'s).
        unsafe { x86::gemv_group(tile) }
    }

    fn scalar(tile: &KquantTile<'_, Self>, t: usize, i: usize) -> f32 {
        let (panel, tokens, g) = (tile.panel, tile.tokens, tile.at.group);
        let (k, blocks) = (tokens.k, tokens.blocks);
        let supers = blocks / 8;
        let mut acc = 0.0f32;
        for s in 0..supers {
            let d = f16_to_f32(panel.d[(g * supers + s) * 16 + i]);
            let mut acc_super = 0.0f32;
            for b in 8 * s..8 * s + 8 {
                for half in 0..2 {
                    let mut sum = tokens.offsets[t * 2 * blocks + 2 * b + half];
                    for c in 16 * half..16 * half + 16 {
                        sum += panel.six_bit(g, blocks, b, i, c) * tokens.qx[t * k + b * QK + c] as i32;
                    }
                    acc_super += sum as f32 * (panel.scale(g, blocks, b, half, i) as f32 * d);
                }
            }
            acc += acc_super * tokens.d[t * supers + s];
        }
        acc
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Tile, BLOCK_VECTORS};
    use crate::cpu::pack::{prefetch_lines, TILE_PREFETCH_BLOCKS};
    use crate::quant::QK;

    /// Vector `v` (< 4) of the block at `block` as two `vpdpbusd` operands of six-bit values: the
    /// low nibbles' values (`32b + 4v + e`) and the high nibbles' (`32b + 16 + 4v + e`), each
    /// with its top bits from vector `4 + v/2` moved to bits 4–5.
    ///
    /// # Safety
    /// AVX-512F/BW must be available and the block's six vectors readable.
    #[target_feature(enable = "avx512f,avx512bw")]
    #[inline]
    unsafe fn six_bit_vectors(block: *const u8, v: usize) -> (__m512i, __m512i) {
        // SAFETY: as the caller guarantees.
        let (w, bits) = unsafe {
            (
                _mm512_loadu_si512(block.add(v * 64) as *const _),
                _mm512_loadu_si512(block.add((4 + v / 2) * 64) as *const _),
            )
        };
        let (low, top) = (_mm512_set1_epi8(0x0f), _mm512_set1_epi8(0x30));
        // `a | (b & c)`.
        const OR_AND: i32 = 0xf8;
        let (top_lo, top_hi) = if v.is_multiple_of(2) {
            (_mm512_slli_epi16::<4>(bits), _mm512_slli_epi16::<2>(bits))
        } else {
            (bits, _mm512_srli_epi16::<2>(bits))
        };
        (
            _mm512_ternarylogic_epi32::<OR_AND>(_mm512_and_si512(w, low), top_lo, top),
            _mm512_ternarylogic_epi32::<OR_AND>(_mm512_and_si512(_mm512_srli_epi16::<4>(w), low), top_hi, top),
        )
    }

    /// The one-token tile `tile` (a decode step): rows of one 16-row group at once. Each 16-value
    /// chain (started at its `−32·Σq_x`) is scaled by its sub-block scale in i32 (`|chain| ≤
    /// 16·32·128`, times |scale| ≤ 128, 16 chains: below 2³¹) and each super-block converts to
    /// f32 once, so no float work remains per block: from L3, 2.4× the row dots' speed.
    ///
    /// # Safety
    /// `KquantPanel::vnni_one_token`'s contract.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn gemv_group(tile: &Tile<'_>) {
        let blocks = tile.tokens.blocks;
        let supers = blocks / 8;
        let (panel, g, t0) = (tile.panel, tile.at.group, tile.at.first_token);
        // SAFETY: the group, the token and its arrays lie in the panel and the prepared tokens
        // (the tile is in bounds and its panel fits: the caller's contract); the output rows
        // `..count` of token `t0` are the caller's.
        unsafe {
            let q = (panel.q.as_ptr() as *const u8).add(g * blocks * BLOCK_VECTORS * 64);
            let scales = panel.scales.as_ptr().add(g * blocks * 2 * 16);
            let d = panel.d.as_ptr().add(g * supers * 16);
            let (qx, dx) = tile.first_token();
            let offsets = tile.tokens.offsets.as_ptr().add(t0 * 2 * blocks);
            let mut acc = _mm512_setzero_ps();
            for s in 0..supers {
                let mut sum = _mm512_setzero_si512();
                for b in 8 * s..8 * s + 8 {
                    prefetch_lines::<BLOCK_VECTORS>(q.wrapping_add((b + TILE_PREFETCH_BLOCKS) * BLOCK_VECTORS * 64));
                    let mut lo = _mm512_set1_epi32(*offsets.add(2 * b));
                    let mut hi = _mm512_set1_epi32(*offsets.add(2 * b + 1));
                    let block = q.add(b * BLOCK_VECTORS * 64);
                    for v in 0..4 {
                        let (wl, wh) = six_bit_vectors(block, v);
                        let at = qx.add(QK * b + 4 * v);
                        let xl = _mm512_set1_epi32((at as *const i32).read_unaligned());
                        let xh = _mm512_set1_epi32((at.add(16) as *const i32).read_unaligned());
                        lo = _mm512_dpbusd_epi32(lo, wl, xl);
                        hi = _mm512_dpbusd_epi32(hi, wh, xh);
                    }
                    let scale = |half: usize| {
                        _mm512_cvtepi8_epi32(_mm_loadu_si128(scales.add((2 * b + half) * 16) as *const _))
                    };
                    sum = _mm512_add_epi32(sum, _mm512_mullo_epi32(lo, scale(0)));
                    sum = _mm512_add_epi32(sum, _mm512_mullo_epi32(hi, scale(1)));
                }
                let dv = _mm512_cvtph_ps(_mm256_loadu_si256(d.add(16 * s) as *const _));
                acc = _mm512_fmadd_ps(
                    _mm512_cvtepi32_ps(sum),
                    _mm512_mul_ps(dv, _mm512_set1_ps(*dx.add(s))),
                    acc,
                );
            }
            tile.store(&[[acc]]);
        }
    }

    /// `T` tokens × the 16 rows of group `tile.group` (see the module doc).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn tile<const T: usize>(tile: &Tile<'_>) {
        let (k, blocks) = (tile.tokens.k, tile.tokens.blocks);
        let supers = blocks / 8;
        let (p, g) = (tile.panel, tile.at.group);
        let q = (p.q.as_ptr() as *const u8).wrapping_add(g * blocks * BLOCK_VECTORS * 64);
        let scales = p.scales.as_ptr().wrapping_add(g * blocks * 2 * 16);
        let d = p.d.as_ptr().wrapping_add(g * supers * 16);
        let t0 = tile.at.first_token;
        let (qx, dx) = tile.first_token();
        let offsets = tile.tokens.offsets.as_ptr().wrapping_add(t0 * 2 * blocks);
        let mut acc = [[_mm512_setzero_ps(); 1]; T];
        for s in 0..supers {
            // SAFETY (whole super-block): `g < 2`, `s < supers` and `b < blocks`, so the group's
            // vectors, scales and `d` read here lie in the panel, and this tile's `T` tokens are
            // in bounds (all checked by `Tile::run`).
            unsafe {
                let dv = _mm512_cvtph_ps(_mm256_loadu_si256(d.add(16 * s) as *const _));
                let mut acc_super = [_mm512_setzero_ps(); T];
                for b in 8 * s..8 * s + 8 {
                    prefetch_lines::<BLOCK_VECTORS>(q.wrapping_add((b + TILE_PREFETCH_BLOCKS) * BLOCK_VECTORS * 64));
                    let mut lo = [_mm512_setzero_si512(); T];
                    let mut hi = [_mm512_setzero_si512(); T];
                    for t in 0..T {
                        lo[t] = _mm512_set1_epi32(*offsets.add(t * 2 * blocks + 2 * b));
                        hi[t] = _mm512_set1_epi32(*offsets.add(t * 2 * blocks + 2 * b + 1));
                    }
                    let block = q.add(b * BLOCK_VECTORS * 64);
                    for v in 0..4 {
                        let (wl, wh) = six_bit_vectors(block, v);
                        for t in 0..T {
                            let at = qx.add(t * k + QK * b + 4 * v);
                            let xl = _mm512_set1_epi32((at as *const i32).read_unaligned());
                            let xh = _mm512_set1_epi32((at.add(16) as *const i32).read_unaligned());
                            lo[t] = _mm512_dpbusd_epi32(lo[t], wl, xl);
                            hi[t] = _mm512_dpbusd_epi32(hi[t], wh, xh);
                        }
                    }
                    let scale = |half: usize| {
                        let bytes = _mm_loadu_si128(scales.add((2 * b + half) * 16) as *const _);
                        _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes)), dv)
                    };
                    let (scale_lo, scale_hi) = (scale(0), scale(1));
                    for t in 0..T {
                        acc_super[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo[t]), scale_lo, acc_super[t]);
                        acc_super[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi[t]), scale_hi, acc_super[t]);
                    }
                }
                for (t, acc) in acc.iter_mut().enumerate() {
                    acc[0] = _mm512_fmadd_ps(acc_super[t], _mm512_set1_ps(*dx.add(t * supers + s)), acc[0]);
                }
            }
        }
        // SAFETY: AVX-512F is enabled here; the caller owns the tile's outputs.
        unsafe { tile.store(&acc) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::int8_pack::reference;

    /// Every ISA (VNNI where available, the scalar reference otherwise), the shared k-quant
    /// cases (`reference::check_kquant_gemm`), against f64 sums over the
    /// dequantised weights (`check_rounded_for`, as `gemm_q4k`'s test). Random weights give
    /// negative scales and every top-bit pattern.
    #[test]
    fn every_isa_matches_f64_reference() {
        reference::check_kquant_gemm(WeightFormat::Q6K, 19, gemm_q6k, |w| {
            w.built_backend_copy::<Q6kPanels>().is_some()
        });
    }
}

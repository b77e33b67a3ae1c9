//! `Q4_K` weights × tokens over panels that keep the nibbles: decode and batched decode.
//!
//! The integer GEMM (`gemm_int8.rs`) decodes `Q4_K` to one byte per value, twice the stored
//! bytes, which a one-token decode cannot afford. These panels keep 4 bits per value, the
//! six-bit sub-block scales and mins and the f16 super-block scales: exactly the file's 144 bytes
//! per 256 values, so they serve every token count, the stored rows are not read again, and a
//! decoded token reads no more bytes than the file holds.
//!
//! Layout per panel of 32 rows, per 16-row group `g`:
//! - `q`: per 32-value block `b`, four 64-byte vectors `i`; row `r`'s 4 bytes `e` of vector `i`
//!   hold value `32b + 4i + e` in the low nibble and value `32b + 16 + 4i + e` in the high one;
//! - `scales`: per block, 16 bytes (one per row): the low 4 bits of the scale, and the low 4 bits
//!   of the min in the high nibble;
//! - `high`: per super-block of 256 values, 16 words: bits `4j..4j + 2` the scale's top 2 bits
//!   of the super-block's block `j`, bits `4j + 2..4j + 4` the min's;
//! - `d`, `dmin`: per super-block, 16 f16: the stored `d` and the negated `dmin`, so that the min
//!   term is added like `gemm_int8`'s offsets.
//!
//! One 64-byte load thus gives two `vpdpbusd` operands (a mask, and a shift and a mask) for 16
//! rows, against each token's matching 4 bytes broadcast. Activations are rounded as the row
//! dots and llama.cpp round them for `Q4_K`: 8 bits with one scale `d_x` per 256 values (`Q8_K`).
//! Per block and token the exact i32 sum becomes `acc_super += f32(sum)·(d·sc) − (dmin·m)·Σq_x`
//! (two FMAs; with a scale per 32 values, as `gemm_int8` rounds, each block also needed its
//! token's `d_x` multiplied in: 8–10% slower at 8 and 64 tokens), and each super-block
//! `acc += acc_super · d_x`. Accuracy: the integer sums are exact, so a result is within
//! `Σ_super-blocks d_x/2 · Σ|w|` (plus f32 rounding) of the exact product.
//!
//! A one-token tile (decode) takes its own kernel (`x86::gemv_group`): it applies the
//! sub-block scales and mins in i32 and converts once per super-block, on 16 rows at once, so
//! each 64-byte load feeds two `vpdpbusd` and no horizontal sums are needed.

use super::dot::Isa;
use super::int8_pack::Q8kTokens;
use super::pack::{for_each_kquant_tile, AlignedBuf, KquantPanel, KquantTile, PANEL_ROWS};
use super::pool::{self, DisjointChunks};
use super::SharedMut;
use crate::dtype::{f16_to_f32, WeightFormat};
use crate::quant::{q4_k, QK, QK_K};
use crate::weight::WeightMatrix;

/// Whether this kernel runs on `isa` with its integer instructions (AVX512-VNNI).
pub fn available(isa: Isa) -> bool {
    isa == Isa::Avx512Vnni
}

/// Every panel of a `Q4_K` matrix in the layout above: the CPU backend's copy of the weights.
pub(crate) struct Q4kPanels {
    q: AlignedBuf,
    scales: Vec<u8>,
    high: Vec<u32>,
    d: Vec<u16>,
    dmin: Vec<u16>,
    blocks: usize,
}

impl Q4kPanels {
    fn build(w: &WeightMatrix) -> Self {
        assert_eq!(w.format(), WeightFormat::Q4K, "Q4_K panels hold Q4_K weights");
        let (rows, k) = (w.rows(), w.cols());
        let (blocks, supers) = (k / QK, k / QK_K);
        let panels = rows.div_ceil(PANEL_ROWS);
        let mut q = AlignedBuf::default();
        q.resize(panels * 2 * blocks * 4 * 16);
        // Rows past the matrix's end keep zero `d` and `dmin`, so they contribute nothing.
        let mut scales = vec![0u8; panels * 2 * blocks * 16];
        let mut high = vec![0u32; panels * 2 * supers * 16];
        let (mut d, mut dmin) = (
            vec![0u16; panels * 2 * supers * 16],
            vec![0u16; panels * 2 * supers * 16],
        );
        let q_panels = DisjointChunks::new(q.as_mut_slice(), 2 * blocks * 4 * 16);
        let scale_panels = DisjointChunks::new(&mut scales, 2 * blocks * 16);
        let high_panels = DisjointChunks::new(&mut high, 2 * supers * 16);
        let (d_panels, dmin_panels) = (
            DisjointChunks::new(&mut d, 2 * supers * 16),
            DisjointChunks::new(&mut dmin, 2 * supers * 16),
        );
        pool::for_each(panels, |p| {
            // SAFETY: `for_each` runs each panel index once.
            let (q, scales, high, d, dmin) = unsafe {
                (
                    q_panels.get(p),
                    scale_panels.get(p),
                    high_panels.get(p),
                    d_panels.get(p),
                    dmin_panels.get(p),
                )
            };
            for r in 0..PANEL_ROWS.min(rows - p * PANEL_ROWS) {
                let (g, i) = (r / 16, r % 16);
                let row = w.row_bytes(p * PANEL_ROWS + r);
                for (sb, block) in row.chunks_exact(q4_k::BLOCK_BYTES).enumerate() {
                    let at = (g * supers + sb) * 16 + i;
                    d[at] = u16::from_le_bytes([block[0], block[1]]);
                    // Negating flips the sign bit: exact.
                    dmin[at] = u16::from_le_bytes([block[2], block[3]]) ^ 0x8000;
                    let (sc, m) = q4_k::scales_mins(&block[4..16]);
                    for j in 0..8 {
                        let b = 8 * sb + j;
                        scales[(g * blocks + b) * 16 + i] = (sc[j] & 0x0f) | (m[j] << 4);
                        high[at] |= (((sc[j] >> 4) | ((m[j] >> 4) << 2)) as u32) << (4 * j);
                        // Sub-block j: nibbles of bytes 32·(j/2).., low for even j.
                        let nibble = |c: usize| {
                            let byte = block[16 + 32 * (j / 2) + c];
                            if j % 2 == 0 {
                                byte & 0x0f
                            } else {
                                byte >> 4
                            }
                        };
                        for v in 0..4 {
                            let bytes: [u8; 4] =
                                std::array::from_fn(|e| nibble(4 * v + e) | (nibble(16 + 4 * v + e) << 4));
                            q[((g * blocks + b) * 4 + v) * 16 + i] = u32::from_le_bytes(bytes);
                        }
                    }
                }
            }
        });
        Self {
            q,
            scales,
            high,
            d,
            dmin,
            blocks,
        }
    }

    /// Panel `p`'s share of each array.
    fn panel(&self, p: usize) -> PanelRef<'_> {
        let (blocks, supers) = (self.blocks, self.blocks / 8);
        let words = 2 * blocks * 4 * 16;
        let (per_block, per_super) = (2 * blocks * 16, 2 * supers * 16);
        PanelRef {
            q: &self.q.as_slice()[p * words..(p + 1) * words],
            scales: &self.scales[p * per_block..(p + 1) * per_block],
            high: &self.high[p * per_super..(p + 1) * per_super],
            d: &self.d[p * per_super..(p + 1) * per_super],
            dmin: &self.dmin[p * per_super..(p + 1) * per_super],
        }
    }
}

#[derive(Clone, Copy)]
struct PanelRef<'a> {
    q: &'a [u32],
    scales: &'a [u8],
    high: &'a [u32],
    d: &'a [u16],
    dmin: &'a [u16],
}

impl PanelRef<'_> {
    /// Whether the panel holds both groups of a matrix with `blocks` blocks per row: what every
    /// kernel checks before it reads.
    fn holds(&self, blocks: usize) -> bool {
        let supers = blocks / 8;
        blocks.is_multiple_of(8)
            && self.q.len() >= 2 * blocks * 4 * 16
            && self.scales.len() >= 2 * blocks * 16
            && self.high.len() >= 2 * supers * 16
            && self.d.len() >= 2 * supers * 16
            && self.dmin.len() >= 2 * supers * 16
    }

    /// The 4-bit value `c` of block `b` of row `i` in group `g` (of a matrix with `blocks` blocks
    /// per row), read back out of the layout in the module doc: the scalar kernels' decoder.
    fn nibble(&self, g: usize, blocks: usize, b: usize, i: usize, c: usize) -> u8 {
        let (v, e) = ((c % 16) / 4, c % 4);
        let byte = self.q[((g * blocks + b) * 4 + v) * 16 + i].to_le_bytes()[e];
        if c >= 16 {
            byte >> 4
        } else {
            byte & 0x0f
        }
    }

    /// The six-bit scale and min of block `b` of row `i` in group `g`.
    fn scale_min(&self, g: usize, blocks: usize, b: usize, i: usize) -> (u8, u8) {
        let low = self.scales[(g * blocks + b) * 16 + i];
        let high = self.high[(g * blocks / 8 + b / 8) * 16 + i] >> (4 * (b % 8));
        (
            (low & 0x0f) | ((high as u8 & 3) << 4),
            (low >> 4) | (((high >> 2) as u8 & 3) << 4),
        )
    }

    /// The super-block scales `(d, −dmin)` of super-block `s` of row `i` in group `g`.
    fn super_scales(&self, g: usize, supers: usize, s: usize, i: usize) -> (f32, f32) {
        let at = (g * supers + s) * 16 + i;
        (f16_to_f32(self.d[at]), f16_to_f32(self.dmin[at]))
    }
}

/// Builds and keeps `w`'s panels now (`Q4_K` weights).
pub(crate) fn prepare(w: &WeightMatrix) {
    w.backend_copy(|| Q4kPanels::build(w));
}

/// `out[n, rows] = x[n, cols] · wᵀ` for `Q4_K` `w`, activations rounded as `Q8_K` (8 bits per
/// 256 values). The first call builds the panels and keeps them with `w`. `isa` must be one of
/// [`Isa::available`]; the VNNI kernel runs when [`available`] says so, the scalar reference
/// kernel otherwise.
pub fn gemm_q4k(isa: Isa, x: &[f32], w: &WeightMatrix, out: &mut [f32]) {
    assert_eq!(w.format(), WeightFormat::Q4K, "gemm_q4k takes Q4_K weights");
    let (rows, k) = (w.rows(), w.cols());
    let n = x.len() / k.max(1);
    assert_eq!(out.len(), n * rows, "gemm output must be [n, rows]");
    let fast = available(isa);
    let panels = w.backend_copy(|| Q4kPanels::build(w));
    Q8kTokens::with_prepared(WeightFormat::Q4K, x, k, |tokens| {
        for_each_kquant_tile(rows, tokens, SharedMut::new(out), |p| panels.panel(p), fast);
    });
}

/// A tile of this GEMM: see [`KquantTile`].
type Tile<'a> = KquantTile<'a, PanelRef<'a>>;

impl KquantPanel for PanelRef<'_> {
    fn fits(&self, tokens: &Q8kTokens, last: usize) -> bool {
        self.holds(tokens.blocks) && tokens.block_sums.len() >= last * tokens.blocks
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
            let (d, dmin) = panel.super_scales(g, supers, s, i);
            let mut acc_super = 0.0f32;
            for b in 8 * s..8 * s + 8 {
                let mut sum = 0i32;
                for c in 0..QK {
                    sum += panel.nibble(g, blocks, b, i, c) as i32 * tokens.qx[t * k + b * QK + c] as i32;
                }
                let (scale, min) = panel.scale_min(g, blocks, b, i);
                acc_super += sum as f32 * (scale as f32 * d);
                acc_super += (min as f32 * dmin) * tokens.block_sums[t * blocks + b];
            }
            acc += acc_super * tokens.d[t * supers + s];
        }
        acc
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::Tile;
    use crate::cpu::pack::{prefetch_lines, TILE_PREFETCH_BLOCKS};
    use crate::quant::QK;

    /// The one-token tile `tile` (a decode step): rows of one 16-row group at once. Per 32-value
    /// block, four 64-byte loads give eight `vpdpbusd` (low and high nibbles into two chains);
    /// the block's i32 sum is scaled by its sub-block scales with `vpmulld` (|sum| ≤
    /// 32·15·128, times a scale < 64, eight blocks: below 2³¹) and the mins' term likewise (the
    /// block sums, small integers, are exact in f32), and each super-block converts to f32 once,
    /// so no float work remains per block.
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
            let q = (panel.q.as_ptr() as *const u8).add(g * blocks * 256);
            let scales = panel.scales.as_ptr().add(g * blocks * 16);
            let high = panel.high.as_ptr().add(g * supers * 16);
            let (d, dmin) = (
                panel.d.as_ptr().add(g * supers * 16),
                panel.dmin.as_ptr().add(g * supers * 16),
            );
            let (qx, dx) = tile.first_token();
            let block_sums = tile.tokens.block_sums.as_ptr().add(t0 * blocks);
            let (low, high_nibbles) = (_mm512_set1_epi8(0x0f), _mm512_set1_epi8(0xf0u8 as i8));
            let mut acc = _mm512_setzero_ps();
            for s in 0..supers {
                let (mut sum, mut mins) = (_mm512_setzero_si512(), _mm512_setzero_ps());
                let mut high = SuperBlockHighBits::load(high.add(16 * s));
                for b in 8 * s..8 * s + 8 {
                    let (mut lo, mut hi) = (_mm512_setzero_si512(), _mm512_setzero_si512());
                    for v in 0..4 {
                        let w = _mm512_loadu_si512(q.add((4 * b + v) * 64) as *const _);
                        let at = qx.add(QK * b + 4 * v);
                        let xl = _mm512_set1_epi32((at as *const i32).read_unaligned());
                        let xh = _mm512_set1_epi32((at.add(16) as *const i32).read_unaligned());
                        lo = _mm512_dpbusd_epi32(lo, _mm512_and_si512(w, low), xl);
                        // The high nibbles in place (16× their value): one shift per block
                        // instead of one per vector.
                        hi = _mm512_dpbusd_epi32(hi, _mm512_and_si512(w, high_nibbles), xh);
                    }
                    let (block_scales, block_mins) = high.next_block(scales.add(16 * b));
                    let block = _mm512_add_epi32(lo, _mm512_srai_epi32::<4>(hi));
                    sum = _mm512_add_epi32(sum, _mm512_mullo_epi32(block, block_scales));
                    // In f32, exact: products below 2¹⁸, eight of them below 2²¹.
                    let block_sum = _mm512_set1_ps(*block_sums.add(b));
                    mins = _mm512_fmadd_ps(_mm512_cvtepi32_ps(block_mins), block_sum, mins);
                }
                let dx = _mm512_set1_ps(*dx.add(s));
                acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(half16(d.add(16 * s)), dx), acc);
                acc = _mm512_fmadd_ps(mins, _mm512_mul_ps(half16(dmin.add(16 * s)), dx), acc);
            }
            tile.store(&[[acc]]);
        }
    }

    /// 16 f16 at `at`, as f32.
    ///
    /// # Safety
    /// `at..at + 16` must be readable.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn half16(at: *const u16) -> __m512 {
        // SAFETY: as the caller guarantees.
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(at as *const _)) }
    }

    /// One super-block's `high` words (see the module doc), rotated so that the next block's top
    /// scale and min bits sit at bits 4..6 (rotations, not shifts: the last block's bits are the
    /// words' top ones).
    struct SuperBlockHighBits {
        scales: __m512i,
        mins: __m512i,
    }

    impl SuperBlockHighBits {
        /// # Safety
        /// `at..at + 16` must be readable.
        #[target_feature(enable = "avx512f")]
        #[inline]
        unsafe fn load(at: *const u32) -> Self {
            // SAFETY: as the caller guarantees.
            let high = unsafe { _mm512_loadu_si512(at as *const _) };
            Self {
                scales: _mm512_rol_epi32::<4>(high),
                mins: _mm512_rol_epi32::<2>(high),
            }
        }

        /// The six-bit scales and mins of the next block of the super-block, as 16 i32, from its
        /// 16 low-bit bytes at `low`.
        ///
        /// # Safety
        /// `low..low + 16` must be readable.
        #[target_feature(enable = "avx512f")]
        #[inline]
        unsafe fn next_block(&mut self, low: *const u8) -> (__m512i, __m512i) {
            // SAFETY: as the caller guarantees.
            let low = unsafe { _mm512_cvtepu8_epi32(_mm_loadu_si128(low as *const _)) };
            let top = _mm512_set1_epi32(0x30);
            // `a | (b & c)`.
            const OR_AND: i32 = 0xf8;
            let scales =
                _mm512_ternarylogic_epi32::<OR_AND>(_mm512_and_si512(low, _mm512_set1_epi32(0x0f)), self.scales, top);
            let mins = _mm512_ternarylogic_epi32::<OR_AND>(_mm512_srli_epi32::<4>(low), self.mins, top);
            self.scales = _mm512_ror_epi32::<4>(self.scales);
            self.mins = _mm512_ror_epi32::<4>(self.mins);
            (scales, mins)
        }
    }

    /// `T` tokens × the 16 rows of group `tile.group`. Per block and token the exact i32 sum
    /// becomes `acc_super += f32(sum)·(d·sc) + (−dmin·m)·Σq_x` (two FMAs, the block's row
    /// factors shared by the tile's tokens); per super-block `acc += acc_super · d_x`, the
    /// token's one scale for those 256 values.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn tile<const T: usize>(tile: &Tile<'_>) {
        let (k, blocks) = (tile.tokens.k, tile.tokens.blocks);
        let supers = blocks / 8;
        let (p, g) = (tile.panel, tile.at.group);
        let q = (p.q.as_ptr() as *const u8).wrapping_add(g * blocks * 4 * 64);
        let scales = p.scales.as_ptr().wrapping_add(g * blocks * 16);
        let high = p.high.as_ptr().wrapping_add(g * supers * 16);
        let (d, dmin) = (
            p.d.as_ptr().wrapping_add(g * supers * 16),
            p.dmin.as_ptr().wrapping_add(g * supers * 16),
        );
        let t0 = tile.at.first_token;
        let (qx, dx) = tile.first_token();
        let block_sums = tile.tokens.block_sums.as_ptr().wrapping_add(t0 * blocks);
        let low = _mm512_set1_epi8(0x0f);
        let mut acc = [[_mm512_setzero_ps(); 1]; T];
        for s in 0..supers {
            // SAFETY (whole super-block): `g < 2`, `s < supers` and `b < blocks`, so the group's
            // vectors, scale bytes, high words and `d`/`dmin` read here lie in the panel, and this
            // tile's `T` tokens are in bounds (all checked by `Tile::run`).
            unsafe {
                let dv = half16(d.add(16 * s));
                let mv = half16(dmin.add(16 * s));
                let mut high_bits = SuperBlockHighBits::load(high.add(16 * s));
                let mut acc_super = [_mm512_setzero_ps(); T];
                for b in 8 * s..8 * s + 8 {
                    prefetch_lines::<4>(q.wrapping_add((b + TILE_PREFETCH_BLOCKS) * 256));
                    let mut sums = [_mm512_setzero_si512(); T];
                    // Few tokens leave the dependency chains short of work: the high nibbles get
                    // chains of their own (added at the end of the block).
                    let mut sums_hi = [_mm512_setzero_si512(); T];
                    for v in 0..4 {
                        let w = _mm512_loadu_si512(q.add((4 * b + v) * 64) as *const _);
                        let lo = _mm512_and_si512(w, low);
                        let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(w), low);
                        for (t, sum) in sums.iter_mut().enumerate() {
                            let at = qx.add(t * k + 32 * b + 4 * v);
                            let xl = _mm512_set1_epi32((at as *const i32).read_unaligned());
                            let xh = _mm512_set1_epi32((at.add(16) as *const i32).read_unaligned());
                            if T <= 4 {
                                *sum = _mm512_dpbusd_epi32(*sum, lo, xl);
                                sums_hi[t] = _mm512_dpbusd_epi32(sums_hi[t], hi, xh);
                            } else {
                                *sum = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(*sum, lo, xl), hi, xh);
                            }
                        }
                    }
                    if T <= 4 {
                        for (sum, hi) in sums.iter_mut().zip(&sums_hi) {
                            *sum = _mm512_add_epi32(*sum, *hi);
                        }
                    }
                    let (block_scales, block_mins) = high_bits.next_block(scales.add(16 * b));
                    let row_scale = _mm512_mul_ps(_mm512_cvtepi32_ps(block_scales), dv);
                    let row_min = _mm512_mul_ps(_mm512_cvtepi32_ps(block_mins), mv);
                    for (t, (acc, sum)) in acc_super.iter_mut().zip(&sums).enumerate() {
                        *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(*sum), row_scale, *acc);
                        *acc = _mm512_fmadd_ps(row_min, _mm512_set1_ps(*block_sums.add(t * blocks + b)), *acc);
                    }
                }
                for (t, (acc, acc_super)) in acc.iter_mut().zip(&acc_super).enumerate() {
                    acc[0] = _mm512_fmadd_ps(*acc_super, _mm512_set1_ps(*dx.add(t * supers + s)), acc[0]);
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
    /// cases (`reference::check_kquant_gemm`: one token — the decode kernel — and every tile
    /// size, the tiles of ≤ 4 tokens giving the high nibbles chains of their own), against f64
    /// sums over the dequantised weights (`check_rounded_for`: within `1e-5 · Σ|w·x̂|` of the exact product
    /// with the `Q8_K`-rounded activations `x̂`, and within `Σ_super-blocks d_x/2 · Σ|w|` plus
    /// `1e-5 · Σ|w·x|` of the product with the f32 activations). Random six-bit scales and mins
    /// reach every block's top bits.
    #[test]
    fn every_isa_matches_f64_reference() {
        reference::check_kquant_gemm(WeightFormat::Q4K, 17, gemm_q4k, |w| {
            w.built_backend_copy::<Q4kPanels>().is_some()
        });
    }
}

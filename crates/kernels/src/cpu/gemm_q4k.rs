//! `Q4_K` weights × tokens over panels that keep the nibbles: decode and batched decode.
//!
//! The integer GEMM (`gemm_int8.rs`) decodes `Q4_K` to one byte per value, twice the stored
//! bytes, which a one-token decode cannot afford. These panels keep 4 bits per value and the
//! sub-block scales as bytes, 0.58 bytes per value against the file's 0.5625, so they serve every
//! token count and the stored rows are not read again.
//!
//! Layout per panel of 32 rows, per 16-row group `g`:
//! - `q`: per 32-value block `b`, four 64-byte vectors `i`; row `r`'s 4 bytes `e` of vector `i`
//!   hold value `32b + 4i + e` in the low nibble and value `32b + 16 + 4i + e` in the high one;
//! - `sc`, `m`: per block, 16 bytes (one per row): the six-bit scale and min;
//! - `d`, `dmin`: per super-block of 256 values, 16 f32: the stored f16 `d` and the negated
//!   `dmin`, so that the min term is added like `gemm_int8`'s offsets.
//!
//! One 64-byte load thus gives two `vpdpbusd` operands (a mask, and a shift and a mask) for 16
//! rows, against each token's matching 4 bytes broadcast. Per block the exact i32 sums become
//! `acc += f32(sum) · (d·sc) · d_x − (dmin·m) · d_x·Σq_x`: the very products of `gemm_int8`
//! (`s = d·sc`, `o = −dmin·m`), so both give the same accuracy bound (see there).

use std::cell::RefCell;

use super::dot::Isa;
use super::int8_pack::QuantTokens;
use super::pack::{for_each_panel, tiles, AlignedBuf, PANEL_ROWS};
use super::pool::{self, DisjointChunks};
use super::SharedMut;
use crate::dtype::WeightFormat;
use crate::quant::{f16_at, q4_k, QK, QK_K};
use crate::weight::WeightMatrix;

/// Tokens per micro-kernel tile.
const TILE_TOKENS: usize = 6;

thread_local! {
    static TOKENS: RefCell<QuantTokens> = RefCell::new(QuantTokens::default());
}

/// Whether this kernel runs on `isa` with its integer instructions (AVX512-VNNI).
pub fn available(isa: Isa) -> bool {
    isa == Isa::Avx512Vnni
}

/// Every panel of a `Q4_K` matrix in the layout above: the CPU backend's copy of the weights.
pub(crate) struct Q4kPanels {
    q: AlignedBuf,
    sc: Vec<u8>,
    m: Vec<u8>,
    d: Vec<f32>,
    dmin: Vec<f32>,
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
        let (mut sc, mut m) = (vec![0u8; panels * 2 * blocks * 16], vec![0u8; panels * 2 * blocks * 16]);
        let (mut d, mut dmin) = (vec![0.0; panels * 2 * supers * 16], vec![0.0; panels * 2 * supers * 16]);
        let q_panels = DisjointChunks::new(q.as_mut_slice(), 2 * blocks * 4 * 16);
        let (sc_panels, m_panels) = (
            DisjointChunks::new(&mut sc, 2 * blocks * 16),
            DisjointChunks::new(&mut m, 2 * blocks * 16),
        );
        let (d_panels, dmin_panels) = (
            DisjointChunks::new(&mut d, 2 * supers * 16),
            DisjointChunks::new(&mut dmin, 2 * supers * 16),
        );
        pool::for_each(panels, |p| {
            // SAFETY: `for_each` runs each panel index once.
            let (q, sc, m, d, dmin) = unsafe {
                (
                    q_panels.get(p),
                    sc_panels.get(p),
                    m_panels.get(p),
                    d_panels.get(p),
                    dmin_panels.get(p),
                )
            };
            for r in 0..PANEL_ROWS.min(rows - p * PANEL_ROWS) {
                let (g, i) = (r / 16, r % 16);
                let row = w.row_bytes(p * PANEL_ROWS + r);
                for (sb, block) in row.chunks_exact(q4_k::BLOCK_BYTES).enumerate() {
                    d[(g * supers + sb) * 16 + i] = f16_at(block, 0);
                    dmin[(g * supers + sb) * 16 + i] = -f16_at(block, 2);
                    let (scales, mins) = q4_k::scales_mins(&block[4..16]);
                    for j in 0..8 {
                        let b = 8 * sb + j;
                        sc[(g * blocks + b) * 16 + i] = scales[j];
                        m[(g * blocks + b) * 16 + i] = mins[j];
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
            sc,
            m,
            d,
            dmin,
            blocks,
        }
    }

    /// Panel `p`'s share of each array.
    fn panel(&self, p: usize) -> PanelRef<'_> {
        let (blocks, supers) = (self.blocks, self.blocks / 8);
        let words = 2 * blocks * 4 * 16;
        PanelRef {
            q: &self.q.as_slice()[p * words..(p + 1) * words],
            sc: &self.sc[p * 2 * blocks * 16..(p + 1) * 2 * blocks * 16],
            m: &self.m[p * 2 * blocks * 16..(p + 1) * 2 * blocks * 16],
            d: &self.d[p * 2 * supers * 16..(p + 1) * 2 * supers * 16],
            dmin: &self.dmin[p * 2 * supers * 16..(p + 1) * 2 * supers * 16],
        }
    }
}

#[derive(Clone, Copy)]
struct PanelRef<'a> {
    q: &'a [u32],
    sc: &'a [u8],
    m: &'a [u8],
    d: &'a [f32],
    dmin: &'a [f32],
}

/// Builds and keeps `w`'s panels now (`Q4_K` weights).
pub(crate) fn prepare(w: &WeightMatrix) {
    w.backend_copy(|| Q4kPanels::build(w));
}

/// `out[n, rows] = x[n, cols] · wᵀ` for `Q4_K` `w`, activations rounded to 8 bits per 32 values.
/// The first call builds the panels and keeps them with `w`. `isa` must be one of
/// [`Isa::available`]; the VNNI kernel runs when [`available`] says so, the scalar reference
/// kernel otherwise.
pub fn gemm_q4k(isa: Isa, x: &[f32], w: &WeightMatrix, out: &mut [f32]) {
    assert_eq!(w.format(), WeightFormat::Q4K, "gemm_q4k takes Q4_K weights");
    let (rows, k) = (w.rows(), w.cols());
    let n = x.len() / k.max(1);
    assert_eq!(out.len(), n * rows, "gemm output must be [n, rows]");
    let fast = available(isa);
    let panels = w.backend_copy(|| Q4kPanels::build(w));
    TOKENS.with_borrow_mut(|tokens| {
        tokens.prepare(isa, x, k, QK, 0);
        let tokens = &*tokens;
        let dst = SharedMut::new(out);
        for_each_panel(rows.div_ceil(PANEL_ROWS), |p| {
            let first = p * PANEL_ROWS;
            for (t, size) in tiles(n, TILE_TOKENS) {
                let tile = Tile {
                    panel: panels.panel(p),
                    tokens,
                    first_token: t,
                    out: dst,
                    out_at: t * rows + first,
                    out_stride: rows,
                    count: PANEL_ROWS.min(rows - first),
                };
                tile.run(fast, size);
            }
        });
    });
}

/// A tile of tokens against one panel, written to `out[out_at + t·out_stride + r]` for
/// `r < count`.
struct Tile<'a> {
    panel: PanelRef<'a>,
    tokens: &'a QuantTokens,
    first_token: usize,
    out: SharedMut,
    out_at: usize,
    out_stride: usize,
    count: usize,
}

impl Tile<'_> {
    fn run(&self, fast: bool, size: usize) {
        let (k, blocks) = (self.tokens.k, self.tokens.blocks);
        let last = self.first_token + size;
        let panel = self.panel;
        assert!(
            panel.q.len() >= 2 * blocks * 4 * 16
                && panel.sc.len() >= 2 * blocks * 16
                && panel.m.len() >= 2 * blocks * 16
                && panel.d.len() >= 2 * (blocks / 8) * 16
                && panel.dmin.len() >= 2 * (blocks / 8) * 16
                && blocks * QK == k
                && blocks.is_multiple_of(8)
                && self.tokens.qx.len() >= last * k
                && self.tokens.dx.len() >= last * blocks
                && self.tokens.dxs.len() >= last * blocks
        );
        #[cfg(target_arch = "x86_64")]
        if fast {
            macro_rules! dispatch {
                ($($t:literal)*) => {
                    match size {
                        // SAFETY: `fast` means AVX512-VNNI was detected; the assert above bounds
                        // every load, and the caller owns rows `..count` of these tokens' outputs.
                        $($t => unsafe { x86::tile::<$t>(self) },)*
                        _ => unreachable!("tiles hold 1..=TILE_TOKENS tokens"),
                    }
                };
            }
            dispatch!(1 2 3 4 5 6);
            return;
        }
        let _ = fast;
        let tokens = self.tokens;
        let supers = blocks / 8;
        for t in self.first_token..last {
            for r in 0..self.count {
                let (g, i) = (r / 16, r % 16);
                let mut acc = 0.0f32;
                for b in 0..blocks {
                    let mut sum = 0i32;
                    for c in 0..QK {
                        let (v, e, high) = ((c % 16) / 4, c % 4, c >= 16);
                        let byte = panel.q[((g * blocks + b) * 4 + v) * 16 + i].to_le_bytes()[e];
                        let u = if high { byte >> 4 } else { byte & 0x0f };
                        sum += u as i32 * tokens.qx[t * k + b * QK + c] as i32;
                    }
                    let at = (g * blocks + b) * 16 + i;
                    let sb = (g * supers + b / 8) * 16 + i;
                    let s = panel.sc[at] as f32 * panel.d[sb];
                    let o = panel.m[at] as f32 * panel.dmin[sb];
                    acc += sum as f32 * (s * tokens.dx[t * blocks + b]);
                    acc += o * tokens.dxs[t * blocks + b];
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
    use crate::cpu::pack::add_block;

    /// `T` tokens × 32 rows.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn tile<const T: usize>(tile: &Tile<'_>) {
        let (k, blocks) = (tile.tokens.k, tile.tokens.blocks);
        let supers = blocks / 8;
        let p = tile.panel;
        let q = p.q.as_ptr() as *const u8;
        let group_bytes = blocks * 4 * 64;
        let t0 = tile.first_token;
        let qx = tile.tokens.qx.as_ptr().wrapping_add(t0 * k);
        let (dx, dxs) = (
            tile.tokens.dx.as_ptr().wrapping_add(t0 * blocks),
            tile.tokens.dxs.as_ptr().wrapping_add(t0 * blocks),
        );
        let low = _mm512_set1_epi8(0x0f);
        let mut acc = [[_mm512_setzero_ps(); 2]; T];
        let (mut dv, mut mv) = ([_mm512_setzero_ps(); 2], [_mm512_setzero_ps(); 2]);
        for b in 0..blocks {
            // SAFETY (whole block): `b < blocks`, vectors `4b..4b + 4` of both groups, the
            // block's scale bytes and its super-block's `d`/`dmin` lie in the panel, and this
            // tile's `T` tokens are in bounds (all checked by `Tile::run`).
            unsafe {
                if b % 8 == 0 {
                    for g in 0..2 {
                        dv[g] = _mm512_loadu_ps(p.d.as_ptr().add((g * supers + b / 8) * 16));
                        mv[g] = _mm512_loadu_ps(p.dmin.as_ptr().add((g * supers + b / 8) * 16));
                    }
                }
                let mut sums = [[_mm512_setzero_si512(); 2]; T];
                // Few tokens leave the dependency chains short of work: the high nibbles get
                // chains of their own (added at the end of the block).
                let mut sums_hi = [[_mm512_setzero_si512(); 2]; T];
                for v in 0..4 {
                    let mut lo = [_mm512_setzero_si512(); 2];
                    let mut hi = [_mm512_setzero_si512(); 2];
                    for g in 0..2 {
                        let w = _mm512_loadu_si512(q.add(g * group_bytes + (4 * b + v) * 64) as *const _);
                        lo[g] = _mm512_and_si512(w, low);
                        hi[g] = _mm512_and_si512(_mm512_srli_epi16::<4>(w), low);
                    }
                    for (t, sums) in sums.iter_mut().enumerate() {
                        let at = qx.add(t * k + 32 * b + 4 * v);
                        let xl = _mm512_set1_epi32((at as *const i32).read_unaligned());
                        let xh = _mm512_set1_epi32((at.add(16) as *const i32).read_unaligned());
                        for g in 0..2 {
                            if T <= 2 {
                                sums[g] = _mm512_dpbusd_epi32(sums[g], lo[g], xl);
                                sums_hi[t][g] = _mm512_dpbusd_epi32(sums_hi[t][g], hi[g], xh);
                            } else {
                                sums[g] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(sums[g], lo[g], xl), hi[g], xh);
                            }
                        }
                    }
                }
                if T <= 2 {
                    for (sums, hi) in sums.iter_mut().zip(&sums_hi) {
                        for g in 0..2 {
                            sums[g] = _mm512_add_epi32(sums[g], hi[g]);
                        }
                    }
                }
                let mut s = [_mm512_setzero_ps(); 2];
                let mut o = [_mm512_setzero_ps(); 2];
                for g in 0..2 {
                    let bytes = |a: &[u8]| _mm_loadu_si128(a.as_ptr().add((g * blocks + b) * 16) as *const _);
                    s[g] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes(p.sc))), dv[g]);
                    o[g] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes(p.m))), mv[g]);
                }
                add_block::<T, true>(&mut acc, &sums, s, o, dx.add(b), dxs.add(b), blocks);
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
    use crate::weight::ByteView;
    use rand::{Rng, SeedableRng};

    /// Every ISA (VNNI where available, the scalar reference otherwise), partial panels, one to
    /// 13 tokens, against f64 sums over the dequantised weights: within `1e-5 · Σ|w·x̂|` of the
    /// exact product with the rounded activations `x̂`, and within `Σ_blocks d_x/2 · Σ|w|` (plus
    /// `1e-5 · Σ|w·x|`) of the product with the f32 activations.
    #[test]
    fn every_isa_matches_f64_reference() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(17);
        for &(rows, supers, n) in &[(5usize, 1usize, 1usize), (37, 2, 13), (32, 1, 6), (70, 3, 7)] {
            let k = supers * QK_K;
            let values: Vec<f32> = (0..rows * k).map(|_| rng.random_range(-1.0f32..1.0).powi(3)).collect();
            let bytes = crate::quant::quantize(WeightFormat::Q4K, &values).unwrap();
            let decoded: Vec<f64> = WeightMatrix::new(rows, k, WeightFormat::Q4K, ByteView::from_vec(bytes.clone()))
                .unwrap()
                .to_f32()
                .iter()
                .map(|&v| v as f64)
                .collect();
            let x = reference::activations(&mut rng, n, k);
            for isa in Isa::available() {
                // A fresh matrix per ISA, so that each builds the panels it keeps.
                let w = WeightMatrix::new(rows, k, WeightFormat::Q4K, ByteView::from_vec(bytes.clone())).unwrap();
                let mut out = vec![f32::NAN; n * rows];
                gemm_q4k(isa, &x, &w, &mut out);
                assert!(w.built_backend_copy::<Q4kPanels>().is_some());
                reference::check(&out, &decoded, &x, rows, k, isa.name());
            }
        }
    }
}

//! Shared pieces of the packed GEMMs (`gemm_bf16.rs`, `gemm_fp8.rs`, `gemm_int8.rs`,
//! `gemm_q4k.rs`, `gemm_q6k.rs`): a 64-byte aligned scratch buffer, the dword transpose that packs 16 weight rows
//! into the layout their micro-kernels read — one 64-byte vector per 4 bytes of `k`, holding those
//! 4 bytes of all 16 rows (BF16: one pair of weights per row; FP8 and int8: four), so that one
//! load feeds 16 output rows and a token's matching 4 bytes are broadcast against it — the
//! panels of formats packed as stored, the token tiles and the tile epilogue.

use super::int8_pack::Q8kTokens;
use super::pool;
use super::SharedMut;

use super::dot::Isa;
use crate::weight::WeightMatrix;

/// Rows per panel of every packed GEMM: two 16-row groups.
pub(crate) const PANEL_ROWS: usize = 32;

/// `(first token, tokens)` of each tile of at most `tile` tokens over a batch of `n`.
pub(crate) fn tiles(n: usize, tile: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..n).step_by(tile.max(1)).map(move |t| (t, tile.min(n - t)))
}

/// Every 32-row panel of a matrix whose stored bytes the kernel reads as they are (BF16, FP8),
/// transposed once and kept (see [`super::weight_repacking`]).
pub(crate) struct StoredPanels {
    words: AlignedBuf,
    panel_words: usize,
}

impl StoredPanels {
    pub(crate) fn build(isa: Isa, w: &WeightMatrix) -> Self {
        let panel_words = panel_words(w);
        let mut words = AlignedBuf::default();
        words.resize(w.rows().div_ceil(PANEL_ROWS) * panel_words);
        pool::for_each_chunk_mut(words.as_mut_slice(), panel_words, |p, dst| {
            pack_stored_panel(isa, w, p, dst, &mut Vec::new())
        });
        Self { words, panel_words }
    }

    pub(crate) fn panel(&self, p: usize) -> &[u32] {
        &self.words.as_slice()[p * self.panel_words..(p + 1) * self.panel_words]
    }
}

/// Runs `panel(p)` for every `p < count` (a matrix's panels) on the compute pool, adjacent panels
/// grouped into one task (about eight tasks per thread): each thread then streams a long stretch
/// of the weights instead of single panels alternating with the other threads' (Q4_K_M, 8 decode
/// streams: 102–104 vs 89–101 tokens/s).
pub(crate) fn for_each_panel(count: usize, panel: impl Fn(usize) + Sync) {
    for_each_panel_with(count, |_: &mut (), p| panel(p));
}

/// [`for_each_panel`], with scratch that each task makes once and lends to its panels in turn.
pub(crate) fn for_each_panel_with<S: Default>(count: usize, panel: impl Fn(&mut S, usize) + Sync) {
    let per_task = (count / (pool::threads() * 8)).max(1);
    pool::for_each(count.div_ceil(per_task), |task| {
        let mut scratch = S::default();
        for p in task * per_task..((task + 1) * per_task).min(count) {
            panel(&mut scratch, p);
        }
    });
}

/// One tile of the k-quant GEMMs (`gemm_q4k.rs`, `gemm_q6k.rs`): 16-row group `group` of panel
/// `panel` (output rows `first_row..first_row + count`) against tokens
/// `first_token..first_token + tokens`.
#[derive(Clone, Copy)]
pub(crate) struct GroupTile {
    pub(crate) panel: usize,
    pub(crate) group: usize,
    pub(crate) first_row: usize,
    pub(crate) count: usize,
    pub(crate) first_token: usize,
    pub(crate) tokens: usize,
}

/// Runs `tile` for every [`GroupTile`] of a `rows`-row matrix and `n` tokens, at most
/// `tile_tokens` tokens per tile, the panels spread over the thread pool.
pub(crate) fn for_each_group_tile(rows: usize, n: usize, tile_tokens: usize, tile: impl Fn(GroupTile) + Sync) {
    for_each_panel(rows.div_ceil(PANEL_ROWS), |panel| {
        for group in 0..2 {
            let first_row = panel * PANEL_ROWS + 16 * group;
            if first_row >= rows {
                break;
            }
            for (first_token, tokens) in tiles(n, tile_tokens) {
                tile(GroupTile {
                    panel,
                    group,
                    first_row,
                    count: 16.min(rows - first_row),
                    first_token,
                    tokens,
                });
            }
        }
    });
}

/// A k-quant tile (`gemm_q4k.rs`, `gemm_q6k.rs`): [`GroupTile`] `at` of a matrix of `rows` rows,
/// whose panel is `panel`, against `tokens`; results go to `out[t·rows + r]`.
pub(crate) struct KquantTile<'a, P> {
    pub(crate) panel: P,
    pub(crate) at: GroupTile,
    pub(crate) tokens: &'a Q8kTokens,
    pub(crate) out: SharedMut,
    pub(crate) rows: usize,
}

impl<P> KquantTile<'_, P> {
    /// Whether the tile's group, rows and tokens lie in what it reads and writes (the checks
    /// both k-quant kernels make before their unchecked loads; each adds its panel's and its own
    /// token arrays').
    pub(crate) fn in_bounds(&self) -> bool {
        let (k, blocks) = (self.tokens.k, self.tokens.blocks);
        let last = self.at.first_token + self.at.tokens;
        blocks * crate::quant::QK == k
            && self.tokens.qx.len() >= last * k
            && self.tokens.d.len() >= last * (blocks / 8)
            && self.at.group < 2
            && self.at.count <= 16
    }

    /// The index in `out` of token `t`'s (counted from the batch's start) row `i` of the tile.
    pub(crate) fn out_index(&self, t: usize, i: usize) -> usize {
        t * self.rows + self.at.first_row + i
    }

    /// Where the tile's first token's `Q8_K` values and per-super-block scales start (what every
    /// k-quant kernel reads of the tokens; each format's own token arrays follow its layout).
    /// Pointers only: reading through them is the kernel's, within [`Self::in_bounds`].
    pub(crate) fn first_token(&self) -> (*const i8, *const f32) {
        let (t0, tokens) = (self.at.first_token, self.tokens);
        (
            tokens.qx.as_ptr().wrapping_add(t0 * tokens.k),
            tokens.d.as_ptr().wrapping_add(t0 * (tokens.blocks / 8)),
        )
    }

    /// Stores the tile's results: `acc[t][0]` holds token `first_token + t`'s rows `..count`.
    ///
    /// # Safety
    /// AVX-512F must be available and the tile's outputs the caller's (a kernel's contract).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn store<const T: usize>(&self, acc: &[[std::arch::x86_64::__m512; 1]; T]) {
        let out_at = self.out_index(self.at.first_token, 0);
        // SAFETY: as the caller guarantees.
        unsafe { store_tile(self.out.ptr(), out_at, self.rows, self.at.count, acc) }
    }
}

/// Calls `$kernel::<T>($tile)` for the tile's token count `T` (2 to 8; one token takes
/// [`KquantPanel::vnni_one_token`]): the k-quant GEMMs' VNNI tiles are generic over it. Expands
/// to calls of `$kernel`, so it goes inside `unsafe` when that is an `unsafe fn`, whose contract
/// the caller then meets.
macro_rules! dispatch_tile_tokens {
    ($($kernel:ident)::+, $tile:expr) => {
        match $tile.at.tokens {
            2 => $($kernel)::+::<2>($tile),
            3 => $($kernel)::+::<3>($tile),
            4 => $($kernel)::+::<4>($tile),
            5 => $($kernel)::+::<5>($tile),
            6 => $($kernel)::+::<6>($tile),
            7 => $($kernel)::+::<7>($tile),
            8 => $($kernel)::+::<8>($tile),
            _ => unreachable!("k-quant tiles of several tokens hold 2 to 8"),
        }
    };
}
pub(crate) use dispatch_tile_tokens;

/// Tokens per k-quant tile (of one 16-row group: 8 integer and 8 f32 accumulators). One group
/// at a time rather than a panel's 32 rows × 6 tokens: 8 tokens (a batch of 8 streams) then fill
/// one tile instead of a 6-token and a 2-token one, and each tile's per-block float step is
/// shared by more tokens. [`dispatch_tile_tokens`] covers 2 to this many.
pub(crate) const KQUANT_TILE_TOKENS: usize = 8;

/// How many blocks ahead of the one being multiplied the k-quant tiles prefetch their group's
/// panel ([`prefetch_lines`]): about a memory latency at a few hundred cycles per block (2 KiB
/// of `Q4_K`, 3 KiB of `Q6_K`; 4 and 16 measured alike). The one-token `Q6_K` kernel prefetches
/// the same distance (its down projection from DRAM: 27–32 GB/s vs 23–26 without); the
/// one-token `Q4_K` kernel gains nothing from it (`decode/Q4_K` from DRAM 30–34 GB/s with the
/// next 4, 8 or 16 KiB prefetched and 30–31 without; at 1536×8960 no tg change).
#[cfg(target_arch = "x86_64")]
pub(crate) const TILE_PREFETCH_BLOCKS: usize = 8;

/// What a k-quant GEMM's panel (`gemm_q4k.rs`, `gemm_q6k.rs`) gives the shared tile driver.
pub(crate) trait KquantPanel: Copy {
    /// Whether the panel holds both groups of a matrix of `tokens.blocks` blocks per row, and
    /// `tokens` the arrays this format's kernels read for tokens `..last`.
    fn fits(&self, tokens: &Q8kTokens, last: usize) -> bool;

    /// The scalar reference kernel: token `t`'s output for row `i` of `tile`.
    fn scalar(tile: &KquantTile<'_, Self>, t: usize, i: usize) -> f32;

    /// The VNNI kernel over a whole tile of 2 to [`KQUANT_TILE_TOKENS`] tokens.
    ///
    /// # Safety
    /// AVX512-F/BW/VL/VNNI must be available, the tile [`KquantTile::in_bounds`] and its panel
    /// [`fits`](Self::fits), and rows `..count` of the tile's tokens in the output the caller's.
    #[cfg(target_arch = "x86_64")]
    unsafe fn vnni(tile: &KquantTile<'_, Self>);

    /// The VNNI kernel over a tile of one token (a decode step, or a batch's last token): it
    /// scales in integers and converts once per super-block, where the tiles share a float step
    /// per block among their tokens.
    ///
    /// # Safety
    /// As [`vnni`](Self::vnni)'s.
    #[cfg(target_arch = "x86_64")]
    unsafe fn vnni_one_token(tile: &KquantTile<'_, Self>);
}

impl<P: KquantPanel> KquantTile<'_, P> {
    /// Checks the tile's bounds, then runs the VNNI kernel if `fast`, the scalar one otherwise.
    fn run(&self, fast: bool) {
        let last = self.at.first_token + self.at.tokens;
        assert!(self.in_bounds() && self.panel.fits(self.tokens, last));
        #[cfg(target_arch = "x86_64")]
        if fast {
            // SAFETY: `fast` means AVX512-VNNI was detected (the caller's promise); the assert
            // above is the rest of the kernels' contract, and the driver hands each tile's
            // output rows to one task.
            unsafe {
                if self.at.tokens == 1 {
                    P::vnni_one_token(self)
                } else {
                    P::vnni(self)
                }
            }
            return;
        }
        let _ = fast;
        for t in self.at.first_token..last {
            for i in 0..self.at.count {
                // SAFETY: the driver hands each tile to one task, which owns rows `..count` of
                // the tile's tokens in the output.
                unsafe { self.out.write(self.out_index(t, i), P::scalar(self, t, i)) };
            }
        }
    }
}

/// Runs every [`KquantTile`] of `tokens` (prepared) against a `rows`-row matrix whose panel `p`
/// is `panel(p)`, at most [`KQUANT_TILE_TOKENS`] tokens per tile, panels spread over the pool:
/// through the VNNI kernels if `fast` (AVX512-VNNI detected), the scalar ones otherwise.
pub(crate) fn for_each_kquant_tile<P: KquantPanel>(
    rows: usize,
    tokens: &Q8kTokens,
    out: SharedMut,
    panel: impl Fn(usize) -> P + Sync,
    fast: bool,
) {
    let n = tokens.qx.len() / tokens.k.max(1);
    for_each_group_tile(rows, n, KQUANT_TILE_TOKENS, |at| {
        KquantTile {
            panel: panel(at.panel),
            at,
            tokens,
            out,
            rows,
        }
        .run(fast)
    });
}

/// Dwords one panel of `w`'s stored rows takes: 32 rows of `row_bytes.div_ceil(4)`.
pub(crate) fn panel_words(w: &WeightMatrix) -> usize {
    PANEL_ROWS * w.stored_row_bytes().div_ceil(4)
}

/// Packs panel `p` of `w`'s stored rows (rows `32p..`, at most 32) into `panel`
/// ([`panel_words`] dwords): two 16-row groups transposed by [`transpose16`]; rows past the end
/// are zeros (taken from `zeros`, grown only for a partial last panel).
pub(crate) fn pack_stored_panel(isa: Isa, w: &WeightMatrix, p: usize, panel: &mut [u32], zeros: &mut Vec<u8>) {
    let first = p * PANEL_ROWS;
    let count = PANEL_ROWS.min(w.rows() - first);
    let row_len = w.stored_row_bytes();
    if count < PANEL_ROWS && zeros.len() < row_len {
        zeros.resize(row_len, 0);
    }
    for (g, dst) in panel.chunks_exact_mut(panel.len() / 2).enumerate() {
        let rows: [&[u8]; 16] = std::array::from_fn(|i| {
            let r = 16 * g + i;
            if r < count {
                w.row_bytes(first + r)
            } else {
                &zeros[..row_len]
            }
        });
        transpose16(isa, &rows, dst);
    }
}

/// One cache line.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u32; 16]);

/// A growable `[u32]` whose start is 64-byte aligned (contents unspecified until written).
#[derive(Default)]
pub(crate) struct AlignedBuf {
    lines: Vec<Line>,
    len: usize,
}

impl AlignedBuf {
    /// Sets the length to `len` words, keeping the capacity; new words are zero.
    pub(crate) fn resize(&mut self, len: usize) {
        self.lines.resize(len.div_ceil(16), Line([0; 16]));
        self.len = len;
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [u32] {
        // SAFETY: `lines` holds at least `len` initialised words (`Line` is a plain word array
        // without padding), and the borrow of `self` guards the memory.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr() as *mut u32, self.len) }
    }

    pub(crate) fn as_slice(&self) -> &[u32] {
        // SAFETY: as in `as_mut_slice`, shared.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr() as *const u32, self.len) }
    }
}

/// Dword `j` of a byte row: its bytes `4j..4j + 4`, little-endian, zero past the end.
#[inline]
fn dword(row: &[u8], j: usize) -> u32 {
    let mut b = [0u8; 4];
    for (i, v) in b.iter_mut().enumerate() {
        *v = row.get(4 * j + i).copied().unwrap_or(0);
    }
    u32::from_le_bytes(b)
}

/// `dst[j * 16 + r] = dword j of rows[r]` for `r < 16` and `j < len.div_ceil(4)`, where `len` is
/// the byte length of every row (a last partial dword is zero-padded): 16 byte rows transposed
/// into steps of 16 dwords. Rows need no alignment.
pub(crate) fn transpose16(isa: Isa, rows: &[&[u8]; 16], dst: &mut [u32]) {
    let len = rows[0].len();
    let dwords = len.div_ceil(4);
    assert!(rows.iter().all(|r| r.len() == len) && dst.len() >= 16 * dwords);
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the AVX-512 levels are only produced after detecting avx512f/bw; the asserts
        // above bound every load and store.
        Isa::Avx512 | Isa::Avx512Vnni => unsafe { x86::transpose16(rows, len, dst) },
        _ => {
            for (j, step) in dst.chunks_exact_mut(16).take(dwords).enumerate() {
                for (d, row) in step.iter_mut().zip(rows) {
                    *d = dword(row, j);
                }
            }
        }
    }
}

/// Writes a `T`-token × `16·G`-row tile of accumulators (`G` zmm of 16 rows per token) to
/// `out[out_at + t·out_stride + r]` for `r < count`: the epilogue of the packed GEMMs.
///
/// # Safety
/// AVX-512F must be available, and the caller must own those outputs.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn store_tile<const T: usize, const G: usize>(
    out: *mut f32,
    out_at: usize,
    out_stride: usize,
    count: usize,
    acc: &[[std::arch::x86_64::__m512; G]; T],
) {
    use std::arch::x86_64::*;
    for (t, acc) in acc.iter().enumerate() {
        for (g, &v) in acc.iter().enumerate() {
            let valid = count.saturating_sub(16 * g).min(16);
            let mask: __mmask16 = if valid == 16 { 0xffff } else { (1u16 << valid) - 1 };
            // SAFETY: the caller owns outputs `out_at + t·out_stride + r` for `r < count`.
            unsafe { _mm512_mask_storeu_ps(out.add(out_at + t * out_stride + 16 * g), mask, v) };
        }
    }
}

/// Asks for the `LINES` cache lines from `at` on: the weights stream from memory, and the
/// hardware prefetcher stops at each 4 KiB page, so the kernels ask for what they will read a
/// memory latency later. A hint: an address past the weights is dropped.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn prefetch_lines<const LINES: usize>(at: *const u8) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
    for line in 0..LINES {
        // SAFETY: a prefetch never faults, whatever the address.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(64 * line) as *const i8) };
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// 16×16 dword blocks (64 bytes of each row): two rounds of in-lane unpacks, then two of
    /// 128-bit lane shuffles. The last block loads only the bytes that exist (masked, zeros
    /// elsewhere) and stores only its valid dwords.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn transpose16(rows: &[&[u8]; 16], len: usize, dst: &mut [u32]) {
        let out = dst.as_mut_ptr();
        let dwords = len.div_ceil(4);
        let mut j = 0;
        while j < dwords {
            let valid = (dwords - j).min(16);
            let bytes = (len - 4 * j).min(64);
            let mask: __mmask64 = if bytes == 64 { !0 } else { (1u64 << bytes) - 1 };
            // SAFETY: bytes `4j..4j + bytes` of every row are in bounds (all rows hold `len`).
            let r: [__m512i; 16] = std::array::from_fn(|i| unsafe {
                _mm512_maskz_loadu_epi8(mask, rows[i].as_ptr().add(4 * j) as *const i8)
            });
            // t[2p], t[2p+1]: rows 2p, 2p+1 interleaved (elements 4l, 4l+1 / 4l+2, 4l+3 of lane l).
            let t: [__m512i; 16] = std::array::from_fn(|i| {
                let (a, b) = (r[i & !1], r[i | 1]);
                if i % 2 == 0 {
                    _mm512_unpacklo_epi32(a, b)
                } else {
                    _mm512_unpackhi_epi32(a, b)
                }
            });
            // u[4g + e]: rows 4g..4g+4, element 4l + e in lane l.
            let u: [__m512i; 16] = std::array::from_fn(|i| {
                let (g, e) = (i / 4, i % 4);
                let (a, b) = (t[4 * g + e / 2], t[4 * g + 2 + e / 2]);
                if e % 2 == 0 {
                    _mm512_unpacklo_epi64(a, b)
                } else {
                    _mm512_unpackhi_epi64(a, b)
                }
            });
            for e in 0..4 {
                let a = _mm512_shuffle_i32x4::<0x44>(u[e], u[4 + e]);
                let b = _mm512_shuffle_i32x4::<0xee>(u[e], u[4 + e]);
                let c = _mm512_shuffle_i32x4::<0x44>(u[8 + e], u[12 + e]);
                let d = _mm512_shuffle_i32x4::<0xee>(u[8 + e], u[12 + e]);
                let steps = [
                    (e, _mm512_shuffle_i32x4::<0x88>(a, c)),
                    (4 + e, _mm512_shuffle_i32x4::<0xdd>(a, c)),
                    (8 + e, _mm512_shuffle_i32x4::<0x88>(b, d)),
                    (12 + e, _mm512_shuffle_i32x4::<0xdd>(b, d)),
                ];
                for (s, v) in steps {
                    if s < valid {
                        // SAFETY: step `j + s < dwords`, and `dst` holds `16 * dwords` dwords.
                        unsafe { _mm512_storeu_si512(out.add(16 * (j + s)) as *mut _, v) };
                    }
                }
            }
            j += 16;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose_every_isa_and_partial_blocks() {
        for len in [1usize, 6, 64, 67, 160] {
            let data: Vec<Vec<u8>> = (0..16)
                .map(|r| (0..len).map(|i| (r * 31 + i * 7) as u8).collect())
                .collect();
            let rows: [&[u8]; 16] = std::array::from_fn(|r| data[r].as_slice());
            let dwords = len.div_ceil(4);
            for isa in Isa::available() {
                let mut dst = vec![u32::MAX; 16 * dwords + 3];
                transpose16(isa, &rows, &mut dst);
                for j in 0..dwords {
                    for r in 0..16 {
                        assert_eq!(dst[16 * j + r], dword(&data[r], j), "{} len {len}", isa.name());
                    }
                }
                assert!(dst[16 * dwords..].iter().all(|&v| v == u32::MAX));
            }
        }
    }
}

//! Causal attention over the paged KV cache with an online softmax.
//!
//! A task is one token and the query heads that share one KV head (up to 16 of them and 8 KiB of
//! accumulators, fewer when there are too few tasks for the pool), so each key and value read
//! from the cache serves them all. Positions go in chunks: a chunk's scores are computed,
//! exponentiated and summed together (loops the compiler vectorizes), and the running maximum
//! rescales the accumulators once per chunk rather than once per new maximum. One pool job
//! covers every sequence of the batch.

use std::cell::RefCell;

use super::dot::Isa;
use super::elementwise::exp;
use super::pool;

#[cfg(target_arch = "x86_64")]
mod x86;

use half::f16;

use crate::backend::{AttentionLayout, SeqSpan};
use crate::kv_cache::{KvLayer, PagedKvCache};

/// Positions scored together.
const CHUNK: usize = 32;

/// Query heads per task, at most.
const MAX_HEADS: usize = 16;

/// Accumulator floats per task, at most (8 KiB: a fraction of L1).
const ACC_FLOATS: usize = 2048;

/// See [`crate::Backend::attention`]; `isa` is one of [`Isa::available`].
#[allow(clippy::too_many_arguments)]
pub fn attention(
    isa: Isa,
    q: &[f32],
    spans: &[SeqSpan],
    cache: &PagedKvCache,
    layer: usize,
    layout: &AttentionLayout,
    scale: f32,
    out: &mut [f32],
) {
    let (width, block_size) = (cache.width(layer), cache.block_size());
    match cache.layer(layer) {
        KvLayer::F32(values) => {
            let cache = Entries {
                values,
                width,
                block_size,
            };
            attention_over(isa, q, spans, cache, layout, scale, out)
        }
        KvLayer::F16(values) => {
            let cache = Entries {
                values,
                width,
                block_size,
            };
            attention_over(isa, q, spans, cache, layout, scale, out)
        }
    }
}

/// One layer's cache entries, stored as `E`.
#[derive(Clone, Copy)]
struct Entries<'a, E> {
    values: &'a [E],
    width: usize,
    block_size: usize,
}

impl<'a, E> Entries<'a, E> {
    #[inline(always)]
    fn entry(&self, slot: usize) -> &'a [E] {
        &self.values[slot * self.width..(slot + 1) * self.width]
    }
}

/// [`attention`] over one layer's entries.
fn attention_over<E: KvValue>(
    isa: Isa,
    q: &[f32],
    spans: &[SeqSpan],
    cache: Entries<'_, E>,
    layout: &AttentionLayout,
    scale: f32,
    out: &mut [f32],
) {
    let (n_heads, kd, vd) = (layout.n_heads, layout.key_dim, layout.value_dim);
    let group = (n_heads / layout.n_kv_heads.max(1)).max(1);
    let n_tokens: usize = spans.iter().map(|span| span.len).sum();
    // At most `MAX_HEADS` heads per task (the scratch lives on the stack) and `ACC_FLOATS` of
    // accumulators (a latent-attention head's are 512 wide: they must stay in L1 while the
    // values stream past). Where whole KV heads' groups fit, a task takes several: it then reads
    // whole cache entries, one contiguous stretch, rather than one head's slice of each.
    let most = MAX_HEADS.min(ACC_FLOATS / vd.max(1)).max(1);
    let n_kv = n_heads / group;
    let mut heads = if group <= most {
        group
            * (1..=(most / group).min(n_kv))
                .rev()
                .find(|k| n_kv.is_multiple_of(*k))
                .unwrap_or(1)
    } else {
        (1..=most).rev().find(|h| group.is_multiple_of(*h)).unwrap_or(1)
    };
    let longest = spans.iter().map(|span| span.start_pos + span.len).max().unwrap_or(0);
    // Long contexts split their positions into ranges until the cores have a few tasks each.
    let splits = |heads: usize| {
        (4 * pool::threads())
            .div_ceil(n_tokens * (n_heads / heads))
            .min(longest.div_ceil(MIN_SPLIT_POSITIONS))
            .max(1)
    };
    // Fewer heads per task until every core has one (a decoded token of a latent-attention
    // model has one KV head for all of its heads), keeping tasks to whole groups or parts of one.
    let whole_or_part = |h: usize| h.is_multiple_of(group) || group.is_multiple_of(h);
    while heads.is_multiple_of(2)
        && whole_or_part(heads / 2)
        && n_tokens * (n_heads / heads) * splits(heads) < pool::threads()
    {
        heads /= 2;
    }
    let (splits, tasks_per_token) = (splits(heads), n_heads / heads);
    let group_heads = heads.min(group);
    let out = &mut out[..n_tokens * n_heads * vd];
    let task = |index: usize, from: (usize, usize)| {
        let (token, first_head) = (index / tasks_per_token, index % tasks_per_token * heads);
        let (span, last) = token_position(spans, token);
        let kv_head = first_head / group;
        let at = (token * n_heads + first_head) * kd;
        Task {
            queries: &q[at..at + heads * kd],
            heads,
            group_heads,
            key_dim: kd,
            value_dim: vd,
            key_at: kv_head * layout.key_stride,
            value_at: layout.value_offset + kv_head * layout.value_stride,
            key_stride: layout.key_stride,
            value_stride: layout.value_stride,
            cache,
            block_table: span.block_table,
            positions: split_range(last + 1, from),
            scale,
        }
    };
    let groups = n_tokens * tasks_per_token;
    if splits == 1 {
        pool::for_each_chunk_mut(out, heads * vd, |index, acc| {
            let stats = task(index, (0, 1)).run(isa, acc);
            for (acc, &(_, denom)) in acc.chunks_exact_mut(vd).zip(&stats) {
                acc.iter_mut().for_each(|a| *a /= denom);
            }
        });
        return;
    }
    // Each group's positions in `splits` ranges, one task each (flash decoding): a few long
    // contexts still keep every core busy, each core streaming its own stretch of the cache.
    // The ranges' partial sums are then merged under their common maximum.
    let part = heads * vd + 2 * heads;
    PARTIALS.with_borrow_mut(|partials| {
        partials.resize(groups * splits * part, 0.0);
        pool::for_each_chunk_mut(partials, part, |index, partial| {
            let (acc, stats) = partial.split_at_mut(heads * vd);
            // Range-major: the tasks taken at the same time read the same positions' entries,
            // every KV head of them between the cores, instead of each core one head's slice
            // of entries spread over the whole cache.
            let found = task(index % groups, (index / groups, splits)).run(isa, acc);
            for (h, (max, denom)) in found.into_iter().take(heads).enumerate() {
                (stats[h], stats[heads + h]) = (max, denom);
            }
        });
        for (index, out) in out.chunks_exact_mut(heads * vd).enumerate() {
            let ranges = partials.chunks_exact(part).skip(index).step_by(groups);
            merge_ranges(ranges, heads, vd, out);
        }
    });
}

/// Positions one split of a context covers at least: a few chunks, so the merge and the task
/// hand-off stay small next to the scoring.
const MIN_SPLIT_POSITIONS: usize = 4 * CHUNK;

thread_local! {
    /// The split ranges' partial sums, reused across calls on this thread.
    static PARTIALS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Range `which.0` of `which.1` equal parts of positions `0..len`, in whole chunks.
fn split_range(len: usize, (index, parts): (usize, usize)) -> std::ops::Range<usize> {
    let chunks = len.div_ceil(CHUNK);
    let bound = |i: usize| (chunks * i / parts * CHUNK).min(len);
    bound(index)..bound(index + 1)
}

/// One head group's output from its ranges' partial results, each laid out as `[acc (heads ×
/// vd), maxima (heads), denominators (heads)]` with `acc` and the denominator summed under the
/// range's own maximum: `out[h] = Σ_r e^(m_r − M)·acc_r[h] / Σ_r e^(m_r − M)·d_r` for the
/// largest maximum `M` (empty ranges, denominator 0, left out).
fn merge_ranges<'a>(ranges: impl Iterator<Item = &'a [f32]> + Clone, heads: usize, vd: usize, out: &mut [f32]) {
    for (h, out) in out.chunks_exact_mut(vd).enumerate() {
        let stats = |range: &[f32]| (range[heads * vd + h], range[heads * vd + heads + h]);
        let filled = || ranges.clone().filter(|range| stats(range).1 > 0.0);
        let max = filled().map(|range| stats(range).0).fold(f32::NEG_INFINITY, f32::max);
        out.fill(0.0);
        let mut denom = 0.0;
        for range in filled() {
            let (range_max, range_denom) = stats(range);
            let weight = (range_max - max).exp();
            denom += weight * range_denom;
            for (o, &a) in out.iter_mut().zip(&range[h * vd..(h + 1) * vd]) {
                *o += weight * a;
            }
        }
        out.iter_mut().for_each(|o| *o /= denom);
    }
}

/// The sequence of the batch's `token`-th token and that token's position in it (a scan: a
/// batch has few sequences, and a decode step allocates nothing).
fn token_position<'a>(spans: &'a [SeqSpan<'a>], mut token: usize) -> (&'a SeqSpan<'a>, usize) {
    for span in spans {
        if token < span.len {
            return (span, span.start_pos + token);
        }
        token -= span.len;
    }
    unreachable!("task index beyond the batch's tokens")
}

/// One token's attention for `heads` query heads: `group_heads` of them per KV head, over
/// `heads / group_heads` consecutive KV heads.
struct Task<'a, E> {
    /// `[heads, key_dim]`.
    queries: &'a [f32],
    heads: usize,
    group_heads: usize,
    key_dim: usize,
    value_dim: usize,
    /// Where the first KV head's key and value start in a cache entry, and the distance to the
    /// next KV head's.
    key_at: usize,
    value_at: usize,
    key_stride: usize,
    value_stride: usize,
    cache: Entries<'a, E>,
    block_table: &'a [u32],
    /// The positions this task covers of those the token attends to (all of them, or one
    /// split's range).
    positions: std::ops::Range<usize>,
    scale: f32,
}

impl<E: KvValue> Task<'_, E> {
    /// Leaves in `acc` each head's sums of `e^(s − max)·v` over the positions, and returns each
    /// head's `(max, Σ e^(s − max))` (`(−∞, 0)` for no positions).
    fn run(&self, isa: Isa, acc: &mut [f32]) -> [(f32, f32); MAX_HEADS] {
        match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Isa::Avx512*` come from `Isa::available` after detecting avx512f/bw/vl,
            // avx2 and fma.
            Isa::Avx512 | Isa::Avx512Vnni => unsafe { self.run_avx512(acc) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Isa::Avx2` comes from `Isa::available` after detecting avx2 and fma; the
            // body is safe code.
            Isa::Avx2 => unsafe { self.run_avx2(acc) },
            _ => self.run_with::<Portable>(acc),
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    unsafe fn run_avx512(&self, acc: &mut [f32]) -> [(f32, f32); MAX_HEADS] {
        self.run_with::<x86::Avx512>(acc)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run_avx2(&self, acc: &mut [f32]) -> [(f32, f32); MAX_HEADS] {
        self.run_with::<Portable>(acc)
    }

    /// The body, inlined into each instruction set's copy so that its loops vectorize for it;
    /// `K` scores and accumulates each chunk.
    #[inline(always)]
    fn run_with<K: ChunkKernel>(&self, acc: &mut [f32]) -> [(f32, f32); MAX_HEADS] {
        let (heads, kd, vd) = (self.heads, self.key_dim, self.value_dim);
        let (gh, kv_heads) = (self.group_heads, self.heads / self.group_heads);
        let mut scores = [0.0f32; MAX_HEADS * CHUNK];
        let (mut max, mut denom) = ([f32::NEG_INFINITY; MAX_HEADS], [0.0f32; MAX_HEADS]);
        let mut values: [&[E]; CHUNK] = [&[]; CHUNK];
        acc.fill(0.0);
        let mut slots = [0usize; CHUNK + PREFETCH];
        let (mut start, end) = (self.positions.start, self.positions.end);
        while start < end {
            let len = (end - start).min(CHUNK);
            let known = (end - start).min(CHUNK + PREFETCH);
            self.slots(start, &mut slots[..known]);
            for i in 0..len {
                if let Some(&later) = slots[..known].get(i + PREFETCH) {
                    // The cache is far larger than the caches: ask for a later position's keys
                    // and values while this one is scored.
                    let ahead = self.cache.entry(later);
                    for kv in 0..kv_heads {
                        let (key_at, value_at) = self.offsets(kv);
                        prefetch(&ahead[key_at..key_at + kd]);
                        prefetch(&ahead[value_at..value_at + vd]);
                    }
                }
                let entry = self.cache.entry(slots[i]);
                for kv in 0..kv_heads {
                    let key_at = self.offsets(kv).0;
                    let (first, last) = (kv * gh, (kv + 1) * gh);
                    let queries = &self.queries[first * kd..last * kd];
                    K::score(
                        queries,
                        &entry[key_at..key_at + kd],
                        self.scale,
                        &mut scores[first * CHUNK + i..],
                    );
                }
            }
            for h in 0..heads {
                let scores = &mut scores[h * CHUNK..h * CHUNK + len];
                let chunk_max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
                if chunk_max > max[h] {
                    // Rescale what was accumulated under the old maximum.
                    let correction = exp(max[h] - chunk_max);
                    denom[h] *= correction;
                    acc[h * vd..(h + 1) * vd].iter_mut().for_each(|a| *a *= correction);
                    max[h] = chunk_max;
                }
                let m = max[h];
                scores.iter_mut().for_each(|s| *s = exp(*s - m));
                denom[h] += scores.iter().sum::<f32>();
            }
            for kv in 0..kv_heads {
                let value_at = self.offsets(kv).1;
                for (value, &slot) in values.iter_mut().zip(&slots[..len]) {
                    *value = &self.cache.entry(slot)[value_at..value_at + vd];
                }
                let (first, last) = (kv * gh, (kv + 1) * gh);
                K::accumulate(
                    &scores[first * CHUNK..],
                    &values[..len],
                    &mut acc[first * vd..last * vd],
                );
            }
            start += len;
        }
        std::array::from_fn(|h| (max[h], denom[h]))
    }

    /// Where the task's `kv`-th KV head's key and value start in an entry.
    #[inline(always)]
    fn offsets(&self, kv: usize) -> (usize, usize) {
        (
            self.key_at + kv * self.key_stride,
            self.value_at + kv * self.value_stride,
        )
    }

    /// The cache slots of positions `start..start + slots.len()`, walked block by block (one
    /// division per chunk instead of two per position).
    #[inline(always)]
    fn slots(&self, start: usize, slots: &mut [usize]) {
        let block_size = self.cache.block_size;
        let (mut block, mut offset) = (start / block_size, start % block_size);
        for slot in slots {
            *slot = self.block_table[block] as usize * block_size + offset;
            offset += 1;
            if offset == block_size {
                (block, offset) = (block + 1, 0);
            }
        }
    }
}

/// The two inner loops of a chunk of positions, per instruction set.
trait ChunkKernel {
    /// `scores[h · CHUNK] = scale · queries[h] · key` for every query head `h` (rows of
    /// `queries` as long as `key`).
    fn score<E: KvValue>(queries: &[f32], key: &[E], scale: f32, scores: &mut [f32]);

    /// `acc[h] += Σ_i scores[h · CHUNK + i] · values[i]` for every head `h` (rows of `acc` as
    /// long as the values).
    fn accumulate<E: KvValue>(scores: &[f32], values: &[&[E]], acc: &mut [f32]);
}

/// A value type the cache stores entries in.
trait KvValue: Copy + Sync {
    fn to_f32(self) -> f32;

    /// 16 values from `at` (the lanes of `mask`; the others 0), as f32.
    ///
    /// # Safety
    /// The masked lanes must be readable; AVX-512F/BW/VL must be enabled.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(at: *const Self, mask: u16) -> std::arch::x86_64::__m512;
}

impl KvValue for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(at: *const Self, mask: u16) -> std::arch::x86_64::__m512 {
        // SAFETY: as the caller guarantees.
        unsafe { x86::load_f32(at, mask) }
    }
}

impl KvValue for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(at: *const Self, mask: u16) -> std::arch::x86_64::__m512 {
        // SAFETY: as the caller guarantees.
        unsafe { x86::load_f16(at, mask) }
    }
}

/// Loops the compiler vectorizes for whatever instruction set the caller enables.
struct Portable;

impl ChunkKernel for Portable {
    #[inline(always)]
    fn score<E: KvValue>(queries: &[f32], key: &[E], scale: f32, scores: &mut [f32]) {
        for (h, query) in queries.chunks_exact(key.len()).enumerate() {
            scores[h * CHUNK] = dot(query, key) * scale;
        }
    }

    #[inline(always)]
    fn accumulate<E: KvValue>(scores: &[f32], values: &[&[E]], acc: &mut [f32]) {
        for (i, value) in values.iter().enumerate() {
            for (h, acc) in acc.chunks_exact_mut(value.len()).enumerate() {
                let p = scores[h * CHUNK + i];
                for (a, &v) in acc.iter_mut().zip(*value) {
                    *a += p * v.to_f32();
                }
            }
        }
    }
}

/// Positions ahead of the one being scored whose entries are prefetched.
const PREFETCH: usize = 4;

/// Hints the CPU to bring `data` into its caches.
#[inline(always)]
fn prefetch<E>(data: &[E]) {
    #[cfg(target_arch = "x86_64")]
    for offset in (0..std::mem::size_of_val(data)).step_by(64) {
        let line = (data.as_ptr() as *const i8).wrapping_add(offset);
        // SAFETY: a prefetch is a hint that never faults; the address is inside `data`.
        unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(line) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = data;
}

/// `a · b` in sixteen independent lanes (a loop the compiler turns into vector multiply-adds).
#[inline(always)]
fn dot<E: KvValue>(a: &[f32], b: &[E]) -> f32 {
    const LANES: usize = 16;
    let mut lanes = [0.0f32; LANES];
    let (a_body, b_body) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = a_body
        .remainder()
        .iter()
        .zip(b_body.remainder())
        .map(|(x, y)| x * y.to_f32())
        .sum();
    for (a, b) in a_body.zip(b_body) {
        for i in 0..LANES {
            lanes[i] += a[i] * b[i].to_f32();
        }
    }
    lanes.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::dot::isa;
    use crate::kv_cache::KvCacheDtype;
    use rand::{Rng, SeedableRng};

    /// f64 reference: softmax(q·k * scale) · v over positions 0..=pos, from dense K/V arrays.
    #[allow(clippy::too_many_arguments)]
    fn reference(q: &[f32], k: &[Vec<f64>], v: &[Vec<f64>], pos: usize, scale: f64) -> Vec<f64> {
        let scores: Vec<f64> = (0..=pos)
            .map(|p| q.iter().zip(&k[p]).map(|(a, b)| *a as f64 * b).sum::<f64>() * scale)
            .collect();
        let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
        let total: f64 = weights.iter().sum();
        let mut out = vec![0.0; v[0].len()];
        for (p, w) in weights.iter().enumerate() {
            for (o, x) in out.iter_mut().zip(&v[p]) {
                *o += w / total * x;
            }
        }
        out
    }

    #[test]
    fn grouped_query_attention_over_paged_blocks() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let (n_heads, n_kv, hd, bs) = (4, 2, 5, 3);
        let layout = AttentionLayout::multi_head(n_heads, n_kv, hd);
        let width = layout.entry_width();
        let mut cache = PagedKvCache::new(bs, 6, &[width]);
        // A sequence of 7 tokens in non-contiguous blocks; the last 2 are the queries.
        let table = [4u32, 1, 5];
        let entries: Vec<Vec<f32>> = (0..7)
            .map(|_| (0..width).map(|_| rng.random_range(-1.0..1.0)).collect())
            .collect();
        for (pos, e) in entries.iter().enumerate() {
            let slot = cache.slot(&table, pos);
            cache.write_entry(0, slot, e);
        }
        let span = SeqSpan {
            start_pos: 5,
            len: 2,
            block_table: &table,
        };
        let q: Vec<f32> = (0..2 * n_heads * hd).map(|_| rng.random_range(-1.0..1.0)).collect();
        let mut out = vec![0.0; 2 * n_heads * hd];
        attention(isa(), &q, &[span], &cache, 0, &layout, 0.4, &mut out);
        for t in 0..2 {
            for h in 0..n_heads {
                let kvh = h / 2;
                let k: Vec<Vec<f64>> = entries
                    .iter()
                    .map(|e| e[kvh * hd..(kvh + 1) * hd].iter().map(|&x| x as f64).collect())
                    .collect();
                let v: Vec<Vec<f64>> = entries
                    .iter()
                    .map(|e| {
                        e[n_kv * hd + kvh * hd..n_kv * hd + (kvh + 1) * hd]
                            .iter()
                            .map(|&x| x as f64)
                            .collect()
                    })
                    .collect();
                let qh = &q[(t * n_heads + h) * hd..(t * n_heads + h + 1) * hd];
                let expected = reference(qh, &k, &v, 5 + t, 0.4);
                let got = &out[(t * n_heads + h) * hd..(t * n_heads + h + 1) * hd];
                for (a, b) in got.iter().zip(&expected) {
                    assert!((*a as f64 - b).abs() < 1e-5, "{a} vs {b}");
                }
            }
        }
    }

    /// Several sequences in one call (a decode batch beside a prompt chunk), each longer than a
    /// chunk of positions, with scores large enough that later chunks raise the maximum: every
    /// instruction set against the f64 reference, for head groups that stay whole and that split
    /// (36 heads over 2 KV heads: groups of 18, tasks of 9).
    #[test]
    fn batch_of_sequences_over_several_chunks_on_every_isa() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        let (bs, n_kv, hd) = (16, 2, 20);
        let cases = [2, 8, 12, 36]
            .into_iter()
            .flat_map(|h| [(h, KvCacheDtype::F32), (h, KvCacheDtype::F16)]);
        for (n_heads, dtype) in cases {
            let layout = AttentionLayout::multi_head(n_heads, n_kv, hd);
            let width = layout.entry_width();
            let mut cache = PagedKvCache::with_dtype(bs, 24, &[width], dtype);
            // Lengths 1, 70 (3 chunks) and 100, in scattered blocks; values grow with the
            // position so the running maximum moves.
            let lengths = [1usize, 70, 100];
            let tables: [Vec<u32>; 3] = [vec![23], vec![3, 9, 1, 17, 5], vec![0, 2, 4, 6, 8, 10, 12]];
            let mut entries = Vec::new();
            for (len, table) in lengths.iter().zip(&tables) {
                let seq: Vec<Vec<f32>> = (0..*len)
                    .map(|pos| {
                        let grow = 1.0 + pos as f32 / 20.0;
                        (0..width).map(|_| rng.random_range(-grow..grow)).collect()
                    })
                    .collect();
                // The reference sees what the cache holds (rounded to F16 in an F16 cache).
                let stored: Vec<Vec<f32>> = seq
                    .iter()
                    .enumerate()
                    .map(|(pos, e)| {
                        let slot = cache.slot(table, pos);
                        cache.write_entry(0, slot, e);
                        cache.read_entry(0, slot)
                    })
                    .collect();
                entries.push(stored);
            }
            // Queries: the last token of the first two sequences, the last 3 of the third.
            let spans = [
                SeqSpan {
                    start_pos: 0,
                    len: 1,
                    block_table: &tables[0],
                },
                SeqSpan {
                    start_pos: 69,
                    len: 1,
                    block_table: &tables[1],
                },
                SeqSpan {
                    start_pos: 97,
                    len: 3,
                    block_table: &tables[2],
                },
            ];
            let queries: Vec<(usize, usize)> = vec![(0, 0), (1, 69), (2, 97), (2, 98), (2, 99)];
            let q: Vec<f32> = (0..queries.len() * n_heads * hd)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            for isa in Isa::available() {
                let mut out = vec![f32::NAN; queries.len() * n_heads * hd];
                attention(isa, &q, &spans, &cache, 0, &layout, 0.3, &mut out);
                for (token, &(seq, pos)) in queries.iter().enumerate() {
                    for h in 0..n_heads {
                        let kvh = h / (n_heads / n_kv);
                        let part = |e: &Vec<f32>, at: usize| e[at..at + hd].iter().map(|&x| x as f64).collect();
                        let k: Vec<Vec<f64>> = entries[seq].iter().map(|e| part(e, kvh * hd)).collect();
                        let v: Vec<Vec<f64>> = entries[seq].iter().map(|e| part(e, (n_kv + kvh) * hd)).collect();
                        let at = (token * n_heads + h) * hd;
                        let expected = reference(&q[at..at + hd], &k, &v, pos, 0.3);
                        for (a, b) in out[at..at + hd].iter().zip(&expected) {
                            assert!(
                                (*a as f64 - b).abs() < 1e-4 * (1.0 + b.abs()),
                                "{isa:?} {dtype:?} heads {n_heads}: {a} vs {b}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Contexts long enough to be split over tasks (flash decoding): one long sequence alone (4
    /// ranges) and beside a one-position sequence (2 ranges each; the short one's first range is
    /// empty), every instruction set against the f64 reference, the running maximum rising late.
    #[test]
    fn long_contexts_split_over_tasks_on_every_isa() {
        for dtype in [KvCacheDtype::F32, KvCacheDtype::F16] {
            long_contexts_split_over_tasks(dtype);
        }
    }

    fn long_contexts_split_over_tasks(dtype: KvCacheDtype) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(17);
        let (bs, n_heads, n_kv, hd, long) = (16, 12, 2, 20, 700usize);
        let layout = AttentionLayout::multi_head(n_heads, n_kv, hd);
        let width = layout.entry_width();
        let blocks = long.div_ceil(bs);
        let mut cache = PagedKvCache::with_dtype(bs, blocks + 1, &[width], dtype);
        let long_table: Vec<u32> = (0..blocks as u32).rev().collect();
        let short_table = [blocks as u32];
        let entries: Vec<Vec<f32>> = (0..long)
            .map(|pos| {
                let grow = if pos > 600 { 3.0 } else { 1.0 };
                (0..width).map(|_| rng.random_range(-grow..grow)).collect()
            })
            .collect();
        // The reference sees what the cache holds (rounded to F16 in an F16 cache).
        let entries: Vec<Vec<f32>> = entries
            .iter()
            .enumerate()
            .map(|(pos, e)| {
                let slot = cache.slot(&long_table, pos);
                cache.write_entry(0, slot, e);
                cache.read_entry(0, slot)
            })
            .collect();
        let short_entry: Vec<f32> = (0..width).map(|_| rng.random_range(-1.0..1.0)).collect();
        let short_slot = cache.slot(&short_table, 0);
        cache.write_entry(0, short_slot, &short_entry);
        let short_entry = cache.read_entry(0, short_slot);
        let long_span = SeqSpan {
            start_pos: long - 1,
            len: 1,
            block_table: &long_table,
        };
        let short_span = SeqSpan {
            start_pos: 0,
            len: 1,
            block_table: &short_table,
        };
        let q: Vec<f32> = (0..2 * n_heads * hd).map(|_| rng.random_range(-1.0..1.0)).collect();
        for spans in [vec![long_span], vec![long_span, short_span]] {
            for isa in Isa::available() {
                let mut out = vec![f32::NAN; spans.len() * n_heads * hd];
                attention(isa, &q[..out.len()], &spans, &cache, 0, &layout, 0.3, &mut out);
                for (token, seq) in [&entries, &vec![short_entry.clone()]]
                    .into_iter()
                    .take(spans.len())
                    .enumerate()
                {
                    for h in 0..n_heads {
                        let kvh = h / (n_heads / n_kv);
                        let part = |e: &Vec<f32>, at: usize| e[at..at + hd].iter().map(|&x| x as f64).collect();
                        let k: Vec<Vec<f64>> = seq.iter().map(|e| part(e, kvh * hd)).collect();
                        let v: Vec<Vec<f64>> = seq.iter().map(|e| part(e, (n_kv + kvh) * hd)).collect();
                        let at = (token * n_heads + h) * hd;
                        let expected = reference(&q[at..at + hd], &k, &v, seq.len() - 1, 0.3);
                        for (a, b) in out[at..at + hd].iter().zip(&expected) {
                            assert!(
                                (*a as f64 - b).abs() < 1e-4 * (1.0 + b.abs()),
                                "{isa:?} {dtype:?} {} sequences, token {token}: {a} vs {b}",
                                spans.len()
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn latent_layout_uses_the_whole_entry_as_key() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let (n_heads, latent, rope) = (3, 6, 2);
        let layout = AttentionLayout::latent(n_heads, latent, rope);
        assert_eq!(layout.entry_width(), latent + rope);
        let mut cache = PagedKvCache::new(4, 1, &[layout.entry_width()]);
        let entries: Vec<Vec<f32>> = (0..3)
            .map(|_| (0..8).map(|_| rng.random_range(-1.0..1.0)).collect())
            .collect();
        for (pos, e) in entries.iter().enumerate() {
            cache.write_entry(0, pos, e);
        }
        let q: Vec<f32> = (0..n_heads * 8).map(|_| rng.random_range(-1.0..1.0)).collect();
        let mut out = vec![0.0; n_heads * latent];
        let span = SeqSpan {
            start_pos: 2,
            len: 1,
            block_table: &[0],
        };
        attention(isa(), &q, &[span], &cache, 0, &layout, 0.7, &mut out);
        let k: Vec<Vec<f64>> = entries.iter().map(|e| e.iter().map(|&x| x as f64).collect()).collect();
        let v: Vec<Vec<f64>> = entries
            .iter()
            .map(|e| e[..latent].iter().map(|&x| x as f64).collect())
            .collect();
        for h in 0..n_heads {
            let expected = reference(&q[h * 8..(h + 1) * 8], &k, &v, 2, 0.7);
            for (a, b) in out[h * latent..(h + 1) * latent].iter().zip(&expected) {
                assert!((*a as f64 - b).abs() < 1e-5);
            }
        }
    }
}

//! Causal attention over the paged KV cache with an online softmax.
//!
//! A task is one token and up to 16 query heads (8 KiB of accumulators): several whole GQA
//! groups where they fit, so each cache entry is read in one stretch, else one KV head's group or
//! part of it; each key and value read serves all the task's heads of its KV head. A few tokens
//! over a long context also split their positions into ranges, one task each, merged at the end
//! (flash decoding). Positions go in chunks: a chunk's scores are computed, exponentiated and
//! summed together, and the running maximum rescales the accumulators once per chunk rather than
//! once per new maximum. One pool job covers every sequence of the batch; the cache's entries
//! are f32 or f16 (`KvValue`), widened as they are loaded.

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
    match cache.layer(layer) {
        KvLayer::F32(values) => attention_over(isa, q, spans, Entries::new(cache, layer, values), layout, scale, out),
        KvLayer::F16(values) => attention_over(isa, q, spans, Entries::new(cache, layer, values), layout, scale, out),
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
    /// `values`, the stored entries of `cache`'s layer `layer`.
    fn new(cache: &PagedKvCache, layer: usize, values: &'a [E]) -> Self {
        Entries {
            values,
            width: cache.width(layer),
            block_size: cache.block_size(),
        }
    }

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
    if n_tokens == 0 || n_heads == 0 {
        return;
    }
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
        let at = (token * n_heads + first_head) * kd;
        Task {
            queries: &q[at..at + heads * kd],
            heads,
            group_heads,
            layout,
            first_kv_head: first_head / group,
            cache,
            block_table: span.block_table,
            positions: split_range(last + 1, from),
            scale,
        }
    };
    let head_tasks = n_tokens * tasks_per_token;
    if splits == 1 {
        pool::for_each_chunk_mut(out, heads * vd, |index, acc| {
            let stats = task(index, (0, 1)).run(isa, acc);
            for (acc, &(_, denom)) in acc.chunks_exact_mut(vd).zip(&stats) {
                acc.iter_mut().for_each(|a| *a /= denom);
            }
        });
        return;
    }
    // Each head task's positions in `splits` ranges, one task each (flash decoding): a few long
    // contexts still keep every core busy, each core streaming its own stretch of the cache.
    // The ranges' partial sums are then merged under their common maximum.
    let part = heads * vd + 2 * heads;
    PARTIALS.with_borrow_mut(|partials| {
        partials.resize(head_tasks * splits * part, 0.0);
        pool::for_each_chunk_mut(partials, part, |index, partial| {
            let (acc, stats) = partial.split_at_mut(heads * vd);
            // Range-major: the tasks taken at the same time read the same positions' entries,
            // every KV head of them between the cores, instead of each core one head's slice
            // of entries spread over the whole cache.
            let found = task(index % head_tasks, (index / head_tasks, splits)).run(isa, acc);
            for (h, (max, denom)) in found.into_iter().take(heads).enumerate() {
                (stats[h], stats[heads + h]) = (max, denom);
            }
        });
        for (index, out) in out.chunks_exact_mut(heads * vd).enumerate() {
            let ranges = partials.chunks_exact(part).skip(index).step_by(head_tasks);
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

/// Range `index` of `parts` equal parts of positions `0..len`, in whole chunks (empty where
/// there are fewer chunks than parts).
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
    layout: &'a AttentionLayout,
    first_kv_head: usize,
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
        let (heads, kd, vd) = (self.heads, self.layout.key_dim, self.layout.value_dim);
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
        let (layout, head) = (self.layout, self.first_kv_head + kv);
        (
            head * layout.key_stride,
            layout.value_offset + head * layout.value_stride,
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
mod tests;

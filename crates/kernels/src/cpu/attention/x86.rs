//! The AVX-512 inner loops of attention: fused multiply-adds over up to four query heads at once,
//! so each key or value vector loaded serves them all, and one tree reduction per score.
//!
//! The portable loops they replace compiled to separate multiplies and adds and a serial chain of
//! sixteen scalar additions per score (Rust keeps float sums in order): attention over a 2048-token
//! context was half of a Q4_K_M decode step (docs/performance.md).

use std::arch::x86_64::*;

use half::f16;

use super::{ChunkKernel, KvValue, CHUNK};

/// Only for code compiled with AVX-512F enabled (`Task::run_avx512`), on a CPU that has it.
pub(super) struct Avx512;

/// Query heads handled together: four accumulators per value slice of four vectors keep
/// sixteen vector registers busy and leave room for the loads.
const HEADS_AT_ONCE: usize = 4;
/// Vectors of a value row accumulated together.
const SLICE: usize = 4;

impl ChunkKernel for Avx512 {
    #[inline(always)]
    fn score<E: KvValue>(queries: &[f32], key: &[E], scale: f32, scores: &mut [f32]) {
        let heads = queries.len() / key.len().max(1);
        // SAFETY: `Avx512` runs only where AVX-512F was detected (its contract).
        for_head_groups(heads, |first, count| unsafe {
            match count {
                4 => score_heads::<E, 4>(queries, key, scale, scores, first),
                2 => score_heads::<E, 2>(queries, key, scale, scores, first),
                _ => score_heads::<E, 1>(queries, key, scale, scores, first),
            }
        });
    }

    #[inline(always)]
    fn accumulate<E: KvValue>(scores: &[f32], values: &[&[E]], acc: &mut [f32]) {
        let width = values.first().map_or(0, |v| v.len());
        let heads = acc.len() / width.max(1);
        // SAFETY: as in `score`.
        for_head_groups(heads, |first, count| unsafe {
            match count {
                4 => accumulate_heads::<E, 4>(scores, values, acc, first),
                2 => accumulate_heads::<E, 2>(scores, values, acc, first),
                _ => accumulate_heads::<E, 1>(scores, values, acc, first),
            }
        });
    }
}

/// Calls `group(first, count)` over `0..heads` in groups of [`HEADS_AT_ONCE`], then 2, then 1.
#[inline(always)]
fn for_head_groups(heads: usize, mut group: impl FnMut(usize, usize)) {
    let mut first = 0;
    while first < heads {
        let count = match heads - first {
            n if n >= HEADS_AT_ONCE => HEADS_AT_ONCE,
            n if n >= 2 => 2,
            _ => 1,
        };
        group(first, count);
        first += count;
    }
}

/// The lanes of vector `v` of a row `width` floats long that lie in the row.
#[inline(always)]
fn lanes(width: usize, v: usize) -> __mmask16 {
    let left = width.saturating_sub(16 * v);
    if left >= 16 {
        u16::MAX
    } else {
        (1u16 << left) - 1
    }
}

/// `scores[(first + g) · CHUNK] = scale · queries[first + g] · key` for `g < G`.
#[target_feature(enable = "avx512f")]
#[inline]
fn score_heads<E: KvValue, const G: usize>(queries: &[f32], key: &[E], scale: f32, scores: &mut [f32], first: usize) {
    let kd = key.len();
    assert!(queries.len() >= (first + G) * kd && scores.len() > (first + G - 1) * CHUNK);
    let mut sums = [_mm512_setzero_ps(); G];
    let (queries, key) = (queries.as_ptr(), key.as_ptr());
    let mut add = |v: usize, mask: __mmask16| {
        // SAFETY: `mask` keeps the lanes of vector `v` that lie in the key (`16v + lane < kd`),
        // and the query rows `first..first + G` of `kd` floats lie in `queries` (asserted);
        // masked-off lanes are not read.
        unsafe {
            let k = E::load16(key.wrapping_add(16 * v), mask);
            for (g, sum) in sums.iter_mut().enumerate() {
                let q = _mm512_maskz_loadu_ps(mask, queries.wrapping_add((first + g) * kd + 16 * v));
                *sum = _mm512_fmadd_ps(q, k, *sum);
            }
        }
    };
    for v in 0..kd / 16 {
        add(v, u16::MAX);
    }
    if !kd.is_multiple_of(16) {
        add(kd / 16, lanes(kd, kd / 16));
    }
    for (g, sum) in sums.into_iter().enumerate() {
        scores[(first + g) * CHUNK] = _mm512_reduce_add_ps(sum) * scale;
    }
}

/// `acc[first + g] += Σ_i scores[(first + g) · CHUNK + i] · values[i]` for `g < G`, a slice of
/// [`SLICE`] vectors of every head's row at a time, kept in registers over the chunk.
#[target_feature(enable = "avx512f")]
#[inline]
fn accumulate_heads<E: KvValue, const G: usize>(scores: &[f32], values: &[&[E]], acc: &mut [f32], first: usize) {
    let vd = values.first().map_or(0, |v| v.len());
    assert!(acc.len() >= (first + G) * vd && values.len() <= CHUNK);
    assert!(values.iter().all(|v| v.len() == vd) && scores.len() >= (first + G) * CHUNK);
    let vectors = vd.div_ceil(16);
    for v0 in (0..vectors).step_by(SLICE) {
        let masks: [__mmask16; SLICE] = std::array::from_fn(|j| lanes(vd, v0 + j));
        let row = |g: usize, j: usize| (first + g) * vd + 16 * (v0 + j);
        let mut sums = [[_mm512_setzero_ps(); SLICE]; G];
        for (g, sums) in sums.iter_mut().enumerate() {
            for (j, sum) in sums.iter_mut().enumerate() {
                // SAFETY: lane `l` of vector `v0 + j` is read only where `16(v0 + j) + l < vd`, so
                // it lies in row `first + g` of `acc` (asserted to hold `first + G` rows).
                *sum = unsafe { _mm512_maskz_loadu_ps(masks[j], acc.as_ptr().wrapping_add(row(g, j))) };
            }
        }
        for (i, value) in values.iter().enumerate() {
            let weights: [__m512; G] = std::array::from_fn(|g| _mm512_set1_ps(scores[(first + g) * CHUNK + i]));
            for (j, &mask) in masks.iter().enumerate() {
                // SAFETY: as above, within the value row of `vd` floats (asserted).
                let x = unsafe { E::load16(value.as_ptr().wrapping_add(16 * (v0 + j)), mask) };
                for g in 0..G {
                    sums[g][j] = _mm512_fmadd_ps(weights[g], x, sums[g][j]);
                }
            }
        }
        for (g, sums) in sums.iter().enumerate() {
            for (j, &sum) in sums.iter().enumerate() {
                // SAFETY: the lanes loaded above, written back.
                unsafe { _mm512_mask_storeu_ps(acc.as_mut_ptr().wrapping_add(row(g, j)), masks[j], sum) };
            }
        }
    }
}

/// 16 f32 at `at`, the lanes of `mask` (the others 0).
///
/// # Safety
/// The masked lanes must be readable; AVX-512F must be enabled.
#[inline(always)]
pub(super) unsafe fn load_f32(at: *const f32, mask: __mmask16) -> __m512 {
    // SAFETY: as the caller guarantees.
    unsafe { _mm512_maskz_loadu_ps(mask, at) }
}

/// 16 f16 at `at`, the lanes of `mask` (the others 0), widened to f32.
///
/// # Safety
/// The masked lanes must be readable; AVX-512F, BW and VL must be enabled.
#[inline(always)]
pub(super) unsafe fn load_f16(at: *const f16, mask: __mmask16) -> __m512 {
    // SAFETY: as the caller guarantees (masked-off halves are not read).
    unsafe { _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, at as *const _)) }
}

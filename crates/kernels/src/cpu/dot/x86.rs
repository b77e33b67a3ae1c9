//! AVX2 and AVX-512 dot products. Weights are widened to f32 in registers: BF16 by a 16-bit
//! shift, F16 by `vcvtph2ps` (FP8 E4M3 block rows are in `fp8.rs`).
//!
//! Every function here is `unsafe` only because of its `target_feature`: callers must have
//! detected the features (see `Isa::available`). Loads are unaligned and stay within the slices:
//! full-width loads run while a whole vector remains, and the tail uses masked loads (AVX-512)
//! or the scalar code (AVX2).

use std::arch::x86_64::*;

use super::scalar;

#[inline(always)]
fn hsum256(v: __m256) -> f32 {
    // SAFETY: register-only AVX/SSE arithmetic; callers run with AVX2 enabled.
    unsafe {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps::<1>(v);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
        _mm_cvtss_f32(s)
    }
}

// ---------------------------------------------------------------------------------------------
// AVX2 + FMA + F16C: 8 lanes, 4 accumulators.

/// Runs `load(i)` (8 weights widened to f32 at element `i`) against `x`, with a scalar tail.
#[inline(always)]
unsafe fn fma_loop_avx2(n: usize, x: &[f32], load: impl Fn(usize) -> __m256) -> (f32, usize) {
    let xp = x.as_ptr();
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= n {
        for (k, a) in acc.iter_mut().enumerate() {
            *a = _mm256_fmadd_ps(load(i + 8 * k), _mm256_loadu_ps(xp.add(i + 8 * k)), *a);
        }
        i += 32;
    }
    while i + 8 <= n {
        acc[0] = _mm256_fmadd_ps(load(i), _mm256_loadu_ps(xp.add(i)), acc[0]);
        i += 8;
    }
    let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    (hsum256(sum), i)
}

#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_f32_avx2(bytes: &[u8], x: &[f32]) -> f32 {
    let n = x.len().min(bytes.len() / 4);
    let w = bytes.as_ptr() as *const f32;
    let (sum, done) = fma_loop_avx2(n, x, |i| _mm256_loadu_ps(w.add(i)));
    sum + scalar::dot_f32(&bytes[done * 4..n * 4], &x[done..n])
}

#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_bf16_avx2(bytes: &[u8], x: &[f32]) -> f32 {
    let n = x.len().min(bytes.len() / 2);
    let w = bytes.as_ptr();
    let (sum, done) = fma_loop_avx2(n, x, |i| {
        let halves = _mm_loadu_si128(w.add(2 * i) as *const __m128i);
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(halves)))
    });
    sum + scalar::dot_bf16(&bytes[done * 2..n * 2], &x[done..n])
}

#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_f16_avx2(bytes: &[u8], x: &[f32]) -> f32 {
    let n = x.len().min(bytes.len() / 2);
    let w = bytes.as_ptr();
    let (sum, done) = fma_loop_avx2(n, x, |i| {
        _mm256_cvtph_ps(_mm_loadu_si128(w.add(2 * i) as *const __m128i))
    });
    sum + scalar::dot_f16(&bytes[done * 2..n * 2], &x[done..n])
}

// ---------------------------------------------------------------------------------------------
// AVX-512: 16 lanes, 4 accumulators, masked tail.

/// Runs `load(i, mask)` (up to 16 weights widened to f32, lanes outside `mask` zero) against `x`.
#[inline(always)]
unsafe fn fma_loop_avx512(n: usize, x: &[f32], load: impl Fn(usize, __mmask16) -> __m512) -> f32 {
    let xp = x.as_ptr();
    let mut acc = [_mm512_setzero_ps(); 4];
    let mut i = 0;
    while i + 64 <= n {
        for (k, a) in acc.iter_mut().enumerate() {
            *a = _mm512_fmadd_ps(load(i + 16 * k, 0xffff), _mm512_loadu_ps(xp.add(i + 16 * k)), *a);
        }
        i += 64;
    }
    while i + 16 <= n {
        acc[0] = _mm512_fmadd_ps(load(i, 0xffff), _mm512_loadu_ps(xp.add(i)), acc[0]);
        i += 16;
    }
    if i < n {
        let mask: __mmask16 = (1u32 << (n - i)) as u16 - 1;
        acc[1] = _mm512_fmadd_ps(load(i, mask), _mm512_maskz_loadu_ps(mask, xp.add(i)), acc[1]);
    }
    _mm512_reduce_add_ps(_mm512_add_ps(
        _mm512_add_ps(acc[0], acc[1]),
        _mm512_add_ps(acc[2], acc[3]),
    ))
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub unsafe fn dot_f32_avx512(bytes: &[u8], x: &[f32]) -> f32 {
    let n = x.len().min(bytes.len() / 4);
    let w = bytes.as_ptr() as *const f32;
    fma_loop_avx512(n, x, |i, mask| _mm512_maskz_loadu_ps(mask, w.add(i)))
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub unsafe fn dot_bf16_avx512(bytes: &[u8], x: &[f32]) -> f32 {
    let n = x.len().min(bytes.len() / 2);
    let w = bytes.as_ptr() as *const i16;
    fma_loop_avx512(n, x, |i, mask| {
        let halves = _mm256_maskz_loadu_epi16(mask, w.add(i));
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(halves)))
    })
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub unsafe fn dot_f16_avx512(bytes: &[u8], x: &[f32]) -> f32 {
    let n = x.len().min(bytes.len() / 2);
    let w = bytes.as_ptr() as *const i16;
    fma_loop_avx512(n, x, |i, mask| {
        _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, w.add(i)))
    })
}

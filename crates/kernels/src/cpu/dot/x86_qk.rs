//! AVX2 and AVX-512 integer dot products of `Q4_K` / `Q6_K` weights (super-blocks of 256) with
//! `Q8_K` activations.
//!
//! Both formats store unsigned 4- or 6-bit values, so `Σ q · q_x` per 32 (`Q4_K`) or 16 (`Q6_K`)
//! values comes from `u8 × i8` multiply-adds, is multiplied by its integer sub-block scale and
//! summed in i32 over the super-block (bounded well below 2³¹), then scaled once by `d · d_x`.
//! Each i32 lane of four products fits in 16 bits, so the scale is applied with `vpmaddwd`
//! against `(scale, 0)` pairs rather than the slower 32-bit `vpmulld`.
//! The offsets are folded with the activations' sums of each 16: `Q4_K` subtracts
//! `dmin · d_x · Σ m[j] · Σq_x`, `Q6_K` subtracts `32 · Σ sc[g] · Σq_x` inside the integer sum.
//!
//! `Q4_K` has only the 256-bit kernel: on Zen 4, whose 512-bit integer multiplies are
//! double-pumped, a 512-bit version (VNNI or not) measured about 15% slower, so AVX-512 CPUs run
//! the AVX2 kernel for it.
//!
//! Every function here is `unsafe` because of its `target_feature`: callers must have detected the
//! features (see `Isa::available`). Super-block counts come from the slice lengths, so all loads
//! stay in bounds.

use std::arch::x86_64::*;

use super::x86_q32::{dot4, f16_splat256, f16_splat512, hsum256, runs};
use crate::quant::{q4_k, q6_k, PreparedActivations, QK_K};

/// Super-blocks both operands hold.
fn blocks(w: &[u8], block_bytes: usize, x: &PreparedActivations) -> usize {
    (w.len() / block_bytes).min(x.d.len()).min(x.qs.len() / QK_K)
}

/// The unpacked `Q4_K` scales (bytes 0..8) and mins (bytes 8..16) of the super-block at `block`:
/// the word arithmetic of `q4_k::scales_mins_words`, on 32-bit vector lanes.
#[inline(always)]
pub(super) unsafe fn q4k_scales_mins(block: *const u8) -> __m128i {
    // SAFETY: the caller guarantees a whole super-block at `block` (bytes 4..20 are read);
    // AVX2 is enabled by the callers.
    unsafe {
        let words = _mm_loadu_si128(block.add(4) as *const __m128i); // [w0, w1, w2, -]
        let low = _mm_and_si128(words, _mm_set1_epi32(0x3f3f_3f3f)); // [sc 0..4, m 0..4]
        let w2 = _mm_srlv_epi32(_mm_shuffle_epi32::<0b00_00_10_10>(words), _mm_set_epi32(0, 0, 4, 0));
        let high = _mm_or_si128(
            _mm_and_si128(w2, _mm_set1_epi32(0x0f0f_0f0f)),
            _mm_and_si128(_mm_srli_epi32::<2>(words), _mm_set1_epi32(0x3030_3030)),
        ); // [sc 4..8, m 4..8]
        _mm_unpacklo_epi32(low, high)
    }
}

/// `Σ m[j] · (bsum[2j] + bsum[2j+1])` as 8 i32 lanes, from the unpacked scales/mins and the
/// activations' 16 sums.
#[inline(always)]
unsafe fn q4k_mins(scales_mins: __m128i, bsums: *const i16) -> __m256i {
    // SAFETY: the caller guarantees 16 readable i16 at `bsums`; AVX2 is enabled by the callers.
    unsafe {
        let mins = _mm_srli_si128::<8>(scales_mins);
        let pairs = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(mins, mins));
        _mm256_madd_epi16(_mm256_loadu_si256(bsums as *const __m256i), pairs)
    }
}

// ---------------------------------------------------------------------------------------------
// AVX2

#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_q4_k_avx2(w: &[u8], x: &PreparedActivations) -> f32 {
    const BB: usize = q4_k::BLOCK_BYTES;
    let nb = blocks(w, BB, x).min(x.bsums.len() / 16);
    let (wp, xq) = (w.as_ptr(), x.qs.as_ptr());
    let low = _mm256_set1_epi8(0x0f);
    // Within each i32 (two i16 scales), pick the first or the second i16 for all lanes.
    let first = _mm256_set1_epi32(0x0100_0100);
    let second = _mm256_set1_epi32(0x0302_0302);
    let mut acc = _mm256_setzero_ps();
    let mut min_acc = _mm256_setzero_ps();
    for s in 0..nb {
        // SAFETY: `s < nb`: the super-block's 144 bytes, 256 activations and 16 sums are in bounds.
        unsafe {
            let block = wp.add(s * BB);
            let dx = x.d[s];
            let scales_mins = q4k_scales_mins(block);
            let mins = q4k_mins(scales_mins, x.bsums.as_ptr().add(16 * s));
            min_acc = _mm256_fmadd_ps(
                _mm256_cvtepi32_ps(mins),
                _mm256_mul_ps(f16_splat256(block.add(2)), _mm256_set1_ps(dx)),
                min_acc,
            );
            let scales16 = _mm256_cvtepu8_epi16(scales_mins);
            let mut sums = _mm256_setzero_si256();
            for c in 0..4 {
                let packed = _mm256_loadu_si256(block.add(16 + 32 * c) as *const __m256i);
                let lo = _mm256_and_si256(packed, low);
                let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(packed), low);
                let xl = _mm256_loadu_si256(xq.add(QK_K * s + 64 * c) as *const __m256i);
                let xh = _mm256_loadu_si256(xq.add(QK_K * s + 64 * c + 32) as *const __m256i);
                let pair = _mm256_permutevar8x32_epi32(scales16, _mm256_set1_epi32(c as i32));
                let lo = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, xl), _mm256_shuffle_epi8(pair, first));
                let hi = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, xh), _mm256_shuffle_epi8(pair, second));
                sums = _mm256_add_epi32(sums, _mm256_add_epi32(lo, hi));
            }
            acc = _mm256_fmadd_ps(
                _mm256_cvtepi32_ps(sums),
                _mm256_mul_ps(f16_splat256(block), _mm256_set1_ps(dx)),
                acc,
            );
        }
    }
    // SAFETY: AVX2 is enabled on this function.
    unsafe { hsum256(acc) - hsum256(min_acc) }
}

#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_q6_k_avx2(w: &[u8], x: &PreparedActivations) -> f32 {
    const BB: usize = q6_k::BLOCK_BYTES;
    let nb = blocks(w, BB, x).min(x.bsums.len() / 16);
    let (wp, xq) = (w.as_ptr(), x.qs.as_ptr());
    let low = _mm256_set1_epi8(0x0f);
    let high = _mm256_set1_epi8(0x30);
    // Low 128 bits take the first i16 of the pair, high 128 bits the second.
    let split = _mm256_set_epi32(
        0x0302_0302,
        0x0302_0302,
        0x0302_0302,
        0x0302_0302,
        0x0100_0100,
        0x0100_0100,
        0x0100_0100,
        0x0100_0100,
    );
    let mut acc = _mm256_setzero_ps();
    for s in 0..nb {
        // SAFETY: `s < nb`: the super-block's 210 bytes, 256 activations and 16 sums are in bounds.
        unsafe {
            let block = wp.add(s * BB);
            let scales16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(block.add(192) as *const __m128i));
            let bsums = _mm256_loadu_si256(x.bsums.as_ptr().add(16 * s) as *const __m256i);
            let mut sums = _mm256_sub_epi32(
                _mm256_setzero_si256(),
                _mm256_slli_epi32::<5>(_mm256_madd_epi16(bsums, scales16)),
            );
            for n in 0..2 {
                let ql0 = _mm256_loadu_si256(block.add(64 * n) as *const __m256i);
                let ql1 = _mm256_loadu_si256(block.add(64 * n + 32) as *const __m256i);
                let qh = _mm256_loadu_si256(block.add(128 + 32 * n) as *const __m256i);
                let q = [
                    _mm256_or_si256(
                        _mm256_and_si256(ql0, low),
                        _mm256_and_si256(_mm256_slli_epi16::<4>(qh), high),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(ql1, low),
                        _mm256_and_si256(_mm256_slli_epi16::<2>(qh), high),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16::<4>(ql0), low),
                        _mm256_and_si256(qh, high),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16::<4>(ql1), low),
                        _mm256_and_si256(_mm256_srli_epi16::<2>(qh), high),
                    ),
                ];
                for (k, &q) in q.iter().enumerate() {
                    let qx = _mm256_loadu_si256(xq.add(QK_K * s + 128 * n + 32 * k) as *const __m256i);
                    let pair = _mm256_permutevar8x32_epi32(scales16, _mm256_set1_epi32((4 * n + k) as i32));
                    let scale = _mm256_shuffle_epi8(pair, split);
                    sums = _mm256_add_epi32(sums, _mm256_madd_epi16(_mm256_maddubs_epi16(q, qx), scale));
                }
            }
            let d = _mm256_mul_ps(f16_splat256(block.add(208)), _mm256_set1_ps(x.d[s]));
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), d, acc);
        }
    }
    // SAFETY: AVX2 is enabled on this function.
    unsafe { hsum256(acc) }
}

// ---------------------------------------------------------------------------------------------
// AVX-512

/// The 6-bit quants (0..63) of one half (128 values) of a Q6_K super-block, as two 64-byte
/// registers: `ql` of the half in one register, `qh` broadcast to both 256-bit halves and shifted
/// per half so that each byte's two high bits land on bits 4..6.
///
/// # Safety
/// AVX-512F/BW must be available and `block` must point at a whole super-block (210 bytes).
#[inline(always)]
pub(crate) unsafe fn q6_k_half_avx512(block: *const u8, half: usize) -> (__m512i, __m512i) {
    // SAFETY: `ql` spans 64·half..+64 and `qh` 128 + 32·half..+32 of the 210 bytes.
    unsafe {
        let (low, high) = (_mm512_set1_epi8(0x0f), _mm512_set1_epi8(0x30));
        let shift_a = _mm512_set_epi64(2, 2, 2, 2, 4, 4, 4, 4);
        let shift_b = _mm512_set_epi64(2, 2, 2, 2, 0, 0, 0, 0);
        let ql = _mm512_loadu_si512(block.add(64 * half) as *const _);
        let qh = _mm512_broadcast_i64x4(_mm256_loadu_si256(block.add(128 + 32 * half) as *const __m256i));
        let qa = _mm512_or_si512(
            _mm512_and_si512(ql, low),
            _mm512_and_si512(_mm512_sllv_epi64(qh, shift_a), high),
        );
        let qb = _mm512_or_si512(
            _mm512_and_si512(_mm512_srli_epi16::<4>(ql), low),
            _mm512_and_si512(_mm512_srlv_epi64(qh, shift_b), high),
        );
        (qa, qb)
    }
}

#[inline(always)]
unsafe fn q6_k_avx512<const VNNI: bool>(w: &[u8], x: &PreparedActivations) -> f32 {
    const BB: usize = q6_k::BLOCK_BYTES;
    let nb = blocks(w, BB, x).min(x.bsums.len() / 16);
    let (wp, xq) = (w.as_ptr(), x.qs.as_ptr());
    // SAFETY: for `s < nb` the super-block's 210 bytes, 256 activations and 16 sums are in bounds.
    unsafe {
        let index = [[runs(0, 4), runs(4, 4)], [runs(8, 4), runs(12, 4)]];
        let mut acc = _mm512_setzero_ps();
        for s in 0..nb {
            let block = wp.add(s * BB);
            let scales8 = _mm_loadu_si128(block.add(192) as *const __m128i);
            // (scale, 0) i16 pairs: `vpmaddwd` then multiplies each i32 lane (|lane| ≤ 4·63·127, an
            // i16) by its scale.
            let scales32 = _mm512_and_si512(_mm512_cvtepi8_epi32(scales8), _mm512_set1_epi32(0xffff));
            let bsums = _mm256_loadu_si256(x.bsums.as_ptr().add(16 * s) as *const __m256i);
            let offset = _mm256_slli_epi32::<5>(_mm256_madd_epi16(bsums, _mm256_cvtepi8_epi16(scales8)));
            let mut sums = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_zextsi256_si512(offset));
            for (n, index) in index.iter().enumerate() {
                let (qa, qb) = q6_k_half_avx512(block, n);
                let xa = _mm512_loadu_si512(xq.add(QK_K * s + 128 * n) as *const _);
                let xb = _mm512_loadu_si512(xq.add(QK_K * s + 128 * n + 64) as *const _);
                let pa = dot4::<VNNI>(_mm512_setzero_si512(), qa, xa);
                let pb = dot4::<VNNI>(_mm512_setzero_si512(), qb, xb);
                sums = _mm512_add_epi32(
                    sums,
                    _mm512_madd_epi16(pa, _mm512_permutexvar_epi32(index[0], scales32)),
                );
                sums = _mm512_add_epi32(
                    sums,
                    _mm512_madd_epi16(pb, _mm512_permutexvar_epi32(index[1], scales32)),
                );
            }
            let d = _mm512_mul_ps(f16_splat512(block.add(208)), _mm512_set1_ps(x.d[s]));
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), d, acc);
        }
        _mm512_reduce_add_ps(acc)
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub unsafe fn dot_q6_k_avx512(w: &[u8], x: &PreparedActivations) -> f32 {
    // SAFETY: features enabled above; the kernel bounds its loads by the slices.
    unsafe { q6_k_avx512::<false>(w, x) }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub unsafe fn dot_q6_k_avx512vnni(w: &[u8], x: &PreparedActivations) -> f32 {
    // SAFETY: as above, with VNNI enabled for `vpdpbusd`.
    unsafe { q6_k_avx512::<true>(w, x) }
}

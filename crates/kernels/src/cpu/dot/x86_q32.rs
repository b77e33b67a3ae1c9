//! AVX2 and AVX-512 integer dot products of `Q8_0` / `Q4_0` weights (blocks of 32) with `Q8_0`
//! activations.
//!
//! Per block the kernels form the exact integer `Σ q_w · q_x` with `u8 × i8` multiply-adds
//! (`vpmaddubsw` + `vpmaddwd`, or VNNI's `vpdpbusd`), convert it to f32 and multiply-add it with
//! `d_w · d_x`. `Q8_0` weights are signed, so `|q_w|` is multiplied with `q_x` negated where `q_w`
//! is negative. `Q4_0` nibbles are unsigned: `Σ q·q_x` is formed and `8 · d_w · (d_x·Σq_x)` is
//! subtracted once, the activation sums being prepared with the activations.
//!
//! AVX2 reduces four blocks' lane sums together (`vphaddd`) so one multiply-add scales them all.
//! AVX-512 puts four blocks in one register; with VBMI (the `Avx512Vnni` level) one byte permute
//! gathers `Q4_0`'s four 16-byte nibble runs and another its four f16 scales, instead of
//! inserts and scalar loads.
//!
//! Every function here is `unsafe` because of its `target_feature`: callers must have detected the
//! features (see `Isa::available`). Block counts are taken from the slice lengths, so all loads
//! stay in bounds; blocks left over after the unrolled loop go through the scalar reference.

use std::arch::x86_64::*;

use crate::quant::{q4_0, q8_0, PreparedActivations, QK};

/// The f16 at `p` as f32 in all 8 lanes, converted by F16C. (Converting one lane and
/// broadcasting it lets the compiler load the f16 with a 16-bit insert that merges into, and waits
/// for, an unrelated register — a false loop-carried dependency. Here every lane is used.)
#[inline(always)]
pub(super) unsafe fn f16_splat256(p: *const u8) -> __m256 {
    // SAFETY: the caller guarantees two readable bytes at `p`; F16C is enabled by the callers.
    unsafe { _mm256_cvtph_ps(_mm_set1_epi16((p as *const i16).read_unaligned())) }
}

/// The f16 at `p` as f32 in all 16 lanes.
#[inline(always)]
pub(super) unsafe fn f16_splat512(p: *const u8) -> __m512 {
    // SAFETY: the caller guarantees two readable bytes at `p`; AVX-512F is enabled by the callers.
    unsafe { _mm512_cvtph_ps(_mm256_set1_epi16((p as *const i16).read_unaligned())) }
}

/// Four f16 at `p`, `p + stride`, ... as f32.
#[inline(always)]
pub(super) unsafe fn f16_load4(p: *const u8, stride: usize) -> __m128 {
    // SAFETY: the caller guarantees two readable bytes at each of the four addresses.
    unsafe {
        let h = |k: usize| (p.add(k * stride) as *const u16).read_unaligned() as i16;
        _mm_cvtph_ps(_mm_set_epi16(0, 0, 0, 0, h(3), h(2), h(1), h(0)))
    }
}

#[inline(always)]
pub(super) unsafe fn hsum256(v: __m256) -> f32 {
    // SAFETY: register-only AVX arithmetic; callers run with AVX2 enabled.
    unsafe {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s)))
    }
}

/// Blocks that the weights and all activation arrays hold.
fn blocks(w: &[u8], block_bytes: usize, x: &PreparedActivations) -> usize {
    (w.len() / block_bytes)
        .min(x.d.len())
        .min(x.dsum.len())
        .min(x.qs.len() / QK)
}

// ---------------------------------------------------------------------------------------------
// AVX2: one block per step, two accumulators.

/// `Σ q_w · q_x` of one `Q8_0` block, as partial sums in 8 i32 lanes.
#[inline(always)]
unsafe fn q8_0_block_avx2(block: *const u8, qx: *const i8) -> __m256i {
    // SAFETY: the caller guarantees 34 readable bytes at `block` and 32 at `qx`.
    unsafe {
        let qw = _mm256_loadu_si256(block.add(2) as *const __m256i);
        let qx = _mm256_loadu_si256(qx as *const __m256i);
        let products = _mm256_maddubs_epi16(_mm256_sign_epi8(qw, qw), _mm256_sign_epi8(qx, qw));
        _mm256_madd_epi16(products, _mm256_set1_epi16(1))
    }
}

/// `Σ q · q_x` (nibbles unsigned) of one `Q4_0` block, as partial sums in 8 i32 lanes.
#[inline(always)]
unsafe fn q4_0_block_avx2(block: *const u8, qx: *const i8) -> __m256i {
    // SAFETY: the caller guarantees 18 readable bytes at `block` and 32 at `qx`.
    unsafe {
        let packed = _mm_loadu_si128(block.add(2) as *const __m128i);
        // Low nibbles are elements 0..16, high nibbles 16..32: natural order in one register.
        let both = _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(packed), _mm_srli_epi16::<4>(packed));
        let q = _mm256_and_si256(both, _mm256_set1_epi8(0x0f));
        let qx = _mm256_loadu_si256(qx as *const __m256i);
        _mm256_madd_epi16(_mm256_maddubs_epi16(q, qx), _mm256_set1_epi16(1))
    }
}

/// Four blocks per step: their lane sums are reduced together with `vphaddd` to one register
/// holding each block's two half sums, which one multiply-add scales by `d_w · d_x`. `Q4`
/// selects `Q4_0` (and subtracts `8 · Σ d_w · d_x·Σq_x`) over `Q8_0`. Up to three blocks left
/// over go through the scalar reference.
#[inline(always)]
unsafe fn q32_avx2<const Q4: bool>(w: &[u8], x: &PreparedActivations) -> f32 {
    let bb = if Q4 { q4_0::BLOCK_BYTES } else { q8_0::BLOCK_BYTES };
    let nb = blocks(w, bb, x);
    let (wp, xq) = (w.as_ptr(), x.qs.as_ptr());
    let mut b = 0;
    let mut sum = 0.0;
    // SAFETY: each step reads blocks `b..b + 4` (all `< nb`) of weights, activations and sums.
    unsafe {
        let mut acc = _mm256_setzero_ps();
        let mut correction = _mm_setzero_ps();
        while b + 4 <= nb {
            let block = wp.add(b * bb);
            let sums = |k: usize| {
                if Q4 {
                    q4_0_block_avx2(block.add(k * bb), xq.add((b + k) * QK))
                } else {
                    q8_0_block_avx2(block.add(k * bb), xq.add((b + k) * QK))
                }
            };
            // Lanes: [b0 b1 b2 b3] sums of elements 0..16 (each pair of i32 lanes 0..4), then of 16..32.
            let h01 = _mm256_hadd_epi32(sums(0), sums(1));
            let h23 = _mm256_hadd_epi32(sums(2), sums(3));
            let h = _mm256_cvtepi32_ps(_mm256_hadd_epi32(h01, h23));
            let dw = f16_load4(block, bb);
            let scales = _mm_mul_ps(dw, _mm_loadu_ps(x.d.as_ptr().add(b)));
            acc = _mm256_fmadd_ps(h, _mm256_set_m128(scales, scales), acc);
            if Q4 {
                correction = _mm_fmadd_ps(dw, _mm_loadu_ps(x.dsum.as_ptr().add(b)), correction);
            }
            b += 4;
        }
        let c = _mm_add_ps(correction, _mm_movehl_ps(correction, correction));
        let c = _mm_cvtss_f32(_mm_add_ss(c, _mm_shuffle_ps::<0b01>(c, c)));
        sum += hsum256(acc) - 8.0 * c;
    }
    let (w, qs, d) = (&w[b * bb..nb * bb], &x.qs[b * QK..nb * QK], &x.d[b..nb]);
    sum + if Q4 {
        q4_0::dot_q8(w, qs, d)
    } else {
        q8_0::dot_q8(w, qs, d)
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_q8_0_avx2(w: &[u8], x: &PreparedActivations) -> f32 {
    // SAFETY: AVX2/FMA/F16C enabled above; the loop bounds its loads by the slices.
    unsafe { q32_avx2::<false>(w, x) }
}

#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_q4_0_avx2(w: &[u8], x: &PreparedActivations) -> f32 {
    // SAFETY: AVX2/FMA/F16C enabled above; the loop bounds its loads by the slices.
    unsafe { q32_avx2::<true>(w, x) }
}

// ---------------------------------------------------------------------------------------------
// AVX-512: four blocks per step; with VNNI the multiply-adds are one `vpdpbusd`.

/// `acc + Σ` of each 4 adjacent `u8(a) × i8(b)` products, per i32 lane. Without VNNI the i16
/// pair sums cannot saturate for the operands used here (`a ≤ 128`, `|b| ≤ 127`).
#[inline(always)]
pub(super) unsafe fn dot4<const VNNI: bool>(acc: __m512i, a: __m512i, b: __m512i) -> __m512i {
    // SAFETY: register-only AVX-512BW ops; `vpdpbusd` only when the caller enabled avx512vnni.
    unsafe {
        if VNNI {
            _mm512_dpbusd_epi32(acc, a, b)
        } else {
            _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(a, b), _mm512_set1_epi16(1)))
        }
    }
}

/// Lane index vectors repeating `first`, `first + 1`, ... each `run` times.
#[inline(always)]
pub(super) unsafe fn runs(first: i32, run: i32) -> __m512i {
    // SAFETY: register-only AVX-512F.
    unsafe {
        let lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
        let shift = _mm_cvtsi32_si128(run.trailing_zeros() as i32);
        _mm512_add_epi32(_mm512_set1_epi32(first), _mm512_srl_epi32(lane, shift))
    }
}

#[inline(always)]
unsafe fn q8_0_avx512<const VNNI: bool>(w: &[u8], x: &PreparedActivations) -> f32 {
    const BB: usize = q8_0::BLOCK_BYTES;
    let nb = blocks(w, BB, x);
    let (wp, xq) = (w.as_ptr(), x.qs.as_ptr());
    let mut b = 0;
    let mut tail = 0.0;
    // SAFETY: each step reads blocks `b..b + 4` (all `< nb`) of weights, activations and scales.
    unsafe {
        let (first, second) = (runs(0, 8), runs(2, 8));
        let mut acc = _mm512_setzero_ps();
        while b + 4 <= nb {
            let block = wp.add(b * BB);
            let load2 = |k: usize| {
                let lo = _mm256_loadu_si256(block.add(k * BB + 2) as *const __m256i);
                let hi = _mm256_loadu_si256(block.add((k + 1) * BB + 2) as *const __m256i);
                _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi)
            };
            let signed_dot = |qw: __m512i, qx: __m512i| {
                let negate = _mm512_movepi8_mask(qw);
                let qx = _mm512_mask_sub_epi8(qx, negate, _mm512_setzero_si512(), qx);
                _mm512_cvtepi32_ps(dot4::<VNNI>(_mm512_setzero_si512(), _mm512_abs_epi8(qw), qx))
            };
            let s01 = signed_dot(load2(0), _mm512_loadu_si512(xq.add(b * QK) as *const _));
            let s23 = signed_dot(load2(2), _mm512_loadu_si512(xq.add(b * QK + 64) as *const _));
            let scales = _mm512_castps128_ps512(_mm_mul_ps(f16_load4(block, BB), _mm_loadu_ps(x.d.as_ptr().add(b))));
            acc = _mm512_fmadd_ps(s01, _mm512_permutexvar_ps(first, scales), acc);
            acc = _mm512_fmadd_ps(s23, _mm512_permutexvar_ps(second, scales), acc);
            b += 4;
        }
        tail += _mm512_reduce_add_ps(acc);
    }
    tail + q8_0::dot_q8(&w[b * BB..nb * BB], &x.qs[b * QK..nb * QK], &x.d[b..nb])
}

#[inline(always)]
unsafe fn q4_0_avx512<const VNNI: bool, const VBMI: bool>(w: &[u8], x: &PreparedActivations) -> f32 {
    const BB: usize = q4_0::BLOCK_BYTES;
    let nb = blocks(w, BB, x);
    let (wp, xq) = (w.as_ptr(), x.qs.as_ptr());
    let mut b = 0;
    let mut sum = 0.0;
    // SAFETY: each step reads blocks `b..b + 4` (all `< nb`) of weights, activations and scales.
    unsafe {
        let lanes = runs(0, 4);
        let low = _mm512_set1_epi8(0x0f);
        // VBMI byte gathers over the 72 bytes of four blocks, held as `head = bytes 0..64` and
        // `tail = bytes 8..72` (indices 64.. pick from `tail`): the 4 × 16 nibble bytes, and the
        // four f16 scales (bytes 18k, 18k + 1) in the low 8 bytes.
        let nibble_index = _mm512_add_epi8(
            _mm512_set_epi8(
                15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2,
                1, 0, 15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4,
                3, 2, 1, 0,
            ),
            _mm512_set_epi32(
                0x7070_7070,
                0x7070_7070,
                0x7070_7070,
                0x7070_7070,
                0x2626_2626,
                0x2626_2626,
                0x2626_2626,
                0x2626_2626,
                0x1414_1414,
                0x1414_1414,
                0x1414_1414,
                0x1414_1414,
                0x0202_0202,
                0x0202_0202,
                0x0202_0202,
                0x0202_0202,
            ),
        );
        let scale_index = _mm512_set_epi64(0, 0, 0, 0, 0, 0, 0, 0x3736_2524_1312_0100);
        let mut acc = _mm512_setzero_ps();
        let mut correction = _mm_setzero_ps();
        while b + 4 <= nb {
            let block = wp.add(b * BB);
            let (packed, dw) = if VBMI {
                let head = _mm512_loadu_si512(block as *const _);
                let tail = _mm512_loadu_si512(block.add(8) as *const _);
                let scales = _mm512_castsi512_si128(_mm512_permutexvar_epi8(scale_index, head));
                (_mm512_permutex2var_epi8(head, nibble_index, tail), _mm_cvtph_ps(scales))
            } else {
                let nibbles = |k: usize| _mm_loadu_si128(block.add(k * BB + 2) as *const __m128i);
                let packed = _mm512_inserti32x4::<3>(
                    _mm512_inserti32x4::<2>(
                        _mm512_inserti32x4::<1>(_mm512_castsi128_si512(nibbles(0)), nibbles(1)),
                        nibbles(2),
                    ),
                    nibbles(3),
                );
                (packed, f16_load4(block, BB))
            };
            // 128-bit lane k holds block b + k: low nibbles its elements 0..16, high 16..32.
            let lo = _mm512_and_si512(packed, low);
            let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(packed), low);
            let x01 = _mm512_loadu_si512(xq.add(b * QK) as *const _);
            let x23 = _mm512_loadu_si512(xq.add(b * QK + 64) as *const _);
            let xlo = _mm512_shuffle_i64x2::<0b10_00_10_00>(x01, x23);
            let xhi = _mm512_shuffle_i64x2::<0b11_01_11_01>(x01, x23);
            let sums = dot4::<VNNI>(dot4::<VNNI>(_mm512_setzero_si512(), lo, xlo), hi, xhi);
            let scales = _mm512_castps128_ps512(_mm_mul_ps(dw, _mm_loadu_ps(x.d.as_ptr().add(b))));
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_permutexvar_ps(lanes, scales), acc);
            correction = _mm_fmadd_ps(dw, _mm_loadu_ps(x.dsum.as_ptr().add(b)), correction);
            b += 4;
        }
        let c = _mm_add_ps(correction, _mm_movehl_ps(correction, correction));
        let c = _mm_cvtss_f32(_mm_add_ss(c, _mm_shuffle_ps::<0b01>(c, c)));
        sum += _mm512_reduce_add_ps(acc) - 8.0 * c;
    }
    sum + q4_0::dot_q8(&w[b * BB..nb * BB], &x.qs[b * QK..nb * QK], &x.d[b..nb])
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub unsafe fn dot_q8_0_avx512(w: &[u8], x: &PreparedActivations) -> f32 {
    // SAFETY: features enabled above; `q8_0_avx512` bounds its loads by the slices.
    unsafe { q8_0_avx512::<false>(w, x) }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub unsafe fn dot_q8_0_avx512vnni(w: &[u8], x: &PreparedActivations) -> f32 {
    // SAFETY: as above, with VNNI enabled for `vpdpbusd`.
    unsafe { q8_0_avx512::<true>(w, x) }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub unsafe fn dot_q4_0_avx512(w: &[u8], x: &PreparedActivations) -> f32 {
    // SAFETY: features enabled above; `q4_0_avx512` bounds its loads by the slices.
    unsafe { q4_0_avx512::<false, false>(w, x) }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx2,fma,f16c")]
pub unsafe fn dot_q4_0_avx512vnni(w: &[u8], x: &PreparedActivations) -> f32 {
    // SAFETY: as above, with VNNI enabled for `vpdpbusd` and VBMI for the byte gathers.
    unsafe { q4_0_avx512::<true, true>(w, x) }
}

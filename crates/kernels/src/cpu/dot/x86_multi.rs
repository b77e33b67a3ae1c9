//! AVX-512 VNNI integer dot products of ONE stored weight row with up to 8 prepared activation
//! rows at once (batched decode): each weight block is loaded and decoded once, then multiplied
//! with every token's 8-bit activations while it sits in registers.
//!
//! `Q8_0`: the signed weights are flipped to `q_w + 128` (unsigned, for `vpdpbusd`) once per
//! block; `Σ (q_w + 128)·q_x − 128·Σq_x` recovers the product, the correction coming from the
//! activations' prepared `d_x · Σq_x`. `Q4_K`: the nibbles of a super-block are unpacked once into
//! four registers of 64 values (in the activations' order), their sub-block scales spread once
//! into `(scale, 0)` i16 pairs that `vpdpwssd` applies per token.
//!
//! Every function here is `unsafe` because of its `target_feature`: callers must have detected the
//! features (see `Isa::available`). Block counts are taken from the slice lengths, so all loads
//! stay in bounds; `Q8_0` blocks left over after the unrolled loop go through the scalar reference.

use std::arch::x86_64::*;

use super::x86_q32::{f16_load4, hsum256, runs};
use super::x86_qk::q4k_scales_mins;
use crate::quant::{q4_k, q8_0, PreparedActivations, QK, QK_K};

/// Most activation rows one kernel call takes (their accumulators stay in registers).
pub(super) const MAX_TOKENS: usize = 8;

#[inline(always)]
unsafe fn q8_0_multi<const N: usize>(w: &[u8], xs: &[PreparedActivations], out: &mut [f32]) {
    const BB: usize = q8_0::BLOCK_BYTES;
    let xs = &xs[..N];
    let out = &mut out[..N];
    let nb = xs.iter().fold(w.len() / BB, |nb, x| {
        nb.min(x.d.len()).min(x.dsum.len()).min(x.qs.len() / QK)
    });
    let wp = w.as_ptr();
    let qs: [*const i8; N] = std::array::from_fn(|t| xs[t].qs.as_ptr());
    let ds: [*const f32; N] = std::array::from_fn(|t| xs[t].d.as_ptr());
    let dsums: [*const f32; N] = std::array::from_fn(|t| xs[t].dsum.as_ptr());
    let mut b = 0;
    // SAFETY: each step reads blocks `b..b + 4` (all `< nb`) of the weights and of every token's
    // activations, scales and sums.
    unsafe {
        // 256-bit registers: on Zen 4 these run at full rate, and one block fills one, so its
        // scale is a broadcast rather than a lane permute.
        let flip = _mm256_set1_epi8(-128);
        // Two accumulators per token halve the dependent multiply-add chain per step.
        let mut acc = [[_mm256_setzero_ps(); N]; 2];
        let mut correction = [_mm_setzero_ps(); N];
        while b + 4 <= nb {
            let block = wp.add(b * BB);
            let q: [__m256i; 4] = std::array::from_fn(|k| {
                _mm256_xor_si256(_mm256_loadu_si256(block.add(k * BB + 2) as *const __m256i), flip)
            });
            let dw = f16_load4(block, BB);
            let dws: [__m256; 4] = [
                _mm256_broadcastss_ps(dw),
                _mm256_broadcastss_ps(_mm_shuffle_ps::<0b01>(dw, dw)),
                _mm256_broadcastss_ps(_mm_shuffle_ps::<0b10>(dw, dw)),
                _mm256_broadcastss_ps(_mm_shuffle_ps::<0b11>(dw, dw)),
            ];
            for t in 0..N {
                let xq = qs[t].add(b * QK);
                for k in 0..4 {
                    let s = _mm256_dpbusd_epi32(
                        _mm256_setzero_si256(),
                        q[k],
                        _mm256_loadu_si256(xq.add(32 * k) as *const __m256i),
                    );
                    let scale = _mm256_mul_ps(dws[k], _mm256_broadcast_ss(&*ds[t].add(b + k)));
                    acc[k & 1][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), scale, acc[k & 1][t]);
                }
                correction[t] = _mm_fmadd_ps(dw, _mm_loadu_ps(dsums[t].add(b)), correction[t]);
            }
            b += 4;
        }
        for t in 0..N {
            let c = correction[t];
            let c = _mm_add_ps(c, _mm_movehl_ps(c, c));
            let c = _mm_cvtss_f32(_mm_add_ss(c, _mm_shuffle_ps::<0b01>(c, c)));
            out[t] = hsum256(_mm256_add_ps(acc[0][t], acc[1][t])) - 128.0 * c;
        }
    }
    for (x, o) in xs.iter().zip(out.iter_mut()) {
        *o += q8_0::dot_q8(&w[b * BB..nb * BB], &x.qs[b * QK..nb * QK], &x.d[b..nb]);
    }
}

#[inline(always)]
unsafe fn q4_k_multi<const N: usize>(w: &[u8], xs: &[PreparedActivations], out: &mut [f32]) {
    const BB: usize = q4_k::BLOCK_BYTES;
    let xs = &xs[..N];
    let out = &mut out[..N];
    let nb = xs.iter().fold(w.len() / BB, |nb, x| {
        nb.min(x.d.len()).min(x.qs.len() / QK_K).min(x.bsums.len() / 16)
    });
    let wp = w.as_ptr();
    let qs: [*const i8; N] = std::array::from_fn(|t| xs[t].qs.as_ptr());
    let ds: [*const f32; N] = std::array::from_fn(|t| xs[t].d.as_ptr());
    let bsums: [*const i16; N] = std::array::from_fn(|t| xs[t].bsums.as_ptr());
    // SAFETY: for `s < nb` the super-block's 144 bytes and every token's 256 activations, scale
    // and 16 sums are in bounds.
    unsafe {
        let low = _mm512_set1_epi8(0x0f);
        // The 32 packed bytes of a chunk sit in both 256-bit halves: the low half keeps the low
        // nibbles (sub-block 2c), the high half the high nibbles (sub-block 2c + 1).
        let shift = _mm512_set_epi64(4, 4, 4, 4, 0, 0, 0, 0);
        let index = [runs(0, 8), runs(2, 8), runs(4, 8), runs(6, 8)];
        let mut acc = [_mm512_setzero_ps(); N];
        for s in 0..nb {
            let block = wp.add(s * BB);
            let scales_mins = q4k_scales_mins(block);
            let scales32 = _mm512_and_si512(_mm512_cvtepu8_epi32(scales_mins), _mm512_set1_epi32(0xffff));
            let mins = _mm_srli_si128::<8>(scales_mins);
            let min_pairs = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(mins, mins));
            let q: [__m512i; 4] = std::array::from_fn(|c| {
                let packed = _mm512_broadcast_i64x4(_mm256_loadu_si256(block.add(16 + 32 * c) as *const __m256i));
                _mm512_and_si512(_mm512_srlv_epi64(packed, shift), low)
            });
            let sc: [__m512i; 4] = std::array::from_fn(|c| _mm512_permutexvar_epi32(index[c], scales32));
            let d = f16_load4(block, 2);
            let (d, dmin) = (_mm_cvtss_f32(d), _mm_cvtss_f32(_mm_shuffle_ps::<0b01>(d, d)));
            for t in 0..N {
                let xq = qs[t].add(QK_K * s);
                let mut sums = _mm512_setzero_si512();
                for c in 0..4 {
                    let p = _mm512_dpbusd_epi32(
                        _mm512_setzero_si512(),
                        q[c],
                        _mm512_loadu_si512(xq.add(64 * c) as *const _),
                    );
                    // |p| ≤ 4·15·127 fits the low i16 of its lane: `vpdpwssd` with (scale, 0)
                    // multiplies it by the sub-block scale.
                    sums = _mm512_dpwssd_epi32(sums, p, sc[c]);
                }
                let dx = *ds[t].add(s);
                let m = _mm256_madd_epi16(_mm256_loadu_si256(bsums[t].add(16 * s) as *const __m256i), min_pairs);
                acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_set1_ps(d * dx), acc[t]);
                acc[t] = _mm512_fmadd_ps(
                    _mm512_zextps256_ps512(_mm256_cvtepi32_ps(m)),
                    _mm512_set1_ps(-dmin * dx),
                    acc[t],
                );
            }
        }
        for t in 0..N {
            out[t] = _mm512_reduce_add_ps(acc[t]);
        }
    }
}

macro_rules! by_count {
    ($kernel:ident, $w:expr, $xs:expr, $out:expr) => {
        match $xs.len() {
            1 => $kernel::<1>($w, $xs, $out),
            2 => $kernel::<2>($w, $xs, $out),
            3 => $kernel::<3>($w, $xs, $out),
            4 => $kernel::<4>($w, $xs, $out),
            5 => $kernel::<5>($w, $xs, $out),
            6 => $kernel::<6>($w, $xs, $out),
            7 => $kernel::<7>($w, $xs, $out),
            8 => $kernel::<8>($w, $xs, $out),
            n => panic!("{n} activation rows: at most {MAX_TOKENS} per call"),
        }
    };
}

/// `out[t] = w · xs[t]` for `Q8_0` bytes `w` and 1..=8 rows `xs` (each checked to fit).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub unsafe fn dot_q8_0_multi_avx512vnni(w: &[u8], xs: &[PreparedActivations], out: &mut [f32]) {
    // SAFETY: features enabled above; the kernel bounds its loads by the slices.
    unsafe { by_count!(q8_0_multi, w, xs, out) }
}

/// `out[t] = w · xs[t]` for `Q4_K` bytes `w` and 1..=8 rows `xs` (each checked to fit).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub unsafe fn dot_q4_k_multi_avx512vnni(w: &[u8], xs: &[PreparedActivations], out: &mut [f32]) {
    // SAFETY: features enabled above; the kernel bounds its loads by the slices.
    unsafe { by_count!(q4_k_multi, w, xs, out) }
}

//! FP8 E4M3 rows with one f32 scale per `block_cols` weights (DeepSeek-R1's own format): the
//! whole row in one fused loop.
//!
//! Each block's products go into vector accumulators that are scaled by the block's scale and
//! added into a row accumulator (one FMA per block; no horizontal sum and no call per block), and
//! one horizontal sum ends the row. A byte is widened to the F16 bit pattern of its value / 256 by
//! a sign extension, a shift and a mask: `(sext(b) << 7) & 0xbf80` puts the sign at bit 15 (the
//! sign extension's copy) and the 7 exponent/mantissa bits at 7..=13 (F16's exponent bias is 8
//! more than E4M3's, so subnormals come out right too), then `vcvtph2ps` gives f32 and the row's
//! sum is multiplied by 256 once. Bytes 0x7f / 0xff (NaN in E4M3FN) decode as ±480 on the SIMD
//! paths, as they always have; the scalar reference decodes them as NaN.

use super::{scalar, Isa};

/// `Σ_blocks scale[b] · (q[block b] · x[block b])`: one row of an FP8 block matrix (`q` and `x`
/// of the row's length, `scales` one per `block_cols` columns, the last block possibly partial).
#[inline]
pub(super) fn dot_row(isa: Isa, q: &[u8], scales: &[f32], block_cols: usize, x: &[f32]) -> f32 {
    debug_assert!(block_cols > 0);
    debug_assert_eq!(q.len(), x.len());
    debug_assert!(scales.len() >= q.len().div_ceil(block_cols));
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx512` / `Avx512Vnni` are only produced by `Isa::available` after
        // detecting avx512f/bw/vl, avx2, fma and f16c; every access is bounds-checked inside.
        Isa::Avx512 | Isa::Avx512Vnni => unsafe { x86::dot_row_avx512(q, scales, block_cols, x) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2` is only produced after detecting avx2, fma and f16c.
        Isa::Avx2 => unsafe { x86::dot_row_avx2(q, scales, block_cols, x) },
        _ => dot_row_scalar(q, scales, block_cols, x),
    }
}

/// The reference: exact table decode, one scaled sum per block.
pub(super) fn dot_row_scalar(q: &[u8], scales: &[f32], block_cols: usize, x: &[f32]) -> f32 {
    q.chunks(block_cols)
        .zip(x.chunks(block_cols))
        .zip(scales)
        .map(|((q, xs), &scale)| scalar::dot_fp8(q, xs) * scale)
        .sum()
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// FP8 decoded through F16 comes out 2^-8 too small.
    const FP8_VIA_F16_SCALE: f32 = 256.0;
    /// Keeps F16 bits 15 (sign) and 7..=13 of a sign-extended byte shifted left by 7.
    const F16_MASK: i16 = 0xbf80_u16 as i16;

    /// 8 FP8 bytes sign-extended to 16 bits → the F16 bit patterns of value / 256.
    #[inline(always)]
    fn f16_bits_128(sext: __m128i) -> __m128i {
        // SAFETY: register-only SSE2 integer ops.
        unsafe { _mm_and_si128(_mm_slli_epi16::<7>(sext), _mm_set1_epi16(F16_MASK)) }
    }

    /// 16 FP8 bytes sign-extended to 16 bits → the F16 bit patterns of value / 256.
    #[inline(always)]
    fn f16_bits_256(sext: __m256i) -> __m256i {
        // SAFETY: register-only AVX2 integer ops; callers run with AVX2 enabled.
        unsafe { _mm256_and_si256(_mm256_slli_epi16::<7>(sext), _mm256_set1_epi16(F16_MASK)) }
    }

    #[inline(always)]
    fn hsum256(v: __m256) -> f32 {
        // SAFETY: register-only AVX/SSE arithmetic; callers run with AVX2 enabled.
        unsafe {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
            _mm_cvtss_f32(s)
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    pub unsafe fn dot_row_avx512(q: &[u8], scales: &[f32], block_cols: usize, x: &[f32]) -> f32 {
        let n = q.len().min(x.len());
        let blocks = n.div_ceil(block_cols).min(scales.len());
        let (w, xp) = (q.as_ptr() as *const i8, x.as_ptr());
        // 16 weights at `i` (lanes outside `mask` zero) as f32 / 256.
        let load = |i: usize, mask: __mmask16| {
            // SAFETY: callers pass `i` and `mask` covering only elements below `n`.
            unsafe { _mm512_cvtph_ps(f16_bits_256(_mm256_cvtepi8_epi16(_mm_maskz_loadu_epi8(mask, w.add(i))))) }
        };
        let full = |i: usize| {
            // SAFETY: callers pass `i + 16 <= n`.
            unsafe {
                _mm512_cvtph_ps(f16_bits_256(_mm256_cvtepi8_epi16(_mm_loadu_si128(
                    w.add(i) as *const __m128i
                ))))
            }
        };
        let mut row = _mm512_setzero_ps();
        for (b, &scale) in scales[..blocks].iter().enumerate() {
            let start = b * block_cols;
            let end = (start + block_cols).min(n);
            let mut acc = [_mm512_setzero_ps(); 2];
            let mut i = start;
            while i + 64 <= end {
                for k in 0..4 {
                    acc[k & 1] = _mm512_fmadd_ps(full(i + 16 * k), _mm512_loadu_ps(xp.add(i + 16 * k)), acc[k & 1]);
                }
                i += 64;
            }
            while i + 16 <= end {
                acc[0] = _mm512_fmadd_ps(full(i), _mm512_loadu_ps(xp.add(i)), acc[0]);
                i += 16;
            }
            if i < end {
                let mask: __mmask16 = (1u32 << (end - i)) as u16 - 1;
                acc[1] = _mm512_fmadd_ps(load(i, mask), _mm512_maskz_loadu_ps(mask, xp.add(i)), acc[1]);
            }
            row = _mm512_fmadd_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_set1_ps(scale), row);
        }
        _mm512_reduce_add_ps(row) * FP8_VIA_F16_SCALE
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_row_avx2(q: &[u8], scales: &[f32], block_cols: usize, x: &[f32]) -> f32 {
        let n = q.len().min(x.len());
        let blocks = n.div_ceil(block_cols).min(scales.len());
        let (w, xp) = (q.as_ptr(), x.as_ptr());
        let full = |i: usize| {
            // SAFETY: callers pass `i + 8 <= n`.
            unsafe {
                _mm256_cvtph_ps(f16_bits_128(_mm_cvtepi8_epi16(_mm_loadl_epi64(
                    w.add(i) as *const __m128i
                ))))
            }
        };
        let mut row = _mm256_setzero_ps();
        let mut tail = 0.0f32;
        for (b, &scale) in scales[..blocks].iter().enumerate() {
            let start = b * block_cols;
            let end = (start + block_cols).min(n);
            let mut acc = [_mm256_setzero_ps(); 2];
            let mut i = start;
            while i + 32 <= end {
                for k in 0..4 {
                    acc[k & 1] = _mm256_fmadd_ps(full(i + 8 * k), _mm256_loadu_ps(xp.add(i + 8 * k)), acc[k & 1]);
                }
                i += 32;
            }
            while i + 8 <= end {
                acc[0] = _mm256_fmadd_ps(full(i), _mm256_loadu_ps(xp.add(i)), acc[0]);
                i += 8;
            }
            row = _mm256_fmadd_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_set1_ps(scale), row);
            if i < end {
                tail += super::scalar::dot_fp8(&q[i..end], &x[i..end]) * scale;
            }
        }
        hsum256(row) * FP8_VIA_F16_SCALE + tail
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::{fp8_e4m3_to_f32, FP8_E4M3_TABLE};
    use rand::{Rng, SeedableRng};

    /// Every instruction set against an f64 reference: column counts off every vector width,
    /// partial last blocks, block widths below / not a multiple of the vector width, and a
    /// different scale per block.
    #[test]
    fn fused_rows_match_f64_reference() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for &block_cols in &[1usize, 7, 16, 24, 32, 64, 100, 128] {
            for &cols in &[1usize, 5, 15, 17, 31, 33, 63, 65, 127, 129, 200, 255, 257, 300, 513] {
                let q: Vec<u8> = (0..cols)
                    .map(|_| rng.random_range(0..=0x7e) | (rng.random::<u8>() & 0x80))
                    .collect();
                let x: Vec<f32> = (0..cols).map(|_| rng.random_range(-3.0..3.0)).collect();
                let scales: Vec<f32> = (0..cols.div_ceil(block_cols))
                    .map(|_| rng.random_range(0.001..4.0))
                    .collect();
                let terms =
                    (0..cols).map(|c| fp8_e4m3_to_f32(q[c]) as f64 * scales[c / block_cols] as f64 * x[c] as f64);
                let expected: f64 = terms.clone().sum();
                let magnitude: f64 = terms.map(f64::abs).sum();
                assert_eq!(
                    dot_row_scalar(&q, &scales, block_cols, &x),
                    dot_row(Isa::Scalar, &q, &scales, block_cols, &x)
                );
                for isa in Isa::available() {
                    let got = dot_row(isa, &q, &scales, block_cols, &x) as f64;
                    assert!(
                        (got - expected).abs() <= 1e-5 * (1.0 + magnitude),
                        "{} block {block_cols} cols {cols}: {got} vs {expected}",
                        isa.name()
                    );
                }
            }
        }
    }

    /// Every non-NaN byte decodes exactly as the table, at every position of a row (full vectors,
    /// the 16-wide loop and the masked / scalar tails), with the block's own scale.
    #[test]
    fn every_byte_decodes_exactly_at_every_position() {
        let (cols, block_cols) = (83, 32);
        let scales = [0.5f32, 2.0, 0.125];
        for byte in (0..=255u8).filter(|&b| b & 0x7f != 0x7f) {
            let q = vec![byte; cols];
            for at in 0..cols {
                let mut x = vec![0.0f32; cols];
                x[at] = 1.0;
                let expected = FP8_E4M3_TABLE[byte as usize] * scales[at / block_cols];
                for isa in Isa::available() {
                    let got = dot_row(isa, &q, &scales, block_cols, &x);
                    assert_eq!(got, expected, "{} byte {byte:#04x} at {at}", isa.name());
                }
            }
        }
    }
}

//! Dispatch of the block-quantized formats' dot products to an instruction set.

use super::{dense_dot, Dense, Isa};
#[cfg(target_arch = "x86_64")]
use super::{x86_q32, x86_qk};
use crate::dtype::WeightFormat;
use crate::quant::{self, PreparedActivations, QK_K};

/// `Σ w·x` of stored block-quantized bytes with f32 activations: blocks are decoded a few at a
/// time onto the stack and dotted with the f32 kernel, so the products are the exact ones of
/// the scalar reference.
pub(super) fn dot_f32(isa: Isa, format: WeightFormat, bytes: &[u8], x: &[f32]) -> f32 {
    if isa == Isa::Scalar {
        return quant::dot_f32(format, bytes, x);
    }
    // Up to 1024 values per chunk: whole blocks of every format.
    const CHUNK: usize = 4 * QK_K;
    let (block, block_bytes) = (format.block_size(), format.block_bytes());
    let per_chunk = CHUNK / block;
    let mut decoded = [0.0f32; CHUNK];
    let mut sum = 0.0;
    for (b, xs) in bytes.chunks(per_chunk * block_bytes).zip(x.chunks(CHUNK)) {
        let n = (b.len() / block_bytes * block).min(xs.len());
        quant::dequantize(format, b, &mut decoded[..n]);
        sum += dense_dot(isa, Dense::F32, f32_bytes(&decoded[..n]), &xs[..n]);
    }
    sum
}

pub(super) fn f32_bytes(values: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding or invalid bit patterns as bytes; u8 needs no alignment and the
    // length covers exactly the same memory.
    unsafe { std::slice::from_raw_parts(values.as_ptr() as *const u8, std::mem::size_of_val(values)) }
}

/// `Σ w·x` of stored block-quantized bytes with activations prepared for `format` (the caller
/// checked `prepared.fits`).
pub(super) fn dot_prepared(isa: Isa, format: WeightFormat, bytes: &[u8], x: &PreparedActivations) -> f32 {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni => {
            // SAFETY: `Isa::Avx512Vnni` is only produced by `Isa::available` after detecting
            // avx512f/bw/vl/vnni/vbmi, avx2, fma and f16c; the kernels bound their loads by the
            // slices.
            unsafe {
                match format {
                    WeightFormat::Q8_0 => x86_q32::dot_q8_0_avx512vnni(bytes, x),
                    WeightFormat::Q4_0 => x86_q32::dot_q4_0_avx512vnni(bytes, x),
                    WeightFormat::Q4K => x86_qk::dot_q4_k_avx2(bytes, x),
                    WeightFormat::Q6K => x86_qk::dot_q6_k_avx512vnni(bytes, x),
                    _ => scalar(format, bytes, x),
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => {
            // SAFETY: `Isa::Avx512` is only produced after detecting avx512f/bw/vl, avx2, fma, f16c.
            unsafe {
                match format {
                    WeightFormat::Q8_0 => x86_q32::dot_q8_0_avx512(bytes, x),
                    WeightFormat::Q4_0 => x86_q32::dot_q4_0_avx512(bytes, x),
                    WeightFormat::Q4K => x86_qk::dot_q4_k_avx2(bytes, x),
                    WeightFormat::Q6K => x86_qk::dot_q6_k_avx512(bytes, x),
                    _ => scalar(format, bytes, x),
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => {
            // SAFETY: `Isa::Avx2` is only produced after detecting avx2, fma and f16c.
            unsafe {
                match format {
                    WeightFormat::Q8_0 => x86_q32::dot_q8_0_avx2(bytes, x),
                    WeightFormat::Q4_0 => x86_q32::dot_q4_0_avx2(bytes, x),
                    WeightFormat::Q4K => x86_qk::dot_q4_k_avx2(bytes, x),
                    WeightFormat::Q6K => x86_qk::dot_q6_k_avx2(bytes, x),
                    _ => scalar(format, bytes, x),
                }
            }
        }
        _ => scalar(format, bytes, x),
    }
}

fn scalar(format: WeightFormat, bytes: &[u8], x: &PreparedActivations) -> f32 {
    quant::dot_prepared(format, bytes, x).unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::super::{dot_row_prepared_with, dot_row_with};
    use super::*;
    use crate::weight::{ByteView, WeightMatrix};
    use rand::{Rng, SeedableRng};

    const FORMATS: [WeightFormat; 4] = [
        WeightFormat::Q8_0,
        WeightFormat::Q4_0,
        WeightFormat::Q4K,
        WeightFormat::Q6K,
    ];

    /// Random stored bytes: every bit pattern of the values, scales and mins, with the f16 unit
    /// scales set to moderate values of both signs (a few exactly zero).
    fn random_blocks(format: WeightFormat, n_blocks: usize, rng: &mut rand_chacha::ChaCha8Rng) -> Vec<u8> {
        let mut bytes: Vec<u8> = (0..n_blocks * format.block_bytes()).map(|_| rng.random()).collect();
        let f16_offsets: &[usize] = match format {
            WeightFormat::Q6K => &[208],
            WeightFormat::Q4K => &[0, 2],
            _ => &[0],
        };
        for block in bytes.chunks_exact_mut(format.block_bytes()) {
            for &at in f16_offsets {
                let v = if rng.random_range(0..10) == 0 {
                    0.0
                } else {
                    rng.random_range(-0.05f32..0.05)
                };
                block[at..at + 2].copy_from_slice(&half::f16::from_f32(v).to_bits().to_le_bytes());
            }
        }
        bytes
    }

    fn activations(cols: usize, kind: usize, rng: &mut rand_chacha::ChaCha8Rng) -> Vec<f32> {
        match kind {
            0 => (0..cols).map(|_| rng.random_range(-1.0..1.0)).collect(),
            // Zero blocks next to large ones, and one outlier per 256.
            1 => (0..cols)
                .map(|i| match (i / 32) % 3 {
                    0 => 0.0,
                    _ if i % 256 == 77 => 300.0,
                    _ => rng.random_range(-4.0..4.0),
                })
                .collect(),
            _ => (0..cols).map(|i| if i % 2 == 0 { 127.0 } else { -1e-3 }).collect(),
        }
    }

    /// Every available ISA, both entry points, against f64 sums over the dequantised weights:
    /// - `dot_row` (f32 activations): within 1e-5 · Σ|w·x| (f32 rounding only);
    /// - `dot_row_prepared`: within 1e-5 · Σ|w·x̂| of the f64 dot with the rounded activations
    ///   `x̂` (the integer sums are exact; only the f32 scale products round), and within
    ///   `Σ_blocks d_x/2 · Σ|w|` (+ the same 1e-5) of the exact f64 dot with `x`: each activation
    ///   moves by at most half its block's step `d_x = max|x| / 127`.
    #[test]
    fn every_isa_matches_f64_reference() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        for format in FORMATS {
            let block = format.block_size();
            for &(rows, blocks) in &[(1usize, 1usize), (3, 3), (5, 5), (3, 9)] {
                let cols = blocks * block;
                let values: Vec<f32> = (0..rows * cols)
                    .map(|_| rng.random_range(-1.0f32..1.0).powi(3))
                    .collect();
                for bytes in [
                    crate::quant::quantize(format, &values).unwrap(),
                    random_blocks(format, rows * blocks, &mut rng),
                ] {
                    let w = WeightMatrix::new(rows, cols, format, ByteView::from_vec(bytes)).unwrap();
                    for kind in 0..3 {
                        check_matrix(&w, &activations(cols, kind, &mut rng));
                    }
                }
            }
        }
    }

    fn check_matrix(w: &WeightMatrix, x: &[f32]) {
        let (format, cols) = (w.format(), w.cols());
        let prepared = PreparedActivations::new(format, x);
        assert!(prepared.fits(format, cols));
        let xq = prepared.dequantized();
        let block = match prepared.format() {
            crate::quant::ActivationFormat::Q8K => QK_K,
            _ => crate::quant::QK,
        };
        let mut decoded = vec![0.0f32; cols];
        for row in 0..w.rows() {
            w.dequantize_row(row, &mut decoded);
            let dot = |a: &[f32]| -> (f64, f64) {
                let terms = decoded.iter().zip(a).map(|(&w, &a)| w as f64 * a as f64);
                (terms.clone().sum(), terms.map(f64::abs).sum())
            };
            let ((exact, magnitude), (exact_q, magnitude_q)) = (dot(x), dot(&xq));
            let activation_bound: f64 = decoded
                .chunks(block)
                .zip(&prepared.d)
                .map(|(ws, &d)| d as f64 / 2.0 * ws.iter().map(|w| w.abs() as f64).sum::<f64>())
                .sum();
            for isa in Isa::available() {
                let name = format!("{} {} row {row} cols {cols}", isa.name(), format.name());
                let got = dot_row_with(isa, w, row, x) as f64;
                assert!(
                    (got - exact).abs() <= 1e-5 * magnitude + 1e-30,
                    "{name}: {got} vs {exact}"
                );
                let got = dot_row_prepared_with(isa, w, row, x, &prepared) as f64;
                assert!(
                    (got - exact_q).abs() <= 1e-5 * magnitude_q + 1e-30,
                    "{name} prepared: {got} vs {exact_q}"
                );
                assert!(
                    (got - exact).abs() <= activation_bound + 1e-5 * magnitude + 1e-30,
                    "{name} prepared vs f32 activations: {got} vs {exact} (bound {activation_bound})"
                );
            }
        }
    }

    #[test]
    fn prepared_that_does_not_fit_falls_back_to_f32() {
        let values: Vec<f32> = (0..512).map(|i| (i as f32 * 0.1).sin()).collect();
        let w = WeightMatrix::new(
            2,
            256,
            WeightFormat::Q4K,
            ByteView::from_vec(crate::quant::quantize(WeightFormat::Q4K, &values).unwrap()),
        )
        .unwrap();
        let x: Vec<f32> = (0..256).map(|i| (i as f32 * 0.3).cos()).collect();
        let wrong = PreparedActivations::new(WeightFormat::Q8_0, &x);
        for isa in Isa::available() {
            assert_eq!(
                dot_row_prepared_with(isa, &w, 1, &x, &wrong),
                dot_row_with(isa, &w, 1, &x)
            );
        }
        let dense = WeightMatrix::from_f32(2, 256, &values).unwrap();
        let prepared = PreparedActivations::new(WeightFormat::Q4K, &x);
        assert_eq!(
            dot_row_prepared_with(Isa::Scalar, &dense, 0, &x, &prepared),
            dot_row_with(Isa::Scalar, &dense, 0, &x)
        );
    }

    /// One weight row against 1..=16 prepared rows at once (chunks of the multi-token kernels
    /// where the CPU has them), random stored bytes and the hard activation kinds: within 1e-5 of
    /// the magnitude of the summed terms, of the f64 dot with the rounded activations. For `Q8_0`
    /// those terms are `d_w·(q_w + 128)·x̂` (the kernel takes the `+128` back with `Σx̂`).
    #[test]
    fn multi_row_dots_match_f64() {
        use super::super::dot_row_prepared_multi_with;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        for format in FORMATS {
            let (rows, blocks) = (3usize, 9usize);
            let cols = blocks * format.block_size();
            let bytes = random_blocks(format, rows * blocks, &mut rng);
            let w = WeightMatrix::new(rows, cols, format, ByteView::from_vec(bytes)).unwrap();
            let mut decoded = vec![0.0f32; cols];
            for n in [1usize, 2, 5, 8, 11, 16] {
                let prepared: Vec<PreparedActivations> = (0..n)
                    .map(|k| PreparedActivations::new(format, &activations(cols, k % 3, &mut rng)))
                    .collect();
                for row in 0..rows {
                    w.dequantize_row(row, &mut decoded);
                    let offset: Vec<f64> = (0..cols)
                        .map(|c| {
                            if format != WeightFormat::Q8_0 {
                                return 0.0;
                            }
                            let at = (c / 32) * format.block_bytes();
                            let b = &w.row_bytes(row)[at..at + 2];
                            128.0 * half::f16::from_le_bytes([b[0], b[1]]).to_f64().abs()
                        })
                        .collect();
                    for isa in Isa::available() {
                        let mut out = vec![0.0f32; n];
                        dot_row_prepared_multi_with(isa, &w, row, &prepared, &mut out);
                        for (t, (p, &got)) in prepared.iter().zip(&out).enumerate() {
                            let xq = p.dequantized();
                            let exact: f64 = decoded.iter().zip(&xq).map(|(&w, &x)| w as f64 * x as f64).sum();
                            let magnitude: f64 = (0..cols)
                                .map(|c| ((decoded[c] as f64).abs() + offset[c]) * (xq[c] as f64).abs())
                                .sum();
                            assert!(
                                (got as f64 - exact).abs() <= 1e-5 * magnitude + 1e-30,
                                "{} {} n={n} row {row} t={t}: {got} vs {exact}",
                                isa.name(),
                                format.name()
                            );
                        }
                    }
                }
            }
        }
    }
}

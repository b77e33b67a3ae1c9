//! `x · Wᵀ` over any stored weight format, rows of W split across the thread pool.

use std::cell::RefCell;

use super::dot::{
    dot_row, dot_row_prepared, dot_row_prepared_multi_with, has_multi_kernel, isa, Isa, PreparedActivations,
};
use super::gemm::gemm;
use super::gemm_bf16::{self, gemm_bf16_with};
use super::gemm_fp8::{self, gemm_fp8};
use super::gemm_int8::{self, gemm_int8_with};
use super::gemm_q4k::{self, gemm_q4k};
use super::gemm_q6k::{self, gemm_q6k};
use super::{pool, SharedMut};
use crate::backend::MatmulPrecision;
use crate::dtype::WeightFormat;
use crate::weight::WeightMatrix;

/// Below this many multiply-adds the pool costs more than it saves.
const PARALLEL_MIN_WORK: usize = 1 << 15;
/// From this many tokens on, decoding float weights once into f32 panels (or packing BF16 ones
/// for the BF16 GEMM each call) beats fused dot products.
const GEMM_MIN_TOKENS: usize = 4;
/// The same for block-quantised weights without the integer GEMM: decoding them to f32 costs more
/// per step than the panels save until the batch is large (measured on Zen 4: 8 Q4_K sequences
/// decoded at 0.44× one sequence's rate through the panels, 1.3× through the integer dots; at 64
/// prompt tokens the panels win for Q8_0 by ~25%).
const GEMM_MIN_TOKENS_QUANTIZED: usize = 32;

/// How one matmul runs.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Path {
    /// Fused dot products, one token at a time, over the stored rows.
    Dots,
    /// The multi-token integer dots: each stored weight block decoded once for all tokens.
    Multi,
    /// A GEMM over packed panels: the one [`gemm_for`] names.
    Gemm(Gemm),
}

/// The GEMM a matrix goes through when its path is [`Path::Gemm`]; with kept panels, the one
/// whose panels [`prepare`] builds.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Gemm {
    /// `gemm_fp8` (kept panels only).
    Fp8,
    /// `gemm_q4k` (kept panels only).
    Q4k,
    /// `gemm_q6k` (kept panels only).
    Q6k,
    Int8,
    Bf16,
    /// The f32 panels of `gemm.rs`: every other format, and CPUs without the instructions above.
    F32Panels,
}

fn gemm_for(w: &WeightMatrix, isa: Isa, repack: bool) -> Gemm {
    let format = w.format();
    if repack && gemm_fp8::supports(isa, w) {
        Gemm::Fp8
    } else if repack && format == WeightFormat::Q4K && gemm_q4k::available(isa) {
        Gemm::Q4k
    } else if repack && format == WeightFormat::Q6K && gemm_q6k::available(isa) {
        Gemm::Q6k
    } else if gemm_int8::supports(w) && gemm_int8::available(isa) {
        Gemm::Int8
    } else if format == WeightFormat::Bf16 && gemm_bf16::available(isa) {
        Gemm::Bf16
    } else {
        Gemm::F32Panels
    }
}

/// The fastest path for `n` tokens of `w` on `isa`, where `repack` says whether the GEMMs keep
/// their panels (see [`super::weight_repacking`]). Measured on Zen 4 (2 threads,
/// R1-Distill-Qwen-1.5B, `r1serve bench --batch N`, aggregate tokens/s):
/// - kept panels: FP8 blocks through their GEMM from one token (tg on a 3-layer R1 cut: see
///   docs/performance.md); BF16 through the GEMM from one token (tg 9.95 vs 7.21 through the dots: the
///   panel streams reach 0.91 of the read bandwidth, the row dots 0.69; 2 tokens 19.4 vs 10.0);
///   `Q8_0` through the integer GEMM from one token (1: 16.10–16.59 vs 15.28–16.53 through the
///   row dots, alternated, with the panels' scales kept as the stored f16 so they read no more
///   bytes than the rows; 2: 31.6 vs 24.7 multi, 4: 55.6 vs 33.6, 8: 89.5 vs 44);
///   Q4_K_M (`Q4_K` through `gemm_q4k`'s nibble panels, `Q6_K` through the integer GEMM) from 2
///   tokens (2: 37.1–38.6 vs 33.3–35.7 with `Q4_K` through the multi dots; 8: 86–87); `Q4_K`
///   from 1 token too, through the panels' one-token kernel (8960×1536 from DRAM on 2 threads:
///   25.0–32.4 GB/s vs 22.5–25.5 for the row dots; from L3 65–67 vs 23–29; Q4_K_M tg
///   26.1–27.5 vs 25.4–26.3, alternated); `Q6_K` through `gemm_q6k`'s six-bit panels from 2
///   tokens (one thread, 8960×1536 from L3: 8 tokens 293 vs 258 GFLOP/s for the integer GEMM's
///   int8 panels, 64 tokens 285 vs 268) and from 1 token through the panels' one-token kernel
///   (2 threads, 8960×1536 from L3: 91–122 GB/s vs 43–57 for the row dots; from DRAM alike,
///   25–33 GB/s, the 1536×8960 down projection's 25–32 vs 30–39; Q4_K_M tg 91–95% of the
///   roofline vs 88–93% in alternated pairs where the probe read 33–35 GB/s);
/// - panels packed per call: the packing is what small batches pay for — one thread, 8960×1536:
///   at 4 tokens 45 vs 62 GFLOP/s for the dots, at 8 tokens 75–83 vs 57–64; the multi dots
///   `Q8_0` 82–92 GFLOP/s at 4–5 tokens vs 60–101, 58–87 vs 74–134 at 8; `Q4_K` 96–109 vs
///   79–109 at 8, 101–117 vs 112–126 at 10.
fn choose_path(w: &WeightMatrix, isa: Isa, n: usize, repack: bool) -> Path {
    let (format, cols) = (w.format(), w.cols());
    let multi_max = match (format, repack) {
        (WeightFormat::Q8_0, false) => 5,
        (WeightFormat::Q4K, false) => 8,
        _ => 0,
    };
    if (2..=multi_max).contains(&n) && has_multi_kernel(isa, format) && cols.is_multiple_of(format.block_size()) {
        return Path::Multi;
    }
    let gemm = gemm_for(w, isa, repack);
    let gemm_min = match gemm {
        Gemm::Fp8 | Gemm::Q4k | Gemm::Q6k => 1,
        Gemm::Int8 if repack && format == WeightFormat::Q8_0 => 1,
        Gemm::Int8 if repack => 2,
        Gemm::Int8 => 6,
        Gemm::Bf16 if repack => 1,
        _ if format.is_block_quantized() => GEMM_MIN_TOKENS_QUANTIZED,
        _ => GEMM_MIN_TOKENS,
    };
    if n >= gemm_min {
        Path::Gemm(gemm)
    } else {
        Path::Dots
    }
}

thread_local! {
    /// Activation rows quantised for integer dot products, reused across calls on this thread.
    static PREPARED: RefCell<Vec<PreparedActivations>> = const { RefCell::new(Vec::new()) };
    /// Activations rounded to BF16 for the paths that multiply in f32, reused likewise.
    static ROUNDED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on `x` rounded to BF16 (to nearest even), kept in f32: what the kernels that
/// multiply in f32 take where BF16 activations were asked for.
pub(crate) fn with_bf16_rounded<R>(x: &[f32], f: impl FnOnce(&[f32]) -> R) -> R {
    ROUNDED.with_borrow_mut(|rounded| {
        rounded.clear();
        rounded.extend(x.iter().map(|&v| half::bf16::from_f32(v).to_f32()));
        f(rounded)
    })
}

/// Builds the panels `matmul` keeps for `w` (see [`super::weight_repacking`]) for the GEMM a
/// batch of tokens takes, if any.
pub(crate) fn prepare(w: &WeightMatrix) {
    if !super::weight_repacking() {
        return;
    }
    let isa = isa();
    match gemm_for(w, isa, true) {
        Gemm::Fp8 => gemm_fp8::prepare(isa, w),
        Gemm::Q4k => gemm_q4k::prepare(w),
        Gemm::Q6k => gemm_q6k::prepare(w),
        Gemm::Int8 => gemm_int8::prepare(isa, w),
        Gemm::Bf16 => gemm_bf16::prepare(isa, w),
        Gemm::F32Panels => {}
    }
}

/// `out[n, rows] = x[n, cols] · wᵀ`; each weight row is visited once for the whole batch.
/// BF16 and FP8 weights meet activations as `precision` says, on every path.
pub fn matmul(x: &[f32], w: &WeightMatrix, out: &mut [f32], precision: MatmulPrecision) {
    matmul_with(x, w, out, precision, super::weight_repacking())
}

/// [`matmul`], with the GEMMs keeping their packed panels or not as `repack` says.
fn matmul_with(x: &[f32], w: &WeightMatrix, out: &mut [f32], precision: MatmulPrecision, repack: bool) {
    let (rows, cols) = (w.rows(), w.cols());
    if cols == 0 {
        out.fill(0.0);
        return;
    }
    let n = x.len() / cols;
    assert_eq!(out.len(), n * rows, "matmul output must be [n, rows]");
    let isa = isa();
    let mut path = choose_path(w, isa, n, repack);
    if matches!(path, Path::Gemm(_)) && rows * cols * n < PARALLEL_MIN_WORK {
        path = Path::Dots;
    }
    let bf16 = precision == MatmulPrecision::Bf16
        && matches!(w.format(), WeightFormat::Bf16 | WeightFormat::F8E4M3Block { .. });
    let multiplies_bf16 =
        path == Path::Gemm(Gemm::Bf16) || (path == Path::Gemm(Gemm::Fp8) && gemm_fp8::bf16_available(isa));
    if bf16 && !multiplies_bf16 {
        // The paths that multiply in f32 take the rounded values: BF16 × BF16 (or FP8) products
        // are exact in f32, so they sum the very products the BF16 instructions do.
        return with_bf16_rounded(x, |rounded| run(path, rounded, w, out, false, repack));
    }
    run(path, x, w, out, bf16, repack)
}

/// The matmul along `path`; `bf16` tells the BF16 and FP8 GEMMs to round the activations.
fn run(path: Path, x: &[f32], w: &WeightMatrix, out: &mut [f32], bf16: bool, repack: bool) {
    let (rows, cols) = (w.rows(), w.cols());
    let n = x.len() / cols;
    let isa = isa();
    let format = w.format();
    if let Path::Gemm(gemm_path) = path {
        match gemm_path {
            Gemm::Fp8 => gemm_fp8(isa, bf16, x, w, out),
            Gemm::Q4k => gemm_q4k(isa, x, w, out),
            Gemm::Q6k => gemm_q6k(isa, x, w, out),
            Gemm::Int8 => gemm_int8_with(isa, repack, x, w, out),
            Gemm::Bf16 => gemm_bf16_with(isa, bf16, repack, x, w, out),
            Gemm::F32Panels => gemm(x, w, out),
        }
        return;
    }
    let multi = path == Path::Multi;
    PREPARED.with_borrow_mut(|prepared| {
        // Quantised formats take their activations in 8-bit blocks, prepared once per token here
        // rather than once per weight row.
        if format.is_block_quantized() {
            if prepared.len() < n {
                prepared.resize_with(n, PreparedActivations::default);
            }
            for (t, p) in prepared.iter_mut().take(n).enumerate() {
                p.prepare(format, &x[t * cols..(t + 1) * cols]);
            }
        }
        let prepared: &[PreparedActivations] = if format.is_block_quantized() {
            &prepared[..n]
        } else {
            &[]
        };
        let row_task = |row: usize, dst: SharedMut| {
            if multi {
                let mut values = [0.0f32; 16];
                let values = &mut values[..n];
                dot_row_prepared_multi_with(isa, w, row, prepared, values);
                for (t, &value) in values.iter().enumerate() {
                    // SAFETY: `t * rows + row < n * rows == out.len()`, and row `row` belongs to one task.
                    unsafe { dst.write(t * rows + row, value) };
                }
                return;
            }
            for t in 0..n {
                let xt = &x[t * cols..(t + 1) * cols];
                let value = match prepared.get(t) {
                    Some(p) => dot_row_prepared(w, row, xt, p),
                    None => dot_row(w, row, xt),
                };
                // SAFETY: `t * rows + row < n * rows == out.len()`, and row `row` belongs to one task.
                unsafe { dst.write(t * rows + row, value) };
            }
        };
        let dst = SharedMut::new(out);
        if rows * cols * n < PARALLEL_MIN_WORK {
            (0..rows).for_each(|row| row_task(row, dst));
        } else {
            let chunk = (rows / (pool::threads() * 8)).max(4);
            pool::for_each(rows.div_ceil(chunk), |c| {
                for row in c * chunk..((c + 1) * chunk).min(rows) {
                    row_task(row, dst);
                }
            });
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weight::ByteView;
    use rand::{Rng, SeedableRng};

    /// `(Σ x·w, Σ|x·w|)` per output.
    fn reference(x: &[f32], w: &[f64], rows: usize, cols: usize) -> Vec<(f64, f64)> {
        let n = x.len() / cols;
        let mut out = vec![(0.0, 0.0); n * rows];
        for t in 0..n {
            for r in 0..rows {
                let terms = (0..cols).map(|c| x[t * cols + c] as f64 * w[r * cols + c]);
                out[t * rows + r] = terms.fold((0.0, 0.0), |(s, m), v| (s + v, m + v.abs()));
            }
        }
        out
    }

    /// Within `1e-4 · (1 + |exact|)` of the f64 product, under both precisions; with
    /// [`MatmulPrecision::Bf16`] BF16 and FP8 weights are held against the product with the
    /// activations rounded to BF16 (on every path: dots, f32 panels, BF16 and FP8 GEMMs).
    fn check(w: &WeightMatrix, decoded: &[f64], n: usize, seed: u64) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let x: Vec<f32> = (0..n * w.cols()).map(|_| rng.random_range(-1.0..1.0)).collect();
        let rounded: Vec<f32> = x.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect();
        for precision in [MatmulPrecision::F32, MatmulPrecision::Bf16] {
            let mut out = vec![0.0f32; n * w.rows()];
            matmul(&x, w, &mut out, precision);
            let seen = match precision {
                MatmulPrecision::Bf16
                    if matches!(w.format(), WeightFormat::Bf16 | WeightFormat::F8E4M3Block { .. }) =>
                {
                    &rounded
                }
                _ => &x,
            };
            let expected = reference(seen, decoded, w.rows(), w.cols());
            for (a, &(b, _)) in out.iter().zip(&expected) {
                assert!(
                    (*a as f64 - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "{:?} {precision:?} n={n}: {a} vs {b}",
                    w.format()
                );
            }
        }
    }

    #[test]
    fn all_formats_against_f64() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        // Odd sizes; enough work for the parallel path; 3 tokens (dot products) and 5, 9 (gemm).
        for &(rows, cols, n) in &[(7usize, 13usize, 3usize), (301, 131, 2), (37, 261, 5), (70, 300, 9)] {
            let vals: Vec<f32> = (0..rows * cols).map(|_| rng.random_range(-2.0..2.0)).collect();
            let w = WeightMatrix::from_f32(rows, cols, &vals).unwrap();
            check(&w, &vals.iter().map(|&v| v as f64).collect::<Vec<_>>(), n, 1);

            let bf: Vec<u16> = vals.iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect();
            let bytes = bf.iter().flat_map(|b| b.to_le_bytes()).collect();
            let w = WeightMatrix::new(rows, cols, WeightFormat::Bf16, ByteView::from_vec(bytes)).unwrap();
            check(
                &w,
                &bf.iter()
                    .map(|&b| half::bf16::from_bits(b).to_f64())
                    .collect::<Vec<_>>(),
                n,
                2,
            );

            let hf: Vec<u16> = vals.iter().map(|&v| half::f16::from_f32(v).to_bits()).collect();
            let bytes = hf.iter().flat_map(|b| b.to_le_bytes()).collect();
            let w = WeightMatrix::new(rows, cols, WeightFormat::F16, ByteView::from_vec(bytes)).unwrap();
            check(
                &w,
                &hf.iter().map(|&b| half::f16::from_bits(b).to_f64()).collect::<Vec<_>>(),
                n,
                3,
            );

            // FP8 with 4x5 blocks: partial blocks at both edges.
            let (br, bc) = (4, 5);
            let q: Vec<u8> = (0..rows * cols)
                .map(|_| rng.random_range(0..=0x7e) | (rng.random::<u8>() & 0x80))
                .collect();
            let scales: Vec<f32> = (0..rows.div_ceil(br) * cols.div_ceil(bc))
                .map(|_| rng.random_range(0.01..2.0))
                .collect();
            let decoded: Vec<f64> = (0..rows * cols)
                .map(|i| {
                    let (r, c) = (i / cols, i % cols);
                    crate::dtype::fp8_e4m3_to_f32(q[i]) as f64 * scales[(r / br) * cols.div_ceil(bc) + c / bc] as f64
                })
                .collect();
            let w = WeightMatrix::new_fp8_block(rows, cols, br, bc, ByteView::from_vec(q), scales).unwrap();
            check(&w, &decoded, n, 4);
            let mut row = vec![0.0; cols];
            w.dequantize_row(rows - 1, &mut row);
            for (a, b) in row.iter().zip(&decoded[(rows - 1) * cols..]) {
                assert!((*a as f64 - b).abs() <= 1e-6 * b.abs());
            }
        }
    }

    /// Quantised formats with 2 tokens (prepared 8-bit activations), 6 and 33 (the integer GEMM
    /// with VNNI; otherwise 6 takes the integer dots and 33 the f32 panels). Activations rounded
    /// to 8 bits move each product by at most half a step, so the tolerance is relative to
    /// Σ|w·x|.
    #[test]
    fn quantized_formats_against_f64() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(21);
        let (rows, cols) = (67, 512);
        let vals: Vec<f32> = (0..rows * cols).map(|_| rng.random_range(-1.0..1.0)).collect();
        for format in [
            WeightFormat::Q8_0,
            WeightFormat::Q4_0,
            WeightFormat::Q4K,
            WeightFormat::Q6K,
        ] {
            let bytes = crate::quant::quantize(format, &vals).unwrap();
            let w = WeightMatrix::new(rows, cols, format, ByteView::from_vec(bytes)).unwrap();
            let decoded: Vec<f64> = w.to_f32().iter().map(|&v| v as f64).collect();
            for n in [2usize, 6, 33] {
                let x: Vec<f32> = (0..n * cols).map(|_| rng.random_range(-1.0..1.0)).collect();
                let mut out = vec![0.0f32; n * rows];
                matmul(&x, &w, &mut out, MatmulPrecision::F32);
                for t in 0..n {
                    for r in 0..rows {
                        let terms = (0..cols).map(|c| decoded[r * cols + c] * x[t * cols + c] as f64);
                        let (exact, magnitude) = terms.fold((0.0, 0.0), |(s, m), v| (s + v, m + v.abs()));
                        let got = out[t * rows + r] as f64;
                        assert!(
                            (got - exact).abs() <= 1e-2 * magnitude,
                            "{format:?} n={n}: {got} vs {exact}"
                        );
                    }
                }
            }
        }
    }

    /// 2..=16 tokens of every quantised format, odd row counts and block counts that leave
    /// `Q8_0` blocks over after the unrolled loop, panels kept or not (the multi-token kernels
    /// where the CPU has them and the path picks them):
    /// within 1e-5 of the magnitude of the terms the kernel sums, of the f64 dot with the rounded
    /// activations `x̂` (the integer sums are exact; only f32 scale products round). For `Q8_0`
    /// those terms are `d_w·(q_w + 128)·x̂` (the `+128` taken back with `Σx̂`), else `|w·x̂|`. And
    /// within 1e-2 · Σ|w·x| of the exact dot, as in `quantized_formats_against_f64` (the only rule
    /// where the integer GEMM runs).
    #[test]
    fn small_batches_against_f64() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(33);
        for format in [
            WeightFormat::Q8_0,
            WeightFormat::Q4K,
            WeightFormat::Q4_0,
            WeightFormat::Q6K,
        ] {
            for &(rows, blocks) in &[(1usize, 1usize), (7, 3), (13, 9), (301, 5)] {
                let cols = blocks * format.block_size();
                let vals: Vec<f32> = (0..rows * cols)
                    .map(|_| rng.random_range(-1.0f32..1.0).powi(3))
                    .collect();
                let bytes = crate::quant::quantize(format, &vals).unwrap();
                let w = WeightMatrix::new(rows, cols, format, ByteView::from_vec(bytes)).unwrap();
                let decoded: Vec<f64> = w.to_f32().iter().map(|&v| v as f64).collect();
                // |d_w| of each value's block (Q8_0), for the offset terms.
                let block_scale: Vec<f64> = (0..rows * cols)
                    .map(|i| {
                        if format != WeightFormat::Q8_0 {
                            return 0.0;
                        }
                        let (r, c) = (i / cols, i % cols);
                        let at = (c / 32) * format.block_bytes();
                        let b = &w.row_bytes(r)[at..at + 2];
                        half::f16::from_le_bytes([b[0], b[1]]).to_f64().abs()
                    })
                    .collect();
                for (n, repack) in (2..=16).flat_map(|n| [(n, false), (n, true)]) {
                    let x: Vec<f32> = (0..n * cols).map(|_| rng.random_range(-1.0..1.0)).collect();
                    let mut out = vec![0.0f32; n * rows];
                    matmul_with(&x, &w, &mut out, MatmulPrecision::F32, repack);
                    // The integer GEMM rounds activations its own way: only the 1e-2 rule.
                    let gemm = matches!(choose_path(&w, isa(), n, repack), Path::Gemm(Gemm::Int8 | Gemm::Q4k));
                    for t in 0..n {
                        let xt = &x[t * cols..(t + 1) * cols];
                        let xq = PreparedActivations::new(format, xt).dequantized();
                        for r in 0..rows {
                            let (mut exact, mut magnitude, mut exact_q, mut magnitude_q) = (0.0, 0.0, 0.0, 0.0);
                            for c in 0..cols {
                                let (wv, s) = (decoded[r * cols + c], block_scale[r * cols + c]);
                                exact += wv * xt[c] as f64;
                                magnitude += (wv * xt[c] as f64).abs();
                                exact_q += wv * xq[c] as f64;
                                magnitude_q += ((wv.abs() + 128.0 * s) * xq[c] as f64).abs();
                            }
                            let got = out[t * rows + r] as f64;
                            let name = format!("{format:?} n={n} repack={repack} rows={rows} cols={cols} t={t} r={r}");
                            assert!(
                                gemm || (got - exact_q).abs() <= 1e-5 * magnitude_q + 1e-30,
                                "{name}: {got} vs {exact_q}"
                            );
                            assert!((got - exact).abs() <= 1e-2 * magnitude, "{name}: {got} vs {exact}");
                        }
                    }
                }
            }
        }
    }
}

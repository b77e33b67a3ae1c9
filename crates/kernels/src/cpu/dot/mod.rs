//! Dot products of one stored weight row with an f32 vector: the inner loop of every matmul.
//!
//! The instruction set is picked once at run time (AVX-512, AVX2+FMA+F16C, or scalar); all x86
//! code sits behind `cfg(target_arch = "x86_64")` so other targets build on the scalar path.
//! Activations stay f32: weights are widened to f32 in registers, so every path computes the
//! same products as the scalar reference, only summed in a different order.
//!
//! Block-quantized weights (`Q8_0`, `Q4_0`, `Q4_K`, `Q6_K`) have two entry points:
//! [`dot_row`] (f32 activations; blocks decoded onto the stack, exact products) and
//! [`dot_row_prepared`] (activations rounded once per row to 8-bit blocks by
//! [`PreparedActivations`], then integer dot products — the fast path a matmul uses).

mod fp8;
mod quant;
mod scalar;
#[cfg(target_arch = "x86_64")]
mod x86;
#[cfg(target_arch = "x86_64")]
mod x86_multi;
#[cfg(target_arch = "x86_64")]
mod x86_q32;
#[cfg(target_arch = "x86_64")]
mod x86_qk;
#[cfg(target_arch = "x86_64")]
pub(crate) use x86_qk::q6_k_half_avx512;

use std::sync::OnceLock;

use crate::dtype::WeightFormat;
pub use crate::quant::PreparedActivations;
use crate::weight::WeightMatrix;

/// Instruction sets the CPU kernels are written for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Scalar,
    /// AVX2 with FMA and F16C.
    Avx2,
    /// AVX-512 F/BW/VL (plus the AVX2 set).
    Avx512,
    /// [`Isa::Avx512`] plus AVX512-VNNI (`vpdpbusd`) and AVX512-VBMI (byte permutes) for the
    /// quantized formats' integer dots: Ice Lake, Zen 4 and later.
    Avx512Vnni,
}

impl Isa {
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Avx512Vnni => "avx512vnni",
        }
    }

    /// Every instruction set this CPU can run, best first.
    pub fn available() -> Vec<Isa> {
        let mut out = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 =
                is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c");
            if avx2
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
            {
                if is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vbmi") {
                    out.push(Isa::Avx512Vnni);
                }
                out.push(Isa::Avx512);
            }
            if avx2 {
                out.push(Isa::Avx2);
            }
        }
        out.push(Isa::Scalar);
        out
    }
}

/// The instruction set in use: the best available, or `R1SERVE_ISA=scalar|avx2|avx512|avx512vnni` if that is
/// available (for comparisons and tests).
pub fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        let available = Isa::available();
        let requested = std::env::var("R1SERVE_ISA").ok();
        requested
            .and_then(|name| available.iter().copied().find(|isa| isa.name() == name))
            .unwrap_or(available[0])
    })
}

/// `w[row] · x` with the process-wide instruction set.
#[inline]
pub fn dot_row(w: &WeightMatrix, row: usize, x: &[f32]) -> f32 {
    dot_row_with(isa(), w, row, x)
}

/// `w[row] · x` with a given instruction set, which must be one of [`Isa::available`].
#[inline]
pub fn dot_row_with(isa: Isa, w: &WeightMatrix, row: usize, x: &[f32]) -> f32 {
    debug_assert_eq!(x.len(), w.cols());
    let bytes = w.row_bytes(row);
    match w.format() {
        WeightFormat::F8E4M3Block { block_cols, .. } => {
            fp8::dot_row(isa, bytes, w.row_block_scales(row), block_cols, x)
        }
        WeightFormat::F32 => dense_dot(isa, Dense::F32, bytes, x),
        WeightFormat::Bf16 => dense_dot(isa, Dense::Bf16, bytes, x),
        WeightFormat::F16 => dense_dot(isa, Dense::F16, bytes, x),
        format @ (WeightFormat::Q8_0 | WeightFormat::Q4_0 | WeightFormat::Q4K | WeightFormat::Q6K) => {
            quant::dot_f32(isa, format, bytes, x)
        }
    }
}

/// `w[row] · x` with the process-wide instruction set, where `prepared` is `x` prepared for
/// `w.format()` (once per activation row, shared by all weight rows): for the block-quantized
/// formats an integer dot product over the 8-bit activations; for the others (or when `prepared`
/// does not fit `w`) exactly [`dot_row`] over `x`.
#[inline]
pub fn dot_row_prepared(w: &WeightMatrix, row: usize, x: &[f32], prepared: &PreparedActivations) -> f32 {
    dot_row_prepared_with(isa(), w, row, x, prepared)
}

/// [`dot_row_prepared`] with a given instruction set, which must be one of [`Isa::available`].
#[inline]
pub fn dot_row_prepared_with(isa: Isa, w: &WeightMatrix, row: usize, x: &[f32], prepared: &PreparedActivations) -> f32 {
    let format = w.format();
    if format.is_block_quantized() && prepared.fits(format, w.cols()) {
        quant::dot_prepared(isa, format, w.row_bytes(row), prepared)
    } else {
        dot_row_with(isa, w, row, x)
    }
}

/// Whether [`dot_row_prepared_multi_with`] has a kernel for `format` weights under `isa`: one
/// weight row against several prepared activation rows, each block decoded once for all of them.
#[inline]
pub fn has_multi_kernel(isa: Isa, format: WeightFormat) -> bool {
    cfg!(target_arch = "x86_64") && isa == Isa::Avx512Vnni && matches!(format, WeightFormat::Q8_0 | WeightFormat::Q4K)
}

/// `out[t] = w[row] · x_t` for every prepared activation row `prepared[t]`, each fitting `w`
/// (see [`PreparedActivations::fits`]), where [`has_multi_kernel`] holds for `isa`, which must be
/// one of [`Isa::available`]. Otherwise per-row dot products over the prepared activations.
pub fn dot_row_prepared_multi_with(
    isa: Isa,
    w: &WeightMatrix,
    row: usize,
    prepared: &[PreparedActivations],
    out: &mut [f32],
) {
    let (format, cols) = (w.format(), w.cols());
    assert_eq!(out.len(), prepared.len(), "one output per activation row");
    let bytes = w.row_bytes(row);
    #[cfg(target_arch = "x86_64")]
    if has_multi_kernel(isa, format) && prepared.iter().all(|p| p.fits(format, cols)) {
        for (xs, out) in prepared
            .chunks(x86_multi::MAX_TOKENS)
            .zip(out.chunks_mut(x86_multi::MAX_TOKENS))
        {
            // SAFETY: `has_multi_kernel` admits only `Isa::Avx512Vnni`, produced by
            // `Isa::available` after detecting avx512f/bw/vl/vnni, avx2, fma and f16c; the
            // kernels bound their loads by the slices; chunks hold 1..=MAX_TOKENS rows.
            unsafe {
                match format {
                    WeightFormat::Q8_0 => x86_multi::dot_q8_0_multi_avx512vnni(bytes, xs, out),
                    _ => x86_multi::dot_q4_k_multi_avx512vnni(bytes, xs, out),
                }
            }
        }
        return;
    }
    for (p, o) in prepared.iter().zip(out.iter_mut()) {
        assert!(p.fits(format, cols), "activations prepared for other weights");
        *o = quant::dot_prepared(isa, format, bytes, p);
    }
}

#[derive(Clone, Copy)]
enum Dense {
    F32,
    Bf16,
    F16,
}

#[inline]
fn dense_dot(isa: Isa, kind: Dense, bytes: &[u8], x: &[f32]) -> f32 {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Avx512Vnni => {
            // SAFETY: `Isa::Avx512` / `Avx512Vnni` are only produced by `Isa::available` after
            // detecting avx512f/bw/vl, avx2, fma and f16c; slices are bounds-checked inside.
            unsafe {
                match kind {
                    Dense::F32 => x86::dot_f32_avx512(bytes, x),
                    Dense::Bf16 => x86::dot_bf16_avx512(bytes, x),
                    Dense::F16 => x86::dot_f16_avx512(bytes, x),
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => {
            // SAFETY: `Isa::Avx2` is only produced after detecting avx2, fma and f16c.
            unsafe {
                match kind {
                    Dense::F32 => x86::dot_f32_avx2(bytes, x),
                    Dense::Bf16 => x86::dot_bf16_avx2(bytes, x),
                    Dense::F16 => x86::dot_f16_avx2(bytes, x),
                }
            }
        }
        _ => match kind {
            Dense::F32 => scalar::dot_f32(bytes, x),
            Dense::Bf16 => scalar::dot_bf16(bytes, x),
            Dense::F16 => scalar::dot_f16(bytes, x),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::fp8_e4m3_to_f32;
    use crate::weight::ByteView;
    use rand::{Rng, SeedableRng};

    /// Checks every available instruction set against an f64 reference over odd lengths.
    #[test]
    fn every_isa_matches_f64_reference() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(42);
        for &cols in &[1usize, 7, 16, 33, 64, 129, 300] {
            let vals: Vec<f32> = (0..2 * cols).map(|_| rng.random_range(-2.0..2.0)).collect();
            let x: Vec<f32> = (0..cols).map(|_| rng.random_range(-1.0..1.0)).collect();
            let bf: Vec<u16> = vals.iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect();
            let hf: Vec<u16> = vals.iter().map(|&v| half::f16::from_f32(v).to_bits()).collect();
            // Every FP8 byte pattern except NaN, with both signs.
            let q: Vec<u8> = (0..2 * cols)
                .map(|_| rng.random_range(0..=0x7e) | (rng.random::<u8>() & 0x80))
                .collect();
            let (br, bc) = (1, 32);
            let scales: Vec<f32> = (0..2 * cols.div_ceil(bc))
                .map(|_| rng.random_range(0.01..2.0))
                .collect();

            let le = |v: &[u16]| v.iter().flat_map(|b| b.to_le_bytes()).collect::<Vec<u8>>();
            let cases: Vec<(WeightMatrix, Vec<f64>)> = vec![
                (
                    WeightMatrix::from_f32(2, cols, &vals).unwrap(),
                    vals.iter().map(|&v| v as f64).collect(),
                ),
                (
                    WeightMatrix::new(2, cols, WeightFormat::Bf16, ByteView::from_vec(le(&bf))).unwrap(),
                    bf.iter().map(|&b| half::bf16::from_bits(b).to_f64()).collect(),
                ),
                (
                    WeightMatrix::new(2, cols, WeightFormat::F16, ByteView::from_vec(le(&hf))).unwrap(),
                    hf.iter().map(|&b| half::f16::from_bits(b).to_f64()).collect(),
                ),
                (
                    WeightMatrix::new_fp8_block(2, cols, br, bc, ByteView::from_vec(q.clone()), scales.clone())
                        .unwrap(),
                    (0..2 * cols)
                        .map(|i| {
                            let (r, c) = (i / cols, i % cols);
                            fp8_e4m3_to_f32(q[i]) as f64 * scales[r * cols.div_ceil(bc) + c / bc] as f64
                        })
                        .collect(),
                ),
            ];
            for (w, decoded) in &cases {
                for row in 0..2 {
                    let expected: f64 = (0..cols).map(|c| decoded[row * cols + c] * x[c] as f64).sum();
                    let magnitude: f64 = (0..cols).map(|c| (decoded[row * cols + c] * x[c] as f64).abs()).sum();
                    for isa in Isa::available() {
                        let got = dot_row_with(isa, w, row, &x) as f64;
                        assert!(
                            (got - expected).abs() <= 1e-5 * (1.0 + magnitude),
                            "{} {:?} cols {cols}: {got} vs {expected}",
                            isa.name(),
                            w.format()
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn scalar_is_always_available() {
        assert_eq!(*Isa::available().last().unwrap(), Isa::Scalar);
        assert!(Isa::available().contains(&isa()));
    }
}

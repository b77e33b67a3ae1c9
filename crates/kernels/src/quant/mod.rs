//! Block-quantized weight formats, byte-compatible with GGUF files (ggml's `Q8_0`, `Q4_0`, `Q4_K`,
//! `Q6_K`), and FP8 E4M3 blocks as DeepSeek-V3 scales them (`fp8`): block layouts, decoders, quantizers from f32, scalar reference dot products, and the
//! 8-bit activations the integer dot products consume.
//!
//! Weights stay in these bytes in memory. A matmul converts each activation row once with
//! [`PreparedActivations::prepare`] and then calls `cpu::dot::dot_row_prepared` per weight row;
//! `cpu::dot::dot_row` also accepts these formats with f32 activations (slower, no activation
//! rounding).
//!
//! Every block starts or ends with f16 scales; all multi-byte fields are little-endian.

mod activations;
pub mod fp8;
pub mod q4_0;
pub mod q4_k;
pub mod q6_k;
pub mod q8_0;

pub(crate) use activations::round_block;
pub use activations::{ActivationFormat, PreparedActivations};

use crate::dtype::{f16_to_f32, WeightFormat};
use crate::weight::WeightError;

/// Values per block of `Q8_0` / `Q4_0` (and of the `Q8_0` activations).
pub const QK: usize = 32;
/// Values per super-block of the K-quants (and of the `Q8_K` activations).
pub const QK_K: usize = 256;

/// The f16 at `bytes[at..at + 2]`, widened.
#[inline(always)]
pub(crate) fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([bytes[at], bytes[at + 1]]))
}

/// `v` rounded to f16 (nearest, ties to even; overflow saturates to ±65504 so a block never
/// stores an infinite scale), as bits.
#[inline]
pub(crate) fn f16_bits(v: f32) -> u16 {
    half::f16::from_f32(v.clamp(-65504.0, 65504.0)).to_bits()
}

/// Non-negative `v` rounded up to f16 (so a scale unit never becomes too small for the largest
/// scale it must express), as bits; saturates at 65504.
#[inline]
pub(crate) fn f16_bits_up(v: f32) -> u16 {
    let bits = f16_bits(v);
    if f16_to_f32(bits) < v && bits < 0x7bff {
        bits + 1
    } else {
        bits
    }
}

/// Decodes whole blocks of `format` from `bytes` into `out` (as many as both hold). Values are
/// computed exactly as ggml / the `gguf` package compute them in f32, so results are bit-equal.
/// Element formats are not handled here (nothing is written).
pub fn dequantize(format: WeightFormat, bytes: &[u8], out: &mut [f32]) {
    match format {
        WeightFormat::Q8_0 => q8_0::dequantize(bytes, out),
        WeightFormat::Q4_0 => q4_0::dequantize(bytes, out),
        WeightFormat::Q4K => q4_k::dequantize(bytes, out),
        WeightFormat::Q6K => q6_k::dequantize(bytes, out),
        WeightFormat::F32 | WeightFormat::Bf16 | WeightFormat::F16 | WeightFormat::F8E4M3Block { .. } => {}
    }
}

/// Quantizes `values` (any number of rows laid end to end) into `format`'s blocks.
///
/// Errors when `values.len()` is not a multiple of the block size, or `format` is not a block
/// format. `Q8_0` and `Q4_0` give the same bytes as ggml's reference quantizers; `Q4_K` and `Q6_K`
/// use their own scale search (valid encodings, not bit-equal to llama.cpp's).
pub fn quantize(format: WeightFormat, values: &[f32]) -> Result<Vec<u8>, WeightError> {
    let block = format.block_size();
    if block == 1 || !values.len().is_multiple_of(block) {
        return Err(WeightError::not_block_multiple(format, values.len()));
    }
    let mut out = Vec::with_capacity(values.len() / block * format.block_bytes());
    for chunk in values.chunks_exact(block) {
        match format {
            WeightFormat::Q8_0 => q8_0::quantize_block(chunk, &mut out),
            WeightFormat::Q4_0 => q4_0::quantize_block(chunk, &mut out),
            WeightFormat::Q4K => q4_k::quantize_block(chunk, &mut out),
            WeightFormat::Q6K => q6_k::quantize_block(chunk, &mut out),
            WeightFormat::F32 | WeightFormat::Bf16 | WeightFormat::F16 | WeightFormat::F8E4M3Block { .. } => {}
        }
    }
    Ok(out)
}

/// Scalar reference: `Σ w·x` over whole blocks of stored `format` bytes with f32 activations,
/// decoding one block at a time. Element formats give 0.
pub fn dot_f32(format: WeightFormat, bytes: &[u8], x: &[f32]) -> f32 {
    let (block, block_bytes) = (format.block_size(), format.block_bytes());
    if block == 1 {
        return 0.0;
    }
    let mut decoded = [0.0f32; QK_K];
    let mut sum = 0.0f32;
    for (b, xs) in bytes.chunks_exact(block_bytes).zip(x.chunks_exact(block)) {
        dequantize(format, b, &mut decoded[..block]);
        sum += decoded[..block].iter().zip(xs).map(|(w, x)| w * x).sum::<f32>();
    }
    sum
}

/// Scalar reference for the integer dot products: stored `format` bytes against activations
/// prepared for it (see [`ActivationFormat::for_weights`]). `None` when they do not fit.
pub fn dot_prepared(format: WeightFormat, bytes: &[u8], prepared: &PreparedActivations) -> Option<f32> {
    if !prepared.fits(format, bytes.len() / format.block_bytes() * format.block_size()) {
        return None;
    }
    Some(match format {
        WeightFormat::Q8_0 => q8_0::dot_q8(bytes, &prepared.qs, &prepared.d),
        WeightFormat::Q4_0 => q4_0::dot_q8(bytes, &prepared.qs, &prepared.d),
        WeightFormat::Q4K => q4_k::dot_q8k(bytes, &prepared.qs, &prepared.bsums, &prepared.d),
        WeightFormat::Q6K => q6_k::dot_q8k(bytes, &prepared.qs, &prepared.d),
        WeightFormat::F32 | WeightFormat::Bf16 | WeightFormat::F16 | WeightFormat::F8E4M3Block { .. } => return None,
    })
}

#[cfg(test)]
mod tests;

//! Element formats weights are stored in, and their scalar decoders.

/// How a weight matrix's bytes encode its values. Weights stay in this format in memory; kernels
/// decode inside the dot product.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightFormat {
    F32,
    Bf16,
    F16,
    /// FP8 E4M3 (the `fn` variant: no infinities) with one f32 scale per `block_rows x block_cols`
    /// block, as in DeepSeek-V3/R1's release (`weight_scale_inv`).
    F8E4M3Block {
        block_rows: usize,
        block_cols: usize,
    },
    /// GGUF `Q8_0`: blocks of 32 values, each an f16 scale `d` and 32 × i8; value = q · d.
    Q8_0,
    /// GGUF `Q4_0`: blocks of 32 values, an f16 `d` and 16 bytes of nibbles; value = (q − 8) · d.
    /// Low nibbles hold elements 0..16, high nibbles 16..32.
    Q4_0,
    /// GGUF `Q4_K`: super-blocks of 256 values in 8 sub-blocks of 32 with 6-bit scales and mins;
    /// value = d · sc · q − dmin · m. See [`crate::quant::q4_k`] for the byte layout.
    Q4K,
    /// GGUF `Q6_K`: super-blocks of 256 values in 16 groups of 16 with i8 scales and 6-bit
    /// values; value = d · sc · (q − 32). See [`crate::quant::q6_k`] for the byte layout.
    Q6K,
}

impl WeightFormat {
    /// Values per block: 1 for element formats (FP8's scale blocks are stored separately),
    /// 32 for Q8_0 / Q4_0, 256 for the K-quants. A row's length must be a multiple of it.
    pub fn block_size(self) -> usize {
        match self {
            WeightFormat::F32 | WeightFormat::Bf16 | WeightFormat::F16 | WeightFormat::F8E4M3Block { .. } => 1,
            WeightFormat::Q8_0 | WeightFormat::Q4_0 => crate::quant::QK,
            WeightFormat::Q4K | WeightFormat::Q6K => crate::quant::QK_K,
        }
    }

    /// Bytes per block of [`WeightFormat::block_size`] values.
    pub fn block_bytes(self) -> usize {
        match self {
            WeightFormat::F32 => 4,
            WeightFormat::Bf16 | WeightFormat::F16 => 2,
            WeightFormat::F8E4M3Block { .. } => 1,
            WeightFormat::Q8_0 => crate::quant::q8_0::BLOCK_BYTES,
            WeightFormat::Q4_0 => crate::quant::q4_0::BLOCK_BYTES,
            WeightFormat::Q4K => crate::quant::q4_k::BLOCK_BYTES,
            WeightFormat::Q6K => crate::quant::q6_k::BLOCK_BYTES,
        }
    }

    /// Whether values are stored in blocks of more than one (the GGUF quantized formats).
    pub fn is_block_quantized(self) -> bool {
        self.block_size() > 1
    }

    /// Stored bytes of a row of `cols` values; `None` when `cols` is not a multiple of the block
    /// size or the size overflows.
    pub fn row_bytes(self, cols: usize) -> Option<usize> {
        if !cols.is_multiple_of(self.block_size()) {
            return None;
        }
        (cols / self.block_size()).checked_mul(self.block_bytes())
    }

    /// Short name as `inspect` and logs print it.
    pub fn name(self) -> &'static str {
        match self {
            WeightFormat::F32 => "F32",
            WeightFormat::Bf16 => "BF16",
            WeightFormat::F16 => "F16",
            WeightFormat::F8E4M3Block { .. } => "F8_E4M3",
            WeightFormat::Q8_0 => "Q8_0",
            WeightFormat::Q4_0 => "Q4_0",
            WeightFormat::Q4K => "Q4_K",
            WeightFormat::Q6K => "Q6_K",
        }
    }
}

#[inline(always)]
pub fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

#[inline(always)]
pub fn f16_to_f32(bits: u16) -> f32 {
    half::f16::from_bits(bits).to_f32()
}

/// Decodes one FP8 E4M3FN byte (bias 7, 3 mantissa bits, 0x7f/0xff are NaN, no infinities).
pub const fn fp8_e4m3_to_f32(byte: u8) -> f32 {
    let sign = if byte & 0x80 != 0 { -1.0f32 } else { 1.0f32 };
    let exponent = ((byte >> 3) & 0x0f) as i32;
    let mantissa = (byte & 0x07) as f32;
    if exponent == 0x0f && byte & 0x07 == 0x07 {
        return f32::NAN;
    }
    if exponent == 0 {
        // Subnormal: m/8 * 2^-6.
        return sign * mantissa * (1.0 / 512.0);
    }
    let mut scale = 1.0f32;
    let mut e = exponent - 7;
    while e > 0 {
        scale *= 2.0;
        e -= 1;
    }
    while e < 0 {
        scale *= 0.5;
        e += 1;
    }
    sign * (1.0 + mantissa / 8.0) * scale
}

const fn build_fp8_table() -> [f32; 256] {
    let mut table = [0.0f32; 256];
    let mut i = 0;
    while i < 256 {
        table[i] = fp8_e4m3_to_f32(i as u8);
        i += 1;
    }
    table
}

/// All 256 FP8 E4M3 values, so the kernels decode with one load.
pub static FP8_E4M3_TABLE: [f32; 256] = build_fp8_table();

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fp8_known_values() {
        // Values from the OCP FP8 spec: max normal 448, min normal 2^-6, min subnormal 2^-9.
        assert_eq!(fp8_e4m3_to_f32(0x7e), 448.0);
        assert_eq!(fp8_e4m3_to_f32(0xfe), -448.0);
        assert_eq!(fp8_e4m3_to_f32(0x08), 2f32.powi(-6));
        assert_eq!(fp8_e4m3_to_f32(0x01), 2f32.powi(-9));
        assert_eq!(fp8_e4m3_to_f32(0x38), 1.0);
        assert_eq!(fp8_e4m3_to_f32(0x00), 0.0);
        assert!(fp8_e4m3_to_f32(0x7f).is_nan());
        assert!(fp8_e4m3_to_f32(0xff).is_nan());
    }

    #[test]
    fn bf16_and_f16_decode() {
        assert_eq!(bf16_to_f32(0x3f80), 1.0);
        assert_eq!(bf16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
    }
}

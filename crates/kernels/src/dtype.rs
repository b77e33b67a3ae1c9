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
}

impl WeightFormat {
    /// Bytes per stored element.
    pub fn element_bytes(self) -> usize {
        match self {
            WeightFormat::F32 => 4,
            WeightFormat::Bf16 | WeightFormat::F16 => 2,
            WeightFormat::F8E4M3Block { .. } => 1,
        }
    }

    /// Short name as `inspect` and logs print it.
    pub fn name(self) -> &'static str {
        match self {
            WeightFormat::F32 => "F32",
            WeightFormat::Bf16 => "BF16",
            WeightFormat::F16 => "F16",
            WeightFormat::F8E4M3Block { .. } => "F8_E4M3",
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

//! GGML tensor types as GGUF numbers them: block size and bytes per block (for size checks), and
//! which of them r1serve's kernels can run.

use r1serve_kernels::WeightFormat;

/// A tensor storage type known to GGUF (ids from `ggml.h`; removed ids are unknown).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GgmlType {
    pub id: u32,
    pub name: &'static str,
    /// Values per block (1 for plain element types).
    pub block: u64,
    /// Bytes per block.
    pub block_bytes: u64,
}

const QK_K: u64 = 256;

/// `(id, name, values per block, bytes per block)`.
const TYPES: &[(u32, &str, u64, u64)] = &[
    (0, "F32", 1, 4),
    (1, "F16", 1, 2),
    (2, "Q4_0", 32, 2 + 16),
    (3, "Q4_1", 32, 2 + 2 + 16),
    (6, "Q5_0", 32, 2 + 4 + 16),
    (7, "Q5_1", 32, 2 + 2 + 4 + 16),
    (8, "Q8_0", 32, 2 + 32),
    (9, "Q8_1", 32, 4 + 4 + 32),
    (10, "Q2_K", QK_K, 2 + 2 + QK_K / 16 + QK_K / 4),
    (11, "Q3_K", QK_K, 2 + QK_K / 4 + QK_K / 8 + 12),
    (12, "Q4_K", QK_K, 2 + 2 + QK_K / 2 + 12),
    (13, "Q5_K", QK_K, 2 + 2 + QK_K / 2 + QK_K / 8 + 12),
    (14, "Q6_K", QK_K, 2 + QK_K / 2 + QK_K / 4 + QK_K / 16),
    (15, "Q8_K", QK_K, 4 + QK_K + QK_K / 8),
    (16, "IQ2_XXS", QK_K, 2 + QK_K / 4),
    (17, "IQ2_XS", QK_K, 2 + QK_K / 4 + QK_K / 32),
    (18, "IQ3_XXS", QK_K, 2 + QK_K / 4 + QK_K / 8),
    (19, "IQ1_S", QK_K, 2 + QK_K / 8 + QK_K / 16),
    (20, "IQ4_NL", 32, 2 + 16),
    (21, "IQ3_S", QK_K, 2 + QK_K / 4 + QK_K / 8 + QK_K / 32 + 4),
    (22, "IQ2_S", QK_K, 2 + QK_K / 4 + QK_K / 16),
    (23, "IQ4_XS", QK_K, 2 + 2 + QK_K / 2 + QK_K / 64),
    (24, "I8", 1, 1),
    (25, "I16", 1, 2),
    (26, "I32", 1, 4),
    (27, "I64", 1, 8),
    (28, "F64", 1, 8),
    (29, "IQ1_M", QK_K, QK_K / 8 + QK_K / 16 + QK_K / 32),
    (30, "BF16", 1, 2),
    (34, "TQ1_0", QK_K, 2 + 4 * 13),
    (35, "TQ2_0", QK_K, 2 + 64),
    (39, "MXFP4", 32, 1 + 16),
];

/// The formats the kernels run, by GGML name.
pub const SUPPORTED: &str = "F32, F16, BF16, Q8_0, Q4_0, Q4_K, Q6_K";

impl GgmlType {
    pub fn from_id(id: u32) -> Option<Self> {
        TYPES
            .iter()
            .find(|t| t.0 == id)
            .map(|&(id, name, block, block_bytes)| Self {
                id,
                name,
                block,
                block_bytes,
            })
    }

    pub fn from_name(name: &str) -> Option<Self> {
        TYPES.iter().find(|t| t.1 == name).and_then(|t| Self::from_id(t.0))
    }

    /// Bytes of `values` consecutive values (a multiple of the block size); `None` on overflow.
    pub fn bytes_for(self, values: u64) -> Option<u64> {
        (values / self.block).checked_mul(self.block_bytes)
    }

    /// The kernels' format for this type, when they support it.
    pub fn weight_format(self) -> Option<WeightFormat> {
        Some(match self.name {
            "F32" => WeightFormat::F32,
            "F16" => WeightFormat::F16,
            "BF16" => WeightFormat::Bf16,
            "Q8_0" => WeightFormat::Q8_0,
            "Q4_0" => WeightFormat::Q4_0,
            "Q4_K" => WeightFormat::Q4K,
            "Q6_K" => WeightFormat::Q6K,
            _ => return None,
        })
    }
}

/// GGUF metadata value type ids.
pub mod value_type {
    pub const U8: u32 = 0;
    pub const I8: u32 = 1;
    pub const U16: u32 = 2;
    pub const I16: u32 = 3;
    pub const U32: u32 = 4;
    pub const I32: u32 = 5;
    pub const F32: u32 = 6;
    pub const BOOL: u32 = 7;
    pub const STRING: u32 = 8;
    pub const ARRAY: u32 = 9;
    pub const U64: u32 = 10;
    pub const I64: u32 = 11;
    pub const F64: u32 = 12;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn supported_types_agree_with_the_kernels() {
        for name in SUPPORTED.split(", ") {
            let t = GgmlType::from_name(name).unwrap();
            let format = t.weight_format().unwrap();
            assert_eq!(format.block_size() as u64, t.block, "{name}");
            assert_eq!(format.block_bytes() as u64, t.block_bytes, "{name}");
        }
        assert!(GgmlType::from_id(4).is_none(), "removed Q4_2 is unknown");
        assert!(GgmlType::from_name("Q5_K").unwrap().weight_format().is_none());
    }
}

//! Random weights of the right shapes and formats, generated when a tensor is asked for: for
//! benchmarks and memory planning without the real files (vLLM's `--load-format dummy`).

use r1serve_kernels::{ByteView, WeightFormat, WeightMatrix};

/// Deterministic per-tensor random streams.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn name_seed(seed: u64, name: &str) -> u64 {
    name.bytes().fold(seed ^ 0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// Uniform in [-scale, scale).
fn uniform(state: &mut u64, scale: f32) -> f32 {
    let unit = (splitmix64(state) >> 40) as f32 / (1u64 << 24) as f32;
    (unit * 2.0 - 1.0) * scale
}

/// Magnitude of dummy weights: small enough that activations stay finite through many layers.
const WEIGHT_SCALE: f32 = 0.02;

#[derive(Clone, Debug)]
pub struct DummyWeights {
    pub seed: u64,
    /// Format of the dense matrices (the config's `torch_dtype`).
    pub dense_format: WeightFormat,
    /// When set, linear layers (`*_proj.weight`) are FP8 blocks, as in DeepSeek-R1's release.
    pub fp8_block: Option<(usize, usize)>,
    /// Tensors the checkpoint would not contain (an untied `lm_head` of a tied model).
    pub absent: Vec<String>,
}

impl DummyWeights {
    pub fn contains(&self, name: &str) -> bool {
        !self.absent.iter().any(|a| a == name)
    }

    pub fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<WeightMatrix, r1serve_kernels::WeightError> {
        let mut state = name_seed(self.seed, name);
        let count = rows * cols;
        if let (Some((br, bc)), true) = (self.fp8_block, name.ends_with("_proj.weight")) {
            // Quantised as DeepSeek-V3 quantises its weights (blocks scaled to their largest
            // value), so that the bytes are spread like a real checkpoint's.
            let values: Vec<f32> = (0..count).map(|_| uniform(&mut state, WEIGHT_SCALE)).collect();
            return r1serve_kernels::quant::fp8::quantize_fp8_blocks(rows, cols, br, bc, &values);
        }
        let bytes: Vec<u8> = match self.dense_format {
            WeightFormat::F32 => (0..count)
                .flat_map(|_| uniform(&mut state, WEIGHT_SCALE).to_le_bytes())
                .collect(),
            WeightFormat::F16 => (0..count)
                .flat_map(|_| half::f16::from_f32(uniform(&mut state, WEIGHT_SCALE)).to_le_bytes())
                .collect(),
            // BF16 (and anything else): truncate f32 to its top 16 bits.
            _ => (0..count)
                .flat_map(|_| ((uniform(&mut state, WEIGHT_SCALE).to_bits() >> 16) as u16).to_le_bytes())
                .collect(),
        };
        let format = match self.dense_format {
            WeightFormat::F32 | WeightFormat::F16 => self.dense_format,
            _ => WeightFormat::Bf16,
        };
        WeightMatrix::new(rows, cols, format, ByteView::from_vec(bytes))
    }

    /// Norm weights are 1 (as initialised), everything else small and random.
    pub fn vector(&self, name: &str, len: usize) -> Vec<f32> {
        if name.contains("norm") {
            return vec![1.0; len];
        }
        let mut state = name_seed(self.seed, name);
        (0..len).map(|_| uniform(&mut state, WEIGHT_SCALE)).collect()
    }
}

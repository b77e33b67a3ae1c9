//! A whole model with `Q4_K` and `Q6_K` weights (converted at load, as `--quant` does) against
//! the F32 model on the same weights: prefill through the k-quant panel GEMMs' tiles and decode
//! through their one-token paths stay within a stated tolerance of the F32 logits, and a cached
//! decode gives the logits of the same positions recomputed in one prefill.
//!
//! The fixtures' matrices are 64 and 160 wide, which no 256-value super-block divides, so the
//! model here is a Qwen2 of hidden size 256 on the dummy loader's random weights (F32).

use std::sync::Arc;

use r1serve_kernels::{CpuBackend, MatmulPrecision, PagedKvCache, WeightFormat};
use r1serve_model::{load_model_with, Batch, CausalLm, LoadFormat, LoadOptions, LogitsWanted, ModelDir, SeqInput};

const CONFIG: &str = r#"{
  "architectures": ["Qwen2ForCausalLM"],
  "hidden_size": 256,
  "intermediate_size": 512,
  "num_hidden_layers": 2,
  "num_attention_heads": 4,
  "num_key_value_heads": 2,
  "vocab_size": 512,
  "max_position_embeddings": 256,
  "rms_norm_eps": 1e-6,
  "rope_theta": 10000.0,
  "tie_word_embeddings": false,
  "torch_dtype": "float32"
}"#;

const PROMPT: [u32; 7] = [1, 17, 42, 99, 3, 250, 511];
const DECODED: [u32; 3] = [7, 300, 64];

fn load(dir: &std::path::Path, quant: Option<WeightFormat>) -> Box<dyn CausalLm> {
    let options = LoadOptions {
        format: LoadFormat::Dummy { seed: 11 },
        quant,
        progress: None,
    };
    load_model_with(
        &ModelDir::open(dir).unwrap(),
        &options,
        Arc::new(CpuBackend::new(MatmulPrecision::F32)),
    )
    .unwrap()
}

/// One sequence's KV cache, room for the prompt and the decoded tokens.
struct Sequence {
    cache: PagedKvCache,
    table: Vec<u32>,
}

impl Sequence {
    fn new(model: &dyn CausalLm) -> Self {
        let blocks = (PROMPT.len() + DECODED.len()).div_ceil(4) + 1;
        Self {
            cache: PagedKvCache::new(4, blocks, &model.kv_entry_widths()),
            table: (0..blocks as u32).collect(),
        }
    }

    /// Runs `tokens` at `start_pos` and returns the logits `logits` asks for.
    fn forward(&mut self, model: &dyn CausalLm, tokens: &[u32], start_pos: usize, logits: LogitsWanted) -> Vec<f32> {
        let seq = SeqInput {
            tokens,
            start_pos,
            block_table: &self.table,
            logits,
        };
        let mut out = Vec::new();
        model.forward(&Batch::single(seq), &mut self.cache, &mut out).unwrap();
        out
    }
}

/// Logits of every prompt position (one prefill), then of each decoded token fed one at a time
/// through the KV cache; `[prompt + decoded, vocab]`.
fn prefill_then_decode(model: &dyn CausalLm) -> Vec<f32> {
    let mut sequence = Sequence::new(model);
    let mut all = sequence.forward(model, &PROMPT, 0, LogitsWanted::All);
    for (i, token) in DECODED.iter().enumerate() {
        all.extend(sequence.forward(model, std::slice::from_ref(token), PROMPT.len() + i, LogitsWanted::Last));
    }
    all
}

/// The same positions in one prefill of prompt + decoded tokens.
fn recomputed(model: &dyn CausalLm) -> Vec<f32> {
    let tokens: Vec<u32> = PROMPT.iter().chain(&DECODED).copied().collect();
    Sequence::new(model).forward(model, &tokens, 0, LogitsWanted::All)
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// `(format, tolerance relative to the largest |logit|)`: each bound is about 1.5–2× the error
/// measured when this test was written (Q6_K 0.032, Q4_K 0.107 on these random weights; the
/// integer GEMM's path, `--no-repack`, gave Q6_K 0.029: the error is the weights' rounding).
#[test]
fn k_quant_models_stay_near_f32() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), CONFIG).unwrap();
    let reference = prefill_then_decode(load(dir.path(), None).as_ref());
    let scale = reference.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    assert!(scale > 0.0 && reference.iter().all(|v| v.is_finite()));
    for (format, tolerance) in [(WeightFormat::Q6K, 0.05), (WeightFormat::Q4K, 0.2)] {
        let model = load(dir.path(), Some(format));
        assert_eq!(model.weight_format(), format.name(), "every matrix converted");
        let got = prefill_then_decode(model.as_ref());
        let worst = max_abs_diff(&got, &reference);
        eprintln!("{format:?} vs F32: max |Δlogit| = {worst:.3e} of max |logit| {scale:.3e}");
        assert!(
            worst <= tolerance * scale,
            "{format:?}: {worst} vs {}",
            tolerance * scale
        );
        // The one-token paths (the `Q4_K` panels' kernel, the `Q6_K` row dots) and the tiles
        // round the activations alike (`Q8_K`): only f32 summation order differs.
        let again = recomputed(model.as_ref());
        let drift = max_abs_diff(&got, &again);
        assert!(drift <= 1e-4 * scale, "{format:?}: cached vs recomputed {drift}");
    }
}

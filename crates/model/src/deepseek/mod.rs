//! DeepSeek V2 / V3 (R1): pre-norm decoder with multi-head latent attention (absorbed, latent KV
//! cache) and DeepSeekMoE feed-forward blocks (dense for the first `first_k_dense_replace` layers).
//!
//! One implementation serves `DeepseekV2ForCausalLM` and `DeepseekV3ForCausalLM`; they differ in
//! routing (see [`routing`]) and in whether rope may be half-split (V3's `rope_interleave`).
//! Multi-token-prediction layers (`model.layers.{num_hidden_layers..}`) are never loaded.
//!
//! Semantics follow transformers 5.24: softmax scale `(nope + rope)^-0.5 · mscale(factor,
//! mscale_all_dim)²` under YaRN with `mscale_all_dim`, cos/sin multiplied by the rope table's
//! attention factor, `q_a_layernorm` / `kv_a_layernorm` with eps 1e-6.

mod config;
mod mla;
mod moe;
mod routing;
mod summary;

use std::sync::{Arc, Mutex};

use r1serve_kernels::rope::yarn_mscale;
use r1serve_kernels::{Backend, PagedKvCache, RopeScaling, RopeStyle, RopeTable, WeightMatrix};

use crate::config::ModelDir;
use crate::error::Result;
use crate::model::{bulk_format, embed_batch, ensure, project_logits, Batch, CausalLm, ModelInfo, ModelSummary};
use crate::weights::WeightStore;
use config::DeepseekConfig;
use mla::{Mla, MlaScratch, MlaShape};
use moe::{Mlp, MlpScratch, Moe, MoeScratch};

enum FeedForward {
    Dense(Mlp),
    Moe(Moe),
}

struct Layer {
    input_norm: Vec<f32>,
    attn: Mla,
    post_norm: Vec<f32>,
    ffn: FeedForward,
}

/// Per-forward buffers, reused across steps.
#[derive(Default)]
struct Scratch {
    ids: Vec<u32>,
    x: Vec<f32>,
    normed: Vec<f32>,
    proj: Vec<f32>,
    selected: Vec<f32>,
    mla: MlaScratch,
    mlp: MlpScratch,
    moe: MoeScratch,
}

pub struct Deepseek {
    info: ModelInfo,
    cfg: DeepseekConfig,
    backend: Arc<dyn Backend>,
    embed: WeightMatrix,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    lm_head: WeightMatrix,
    rope: RopeTable,
    shape: MlaShape,
    /// Softmax scale of the attention scores.
    scale: f32,
    scratch: Mutex<Scratch>,
}

/// `(nope + rope)^-0.5`, times `mscale(factor, mscale_all_dim)²` under YaRN with `mscale_all_dim`.
fn softmax_scale(cfg: &DeepseekConfig, scaling: &RopeScaling) -> f32 {
    let mut scale = (cfg.qk_head_dim() as f64).powf(-0.5);
    if let RopeScaling::Yarn {
        factor,
        mscale_all_dim: Some(m),
        ..
    } = *scaling
    {
        if m != 0.0 {
            let mscale = yarn_mscale(factor, m);
            scale *= mscale * mscale;
        }
    }
    scale as f32
}

/// The layer index of a `model.layers.{i}.…` tensor name.
fn layer_index(name: &str) -> Option<usize> {
    name.strip_prefix("model.layers.")?.split('.').next()?.parse().ok()
}

pub fn load(dir: &ModelDir, store: &WeightStore, backend: Arc<dyn Backend>) -> Result<Box<dyn CausalLm>> {
    let cfg = DeepseekConfig::from_dir(dir)?;
    let (theta, scaling) = dir.rope()?;
    let h = cfg.hidden_size;
    let shape = MlaShape::new(&cfg);
    let mut layers = Vec::new();
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        let ffn = match &cfg.moe {
            Some(moe) if cfg.is_moe_layer(i) => FeedForward::Moe(Moe::load(store, &p, moe, h)?),
            _ => FeedForward::Dense(Mlp::load(store, &format!("{p}.mlp"), h, cfg.intermediate_size)?),
        };
        layers.push(Layer {
            input_norm: store.vector(&format!("{p}.input_layernorm.weight"), h)?,
            attn: Mla::load(store, &p, &shape, h)?,
            post_norm: store.vector(&format!("{p}.post_attention_layernorm.weight"), h)?,
            ffn,
        });
    }
    let skipped = store
        .names()
        .filter(|name| layer_index(name).is_some_and(|i| i >= cfg.num_hidden_layers))
        .count();
    if skipped > 0 {
        tracing::info!(
            tensors = skipped,
            mtp_layers = cfg.num_nextn_predict_layers,
            "skipping multi-token-prediction tensors (not run)"
        );
    }
    let embed = store.matrix("model.embed_tokens.weight", cfg.vocab_size, h)?;
    let lm_head = if cfg.tie_word_embeddings && !store.contains("lm_head.weight") {
        embed.clone()
    } else {
        store.matrix("lm_head.weight", cfg.vocab_size, h)?
    };
    let style = if cfg.rope_interleave {
        RopeStyle::Interleaved
    } else {
        RopeStyle::HalfSplit
    };
    let info = ModelInfo {
        architecture: dir.architecture()?,
        vocab_size: cfg.vocab_size,
        hidden_size: h,
        num_layers: cfg.num_hidden_layers,
        max_position_embeddings: cfg.max_position_embeddings,
        bos_token_id: dir.bos_token_id(),
        eos_token_ids: dir.eos_token_ids(),
    };
    Ok(Box::new(Deepseek {
        info,
        backend,
        embed,
        layers,
        norm: store.vector("model.norm.weight", h)?,
        lm_head,
        rope: RopeTable::new(cfg.qk_rope_head_dim, theta, &scaling, style),
        shape,
        scale: softmax_scale(&cfg, &scaling),
        scratch: Mutex::new(Scratch::default()),
        cfg,
    }))
}

impl CausalLm for Deepseek {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn weight_bytes_per_token(&self) -> u64 {
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                l.attn.bytes_per_token()
                    + match &l.ffn {
                        FeedForward::Dense(mlp) => mlp.bytes_per_token(),
                        FeedForward::Moe(moe) => moe.bytes_per_token(),
                    }
            })
            .sum();
        (layers + self.lm_head.stored_bytes() + self.embed.stored_row_bytes()) as u64
    }

    fn prepare_weights(&self) {
        for layer in &self.layers {
            if let FeedForward::Moe(moe) = &layer.ffn {
                moe.prepare(self.backend.as_ref());
            }
        }
    }

    fn weight_format(&self) -> &'static str {
        let layers = self.layers.iter().flat_map(|l| {
            let ffn: Box<dyn Iterator<Item = &WeightMatrix>> = match &l.ffn {
                FeedForward::Dense(mlp) => Box::new(mlp.matrices()),
                FeedForward::Moe(moe) => Box::new(moe.matrices()),
            };
            l.attn.stored_matrices().chain(ffn)
        });
        bulk_format(layers.chain([&self.lm_head]))
    }

    fn kv_entry_widths(&self) -> Vec<usize> {
        vec![self.cfg.kv_entry_width(); self.cfg.num_hidden_layers]
    }

    fn forward(&self, batch: &Batch, cache: &mut PagedKvCache, logits: &mut Vec<f32>) -> Result<()> {
        batch.validate(&self.info, cache, &self.kv_entry_widths())?;
        let be = self.backend.as_ref();
        let spans = batch.spans();
        let n = batch.num_tokens();
        let h = self.cfg.hidden_size;
        let eps = self.cfg.rms_norm_eps;
        let mut guard = self.scratch.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let s = &mut *guard;
        embed_batch(be, &self.embed, batch, &mut s.ids, ensure(&mut s.x, n * h)); // [n, hidden] residual stream
        for (li, layer) in self.layers.iter().enumerate() {
            let normed = ensure(&mut s.normed, n * h);
            be.rms_norm(&s.x[..n * h], &layer.input_norm, eps, normed);
            let proj = ensure(&mut s.proj, n * h);
            layer.attn.forward(
                be,
                &self.shape,
                normed,
                &spans,
                cache,
                li,
                &self.rope,
                self.scale,
                &mut s.mla,
                proj,
            );
            be.add_assign(&mut s.x[..n * h], proj);

            let normed = ensure(&mut s.normed, n * h);
            be.rms_norm(&s.x[..n * h], &layer.post_norm, eps, normed);
            let proj = ensure(&mut s.proj, n * h);
            match &layer.ffn {
                FeedForward::Dense(mlp) => mlp.forward(be, normed, &mut s.mlp, proj),
                FeedForward::Moe(moe) => moe.forward(be, normed, &mut s.moe, proj),
            }
            be.add_assign(&mut s.x[..n * h], proj);
        }
        project_logits(
            be,
            batch,
            &s.x[..n * h],
            &self.norm,
            eps,
            &self.lm_head,
            &mut s.selected,
            logits,
        );
        Ok(())
    }
}

pub fn summarize(dir: &ModelDir) -> Result<ModelSummary> {
    let cfg = DeepseekConfig::from_dir(dir)?;
    let (total, active, mtp) = summary::parameter_counts(&cfg);
    let count = |n: u128| u64::try_from(n).map_err(|_| dir.error("parameter count overflows 64 bits"));
    let (params_total, params_active, params_mtp) = (count(total)?, count(active)?, count(mtp)?);
    Ok(ModelSummary {
        architecture: dir.architecture()?,
        num_layers: cfg.num_hidden_layers,
        hidden_size: cfg.hidden_size,
        vocab_size: cfg.vocab_size,
        max_position_embeddings: cfg.max_position_embeddings,
        params_total,
        params_active,
        params_mtp,
        kv_elements_per_token: (cfg.kv_entry_width() * cfg.num_hidden_layers) as u64,
        attention: summary::attention_description(&cfg),
        moe: summary::moe_shape(&cfg),
        weight_dtypes: Default::default(),
    })
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn shared_config(name: &str) -> ModelDir {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../../shared/model-configs")
            .join(name);
        ModelDir::from_config_file(path).unwrap()
    }

    #[test]
    fn r1_summary_matches_published_sizes() {
        let s = summarize(&shared_config("deepseek-r1.json")).unwrap();
        let b = |v: u64| v as f64 / 1e9;
        eprintln!("R1: {s:?}");
        assert!((b(s.params_total) - 671.0).abs() < 2.0, "total {}", b(s.params_total));
        assert!((b(s.params_active) - 37.0).abs() < 1.0, "active {}", b(s.params_active));
        assert!((b(s.params_mtp) - 14.0).abs() < 1.0, "mtp {}", b(s.params_mtp));
        assert_eq!(s.kv_elements_per_token, 576 * 61);
        let moe = s.moe.unwrap();
        assert_eq!(
            (moe.moe_layers, moe.dense_layers, moe.n_group, moe.topk_group),
            (58, 3, 8, 4)
        );
        assert_eq!(
            s.attention,
            "MLA (128 heads, q_lora_rank 1536, kv_lora_rank 512, rope 64, nope 128, v 128)"
        );
    }

    #[test]
    fn v2_lite_summary_matches_published_sizes() {
        let s = summarize(&shared_config("deepseek-v2-lite.json")).unwrap();
        let b = |v: u64| v as f64 / 1e9;
        eprintln!("V2-Lite: {s:?}");
        assert!((b(s.params_total) - 15.7).abs() < 0.2, "total {}", b(s.params_total));
        assert!((b(s.params_active) - 2.4).abs() < 0.1, "active {}", b(s.params_active));
        assert_eq!(s.params_mtp, 0);
        assert_eq!(s.kv_elements_per_token, 576 * 27);
    }

    #[test]
    fn yarn_softmax_scale() {
        let dir = shared_config("deepseek-r1.json");
        let cfg = DeepseekConfig::from_dir(&dir).unwrap();
        let (_, scaling) = dir.rope().unwrap();
        let m = 0.1 * 40f64.ln() + 1.0;
        let expected = m * m / 192f64.sqrt();
        assert!((softmax_scale(&cfg, &scaling) as f64 - expected).abs() < 1e-7);
        assert_eq!(softmax_scale(&cfg, &RopeScaling::None), (1.0 / 192f64.sqrt()) as f32);
    }

    #[test]
    fn layer_index_of_names() {
        assert_eq!(layer_index("model.layers.61.eh_proj.weight"), Some(61));
        assert_eq!(layer_index("model.norm.weight"), None);
    }
}

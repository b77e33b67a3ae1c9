//! Llama and Qwen2 (the R1-Distill models): pre-norm decoder, GQA/MQA attention with half-split
//! rope, SwiGLU MLP. Qwen2 adds q/k/v biases.

use std::sync::{Arc, Mutex};

use r1serve_kernels::{AttentionLayout, Backend, PagedKvCache, RopeStyle, RopeTable, WeightMatrix};
use serde::Deserialize;

use crate::config::ModelDir;
use crate::error::Result;
use crate::model::{
    add_bias, bulk_format, embed_batch, ensure, project_logits, Batch, CausalLm, ModelInfo, ModelSummary,
};
use crate::weights::WeightStore;

fn default_max_positions() -> usize {
    4096
}

fn default_act() -> String {
    "silu".into()
}

#[derive(Clone, Debug, Deserialize)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    pub rms_norm_eps: f64,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Llama's switch for q/k/v/o biases; Qwen2 always has q/k/v biases.
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default = "default_act")]
    pub hidden_act: String,
}

impl LlamaConfig {
    fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    fn check(&self, dir: &ModelDir) -> Result<()> {
        dir.check_limits(&[
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.kv_heads()),
            ("head_dim", self.head_dim()),
            ("max_position_embeddings", self.max_position_embeddings),
        ])?;
        let fail = |m: String| Err(dir.error(m));
        if self.num_attention_heads == 0
            || self.kv_heads() == 0
            || !self.num_attention_heads.is_multiple_of(self.kv_heads())
        {
            return fail(format!(
                "num_attention_heads ({}) must be a positive multiple of num_key_value_heads ({})",
                self.num_attention_heads,
                self.kv_heads()
            ));
        }
        if !self.head_dim().is_multiple_of(2) || self.head_dim() == 0 {
            return fail(format!(
                "head_dim ({}) must be even and positive for rope",
                self.head_dim()
            ));
        }
        if self.hidden_act != "silu" {
            return fail(format!(
                "hidden_act `{}` is not supported (supported: silu)",
                self.hidden_act
            ));
        }
        if self.mlp_bias {
            return fail("mlp_bias = true is not supported".into());
        }
        Ok(())
    }
}

struct Attention {
    q: WeightMatrix,
    k: WeightMatrix,
    v: WeightMatrix,
    o: WeightMatrix,
    q_bias: Option<Vec<f32>>,
    k_bias: Option<Vec<f32>>,
    v_bias: Option<Vec<f32>>,
    o_bias: Option<Vec<f32>>,
}

struct Layer {
    input_norm: Vec<f32>,
    attn: Attention,
    post_norm: Vec<f32>,
    gate: WeightMatrix,
    up: WeightMatrix,
    down: WeightMatrix,
}

/// Per-forward buffers, reused across steps.
#[derive(Default)]
struct Scratch {
    ids: Vec<u32>,
    x: Vec<f32>,
    normed: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    entries: Vec<f32>,
    attn: Vec<f32>,
    proj: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    selected: Vec<f32>,
}

pub struct Llama {
    info: ModelInfo,
    cfg: LlamaConfig,
    backend: Arc<dyn Backend>,
    embed: WeightMatrix,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    lm_head: WeightMatrix,
    rope: RopeTable,
    layout: AttentionLayout,
    scratch: Mutex<Scratch>,
}

pub fn load(dir: &ModelDir, store: &WeightStore, backend: Arc<dyn Backend>) -> Result<Box<dyn CausalLm>> {
    let cfg: LlamaConfig = dir.parse()?;
    cfg.check(dir)?;
    let is_qwen2 = dir.architecture()? == "Qwen2ForCausalLM";
    let (h, hd, nh, nkv) = (cfg.hidden_size, cfg.head_dim(), cfg.num_attention_heads, cfg.kv_heads());
    let qkv_bias = is_qwen2 || cfg.attention_bias;
    let optional_bias = |name: String, len: usize, present: bool| -> Result<Option<Vec<f32>>> {
        if present {
            store.vector(&name, len).map(Some)
        } else {
            Ok(None)
        }
    };
    let mut layers = Vec::new();
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        let attn = Attention {
            q: store.matrix(&format!("{p}.self_attn.q_proj.weight"), nh * hd, h)?,
            k: store.matrix(&format!("{p}.self_attn.k_proj.weight"), nkv * hd, h)?,
            v: store.matrix(&format!("{p}.self_attn.v_proj.weight"), nkv * hd, h)?,
            o: store.matrix(&format!("{p}.self_attn.o_proj.weight"), h, nh * hd)?,
            q_bias: optional_bias(format!("{p}.self_attn.q_proj.bias"), nh * hd, qkv_bias)?,
            k_bias: optional_bias(format!("{p}.self_attn.k_proj.bias"), nkv * hd, qkv_bias)?,
            v_bias: optional_bias(format!("{p}.self_attn.v_proj.bias"), nkv * hd, qkv_bias)?,
            o_bias: optional_bias(format!("{p}.self_attn.o_proj.bias"), h, cfg.attention_bias)?,
        };
        layers.push(Layer {
            input_norm: store.vector(&format!("{p}.input_layernorm.weight"), h)?,
            attn,
            post_norm: store.vector(&format!("{p}.post_attention_layernorm.weight"), h)?,
            gate: store.matrix(&format!("{p}.mlp.gate_proj.weight"), cfg.intermediate_size, h)?,
            up: store.matrix(&format!("{p}.mlp.up_proj.weight"), cfg.intermediate_size, h)?,
            down: store.matrix(&format!("{p}.mlp.down_proj.weight"), h, cfg.intermediate_size)?,
        });
    }
    let embed = store.matrix("model.embed_tokens.weight", cfg.vocab_size, h)?;
    let lm_head = if cfg.tie_word_embeddings && !store.contains("lm_head.weight") {
        embed.clone()
    } else {
        store.matrix("lm_head.weight", cfg.vocab_size, h)?
    };
    let (theta, scaling) = dir.rope()?;
    let info = ModelInfo {
        architecture: dir.architecture()?,
        vocab_size: cfg.vocab_size,
        hidden_size: h,
        num_layers: cfg.num_hidden_layers,
        max_position_embeddings: cfg.max_position_embeddings,
        bos_token_id: dir.bos_token_id(),
        eos_token_ids: dir.eos_token_ids(),
    };
    Ok(Box::new(Llama {
        info,
        backend,
        embed,
        layers,
        norm: store.vector("model.norm.weight", h)?,
        lm_head,
        rope: RopeTable::new(hd, theta, &scaling, RopeStyle::HalfSplit),
        layout: AttentionLayout::multi_head(nh, nkv, hd),
        scratch: Mutex::new(Scratch::default()),
        cfg,
    }))
}

impl Llama {
    /// Every layer's matrices: what one token reads besides the output matrix and its embedding row.
    fn layer_matrices(&self) -> impl Iterator<Item = &WeightMatrix> {
        self.layers.iter().flat_map(|l| {
            let a = &l.attn;
            [&a.q, &a.k, &a.v, &a.o, &l.gate, &l.up, &l.down]
        })
    }
}

impl CausalLm for Llama {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn kv_entry_widths(&self) -> Vec<usize> {
        vec![self.layout.entry_width(); self.cfg.num_hidden_layers]
    }

    fn weight_bytes_per_token(&self) -> u64 {
        let layers: usize = self.layer_matrices().map(WeightMatrix::stored_bytes).sum();
        (layers + self.lm_head.stored_bytes() + self.embed.stored_row_bytes()) as u64
    }

    fn weight_format(&self) -> &'static str {
        bulk_format(self.layer_matrices().chain([&self.lm_head]))
    }

    fn forward(&self, batch: &Batch, cache: &mut PagedKvCache, logits: &mut Vec<f32>) -> Result<()> {
        batch.validate(&self.info, cache, &self.kv_entry_widths())?;
        let be = self.backend.as_ref();
        let cfg = &self.cfg;
        let spans = batch.spans();
        let n = batch.num_tokens();
        let (h, hd) = (cfg.hidden_size, cfg.head_dim());
        let (q_dim, kv_dim) = (cfg.num_attention_heads * hd, cfg.kv_heads() * hd);
        let mut guard = self.scratch.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let s = &mut *guard;
        embed_batch(be, &self.embed, batch, &mut s.ids, ensure(&mut s.x, n * h));
        let eps = cfg.rms_norm_eps as f32;
        let scale = 1.0 / (hd as f32).sqrt();
        for (li, layer) in self.layers.iter().enumerate() {
            // Attention block.
            let normed = ensure(&mut s.normed, n * h); // [n, hidden]
            be.rms_norm(&s.x[..n * h], &layer.input_norm, eps, normed);
            let a = &layer.attn;
            let q = ensure(&mut s.q, n * q_dim); // [n, heads, head_dim]
            be.matmul(normed, &a.q, q);
            let k = ensure(&mut s.k, n * kv_dim); // [n, kv_heads, head_dim]
            be.matmul(normed, &a.k, k);
            let v = ensure(&mut s.v, n * kv_dim);
            be.matmul(normed, &a.v, v);
            for (buf, bias) in [(&mut *q, &a.q_bias), (&mut *k, &a.k_bias), (&mut *v, &a.v_bias)] {
                if let Some(bias) = bias {
                    add_bias(be, buf, bias);
                }
            }
            be.rope(q, &spans, hd, 0, &self.rope);
            be.rope(k, &spans, hd, 0, &self.rope);
            let entries = ensure(&mut s.entries, n * 2 * kv_dim); // [n, k | v]
            for t in 0..n {
                entries[t * 2 * kv_dim..t * 2 * kv_dim + kv_dim].copy_from_slice(&k[t * kv_dim..(t + 1) * kv_dim]);
                entries[t * 2 * kv_dim + kv_dim..(t + 1) * 2 * kv_dim]
                    .copy_from_slice(&v[t * kv_dim..(t + 1) * kv_dim]);
            }
            be.kv_store(cache, li, &spans, entries);
            let attn = ensure(&mut s.attn, n * q_dim);
            be.attention(q, &spans, cache, li, &self.layout, scale, attn);
            let proj = ensure(&mut s.proj, n * h);
            be.matmul(attn, &a.o, proj);
            if let Some(bias) = &a.o_bias {
                add_bias(be, proj, bias);
            }
            be.add_assign(&mut s.x[..n * h], proj);

            // MLP block.
            let normed = ensure(&mut s.normed, n * h);
            be.rms_norm(&s.x[..n * h], &layer.post_norm, eps, normed);
            let gate = ensure(&mut s.gate, n * cfg.intermediate_size);
            be.matmul(normed, &layer.gate, gate);
            let up = ensure(&mut s.up, n * cfg.intermediate_size);
            be.matmul(normed, &layer.up, up);
            let act = ensure(&mut s.attn, n * cfg.intermediate_size);
            be.silu_mul(gate, up, act);
            let proj = ensure(&mut s.proj, n * h);
            be.matmul(act, &layer.down, proj);
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
    let cfg: LlamaConfig = dir.parse()?;
    cfg.check(dir)?;
    let is_qwen2 = dir.architecture()? == "Qwen2ForCausalLM";
    // u128: the limits above keep every product far inside it.
    let (h, hd, nh, nkv) = (
        cfg.hidden_size as u128,
        cfg.head_dim() as u128,
        cfg.num_attention_heads as u128,
        cfg.kv_heads() as u128,
    );
    let mut attn = h * nh * hd * 2 + h * nkv * hd * 2;
    if is_qwen2 || cfg.attention_bias {
        attn += nh * hd + 2 * nkv * hd;
    }
    if cfg.attention_bias {
        attn += h;
    }
    let mlp = 3 * h * cfg.intermediate_size as u128;
    let per_layer = attn + mlp + 2 * h;
    let embed = cfg.vocab_size as u128 * h;
    let layers = per_layer * cfg.num_hidden_layers as u128 + h;
    // Same convention as DeepSeek: the input embedding is a row lookup, not active weights.
    let (total, active) = if cfg.tie_word_embeddings {
        (layers + embed, layers + embed)
    } else {
        (layers + 2 * embed, layers + embed)
    };
    let count = |n: u128| u64::try_from(n).map_err(|_| dir.error("parameter count overflows 64 bits"));
    let kv = 2 * nkv * hd * cfg.num_hidden_layers as u128;
    Ok(ModelSummary {
        architecture: dir.architecture()?,
        num_layers: cfg.num_hidden_layers,
        hidden_size: cfg.hidden_size,
        vocab_size: cfg.vocab_size,
        max_position_embeddings: cfg.max_position_embeddings,
        params_total: count(total)?,
        params_active: count(active)?,
        params_mtp: 0,
        kv_elements_per_token: count(kv)?,
        attention: format!(
            "{} ({} heads, {} kv heads, head_dim {})",
            if nkv == 1 {
                "MQA"
            } else if nkv < nh {
                "GQA"
            } else {
                "MHA"
            },
            nh,
            nkv,
            hd
        ),
        moe: None,
        weight_dtypes: Default::default(),
    })
}

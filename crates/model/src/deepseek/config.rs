//! `config.json` of DeepseekV2ForCausalLM / DeepseekV3ForCausalLM, deserialised and checked.
//!
//! Both styles are accepted: the published one (`rope_theta` + `rope_scaling`, `scoring_func`,
//! `topk_method`, ...) and the one transformers ≥ 5 writes (`rope_parameters`, `head_dim` =
//! `qk_rope_head_dim`, no `scoring_func` / `topk_method`). Keys that define tensor shapes are
//! required; routing knobs that a config may omit take transformers 5.24's per-architecture
//! defaults, except `n_group` / `topk_group` / `n_shared_experts`, where a missing or `null` value
//! means 1 / 1 / 0 (DeepSeek's own reference code; transformers cannot run a `null` there).

use serde::Deserialize;

use crate::config::ModelDir;
use crate::error::Result;

/// Which of the two architectures; they differ only in routing and rope-layout details.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    V2,
    V3,
}

impl Variant {
    pub fn from_architecture(name: &str) -> Option<Self> {
        match name {
            "DeepseekV2ForCausalLM" => Some(Variant::V2),
            "DeepseekV3ForCausalLM" => Some(Variant::V3),
            _ => None,
        }
    }
}

/// How router logits become expert scores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scoring {
    Softmax,
    Sigmoid,
}

impl Scoring {
    pub fn name(self) -> &'static str {
        match self {
            Scoring::Softmax => "softmax",
            Scoring::Sigmoid => "sigmoid",
        }
    }
}

/// How the top-k experts are chosen from the scores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TopkMethod {
    /// Plain top-k over the scores (V2-Lite).
    Greedy,
    /// Keep the `topk_group` groups with the highest maximum score, top-k inside them (V2).
    GroupLimitedGreedy,
    /// Scores plus `e_score_correction_bias` for selection only; group score = sum of the group's
    /// top-2 biased scores (V3 / R1).
    NoauxTc,
}

impl TopkMethod {
    pub fn name(self) -> &'static str {
        match self {
            TopkMethod::Greedy => "greedy",
            TopkMethod::GroupLimitedGreedy => "group_limited_greedy",
            TopkMethod::NoauxTc => "noaux_tc",
        }
    }
}

/// Everything routing needs, resolved from the config.
#[derive(Clone, Debug, PartialEq)]
pub struct RoutingConfig {
    pub n_experts: usize,
    pub top_k: usize,
    pub scoring: Scoring,
    pub method: TopkMethod,
    /// 1 means ungrouped.
    pub n_group: usize,
    pub topk_group: usize,
    /// Divide the chosen weights by their sum (V3 only: transformers 5.24's V2 router ignores it).
    pub normalize: bool,
    pub routed_scaling_factor: f32,
}

/// The mixture-of-experts part of the config (absent for a model without routed experts).
#[derive(Clone, Debug)]
pub struct MoeConfig {
    pub n_shared_experts: usize,
    pub moe_intermediate_size: usize,
    pub first_k_dense_replace: usize,
    pub moe_layer_freq: usize,
    pub routing: RoutingConfig,
}

/// The config as written; see the module doc for defaults.
#[derive(Clone, Debug, Deserialize)]
struct RawConfig {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    #[serde(default)]
    max_position_embeddings: Option<usize>,
    rms_norm_eps: f64,
    #[serde(default)]
    q_lora_rank: Option<usize>,
    kv_lora_rank: usize,
    qk_nope_head_dim: usize,
    qk_rope_head_dim: usize,
    v_head_dim: usize,
    #[serde(default)]
    moe_intermediate_size: Option<usize>,
    #[serde(default)]
    n_routed_experts: Option<usize>,
    #[serde(default)]
    n_shared_experts: Option<usize>,
    #[serde(default)]
    num_experts_per_tok: Option<usize>,
    #[serde(default)]
    first_k_dense_replace: Option<usize>,
    #[serde(default)]
    moe_layer_freq: Option<usize>,
    #[serde(default)]
    n_group: Option<usize>,
    #[serde(default)]
    topk_group: Option<usize>,
    #[serde(default)]
    norm_topk_prob: Option<bool>,
    #[serde(default)]
    routed_scaling_factor: Option<f64>,
    #[serde(default)]
    scoring_func: Option<String>,
    #[serde(default)]
    topk_method: Option<String>,
    #[serde(default)]
    hidden_act: Option<String>,
    #[serde(default)]
    num_nextn_predict_layers: Option<usize>,
    #[serde(default)]
    tie_word_embeddings: Option<bool>,
    #[serde(default)]
    rope_interleave: Option<bool>,
    #[serde(default)]
    attention_bias: Option<bool>,
    #[serde(default)]
    mlp_bias: Option<bool>,
}

/// The resolved, validated config.
#[derive(Clone, Debug)]
pub struct DeepseekConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_heads: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f32,
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    /// Multi-token-prediction layers stored after the main layers; never run.
    pub num_nextn_predict_layers: usize,
    pub tie_word_embeddings: bool,
    /// Rope pairs `(2i, 2i+1)` (true) or `(i, i + d/2)`; V2 is always interleaved.
    pub rope_interleave: bool,
    pub moe: Option<MoeConfig>,
}

impl DeepseekConfig {
    /// Parses and validates `dir`'s config; errors name the offending key.
    pub fn from_dir(dir: &ModelDir) -> Result<Self> {
        let arch = dir.architecture()?;
        let variant = Variant::from_architecture(&arch).ok_or_else(|| {
            dir.error(format!(
                "architecture `{arch}` is not a DeepSeek model (expected DeepseekV2ForCausalLM or DeepseekV3ForCausalLM)"
            ))
        })?;
        let raw: RawConfig = dir.parse()?;
        resolve(raw, variant, dir)
    }

    /// Query/key head width before absorption (`nope + rope`); the softmax scale uses it.
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// Floats per token per layer in the absorbed-MLA cache: `[c_kv | k_rope]`.
    pub fn kv_entry_width(&self) -> usize {
        self.kv_lora_rank + self.qk_rope_head_dim
    }

    /// Whether layer `layer` (main or MTP index) has routed experts rather than a dense MLP.
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        self.moe
            .as_ref()
            .is_some_and(|m| layer >= m.first_k_dense_replace && layer.is_multiple_of(m.moe_layer_freq))
    }
}

fn resolve(raw: RawConfig, variant: Variant, dir: &ModelDir) -> Result<DeepseekConfig> {
    let fail = |message: String| Err(dir.error(message));
    let positive = [
        ("vocab_size", raw.vocab_size),
        ("hidden_size", raw.hidden_size),
        ("num_hidden_layers", raw.num_hidden_layers),
        ("num_attention_heads", raw.num_attention_heads),
        ("kv_lora_rank", raw.kv_lora_rank),
        ("qk_nope_head_dim", raw.qk_nope_head_dim),
        ("qk_rope_head_dim", raw.qk_rope_head_dim),
        ("v_head_dim", raw.v_head_dim),
    ];
    if let Some((key, _)) = positive.iter().find(|(_, v)| *v == 0) {
        return fail(format!("`{key}` must be positive"));
    }
    let optional = |v: Option<usize>| v.unwrap_or(0);
    dir.check_limits(&positive)?;
    dir.check_limits(&[
        ("intermediate_size", raw.intermediate_size),
        ("max_position_embeddings", optional(raw.max_position_embeddings)),
        ("moe_intermediate_size", optional(raw.moe_intermediate_size)),
        ("n_routed_experts", optional(raw.n_routed_experts)),
        ("num_experts_per_tok", optional(raw.num_experts_per_tok)),
        ("q_lora_rank", optional(raw.q_lora_rank)),
        ("n_shared_experts", optional(raw.n_shared_experts)),
        ("n_group", optional(raw.n_group)),
        ("num_hidden_layers", optional(raw.num_nextn_predict_layers)),
    ])?;
    if !raw.qk_rope_head_dim.is_multiple_of(2) {
        return fail(format!(
            "`qk_rope_head_dim` ({}) must be even for rope",
            raw.qk_rope_head_dim
        ));
    }
    if raw.q_lora_rank == Some(0) {
        return fail("`q_lora_rank` must be positive or null".into());
    }
    if !(raw.rms_norm_eps.is_finite() && raw.rms_norm_eps >= 0.0) {
        return fail(format!(
            "`rms_norm_eps` ({}) must be a finite non-negative number",
            raw.rms_norm_eps
        ));
    }
    let max_position_embeddings = raw.max_position_embeddings.unwrap_or(match variant {
        Variant::V2 => 2048,
        Variant::V3 => 4096,
    });
    if max_position_embeddings == 0 {
        return fail("`max_position_embeddings` must be positive".into());
    }
    let act = raw.hidden_act.as_deref().unwrap_or("silu");
    if act != "silu" {
        return fail(format!("`hidden_act` `{act}` is not supported (supported: silu)"));
    }
    if raw.attention_bias == Some(true) {
        return fail("`attention_bias` = true is not supported (DeepSeek checkpoints have no attention biases)".into());
    }
    if raw.mlp_bias == Some(true) {
        return fail("`mlp_bias` = true is not supported".into());
    }
    let moe = resolve_moe(&raw, variant, dir)?;
    let has_dense = match &moe {
        None => true,
        Some(m) => m.first_k_dense_replace > 0 || m.moe_layer_freq > 1,
    };
    if has_dense && raw.intermediate_size == 0 {
        return fail("`intermediate_size` must be positive (the model has dense MLP layers)".into());
    }
    Ok(DeepseekConfig {
        vocab_size: raw.vocab_size,
        hidden_size: raw.hidden_size,
        intermediate_size: raw.intermediate_size,
        num_hidden_layers: raw.num_hidden_layers,
        num_heads: raw.num_attention_heads,
        max_position_embeddings,
        rms_norm_eps: raw.rms_norm_eps as f32,
        q_lora_rank: raw.q_lora_rank,
        kv_lora_rank: raw.kv_lora_rank,
        qk_nope_head_dim: raw.qk_nope_head_dim,
        qk_rope_head_dim: raw.qk_rope_head_dim,
        v_head_dim: raw.v_head_dim,
        num_nextn_predict_layers: raw.num_nextn_predict_layers.unwrap_or(0),
        tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
        rope_interleave: match variant {
            Variant::V2 => true,
            Variant::V3 => raw.rope_interleave.unwrap_or(true),
        },
        moe,
    })
}

fn resolve_moe(raw: &RawConfig, variant: Variant, dir: &ModelDir) -> Result<Option<MoeConfig>> {
    let fail = |message: String| Err(dir.error(message));
    let n_experts = match raw.n_routed_experts {
        None | Some(0) => return Ok(None),
        Some(n) => n,
    };
    let (scoring, method) = routing_kind(raw, variant, dir)?;
    let top_k = raw
        .num_experts_per_tok
        .ok_or_else(|| dir.error("`num_experts_per_tok` is required when `n_routed_experts` is set"))?;
    if top_k == 0 || top_k > n_experts {
        return fail(format!(
            "`num_experts_per_tok` ({top_k}) must be between 1 and `n_routed_experts` ({n_experts})"
        ));
    }
    let moe_intermediate_size = raw.moe_intermediate_size.unwrap_or(0);
    if moe_intermediate_size == 0 {
        return fail("`moe_intermediate_size` must be positive when `n_routed_experts` is set".into());
    }
    let moe_layer_freq = raw.moe_layer_freq.unwrap_or(1);
    if moe_layer_freq == 0 {
        return fail("`moe_layer_freq` must be positive".into());
    }
    let grouped = method != TopkMethod::Greedy;
    let (n_group, topk_group) = if grouped {
        (raw.n_group.unwrap_or(1), raw.topk_group.unwrap_or(1))
    } else {
        (1, 1)
    };
    if n_group == 0 || !n_experts.is_multiple_of(n_group) {
        return fail(format!(
            "`n_group` ({n_group}) must be positive and divide `n_routed_experts` ({n_experts})"
        ));
    }
    if topk_group == 0 || topk_group > n_group {
        return fail(format!(
            "`topk_group` ({topk_group}) must be between 1 and `n_group` ({n_group})"
        ));
    }
    let group_size = n_experts / n_group;
    if top_k > topk_group * group_size {
        return fail(format!(
            "`num_experts_per_tok` ({top_k}) exceeds the {} experts in the `topk_group` ({topk_group}) kept groups",
            topk_group * group_size
        ));
    }
    if method == TopkMethod::NoauxTc && n_group > 1 && group_size < 2 {
        return fail(format!(
            "noaux_tc scores a group by its top-2 experts, so `n_routed_experts` / `n_group` ({n_experts} / {n_group}) must be at least 2"
        ));
    }
    let routed_scaling_factor = raw.routed_scaling_factor.unwrap_or(match variant {
        Variant::V2 => 1.0,
        Variant::V3 => 2.5,
    });
    if !routed_scaling_factor.is_finite() {
        return fail("`routed_scaling_factor` must be a finite number".into());
    }
    let norm_topk_prob = raw.norm_topk_prob.unwrap_or(variant == Variant::V3);
    if variant == Variant::V2 && norm_topk_prob {
        tracing::warn!(
            config = %dir.config_path.display(),
            "norm_topk_prob = true is ignored for DeepseekV2ForCausalLM, as transformers does"
        );
    }
    Ok(Some(MoeConfig {
        n_shared_experts: raw.n_shared_experts.unwrap_or(0),
        moe_intermediate_size,
        first_k_dense_replace: raw.first_k_dense_replace.unwrap_or(match variant {
            Variant::V2 => 0,
            Variant::V3 => 3,
        }),
        moe_layer_freq,
        routing: RoutingConfig {
            n_experts,
            top_k,
            scoring,
            method,
            n_group,
            topk_group,
            normalize: variant == Variant::V3 && norm_topk_prob,
            routed_scaling_factor: routed_scaling_factor as f32,
        },
    }))
}

/// The scoring function and top-k method; each architecture supports what its reference runs.
fn routing_kind(raw: &RawConfig, variant: Variant, dir: &ModelDir) -> Result<(Scoring, TopkMethod)> {
    let (default_scoring, default_method) = match variant {
        Variant::V2 => ("softmax", "greedy"),
        Variant::V3 => ("sigmoid", "noaux_tc"),
    };
    let scoring = raw.scoring_func.as_deref().unwrap_or(default_scoring);
    let method = raw.topk_method.as_deref().unwrap_or(default_method);
    let scoring = match (variant, scoring) {
        (Variant::V2, "softmax") => Scoring::Softmax,
        (Variant::V3, "sigmoid") => Scoring::Sigmoid,
        (_, other) => {
            return Err(dir.error(format!(
                "`scoring_func` `{other}` is not supported for this architecture (supported: {default_scoring})"
            )))
        }
    };
    let method = match (variant, method) {
        (Variant::V2, "greedy") => TopkMethod::Greedy,
        (Variant::V2, "group_limited_greedy") => TopkMethod::GroupLimitedGreedy,
        (Variant::V3, "noaux_tc") => TopkMethod::NoauxTc,
        (_, other) => {
            let supported = match variant {
                Variant::V2 => "greedy, group_limited_greedy",
                Variant::V3 => "noaux_tc",
            };
            return Err(dir.error(format!(
                "`topk_method` `{other}` is not supported for this architecture (supported: {supported})"
            )));
        }
    };
    Ok((scoring, method))
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;

//! Parameter counts and shape summary of a DeepSeek config (no weights needed).
//!
//! Conventions:
//! - `params_total` counts every tensor of the main model as HF's `num_parameters` does
//!   (embedding, untied `lm_head`, norms, all experts) plus the routers' `e_score_correction_bias`
//!   (a buffer in transformers, but a checkpoint tensor); MTP layers are excluded.
//! - `params_active` counts what one token's forward pass reads in full: every attention, norm and
//!   dense weight, the router, the shared experts, `top_k` routed experts per MoE layer, and the
//!   `lm_head`. The input embedding contributes one row per token and is not counted (with tied
//!   embeddings the shared matrix is counted once, as the head). This lands on DeepSeek's published
//!   activated sizes: ≈37B for V3/R1, ≈2.4B for V2-Lite.
//! - `params_mtp` counts each MTP layer as stored in the published checkpoints: a full decoder
//!   layer, `enorm`, `hnorm`, `eh_proj` `[hidden, 2·hidden]`, `shared_head.norm`, and its own
//!   `embed_tokens` and `shared_head.head` copies.

use super::config::DeepseekConfig;
use crate::model::MoeShape;

/// Parameters of one attention block (with its `q_a` / `kv_a` norms).
fn attention(cfg: &DeepseekConfig) -> u128 {
    let h = cfg.hidden_size as u128;
    let heads = cfg.num_heads as u128;
    let (qk, v, r, rope) = (
        cfg.qk_head_dim() as u128,
        cfg.v_head_dim as u128,
        cfg.kv_lora_rank as u128,
        cfg.qk_rope_head_dim as u128,
    );
    let q = match cfg.q_lora_rank {
        Some(ql) => {
            let ql = ql as u128;
            h * ql + ql + ql * heads * qk
        }
        None => h * heads * qk,
    };
    let kv = h * (r + rope) + r + r * heads * (cfg.qk_nope_head_dim as u128 + v);
    q + kv + heads * v * h
}

/// Parameters of layer `layer`'s feed-forward block; `active` counts only `top_k` routed experts.
fn feed_forward(cfg: &DeepseekConfig, layer: usize, active: bool) -> u128 {
    let h = cfg.hidden_size as u128;
    match &cfg.moe {
        Some(moe) if cfg.is_moe_layer(layer) => {
            let r = &moe.routing;
            let expert = 3 * h * moe.moe_intermediate_size as u128;
            let routed = if active { r.top_k } else { r.n_experts } as u128;
            let router = r.n_experts as u128 * h
                + if r.method == super::config::TopkMethod::NoauxTc {
                    r.n_experts as u128
                } else {
                    0
                };
            router + moe.n_shared_experts as u128 * expert + routed * expert
        }
        _ => 3 * h * cfg.intermediate_size as u128,
    }
}

fn layer(cfg: &DeepseekConfig, index: usize, active: bool) -> u128 {
    attention(cfg) + feed_forward(cfg, index, active) + 2 * cfg.hidden_size as u128
}

/// `(total, active, mtp)` as defined in the module doc, in u128: the config limits keep every
/// product far inside it, and the caller narrows to u64 with an error.
pub fn parameter_counts(cfg: &DeepseekConfig) -> (u128, u128, u128) {
    let h = cfg.hidden_size as u128;
    let table = cfg.vocab_size as u128 * h;
    let layers = 0..cfg.num_hidden_layers;
    let head = if cfg.tie_word_embeddings { 0 } else { table };
    let total = table + head + h + layers.clone().map(|i| layer(cfg, i, false)).sum::<u128>();
    let active = table + h + layers.map(|i| layer(cfg, i, true)).sum::<u128>();
    let mtp = (cfg.num_hidden_layers..cfg.num_hidden_layers + cfg.num_nextn_predict_layers)
        .map(|i| layer(cfg, i, false) + 3 * h + 2 * h * h + 2 * table)
        .sum();
    (total, active, mtp)
}

/// Human-readable attention shape.
pub fn attention_description(cfg: &DeepseekConfig) -> String {
    let q_lora = cfg.q_lora_rank.map_or_else(|| "none".to_owned(), |r| r.to_string());
    format!(
        "MLA ({} heads, q_lora_rank {}, kv_lora_rank {}, rope {}, nope {}, v {})",
        cfg.num_heads, q_lora, cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.qk_nope_head_dim, cfg.v_head_dim
    )
}

pub fn moe_shape(cfg: &DeepseekConfig) -> Option<MoeShape> {
    let moe = cfg.moe.as_ref()?;
    let moe_layers = (0..cfg.num_hidden_layers).filter(|&i| cfg.is_moe_layer(i)).count();
    Some(MoeShape {
        routed_experts: moe.routing.n_experts,
        shared_experts: moe.n_shared_experts,
        experts_per_token: moe.routing.top_k,
        expert_intermediate_size: moe.moe_intermediate_size,
        moe_layers,
        dense_layers: cfg.num_hidden_layers - moe_layers,
        scoring: moe.routing.scoring.name().to_owned(),
        topk_method: moe.routing.method.name().to_owned(),
        n_group: moe.routing.n_group,
        topk_group: moe.routing.topk_group,
    })
}

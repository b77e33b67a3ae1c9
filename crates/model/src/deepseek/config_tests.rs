//! Config parsing and validation.

use serde_json::{json, Value};

use super::*;
use crate::config::dir_with;

fn v3() -> Value {
    json!({
        "architectures": ["DeepseekV3ForCausalLM"],
        "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 16,
        "num_hidden_layers": 4, "num_attention_heads": 2, "rms_norm_eps": 1e-6,
        "q_lora_rank": 24, "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4,
        "v_head_dim": 8, "n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 2,
        "n_group": 4, "topk_group": 2, "first_k_dense_replace": 1, "moe_layer_freq": 1,
        "norm_topk_prob": true, "routed_scaling_factor": 2.5, "num_nextn_predict_layers": 1
    })
}

fn with(mut base: Value, key: &str, value: Value) -> Value {
    base[key] = value;
    base
}

fn error_of(config: Value) -> String {
    DeepseekConfig::from_dir(&dir_with(config)).unwrap_err().to_string()
}

#[test]
fn v3_without_routing_keys_is_sigmoid_noaux_tc() {
    let cfg = DeepseekConfig::from_dir(&dir_with(v3())).unwrap();
    let r = &cfg.moe.as_ref().unwrap().routing;
    assert_eq!((r.scoring, r.method), (Scoring::Sigmoid, TopkMethod::NoauxTc));
    assert_eq!((r.n_group, r.topk_group, r.top_k), (4, 2, 2));
    assert!(r.normalize);
    assert!(!cfg.is_moe_layer(0) && cfg.is_moe_layer(1) && cfg.is_moe_layer(4));
    assert_eq!(cfg.kv_entry_width(), 20);
}

#[test]
fn v2_defaults_and_nulls() {
    let mut c = v3();
    c["architectures"] = json!(["DeepseekV2ForCausalLM"]);
    c["n_group"] = Value::Null;
    c["topk_group"] = Value::Null;
    c["n_shared_experts"] = Value::Null;
    c["q_lora_rank"] = Value::Null;
    let cfg = DeepseekConfig::from_dir(&dir_with(c.clone())).unwrap();
    let moe = cfg.moe.as_ref().unwrap();
    assert_eq!(
        (moe.routing.scoring, moe.routing.method),
        (Scoring::Softmax, TopkMethod::Greedy)
    );
    assert_eq!((moe.routing.n_group, moe.n_shared_experts), (1, 0));
    // transformers 5.24's V2 router never renormalises.
    assert!(!moe.routing.normalize);
    assert_eq!(cfg.q_lora_rank, None);
    c["topk_method"] = json!("group_limited_greedy");
    c["n_group"] = json!(4);
    c["topk_group"] = json!(1);
    c["num_experts_per_tok"] = json!(3);
    let msg = error_of(c.clone());
    assert!(msg.contains("num_experts_per_tok"), "{msg}");
    c["topk_group"] = json!(2);
    let cfg = DeepseekConfig::from_dir(&dir_with(c)).unwrap();
    assert_eq!(cfg.moe.unwrap().routing.method, TopkMethod::GroupLimitedGreedy);
}

#[test]
fn bad_values_name_their_key() {
    let cases = [
        (with(v3(), "num_attention_heads", json!(0)), "num_attention_heads"),
        (with(v3(), "qk_rope_head_dim", json!(5)), "qk_rope_head_dim"),
        (with(v3(), "n_group", json!(3)), "n_group"),
        (with(v3(), "topk_group", json!(5)), "topk_group"),
        (with(v3(), "num_experts_per_tok", json!(5)), "num_experts_per_tok"),
        (with(v3(), "num_experts_per_tok", json!(0)), "num_experts_per_tok"),
        (with(v3(), "q_lora_rank", json!(0)), "q_lora_rank"),
        (with(v3(), "moe_layer_freq", json!(0)), "moe_layer_freq"),
        (with(v3(), "moe_intermediate_size", json!(0)), "moe_intermediate_size"),
        (with(v3(), "hidden_act", json!("gelu")), "silu"),
        (with(v3(), "scoring_func", json!("softmax")), "sigmoid"),
        (with(v3(), "topk_method", json!("greedy")), "noaux_tc"),
        (with(v3(), "attention_bias", json!(true)), "attention_bias"),
        (with(v3(), "kv_lora_rank", json!(-1)), "kv_lora_rank"),
        (with(v3(), "hidden_size", Value::Null), "hidden_size"),
        (with(v3(), "norm_topk_prob", json!("yes")), "norm_topk_prob"),
        (with(v3(), "rms_norm_eps", json!(-1.0)), "rms_norm_eps"),
        (with(with(v3(), "n_group", json!(8)), "topk_group", json!(4)), "top-2"),
    ];
    for (config, key) in cases {
        let msg = error_of(config);
        assert!(msg.contains(key), "expected `{key}` in: {msg}");
    }
    let mut missing = v3();
    missing.as_object_mut().unwrap().remove("kv_lora_rank");
    assert!(error_of(missing).contains("kv_lora_rank"));
}

#[test]
fn dense_only_model_has_no_moe() {
    let c = with(v3(), "n_routed_experts", Value::Null);
    let cfg = DeepseekConfig::from_dir(&dir_with(c)).unwrap();
    assert!(cfg.moe.is_none() && !cfg.is_moe_layer(3));
}

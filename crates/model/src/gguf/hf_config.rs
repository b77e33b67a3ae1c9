//! GGUF metadata → the HuggingFace `config.json` our architectures parse.
//!
//! Keys as llama.cpp's converter writes them (`gguf-py` `Keys`): `{arch}.block_count`,
//! `.embedding_length`, `.attention.head_count`, ...; deepseek2 adds the MLA ranks and head sizes
//! (`.attention.key_length_mla` = nope + rope, `.attention.value_length_mla` = v) and the expert
//! keys. Where GGUF leaves something implicit, the choice made here is the one llama.cpp's loader
//! makes, stated next to it.

use serde_json::{json, Map, Value};

use super::error::GgufError;
use super::reader::Header;
use super::rope::llama3_from_factors;

/// Architectures read from GGUF (`general.architecture`).
pub const SUPPORTED: &str = "llama, qwen2, deepseek2";

/// The HF config for a parsed GGUF file; `bytes` is the whole file (for `rope_freqs`).
pub fn hf_config(header: &Header, bytes: &[u8]) -> Result<Value, GgufError> {
    let meta = &header.metadata;
    if let Some(count) = meta.usize("split.count")? {
        if count > 1 {
            return Err(GgufError::Unsupported(format!(
                "this is shard {} of a {count}-file split GGUF; merge the shards first (llama-gguf-split --merge)",
                meta.usize("split.no")?.unwrap_or(0) + 1
            )));
        }
    }
    let arch = meta.str("general.architecture")?.ok_or_else(|| GgufError::MissingKey {
        key: "general.architecture".into(),
    })?;
    let cx = Context { header, arch };
    let mut config = match arch {
        "llama" | "qwen2" => cx.llama_like()?,
        "deepseek2" => cx.deepseek2()?,
        other => {
            return Err(GgufError::UnsupportedArchitecture {
                name: other.to_owned(),
                supported: SUPPORTED,
            })
        }
    };
    cx.common(&mut config, bytes)?;
    Ok(Value::Object(config))
}

struct Context<'a> {
    header: &'a Header,
    arch: &'a str,
}

impl Context<'_> {
    fn key(&self, suffix: &str) -> String {
        format!("{}.{suffix}", self.arch)
    }

    fn usize(&self, suffix: &str) -> Result<Option<usize>, GgufError> {
        self.header.metadata.usize(&self.key(suffix))
    }

    fn require(&self, suffix: &str) -> Result<usize, GgufError> {
        self.header.metadata.require_usize(&self.key(suffix))
    }

    fn f64(&self, suffix: &str) -> Result<Option<f64>, GgufError> {
        self.header.metadata.f64(&self.key(suffix))
    }

    fn has_tensor(&self, name: &str) -> bool {
        self.header.tensors.iter().any(|t| t.name == name)
    }

    fn vocab_size(&self) -> Result<usize, GgufError> {
        if let Some(n) = self.usize("vocab_size")? {
            return Ok(n);
        }
        if let Some(t) = self.header.tensors.iter().find(|t| t.name == "token_embd.weight") {
            if let Some(&rows) = t.dims.get(1) {
                return usize::try_from(rows).map_err(|_| GgufError::BadTensor {
                    tensor: t.name.clone(),
                    dims: t.dims.clone(),
                    message: "vocabulary too large".into(),
                });
            }
        }
        Err(GgufError::MissingKey {
            key: self.key("vocab_size"),
        })
    }

    /// Keys every architecture shares: sizes, norm, rope, tied output, token ids.
    fn common(&self, config: &mut Map<String, Value>, bytes: &[u8]) -> Result<(), GgufError> {
        let meta = &self.header.metadata;
        let eps = self
            .f64("attention.layer_norm_rms_epsilon")?
            .ok_or_else(|| GgufError::MissingKey {
                key: self.key("attention.layer_norm_rms_epsilon"),
            })?;
        config.insert("vocab_size".into(), json!(self.vocab_size()?));
        config.insert("hidden_size".into(), json!(self.require("embedding_length")?));
        config.insert(
            "num_attention_heads".into(),
            json!(self.require("attention.head_count")?),
        );
        config.insert("rms_norm_eps".into(), json!(eps));
        if let Some(context) = self.usize("context_length")? {
            config.insert("max_position_embeddings".into(), json!(context));
        }
        // llama.cpp falls back to token_embd when there is no output.weight.
        config.insert("tie_word_embeddings".into(), json!(!self.has_tensor("output.weight")));
        config.insert("hidden_act".into(), json!("silu"));
        config.insert(
            "rope_theta".into(),
            json!(self.f64("rope.freq_base")?.unwrap_or(10000.0)),
        );
        if let Some(scaling) = self.rope_scaling(config, bytes)? {
            config.insert("rope_scaling".into(), scaling);
        }
        if let Some(bos) = meta.usize("tokenizer.ggml.bos_token_id")? {
            config.insert("bos_token_id".into(), json!(bos));
        }
        // End-of-generation ids: EOS, then EOT / EOM when they differ (llama.cpp stops on all).
        let mut eos = Vec::new();
        for key in ["eos_token_id", "eot_token_id", "eom_token_id"] {
            if let Some(id) = meta.usize(&format!("tokenizer.ggml.{key}"))? {
                if !eos.contains(&id) {
                    eos.push(id);
                }
            }
        }
        match eos.len() {
            0 => {}
            1 => {
                config.insert("eos_token_id".into(), json!(eos[0]));
            }
            _ => {
                config.insert("eos_token_id".into(), json!(eos));
            }
        }
        Ok(())
    }

    fn rope_scaling(&self, config: &Map<String, Value>, bytes: &[u8]) -> Result<Option<Value>, GgufError> {
        let kind = self.header.metadata.str(&self.key("rope.scaling.type"))?;
        let factor = self.f64("rope.scaling.factor")?;
        let legacy_linear = self.f64("rope.scale_linear")?.filter(|f| *f != 1.0);
        let freqs = self.header.tensors.iter().find(|t| t.name == "rope_freqs.weight");
        if let Some(ext) = self.f64("rope.scaling.yarn_ext_factor")? {
            if ext != 1.0 {
                return Err(self.unsupported(&format!("rope.scaling.yarn_ext_factor = {ext} (only 1)")));
            }
        }
        let scaling = match (kind, legacy_linear) {
            (None | Some("none"), None) => None,
            (None, Some(f)) | (Some("linear"), Some(f)) => Some(json!({"rope_type": "linear", "factor": f})),
            (Some("linear"), None) => {
                Some(json!({"rope_type": "linear", "factor": self.need(factor, "rope.scaling.factor")?}))
            }
            (Some("yarn"), _) => Some(self.yarn(self.need(factor, "rope.scaling.factor")?)?),
            (Some(other), _) => {
                return Err(self.unsupported(&format!("rope scaling type `{other}` (supported: none, linear, yarn)")))
            }
        };
        let Some(freqs) = freqs else {
            return Ok(scaling);
        };
        if scaling.is_some() {
            return Err(self.unsupported("rope_freqs together with rope scaling keys"));
        }
        if freqs.ggml_type.name != "F32" || freqs.dims.len() != 1 {
            return Err(GgufError::BadTensor {
                tensor: freqs.name.clone(),
                dims: freqs.dims.clone(),
                message: format!("expected a 1-D F32 tensor, found {}", freqs.ggml_type.name),
            });
        }
        let factors: Vec<f32> = bytes
            .get(freqs.start..freqs.start + freqs.len)
            .unwrap_or_default()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let heads = config
            .get("num_attention_heads")
            .and_then(Value::as_u64)
            .unwrap_or(1)
            .max(1);
        let hidden = config.get("hidden_size").and_then(Value::as_u64).unwrap_or(0);
        let dim = match self.usize("rope.dimension_count")? {
            Some(d) => d,
            None => config.get("head_dim").and_then(Value::as_u64).unwrap_or(hidden / heads) as usize,
        };
        let theta = self.f64("rope.freq_base")?.unwrap_or(10000.0);
        llama3_from_factors(&factors, theta, dim).map_err(|message| GgufError::BadTensor {
            tensor: freqs.name.clone(),
            dims: freqs.dims.clone(),
            message,
        })
    }

    fn yarn(&self, factor: f64) -> Result<Value, GgufError> {
        let original = self.require("rope.scaling.original_context_length")?;
        let mut yarn = json!({
            "rope_type": "yarn",
            "factor": factor,
            "original_max_position_embeddings": original,
            "beta_fast": self.f64("rope.scaling.yarn_beta_fast")?.unwrap_or(32.0),
            "beta_slow": self.f64("rope.scaling.yarn_beta_slow")?.unwrap_or(1.0),
        });
        if let Some(attn) = self.f64("rope.scaling.yarn_attn_factor")? {
            if attn != 1.0 {
                return Err(self.unsupported(&format!("rope.scaling.yarn_attn_factor = {attn} (only 1)")));
            }
        }
        if let Some(log_mul) = self.f64("rope.scaling.yarn_log_multiplier")? {
            // deepseek2 stores 0.1 · mscale_all_dim; llama.cpp then takes mscale = mscale_all_dim
            // (true of every published DeepSeek config). Other architectures store mscale_all_dim
            // and assume mscale = 1.
            let (mscale, all_dim) = if self.arch == "deepseek2" {
                (log_mul / 0.1, log_mul / 0.1)
            } else {
                (1.0, log_mul)
            };
            yarn["mscale"] = json!(mscale);
            yarn["mscale_all_dim"] = json!(all_dim);
        }
        Ok(yarn)
    }

    fn need(&self, value: Option<f64>, suffix: &str) -> Result<f64, GgufError> {
        value.ok_or_else(|| GgufError::MissingKey { key: self.key(suffix) })
    }

    fn unsupported(&self, what: &str) -> GgufError {
        GgufError::Unsupported(format!("{} GGUF: {what} is not supported", self.arch))
    }

    fn llama_like(&self) -> Result<Map<String, Value>, GgufError> {
        let heads = self.require("attention.head_count")?;
        let hidden = self.require("embedding_length")?;
        let mut c = Map::new();
        let (hf, model_type) = match self.arch {
            "qwen2" => ("Qwen2ForCausalLM", "qwen2"),
            _ => ("LlamaForCausalLM", "llama"),
        };
        c.insert("architectures".into(), json!([hf]));
        c.insert("model_type".into(), json!(model_type));
        c.insert("num_hidden_layers".into(), json!(self.require("block_count")?));
        c.insert("intermediate_size".into(), json!(self.require("feed_forward_length")?));
        let kv_heads = self.usize("attention.head_count_kv")?.unwrap_or(heads);
        c.insert("num_key_value_heads".into(), json!(kv_heads));
        let key_len = self.usize("attention.key_length")?;
        let value_len = self.usize("attention.value_length")?;
        if let (Some(k), Some(v)) = (key_len, value_len) {
            if k != v {
                return Err(self.unsupported(&format!("key_length {k} != value_length {v}")));
            }
        }
        let head_dim = key_len.or(value_len).unwrap_or(hidden / heads.max(1));
        if key_len.is_some() || value_len.is_some() {
            c.insert("head_dim".into(), json!(head_dim));
        }
        if let Some(rot) = self.usize("rope.dimension_count")? {
            if rot != head_dim {
                return Err(self.unsupported(&format!(
                    "partial rotary (rope.dimension_count {rot} of head {head_dim})"
                )));
            }
        }
        if self.arch == "llama" {
            c.insert("attention_bias".into(), json!(self.has_tensor("blk.0.attn_q.bias")));
            c.insert("mlp_bias".into(), json!(self.has_tensor("blk.0.ffn_up.bias")));
        }
        Ok(c)
    }

    fn deepseek2(&self) -> Result<Map<String, Value>, GgufError> {
        let heads = self.require("attention.head_count")?;
        let rope = self.require("rope.dimension_count")?;
        // Files from before the MLA split store the per-head sizes in key_length / value_length.
        let key_mla = match self.usize("attention.key_length_mla")? {
            Some(k) => k,
            None => self.require("attention.key_length")?,
        };
        let v_dim = match self.usize("attention.value_length_mla")? {
            Some(v) => v,
            None => self.require("attention.value_length")?,
        };
        let nope = key_mla
            .checked_sub(rope)
            .filter(|n| *n > 0)
            .ok_or_else(|| GgufError::ValueOutOfRange {
                key: self.key("attention.key_length_mla"),
                value: key_mla.to_string(),
                expected: "greater than rope.dimension_count",
            })?;
        let blocks = self.require("block_count")?;
        let nextn = self.usize("nextn_predict_layers")?.unwrap_or(0);
        let layers = blocks.checked_sub(nextn).ok_or_else(|| GgufError::ValueOutOfRange {
            key: self.key("nextn_predict_layers"),
            value: nextn.to_string(),
            expected: "at most block_count",
        })?;
        let q_lora = self.usize("attention.q_lora_rank")?.filter(|r| *r > 0);
        let mut c = Map::new();
        c.insert("num_hidden_layers".into(), json!(layers));
        c.insert("num_nextn_predict_layers".into(), json!(nextn));
        c.insert("num_key_value_heads".into(), json!(heads));
        c.insert(
            "intermediate_size".into(),
            json!(self.usize("feed_forward_length")?.unwrap_or(0)),
        );
        c.insert("q_lora_rank".into(), json!(q_lora));
        c.insert("kv_lora_rank".into(), json!(self.require("attention.kv_lora_rank")?));
        c.insert("qk_nope_head_dim".into(), json!(nope));
        c.insert("qk_rope_head_dim".into(), json!(rope));
        c.insert("v_head_dim".into(), json!(v_dim));
        // GGML's rope for deepseek2 rotates adjacent pairs, and the converter leaves q/k as the
        // HF checkpoint has them.
        c.insert("rope_interleave".into(), json!(true));
        let experts = self.usize("expert_count")?.unwrap_or(0);
        let hf = if experts == 0 {
            "DeepseekV2ForCausalLM"
        } else {
            self.deepseek2_moe(&mut c, experts)?
        };
        c.insert("architectures".into(), json!([hf]));
        Ok(c)
    }

    /// The routing keys; returns the HF architecture they imply.
    fn deepseek2_moe(&self, c: &mut Map<String, Value>, experts: usize) -> Result<&'static str, GgufError> {
        let has_bias = self
            .header
            .tensors
            .iter()
            .any(|t| t.name.ends_with(".exp_probs_b.bias"));
        // 1 = softmax, 2 = sigmoid. llama.cpp reads a missing key as softmax (DeepSeek V2 files
        // predate it); a selection bias only exists with sigmoid scoring (V3), so it decides.
        let sigmoid = match self.usize("expert_gating_func")? {
            Some(1) => false,
            Some(2) => true,
            None => has_bias,
            Some(other) => {
                return Err(self.unsupported(&format!("expert_gating_func {other} (supported: 1 softmax, 2 sigmoid)")))
            }
        };
        if has_bias && !sigmoid {
            return Err(self.unsupported("softmax gating with an exp_probs_b selection bias"));
        }
        let groups = self.usize("expert_group_count")?.unwrap_or(1).max(1);
        let (hf, scoring, method) = match (sigmoid, groups > 1) {
            (true, _) => ("DeepseekV3ForCausalLM", "sigmoid", "noaux_tc"),
            (false, true) => ("DeepseekV2ForCausalLM", "softmax", "group_limited_greedy"),
            (false, false) => ("DeepseekV2ForCausalLM", "softmax", "greedy"),
        };
        c.insert("n_routed_experts".into(), json!(experts));
        c.insert("num_experts_per_tok".into(), json!(self.require("expert_used_count")?));
        c.insert(
            "n_shared_experts".into(),
            json!(self.usize("expert_shared_count")?.unwrap_or(0)),
        );
        c.insert(
            "moe_intermediate_size".into(),
            json!(self.require("expert_feed_forward_length")?),
        );
        let dense = self.usize("leading_dense_block_count")?.unwrap_or(0);
        c.insert("first_k_dense_replace".into(), json!(dense));
        c.insert("moe_layer_freq".into(), json!(1));
        c.insert("n_group".into(), json!(groups));
        c.insert(
            "topk_group".into(),
            json!(self.usize("expert_group_used_count")?.unwrap_or(1).max(1)),
        );
        c.insert("scoring_func".into(), json!(scoring));
        c.insert("topk_method".into(), json!(method));
        // Absent keys mean "off" in llama.cpp: no scaling, no renormalisation.
        c.insert(
            "routed_scaling_factor".into(),
            json!(self.f64("expert_weights_scale")?.unwrap_or(1.0)),
        );
        let norm = self
            .header
            .metadata
            .bool(&self.key("expert_weights_norm"))?
            .unwrap_or(false);
        c.insert("norm_topk_prob".into(), json!(norm));
        Ok(hf)
    }
}

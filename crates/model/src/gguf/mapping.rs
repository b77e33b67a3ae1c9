//! GGUF tensor names → HF tensor names, and how each HF tensor is cut from the file.
//!
//! GGUF dims are the reverse of HF shapes (`dims[0]` is the row length). Decisions checked against
//! llama.cpp's converter:
//! - llama q/k (weights and biases) are row-permuted for GGML's adjacent-pair rope: within each
//!   head (`head_count` for q, `head_count_kv` for k) HF row `j·d/2 + i` is stored at row `2i + j`.
//!   Undone here by a row gather. qwen2 and deepseek2 are stored unpermuted.
//! - deepseek2 routed experts are stacked (`ffn_{gate,up,down}_exps`, dims `[cols, rows, n_expert]`);
//!   expert `e` is the contiguous row range `e·rows..(e+1)·rows`. `ffn_gate_up_exps` (optional
//!   fusion) holds gate then up rows per expert.
//! - deepseek2 `attn_kv_b` (dims `[kv_lora, heads·(nope+v)]`) is HF's `kv_b_proj`; newer files split
//!   it into `attn_k_b` (dims `[nope, kv_lora, heads]`: per head the nope rows transposed) and
//!   `attn_v_b` (dims `[kv_lora, v, heads]`), from which `kv_b_proj` is rebuilt.
//! - fused `attn_qkv` (optional) is q, k, v rows concatenated (q and k permuted for llama).

use std::collections::HashMap;

use super::error::GgufError;
use super::reader::TensorInfo;

/// Where an HF tensor's values come from.
#[derive(Clone, Debug, PartialEq)]
pub enum Source {
    /// Rows `first..` of GGUF tensor `tensor` viewed as `[rows(), row_len()]`; for a 1-D tensor
    /// the "rows" are its values.
    Rows { tensor: usize, first: usize },
    /// As `Rows`, then un-permuted from the adjacent-pair rope layout, `heads` heads.
    PermutedRows { tensor: usize, first: usize, heads: usize },
    /// `kv_b_proj` rebuilt (as F32) from `attn_k_b` and `attn_v_b`.
    KvB { k_b: usize, v_b: usize },
}

#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    /// HF shape: `[rows, cols]` or `[len]`.
    pub shape: Vec<usize>,
    pub source: Source,
}

/// What the mapping needs to know about the model.
pub struct MappingParams {
    /// Undo the llama q/k permutation.
    pub permute_qk: bool,
    pub heads: usize,
    pub kv_heads: usize,
}

/// HF name → entry, plus the GGUF names that map to nothing (kept under their own names).
pub struct Mapping {
    pub entries: HashMap<String, Entry>,
    pub unmapped: Vec<String>,
}

/// Most experts a stacked tensor may hold (real models have at most a few hundred).
pub const MAX_EXPERTS: usize = 1 << 16;

/// The dims as `usize`; a tensor with a zero dim holds nothing a model can use.
fn dims_usize(t: &TensorInfo) -> Result<Vec<usize>, GgufError> {
    if t.dims.contains(&0) {
        return Err(bad(t, "a dimension is zero"));
    }
    t.dims
        .iter()
        .map(|&d| usize::try_from(d))
        .collect::<Result<_, _>>()
        .map_err(|_| bad(t, "dimension does not fit this machine"))
}

fn bad(t: &TensorInfo, message: impl Into<String>) -> GgufError {
    GgufError::BadTensor {
        tensor: t.name.clone(),
        dims: t.dims.clone(),
        message: message.into(),
    }
}

/// The per-layer names with a one-to-one HF counterpart.
fn layer_suffix(rest: &str) -> Option<&'static str> {
    Some(match rest {
        "attn_norm.weight" => "input_layernorm.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_q.bias" => "self_attn.q_proj.bias",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_k.bias" => "self_attn.k_proj.bias",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_v.bias" => "self_attn.v_proj.bias",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "attn_output.bias" => "self_attn.o_proj.bias",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        "attn_q_a.weight" => "self_attn.q_a_proj.weight",
        "attn_q_a_norm.weight" => "self_attn.q_a_layernorm.weight",
        "attn_q_b.weight" => "self_attn.q_b_proj.weight",
        "attn_kv_a_mqa.weight" => "self_attn.kv_a_proj_with_mqa.weight",
        "attn_kv_a_norm.weight" => "self_attn.kv_a_layernorm.weight",
        "attn_kv_b.weight" => "self_attn.kv_b_proj.weight",
        "ffn_gate_inp.weight" => "mlp.gate.weight",
        "exp_probs_b.bias" => "mlp.gate.e_score_correction_bias",
        "ffn_gate_shexp.weight" => "mlp.shared_experts.gate_proj.weight",
        "ffn_up_shexp.weight" => "mlp.shared_experts.up_proj.weight",
        "ffn_down_shexp.weight" => "mlp.shared_experts.down_proj.weight",
        _ => return None,
    })
}

struct Builder<'a> {
    tensors: &'a [TensorInfo],
    params: &'a MappingParams,
    entries: HashMap<String, Entry>,
    unmapped: Vec<String>,
}

impl Builder<'_> {
    fn add(&mut self, index: usize, name: String, entry: Entry) -> Result<(), GgufError> {
        if self.entries.contains_key(&name) {
            return Err(bad(
                &self.tensors[index],
                format!("maps to `{name}`, which another tensor also provides"),
            ));
        }
        self.entries.insert(name, entry);
        Ok(())
    }

    /// The whole tensor under `name`, in HF shape order.
    fn whole(&mut self, index: usize, name: String, heads: Option<usize>) -> Result<(), GgufError> {
        let t = &self.tensors[index];
        let mut shape = dims_usize(t)?;
        shape.reverse();
        let source = match heads {
            Some(heads) => Source::PermutedRows {
                tensor: index,
                first: 0,
                heads,
            },
            None => Source::Rows {
                tensor: index,
                first: 0,
            },
        };
        self.add(index, name, Entry { shape, source })
    }

    /// Per-expert views of a stacked `[cols, rows · parts, n_expert]` tensor; part `p` of expert
    /// `e` is named `{prefix}.experts.{e}.{names[p]}`.
    fn experts(&mut self, index: usize, prefix: &str, names: &[&str]) -> Result<(), GgufError> {
        let t = &self.tensors[index];
        let dims = dims_usize(t)?;
        let [cols, rows_all, n_expert] = dims[..] else {
            return Err(bad(t, "stacked experts must have 3 dimensions"));
        };
        if n_expert > MAX_EXPERTS {
            return Err(bad(t, format!("more than {MAX_EXPERTS} experts")));
        }
        if !rows_all.is_multiple_of(names.len()) {
            return Err(bad(t, "fused gate/up rows are not even"));
        }
        let rows = rows_all / names.len();
        for e in 0..n_expert {
            for (p, part) in names.iter().enumerate() {
                let first = (e * rows_all) + p * rows;
                let entry = Entry {
                    shape: vec![rows, cols],
                    source: Source::Rows { tensor: index, first },
                };
                self.add(index, format!("{prefix}.experts.{e}.{part}"), entry)?;
            }
        }
        Ok(())
    }

    /// Fused q/k/v rows split into three tensors (weights `[rows, cols]` or biases `[rows]`).
    fn qkv(&mut self, index: usize, prefix: &str, kind: &str) -> Result<(), GgufError> {
        let t = &self.tensors[index];
        let dims = dims_usize(t)?;
        let (rows_all, cols) = match dims[..] {
            [len] => (len, None),
            [cols, rows] => (rows, Some(cols)),
            _ => return Err(bad(t, "fused qkv must have 1 or 2 dimensions")),
        };
        let p = self.params;
        let units = p
            .kv_heads
            .checked_mul(2)
            .and_then(|k| k.checked_add(p.heads))
            .unwrap_or(0);
        if units == 0 || !rows_all.is_multiple_of(units) {
            return Err(bad(t, format!("rows are not (heads + 2 kv heads) = {units} heads")));
        }
        let head_dim = rows_all / units;
        let parts = [
            ("q_proj", 0, p.heads),
            ("k_proj", p.heads, p.kv_heads),
            ("v_proj", p.heads + p.kv_heads, p.kv_heads),
        ];
        for (part, first_head, heads) in parts {
            let rows = heads * head_dim;
            let first = first_head * head_dim;
            let source = if p.permute_qk && part != "v_proj" {
                Source::PermutedRows {
                    tensor: index,
                    first,
                    heads,
                }
            } else {
                Source::Rows { tensor: index, first }
            };
            let shape = match cols {
                Some(cols) => vec![rows, cols],
                None => vec![rows],
            };
            self.add(
                index,
                format!("{prefix}.self_attn.{part}.{kind}"),
                Entry { shape, source },
            )?;
        }
        Ok(())
    }

    fn kv_b(&mut self, layer: usize, k_b: usize, v_b: usize) -> Result<(), GgufError> {
        let (k, v) = (&self.tensors[k_b], &self.tensors[v_b]);
        let (kd, vd) = (dims_usize(k)?, dims_usize(v)?);
        let ([nope, rank_k, heads_k], [rank_v, v_dim, heads_v]) = (&kd[..], &vd[..]) else {
            return Err(bad(k, "attn_k_b and attn_v_b must both have 3 dimensions"));
        };
        if rank_k != rank_v || heads_k != heads_v {
            return Err(bad(
                k,
                format!(
                    "does not match attn_v_b dims {:?} (kv_lora_rank and heads must agree)",
                    v.dims
                ),
            ));
        }
        let rows = nope
            .checked_add(*v_dim)
            .and_then(|width| width.checked_mul(*heads_k))
            .ok_or_else(|| bad(k, "kv_b_proj size overflows"))?;
        let entry = Entry {
            shape: vec![rows, *rank_k],
            source: Source::KvB { k_b, v_b },
        };
        self.add(k_b, format!("model.layers.{layer}.self_attn.kv_b_proj.weight"), entry)
    }
}

/// Maps every tensor of a file.
pub fn map_tensors(tensors: &[TensorInfo], params: &MappingParams) -> Result<Mapping, GgufError> {
    let mut b = Builder {
        tensors,
        params,
        entries: HashMap::new(),
        unmapped: Vec::new(),
    };
    // layer → (attn_k_b, attn_v_b)
    let mut split: HashMap<usize, (Option<usize>, Option<usize>)> = HashMap::new();
    for (index, t) in tensors.iter().enumerate() {
        let global = match t.name.as_str() {
            "token_embd.weight" => Some("model.embed_tokens.weight"),
            "output_norm.weight" => Some("model.norm.weight"),
            "output.weight" => Some("lm_head.weight"),
            // Consumed by the config (llama3 rope scaling).
            "rope_freqs.weight" => continue,
            _ => None,
        };
        if let Some(hf) = global {
            b.whole(index, hf.into(), None)?;
            continue;
        }
        let Some((layer, rest)) = t
            .name
            .strip_prefix("blk.")
            .and_then(|r| r.split_once('.'))
            .and_then(|(n, rest)| Some((n.parse::<usize>().ok()?, rest)))
        else {
            b.unmapped.push(t.name.clone());
            continue;
        };
        let p = format!("model.layers.{layer}");
        let heads = match rest {
            "attn_q.weight" | "attn_q.bias" if params.permute_qk => Some(params.heads),
            "attn_k.weight" | "attn_k.bias" if params.permute_qk => Some(params.kv_heads),
            _ => None,
        };
        if let Some(suffix) = layer_suffix(rest) {
            b.whole(index, format!("{p}.{suffix}"), heads)?;
            continue;
        }
        match rest {
            "ffn_gate_exps.weight" => b.experts(index, &format!("{p}.mlp"), &["gate_proj.weight"])?,
            "ffn_up_exps.weight" => b.experts(index, &format!("{p}.mlp"), &["up_proj.weight"])?,
            "ffn_down_exps.weight" => b.experts(index, &format!("{p}.mlp"), &["down_proj.weight"])?,
            "ffn_gate_up_exps.weight" => {
                b.experts(index, &format!("{p}.mlp"), &["gate_proj.weight", "up_proj.weight"])?
            }
            "attn_qkv.weight" => b.qkv(index, &p, "weight")?,
            "attn_qkv.bias" => b.qkv(index, &p, "bias")?,
            "attn_k_b.weight" => split.entry(layer).or_default().0 = Some(index),
            "attn_v_b.weight" => split.entry(layer).or_default().1 = Some(index),
            _ => b.unmapped.push(t.name.clone()),
        }
    }
    let mut layers: Vec<_> = split.into_iter().collect();
    layers.sort_by_key(|(layer, _)| *layer);
    for (layer, pair) in layers {
        match pair {
            (Some(k), Some(v)) => b.kv_b(layer, k, v)?,
            (Some(one), None) | (None, Some(one)) => {
                return Err(bad(
                    &tensors[one],
                    "attn_k_b and attn_v_b come in pairs; the other half is missing",
                ))
            }
            (None, None) => {}
        }
    }
    Ok(Mapping {
        entries: b.entries,
        unmapped: b.unmapped,
    })
}

/// The HF row index `r` of a permuted block of `rows` rows (`heads` heads) is stored at the
/// returned row: within a head, HF row `j·half + i` sits at `2i + j`.
pub fn stored_row(r: usize, rows: usize, heads: usize) -> usize {
    let head_dim = rows / heads;
    let half = head_dim / 2;
    let (head, within) = (r / head_dim, r % head_dim);
    let (j, i) = (within / half, within % half);
    head * head_dim + 2 * i + j
}

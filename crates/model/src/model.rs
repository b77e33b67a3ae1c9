//! What every architecture offers the engine: a forward pass over a flat batch of tokens drawn
//! from many sequences, reading and writing a paged KV cache.

use std::collections::BTreeMap;

use r1serve_kernels::{Backend, PagedKvCache, SeqSpan, WeightMatrix};
use serde::Serialize;

use crate::error::{ModelError, Result};

/// Which rows of logits a sequence wants back from a forward pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogitsWanted {
    /// None (a prefill chunk that is not the prompt's last).
    None,
    /// The last token's (decode, or the end of a prompt).
    Last,
    /// Every token's (prompt log-probabilities).
    All,
}

/// One sequence's share of a batch: `tokens` at positions `start_pos..`, whose KV slots (earlier
/// positions included) are addressed through `block_table`.
#[derive(Clone, Copy, Debug)]
pub struct SeqInput<'a> {
    pub tokens: &'a [u32],
    pub start_pos: usize,
    pub block_table: &'a [u32],
    pub logits: LogitsWanted,
}

/// A flat batch: the sequences' tokens are processed together, one weight pass for all.
#[derive(Clone, Debug, Default)]
pub struct Batch<'a> {
    pub seqs: Vec<SeqInput<'a>>,
}

impl<'a> Batch<'a> {
    pub fn single(seq: SeqInput<'a>) -> Self {
        Self { seqs: vec![seq] }
    }

    pub fn num_tokens(&self) -> usize {
        self.seqs.iter().map(|s| s.tokens.len()).sum()
    }

    /// Rows of logits `forward` writes, in sequence order.
    pub fn num_logit_rows(&self) -> usize {
        self.seqs
            .iter()
            .map(|s| match s.logits {
                LogitsWanted::None => 0,
                LogitsWanted::Last => 1.min(s.tokens.len()),
                LogitsWanted::All => s.tokens.len(),
            })
            .sum()
    }

    /// The kernels' view of the batch.
    pub fn spans(&self) -> Vec<SeqSpan<'a>> {
        self.seqs
            .iter()
            .map(|s| SeqSpan {
                start_pos: s.start_pos,
                len: s.tokens.len(),
                block_table: s.block_table,
            })
            .collect()
    }

    /// Checks token ids, positions and the cache before any work is done.
    pub fn validate(&self, info: &ModelInfo, cache: &PagedKvCache, kv_widths: &[usize]) -> Result<()> {
        if self.num_tokens() == 0 {
            return Err(ModelError::Batch("the batch has no tokens".into()));
        }
        if let Some(&id) = self
            .seqs
            .iter()
            .flat_map(|s| s.tokens)
            .find(|&&id| id as usize >= info.vocab_size)
        {
            return Err(ModelError::Batch(format!(
                "token id {id} is outside the vocabulary of {} tokens",
                info.vocab_size
            )));
        }
        for s in &self.seqs {
            let end = s.start_pos.checked_add(s.tokens.len());
            if end.is_none_or(|end| end > info.max_position_embeddings) {
                return Err(ModelError::Batch(format!(
                    "positions from {} for {} tokens exceed the model's context of {} tokens",
                    s.start_pos,
                    s.tokens.len(),
                    info.max_position_embeddings
                )));
            }
        }
        if cache.num_layers() != kv_widths.len() || (0..kv_widths.len()).any(|l| cache.width(l) != kv_widths[l]) {
            return Err(ModelError::Batch(
                "the KV cache was not built for this model (layer count or entry width differ)".into(),
            ));
        }
        cache.validate(&self.spans())?;
        Ok(())
    }
}

/// Facts about a loaded model the engine and CLI need.
#[derive(Clone, Debug, Serialize)]
pub struct ModelInfo {
    pub architecture: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub max_position_embeddings: usize,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

/// A causal language model ready to run.
pub trait CausalLm: Send + Sync {
    fn info(&self) -> &ModelInfo;

    /// Floats per token per layer in the KV cache (MLA: latent + rope part).
    fn kv_entry_widths(&self) -> Vec<usize>;

    /// Weight bytes one decoded token reads: every matrix it multiplies by (for MoE, only the
    /// experts it is routed to) plus one embedding row. The decode roofline is bandwidth / this.
    fn weight_bytes_per_token(&self) -> u64;

    /// The format of the bulk of the weights, as `bench` reports it (e.g. `BF16`; `Q4_K` for a
    /// Q4_K_M file, whose output matrix and half its `ffn_down`s are `Q6_K`).
    fn weight_format(&self) -> &'static str;

    /// Has the backend prepare the weights a short warm-up prompt does not reach (MoE experts it
    /// is not routed to), so that their first use while serving costs no more than later ones.
    fn prepare_weights(&self) {}

    /// Runs `batch`: stores its tokens' KV entries in `cache` and overwrites `logits` with
    /// `[batch.num_logit_rows(), vocab]` rows, in sequence order.
    fn forward(&self, batch: &Batch, cache: &mut PagedKvCache, logits: &mut Vec<f32>) -> Result<()>;
}

/// A model's shape as `inspect` reports it, from the config alone.
#[derive(Clone, Debug, Serialize)]
pub struct ModelSummary {
    pub architecture: String,
    pub num_layers: usize,
    pub hidden_size: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    /// All parameters in the checkpoint's main model (MTP layers excluded).
    pub params_total: u64,
    /// Parameters one token's forward pass uses (routed experts counted `top_k` times, not all).
    pub params_active: u64,
    /// Parameters of the multi-token-prediction layers, not run.
    pub params_mtp: u64,
    /// KV-cache elements per token over all layers; bytes depend on the cache dtype.
    pub kv_elements_per_token: u64,
    pub attention: String,
    pub moe: Option<MoeShape>,
    pub weight_dtypes: BTreeMap<String, usize>,
}

#[derive(Clone, Debug, Serialize)]
pub struct MoeShape {
    pub routed_experts: usize,
    pub shared_experts: usize,
    pub experts_per_token: usize,
    pub expert_intermediate_size: usize,
    pub moe_layers: usize,
    pub dense_layers: usize,
    pub scoring: String,
    pub topk_method: String,
    pub n_group: usize,
    pub topk_group: usize,
}

/// Final norm, then the LM head on only the rows the batch asked for.
#[allow(clippy::too_many_arguments)]
pub(crate) fn project_logits(
    backend: &dyn Backend,
    batch: &Batch,
    hidden: &[f32],
    norm: &[f32],
    eps: f32,
    lm_head: &WeightMatrix,
    selected: &mut Vec<f32>,
    logits: &mut Vec<f32>,
) {
    let dim = norm.len();
    selected.clear();
    let mut base = 0;
    for seq in &batch.seqs {
        let n = seq.tokens.len();
        let rows = match seq.logits {
            LogitsWanted::None => 0..0,
            LogitsWanted::Last => n.saturating_sub(1)..n,
            LogitsWanted::All => 0..n,
        };
        selected.extend_from_slice(&hidden[(base + rows.start) * dim..(base + rows.end) * dim]);
        base += n;
    }
    let rows = selected.len() / dim;
    let normed_len = selected.len();
    selected.resize(normed_len * 2, 0.0);
    let (input, normed) = selected.split_at_mut(normed_len);
    backend.rms_norm(input, norm, eps, normed);
    logits.resize(rows * lm_head.rows(), 0.0);
    backend.matmul(normed, lm_head, logits);
}

/// Gathers the batch's token ids (into the reused `ids`) and their embeddings into `x`.
pub(crate) fn embed_batch(
    backend: &dyn Backend,
    table: &WeightMatrix,
    batch: &Batch,
    ids: &mut Vec<u32>,
    x: &mut [f32],
) {
    ids.clear();
    ids.extend(batch.seqs.iter().flat_map(|seq| seq.tokens.iter().copied()));
    backend.embedding(table, ids, x);
}

/// Grows `buf` to `len` (never shrinks, so steady-state decode allocates nothing).
pub(crate) fn ensure(buf: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    &mut buf[..len]
}

/// Adds a per-feature bias to every row of `x`.
pub(crate) fn add_bias(backend: &dyn Backend, x: &mut [f32], bias: &[f32]) {
    for row in x.chunks_exact_mut(bias.len()) {
        backend.add_assign(row, bias);
    }
}

/// The format holding the most stored bytes among `matrices` (the first such one on a tie; `F32`
/// for none): the bulk of a mixed file such as Q4_K_M.
pub(crate) fn bulk_format<'a>(matrices: impl IntoIterator<Item = &'a WeightMatrix>) -> &'static str {
    let mut bytes: Vec<(&'static str, usize)> = Vec::new();
    for m in matrices {
        let name = m.format().name();
        match bytes.iter_mut().find(|(n, _)| *n == name) {
            Some((_, b)) => *b += m.stored_bytes(),
            None => bytes.push((name, m.stored_bytes())),
        }
    }
    bytes
        .into_iter()
        .reduce(|best, next| if next.1 > best.1 { next } else { best })
        .map_or("F32", |(name, _)| name)
}

#[cfg(test)]
mod tests {
    use r1serve_kernels::{ByteView, WeightFormat};

    use super::*;

    fn matrix(rows: usize, format: WeightFormat) -> WeightMatrix {
        let values = vec![0.5f32; rows * 256];
        let bytes = r1serve_kernels::quant::quantize(format, &values).unwrap();
        WeightMatrix::new(rows, 256, format, ByteView::from_vec(bytes)).unwrap()
    }

    /// A Q4_K_M-like mix is named by its `Q4_K` bulk even when a `Q6_K` matrix comes first; the
    /// larger share wins whatever the order; no matrices reads as F32.
    #[test]
    fn bulk_format_counts_bytes() {
        let (q6, q4) = (matrix(4, WeightFormat::Q6K), matrix(8, WeightFormat::Q4K));
        assert!(q4.stored_bytes() > q6.stored_bytes());
        assert_eq!(bulk_format([&q6, &q4]), "Q4_K");
        let more_q6 = matrix(16, WeightFormat::Q6K);
        assert_eq!(bulk_format([&q4, &q6, &more_q6]), "Q6_K");
        assert_eq!(bulk_format(std::iter::empty()), "F32");
    }
}

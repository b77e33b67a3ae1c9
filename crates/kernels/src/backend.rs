//! The backend seam: the op set a model is written against.
//!
//! Activations cross the seam as host `f32` slices; a device backend keeps its own copies of the
//! weights (it is handed [`WeightMatrix`]es, which it may upload once) and of the KV cache.

use crate::kv_cache::PagedKvCache;
use crate::rope::RopeTable;
use crate::weight::WeightMatrix;

/// What a matmul does with its f32 activations where the weights are BF16 or FP8.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MatmulPrecision {
    /// Rounded once to BF16 (to nearest even: relative error ≤ 2⁻⁹ each), as llama.cpp and
    /// PyTorch's bf16 inference do, so the products run on BF16 instructions (`vdpbf16ps`: twice
    /// the multiply-adds of f32 per instruction; FP8 weights widen to BF16 exactly). BF16 × BF16
    /// products are exact in f32, so every kernel path gives the same sums up to summation
    /// order.
    #[default]
    Bf16,
    /// Kept f32: every product exact, as in an f32 reference on the same weights.
    F32,
}

impl MatmulPrecision {
    /// What the activations of BF16 and FP8 products are rounded to: `bf16` or `f32`.
    pub fn name(self) -> &'static str {
        match self {
            MatmulPrecision::Bf16 => "bf16",
            MatmulPrecision::F32 => "f32",
        }
    }
}

/// One sequence's tokens inside a flat batch: they are contiguous in the batch and sit at
/// positions `start_pos..start_pos + len` of the sequence, whose KV slots live in `block_table`.
#[derive(Clone, Copy, Debug)]
pub struct SeqSpan<'a> {
    pub start_pos: usize,
    pub len: usize,
    pub block_table: &'a [u32],
}

/// Where keys and values sit inside one KV-cache entry, and how query heads map onto them.
///
/// Multi-head / grouped attention stores `[k(kv_heads × d) | v(kv_heads × d)]`; absorbed MLA stores
/// one latent `[c(kv_lora_rank) | k_rope]` shared by all heads, whose key is the whole entry and
/// whose value is the `c` part.
#[derive(Clone, Copy, Debug)]
pub struct AttentionLayout {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub key_dim: usize,
    pub value_dim: usize,
    /// Offset between consecutive kv heads' keys.
    pub key_stride: usize,
    /// Offset of kv head 0's value inside the entry.
    pub value_offset: usize,
    /// Offset between consecutive kv heads' values.
    pub value_stride: usize,
}

impl AttentionLayout {
    /// The usual `[k | v]` layout of multi-head / grouped-query attention.
    pub fn multi_head(n_heads: usize, n_kv_heads: usize, head_dim: usize) -> Self {
        Self {
            n_heads,
            n_kv_heads,
            key_dim: head_dim,
            value_dim: head_dim,
            key_stride: head_dim,
            value_offset: n_kv_heads * head_dim,
            value_stride: head_dim,
        }
    }

    /// Absorbed MLA: one shared latent entry of `latent_dim + rope_dim` values.
    pub fn latent(n_heads: usize, latent_dim: usize, rope_dim: usize) -> Self {
        Self {
            n_heads,
            n_kv_heads: 1,
            key_dim: latent_dim + rope_dim,
            value_dim: latent_dim,
            key_stride: 0,
            value_offset: 0,
            value_stride: 0,
        }
    }

    /// Floats one token occupies in the cache.
    pub fn entry_width(&self) -> usize {
        if self.key_stride == 0 {
            self.key_dim.max(self.value_offset + self.value_dim)
        } else {
            self.value_offset + self.n_kv_heads * self.value_stride
        }
    }
}

/// The op set. Shapes are given in the doc of each op; slices are row-major.
pub trait Backend: Send + Sync {
    fn name(&self) -> &'static str;

    /// `out[n, w.rows] = x[n, w.cols] · wᵀ`, at the backend's [`MatmulPrecision`].
    fn matmul(&self, x: &[f32], w: &WeightMatrix, out: &mut [f32]);

    /// [`Backend::matmul`] with f32 activations whatever the backend's precision: for products
    /// that feed discrete choices (the MoE router's expert selection, which transformers also
    /// computes in f32), where a BF16 rounding can flip an expert.
    fn matmul_f32(&self, x: &[f32], w: &WeightMatrix, out: &mut [f32]);

    /// One token's products with a matrix per head: `out[h·out_stride..][..w_h.rows] =
    /// w_h · x[h·x_stride..][..w_h.cols]` for each `w_h` of `weights` (the absorbed attention's
    /// `W_UK_hᵀ` and `W_UV_h`). A backend may run the heads as one job rather than one per head.
    fn matmul_heads(&self, x: &[f32], x_stride: usize, weights: &[WeightMatrix], out: &mut [f32], out_stride: usize) {
        for (h, w) in weights.iter().enumerate() {
            self.matmul(
                &x[h * x_stride..][..w.cols()],
                w,
                &mut out[h * out_stride..][..w.rows()],
            );
        }
    }

    /// Builds now what the backend would otherwise build on `w`'s first use (its own copy of the
    /// weights), so that it does not happen while serving.
    fn prepare_weight(&self, w: &WeightMatrix) {
        let _ = w;
    }

    /// Row-wise RMS norm: `out[r] = x[r] / rms(x[r]) * weight`, rows of `weight.len()`.
    fn rms_norm(&self, x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]);

    /// `out = silu(gate) * up`.
    fn silu_mul(&self, gate: &[f32], up: &[f32], out: &mut [f32]);

    /// `acc += x`.
    fn add_assign(&self, acc: &mut [f32], x: &[f32]);

    /// Gathers rows of `table` (`[vocab, dim]`) into `out[ids.len(), dim]`.
    fn embedding(&self, table: &WeightMatrix, ids: &[u32], out: &mut [f32]);

    /// Rotates, for every token and head of `x` (`[n_tokens, n_heads, head_stride]`), the
    /// `table.dim()` values starting at `offset` by the token's position.
    fn rope(&self, x: &mut [f32], spans: &[SeqSpan], head_stride: usize, offset: usize, table: &RopeTable);

    /// Writes `entries` (`[n_tokens, width]`) into layer `layer` of the cache at the spans' slots.
    fn kv_store(&self, cache: &mut PagedKvCache, layer: usize, spans: &[SeqSpan], entries: &[f32]);

    /// Causal attention of `q` (`[n_tokens, n_heads, key_dim]`) over each token's sequence in the
    /// cache (positions `0..=pos`), into `out` (`[n_tokens, n_heads, value_dim]`).
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        q: &[f32],
        spans: &[SeqSpan],
        cache: &PagedKvCache,
        layer: usize,
        layout: &AttentionLayout,
        scale: f32,
        out: &mut [f32],
    );
}

//! Multi-head latent attention in absorbed form.
//!
//! The cache holds one latent entry per token: `[kv_a_layernorm(c_kv) (kv_lora_rank) | rope(k_pe)
//! (qk_rope_head_dim)]`. Keys and values are never expanded per head: the query's no-rope part is
//! pulled through `W_UK` (the key rows of `kv_b_proj`) into latent space,
//! `q_abs_h = W_UK_hᵀ · q_nope_h`, so `q_h · k_h = [q_abs_h | q_pe_h] · [c_kv | k_pe]`; attention
//! then returns a latent vector per head, which `W_UV_h` (the value rows) maps to `v_head_dim`.

use r1serve_kernels::{
    AttentionLayout, Backend, ByteView, PagedKvCache, RopeTable, SeqSpan, WeightFormat, WeightMatrix,
};

use super::config::DeepseekConfig;
use crate::error::{ModelError, Result};
use crate::model::ensure;
use crate::weights::{HeadMatrices, KvBShape, WeightStore};

/// eps of `q_a_layernorm` / `kv_a_layernorm`: both references build them with the RMSNorm default
/// (1e-6), not the config's `rms_norm_eps`.
const LATENT_NORM_EPS: f32 = 1e-6;

/// The query projection: low-rank with a norm in between (V3, V2), or one matrix (V2-Lite).
pub enum QueryProj {
    LowRank {
        a: WeightMatrix,
        norm: Vec<f32>,
        b: WeightMatrix,
    },
    Full(WeightMatrix),
}

/// One layer's attention weights.
pub struct Mla {
    q: QueryProj,
    /// `[kv_lora_rank + rope, hidden]`.
    kv_a: WeightMatrix,
    kv_a_norm: Vec<f32>,
    /// Per head `W_UK_hᵀ`: `[kv_lora_rank, qk_nope]`, cut from `kv_b_proj` (see [`split_kv_b`]).
    uk_t: Vec<WeightMatrix>,
    /// Per head `W_UV_h`: `[v_head_dim, kv_lora_rank]`, likewise.
    uv: Vec<WeightMatrix>,
    /// `[hidden, heads * v_head_dim]`.
    o: WeightMatrix,
}

/// Sizes the forward pass needs, copied out of the config.
#[derive(Clone, Copy, Debug)]
pub struct MlaShape {
    pub heads: usize,
    pub nope: usize,
    pub rope: usize,
    pub v: usize,
    pub kv_lora: usize,
    pub q_lora: Option<usize>,
}

impl MlaShape {
    pub fn new(cfg: &DeepseekConfig) -> Self {
        Self {
            heads: cfg.num_heads,
            nope: cfg.qk_nope_head_dim,
            rope: cfg.qk_rope_head_dim,
            v: cfg.v_head_dim,
            kv_lora: cfg.kv_lora_rank,
            q_lora: cfg.q_lora_rank,
        }
    }

    fn qk(&self) -> usize {
        self.nope + self.rope
    }

    /// Width of a cache entry and of an absorbed query head.
    pub fn latent_width(&self) -> usize {
        self.kv_lora + self.rope
    }

    pub fn layout(&self) -> AttentionLayout {
        AttentionLayout::latent(self.heads, self.kv_lora, self.rope)
    }
}

/// Per-forward buffers, reused across steps.
#[derive(Default)]
pub struct MlaScratch {
    q_a: Vec<f32>,
    q_a_normed: Vec<f32>,
    q: Vec<f32>,
    kv: Vec<f32>,
    latent: Vec<f32>,
    latent_normed: Vec<f32>,
    entries: Vec<f32>,
    q_abs: Vec<f32>,
    head_in: Vec<f32>,
    head_out: Vec<f32>,
    attn: Vec<f32>,
    values: Vec<f32>,
}

impl Mla {
    /// The projections as stored (not the absorbed per-head matrices cut from `kv_b_proj`).
    pub fn stored_matrices(&self) -> impl Iterator<Item = &WeightMatrix> {
        let (q, q_b) = match &self.q {
            QueryProj::LowRank { a, b, .. } => (a, Some(b)),
            QueryProj::Full(q) => (q, None),
        };
        [q].into_iter().chain(q_b).chain([&self.kv_a, &self.o])
    }

    /// Weight bytes one token's attention reads (the absorbed per-head matrices as kept).
    pub fn bytes_per_token(&self) -> usize {
        let absorbed = self.uk_t.iter().chain(&self.uv);
        self.stored_matrices()
            .chain(absorbed)
            .map(WeightMatrix::stored_bytes)
            .sum()
    }

    /// Loads layer `prefix` (`model.layers.{i}`); every shape is checked.
    pub fn load(store: &WeightStore, prefix: &str, shape: &MlaShape, hidden: usize) -> Result<Self> {
        let p = format!("{prefix}.self_attn");
        let (h, qk, r) = (shape.heads, shape.qk(), shape.kv_lora);
        let q = match shape.q_lora {
            Some(q_lora) => QueryProj::LowRank {
                a: store.matrix(&format!("{p}.q_a_proj.weight"), q_lora, hidden)?,
                norm: store.vector(&format!("{p}.q_a_layernorm.weight"), q_lora)?,
                b: store.matrix(&format!("{p}.q_b_proj.weight"), h * qk, q_lora)?,
            },
            None => QueryProj::Full(store.matrix(&format!("{p}.q_proj.weight"), h * qk, hidden)?),
        };
        let kv_b_name = format!("{p}.kv_b_proj.weight");
        let kv_b_shape = KvBShape {
            heads: h,
            nope: shape.nope,
            v: shape.v,
            rank: r,
        };
        let (uk_t, uv) = match store.split_kv_b(&kv_b_name, kv_b_shape)? {
            Some(split) => split,
            None => {
                let kv_b = store.matrix(&kv_b_name, h * (shape.nope + shape.v), r)?;
                split_kv_b(&kv_b, shape).map_err(|source| ModelError::Weight {
                    name: kv_b_name,
                    path: store.dir().to_owned(),
                    source,
                })?
            }
        };
        Ok(Self {
            q,
            kv_a: store.matrix(&format!("{p}.kv_a_proj_with_mqa.weight"), shape.latent_width(), hidden)?,
            kv_a_norm: store.vector(&format!("{p}.kv_a_layernorm.weight"), r)?,
            uk_t,
            uv,
            o: store.matrix(&format!("{p}.o_proj.weight"), hidden, h * shape.v)?,
        })
    }

    /// Attention of `x` (`[n, hidden]`, already normed) for the batch's tokens: stores their latent
    /// entries in layer `layer` of `cache` and writes the `o_proj` output to `out` (`[n, hidden]`).
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        be: &dyn Backend,
        shape: &MlaShape,
        x: &[f32],
        spans: &[SeqSpan],
        cache: &mut PagedKvCache,
        layer: usize,
        rope: &RopeTable,
        scale: f32,
        s: &mut MlaScratch,
        out: &mut [f32],
    ) {
        let n: usize = spans.iter().map(|sp| sp.len).sum();
        let (heads, nope, qk, r, w) = (shape.heads, shape.nope, shape.qk(), shape.kv_lora, shape.latent_width());

        // Queries: [n, heads, nope | rope], rope part rotated.
        let q = ensure(&mut s.q, n * heads * qk);
        match &self.q {
            QueryProj::LowRank { a, norm, b } => {
                let q_a = ensure(&mut s.q_a, n * a.rows()); // [n, q_lora]
                be.matmul(x, a, q_a);
                let q_a_normed = ensure(&mut s.q_a_normed, n * a.rows());
                be.rms_norm(q_a, norm, LATENT_NORM_EPS, q_a_normed);
                be.matmul(q_a_normed, b, q);
            }
            QueryProj::Full(wq) => be.matmul(x, wq, q),
        }
        be.rope(q, spans, qk, nope, rope);

        // Latent cache entries: [n, kv_lora | rope].
        let kv = ensure(&mut s.kv, n * w);
        be.matmul(x, &self.kv_a, kv);
        let latent = ensure(&mut s.latent, n * r);
        for (dst, src) in latent.chunks_exact_mut(r).zip(kv.chunks_exact(w)) {
            dst.copy_from_slice(&src[..r]);
        }
        let latent_normed = ensure(&mut s.latent_normed, n * r);
        be.rms_norm(latent, &self.kv_a_norm, LATENT_NORM_EPS, latent_normed);
        let entries = ensure(&mut s.entries, n * w);
        for ((entry, c), src) in entries
            .chunks_exact_mut(w)
            .zip(latent_normed.chunks_exact(r))
            .zip(kv.chunks_exact(w))
        {
            entry[..r].copy_from_slice(c);
            entry[r..].copy_from_slice(&src[r..]);
        }
        be.rope(entries, spans, w, r, rope);
        be.kv_store(cache, layer, spans, entries);

        // Absorbed queries: [n, heads, kv_lora | rope] with q_abs_h = W_UK_hᵀ q_nope_h; one
        // token's heads in one call (its heads' inputs and outputs lie at fixed strides).
        let q_abs = ensure(&mut s.q_abs, n * heads * w);
        if n == 1 {
            be.matmul_heads(q, qk, &self.uk_t, q_abs, w);
            for (dst, src) in q_abs.chunks_exact_mut(w).zip(q.chunks_exact(qk)) {
                dst[r..].copy_from_slice(&src[nope..]);
            }
        } else {
            for (h, uk_t) in self.uk_t.iter().enumerate() {
                let head_in = ensure(&mut s.head_in, n * nope); // [n, nope]
                for (dst, src) in head_in.chunks_exact_mut(nope).zip(q.chunks_exact(heads * qk)) {
                    dst.copy_from_slice(&src[h * qk..h * qk + nope]);
                }
                let head_out = ensure(&mut s.head_out, n * r); // [n, kv_lora]
                be.matmul(head_in, uk_t, head_out);
                for ((dst, absorbed), src) in q_abs
                    .chunks_exact_mut(heads * w)
                    .zip(head_out.chunks_exact(r))
                    .zip(q.chunks_exact(heads * qk))
                {
                    dst[h * w..h * w + r].copy_from_slice(absorbed);
                    dst[h * w + r..(h + 1) * w].copy_from_slice(&src[h * qk + nope..(h + 1) * qk]);
                }
            }
        }

        // Attention over the latent cache: a latent vector per head, [n, heads, kv_lora].
        let attn = ensure(&mut s.attn, n * heads * r);
        be.attention(q_abs, spans, cache, layer, &shape.layout(), scale, attn);

        // Values per head through W_UV_h: [n, heads, v].
        let v = shape.v;
        let values = ensure(&mut s.values, n * heads * v);
        if n == 1 {
            be.matmul_heads(attn, r, &self.uv, values, v);
        } else {
            for (h, uv) in self.uv.iter().enumerate() {
                let head_in = ensure(&mut s.head_in, n * r);
                for (dst, src) in head_in.chunks_exact_mut(r).zip(attn.chunks_exact(heads * r)) {
                    dst.copy_from_slice(&src[h * r..(h + 1) * r]);
                }
                let head_out = ensure(&mut s.head_out, n * v);
                be.matmul(head_in, uv, head_out);
                for (dst, src) in values.chunks_exact_mut(heads * v).zip(head_out.chunks_exact(v)) {
                    dst[h * v..(h + 1) * v].copy_from_slice(src);
                }
            }
        }
        be.matmul(values, &self.o, out);
    }
}

/// Splits `kv_b_proj` (`[heads * (nope + v), kv_lora]`, per head `nope` key rows then `v` value
/// rows) into per-head `W_UK_hᵀ` (`[kv_lora, nope]`) and `W_UV_h` (`[v, kv_lora]`), kept in the
/// stored format where the transpose allows it, so that decode reads no more bytes than the file
/// holds: F32, F16 and BF16 (elements moved as they are), and FP8 blocks where each head's key
/// and value rows fill whole block rows (R1's 128×128 blocks with `nope = v = 128`; a key block
/// transposed is a block of the transposed matrix, under the same scale). Block-quantised rows
/// (GGUF) cannot be transposed in their format and are decoded to f32.
fn split_kv_b(kv_b: &WeightMatrix, shape: &MlaShape) -> Result<HeadMatrices, r1serve_kernels::WeightError> {
    let (nope, v, r) = (shape.nope, shape.v, shape.kv_lora);
    let format = kv_b.format();
    let element = match format {
        WeightFormat::F32 | WeightFormat::F16 | WeightFormat::Bf16 => format.block_bytes(),
        WeightFormat::F8E4M3Block { block_rows, .. }
            if nope.is_multiple_of(block_rows) && v.is_multiple_of(block_rows) =>
        {
            1
        }
        _ => {
            return split_kv_b(
                &WeightMatrix::from_f32(kv_b.rows(), kv_b.cols(), &kv_b.to_f32())?,
                shape,
            )
        }
    };
    let mut uk_t = Vec::with_capacity(shape.heads);
    let mut uv = Vec::with_capacity(shape.heads);
    for head in 0..shape.heads {
        let first = head * (nope + v);
        let mut transposed = vec![0u8; r * nope * element];
        for d in 0..nope {
            for (c, value) in kv_b.row_bytes(first + d).chunks_exact(element).enumerate() {
                transposed[(c * nope + d) * element..][..element].copy_from_slice(value);
            }
        }
        let values: Vec<u8> = (first + nope..first + nope + v)
            .flat_map(|row| kv_b.row_bytes(row).iter().copied())
            .collect();
        let (keys, values) = (ByteView::from_vec(transposed), ByteView::from_vec(values));
        if let WeightFormat::F8E4M3Block { block_rows, block_cols } = format {
            // The block rows of this head's keys, then of its values, `per_row` scales each.
            let block_scales = |first_row: usize, rows: usize| {
                (first_row..first_row + rows)
                    .step_by(block_rows)
                    .map(|row| kv_b.row_block_scales(row))
                    .collect::<Vec<_>>()
            };
            let key_scales = block_scales(first, nope);
            let per_row = r.div_ceil(block_cols);
            let transposed_scales = (0..per_row)
                .flat_map(|c| key_scales.iter().map(move |row| row[c]))
                .collect();
            uk_t.push(WeightMatrix::new_fp8_block(
                r,
                nope,
                block_cols,
                block_rows,
                keys,
                transposed_scales,
            )?);
            let value_scales = block_scales(first + nope, v).concat();
            uv.push(WeightMatrix::new_fp8_block(
                v,
                r,
                block_rows,
                block_cols,
                values,
                value_scales,
            )?);
        } else {
            uk_t.push(WeightMatrix::new(r, nope, format, keys)?);
            uv.push(WeightMatrix::new(v, r, format, values)?);
        }
    }
    Ok((uk_t, uv))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The split over decoded values, element by element: the reference `split_kv_b` is held to.
    fn split_decoded_kv_b(kv_b: &[f32], shape: &MlaShape) -> Result<HeadMatrices, r1serve_kernels::WeightError> {
        let (nope, v, r) = (shape.nope, shape.v, shape.kv_lora);
        let mut uk_t = Vec::with_capacity(shape.heads);
        let mut uv = Vec::with_capacity(shape.heads);
        let mut transposed = vec![0.0f32; r * nope];
        for head in kv_b.chunks_exact((nope + v) * r).take(shape.heads) {
            let (keys, values) = head.split_at(nope * r);
            for (d, row) in keys.chunks_exact(r).enumerate() {
                for (c, &value) in row.iter().enumerate() {
                    transposed[c * nope + d] = value;
                }
            }
            uk_t.push(WeightMatrix::from_f32(r, nope, &transposed)?);
            uv.push(WeightMatrix::from_f32(v, r, values)?);
        }
        Ok((uk_t, uv))
    }

    #[test]
    fn kv_b_split_rows_and_transpose() {
        let shape = MlaShape {
            heads: 2,
            nope: 2,
            rope: 2,
            v: 1,
            kv_lora: 3,
            q_lora: None,
        };
        // Row k of head h holds values 100h + 10k + c.
        let kv_b: Vec<f32> = (0..2)
            .flat_map(|h| (0..3).flat_map(move |k| (0..3).map(move |c| (100 * h + 10 * k + c) as f32)))
            .collect();
        let (uk_t, uv) = split_kv_b(&WeightMatrix::from_f32(6, 3, &kv_b).unwrap(), &shape).unwrap();
        assert_eq!(uk_t[1].to_f32(), vec![100.0, 110.0, 101.0, 111.0, 102.0, 112.0]);
        assert_eq!(uv[0].to_f32(), vec![20.0, 21.0, 22.0]);
        assert_eq!(uv[1].to_f32(), vec![120.0, 121.0, 122.0]);
    }

    /// Cut from the stored bytes, each per-head matrix holds exactly the values of the decoded
    /// split, in the stored format (F32, F16, BF16; FP8 whose heads fill whole block rows, its
    /// scales moved with the blocks), or in f32 (FP8 blocks that straddle heads, `Q8_0`).
    #[test]
    fn kv_b_keeps_its_format() {
        let shape = MlaShape {
            heads: 3,
            nope: 4,
            rope: 2,
            v: 2,
            kv_lora: 64,
            q_lora: None,
        };
        let rows = shape.heads * (shape.nope + shape.v);
        let values: Vec<f32> = (0..rows * shape.kv_lora)
            .map(|i| ((i * 7919 % 201) as f32 - 100.0) / 64.0)
            .collect();
        let bits =
            |to_bits: fn(f32) -> u16| -> Vec<u8> { values.iter().flat_map(|&x| to_bits(x).to_le_bytes()).collect() };
        let fp8 = |block_rows, block_cols| {
            r1serve_kernels::quant::fp8::quantize_fp8_blocks(rows, shape.kv_lora, block_rows, block_cols, &values)
                .unwrap()
        };
        let q8_0 = r1serve_kernels::quant::quantize(WeightFormat::Q8_0, &values).unwrap();
        let cases = [
            (WeightMatrix::from_f32(rows, shape.kv_lora, &values).unwrap(), true),
            (
                WeightMatrix::new(
                    rows,
                    shape.kv_lora,
                    WeightFormat::Bf16,
                    ByteView::from_vec(bits(|x| half::bf16::from_f32(x).to_bits())),
                )
                .unwrap(),
                true,
            ),
            (
                WeightMatrix::new(
                    rows,
                    shape.kv_lora,
                    WeightFormat::F16,
                    ByteView::from_vec(bits(|x| half::f16::from_f32(x).to_bits())),
                )
                .unwrap(),
                true,
            ),
            (fp8(2, 32), true),
            (fp8(2, 5), true),
            (fp8(4, 32), false),
            (
                WeightMatrix::new(rows, shape.kv_lora, WeightFormat::Q8_0, ByteView::from_vec(q8_0)).unwrap(),
                false,
            ),
        ];
        for (kv_b, kept) in cases {
            let (uk_t, uv) = split_kv_b(&kv_b, &shape).unwrap();
            let (want_uk_t, want_uv) = split_decoded_kv_b(&kv_b.to_f32(), &shape).unwrap();
            let (uv_format, uk_t_format) = match (kept, kv_b.format()) {
                (false, _) => (WeightFormat::F32, WeightFormat::F32),
                (true, WeightFormat::F8E4M3Block { block_rows, block_cols }) => (
                    kv_b.format(),
                    WeightFormat::F8E4M3Block {
                        block_rows: block_cols,
                        block_cols: block_rows,
                    },
                ),
                (true, format) => (format, format),
            };
            let pairs = uk_t.iter().zip(&want_uk_t).map(|pair| (pair, uk_t_format));
            for ((got, want), format) in pairs.chain(uv.iter().zip(&want_uv).map(|pair| (pair, uv_format))) {
                assert_eq!(got.format(), format, "{:?}", kv_b.format());
                assert_eq!((got.rows(), got.cols()), (want.rows(), want.cols()));
                assert_eq!(got.to_f32(), want.to_f32(), "{:?}", kv_b.format());
            }
        }
    }
}

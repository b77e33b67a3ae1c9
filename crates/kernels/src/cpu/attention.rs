//! Causal attention over the paged KV cache, one pass per (token, head) with an online softmax.

use super::dot::dot_f32;
use super::pool;

use crate::backend::{AttentionLayout, SeqSpan};
use crate::kv_cache::PagedKvCache;

/// See [`crate::Backend::attention`].
pub fn attention(
    q: &[f32],
    spans: &[SeqSpan],
    cache: &PagedKvCache,
    layer: usize,
    layout: &AttentionLayout,
    scale: f32,
    out: &mut [f32],
) {
    let (n_heads, kd, vd) = (layout.n_heads, layout.key_dim, layout.value_dim);
    let group = n_heads / layout.n_kv_heads.max(1);
    let mut token_base = 0;
    for span in spans {
        let q_span = &q[token_base * n_heads * kd..(token_base + span.len) * n_heads * kd];
        let out_span = &mut out[token_base * n_heads * vd..(token_base + span.len) * n_heads * vd];
        pool::for_each_chunk_mut(out_span, vd, |index, acc| {
            let (t, h) = (index / n_heads, index % n_heads);
            let kv_head = h / group.max(1);
            let query = &q_span[index * kd..(index + 1) * kd];
            let key_at = kv_head * layout.key_stride;
            let value_at = layout.value_offset + kv_head * layout.value_stride;
            let last = span.start_pos + t;
            acc.fill(0.0);
            let (mut max, mut denom) = (f32::NEG_INFINITY, 0.0f32);
            for pos in 0..=last {
                let entry = cache.entry(layer, cache.slot(span.block_table, pos));
                let key = &entry[key_at..key_at + kd];
                let score = dot_f32(query, key) * scale;
                if score > max {
                    // Rescale what was accumulated under the old maximum.
                    let correction = (max - score).exp();
                    denom *= correction;
                    acc.iter_mut().for_each(|a| *a *= correction);
                    max = score;
                }
                let p = (score - max).exp();
                denom += p;
                for (a, v) in acc.iter_mut().zip(&entry[value_at..value_at + vd]) {
                    *a += p * v;
                }
            }
            let inv = 1.0 / denom;
            acc.iter_mut().for_each(|a| *a *= inv);
        });
        token_base += span.len;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// f64 reference: softmax(q·k * scale) · v over positions 0..=pos, from dense K/V arrays.
    #[allow(clippy::too_many_arguments)]
    fn reference(q: &[f32], k: &[Vec<f64>], v: &[Vec<f64>], pos: usize, scale: f64) -> Vec<f64> {
        let scores: Vec<f64> = (0..=pos)
            .map(|p| q.iter().zip(&k[p]).map(|(a, b)| *a as f64 * b).sum::<f64>() * scale)
            .collect();
        let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
        let total: f64 = weights.iter().sum();
        let mut out = vec![0.0; v[0].len()];
        for (p, w) in weights.iter().enumerate() {
            for (o, x) in out.iter_mut().zip(&v[p]) {
                *o += w / total * x;
            }
        }
        out
    }

    #[test]
    fn grouped_query_attention_over_paged_blocks() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let (n_heads, n_kv, hd, bs) = (4, 2, 5, 3);
        let layout = AttentionLayout::multi_head(n_heads, n_kv, hd);
        let width = layout.entry_width();
        let mut cache = PagedKvCache::new(bs, 6, &[width]);
        // A sequence of 7 tokens in non-contiguous blocks; the last 2 are the queries.
        let table = [4u32, 1, 5];
        let entries: Vec<Vec<f32>> = (0..7)
            .map(|_| (0..width).map(|_| rng.random_range(-1.0..1.0)).collect())
            .collect();
        for (pos, e) in entries.iter().enumerate() {
            let slot = cache.slot(&table, pos);
            cache.entry_mut(0, slot).copy_from_slice(e);
        }
        let span = SeqSpan {
            start_pos: 5,
            len: 2,
            block_table: &table,
        };
        let q: Vec<f32> = (0..2 * n_heads * hd).map(|_| rng.random_range(-1.0..1.0)).collect();
        let mut out = vec![0.0; 2 * n_heads * hd];
        attention(&q, &[span], &cache, 0, &layout, 0.4, &mut out);
        for t in 0..2 {
            for h in 0..n_heads {
                let kvh = h / 2;
                let k: Vec<Vec<f64>> = entries
                    .iter()
                    .map(|e| e[kvh * hd..(kvh + 1) * hd].iter().map(|&x| x as f64).collect())
                    .collect();
                let v: Vec<Vec<f64>> = entries
                    .iter()
                    .map(|e| {
                        e[n_kv * hd + kvh * hd..n_kv * hd + (kvh + 1) * hd]
                            .iter()
                            .map(|&x| x as f64)
                            .collect()
                    })
                    .collect();
                let qh = &q[(t * n_heads + h) * hd..(t * n_heads + h + 1) * hd];
                let expected = reference(qh, &k, &v, 5 + t, 0.4);
                let got = &out[(t * n_heads + h) * hd..(t * n_heads + h + 1) * hd];
                for (a, b) in got.iter().zip(&expected) {
                    assert!((*a as f64 - b).abs() < 1e-5, "{a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn latent_layout_uses_the_whole_entry_as_key() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let (n_heads, latent, rope) = (3, 6, 2);
        let layout = AttentionLayout::latent(n_heads, latent, rope);
        assert_eq!(layout.entry_width(), latent + rope);
        let mut cache = PagedKvCache::new(4, 1, &[layout.entry_width()]);
        let entries: Vec<Vec<f32>> = (0..3)
            .map(|_| (0..8).map(|_| rng.random_range(-1.0..1.0)).collect())
            .collect();
        for (pos, e) in entries.iter().enumerate() {
            cache.entry_mut(0, pos).copy_from_slice(e);
        }
        let q: Vec<f32> = (0..n_heads * 8).map(|_| rng.random_range(-1.0..1.0)).collect();
        let mut out = vec![0.0; n_heads * latent];
        let span = SeqSpan {
            start_pos: 2,
            len: 1,
            block_table: &[0],
        };
        attention(&q, &[span], &cache, 0, &layout, 0.7, &mut out);
        let k: Vec<Vec<f64>> = entries.iter().map(|e| e.iter().map(|&x| x as f64).collect()).collect();
        let v: Vec<Vec<f64>> = entries
            .iter()
            .map(|e| e[..latent].iter().map(|&x| x as f64).collect())
            .collect();
        for h in 0..n_heads {
            let expected = reference(&q[h * 8..(h + 1) * 8], &k, &v, 2, 0.7);
            for (a, b) in out[h * latent..(h + 1) * latent].iter().zip(&expected) {
                assert!((*a as f64 - b).abs() < 1e-5);
            }
        }
    }
}

//! Attention against an f64 reference: layouts, batches, long contexts split over tasks, both
//! cache dtypes, every instruction set.

use super::*;
use crate::cpu::dot::isa;
use crate::kv_cache::KvCacheDtype;
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

/// Writes a sequence's entries at its positions and returns what the cache holds (rounded
/// to F16 in an F16 cache): what the reference must see.
fn store(cache: &mut PagedKvCache, table: &[u32], entries: &[Vec<f32>]) -> Vec<Vec<f32>> {
    entries
        .iter()
        .enumerate()
        .map(|(pos, e)| {
            let slot = cache.slot(table, pos);
            cache.write_entry(0, slot, e);
            cache.read_entry(0, slot)
        })
        .collect()
}

/// Checks every head of one token's output (`out`, `q` its `[heads, hd]` rows) against the
/// f64 reference over `entries[..=pos]` in the multi-head layout of `n_kv` KV heads.
fn check_token(out: &[f32], q: &[f32], entries: &[Vec<f32>], pos: usize, n_kv: usize, hd: usize, what: &str) {
    let n_heads = q.len() / hd;
    for h in 0..n_heads {
        let kvh = h / (n_heads / n_kv);
        let part = |e: &Vec<f32>, at: usize| e[at..at + hd].iter().map(|&x| x as f64).collect();
        let k: Vec<Vec<f64>> = entries.iter().map(|e| part(e, kvh * hd)).collect();
        let v: Vec<Vec<f64>> = entries.iter().map(|e| part(e, (n_kv + kvh) * hd)).collect();
        let expected = reference(&q[h * hd..(h + 1) * hd], &k, &v, pos, 0.3);
        for (a, b) in out[h * hd..(h + 1) * hd].iter().zip(&expected) {
            assert!(
                (*a as f64 - b).abs() < 1e-4 * (1.0 + b.abs()),
                "{what}, head {h}: {a} vs {b}"
            );
        }
    }
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
        cache.write_entry(0, slot, e);
    }
    let span = SeqSpan {
        start_pos: 5,
        len: 2,
        block_table: &table,
    };
    let q: Vec<f32> = (0..2 * n_heads * hd).map(|_| rng.random_range(-1.0..1.0)).collect();
    let mut out = vec![0.0; 2 * n_heads * hd];
    attention(isa(), &q, &[span], &cache, 0, &layout, 0.4, &mut out);
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

/// Several sequences in one call (a decode batch beside a prompt chunk), each longer than a
/// chunk of positions, with scores large enough that later chunks raise the maximum: every
/// instruction set against the f64 reference, for head groups that stay whole and that split
/// (36 heads over 2 KV heads: groups of 18, tasks of 9).
#[test]
fn batch_of_sequences_over_several_chunks_on_every_isa() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let (bs, n_kv, hd) = (16, 2, 20);
    let cases = [2, 8, 12, 36]
        .into_iter()
        .flat_map(|h| [(h, KvCacheDtype::F32), (h, KvCacheDtype::F16)]);
    for (n_heads, dtype) in cases {
        let layout = AttentionLayout::multi_head(n_heads, n_kv, hd);
        let width = layout.entry_width();
        let mut cache = PagedKvCache::with_dtype(bs, 24, &[width], dtype);
        // Lengths 1, 70 (3 chunks) and 100, in scattered blocks; values grow with the
        // position so the running maximum moves.
        let lengths = [1usize, 70, 100];
        let tables: [Vec<u32>; 3] = [vec![23], vec![3, 9, 1, 17, 5], vec![0, 2, 4, 6, 8, 10, 12]];
        let mut entries = Vec::new();
        for (len, table) in lengths.iter().zip(&tables) {
            let seq: Vec<Vec<f32>> = (0..*len)
                .map(|pos| {
                    let grow = 1.0 + pos as f32 / 20.0;
                    (0..width).map(|_| rng.random_range(-grow..grow)).collect()
                })
                .collect();
            entries.push(store(&mut cache, table, &seq));
        }
        // Queries: the last token of the first two sequences, the last 3 of the third.
        let spans = [
            SeqSpan {
                start_pos: 0,
                len: 1,
                block_table: &tables[0],
            },
            SeqSpan {
                start_pos: 69,
                len: 1,
                block_table: &tables[1],
            },
            SeqSpan {
                start_pos: 97,
                len: 3,
                block_table: &tables[2],
            },
        ];
        let queries: Vec<(usize, usize)> = vec![(0, 0), (1, 69), (2, 97), (2, 98), (2, 99)];
        let q: Vec<f32> = (0..queries.len() * n_heads * hd)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        for isa in Isa::available() {
            let mut out = vec![f32::NAN; queries.len() * n_heads * hd];
            attention(isa, &q, &spans, &cache, 0, &layout, 0.3, &mut out);
            for (token, &(seq, pos)) in queries.iter().enumerate() {
                let rows = token * n_heads * hd..(token + 1) * n_heads * hd;
                let what = format!("{isa:?} {dtype:?} heads {n_heads}, token {token}");
                check_token(&out[rows.clone()], &q[rows], &entries[seq], pos, n_kv, hd, &what);
            }
        }
    }
}

/// Contexts long enough to be split over tasks (flash decoding): one long sequence alone (4
/// ranges) and beside a one-position sequence (2 ranges each; the short one's first range is
/// empty), every instruction set against the f64 reference, the running maximum rising late.
#[test]
fn long_contexts_split_over_tasks_on_every_isa() {
    for dtype in [KvCacheDtype::F32, KvCacheDtype::F16] {
        long_contexts_split_over_tasks(dtype);
    }
}

fn long_contexts_split_over_tasks(dtype: KvCacheDtype) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(17);
    let (bs, n_heads, n_kv, hd, long) = (16, 12, 2, 20, 700usize);
    let layout = AttentionLayout::multi_head(n_heads, n_kv, hd);
    let width = layout.entry_width();
    let blocks = long.div_ceil(bs);
    let mut cache = PagedKvCache::with_dtype(bs, blocks + 1, &[width], dtype);
    let long_table: Vec<u32> = (0..blocks as u32).rev().collect();
    let short_table = [blocks as u32];
    let entries: Vec<Vec<f32>> = (0..long)
        .map(|pos| {
            let grow = if pos > 600 { 3.0 } else { 1.0 };
            (0..width).map(|_| rng.random_range(-grow..grow)).collect()
        })
        .collect();
    let entries = store(&mut cache, &long_table, &entries);
    let short_entry: Vec<f32> = (0..width).map(|_| rng.random_range(-1.0..1.0)).collect();
    let short_entries = store(&mut cache, &short_table, &[short_entry]);
    let long_span = SeqSpan {
        start_pos: long - 1,
        len: 1,
        block_table: &long_table,
    };
    let short_span = SeqSpan {
        start_pos: 0,
        len: 1,
        block_table: &short_table,
    };
    let q: Vec<f32> = (0..2 * n_heads * hd).map(|_| rng.random_range(-1.0..1.0)).collect();
    for spans in [vec![long_span], vec![long_span, short_span]] {
        for isa in Isa::available() {
            let mut out = vec![f32::NAN; spans.len() * n_heads * hd];
            attention(isa, &q[..out.len()], &spans, &cache, 0, &layout, 0.3, &mut out);
            for (token, seq) in [&entries, &short_entries].into_iter().take(spans.len()).enumerate() {
                let rows = token * n_heads * hd..(token + 1) * n_heads * hd;
                let what = format!("{isa:?} {dtype:?} {} sequences, token {token}", spans.len());
                check_token(&out[rows.clone()], &q[rows], seq, seq.len() - 1, n_kv, hd, &what);
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
        cache.write_entry(0, pos, e);
    }
    let q: Vec<f32> = (0..n_heads * 8).map(|_| rng.random_range(-1.0..1.0)).collect();
    let mut out = vec![0.0; n_heads * latent];
    let span = SeqSpan {
        start_pos: 2,
        len: 1,
        block_table: &[0],
    };
    attention(isa(), &q, &[span], &cache, 0, &layout, 0.7, &mut out);
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

/// A batch with no tokens (no spans, or an empty one) is nothing to do, not a division by zero.
#[test]
fn no_tokens_is_nothing_to_do() {
    let layout = AttentionLayout::multi_head(4, 2, 8);
    let cache = PagedKvCache::new(4, 1, &[layout.entry_width()]);
    let empty = SeqSpan {
        start_pos: 0,
        len: 0,
        block_table: &[0],
    };
    for spans in [&[][..], &[empty][..]] {
        attention(isa(), &[], spans, &cache, 0, &layout, 0.3, &mut []);
    }
}

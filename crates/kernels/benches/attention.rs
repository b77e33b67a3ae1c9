//! One decoded token's attention over a long context, reported as GB/s of KV cache read (the
//! entries of every KV head, once): what a decode step at a reasoning trace's length spends
//! besides the weights.
//!
//! Each iteration reads the next of 28 layers' caches (a 1.5B model's), so the entries come from
//! DRAM as they do in a model, not from the L3.
//!
//! `cargo bench -p r1serve-kernels --bench attention -- --quick` (filter: e.g. `d2048`).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use r1serve_kernels::cpu::{self, dot::Isa};
use r1serve_kernels::{AttentionLayout, PagedKvCache, SeqSpan};
use rand::{Rng, SeedableRng};

const LAYERS: usize = 28;
const BLOCK_SIZE: usize = 16;

fn decode(c: &mut Criterion) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    // (name, query heads, KV heads, head dim): R1-Distill-Qwen-1.5B and -Llama-8B.
    for (name, heads, kv_heads, head_dim) in [("12x2x128", 12, 2, 128), ("32x8x128", 32, 8, 128)] {
        let layout = AttentionLayout::multi_head(heads, kv_heads, head_dim);
        for depth in [512usize, 2048, 8192] {
            let blocks = depth.div_ceil(BLOCK_SIZE);
            let mut cache = PagedKvCache::new(BLOCK_SIZE, blocks, &vec![layout.entry_width(); LAYERS]);
            for layer in 0..LAYERS {
                for slot in 0..blocks * BLOCK_SIZE {
                    let entry: Vec<f32> = (0..layout.entry_width()).map(|_| rng.random_range(-1.0..1.0)).collect();
                    cache.write_entry(layer, slot, &entry);
                }
            }
            // Blocks in reverse order: a table that is not one contiguous run.
            let table: Vec<u32> = (0..blocks as u32).rev().collect();
            let span = SeqSpan {
                start_pos: depth - 1,
                len: 1,
                block_table: &table,
            };
            let q: Vec<f32> = (0..heads * head_dim).map(|_| rng.random_range(-1.0..1.0)).collect();
            let mut out = vec![0.0f32; heads * head_dim];
            let mut group = c.benchmark_group(format!("attention/{name}/d{depth}"));
            group.throughput(Throughput::BytesDecimal(
                (depth * cache.bytes_per_token() / LAYERS) as u64,
            ));
            for isa in Isa::available() {
                let mut layer = 0;
                group.bench_function(isa.name(), |b| {
                    b.iter(|| {
                        cpu::attention(isa, &q, &[span], &cache, layer, &layout, 0.088, &mut out);
                        layer = (layer + 1) % LAYERS;
                        black_box(&out);
                    })
                });
            }
            group.finish();
        }
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10);
    targets = decode
}
criterion_main!(benches);

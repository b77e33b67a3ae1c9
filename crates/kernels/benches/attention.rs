//! One decoded token's attention over a long context, reported as GB/s of KV cache read (the
//! entries of every KV head, once): what a decode step at a reasoning trace's length spends
//! besides the weights.
//!
//! Each iteration reads the next of 28 layers' caches (a 1.5B model's), so the entries come from
//! DRAM as they do in a model, not from the L3; both cache dtypes.
//!
//! `cargo bench -p r1serve-kernels --bench attention -- --quick` (filter: e.g. `d2048/float16`).
//! `R1SERVE_BENCH_LAYERS=1` keeps one layer's cache (from L2/L3 at short depths): the kernel's
//! compute rate.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use r1serve_kernels::cpu::{self, dot::Isa};
use r1serve_kernels::{AttentionLayout, KvCacheDtype, PagedKvCache, SeqSpan};
use rand::{Rng, SeedableRng};

const LAYERS_DEFAULT: usize = 28;

fn layers() -> usize {
    std::env::var("R1SERVE_BENCH_LAYERS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or(LAYERS_DEFAULT)
}
const BLOCK_SIZE: usize = 16;

fn decode(c: &mut Criterion) {
    let layers = layers();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    // (name, query heads, KV heads, head dim): R1-Distill-Qwen-1.5B and -Llama-8B.
    for (name, heads, kv_heads, head_dim) in [("12x2x128", 12, 2, 128), ("32x8x128", 32, 8, 128)] {
        let layout = AttentionLayout::multi_head(heads, kv_heads, head_dim);
        for (depth, dtype) in [512usize, 2048, 8192]
            .into_iter()
            .flat_map(|d| [(d, KvCacheDtype::F32), (d, KvCacheDtype::F16)])
        {
            let blocks = depth.div_ceil(BLOCK_SIZE);
            let widths = vec![layout.entry_width(); layers];
            let mut cache = PagedKvCache::with_dtype(BLOCK_SIZE, blocks, &widths, dtype);
            for layer in 0..layers {
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
            let mut group = c.benchmark_group(format!("attention/{name}/d{depth}/{}", dtype.name()));
            group.throughput(Throughput::BytesDecimal(
                (depth * cache.bytes_per_token() / layers) as u64,
            ));
            for isa in Isa::available() {
                let mut layer = 0;
                group.bench_function(isa.name(), |b| {
                    b.iter(|| {
                        cpu::attention(isa, &q, &[span], &cache, layer, &layout, 0.088, &mut out);
                        layer = (layer + 1) % layers;
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

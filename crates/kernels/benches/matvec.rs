//! Single-threaded 4096×4096 matvec per weight format and instruction set, reported as GB/s of
//! weight bytes read, next to a plain memory read (summing a large `u64` array, and XOR-ing it
//! with AVX2 loads) measured the same way: the roofline a decode step is held against.
//!
//! Each benchmark cycles through enough copies of its matrix (`R1SERVE_BENCH_MIB`, default 256 MiB
//! in all) that weights come from DRAM, not the 32 MiB L3, as they do in a real model.
//!
//! `cargo bench -p r1serve-kernels --bench matvec -- --quick` (filter: e.g. `matvec/Q4_K`).
//! Quantized formats run the fast path a matmul uses: activations prepared once per matvec
//! (counted in the time), then `dot_row_prepared` per row.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use r1serve_kernels::cpu;
use r1serve_kernels::cpu::dot::{dot_row_prepared_with, Isa};
use r1serve_kernels::{Backend, ByteView, MatmulPrecision, PreparedActivations, WeightFormat, WeightMatrix};
use rand::{Rng, SeedableRng};

const N: usize = 4096;

fn working_set_bytes() -> usize {
    std::env::var("R1SERVE_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(256)
        << 20
}

/// Random stored bytes for `format` (values irrelevant to speed, but finite: f16 scales and FP8
/// bytes are kept away from NaN / infinity).
fn matrix(format: WeightFormat, rng: &mut rand_chacha::ChaCha8Rng) -> WeightMatrix {
    let row_bytes = format.row_bytes(N).unwrap();
    let mut bytes: Vec<u8> = (0..N * row_bytes).map(|_| rng.random()).collect();
    let scale = half::f16::from_f32(0.01).to_bits().to_le_bytes();
    let f16_fields: &[usize] = match format {
        WeightFormat::Q8_0 | WeightFormat::Q4_0 => &[0],
        WeightFormat::Q4K => &[0, 2],
        WeightFormat::Q6K => &[208],
        _ => &[],
    };
    if format.is_block_quantized() {
        for block in bytes.chunks_exact_mut(format.block_bytes()) {
            for &at in f16_fields {
                block[at..at + 2].copy_from_slice(&scale);
            }
        }
    }
    match format {
        WeightFormat::F8E4M3Block { block_rows, block_cols } => {
            for b in &mut bytes {
                *b &= 0xbf; // exponent < 15: never NaN
            }
            let scales = vec![0.01f32; N.div_ceil(block_rows) * N.div_ceil(block_cols)];
            WeightMatrix::new_fp8_block(N, N, block_rows, block_cols, ByteView::from_vec(bytes), scales).unwrap()
        }
        WeightFormat::F32 => {
            let values: Vec<f32> = (0..N * N).map(|_| rng.random_range(-1.0..1.0)).collect();
            WeightMatrix::from_f32(N, N, &values).unwrap()
        }
        WeightFormat::F16 | WeightFormat::Bf16 => {
            for pair in bytes.chunks_exact_mut(2) {
                pair[1] &= 0x3f; // small exponents: finite
            }
            WeightMatrix::new(N, N, format, ByteView::from_vec(bytes)).unwrap()
        }
        _ => WeightMatrix::new(N, N, format, ByteView::from_vec(bytes)).unwrap(),
    }
}

fn memory_read(c: &mut Criterion) {
    let words = working_set_bytes() / 8;
    let data: Vec<u64> = (0..words as u64).collect();
    let mut group = c.benchmark_group("memory");
    group.throughput(Throughput::BytesDecimal((words * 8) as u64));
    group.bench_function("sum_u64", |b| {
        b.iter(|| black_box(&data).iter().fold(0u64, |a, &v| a.wrapping_add(v)))
    });
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        group.bench_function("xor_avx2", |b| {
            // SAFETY: AVX2 was detected just above.
            b.iter(|| unsafe { xor_avx2(black_box(&data)) })
        });
    }
    group.finish();
}

/// XOR of all words with 32-byte loads into four independent accumulators: the fastest plain
/// read one thread can do, as a second estimate of the roofline.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn xor_avx2(data: &[u64]) -> u64 {
    use std::arch::x86_64::*;
    let mut acc = [_mm256_setzero_si256(); 4];
    let chunks = data.chunks_exact(16);
    let tail = chunks.remainder().iter().fold(0, |a, &v| a ^ v);
    for chunk in chunks {
        for (k, a) in acc.iter_mut().enumerate() {
            // SAFETY: `chunk` holds 16 words, so words 4k..4k + 4 are in bounds.
            *a = _mm256_xor_si256(*a, unsafe {
                _mm256_loadu_si256(chunk.as_ptr().add(4 * k) as *const __m256i)
            });
        }
    }
    let all = _mm256_xor_si256(_mm256_xor_si256(acc[0], acc[1]), _mm256_xor_si256(acc[2], acc[3]));
    let mut lanes = [0u64; 4];
    // SAFETY: `lanes` is 32 bytes.
    unsafe { _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, all) };
    lanes.iter().fold(tail, |a, &v| a ^ v)
}

fn matvec(c: &mut Criterion) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let x: Vec<f32> = (0..N).map(|_| rng.random_range(-1.0..1.0)).collect();
    let formats = [
        WeightFormat::F32,
        WeightFormat::Bf16,
        WeightFormat::F16,
        WeightFormat::F8E4M3Block {
            block_rows: 128,
            block_cols: 128,
        },
        WeightFormat::Q8_0,
        WeightFormat::Q4_0,
        WeightFormat::Q4K,
        WeightFormat::Q6K,
    ];
    let mut group = c.benchmark_group("matvec");
    for format in formats {
        let one = matrix(format, &mut rng);
        let copies = working_set_bytes().div_ceil(one.stored_bytes()).max(1);
        // Distinct allocations of the same bytes, read in turn.
        let matrices: Vec<WeightMatrix> = (0..copies)
            .map(|i| {
                if i == 0 {
                    one.clone()
                } else {
                    let bytes = (0..N).flat_map(|r| one.row_bytes(r).iter().copied()).collect();
                    match format {
                        WeightFormat::F8E4M3Block { block_rows, block_cols } => WeightMatrix::new_fp8_block(
                            N,
                            N,
                            block_rows,
                            block_cols,
                            ByteView::from_vec(bytes),
                            vec![0.01; N.div_ceil(block_rows) * N.div_ceil(block_cols)],
                        )
                        .unwrap(),
                        _ => WeightMatrix::new(N, N, format, ByteView::from_vec(bytes)).unwrap(),
                    }
                }
            })
            .collect();
        group.throughput(Throughput::BytesDecimal(one.stored_bytes() as u64));
        for isa in Isa::available() {
            let mut out = vec![0.0f32; N];
            let mut prepared = PreparedActivations::default();
            let mut next = 0;
            group.bench_function(format!("{}/{}", format.name(), isa.name()), |b| {
                b.iter(|| {
                    let w = &matrices[next % copies];
                    next += 1;
                    prepared.prepare(format, &x);
                    for (row, o) in out.iter_mut().enumerate() {
                        *o = dot_row_prepared_with(isa, w, row, &x, &prepared);
                    }
                    black_box(&out);
                })
            });
        }
    }
    group.finish();
}

/// Random weights of `format` in `[-1, 1)`, quantised through the crate's own quantisers (FP8:
/// blocks scaled to their largest value, as DeepSeek-V3's are).
fn gemm_weights(format: WeightFormat, rows: usize, cols: usize, rng: &mut rand_chacha::ChaCha8Rng) -> WeightMatrix {
    let values: Vec<f32> = (0..rows * cols).map(|_| rng.random_range(-1.0..1.0)).collect();
    if let WeightFormat::F8E4M3Block { block_rows, block_cols } = format {
        return r1serve_kernels::quant::fp8::quantize_fp8_blocks(rows, cols, block_rows, block_cols, &values).unwrap();
    }
    let bytes = match format {
        WeightFormat::Bf16 => values
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_bits().to_le_bytes())
            .collect(),
        _ => r1serve_kernels::quant::quantize(format, &values).unwrap(),
    };
    WeightMatrix::new(rows, cols, format, ByteView::from_vec(bytes)).unwrap()
}

/// A second matrix with `w`'s stored rows and scales (and none of its kept panels).
fn same_weights(w: &WeightMatrix) -> WeightMatrix {
    let bytes = ByteView::from_vec((0..w.rows()).flat_map(|r| w.row_bytes(r).iter().copied()).collect());
    if let WeightFormat::F8E4M3Block { block_rows, block_cols } = w.format() {
        let scales = (0..w.rows())
            .step_by(block_rows)
            .flat_map(|r| w.row_block_scales(r).iter().copied())
            .collect();
        return WeightMatrix::new_fp8_block(w.rows(), w.cols(), block_rows, block_cols, bytes, scales).unwrap();
    }
    WeightMatrix::new(w.rows(), w.cols(), w.format(), bytes).unwrap()
}

/// Decode- and prefill-shaped products (`n` tokens × the R1-Distill-Qwen-1.5B projections) on one
/// thread, in GFLOP/s (2·n·rows·cols per call): `matmul` (whatever it dispatches to: fused dot
/// products below its GEMM threshold), the f32 panels the packed GEMMs replace, and the packed
/// GEMMs themselves (panels kept after the first call) where this CPU runs them. Filter e.g.
/// `gemm/BF16`.
fn gemm(c: &mut Criterion) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let mut group = c.benchmark_group("gemm");
    for format in [
        WeightFormat::Bf16,
        WeightFormat::Q8_0,
        WeightFormat::Q4K,
        WeightFormat::Q6K,
        WeightFormat::F8E4M3Block {
            block_rows: 128,
            block_cols: 128,
        },
    ] {
        for &(rows, cols) in &[(1536usize, 1536usize), (8960, 1536), (1536, 8960)] {
            let w = gemm_weights(format, rows, cols, &mut rng);
            for n in [1usize, 8, 64] {
                let x: Vec<f32> = (0..n * cols).map(|_| rng.random_range(-1.0..1.0)).collect();
                let mut out = vec![0.0f32; n * rows];
                group.throughput(Throughput::ElementsAndBytes {
                    elements: (2 * n * rows * cols) as u64,
                    bytes: w.stored_bytes() as u64,
                });
                let name = |path: &str| format!("{}/{rows}x{cols}/n{n}/{path}", format.name());
                group.bench_function(name("f32_panels"), |b| {
                    b.iter(|| cpu::pool::single_threaded(|| cpu::gemm_f32_panels(&x, &w, &mut out)))
                });
                group.bench_function(name("matmul"), |b| {
                    b.iter(|| cpu::pool::single_threaded(|| cpu::matmul(&x, &w, &mut out, MatmulPrecision::default())))
                });
                let isa = cpu::dot::isa();
                if format == WeightFormat::Bf16 && cpu::gemm_bf16::available(isa) {
                    let repack = cpu::weight_repacking();
                    for (path, bf16) in [("gemm_bf16", true), ("gemm_bf16_f32", false)] {
                        group.bench_function(name(path), |b| {
                            b.iter(|| {
                                cpu::pool::single_threaded(|| {
                                    cpu::gemm_bf16::gemm_bf16_with(isa, bf16, repack, &x, &w, &mut out)
                                })
                            })
                        });
                    }
                }
                if format == WeightFormat::Q4K && cpu::gemm_q4k::available(isa) {
                    group.bench_function(name("gemm_q4k"), |b| {
                        b.iter(|| cpu::pool::single_threaded(|| cpu::gemm_q4k::gemm_q4k(isa, &x, &w, &mut out)))
                    });
                }
                if format == WeightFormat::Q6K && cpu::gemm_q6k::available(isa) {
                    group.bench_function(name("gemm_q6k"), |b| {
                        b.iter(|| cpu::pool::single_threaded(|| cpu::gemm_q6k::gemm_q6k(isa, &x, &w, &mut out)))
                    });
                }
                if cpu::gemm_fp8::supports(isa, &w) {
                    for (path, bf16) in [("gemm_fp8", true), ("gemm_fp8_f32", false)] {
                        if bf16 && !cpu::gemm_fp8::bf16_available(isa) {
                            continue;
                        }
                        group.bench_function(name(path), |b| {
                            b.iter(|| {
                                cpu::pool::single_threaded(|| cpu::gemm_fp8::gemm_fp8(isa, bf16, &x, &w, &mut out))
                            })
                        });
                    }
                }
                if cpu::gemm_int8::supports(&w) && cpu::gemm_int8::available(isa) {
                    // A matrix keeps one backend copy: `Q4_K` and `Q6_K` keep their own panels
                    // above, so the integer GEMM's go with a copy of the weights.
                    let copy = same_weights(&w);
                    group.bench_function(name("gemm_int8"), |b| {
                        b.iter(|| cpu::pool::single_threaded(|| cpu::gemm_int8::gemm_int8(isa, &x, &copy, &mut out)))
                    });
                }
            }
        }
    }
    group.finish();
}

/// One decode token (`n = 1`) on all of the compute pool's threads, weights cycled from DRAM
/// (`R1SERVE_BENCH_MIB`) as in a real model, in GB/s of stored weight bytes: `matmul`, the path a
/// decode step takes (every format here reads its kept panels; `matvec/*` has the row dots over
/// the stored rows, on one thread). Compare with `memory/*` (one thread) and `r1serve bench`'s
/// probe (all threads).
fn decode(c: &mut Criterion) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let mut group = c.benchmark_group("decode");
    for (format, rows, cols) in [
        (WeightFormat::Bf16, 8960, 1536),
        (WeightFormat::Q8_0, 8960, 1536),
        (
            WeightFormat::F8E4M3Block {
                block_rows: 128,
                block_cols: 128,
            },
            8960,
            1536,
        ),
        (WeightFormat::Q4K, 8960, 1536),
        (WeightFormat::Q4K, 1536, 8960),
        (WeightFormat::Q4K, 1536, 1536),
        (WeightFormat::Q6K, 8960, 1536),
        (WeightFormat::Q6K, 1536, 8960),
        (WeightFormat::Q6K, 151936, 1536),
    ] {
        let one = gemm_weights(format, rows, cols, &mut rng);
        let copies = working_set_bytes().div_ceil(one.stored_bytes()).max(1);
        let matrices: Vec<WeightMatrix> = (0..copies).map(|_| same_weights(&one)).collect();
        let x: Vec<f32> = (0..one.cols()).map(|_| rng.random_range(-1.0..1.0)).collect();
        let mut out = vec![0.0f32; one.rows()];
        group.throughput(Throughput::BytesDecimal(one.stored_bytes() as u64));
        // Every copy's kept panels (those one token reads) built before timing, as the model's
        // warm-up builds them.
        for w in &matrices {
            cpu::matmul(&x, w, &mut out, MatmulPrecision::default());
        }
        let mut next = 0;
        group.bench_function(format!("{}/{rows}x{cols}/matmul", format.name()), |b| {
            b.iter(|| {
                cpu::matmul(&x, &matrices[next % copies], &mut out, MatmulPrecision::default());
                next += 1;
            })
        });
    }
    // R1's absorbed attention: one token through 128 heads' 512×128 FP8 `W_UK_hᵀ`, one job for
    // all heads against one job per head (every layer's heads cycled, as decode reads them).
    let fp8 = WeightFormat::F8E4M3Block {
        block_rows: 128,
        block_cols: 128,
    };
    let (heads, rows, cols) = (128, 512, 128);
    let one = gemm_weights(fp8, rows, cols, &mut rng);
    let layers = working_set_bytes().div_ceil(heads * one.stored_bytes()).max(1);
    let layer_heads: Vec<Vec<WeightMatrix>> = (0..layers)
        .map(|_| (0..heads).map(|_| same_weights(&one)).collect())
        .collect();
    let x: Vec<f32> = (0..heads * cols).map(|_| rng.random_range(-1.0..1.0)).collect();
    let mut out = vec![0.0f32; heads * rows];
    group.throughput(Throughput::BytesDecimal((heads * one.stored_bytes()) as u64));
    let backend = cpu::CpuBackend::new(MatmulPrecision::default());
    for w in layer_heads.iter().flatten() {
        backend.matmul(&x[..cols], w, &mut out[..rows]);
    }
    let mut next = 0;
    group.bench_function(format!("F8_E4M3/{heads}x{rows}x{cols}/matmul_heads"), |b| {
        b.iter(|| {
            backend.matmul_heads(&x, cols, &layer_heads[next % layers], &mut out, rows);
            next += 1;
        })
    });
    group.bench_function(format!("F8_E4M3/{heads}x{rows}x{cols}/matmul_per_head"), |b| {
        b.iter(|| {
            for (h, w) in layer_heads[next % layers].iter().enumerate() {
                backend.matmul(&x[h * cols..][..cols], w, &mut out[h * rows..][..rows]);
            }
            next += 1;
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10);
    targets = memory_read, matvec, gemm, decode
}
criterion_main!(benches);

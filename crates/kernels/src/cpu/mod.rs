//! The CPU backend: the compute pool (`pool.rs`) for threads, kernels over the stored formats.

mod attention;
pub mod bandwidth;
pub mod dot;
mod elementwise;
mod gemm;
pub mod gemm_bf16;
pub mod gemm_fp8;
pub mod gemm_int8;
pub mod gemm_q4k;
pub mod gemm_q6k;
mod int8_pack;
mod matmul;
mod pack;
pub mod pool;

use std::sync::atomic::{AtomicBool, Ordering};

use crate::backend::{AttentionLayout, Backend, MatmulPrecision, SeqSpan};
use crate::kv_cache::PagedKvCache;
use crate::rope::RopeTable;
use crate::weight::WeightMatrix;

pub use attention::attention;
pub use elementwise::{add_assign, rms_norm, silu_mul};
pub use gemm::gemm as gemm_f32_panels;
pub use matmul::matmul;

static WEIGHT_REPACKING: AtomicBool = AtomicBool::new(true);

/// Whether the GEMMs keep each weight matrix packed in their panel layout after its first use
/// (the default): batched decode then reads the weights as the kernels want them instead of
/// repacking them every step, at the cost of a second copy of the GEMM-fed weights in memory
/// (block-quantised ones as bytes, BF16 as stored). Off (llama.cpp's `--no-repack`), each call
/// packs one panel at a time into scratch.
pub fn set_weight_repacking(on: bool) {
    WEIGHT_REPACKING.store(on, Ordering::Relaxed);
}

pub fn weight_repacking() -> bool {
    WEIGHT_REPACKING.load(Ordering::Relaxed)
}

/// A raw pointer that parallel tasks use to write disjoint parts of one output buffer.
#[derive(Clone, Copy)]
pub(crate) struct SharedMut(*mut f32);
// SAFETY: every user writes a disjoint set of indices, so no two threads touch the same float.
unsafe impl Send for SharedMut {}
// SAFETY: as above; the pointer is only written through at indices owned by one task.
unsafe impl Sync for SharedMut {}

impl SharedMut {
    pub(crate) fn new(out: &mut [f32]) -> Self {
        Self(out.as_mut_ptr())
    }

    /// The start of the output, for kernels that store vectors; the same rules as [`Self::write`]
    /// apply to every element written through it.
    #[inline(always)]
    pub(crate) fn ptr(self) -> *mut f32 {
        self.0
    }

    /// # Safety
    /// `index` must be in bounds of the slice this was made from and written by no other task.
    #[inline(always)]
    pub(crate) unsafe fn write(self, index: usize, value: f32) {
        // SAFETY: guaranteed by the caller (see above).
        unsafe { *self.0.add(index) = value };
    }
}

/// The CPU backend. Threads come from the compute pool (size it with [`pool::set_threads`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuBackend {
    precision: MatmulPrecision,
}

impl CpuBackend {
    pub fn new(precision: MatmulPrecision) -> Self {
        Self { precision }
    }

    pub fn precision(&self) -> MatmulPrecision {
        self.precision
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn matmul(&self, x: &[f32], w: &WeightMatrix, out: &mut [f32]) {
        matmul(x, w, out, self.precision);
    }

    fn matmul_f32(&self, x: &[f32], w: &WeightMatrix, out: &mut [f32]) {
        matmul(x, w, out, MatmulPrecision::F32);
    }

    /// The heads spread over the pool, each head's product on one thread: R1's 128 heads are
    /// 64 KB matrices each, for which a job of their own costs about as much as their bytes.
    fn matmul_heads(&self, x: &[f32], x_stride: usize, weights: &[WeightMatrix], out: &mut [f32], out_stride: usize) {
        for (h, w) in weights.iter().enumerate() {
            assert!(
                w.rows() <= out_stride && h * out_stride + w.rows() <= out.len() && h * x_stride + w.cols() <= x.len(),
                "head {h}'s input or output lies outside its stride or the buffer"
            );
        }
        let outs = pool::DisjointChunks::new(out, out_stride);
        pool::for_each(weights.len(), |h| {
            // SAFETY: `for_each` runs each head once.
            let out_h = unsafe { outs.get(h) };
            let w = &weights[h];
            matmul(
                &x[h * x_stride..][..w.cols()],
                w,
                &mut out_h[..w.rows()],
                self.precision,
            );
        });
    }

    fn prepare_weight(&self, w: &WeightMatrix) {
        matmul::prepare(w);
    }

    fn rms_norm(&self, x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
        rms_norm(x, weight, eps, out);
    }

    fn silu_mul(&self, gate: &[f32], up: &[f32], out: &mut [f32]) {
        silu_mul(gate, up, out);
    }

    fn add_assign(&self, acc: &mut [f32], x: &[f32]) {
        add_assign(acc, x);
    }

    fn embedding(&self, table: &WeightMatrix, ids: &[u32], out: &mut [f32]) {
        let dim = table.cols();
        for (row, &id) in out.chunks_exact_mut(dim).zip(ids) {
            table.dequantize_row(id as usize, row);
        }
    }

    fn rope(&self, x: &mut [f32], spans: &[SeqSpan], head_stride: usize, offset: usize, table: &RopeTable) {
        let dim = table.dim();
        let mut tokens = x.chunks_exact_mut(x.len() / spans.iter().map(|s| s.len).sum::<usize>().max(1));
        for span in spans {
            for pos in span.start_pos..span.start_pos + span.len {
                let Some(token) = tokens.next() else { return };
                for head in token.chunks_exact_mut(head_stride) {
                    table.apply(&mut head[offset..offset + dim], pos);
                }
            }
        }
    }

    fn kv_store(&self, cache: &mut PagedKvCache, layer: usize, spans: &[SeqSpan], entries: &[f32]) {
        let width = cache.width(layer);
        let mut rows = entries.chunks_exact(width);
        for span in spans {
            for pos in span.start_pos..span.start_pos + span.len {
                let Some(row) = rows.next() else { return };
                let slot = cache.slot(span.block_table, pos);
                cache.write_entry(layer, slot, row);
            }
        }
    }

    fn attention(
        &self,
        q: &[f32],
        spans: &[SeqSpan],
        cache: &PagedKvCache,
        layer: usize,
        layout: &AttentionLayout,
        scale: f32,
        out: &mut [f32],
    ) {
        attention(dot::isa(), q, spans, cache, layer, layout, scale, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// One token's heads through the pool give exactly what one matmul per head gives (the trait's
    /// own way), inputs and outputs at strides wider than the matrices, the gaps left alone.
    #[test]
    fn matmul_heads_matches_a_matmul_per_head() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(31);
        let (heads, rows, cols, x_stride, out_stride) = (6, 64, 128, 131, 70);
        let weights: Vec<WeightMatrix> = (0..heads)
            .map(|_| {
                let values: Vec<f32> = (0..rows * cols).map(|_| rng.random_range(-1.0..1.0)).collect();
                crate::quant::fp8::quantize_fp8_blocks(rows, cols, 32, 32, &values).unwrap()
            })
            .collect();
        let x: Vec<f32> = (0..heads * x_stride).map(|_| rng.random_range(-1.0..1.0)).collect();
        for precision in [MatmulPrecision::Bf16, MatmulPrecision::F32] {
            let backend = CpuBackend::new(precision);
            let mut expected = vec![7.0f32; heads * out_stride];
            for (h, w) in weights.iter().enumerate() {
                backend.matmul(&x[h * x_stride..][..cols], w, &mut expected[h * out_stride..][..rows]);
            }
            let mut got = vec![7.0f32; heads * out_stride];
            backend.matmul_heads(&x, x_stride, &weights, &mut got, out_stride);
            assert_eq!(got, expected, "{precision:?}");
        }
    }
}

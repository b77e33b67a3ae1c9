//! Activations rounded to 8-bit blocks once per matmul row, so that quantized weights are consumed
//! by integer dot products (`u8 × i8` multiply-adds) instead of being widened to f32.
//!
//! Two layouts, after what each weight format needs:
//! - `Q8_0` (for `Q8_0` and `Q4_0` weights): per 32 values a scale `d = max|x| / 127`, 32 × i8
//!   `q = round(x / d)`, and `d · Σq` (folds `Q4_0`'s −8 offset into one multiply per block).
//! - `Q8_K` (for `Q4_K` and `Q6_K` weights): per 256 values one scale, 256 × i8, and the sum of
//!   each 16 `q` as i16 (folds `Q4_K`'s mins and `Q6_K`'s −32 offset).
//!
//! Each value is off by at most `d / 2` of its block, so a dot product with weights `w` moves by
//! at most `Σ_blocks d/2 · Σ|w|` (relative error about 1/254 of `max|x| · Σ|w|` per block).

use super::{QK, QK_K};
use crate::cpu::dot::{isa, Isa};
use crate::dtype::WeightFormat;

/// Rounds one block to i8 in `out` with `d = max|x| / 127`; returns `d`. Written to vectorize
/// (inlined into each instruction set's copy of its callers): the maximum in sixteen independent
/// lanes, and rounding (to nearest, ties to even) by adding 1.5 · 2²³ rather than calling
/// `round`, which on baseline x86-64 is a library call per value.
#[inline(always)]
pub(crate) fn round_block(block: &[f32], out: &mut [i8]) -> f32 {
    const ROUND: f32 = 12_582_912.0;
    const LANES: usize = 16;
    let larger = |m: f32, v: f32| if v.abs() > m { v.abs() } else { m };
    let mut lanes = [0.0f32; LANES];
    let chunks = block.chunks_exact(LANES);
    let tail = chunks.remainder().iter().fold(0.0f32, |m, &v| larger(m, v));
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane = larger(*lane, v);
        }
    }
    let amax = lanes.iter().fold(tail, |m, &v| larger(m, v));
    let d = amax / 127.0;
    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
    for (q, &v) in out.iter_mut().zip(block) {
        // |v · id| ≤ 127 (up to rounding), so the sum stays in the range where the trick is exact.
        let y = (v * id).clamp(-127.0, 127.0);
        // `y + ROUND` holds round(y) in its low mantissa bits: read them as an integer (float
        // to integer casts saturate, and the saturating cast does not vectorize).
        *q = ((y + ROUND).to_bits() as i32 - ROUND.to_bits() as i32) as i8;
    }
    d
}

/// Fills `p`'s blocks of its format from `x` (see [`PreparedActivations`]'s fields).
#[inline(always)]
fn round_row(p: &mut PreparedActivations, x: &[f32]) {
    let (qs, d, dsum, bsums) = (p.qs.as_mut_slice(), &mut p.d, &mut p.dsum, &mut p.bsums);
    match p.format {
        ActivationFormat::F32 => {}
        ActivationFormat::Q8_0 => {
            for (block, q) in x.chunks_exact(QK).zip(qs.chunks_exact_mut(QK)) {
                let scale = round_block(block, q);
                let sum: i32 = q.iter().map(|&q| q as i32).sum();
                d.push(scale);
                dsum.push(scale * sum as f32);
            }
        }
        ActivationFormat::Q8K => {
            for (block, q) in x.chunks_exact(QK_K).zip(qs.chunks_exact_mut(QK_K)) {
                d.push(round_block(block, q));
                bsums.extend(q.chunks_exact(16).map(|g| g.iter().map(|&q| q as i16).sum::<i16>()));
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn round_row_avx512(p: &mut PreparedActivations, x: &[f32]) {
    round_row(p, x)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn round_row_avx2(p: &mut PreparedActivations, x: &[f32]) {
    round_row(p, x)
}

/// How a row of activations is stored for a weight format's dot product.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ActivationFormat {
    /// Plain f32 (the element formats: F32, BF16, F16, FP8): nothing to prepare.
    #[default]
    F32,
    /// Blocks of 32: f32 scale, i8 values, `d · Σq`.
    Q8_0,
    /// Super-blocks of 256: f32 scale, i8 values, i16 sums of each 16.
    Q8K,
}

impl ActivationFormat {
    /// The activation layout whose dot product with `format` weights the kernels implement.
    pub fn for_weights(format: WeightFormat) -> Self {
        match format {
            WeightFormat::Q8_0 | WeightFormat::Q4_0 => ActivationFormat::Q8_0,
            WeightFormat::Q4K | WeightFormat::Q6K => ActivationFormat::Q8K,
            WeightFormat::F32 | WeightFormat::Bf16 | WeightFormat::F16 | WeightFormat::F8E4M3Block { .. } => {
                ActivationFormat::F32
            }
        }
    }

    fn block(self) -> usize {
        match self {
            ActivationFormat::F32 => 1,
            ActivationFormat::Q8_0 => QK,
            ActivationFormat::Q8K => QK_K,
        }
    }
}

/// One activation row prepared for one weight format's dot products. Reusable: `prepare` keeps
/// the buffers' capacity, so a decode step that prepares into the same value allocates nothing.
#[derive(Clone, Debug, Default)]
pub struct PreparedActivations {
    format: ActivationFormat,
    len: usize,
    /// One scale per block.
    pub(crate) d: Vec<f32>,
    /// `Q8_0` only: `d · Σq` per block.
    pub(crate) dsum: Vec<f32>,
    /// `Q8_K` only: `Σq` of each 16 values.
    pub(crate) bsums: Vec<i16>,
    /// The values, `len` of them (empty for `F32`), 64-byte aligned so that full-width vector
    /// loads of a block never straddle a cache line.
    pub(crate) qs: AlignedQs,
}

/// One cache line of activations.
#[derive(Clone, Copy, Debug)]
#[repr(C, align(64))]
struct Line([i8; 64]);

/// A growable `[i8]` whose start is 64-byte aligned.
#[derive(Clone, Debug, Default)]
pub(crate) struct AlignedQs {
    lines: Vec<Line>,
    len: usize,
}

impl AlignedQs {
    /// Sets the length to `len` (contents unspecified until written); keeps the capacity.
    fn resize(&mut self, len: usize) {
        self.lines.resize(len.div_ceil(64), Line([0; 64]));
        self.len = len;
    }

    fn as_mut_slice(&mut self) -> &mut [i8] {
        // SAFETY: `lines` holds at least `len` initialised bytes (`Line` is a plain byte array
        // with no padding: size 64, align 64), and the borrow of `self` guards the memory.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr() as *mut i8, self.len) }
    }
}

impl std::ops::Deref for AlignedQs {
    type Target = [i8];

    fn deref(&self) -> &[i8] {
        // SAFETY: as in `as_mut_slice`, shared.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr() as *const i8, self.len) }
    }
}

impl PreparedActivations {
    /// `x` prepared for dot products with `format` weights.
    pub fn new(format: WeightFormat, x: &[f32]) -> Self {
        let mut prepared = Self::default();
        prepared.prepare(format, x);
        prepared
    }

    /// Re-prepares in place for `format` weights and the row `x`. When `x.len()` is not a
    /// multiple of the format's block (no such matrix exists), the row is kept as f32, and the
    /// dot products fall back to the f32 path.
    pub fn prepare(&mut self, format: WeightFormat, x: &[f32]) {
        let mut kind = ActivationFormat::for_weights(format);
        if !x.len().is_multiple_of(kind.block()) {
            kind = ActivationFormat::F32;
        }
        self.format = kind;
        self.len = x.len();
        self.d.clear();
        self.dsum.clear();
        self.bsums.clear();
        self.qs.resize(if kind == ActivationFormat::F32 { 0 } else { x.len() });
        match isa() {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Isa::Avx512*` come from `Isa::available` after detecting these features.
            Isa::Avx512 | Isa::Avx512Vnni => unsafe { round_row_avx512(self, x) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Isa::Avx2` comes from `Isa::available` after detecting avx2 and fma.
            Isa::Avx2 => unsafe { round_row_avx2(self, x) },
            _ => round_row(self, x),
        }
    }

    /// The layout these activations are in.
    pub fn format(&self) -> ActivationFormat {
        self.format
    }

    /// Number of activations (the weight matrix's `cols`).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether these activations can be dotted with a `format` row of `cols` values.
    pub fn fits(&self, format: WeightFormat, cols: usize) -> bool {
        self.format != ActivationFormat::F32 && self.format == ActivationFormat::for_weights(format) && self.len == cols
    }

    /// The activations as the integer kernels see them, decoded back to f32 (`q · d`): what the
    /// prepared dot products compute with, for tests and error analysis.
    pub fn dequantized(&self) -> Vec<f32> {
        let block = self.format.block();
        self.qs
            .chunks_exact(block.max(1))
            .zip(&self.d)
            .flat_map(|(qs, &d)| qs.iter().map(move |&q| q as f32 * d))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_0_blocks_round_to_half_a_step() {
        let x: Vec<f32> = (0..64).map(|i| ((i * 37) % 64) as f32 / 9.0 - 3.5).collect();
        let p = PreparedActivations::new(WeightFormat::Q4_0, &x);
        assert_eq!(p.format(), ActivationFormat::Q8_0);
        assert_eq!((p.d.len(), p.dsum.len(), p.qs.len()), (2, 2, 64));
        for ((block, deq), &d) in x.chunks(32).zip(p.dequantized().chunks(32)).zip(&p.d) {
            let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            assert_eq!(d, amax / 127.0);
            for (a, b) in block.iter().zip(deq) {
                assert!((a - b).abs() <= d / 2.0 * 1.0001, "{a} vs {b}");
            }
        }
        let sum0: i32 = p.qs[..32].iter().map(|&q| q as i32).sum();
        assert_eq!(p.dsum[0], p.d[0] * sum0 as f32);
    }

    #[test]
    fn q8k_sums_and_fallbacks() {
        let x: Vec<f32> = (0..512).map(|i| (i as f32 * 0.37).sin()).collect();
        let p = PreparedActivations::new(WeightFormat::Q6K, &x);
        assert_eq!(p.format(), ActivationFormat::Q8K);
        assert_eq!(p.bsums.len(), 32);
        for (g, &s) in p.qs.chunks(16).zip(&p.bsums) {
            assert_eq!(g.iter().map(|&q| q as i16).sum::<i16>(), s);
        }
        assert!(p.fits(WeightFormat::Q4K, 512));
        assert!(!p.fits(WeightFormat::Q4_0, 512));
        assert!(!p.fits(WeightFormat::Q4K, 256));

        // Zero blocks, and lengths no matrix of the format can have.
        assert_eq!(p.qs.as_ptr() as usize % 64, 0);
        let z = PreparedActivations::new(WeightFormat::Q8_0, &[0.0; 32]);
        assert_eq!((z.d[0], z.dsum[0]), (0.0, 0.0));
        assert!(z.qs.iter().all(|&q| q == 0));
        let odd = PreparedActivations::new(WeightFormat::Q8_0, &[1.0; 33]);
        assert_eq!(odd.format(), ActivationFormat::F32);
        assert!(!odd.fits(WeightFormat::Q8_0, 33));
        let float = PreparedActivations::new(WeightFormat::Bf16, &[1.0; 64]);
        assert_eq!(float.format(), ActivationFormat::F32);
    }
}

//! The operands of the integer GEMM (`gemm_int8.rs`) in one common form.
//!
//! Every block-quantised weight format is decoded to unsigned bytes `u` with, per block of `BK`
//! values of `k`, an f32 scale `s` and offset `o` and a format-wide zero point `z`:
//! `w = s · (u − z) + o`.
//!
//! | format | `u`                 | `z`  | `BK` | `s`        | `o`            |
//! |--------|---------------------|------|------|------------|----------------|
//! | Q8_0   | `q + 128`           | 128  | 32   | `d`        | 0              |
//! | Q4_0   | nibble              | 8    | 32   | `d`        | 0              |
//! | Q4_K   | nibble              | 0    | 32   | `d · sc_j` | `−dmin · m_j`  |
//! | Q6_K   | six-bit `q`         | 32   | 16   | `d · sc_g` | 0              |
//!
//! (`s` and `o` are the very products the scalar decoders form, so `s · (u − z) + o` is the
//! dequantised weight, bit for bit.) Activations are rounded per 32 values to i8 `q_x` with
//! `d_x = max|x| / 127`, as [`crate::quant::PreparedActivations`] does for `Q8_0`; per weight
//! block the GEMM needs `−z · Σq_x` (the integer sum's start, so that `Σ u·q_x` becomes
//! `Σ (u − z)·q_x`), `d_x`, and `d_x · Σq_x` (for `o`).

use super::pool::{self, DisjointChunks};

use super::dot::Isa;
use crate::dtype::WeightFormat;
use crate::quant::{f16_at, q4_0, q4_k, q6_k, q8_0, round_block, PreparedActivations, QK, QK_K};

/// Values per weight block (one scale each) and the zero point of `format`.
pub(crate) fn block_and_zero(format: WeightFormat) -> Option<(usize, i32)> {
    match format {
        WeightFormat::Q8_0 => Some((32, 128)),
        WeightFormat::Q4_0 => Some((32, 8)),
        WeightFormat::Q4K => Some((32, 0)),
        WeightFormat::Q6K => Some((16, 32)),
        _ => None,
    }
}

/// Decodes one stored row into `u` (`cols` bytes), `s[16·b]` and `o[16·b]` (block `b` of `BK`
/// values: the scales land directly in a 16-row group's `[blocks][16]` layout), with the loops
/// compiled for `isa` (one of [`Isa::available`]). `o` is written only for formats with offsets
/// (`Q4_K`).
pub(crate) fn decode_row(isa: Isa, format: WeightFormat, bytes: &[u8], u: &mut [u8], s: &mut [f32], o: &mut [f32]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the AVX-512 levels are only produced after detecting avx512f/bw/vl and avx2;
        // the code is the safe generic decoder, only compiled for wider registers.
        Isa::Avx512 | Isa::Avx512Vnni => unsafe { decode_row_avx512(format, bytes, u, s, o) },
        _ => decode_row_generic(format, bytes, u, s, o),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn decode_row_avx512(format: WeightFormat, bytes: &[u8], u: &mut [u8], s: &mut [f32], o: &mut [f32]) {
    if format != WeightFormat::Q6K {
        return decode_row_generic(format, bytes, u, s, o);
    }
    use std::arch::x86_64::*;
    let blocks = bytes.chunks_exact(q6_k::BLOCK_BYTES).zip(u.chunks_exact_mut(QK_K));
    for ((block, u), s) in blocks.zip(s.chunks_mut(16 * 16)) {
        let d = f16_at(block, 208);
        for (g, s) in s.iter_mut().step_by(16).enumerate() {
            *s = d * block[192 + g] as i8 as f32;
        }
        for h in 0..2 {
            // SAFETY: a super-block holds 210 bytes (ql: 64h..64h + 64, qh: 128 + 32h..+32) and
            // `u` 256 (128h..128h + 128).
            unsafe {
                let (qa, qb) = super::dot::q6_k_half_avx512(block.as_ptr(), h);
                _mm512_storeu_si512(u.as_mut_ptr().add(128 * h) as *mut _, qa);
                _mm512_storeu_si512(u.as_mut_ptr().add(128 * h + 64) as *mut _, qb);
            }
        }
    }
    let _ = o;
}

#[inline(always)]
fn decode_row_generic(format: WeightFormat, bytes: &[u8], u: &mut [u8], s: &mut [f32], o: &mut [f32]) {
    match format {
        WeightFormat::Q8_0 => {
            let blocks = bytes.chunks_exact(q8_0::BLOCK_BYTES).zip(u.chunks_exact_mut(QK));
            for ((block, u), s) in blocks.zip(s.iter_mut().step_by(16)) {
                *s = f16_at(block, 0);
                for (u, &q) in u.iter_mut().zip(&block[2..]) {
                    *u = q ^ 0x80;
                }
            }
        }
        WeightFormat::Q4_0 => {
            let blocks = bytes.chunks_exact(q4_0::BLOCK_BYTES).zip(u.chunks_exact_mut(QK));
            for ((block, u), s) in blocks.zip(s.iter_mut().step_by(16)) {
                *s = f16_at(block, 0);
                let (lo, hi) = u.split_at_mut(QK / 2);
                for ((l, h), &q) in lo.iter_mut().zip(hi).zip(&block[2..]) {
                    *l = q & 0x0f;
                    *h = q >> 4;
                }
            }
        }
        WeightFormat::Q4K => {
            let blocks = bytes.chunks_exact(q4_k::BLOCK_BYTES).zip(u.chunks_exact_mut(QK_K));
            for ((block, u), (s, o)) in blocks.zip(s.chunks_mut(8 * 16).zip(o.chunks_mut(8 * 16))) {
                let (d, dmin) = (f16_at(block, 0), f16_at(block, 2));
                let (sc, m) = q4_k::scales_mins(&block[4..16]);
                for j in 0..8 {
                    s[16 * j] = d * sc[j] as f32;
                    o[16 * j] = -(dmin * m[j] as f32);
                }
                for (u, qs) in u.chunks_exact_mut(64).zip(block[16..].chunks_exact(32)) {
                    let (lo, hi) = u.split_at_mut(32);
                    for ((l, h), &q) in lo.iter_mut().zip(hi).zip(qs) {
                        *l = q & 0x0f;
                        *h = q >> 4;
                    }
                }
            }
        }
        WeightFormat::Q6K => {
            let blocks = bytes.chunks_exact(q6_k::BLOCK_BYTES).zip(u.chunks_exact_mut(QK_K));
            for ((block, u), s) in blocks.zip(s.chunks_mut(16 * 16)) {
                let d = f16_at(block, 208);
                for (g, s) in s.iter_mut().step_by(16).enumerate() {
                    *s = d * block[192 + g] as i8 as f32;
                }
                // Half `h`, lane `l`: quarters k = 0..4 take nibble k / 2 of ql[64h + 32(k % 2) + l]
                // and bits 2k.. of qh[32h + l] (see `q6_k`).
                for h in 0..2 {
                    let (ql, qh) = (&block[64 * h..64 * h + 64], &block[128 + 32 * h..160 + 32 * h]);
                    let u = &mut u[128 * h..128 * h + 128];
                    for l in 0..32 {
                        let (a, b, c) = (ql[l], ql[32 + l], qh[l]);
                        u[l] = (a & 0x0f) | ((c & 3) << 4);
                        u[32 + l] = (b & 0x0f) | (((c >> 2) & 3) << 4);
                        u[64 + l] = (a >> 4) | (((c >> 4) & 3) << 4);
                        u[96 + l] = (b >> 4) | (((c >> 6) & 3) << 4);
                    }
                }
            }
        }
        _ => unreachable!("only block-quantised formats are decoded to bytes"),
    }
}

/// A batch of tokens rounded to i8 for one weight format: `[token][k]` values and, per token and
/// weight block, the integer sum's start, `d_x` and `d_x · Σq_x`. Reused across calls.
#[derive(Default)]
pub(crate) struct QuantTokens {
    pub(crate) k: usize,
    /// Weight blocks per token.
    pub(crate) blocks: usize,
    pub(crate) qx: Vec<i8>,
    pub(crate) init: Vec<i32>,
    pub(crate) dx: Vec<f32>,
    pub(crate) dxs: Vec<f32>,
}

impl QuantTokens {
    /// Rounds `x` (`[n, k]`, `k` a multiple of 32 and of `block`) for weight blocks of `block`
    /// values with zero point `zero`, tokens spread over the thread pool, with the loops
    /// compiled for `isa`.
    pub(crate) fn prepare(&mut self, isa: Isa, x: &[f32], k: usize, block: usize, zero: i32) {
        let n = x.len() / k;
        let blocks = k / block;
        self.k = k;
        self.blocks = blocks;
        self.qx.resize(n * k, 0);
        self.init.resize(n * blocks, 0);
        self.dx.resize(n * blocks, 0.0);
        self.dxs.resize(n * blocks, 0.0);
        let qx = DisjointChunks::new(&mut self.qx, k);
        let (init, dx, dxs) = (
            DisjointChunks::new(&mut self.init, blocks),
            DisjointChunks::new(&mut self.dx, blocks),
            DisjointChunks::new(&mut self.dxs, blocks),
        );
        pool::for_each(n, |t| {
            // SAFETY: `for_each` runs each token index once.
            let (q, init, dx, dxs) = unsafe { (qx.get(t), init.get(t), dx.get(t), dxs.get(t)) };
            let token = Token {
                x: &x[t * k..(t + 1) * k],
                q,
                init,
                dx,
                dxs,
            };
            match isa {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: as in `decode_row`: detected features, safe generic code.
                Isa::Avx512 | Isa::Avx512Vnni => unsafe { token.round_avx512(block, zero) },
                _ => token.round(block, zero),
            }
        });
    }
}

/// A batch of tokens rounded as `Q8_K` (8 bits, one scale per 256 values, as the row dots and
/// llama.cpp round them for the k-quants), laid out for the panel GEMMs of `Q4_K`
/// (`gemm_q4k.rs`) and `Q6_K` (`gemm_q6k.rs`): the values `[n, k]` and the scales `[n, k/256]`;
/// for `Q4_K` each 32 values' `Σq` as f32 `[n, k/32]` (its mins' term), for `Q6_K` each 16
/// values' `−32·Σq` `[n, k/16]` (where its sums start: its values are stored `+ 32`, the zero
/// point of [`block_and_zero`]).
#[derive(Default)]
pub(crate) struct Q8kTokens {
    pub(crate) k: usize,
    /// 32-value blocks per token.
    pub(crate) blocks: usize,
    prepared: Vec<PreparedActivations>,
    pub(crate) qx: Vec<i8>,
    pub(crate) d: Vec<f32>,
    pub(crate) block_sums: Vec<f32>,
    pub(crate) offsets: Vec<i32>,
}

thread_local! {
    /// The k-quant GEMMs' activations, reused across calls on this thread.
    static Q8K_TOKENS: std::cell::RefCell<Q8kTokens> = std::cell::RefCell::new(Q8kTokens::default());
}

impl Q8kTokens {
    /// `f` of `x` (`[n, k]`) rounded for `format`'s weights into this thread's reusable tokens.
    pub(crate) fn with_prepared<R>(format: WeightFormat, x: &[f32], k: usize, f: impl FnOnce(&Q8kTokens) -> R) -> R {
        Q8K_TOKENS.with_borrow_mut(|tokens| {
            tokens.prepare(format, x, k);
            f(tokens)
        })
    }

    /// Rounds `x` (`[n, k]`, `k` a multiple of 256) for `format`'s weights (`Q4_K` or `Q6_K`),
    /// tokens spread over the thread pool.
    pub(crate) fn prepare(&mut self, format: WeightFormat, x: &[f32], k: usize) {
        let (_, zero) = block_and_zero(format).expect("k-quant weights");
        let n = x.len() / k;
        self.k = k;
        self.blocks = k / QK;
        if self.prepared.len() < n {
            self.prepared.resize_with(n, PreparedActivations::default);
        }
        pool::for_each_chunk_mut(&mut self.prepared[..n], 1, |t, p| {
            p[0].prepare(format, &x[t * k..(t + 1) * k])
        });
        self.qx.clear();
        self.d.clear();
        self.block_sums.clear();
        self.offsets.clear();
        for p in &self.prepared[..n] {
            assert!(p.fits(format, k), "k-quant rows hold whole super-blocks");
            self.qx.extend_from_slice(&p.qs);
            self.d.extend_from_slice(&p.d);
            if format == WeightFormat::Q4K {
                self.block_sums
                    .extend(p.bsums.chunks_exact(2).map(|s| (s[0] as i32 + s[1] as i32) as f32));
            }
            if zero != 0 {
                self.offsets.extend(p.bsums.iter().map(|&s| -zero * s as i32));
            }
        }
    }
}

/// One token's share of [`QuantTokens`].
struct Token<'a> {
    x: &'a [f32],
    q: &'a mut [i8],
    init: &'a mut [i32],
    dx: &'a mut [f32],
    dxs: &'a mut [f32],
}

impl Token<'_> {
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn round_avx512(self, block: usize, zero: i32) {
        self.round(block, zero)
    }

    #[inline(always)]
    fn round(self, block: usize, zero: i32) {
        let per = QK / block;
        for (((x, q), (init, dx)), dxs) in self
            .x
            .chunks_exact(QK)
            .zip(self.q.chunks_exact_mut(QK))
            .zip(self.init.chunks_exact_mut(per).zip(self.dx.chunks_exact_mut(per)))
            .zip(self.dxs.chunks_exact_mut(per))
        {
            let d = round_block(x, q);
            for (((q, init), dx), dxs) in q.chunks_exact(block).zip(init).zip(dx).zip(dxs) {
                let sum: i32 = q.iter().map(|&q| q as i32).sum();
                *init = -zero * sum;
                *dx = d;
                *dxs = d * sum as f32;
            }
        }
    }
}

/// The integer GEMMs' shared test reference (`gemm_int8.rs`, `gemm_q4k.rs`).
#[cfg(test)]
pub(crate) mod reference {
    use rand::{Rng, SeedableRng};

    use crate::cpu::dot::Isa;
    use crate::dtype::WeightFormat;
    use crate::quant::{PreparedActivations, QK_K};
    use crate::weight::{ByteView, WeightMatrix};

    /// `(rows, super-blocks, tokens)` of the k-quant GEMMs' cases: partial row groups and panels,
    /// one token (the decode kernel), every tile size of 1 to 8 tokens, 9 = 8 + 1 (the one-token
    /// kernel on a token past the first), and 11 = 8 + 3, 13 = 8 + 5.
    const KQUANT_CASES: [(usize, usize, usize); 13] = [
        (5, 1, 1),
        (48, 2, 1),
        (70, 3, 1),
        (16, 1, 2),
        (33, 1, 3),
        (33, 1, 4),
        (21, 2, 4),
        (32, 1, 6),
        (70, 3, 7),
        (17, 1, 8),
        (19, 2, 9),
        (21, 1, 11),
        (37, 2, 13),
    ];

    /// A k-quant panel GEMM (`gemm_q4k`, `gemm_q6k`) on every ISA: per case of [`KQUANT_CASES`],
    /// random weights quantised to `format` and [`activations`]; a fresh matrix per ISA (so that
    /// each builds the panels it keeps, which `kept` must then find), its outputs held to
    /// [`check_rounded_for`] with the `Q8_K` rounding of `format`.
    pub(crate) fn check_kquant_gemm(
        format: WeightFormat,
        seed: u64,
        gemm: fn(Isa, &[f32], &WeightMatrix, &mut [f32]),
        kept: fn(&WeightMatrix) -> bool,
    ) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        for (rows, supers, n) in KQUANT_CASES {
            let k = supers * QK_K;
            let values: Vec<f32> = (0..rows * k).map(|_| rng.random_range(-1.0f32..1.0).powi(3)).collect();
            let bytes = crate::quant::quantize(format, &values).unwrap();
            let matrix = || WeightMatrix::new(rows, k, format, ByteView::from_vec(bytes.clone())).unwrap();
            let decoded: Vec<f64> = matrix().to_f32().iter().map(|&v| v as f64).collect();
            let x = activations(&mut rng, n, k);
            for isa in Isa::available() {
                let w = matrix();
                let mut out = vec![f32::NAN; n * rows];
                gemm(isa, &x, &w, &mut out);
                assert!(kept(&w), "{format:?}: the panels are kept");
                check_rounded_for(format, &out, &decoded, &x, rows, k, isa.name());
            }
        }
    }

    /// `n × k` activations: zero blocks and outliers next to ordinary values.
    pub(crate) fn activations(rng: &mut impl Rng, n: usize, k: usize) -> Vec<f32> {
        (0..n * k)
            .map(|i| match (i / 32) % 5 {
                0 => 0.0,
                1 if i % 97 == 3 => 40.0,
                _ => rng.random_range(-1.0..1.0),
            })
            .collect()
    }

    /// Checks `out` (`[n, rows]`) against f64 sums over the dequantised weights `decoded`
    /// (`[rows, k]`): within `1e-5 · Σ|w·x̂|` of the exact product with the activations rounded
    /// to i8 per 32 values `x̂`, and within `Σ_blocks d_x/2 · Σ|w| + 1e-5 · Σ|w·x|` of the
    /// product with `x`.
    pub(crate) fn check(out: &[f32], decoded: &[f64], x: &[f32], rows: usize, k: usize, what: &str) {
        check_rounded_for(WeightFormat::Q8_0, out, decoded, x, rows, k, what);
    }

    /// [`check`] with the activations rounded as for `format` weights (`Q4_K`: per 256 values).
    pub(crate) fn check_rounded_for(
        format: WeightFormat,
        out: &[f32],
        decoded: &[f64],
        x: &[f32],
        rows: usize,
        k: usize,
        what: &str,
    ) {
        let n = x.len() / k;
        for t in 0..n {
            let xt = &x[t * k..(t + 1) * k];
            let rounded = PreparedActivations::new(format, xt);
            let block = k / rounded.d.len();
            let xq = rounded.dequantized();
            for r in 0..rows {
                let wr = &decoded[r * k..(r + 1) * k];
                let dot = |a: &dyn Fn(usize) -> f64| -> (f64, f64) {
                    (0..k).fold((0.0, 0.0), |(s, m), c| (s + wr[c] * a(c), m + (wr[c] * a(c)).abs()))
                };
                let (exact, magnitude) = dot(&|c| xt[c] as f64);
                let (exact_q, magnitude_q) = dot(&|c| xq[c] as f64);
                let bound: f64 = (0..k / block)
                    .map(|b| {
                        rounded.d[b] as f64 / 2.0 * wr[b * block..(b + 1) * block].iter().map(|v| v.abs()).sum::<f64>()
                    })
                    .sum();
                let got = out[t * rows + r] as f64;
                let name = format!("{what} rows {rows} k {k} n {n} [{t}][{r}]");
                assert!(
                    (got - exact_q).abs() <= 1e-5 * magnitude_q + 1e-30,
                    "{name}: {got} vs {exact_q}"
                );
                assert!(
                    (got - exact).abs() <= bound + 1e-5 * magnitude + 1e-30,
                    "{name}: {got} vs {exact} (bound {bound})"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weight::{ByteView, WeightMatrix};
    use rand::{Rng, SeedableRng};

    #[test]
    fn decoded_rows_equal_dequantize() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let cols = 512;
        let values: Vec<f32> = (0..2 * cols).map(|_| rng.random_range(-1.0..1.0)).collect();
        for format in [
            WeightFormat::Q8_0,
            WeightFormat::Q4_0,
            WeightFormat::Q4K,
            WeightFormat::Q6K,
        ] {
            let w = WeightMatrix::new(
                2,
                cols,
                format,
                ByteView::from_vec(crate::quant::quantize(format, &values).unwrap()),
            )
            .unwrap();
            let (bk, z) = block_and_zero(format).unwrap();
            let (mut u, mut s, mut o) = (vec![0u8; cols], vec![0.0; 16 * cols / bk], vec![0.0; 16 * cols / bk]);
            let mut expected = vec![0.0; cols];
            for row in 0..2 {
                w.dequantize_row(row, &mut expected);
                for isa in Isa::available() {
                    decode_row(isa, format, w.row_bytes(row), &mut u, &mut s, &mut o);
                    for (i, &e) in expected.iter().enumerate() {
                        let got = s[16 * (i / bk)] * (u[i] as i32 - z) as f32 + o[16 * (i / bk)];
                        assert_eq!(got, e, "{} {format:?} row {row} value {i}", isa.name());
                    }
                }
            }
        }
    }

    #[test]
    fn tokens_keep_block_sums() {
        let x: Vec<f32> = (0..128).map(|i| (i as f32 * 0.7).sin()).collect();
        let mut t = QuantTokens::default();
        t.prepare(Isa::Scalar, &x, 64, 16, 32);
        assert_eq!((t.blocks, t.init.len()), (4, 8));
        for (b, q) in t.qx.chunks(16).enumerate() {
            let sum: i32 = q.iter().map(|&q| q as i32).sum();
            assert_eq!(t.init[b], -32 * sum);
            assert_eq!(t.dxs[b], t.dx[b] * sum as f32);
        }
        assert_eq!(t.dx[0], t.dx[1]);
    }
}

//! Rotary position embedding: frequency tables for each scaling scheme, and the two layouts.

use std::f64::consts::PI;

/// Which pairs of a head's rotary part rotate together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// `(x[i], x[i + d/2])` — Llama/Qwen2 (`rotate_half`).
    HalfSplit,
    /// `(x[2i], x[2i + 1])` — DeepSeek's MLA rope part, as its reference implementation does.
    Interleaved,
}

/// Context-extension schemes of `rope_scaling` / `rope_parameters`.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    None,
    Linear {
        factor: f64,
    },
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
    Yarn {
        factor: f64,
        original_max_position_embeddings: f64,
        beta_fast: f64,
        beta_slow: f64,
        mscale: Option<f64>,
        mscale_all_dim: Option<f64>,
        /// An explicit `attention_factor` overrides the one derived from the mscales.
        attention_factor: Option<f64>,
    },
}

/// YaRN's magnitude correction `0.1 · m · ln(s) + 1` (1 when not extending).
pub fn yarn_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

/// Inverse frequencies of one rope dimension set, with the factor cos/sin are multiplied by.
#[derive(Clone, Debug)]
pub struct RopeTable {
    inv_freq: Vec<f32>,
    attention_factor: f32,
    style: RopeStyle,
}

impl RopeTable {
    /// Builds the table for a rotary dimension `dim` (even) and base `theta`.
    pub fn new(dim: usize, theta: f64, scaling: &RopeScaling, style: RopeStyle) -> Self {
        let half = dim / 2;
        let base: Vec<f64> = (0..half)
            .map(|i| 1.0 / theta.powf((2 * i) as f64 / dim as f64))
            .collect();
        let (inv_freq, attention_factor) = match *scaling {
            RopeScaling::None => (base, 1.0),
            RopeScaling::Linear { factor } => (base.iter().map(|f| f / factor).collect(), 1.0),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old_ctx,
            } => {
                let low_freq_wavelen = old_ctx / low_freq_factor;
                let high_freq_wavelen = old_ctx / high_freq_factor;
                let freqs = base
                    .iter()
                    .map(|&f| {
                        let wavelen = 2.0 * PI / f;
                        if wavelen < high_freq_wavelen {
                            f
                        } else if wavelen > low_freq_wavelen {
                            f / factor
                        } else {
                            let smooth = (old_ctx / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect();
                (freqs, 1.0)
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: old_ctx,
                beta_fast,
                beta_slow,
                mscale,
                mscale_all_dim,
                attention_factor,
            } => {
                // Dimension index whose wavelength completes `rotations` turns over the old context.
                let correction_dim =
                    |rotations: f64| (dim as f64 * (old_ctx / (rotations * 2.0 * PI)).ln()) / (2.0 * theta.ln());
                let low = correction_dim(beta_fast).floor().max(0.0);
                let high = correction_dim(beta_slow).ceil().min(dim as f64 - 1.0);
                let high = if low == high { high + 0.001 } else { high };
                let freqs = base
                    .iter()
                    .enumerate()
                    .map(|(i, &f)| {
                        let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                        let extrapolation = 1.0 - ramp;
                        (f / factor) * (1.0 - extrapolation) + f * extrapolation
                    })
                    .collect();
                let factor_out = attention_factor.unwrap_or(match (mscale, mscale_all_dim) {
                    (Some(m), Some(m_all)) if m != 0.0 && m_all != 0.0 => {
                        yarn_mscale(factor, m) / yarn_mscale(factor, m_all)
                    }
                    _ => yarn_mscale(factor, 1.0),
                });
                (freqs, factor_out)
            }
        };
        Self {
            inv_freq: inv_freq.into_iter().map(|f| f as f32).collect(),
            attention_factor: attention_factor as f32,
            style,
        }
    }

    /// Rotary dimension (twice the number of frequencies).
    pub fn dim(&self) -> usize {
        self.inv_freq.len() * 2
    }

    pub fn attention_factor(&self) -> f32 {
        self.attention_factor
    }

    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    /// Rotates `x` (`dim()` values) to position `pos`.
    #[inline]
    pub fn apply(&self, x: &mut [f32], pos: usize) {
        let half = self.inv_freq.len();
        for (i, &f) in self.inv_freq.iter().enumerate() {
            // f32 angle as the reference computes it (position × inv_freq in f32).
            let angle = pos as f32 * f;
            let (sin, cos) = angle.sin_cos();
            let (cos, sin) = (cos * self.attention_factor, sin * self.attention_factor);
            let (a, b) = match self.style {
                RopeStyle::HalfSplit => (i, i + half),
                RopeStyle::Interleaved => (2 * i, 2 * i + 1),
            };
            let (x1, x2) = (x[a], x[b]);
            x[a] = x1 * cos - x2 * sin;
            x[b] = x2 * cos + x1 * sin;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_frequencies() {
        let t = RopeTable::new(8, 10000.0, &RopeScaling::None, RopeStyle::HalfSplit);
        let expected = [1.0, 0.1, 0.01, 0.001];
        for (a, b) in t.inv_freq().iter().zip(expected) {
            assert!((a - b).abs() < 1e-7, "{a} vs {b}");
        }
        assert_eq!(t.attention_factor(), 1.0);
    }

    #[test]
    fn rotation_preserves_norm_and_is_relative() {
        let t = RopeTable::new(8, 10000.0, &RopeScaling::None, RopeStyle::Interleaved);
        let q0 = [0.3f32, -1.0, 0.5, 2.0, 0.1, 0.7, -0.2, 0.9];
        let k0 = [1.1f32, 0.4, -0.6, 0.2, 0.8, -0.3, 0.5, 0.05];
        let dot = |pq: usize, pk: usize| {
            let (mut q, mut k) = (q0, k0);
            t.apply(&mut q, pq);
            t.apply(&mut k, pk);
            q.iter().zip(&k).map(|(a, b)| a * b).sum::<f32>()
        };
        // Attention scores depend only on the distance between positions.
        assert!((dot(5, 2) - dot(13, 10)).abs() < 1e-4);
        let mut q = q0;
        t.apply(&mut q, 7);
        let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>();
        assert!((norm(&q) - norm(&q0)).abs() < 1e-4);
    }

    #[test]
    fn yarn_mscale_ratio_scales_cos_sin() {
        let scaling = RopeScaling::Yarn {
            factor: 4.0,
            original_max_position_embeddings: 128.0,
            beta_fast: 32.0,
            beta_slow: 1.0,
            mscale: Some(0.9),
            mscale_all_dim: Some(0.7),
            attention_factor: None,
        };
        let t = RopeTable::new(16, 10000.0, &scaling, RopeStyle::Interleaved);
        let expected = (0.09 * 4f64.ln() + 1.0) / (0.07 * 4f64.ln() + 1.0);
        assert!((t.attention_factor() as f64 - expected).abs() < 1e-6);
        // The highest frequency is extrapolated (unchanged), the lowest interpolated by the factor.
        let base = RopeTable::new(16, 10000.0, &RopeScaling::None, RopeStyle::Interleaved);
        assert_eq!(t.inv_freq()[0], base.inv_freq()[0]);
        assert!((t.inv_freq()[7] - base.inv_freq()[7] / 4.0).abs() < 1e-9);
    }
}

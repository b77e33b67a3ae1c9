//! llama3 rope scaling from a `rope_freqs.weight` tensor.
//!
//! llama.cpp's converter does not store llama3 scaling as keys: it writes one divisor per rotary
//! frequency (1 for high frequencies, `factor` for low ones, a smooth blend between). The kernels
//! take llama3 parameters, so they are recovered here and checked by recomputing every divisor.
//! Any parameters that reproduce the divisors give the same rope; `low_freq_factor` is fixed to 1
//! (the published value), which leaves one solution.

use std::f64::consts::PI;

use serde_json::{json, Value};

/// Relative tolerance when comparing recomputed divisors with the stored (f32) ones.
const TOLERANCE: f64 = 1e-5;

/// The divisor llama3 scaling applies to a frequency with inverse wavelength `x`, for thresholds
/// `x0` (below: `factor`) and `x1` (above: 1), as `transformers` and the converter compute it.
fn divisor(x: f64, factor: f64, x0: f64, x1: f64) -> f64 {
    let wavelen = 1.0 / x;
    let (low_wavelen, high_wavelen) = (1.0 / x0, 1.0 / x1);
    if wavelen < high_wavelen {
        1.0
    } else if wavelen > low_wavelen {
        factor
    } else {
        let smooth = (x - x0) / (x1 - x0);
        1.0 / ((1.0 - smooth) / factor + smooth)
    }
}

/// The `rope_scaling` object (HF style) that reproduces `factors` for a rotary dimension `dim`
/// with base `theta`: `Ok(None)` when every divisor is 1, `Err` with a reason when no llama3
/// parameters reproduce them.
pub fn llama3_from_factors(factors: &[f32], theta: f64, dim: usize) -> Result<Option<Value>, String> {
    if dim == 0 || factors.len() != dim / 2 {
        return Err(format!(
            "rope_freqs has {} values, expected rope dimension / 2 = {}",
            factors.len(),
            dim / 2
        ));
    }
    let factors: Vec<f64> = factors.iter().map(|&f| f as f64).collect();
    if factors.iter().any(|f| !f.is_finite() || *f < 1.0 - TOLERANCE) {
        return Err("rope_freqs holds a divisor below 1 or not finite (not llama3 scaling)".into());
    }
    // Inverse wavelengths, decreasing with the index.
    let xs: Vec<f64> = (0..dim / 2)
        .map(|i| theta.powf(-((2 * i) as f64) / dim as f64) / (2.0 * PI))
        .collect();
    let factor = factors.iter().cloned().fold(1.0, f64::max);
    if factor <= 1.0 + TOLERANCE {
        return Ok(None);
    }
    let is_high = |f: f64| (f - 1.0).abs() <= TOLERANCE;
    let is_low = |f: f64| (f - factor).abs() <= TOLERANCE * factor;
    let medium: Vec<(f64, f64)> = xs
        .iter()
        .zip(&factors)
        .filter(|(_, &f)| !is_high(f) && !is_low(f))
        .map(|(&x, &f)| (x, (1.0 / f - 1.0 / factor) / (1.0 - 1.0 / factor)))
        .collect();
    let lowest_x_high = xs
        .iter()
        .zip(&factors)
        .filter(|(_, &f)| is_high(f))
        .map(|(&x, _)| x)
        .fold(f64::INFINITY, f64::min);
    let highest_x_low = xs
        .iter()
        .zip(&factors)
        .filter(|(_, &f)| is_low(f))
        .map(|(&x, _)| x)
        .fold(0.0, f64::max);
    let (x0, x1) = match medium.len() {
        0 => {
            let top = if lowest_x_high.is_finite() {
                lowest_x_high
            } else {
                2.0 * xs[0]
            };
            let gap = top - highest_x_low;
            (highest_x_low + gap / 3.0, highest_x_low + 2.0 * gap / 3.0)
        }
        1 => {
            let (x, s) = medium[0];
            let x0 = (x + highest_x_low) / 2.0;
            (x0, x0 + (x - x0) / s)
        }
        n => {
            // Least squares s = a·x + b over the blended frequencies.
            let n = n as f64;
            let (sx, ss) = medium.iter().fold((0.0, 0.0), |(a, b), &(x, s)| (a + x, b + s));
            let (mx, ms) = (sx / n, ss / n);
            let cov: f64 = medium.iter().map(|&(x, s)| (x - mx) * (s - ms)).sum();
            let var: f64 = medium.iter().map(|&(x, _)| (x - mx) * (x - mx)).sum();
            let a = cov / var;
            let b = ms - a * mx;
            (-b / a, (1.0 - b) / a)
        }
    };
    if !(x0.is_finite() && x1.is_finite() && x0 > 0.0 && x1 > x0) {
        return Err("rope_freqs divisors do not follow llama3's low/high frequency split".into());
    }
    for (i, (&x, &f)) in xs.iter().zip(&factors).enumerate() {
        let again = divisor(x, factor, x0, x1);
        if (again - f).abs() > TOLERANCE * f {
            return Err(format!(
                "rope_freqs[{i}] = {f} cannot be reproduced by llama3 scaling (closest fit gives {again})"
            ));
        }
    }
    let original = 1.0 / x0;
    Ok(Some(json!({
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": x1 / x0,
        "original_max_position_embeddings": original,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The converter's computation, for parameters (factor, low, high, old_ctx).
    fn converter_factors(dim: usize, theta: f64, p: (f64, f64, f64, f64)) -> Vec<f32> {
        let (factor, low, high, old) = p;
        (0..dim / 2)
            .map(|i| {
                let freq = 1.0 / theta.powf((2 * i) as f64 / dim as f64);
                let wavelen = 2.0 * PI / freq;
                let f = if wavelen < old / high {
                    1.0
                } else if wavelen > old / low {
                    factor
                } else {
                    let smooth = (old / wavelen - low) / (high - low);
                    1.0 / ((1.0 - smooth) / factor + smooth)
                };
                f as f32
            })
            .collect()
    }

    fn frequencies(value: &Value, dim: usize, theta: f64) -> Vec<f32> {
        let scaling = r1serve_kernels::RopeScaling::Llama3 {
            factor: value["factor"].as_f64().unwrap(),
            low_freq_factor: value["low_freq_factor"].as_f64().unwrap(),
            high_freq_factor: value["high_freq_factor"].as_f64().unwrap(),
            original_max_position_embeddings: value["original_max_position_embeddings"].as_f64().unwrap(),
        };
        let style = r1serve_kernels::RopeStyle::HalfSplit;
        r1serve_kernels::RopeTable::new(dim, theta, &scaling, style)
            .inv_freq()
            .to_vec()
    }

    #[test]
    fn recovers_published_and_fixture_parameters() {
        for (dim, theta, p) in [
            (128, 500000.0, (8.0, 1.0, 4.0, 8192.0)),
            (64, 500000.0, (32.0, 1.0, 4.0, 8192.0)),
            (16, 10000.0, (8.0, 1.0, 4.0, 64.0)),
            (16, 10000.0, (4.0, 2.0, 8.0, 100.0)),
        ] {
            let factors = converter_factors(dim, theta, p);
            let value = llama3_from_factors(&factors, theta, dim).unwrap().unwrap();
            let (factor, low, high, old) = p;
            let expected = serde_json::json!({"factor": factor, "low_freq_factor": low,
                "high_freq_factor": high, "original_max_position_embeddings": old});
            let ours = frequencies(&value, dim, theta);
            let reference = frequencies(&expected, dim, theta);
            for (a, b) in ours.iter().zip(&reference) {
                assert!((a - b).abs() <= 1e-6 * b.abs(), "{p:?}: {a} vs {b} ({value})");
            }
        }
    }

    #[test]
    fn identity_and_garbage() {
        assert_eq!(llama3_from_factors(&[1.0; 8], 10000.0, 16).unwrap(), None);
        assert!(llama3_from_factors(&[1.0; 7], 10000.0, 16).is_err());
        assert!(llama3_from_factors(&[2.0, 1.0, 2.0, 1.0], 10000.0, 8).is_err());
        assert!(llama3_from_factors(&[0.5; 4], 10000.0, 8).is_err());
    }
}

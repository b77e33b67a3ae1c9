//! Hand-built blocks with known values, and quantize → dequantize round trips with error bounds.

use rand::{Rng, SeedableRng};

use super::*;
use crate::dtype::f16_to_f32;

fn f16(v: f32) -> [u8; 2] {
    half::f16::from_f32(v).to_bits().to_le_bytes()
}

#[test]
fn q4_0_hand_built_block() {
    // d = 0.5; element i < 16 has nibble i, element 16 + i has nibble 15 − i.
    let mut block = f16(0.5).to_vec();
    block.extend((0..16u8).map(|i| i | ((15 - i) << 4)));
    let mut out = [0.0f32; 32];
    q4_0::dequantize(&block, &mut out);
    for i in 0..16 {
        assert_eq!(out[i], (i as f32 - 8.0) * 0.5);
        assert_eq!(out[16 + i], (7.0 - i as f32) * 0.5);
    }
    assert_eq!(out[0], -4.0);
    assert_eq!(out[16], 3.5);
}

#[test]
fn q8_0_hand_built_block() {
    let mut block = f16(-0.25).to_vec();
    let q: Vec<i8> = (0..32)
        .map(|i| {
            if i == 0 {
                -128
            } else if i == 1 {
                127
            } else {
                i - 16
            }
        })
        .collect();
    block.extend(q.iter().map(|&v| v as u8));
    let mut out = [0.0f32; 32];
    q8_0::dequantize(&block, &mut out);
    for (o, &v) in out.iter().zip(&q) {
        assert_eq!(*o, v as f32 * -0.25);
    }
    assert_eq!((out[0], out[1]), (32.0, -31.75));
}

#[test]
fn q4_k_hand_built_block() {
    let (sc, m) = ([1u8, 2, 3, 4, 17, 33, 50, 63], [0u8, 5, 10, 63, 16, 32, 48, 1]);
    // The 12 packed bytes for these scales and mins, worked out by hand from the layout (and
    // checked against the `gguf` package's `Q4_K.get_scale_min`).
    let packed = [0x41, 0x82, 0xc3, 0xc4, 0x40, 0x85, 0xca, 0x3f, 0x01, 0x01, 0x02, 0x1f];
    assert_eq!(q4_k::scales_mins(&packed), (sc, m));
    let (d, dmin) = (1.0f32, 0.5f32);
    let mut block = [f16(d), f16(dmin)].concat();
    block.extend_from_slice(&packed);
    // Byte k of chunk c: low nibble (k % 16), high nibble ((k + c) % 16).
    for c in 0..4 {
        block.extend((0..32u8).map(|k| (k % 16) | (((k + c) % 16) << 4)));
    }
    assert_eq!(block.len(), q4_k::BLOCK_BYTES);
    let mut out = [0.0f32; 256];
    q4_k::dequantize(&block, &mut out);
    for (e, &o) in out.iter().enumerate() {
        let (j, k) = (e / 32, (e % 32) as u8);
        let c = (j / 2) as u8;
        let q = if j % 2 == 0 { k % 16 } else { (k + c) % 16 };
        assert_eq!(o, d * sc[j] as f32 * q as f32 - dmin * m[j] as f32, "element {e}");
    }
    assert_eq!(out[255], 63.0 * 2.0 - 0.5);
}

#[test]
fn q6_k_hand_built_block() {
    let d = 0.5f32;
    let scales: [i8; 16] = std::array::from_fn(|g| if g % 3 == 0 { -(g as i8) - 1 } else { g as i8 * 8 });
    let q = |e: usize| ((e * 7 + e / 64) % 64) as u8;
    let mut block = vec![0u8; q6_k::BLOCK_BYTES];
    for e in 0..256 {
        // Spelled out from the layout: half h, quarter k, lane l.
        let (h, k, l) = (e / 128, (e % 128) / 32, e % 32);
        let ql = 64 * h + 32 * (k % 2) + l;
        block[ql] |= (q(e) & 15) << (4 * (k / 2));
        block[128 + 32 * h + l] |= (q(e) >> 4) << (2 * k);
    }
    for (dst, &s) in block[192..208].iter_mut().zip(&scales) {
        *dst = s as u8;
    }
    block[208..].copy_from_slice(&f16(d));
    let mut out = [0.0f32; 256];
    q6_k::dequantize(&block, &mut out);
    for (e, &o) in out.iter().enumerate() {
        assert_eq!(o, d * scales[e / 16] as f32 * (q(e) as f32 - 32.0), "element {e}");
    }
}

/// Rows of test data: Gaussian-ish, uniform, and edge cases (zeros, a constant, one spike,
/// tiny and large magnitudes, all-positive and all-negative blocks).
fn test_rows(block: usize) -> Vec<Vec<f32>> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let n = 4 * block;
    let gauss = |rng: &mut rand_chacha::ChaCha8Rng| (0..6).map(|_| rng.random_range(-1.0f32..1.0)).sum::<f32>();
    let mut rows = vec![
        (0..n).map(|_| gauss(&mut rng)).collect::<Vec<f32>>(),
        (0..n).map(|_| rng.random_range(-3.0f32..3.0)).collect(),
        vec![0.0; n],
        vec![0.75; n],
        (0..n)
            .map(|i| if i % 97 == 5 { 40.0 } else { 0.01 * (i % 7) as f32 })
            .collect(),
        (0..n).map(|_| gauss(&mut rng) * 1e-4).collect(),
        (0..n).map(|_| gauss(&mut rng) * 1e3).collect(),
        (0..n).map(|_| rng.random_range(0.5f32..2.0)).collect(),
        (0..n).map(|_| rng.random_range(-2.0f32..-0.5)).collect(),
    ];
    rows.push((0..n).map(|i| if i < n / 2 { 0.0 } else { gauss(&mut rng) }).collect());
    rows
}

fn round_trip(format: WeightFormat, x: &[f32]) -> Vec<f32> {
    let bytes = quantize(format, x).unwrap();
    assert_eq!(bytes.len(), x.len() / format.block_size() * format.block_bytes());
    let mut out = vec![f32::NAN; x.len()];
    dequantize(format, &bytes, &mut out);
    out
}

fn rms(v: impl Iterator<Item = f32>) -> f64 {
    let (sum, n) = v.fold((0.0f64, 0usize), |(s, n), x| (s + (x as f64).powi(2), n + 1));
    (sum / n.max(1) as f64).sqrt()
}

#[test]
fn q8_0_round_trip_within_half_a_step() {
    for x in test_rows(QK) {
        let bytes = quantize(WeightFormat::Q8_0, &x).unwrap();
        let y = round_trip(WeightFormat::Q8_0, &x);
        for ((xb, yb), block) in x.chunks(QK).zip(y.chunks(QK)).zip(bytes.chunks(q8_0::BLOCK_BYTES)) {
            // q = round(x / d) with the f32 `d`; the stored f16 `d16` moves each value by ≤ 127·|d − d16|.
            let d = xb.iter().fold(0.0f32, |m, v| m.max(v.abs())) / 127.0;
            let d16 = f16_to_f32(u16::from_le_bytes([block[0], block[1]]));
            let bound = d / 2.0 + 127.0 * (d - d16).abs() + 1e-6 * d;
            for (a, b) in xb.iter().zip(yb) {
                assert!((a - b).abs() <= bound, "{a} vs {b} (d {d})");
            }
        }
    }
}

#[test]
fn q4_0_round_trip_within_one_step() {
    for x in test_rows(QK) {
        let y = round_trip(WeightFormat::Q4_0, &x);
        for (xb, yb) in x.chunks(QK).zip(y.chunks(QK)) {
            // The extreme maps to −8 exactly; values of the other sign may clip at +7: at most one
            // step `d = max|x| / 8` off (plus the f16 rounding of `d`, ≤ 8 · 2⁻¹¹ · d).
            let d = xb.iter().fold(0.0f32, |m, v| m.max(v.abs())) / 8.0;
            for (a, b) in xb.iter().zip(yb) {
                assert!((a - b).abs() <= d * (1.0 + 8.0 / 2048.0) + 1e-30, "{a} vs {b} (d {d})");
            }
        }
    }
}

/// K-quant round trips: per 256, RMS error relative to the values' RMS below `rel_rms`, and no
/// value further off than `max_steps` of the block's largest magnitude / `levels` (the scale
/// search may clip a few extremes when that lowers the squared error).
fn check_k_round_trip(format: WeightFormat, rel_rms: f64, levels: f32, max_steps: f32) {
    for (r, x) in test_rows(QK_K).into_iter().enumerate() {
        let y = round_trip(format, &x);
        for (xb, yb) in x.chunks(QK_K).zip(y.chunks(QK_K)) {
            let err = rms(xb.iter().zip(yb).map(|(a, b)| a - b));
            let scale = rms(xb.iter().copied());
            assert!(
                err <= rel_rms * scale + 1e-12,
                "{} row {r}: rms error {err} vs rms {scale}",
                format.name()
            );
            let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            for (a, b) in xb.iter().zip(yb) {
                assert!(
                    (a - b).abs() <= max_steps * amax / levels + 1e-30,
                    "{} row {r}: {a} vs {b} (max {amax})",
                    format.name()
                );
            }
        }
    }
}

#[test]
fn q4_k_round_trip_error() {
    check_k_round_trip(WeightFormat::Q4K, 0.12, 15.0, 2.0);
    // On Gaussian data the scale search beats a plain min/max grid clearly.
    let x = &test_rows(QK_K)[0];
    let y = round_trip(WeightFormat::Q4K, x);
    let rel = rms(x.iter().zip(&y).map(|(a, b)| a - b)) / rms(x.iter().copied());
    assert!(rel < 0.09, "Q4_K relative RMS error {rel}");
}

#[test]
fn q6_k_round_trip_error() {
    check_k_round_trip(WeightFormat::Q6K, 0.03, 31.0, 1.0);
    let x = &test_rows(QK_K)[0];
    let y = round_trip(WeightFormat::Q6K, x);
    let rel = rms(x.iter().zip(&y).map(|(a, b)| a - b)) / rms(x.iter().copied());
    assert!(rel < 0.02, "Q6_K relative RMS error {rel}");
}

#[test]
fn quantize_rejects_partial_blocks() {
    for format in [
        WeightFormat::Q8_0,
        WeightFormat::Q4_0,
        WeightFormat::Q4K,
        WeightFormat::Q6K,
    ] {
        let err = quantize(format, &vec![1.0; format.block_size() + 1]).unwrap_err();
        assert!(err.to_string().contains(format.name()), "{err}");
        assert!(quantize(format, &[]).unwrap().is_empty());
    }
    assert!(quantize(WeightFormat::F32, &[1.0; 32]).is_err());
}

#[test]
fn scalar_dots_agree_with_dequantized() {
    for format in [
        WeightFormat::Q8_0,
        WeightFormat::Q4_0,
        WeightFormat::Q4K,
        WeightFormat::Q6K,
    ] {
        let x = &test_rows(QK_K)[0];
        let a = &test_rows(QK_K)[1];
        let bytes = quantize(format, x).unwrap();
        let w = round_trip(format, x);
        let exact: f64 = w.iter().zip(a).map(|(&w, &a)| w as f64 * a as f64).sum();
        let magnitude: f64 = w.iter().zip(a).map(|(&w, &a)| (w as f64 * a as f64).abs()).sum();
        let got = dot_f32(format, &bytes, a) as f64;
        assert!(
            (got - exact).abs() <= 1e-5 * magnitude,
            "{}: {got} vs {exact}",
            format.name()
        );

        let p = PreparedActivations::new(format, a);
        let aq = p.dequantized();
        let exact_q: f64 = w.iter().zip(&aq).map(|(&w, &a)| w as f64 * a as f64).sum();
        let got = dot_prepared(format, &bytes, &p).unwrap() as f64;
        assert!(
            (got - exact_q).abs() <= 1e-5 * magnitude,
            "{}: {got} vs {exact_q}",
            format.name()
        );
    }
}

//! Byte compatibility with GGUF: test vectors written by the `gguf` Python package
//! (`tools/make_quant_vectors.py`, see `tests/fixtures/quant/README.md`).

use r1serve_kernels::cpu::dot::{dot_row_prepared_with, dot_row_with, Isa};
use r1serve_kernels::{quant, ByteView, PreparedActivations, WeightFormat, WeightMatrix};
use serde_json::Value;

fn vectors() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/quant/vectors.json");
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap()
}

fn format(name: &str) -> WeightFormat {
    match name {
        "Q8_0" => WeightFormat::Q8_0,
        "Q4_0" => WeightFormat::Q4_0,
        "Q4_K" => WeightFormat::Q4K,
        "Q6_K" => WeightFormat::Q6K,
        other => panic!("unknown format {other}"),
    }
}

fn hex(v: &Value) -> Vec<u8> {
    let s = v.as_str().unwrap();
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap())
        .collect()
}

fn f32s(v: &Value) -> Vec<f32> {
    hex(v)
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

#[test]
fn block_sizes_match_gguf() {
    let doc = vectors();
    for (name, sizes) in doc["block_sizes"].as_object().unwrap() {
        let f = format(name);
        assert_eq!(sizes[0].as_u64().unwrap() as usize, f.block_size(), "{name}");
        assert_eq!(sizes[1].as_u64().unwrap() as usize, f.block_bytes(), "{name}");
    }
}

#[test]
fn dequantize_matches_gguf_bit_for_bit() {
    let doc = vectors();
    let cases = doc["cases"].as_array().unwrap();
    let mut seen = std::collections::HashSet::new();
    for case in cases {
        let name = case["format"].as_str().unwrap();
        let f = format(name);
        let (rows, cols) = (
            case["rows"].as_u64().unwrap() as usize,
            case["cols"].as_u64().unwrap() as usize,
        );
        let bytes = hex(&case["bytes"]);
        let expected = f32s(&case["dequant_f32"]);
        assert_eq!(expected.len(), rows * cols);
        let w = WeightMatrix::new(rows, cols, f, ByteView::from_vec(bytes.clone())).unwrap();
        let mut row = vec![0.0f32; cols];
        for r in 0..rows {
            w.dequantize_row(r, &mut row);
            for (c, (got, want)) in row.iter().zip(&expected[r * cols..]).enumerate() {
                assert_eq!(got.to_bits(), want.to_bits(), "{name} row {r} col {c}: {got} vs {want}");
            }
        }
        seen.insert((name.to_string(), case["source"].as_str().unwrap().to_string()));

        if let Some(input) = case.get("input_f32") {
            // ggml's reference quantizers (Q8_0, Q4_0): our bytes are the package's bytes.
            let ours = quant::quantize(f, &f32s(input)).unwrap();
            assert_eq!(ours, bytes, "{name}: quantized bytes differ from the gguf package's");
        }

        // The dot products read the same bytes: every ISA, both entry points, against the
        // package's values (f32 activations: rounding only; prepared: plus the activations'
        // half-step bound, see `cpu::dot` tests).
        let x: Vec<f32> = (0..cols).map(|i| (i * 37 % 101) as f32 / 50.0 - 1.0).collect();
        let prepared = PreparedActivations::new(f, &x);
        for r in 0..rows {
            let values = &expected[r * cols..(r + 1) * cols];
            let exact: f64 = values.iter().zip(&x).map(|(&w, &x)| w as f64 * x as f64).sum();
            let magnitude: f64 = values.iter().zip(&x).map(|(&w, &x)| (w as f64 * x as f64).abs()).sum();
            let step_bound: f64 = values.iter().map(|w| w.abs() as f64).sum::<f64>() / 127.0 / 2.0;
            for isa in Isa::available() {
                let got = dot_row_with(isa, &w, r, &x) as f64;
                assert!(
                    (got - exact).abs() <= 1e-5 * magnitude + 1e-30,
                    "{name} {isa:?}: {got} vs {exact}"
                );
                let got = dot_row_prepared_with(isa, &w, r, &x, &prepared) as f64;
                assert!(
                    (got - exact).abs() <= step_bound + 1e-5 * magnitude + 1e-30,
                    "{name} {isa:?} prepared: {got} vs {exact}"
                );
            }
        }
    }
    for name in ["Q8_0", "Q4_0", "Q4_K", "Q6_K"] {
        assert!(
            seen.contains(&(name.to_string(), "random_blocks".to_string())),
            "{name} missing"
        );
    }
    assert!(seen.contains(&("Q8_0".to_string(), "quantize".to_string())));
    assert!(seen.contains(&("Q4_0".to_string(), "quantize".to_string())));
}

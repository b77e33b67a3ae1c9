//! `r1serve bench`: the JSON report's keys, and its byte count checked against the config.

use std::process::Command;

use serde_json::Value;

fn fixture(name: &str) -> String {
    format!("{}/../../tests/fixtures/{name}/config.json", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn dummy_bench_reports_roofline_keys_and_exact_bytes() {
    let config_path = fixture("llama-f32");
    let output = Command::new(env!("CARGO_BIN_EXE_r1serve"))
        .args(["-t", "1", "bench", "--config", &config_path, "--load-format", "dummy"])
        .args(["-p", "4", "-n", "3", "--repetitions", "1", "--batch", "2", "--json"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    for key in [
        "pp_tps",
        "tg_tps",
        "read_bandwidth_gbs",
        "roofline_fraction",
        "tg_batch_tps",
        "batch_speedup",
    ] {
        let v = report[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{key} missing in {report}"));
        assert!(v.is_finite() && v > 0.0, "{key} = {v}");
    }
    // Every matrix a token multiplies by (F32 weights: 4 bytes each) plus one embedding row.
    let c: Value = serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    let n = |k: &str| c[k].as_u64().unwrap();
    let (h, heads, kv) = (n("hidden_size"), n("num_attention_heads"), n("num_key_value_heads"));
    let hd = c["head_dim"].as_u64().unwrap_or(h / heads);
    let per_layer = h * heads * hd * 2 + h * kv * hd * 2 + 3 * h * n("intermediate_size");
    let weights = 4 * (n("num_hidden_layers") * per_layer + n("vocab_size") * h + h);
    assert_eq!(report["weight_bytes_per_token"].as_u64(), Some(weights));
    // The 3 decoded tokens attend to 1, 2 and 3 entries (f32 keys and values of every KV head in
    // every layer): 2 on average.
    let kv_cache = 4 * n("num_hidden_layers") * 2 * kv * hd * 2;
    assert_eq!(report["kv_cache_bytes_per_token"].as_u64(), Some(kv_cache));
    let expected = weights + kv_cache;
    assert_eq!(report["bytes_per_token"].as_u64(), Some(expected));
    // The bandwidth is the median of the samples taken around the timed decodes.
    let bandwidth = |key: &str| {
        report[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{key} missing in {report}"))
    };
    let (low, mid, high) = (
        bandwidth("read_bandwidth_gbs_min"),
        bandwidth("read_bandwidth_gbs"),
        bandwidth("read_bandwidth_gbs_max"),
    );
    assert!(0.0 < low && low <= mid && mid <= high, "{report}");
    let roofline = mid * 1e9 / expected as f64;
    let fraction = report["tg_tps"].as_f64().unwrap() / roofline;
    assert!((fraction - report["roofline_fraction"].as_f64().unwrap()).abs() < 1e-9);
}

#[test]
fn bench_without_weights_is_refused_by_name() {
    let output = Command::new(env!("CARGO_BIN_EXE_r1serve"))
        .args(["bench", "--config", &fixture("llama-f32")])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--load-format dummy"));
}

/// `r1serve -t 1 bench` on the llama-f32 config with dummy weights, one repetition, JSON out.
fn dummy_bench(extra: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_r1serve"))
        .args([
            "-t",
            "1",
            "bench",
            "--config",
            &fixture("llama-f32"),
            "--load-format",
            "dummy",
        ])
        .args(["--repetitions", "1", "--json"])
        .args(extra)
        .output()
        .unwrap()
}

/// `-p 0` / `-n 0` skip that test, as llama-bench's do: its keys are `null`, the other test runs;
/// both 0 (nothing to measure) and `--batch` without decode are refused by name.
#[test]
fn zero_tokens_skip_a_test() {
    let run = dummy_bench;
    let report = |extra: &[&str]| -> Value {
        let output = run(extra);
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        serde_json::from_slice(&output.stdout).unwrap()
    };
    let decode_only = report(&["-p", "0", "-n", "3"]);
    assert!(decode_only["pp_tps"].is_null(), "{decode_only}");
    assert!(decode_only["tg_tps"].as_f64().is_some_and(|v| v > 0.0), "{decode_only}");
    assert!(decode_only["roofline_fraction"].as_f64().is_some(), "{decode_only}");
    let prefill_only = report(&["-p", "4", "-n", "0"]);
    assert!(
        prefill_only["pp_tps"].as_f64().is_some_and(|v| v > 0.0),
        "{prefill_only}"
    );
    assert!(prefill_only["tg_tps"].is_null() && prefill_only["roofline_fraction"].is_null());
    for (extra, needle) in [
        (&["-p", "0", "-n", "0"][..], "nothing to measure"),
        (&["-p", "4", "-n", "0", "--batch", "2"][..], "--batch 2"),
    ] {
        let output = run(extra);
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(needle), "{stderr}");
    }
}

/// `-d N` (llama-bench's depth): the tests run after N tokens of context, each decoded token
/// reads N more KV cache entries than at depth 0, and a depth beyond the model's context is
/// refused by name.
#[test]
fn depth_fills_the_context_first() {
    let run = |depth: &str| dummy_bench(&["-p", "4", "-n", "3", "--batch", "2", "-d", depth]);
    let report = |depth: &str| -> Value {
        let output = run(depth);
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        serde_json::from_slice(&output.stdout).unwrap()
    };
    let (shallow, deep) = (report("0"), report("37"));
    assert_eq!(deep["n_depth"].as_u64(), Some(37));
    for key in ["pp_tps", "tg_tps", "tg_batch_tps", "roofline_fraction"] {
        assert!(deep[key].as_f64().is_some_and(|v| v > 0.0), "{key} in {deep}");
    }
    let kv = |r: &Value| r["kv_cache_bytes_per_token"].as_u64().unwrap();
    let c: Value = serde_json::from_str(&std::fs::read_to_string(fixture("llama-f32")).unwrap()).unwrap();
    let n = |k: &str| c[k].as_u64().unwrap();
    let hd = c["head_dim"]
        .as_u64()
        .unwrap_or(n("hidden_size") / n("num_attention_heads"));
    let per_position = 4 * n("num_hidden_layers") * 2 * n("num_key_value_heads") * hd;
    assert_eq!(kv(&deep) - kv(&shallow), 37 * per_position);
    assert_eq!(deep["weight_bytes_per_token"], shallow["weight_bytes_per_token"]);
    let context = n("max_position_embeddings").to_string();
    let output = run(&context);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("-d {context}")) && stderr.contains("context"),
        "{stderr}"
    );
}

//! The golden files of `tests/fixtures/*/golden.json` (written by `tools/make_fixtures.py`), shared
//! by the test binaries that compare against them.

use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Deserialize)]
pub struct Golden {
    pub cases: Vec<Case>,
}

#[derive(Deserialize)]
pub struct Case {
    pub prompt_ids: Vec<u32>,
    pub greedy: Vec<u32>,
    pub logprobs: Vec<Vec<f32>>,
}

pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// The golden file of fixture directory `dir`.
pub fn read(dir: &Path) -> Golden {
    serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap()
}

/// Reference-grade log-softmax (normaliser summed in f64).
pub fn log_softmax(row: &[f32]) -> Vec<f32> {
    let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let lse = row.iter().map(|&v| ((v - max) as f64).exp()).sum::<f64>().ln() as f32 + max;
    row.iter().map(|&v| v - lse).collect()
}

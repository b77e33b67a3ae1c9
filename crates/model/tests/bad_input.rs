//! Bad input never panics: every broken model directory below (a copy of a good fixture, then
//! damaged) must give an `Err` whose message names the file, tensor or key at fault, and a forward
//! pass over an invalid batch must return an `Err` and leave the model usable.
//!
//! Damaged safetensors files are written with the small reader/writer at the top of this file
//! (8-byte little-endian header length + JSON header + data), so every case controls exactly
//! which byte or header field is wrong.

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use r1serve_kernels::{CpuBackend, PagedKvCache};
use r1serve_model::{load_model, Batch, CausalLm, LogitsWanted, ModelError, SeqInput};
use serde_json::{json, Map, Value};
use tempfile::TempDir;

// ---------------------------------------------------------------------------------------------
// Fixtures and the load helpers.

const SHARD1: &str = "model-00001-of-00002.safetensors";
const SHARD2: &str = "model-00002-of-00002.safetensors";
const INDEX: &str = "model.safetensors.index.json";

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

/// A temp copy of a fixture directory (flat: fixtures have no subdirectories).
fn copy_fixture(name: &str) -> TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), tmp.path().join(entry.file_name())).unwrap();
        }
    }
    tmp
}

fn panic_message(payload: Box<dyn Any + Send>) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

/// Loads `dir`; asserts it neither panics nor succeeds, and returns the error's message.
fn load_err(dir: &Path) -> String {
    let result = catch_unwind(AssertUnwindSafe(|| load_model(dir, Arc::new(CpuBackend::default()))));
    match result {
        Err(payload) => panic!("loading {} panicked: {}", dir.display(), panic_message(payload)),
        Ok(Ok(_)) => panic!("loading {} succeeded but should have failed", dir.display()),
        Ok(Err(e)) => {
            let message = e.to_string();
            eprintln!("{message}");
            message
        }
    }
}

/// Loads `dir` and expects success (the positive controls that prove a damage test fails for the
/// reason it claims, not because the test's writer is wrong).
fn load_ok(dir: &Path) -> Box<dyn CausalLm> {
    load_model(dir, Arc::new(CpuBackend::default())).unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

#[track_caller]
fn assert_names(message: &str, needles: &[&str]) {
    for needle in needles {
        assert!(
            message.contains(needle),
            "error message does not name `{needle}`: {message}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// A minimal safetensors reader / writer.

#[derive(Clone, Debug)]
struct Tensor {
    name: String,
    dtype: String,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl Tensor {
    fn new(name: &str, dtype: &str, shape: &[usize], data: Vec<u8>) -> Self {
        Self {
            name: name.to_owned(),
            dtype: dtype.to_owned(),
            shape: shape.to_vec(),
            data,
        }
    }
}

/// Reads a well-formed safetensors file into its tensors, in file order.
fn read_safetensors(path: &Path) -> Vec<Tensor> {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Map<String, Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let data = &bytes[8 + n..];
    let mut tensors: Vec<(usize, Tensor)> = header
        .iter()
        .filter(|(name, _)| name.as_str() != "__metadata__")
        .map(|(name, info)| {
            let offsets: Vec<usize> = info["data_offsets"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as usize)
                .collect();
            let shape: Vec<usize> = info["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as usize)
                .collect();
            let tensor = Tensor::new(
                name,
                info["dtype"].as_str().unwrap(),
                &shape,
                data[offsets[0]..offsets[1]].to_vec(),
            );
            (offsets[0], tensor)
        })
        .collect();
    tensors.sort_by_key(|(start, _)| *start);
    tensors.into_iter().map(|(_, t)| t).collect()
}

/// The header object a writer would produce for `tensors` laid out back to back.
fn header_for(tensors: &[Tensor]) -> Map<String, Value> {
    let mut header = Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut offset = 0;
    for t in tensors {
        header.insert(
            t.name.clone(),
            json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [offset, offset + t.data.len()]}),
        );
        offset += t.data.len();
    }
    header
}

/// Writes `header_bytes` (padded with spaces to a multiple of 8) after its length, then `data`.
fn write_raw(path: &Path, header_bytes: &[u8], data: &[u8]) {
    let mut header = header_bytes.to_vec();
    while !header.len().is_multiple_of(8) {
        header.push(b' ');
    }
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&header);
    out.extend_from_slice(data);
    std::fs::write(path, out).unwrap();
}

fn write_safetensors(path: &Path, tensors: &[Tensor]) {
    let header = serde_json::to_vec(&header_for(tensors)).unwrap();
    let data: Vec<u8> = tensors.iter().flat_map(|t| t.data.iter().copied()).collect();
    write_raw(path, &header, &data);
}

/// Rewrites the safetensors file at `path` after `edit` changes its tensors.
fn edit_safetensors(path: &Path, edit: impl FnOnce(&mut Vec<Tensor>)) {
    let mut tensors = read_safetensors(path);
    edit(&mut tensors);
    write_safetensors(path, &tensors);
}

fn tensor_mut<'a>(tensors: &'a mut [Tensor], name: &str) -> &'a mut Tensor {
    tensors
        .iter_mut()
        .find(|t| t.name == name)
        .unwrap_or_else(|| panic!("fixture has no tensor {name}"))
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut Map<String, Value>)) {
    let mut value: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(value.as_object_mut().unwrap());
    std::fs::write(path, serde_json::to_string_pretty(&value).unwrap()).unwrap();
}

fn truncate(path: &Path, cut: u64) {
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let len = file.metadata().unwrap().len();
    file.set_len(len - cut).unwrap();
}

// qwen2-f32: hidden 64, 4 heads / 1 kv head of 16, intermediate 128, vocab 288, tied embeddings,
// one `model.safetensors`.
const QWEN: &str = "qwen2-f32";
const GATE: &str = "model.layers.0.mlp.gate_proj.weight"; // [128, 64]
const K_PROJ: &str = "model.layers.1.self_attn.k_proj.weight"; // [16, 64]
const NORM: &str = "model.norm.weight"; // [64]

fn qwen_weights(dir: &TempDir) -> PathBuf {
    dir.path().join("model.safetensors")
}

// ---------------------------------------------------------------------------------------------
// Positive controls.

#[test]
fn rewritten_fixtures_still_load() {
    // Our writer round-trips a checkpoint: what the damage tests change is the only fault.
    let dir = copy_fixture(QWEN);
    edit_safetensors(&qwen_weights(&dir), |_| {});
    load_ok(dir.path());
    let dir = copy_fixture("llama-f32");
    edit_safetensors(&dir.path().join(SHARD1), |_| {});
    load_ok(dir.path());
}

// ---------------------------------------------------------------------------------------------
// Sharded checkpoints and the index.

#[test]
fn missing_shard_is_named() {
    let dir = copy_fixture("llama-f32");
    std::fs::remove_file(dir.path().join(SHARD2)).unwrap();
    let message = load_err(dir.path());
    assert_names(&message, &[SHARD2, INDEX, "missing"]);
}

#[test]
fn shard_names_with_path_separators_are_refused() {
    for evil in [
        "../x.safetensors",
        "/etc/passwd",
        "sub/model.safetensors",
        "..\\x.safetensors",
        "..",
    ] {
        // The model lies in outer/model; a real shard waits at outer/x.safetensors and at
        // outer/model/sub/model.safetensors, so only the name check can stop the traversal.
        let outer = tempfile::tempdir().unwrap();
        let model = outer.path().join("model");
        std::fs::create_dir(&model).unwrap();
        for entry in std::fs::read_dir(fixture("llama-f32")).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), model.join(entry.file_name())).unwrap();
        }
        std::fs::copy(model.join(SHARD2), outer.path().join("x.safetensors")).unwrap();
        std::fs::create_dir(model.join("sub")).unwrap();
        std::fs::copy(model.join(SHARD2), model.join("sub/model.safetensors")).unwrap();
        edit_json(&model.join(INDEX), |index| {
            index["weight_map"]["lm_head.weight"] = json!(evil);
        });
        let message = load_err(&model);
        assert_names(&message, &[INDEX, evil]);
    }
}

#[test]
fn shard_names_that_are_the_directory_are_refused() {
    // An empty name or "." would resolve to the model directory itself.
    for odd in ["", "."] {
        let dir = copy_fixture("llama-f32");
        edit_json(&dir.path().join(INDEX), |index| {
            index["weight_map"]["lm_head.weight"] = json!(odd);
        });
        assert_names(&load_err(dir.path()), &[INDEX, &format!("`{odd}`")]);
    }
}

#[test]
fn shard_that_is_a_directory_is_named() {
    let dir = copy_fixture("llama-f32");
    std::fs::remove_file(dir.path().join(SHARD2)).unwrap();
    std::fs::create_dir(dir.path().join(SHARD2)).unwrap();
    assert_names(&load_err(dir.path()), &[SHARD2, "not a regular file"]);
    let dir = copy_fixture(QWEN);
    std::fs::remove_file(qwen_weights(&dir)).unwrap();
    std::fs::create_dir(qwen_weights(&dir)).unwrap();
    assert_names(&load_err(dir.path()), &["model.safetensors", "not a regular file"]);
}

#[test]
fn index_that_is_not_json_is_named() {
    let dir = copy_fixture("llama-f32");
    std::fs::write(dir.path().join(INDEX), "{\"weight_map\": {").unwrap();
    assert_names(&load_err(dir.path()), &[INDEX, "JSON"]);
}

#[test]
fn index_without_weight_map_is_named() {
    let dir = copy_fixture("llama-f32");
    std::fs::write(dir.path().join(INDEX), r#"{"metadata": {"total_size": 1}}"#).unwrap();
    assert_names(&load_err(dir.path()), &[INDEX, "weight_map"]);
    std::fs::write(dir.path().join(INDEX), r#"{"weight_map": {"lm_head.weight": 7}}"#).unwrap();
    assert_names(&load_err(dir.path()), &[INDEX, "lm_head.weight"]);
}

#[test]
fn index_naming_a_tensor_its_shard_lacks_is_named() {
    let dir = copy_fixture("llama-f32");
    // lm_head.weight really lives in shard 2; the index claims shard 1.
    edit_json(&dir.path().join(INDEX), |index| {
        index["weight_map"]["lm_head.weight"] = json!(SHARD1);
    });
    let message = load_err(dir.path());
    assert_names(&message, &[INDEX, "lm_head.weight", SHARD1]);
}

#[test]
fn tensor_missing_from_shard_and_index_is_named() {
    let dir = copy_fixture("llama-f32");
    let name = "model.layers.1.mlp.up_proj.weight";
    let index_path = dir.path().join(INDEX);
    let mut holder = String::new();
    edit_json(&index_path, |index| {
        let map = index["weight_map"].as_object_mut().unwrap();
        holder = map.remove(name).unwrap().as_str().unwrap().to_owned();
    });
    edit_safetensors(&dir.path().join(&holder), |tensors| tensors.retain(|t| t.name != name));
    assert_names(&load_err(dir.path()), &[name]);
}

// ---------------------------------------------------------------------------------------------
// Damaged safetensors files.

#[test]
fn truncated_shard_is_named() {
    for cut in [1, 4, 1000] {
        let dir = copy_fixture("llama-f32");
        let path = dir.path().join(SHARD1);
        truncate(&path, cut);
        let message = load_err(dir.path());
        assert_names(&message, &[SHARD1, "truncated"]);
    }
}

#[test]
fn truncated_single_file_is_named() {
    for cut in [1, 256, 30_000] {
        let dir = copy_fixture(QWEN);
        truncate(&qwen_weights(&dir), cut);
        assert_names(&load_err(dir.path()), &["model.safetensors", "truncated"]);
    }
}

#[test]
fn file_cut_inside_its_header_is_named() {
    let dir = copy_fixture(QWEN);
    let path = qwen_weights(&dir);
    let len = std::fs::metadata(&path).unwrap().len();
    // Keep the length field and half the header.
    let bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    truncate(&path, len - (8 + n / 2));
    assert_names(&load_err(dir.path()), &["model.safetensors"]);
    // Shorter than the length field itself, and empty.
    for keep in [3u64, 0] {
        std::fs::write(&path, &bytes[..keep as usize]).unwrap();
        assert_names(&load_err(dir.path()), &["model.safetensors", "too short"]);
    }
}

#[test]
fn header_length_larger_than_file_is_named() {
    let dir = copy_fixture(QWEN);
    let path = qwen_weights(&dir);
    let mut bytes = std::fs::read(&path).unwrap();
    let too_long = bytes.len() as u64 + 10;
    bytes[..8].copy_from_slice(&too_long.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    assert_names(&load_err(dir.path()), &["model.safetensors", "header length"]);
    // Absurdly large (beyond what safetensors allows, or even u64::MAX).
    for huge in [1u64 << 40, u64::MAX] {
        bytes[..8].copy_from_slice(&huge.to_le_bytes());
        std::fs::write(&path, &bytes).unwrap();
        assert_names(&load_err(dir.path()), &["model.safetensors", "header length"]);
    }
}

#[test]
fn data_offsets_outside_the_file_are_named() {
    let dir = copy_fixture(QWEN);
    let path = qwen_weights(&dir);
    let tensors = read_safetensors(&path);
    let data: Vec<u8> = tensors.iter().flat_map(|t| t.data.iter().copied()).collect();
    let last = tensors.last().unwrap().name.clone();

    // The last tensor's range moved past the end of the data.
    let mut header = header_for(&tensors);
    let end = data.len();
    let size = tensors.last().unwrap().data.len();
    header[&last]["data_offsets"] = json!([end + 64, end + 64 + size]);
    write_raw(&path, &serde_json::to_vec(&header).unwrap(), &data);
    assert_names(&load_err(dir.path()), &["model.safetensors", &last]);

    // The last tensor grows (shape and end offset agree) beyond the bytes the file holds.
    let mut header = header_for(&tensors);
    let start = end - size;
    let shape: Vec<usize> = tensors.last().unwrap().shape.iter().map(|d| d * 2).collect();
    let grown = size * (1 << shape.len());
    header[&last]["shape"] = json!(shape);
    header[&last]["data_offsets"] = json!([start, start + grown]);
    write_raw(&path, &serde_json::to_vec(&header).unwrap(), &data);
    assert_names(&load_err(dir.path()), &["model.safetensors"]);

    // Offsets that run backwards.
    let mut header = header_for(&tensors);
    header[&last]["data_offsets"] = json!([end, start]);
    write_raw(&path, &serde_json::to_vec(&header).unwrap(), &data);
    assert_names(&load_err(dir.path()), &["model.safetensors", &last]);
}

#[test]
fn byte_range_that_disagrees_with_shape_is_named() {
    let dir = copy_fixture(QWEN);
    let path = qwen_weights(&dir);
    let mut tensors = read_safetensors(&path);
    // Drop 4 bytes from one tensor's data without changing its shape.
    let t = tensor_mut(&mut tensors, GATE);
    t.data.truncate(t.data.len() - 4);
    write_safetensors(&path, &tensors);
    assert_names(&load_err(dir.path()), &["model.safetensors", GATE]);
}

#[test]
fn header_that_is_not_json_is_named() {
    let dir = copy_fixture(QWEN);
    let path = qwen_weights(&dir);
    for header in [&b"this is not json"[..], b"{\"a\": ", b"[1, 2, 3]", b"\xff\xfe{}"] {
        write_raw(&path, header, &[0u8; 64]);
        assert_names(&load_err(dir.path()), &["model.safetensors"]);
    }
}

#[test]
fn unknown_dtype_in_header_is_named() {
    let dir = copy_fixture(QWEN);
    let path = qwen_weights(&dir);
    let tensors = read_safetensors(&path);
    let data: Vec<u8> = tensors.iter().flat_map(|t| t.data.iter().copied()).collect();
    let mut header = header_for(&tensors);
    header[NORM]["dtype"] = json!("F33");
    write_raw(&path, &serde_json::to_vec(&header).unwrap(), &data);
    assert_names(&load_err(dir.path()), &["model.safetensors", NORM, "F33"]);
    // An entry without a shape.
    let mut header = header_for(&tensors);
    header[NORM].as_object_mut().unwrap().remove("shape");
    write_raw(&path, &serde_json::to_vec(&header).unwrap(), &data);
    assert_names(&load_err(dir.path()), &["model.safetensors", NORM, "shape"]);
}

// ---------------------------------------------------------------------------------------------
// Tensors of the wrong dtype or shape, or missing.

#[test]
fn integer_weight_matrix_is_refused_by_name() {
    // I32 has the same byte size as F32, so only the dtype is wrong.
    let dir = copy_fixture(QWEN);
    edit_safetensors(&qwen_weights(&dir), |t| tensor_mut(t, GATE).dtype = "I32".into());
    let message = load_err(dir.path());
    assert_names(&message, &[GATE, "model.safetensors", "I32"]);

    // U8 with the right shape (one byte per element).
    let dir = copy_fixture(QWEN);
    edit_safetensors(&qwen_weights(&dir), |t| {
        let gate = tensor_mut(t, GATE);
        gate.dtype = "U8".into();
        gate.data = vec![1; 128 * 64];
    });
    assert_names(&load_err(dir.path()), &[GATE, "model.safetensors", "U8"]);
}

#[test]
fn integer_norm_vector_is_refused_by_name() {
    let dir = copy_fixture(QWEN);
    edit_safetensors(&qwen_weights(&dir), |t| tensor_mut(t, NORM).dtype = "I32".into());
    assert_names(&load_err(dir.path()), &[NORM, "model.safetensors", "I32"]);
}

#[test]
fn bool_and_f64_weights_are_refused_by_name() {
    let dir = copy_fixture(QWEN);
    edit_safetensors(&qwen_weights(&dir), |t| {
        let k = tensor_mut(t, K_PROJ);
        k.dtype = "F64".into();
        k.data = vec![0; 16 * 64 * 8];
    });
    assert_names(&load_err(dir.path()), &[K_PROJ, "F64"]);
    let dir = copy_fixture(QWEN);
    edit_safetensors(&qwen_weights(&dir), |t| {
        let k = tensor_mut(t, K_PROJ);
        k.dtype = "BOOL".into();
        k.data = vec![0; 16 * 64];
    });
    assert_names(&load_err(dir.path()), &[K_PROJ, "BOOL"]);
}

#[test]
fn swapped_dims_are_named_with_both_shapes() {
    let dir = copy_fixture(QWEN);
    edit_safetensors(&qwen_weights(&dir), |t| tensor_mut(t, K_PROJ).shape = vec![64, 16]);
    let message = load_err(dir.path());
    assert_names(&message, &[K_PROJ, "model.safetensors", "[16, 64]", "[64, 16]"]);
}

#[test]
fn wrong_dims_are_named() {
    // A matrix flattened to 1-D, and a norm vector of half length.
    let dir = copy_fixture(QWEN);
    edit_safetensors(&qwen_weights(&dir), |t| tensor_mut(t, GATE).shape = vec![128 * 64]);
    assert_names(&load_err(dir.path()), &[GATE, "[128, 64]", "[8192]"]);

    let dir = copy_fixture(QWEN);
    edit_safetensors(&qwen_weights(&dir), |t| {
        let norm = tensor_mut(t, NORM);
        norm.shape = vec![32];
        norm.data.truncate(32 * 4);
    });
    assert_names(&load_err(dir.path()), &[NORM, "[64]", "[32]"]);
}

#[test]
fn config_that_disagrees_with_weights_names_the_tensor() {
    // vocab_size says 300 but the embedding has 288 rows.
    let dir = copy_fixture(QWEN);
    edit_json(&dir.path().join("config.json"), |c| {
        c.insert("vocab_size".into(), json!(300));
    });
    assert_names(
        &load_err(dir.path()),
        &["model.embed_tokens.weight", "[300, 64]", "[288, 64]"],
    );
}

#[test]
fn missing_tensor_is_named() {
    for name in [
        NORM,
        GATE,
        "model.layers.1.self_attn.q_proj.bias",
        "model.embed_tokens.weight",
    ] {
        let dir = copy_fixture(QWEN);
        edit_safetensors(&qwen_weights(&dir), |t| t.retain(|t| t.name != name));
        assert_names(&load_err(dir.path()), &[name]);
    }
}

#[test]
fn missing_untied_lm_head_is_named() {
    // qwen2-f32 ties its embeddings; untie it in the config and lm_head.weight must be found.
    let dir = copy_fixture(QWEN);
    edit_json(&dir.path().join("config.json"), |c| {
        c.insert("tie_word_embeddings".into(), json!(false));
    });
    assert_names(&load_err(dir.path()), &["lm_head.weight"]);
}

// ---------------------------------------------------------------------------------------------
// FP8 block-scaled weights built by hand.

/// qwen2-f32 with `GATE` ([128, 64]) stored as F8_E4M3 (every byte 0x38 = 1.0) and, when given,
/// a `_scale_inv` tensor of `scale_shape` in `scale_dtype`; with `block`, a quantization_config.
fn fp8_dir(scale: Option<(&str, &[usize])>, block: Option<[usize; 2]>) -> TempDir {
    let dir = copy_fixture(QWEN);
    edit_safetensors(&qwen_weights(&dir), |tensors| {
        let gate = tensor_mut(tensors, GATE);
        gate.dtype = "F8_E4M3".into();
        gate.data = vec![0x38; 128 * 64];
        if let Some((dtype, shape)) = scale {
            let n: usize = shape.iter().product();
            let data: Vec<u8> = match dtype {
                "F32" => (0..n).flat_map(|_| 0.01f32.to_le_bytes()).collect(),
                "I32" => vec![0; n * 4],
                other => panic!("no test data for {other}"),
            };
            tensors.push(Tensor::new(&format!("{GATE}_scale_inv"), dtype, shape, data));
        }
    });
    if let Some(block) = block {
        edit_json(&dir.path().join("config.json"), |c| {
            c.insert(
                "quantization_config".into(),
                json!({"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                       "weight_block_size": block}),
            );
        });
    }
    dir
}

#[test]
fn fp8_weight_with_correct_scales_loads() {
    // Positive control for the FP8 cases below: [128, 64] in 32x32 blocks has [4, 2] scales.
    let dir = fp8_dir(Some(("F32", &[4, 2])), Some([32, 32]));
    load_ok(dir.path());
}

#[test]
fn fp8_weight_without_scale_inv_is_named() {
    let dir = fp8_dir(None, Some([32, 32]));
    assert_names(&load_err(dir.path()), &[&format!("{GATE}_scale_inv")]);
}

#[test]
fn fp8_scales_of_wrong_shape_are_named() {
    for shape in [&[3usize, 2][..], &[2, 4], &[8]] {
        let dir = fp8_dir(Some(("F32", shape)), Some([32, 32]));
        let message = load_err(dir.path());
        assert_names(&message, &[&format!("{GATE}_scale_inv"), "[4, 2]"]);
    }
    // Scales that would fit a different block size than the config's.
    let dir = fp8_dir(Some(("F32", &[1, 1])), Some([32, 32]));
    assert_names(
        &load_err(dir.path()),
        &[&format!("{GATE}_scale_inv"), "[4, 2]", "[1, 1]"],
    );
}

#[test]
fn fp8_scales_of_integer_dtype_are_named() {
    let dir = fp8_dir(Some(("I32", &[4, 2])), Some([32, 32]));
    assert_names(&load_err(dir.path()), &[&format!("{GATE}_scale_inv"), "I32"]);
}

#[test]
fn fp8_without_quantization_config_is_named() {
    let dir = fp8_dir(Some(("F32", &[4, 2])), None);
    let message = load_err(dir.path());
    assert_names(&message, &[GATE, "F8_E4M3", "quantization_config"]);
}

#[test]
fn fp8_norm_vector_is_refused_by_name() {
    // Norms are never FP8: a vector in F8_E4M3 is a wrong dtype, not silently reinterpreted.
    let dir = copy_fixture(QWEN);
    edit_safetensors(&qwen_weights(&dir), |t| {
        let norm = tensor_mut(t, NORM);
        norm.dtype = "F8_E4M3".into();
        norm.data = vec![0x38; 64];
    });
    assert_names(&load_err(dir.path()), &[NORM, "F8_E4M3"]);
}

// ---------------------------------------------------------------------------------------------
// config.json and the directory.

#[test]
fn unknown_architecture_lists_the_supported_ones() {
    let dir = copy_fixture(QWEN);
    edit_json(&dir.path().join("config.json"), |c| {
        c.insert("architectures".into(), json!(["MistralForCausalLM"]));
    });
    let message = load_err(dir.path());
    assert_names(
        &message,
        &[
            "config.json",
            "MistralForCausalLM",
            "LlamaForCausalLM",
            "Qwen2ForCausalLM",
            "DeepseekV2ForCausalLM",
            "DeepseekV3ForCausalLM",
        ],
    );
}

#[test]
fn config_without_architecture_is_named() {
    let dir = copy_fixture(QWEN);
    edit_json(&dir.path().join("config.json"), |c| {
        c.remove("architectures");
        c.remove("model_type");
    });
    assert_names(&load_err(dir.path()), &["config.json", "architectures"]);
}

#[test]
fn missing_config_key_is_named() {
    for key in [
        "hidden_size",
        "vocab_size",
        "num_hidden_layers",
        "intermediate_size",
        "rms_norm_eps",
    ] {
        let dir = copy_fixture(QWEN);
        edit_json(&dir.path().join("config.json"), |c| {
            c.remove(key);
        });
        assert_names(&load_err(dir.path()), &["config.json", key]);
    }
}

#[test]
fn mistyped_config_key_is_named() {
    for (key, value) in [
        ("hidden_size", json!("64")),
        ("num_attention_heads", json!(-4)),
        ("rms_norm_eps", json!(null)),
        ("vocab_size", json!(288.5)),
    ] {
        let dir = copy_fixture(QWEN);
        edit_json(&dir.path().join("config.json"), |c| {
            c.insert(key.into(), value);
        });
        assert_names(&load_err(dir.path()), &["config.json", key]);
    }
}

#[test]
fn inconsistent_head_counts_are_named() {
    let dir = copy_fixture(QWEN);
    edit_json(&dir.path().join("config.json"), |c| {
        c.insert("num_key_value_heads".into(), json!(3));
    });
    assert_names(&load_err(dir.path()), &["config.json", "num_key_value_heads"]);
    let dir = copy_fixture(QWEN);
    edit_json(&dir.path().join("config.json"), |c| {
        c.insert("num_attention_heads".into(), json!(0));
    });
    assert_names(&load_err(dir.path()), &["config.json", "num_attention_heads"]);
}

#[test]
fn unknown_rope_type_is_named() {
    let dir = copy_fixture("llama-f32");
    edit_json(&dir.path().join("config.json"), |c| {
        c["rope_parameters"]["rope_type"] = json!("ntk-by-parts");
    });
    assert_names(&load_err(dir.path()), &["config.json", "ntk-by-parts"]);
}

#[test]
fn config_that_is_not_json_is_named() {
    let dir = copy_fixture(QWEN);
    std::fs::write(dir.path().join("config.json"), "{\"hidden_size\": 64,").unwrap();
    assert_names(&load_err(dir.path()), &["config.json", "JSON"]);
    std::fs::write(dir.path().join("config.json"), "[1, 2]").unwrap();
    assert_names(&load_err(dir.path()), &["config.json", "object"]);
    std::fs::write(dir.path().join("config.json"), [0xff, 0xfe, 0x00]).unwrap();
    assert_names(&load_err(dir.path()), &["config.json"]);
}

#[test]
fn generation_config_that_is_not_json_is_named() {
    let dir = copy_fixture(QWEN);
    std::fs::write(dir.path().join("generation_config.json"), "eos=1").unwrap();
    assert_names(&load_err(dir.path()), &["generation_config.json"]);
}

#[test]
fn missing_config_is_named() {
    let dir = copy_fixture(QWEN);
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    assert_names(&load_err(dir.path()), &["config.json"]);
}

#[test]
fn empty_directory_is_named() {
    let dir = tempfile::tempdir().unwrap();
    assert_names(&load_err(dir.path()), &["config.json"]);
}

#[test]
fn missing_directory_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let gone = dir.path().join("no-such-model");
    assert_names(&load_err(&gone), &["no-such-model"]);
}

#[test]
fn config_without_weights_is_named() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixture(QWEN).join("config.json"), dir.path().join("config.json")).unwrap();
    let message = load_err(dir.path());
    assert_names(&message, &["model.safetensors", &dir.path().display().to_string()]);
}

#[test]
fn pickle_checkpoints_are_refused_unread() {
    for pickle in ["pytorch_model.bin", "model.pt", "model.pth", "model.ckpt"] {
        // A real file: refused, and the message says what to do.
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(fixture(QWEN).join("config.json"), dir.path().join("config.json")).unwrap();
        // Pickle protocol 2 calling os.system: harmless here because nothing may unpickle it.
        std::fs::write(
            dir.path().join(pickle),
            b"\x80\x02cos\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85q\x02Rq\x03.",
        )
        .unwrap();
        let message = load_err(dir.path());
        assert_names(&message, &[pickle, "safetensors", "convert"]);

        // A dangling link: had the loader opened the file, it would report "not found" instead.
        #[cfg(unix)]
        {
            let dir = tempfile::tempdir().unwrap();
            std::fs::copy(fixture(QWEN).join("config.json"), dir.path().join("config.json")).unwrap();
            std::os::unix::fs::symlink(dir.path().join("nowhere"), dir.path().join(pickle)).unwrap();
            let message = load_err(dir.path());
            assert_names(&message, &[pickle, "convert"]);
        }
    }
}

#[test]
fn sharded_pickle_index_is_refused() {
    // A `pytorch_model.bin.index.json` + pickle shards (how large .bin checkpoints ship).
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixture(QWEN).join("config.json"), dir.path().join("config.json")).unwrap();
    std::fs::write(
        dir.path().join("pytorch_model.bin.index.json"),
        r#"{"weight_map": {"lm_head.weight": "pytorch_model-00001-of-00001.bin"}}"#,
    )
    .unwrap();
    std::fs::write(dir.path().join("pytorch_model-00001-of-00001.bin"), b"\x80\x02.").unwrap();
    assert_names(&load_err(dir.path()), &["pytorch_model-00001-of-00001.bin", "convert"]);
}

// ---------------------------------------------------------------------------------------------
// DeepSeek checkpoints (MLA, MoE, the published FP8 layout).

const DSV3_FP8: &str = "dsv3-fp8";
const DSV3: &str = "dsv3-f32";

#[test]
fn deepseek_fp8_scale_missing_or_misshapen_is_named() {
    let dir = copy_fixture(DSV3_FP8);
    load_ok(dir.path());
    let path = dir.path().join("model.safetensors");
    for name in [
        "model.layers.1.self_attn.kv_b_proj.weight_scale_inv",
        "model.layers.2.mlp.experts.5.down_proj.weight_scale_inv",
        "model.layers.0.mlp.gate_proj.weight_scale_inv",
    ] {
        let dir = copy_fixture(DSV3_FP8);
        let path = dir.path().join("model.safetensors");
        edit_safetensors(&path, |t| t.retain(|t| t.name != name));
        assert_names(&load_err(dir.path()), &[name]);
    }
    // kv_b_proj [128, 40] in 32x32 blocks has [4, 2] scales; give it [2, 4].
    edit_safetensors(&path, |t| {
        tensor_mut(t, "model.layers.1.self_attn.kv_b_proj.weight_scale_inv").shape = vec![2, 4];
    });
    assert_names(
        &load_err(dir.path()),
        &[
            "model.layers.1.self_attn.kv_b_proj.weight_scale_inv",
            "[4, 2]",
            "[2, 4]",
        ],
    );
}

#[test]
fn deepseek_fp8_without_quantization_config_is_named() {
    let dir = copy_fixture(DSV3_FP8);
    edit_json(&dir.path().join("config.json"), |c| {
        c.remove("quantization_config");
    });
    assert_names(&load_err(dir.path()), &["F8_E4M3", "quantization_config"]);
}

#[test]
fn deepseek_fp8_block_size_that_disagrees_with_scales_is_named() {
    // The fixture's scales are for 32x32 blocks; a config saying 128x128 expects [1, 1].
    let dir = copy_fixture(DSV3_FP8);
    edit_json(&dir.path().join("config.json"), |c| {
        c["quantization_config"]["weight_block_size"] = json!([128, 128]);
    });
    assert_names(&load_err(dir.path()), &["_scale_inv", "[1, 1]"]);
}

#[test]
fn deepseek_missing_expert_and_router_tensors_are_named() {
    for name in [
        "model.layers.1.mlp.experts.3.down_proj.weight",
        "model.layers.2.mlp.gate.weight",
        "model.layers.1.mlp.gate.e_score_correction_bias",
        "model.layers.1.mlp.shared_experts.up_proj.weight",
        "model.layers.0.self_attn.kv_a_layernorm.weight",
        "model.layers.2.self_attn.q_b_proj.weight",
    ] {
        let dir = copy_fixture(DSV3);
        edit_safetensors(&dir.path().join("model.safetensors"), |t| t.retain(|t| t.name != name));
        assert_names(&load_err(dir.path()), &[name]);
    }
}

#[test]
fn deepseek_wrong_shapes_are_named() {
    // kv_b_proj is [heads * (nope + v), kv_lora] = [160, 40]; swap it.
    let name = "model.layers.1.self_attn.kv_b_proj.weight";
    let dir = copy_fixture(DSV3);
    edit_safetensors(&dir.path().join("model.safetensors"), |t| {
        tensor_mut(t, name).shape = vec![40, 160]
    });
    assert_names(&load_err(dir.path()), &[name, "[160, 40]", "[40, 160]"]);
    // A router with fewer rows than n_routed_experts (8).
    let name = "model.layers.2.mlp.gate.weight";
    let dir = copy_fixture(DSV3);
    edit_safetensors(&dir.path().join("model.safetensors"), |t| {
        let gate = tensor_mut(t, name);
        gate.shape = vec![6, 72];
        gate.data.truncate(6 * 72 * 4);
    });
    assert_names(&load_err(dir.path()), &[name, "[8, 72]", "[6, 72]"]);
    // A config whose expert grouping cannot work.
    let dir = copy_fixture(DSV3);
    edit_json(&dir.path().join("config.json"), |c| {
        c.insert("n_routed_experts".into(), json!(6));
    });
    assert_names(&load_err(dir.path()), &["config.json", "n_group", "n_routed_experts"]);
}

#[test]
fn deepseek_integer_weight_is_refused_by_name() {
    let name = "model.layers.2.mlp.experts.0.gate_proj.weight";
    let dir = copy_fixture(DSV3);
    edit_safetensors(&dir.path().join("model.safetensors"), |t| {
        tensor_mut(t, name).dtype = "I32".into()
    });
    assert_names(&load_err(dir.path()), &[name, "I32"]);
}

#[test]
fn deepseek_missing_config_keys_are_named() {
    for key in [
        "kv_lora_rank",
        "qk_rope_head_dim",
        "v_head_dim",
        "hidden_size",
        "vocab_size",
    ] {
        let dir = copy_fixture(DSV3);
        edit_json(&dir.path().join("config.json"), |c| {
            c.remove(key);
        });
        assert_names(&load_err(dir.path()), &["config.json", key]);
    }
    let dir = copy_fixture(DSV3);
    edit_json(&dir.path().join("config.json"), |c| {
        c.insert("kv_lora_rank".into(), json!("forty"));
    });
    assert_names(&load_err(dir.path()), &["config.json", "kv_lora_rank"]);
}

// ---------------------------------------------------------------------------------------------
// forward() on invalid batches.

const BLOCK: usize = 4;

fn cache_for(model: &dyn CausalLm, blocks: usize) -> PagedKvCache {
    PagedKvCache::new(BLOCK, blocks, &model.kv_entry_widths())
}

/// Runs `batch`, asserting no panic, and returns the result's error message if any.
fn forward_result(model: &dyn CausalLm, batch: &Batch, cache: &mut PagedKvCache) -> Result<(), String> {
    let mut logits = Vec::new();
    match catch_unwind(AssertUnwindSafe(|| model.forward(batch, cache, &mut logits))) {
        Err(payload) => panic!("forward panicked: {}", panic_message(payload)),
        Ok(result) => result.map_err(|e: ModelError| {
            let message = e.to_string();
            eprintln!("{message}");
            message
        }),
    }
}

fn seq<'a>(tokens: &'a [u32], start_pos: usize, table: &'a [u32]) -> SeqInput<'a> {
    SeqInput {
        tokens,
        start_pos,
        block_table: table,
        logits: LogitsWanted::Last,
    }
}

/// The model still answers correctly after a rejected batch: an error leaves nothing broken.
fn assert_still_works(model: &dyn CausalLm) {
    let table: Vec<u32> = (0..4).collect();
    let mut cache = cache_for(model, 4);
    let mut logits = Vec::new();
    model
        .forward(&Batch::single(seq(&[0, 5, 6], 0, &table)), &mut cache, &mut logits)
        .unwrap();
    assert_eq!(logits.len(), model.info().vocab_size);
    assert!(logits.iter().all(|v| v.is_finite()));
}

/// The forward-pass checks run on one model of each architecture family.
const FORWARD_FIXTURES: [&str; 3] = ["llama-f32", "dsv3-f32", "dsv2-f32"];

#[test]
fn token_id_beyond_vocab_is_an_error() {
    for name in FORWARD_FIXTURES {
        token_id_beyond_vocab(name);
    }
}

fn token_id_beyond_vocab(name: &str) {
    let model = load_ok(&fixture(name));
    let vocab = model.info().vocab_size as u32;
    let table: Vec<u32> = (0..4).collect();
    for bad in [vocab, vocab + 1, u32::MAX] {
        let mut cache = cache_for(model.as_ref(), 4);
        let tokens = [0, 5, bad];
        let message = forward_result(model.as_ref(), &Batch::single(seq(&tokens, 0, &table)), &mut cache)
            .expect_err("out-of-vocab token accepted");
        assert_names(&message, &[&bad.to_string(), &vocab.to_string()]);
    }
    assert_still_works(model.as_ref());
}

#[test]
fn positions_beyond_context_are_an_error() {
    for name in FORWARD_FIXTURES {
        positions_beyond_context(name);
    }
}

fn positions_beyond_context(name: &str) {
    let model = load_ok(&fixture(name));
    let context = model.info().max_position_embeddings;
    let blocks = (context + 8).div_ceil(BLOCK);
    let table: Vec<u32> = (0..blocks as u32).collect();
    let mut cache = cache_for(model.as_ref(), blocks);
    // Prefill that runs past the end, and a decode step just past it.
    for (tokens, start) in [(&[1u32, 2, 3, 4][..], context - 2), (&[7][..], context)] {
        let message = forward_result(model.as_ref(), &Batch::single(seq(tokens, start, &table)), &mut cache)
            .expect_err("position beyond the context accepted");
        assert_names(&message, &[&context.to_string()]);
    }
    // The last position itself is fine.
    forward_result(
        model.as_ref(),
        &Batch::single(seq(&[7], context - 1, &table)),
        &mut cache,
    )
    .unwrap();
    assert_still_works(model.as_ref());
}

#[test]

fn overflowing_start_position_is_an_error() {
    let model = load_ok(&fixture("llama-f32"));
    let context = model.info().max_position_embeddings;
    let table: Vec<u32> = (0..4).collect();
    let mut cache = cache_for(model.as_ref(), 4);
    let message = forward_result(
        model.as_ref(),
        &Batch::single(seq(&[7], usize::MAX, &table)),
        &mut cache,
    )
    .expect_err("overflowing position accepted");
    assert_names(&message, &[&context.to_string()]);
    assert_still_works(model.as_ref());
}

#[test]
fn kv_cache_too_small_is_an_error() {
    for name in FORWARD_FIXTURES {
        kv_cache_too_small(name);
    }
}

fn kv_cache_too_small(name: &str) {
    let model = load_ok(&fixture(name));
    let tokens: Vec<u32> = (0..20).collect();
    // 20 tokens need 5 blocks of 4; the table has 2.
    let table = [0u32, 1];
    let mut cache = cache_for(model.as_ref(), 8);
    let message = forward_result(model.as_ref(), &Batch::single(seq(&tokens, 0, &table)), &mut cache)
        .expect_err("short block table accepted");
    assert_names(&message, &["KV", "20", "8"]);
    // A decode step whose position lies past the table.
    let message = forward_result(model.as_ref(), &Batch::single(seq(&[3], 8, &table)), &mut cache)
        .expect_err("decode past the block table accepted");
    assert_names(&message, &["KV"]);
    // A table naming blocks the cache does not have.
    let table = [0u32, 99];
    let message = forward_result(model.as_ref(), &Batch::single(seq(&tokens[..8], 0, &table)), &mut cache)
        .expect_err("block id out of range accepted");
    assert_names(&message, &["99", "8"]);
    // An empty block table.
    let message = forward_result(model.as_ref(), &Batch::single(seq(&tokens[..1], 0, &[])), &mut cache)
        .expect_err("empty block table accepted");
    assert_names(&message, &["KV"]);
    assert_still_works(model.as_ref());
}

#[test]
fn cache_built_for_another_model_is_an_error() {
    // Each model is given a cache shaped for another (MHA/GQA entries vs MLA latents).
    let models: Vec<_> = ["llama-f32", QWEN, "dsv3-f32", "dsv2-f32"]
        .iter()
        .map(|n| load_ok(&fixture(n)))
        .collect();
    let table: Vec<u32> = (0..4).collect();
    for (i, model) in models.iter().enumerate() {
        let other = &models[(i + 1) % models.len()];
        assert_ne!(model.kv_entry_widths(), other.kv_entry_widths());
        let mut wrong = cache_for(other.as_ref(), 4);
        let message = forward_result(model.as_ref(), &Batch::single(seq(&[0, 1, 2], 0, &table)), &mut wrong)
            .expect_err("foreign KV cache accepted");
        assert_names(&message, &["KV cache"]);
        let mut empty = PagedKvCache::new(BLOCK, 4, &[]);
        forward_result(model.as_ref(), &Batch::single(seq(&[0, 1, 2], 0, &table)), &mut empty)
            .expect_err("cache without layers accepted");
        assert_still_works(model.as_ref());
    }
}

#[test]
fn empty_batches_do_not_panic() {
    for name in FORWARD_FIXTURES {
        empty_batches(name);
    }
}

fn empty_batches(name: &str) {
    let model = load_ok(&fixture(name));
    let table: Vec<u32> = (0..4).collect();
    let mut cache = cache_for(model.as_ref(), 4);
    forward_result(model.as_ref(), &Batch::default(), &mut cache).expect_err("empty batch accepted");
    forward_result(model.as_ref(), &Batch::single(seq(&[], 0, &table)), &mut cache)
        .expect_err("sequence without tokens accepted");
    // An empty sequence beside a real one: either refused or answered, never a panic; if answered,
    // exactly one row of logits comes back.
    let other: Vec<u32> = (4..8).collect();
    let batch = Batch {
        seqs: vec![seq(&[], 0, &table), seq(&[0, 1], 0, &other)],
    };
    let mut logits = Vec::new();
    let mut big = cache_for(model.as_ref(), 8);
    match catch_unwind(AssertUnwindSafe(|| model.forward(&batch, &mut big, &mut logits))) {
        Err(payload) => panic!("forward panicked: {}", panic_message(payload)),
        Ok(Ok(())) => assert_eq!(logits.len(), model.info().vocab_size),
        Ok(Err(e)) => eprintln!("{e}"),
    }
    assert_still_works(model.as_ref());
}

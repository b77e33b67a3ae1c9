//! GGUF models: the fixtures under `tests/fixtures/gguf/` (written by
//! `tools/make_gguf_fixtures.py` with the `gguf` package, following llama.cpp's converter) give the
//! logits of the safetensors fixtures they came from and reproduce their golden tokens; variants
//! rewritten here (fused tensors, Q8_0 weights) load too.

mod gguf_support;
mod golden_support;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use gguf_support::{Writer, F32, Q8_0};
use golden_support::{fixtures_dir as fixtures, log_softmax};
use r1serve_kernels::{CpuBackend, MatmulPrecision, PagedKvCache, WeightFormat};
use r1serve_model::gguf::GgufFile;
use r1serve_model::weights::{KvBShape, WeightStore};
use r1serve_model::{load_model, Batch, CausalLm, LogitsWanted, ModelDir, ModelError, SeqInput};

fn logits(model: &dyn CausalLm, tokens: &[u32]) -> Vec<f32> {
    let blocks = tokens.len().div_ceil(4) + 1;
    let mut cache = PagedKvCache::new(4, blocks, &model.kv_entry_widths());
    let table: Vec<u32> = (0..blocks as u32).collect();
    let mut out = Vec::new();
    let seq = SeqInput {
        tokens,
        start_pos: 0,
        block_table: &table,
        logits: LogitsWanted::All,
    };
    model.forward(&Batch::single(seq), &mut cache, &mut out).unwrap();
    out
}

/// Greedy decode with the KV cache.
fn greedy(model: &dyn CausalLm, prompt: &[u32], n: usize) -> Vec<u32> {
    let blocks = (prompt.len() + n).div_ceil(4) + 1;
    let mut cache = PagedKvCache::new(4, blocks, &model.kv_entry_widths());
    let table: Vec<u32> = (0..blocks as u32).rev().collect();
    let (mut out, mut tokens, mut pos) = (Vec::new(), prompt.to_vec(), 0);
    let mut generated = Vec::new();
    while generated.len() < n {
        let seq = SeqInput {
            tokens: &tokens,
            start_pos: pos,
            block_table: &table,
            logits: LogitsWanted::Last,
        };
        model.forward(&Batch::single(seq), &mut cache, &mut out).unwrap();
        pos += tokens.len();
        let next = (0..out.len()).max_by(|&a, &b| out[a].total_cmp(&out[b])).unwrap() as u32;
        generated.push(next);
        tokens = vec![next];
    }
    generated
}

/// Loads `gguf` and the safetensors fixture `source`; returns max |Δlogit| over the golden cases
/// after checking the golden log-probs (≤ 1e-3, as golden.rs) and greedy tokens.
fn compare(model: &dyn CausalLm, source: &str) -> f32 {
    let dir = fixtures().join(source);
    let golden = golden_support::read(&dir);
    let reference = load_model(&dir, Arc::new(CpuBackend::new(MatmulPrecision::F32))).unwrap();
    assert_eq!(model.info().vocab_size, reference.info().vocab_size);
    assert_eq!(model.info().bos_token_id, reference.info().bos_token_id);
    assert_eq!(model.info().eos_token_ids, reference.info().eos_token_ids);
    let vocab = model.info().vocab_size;
    let mut worst = 0.0f32;
    for case in &golden.cases {
        let mut seq = case.prompt_ids.clone();
        seq.extend_from_slice(&case.greedy[..case.greedy.len() - 1]);
        let (ours, theirs) = (logits(model, &seq), logits(reference.as_ref(), &seq));
        for (a, b) in ours.iter().zip(&theirs) {
            worst = worst.max((a - b).abs());
        }
        for (row, expected) in ours.chunks_exact(vocab).zip(&case.logprobs) {
            for (a, b) in log_softmax(row).iter().zip(expected) {
                assert!((a - b).abs() <= 1e-3, "{source}: logprob {a} vs golden {b}");
            }
        }
        assert_eq!(
            greedy(model, &case.prompt_ids, case.greedy.len()),
            case.greedy,
            "{source}"
        );
    }
    worst
}

fn check_fixture(file: &str, source: &str, tolerance: f32) {
    let path = fixtures().join("gguf").join(file);
    let model =
        load_model(&path, Arc::new(CpuBackend::new(MatmulPrecision::F32))).unwrap_or_else(|e| panic!("{file}: {e}"));
    let worst = compare(model.as_ref(), source);
    eprintln!("{file} vs {source}: max |Δlogit| = {worst:.3e}");
    assert!(worst <= tolerance, "{file}: max |Δlogit| {worst} > {tolerance}");
}

#[test]
fn llama_f32_permuted_qk_llama3_rope() {
    check_fixture("llama-f32.gguf", "llama-f32", 1e-5);
}

#[test]
fn qwen2_f32_tied_with_biases() {
    check_fixture("qwen2-f32.gguf", "qwen2-f32", 1e-5);
}

#[test]
fn dsv2_f32_legacy_kv_b() {
    check_fixture("dsv2-f32.gguf", "dsv2-f32", 1e-5);
}

/// F16 from BF16: 6 of the 225k BF16 values are below F16's normal range and round; the rest are
/// exact, so the safetensors BF16 model is the reference.
#[test]
fn dsv3_f16_split_kv_b() {
    check_fixture("dsv3-bf16-f16.gguf", "dsv3-bf16", 1e-3);
}

/// The split `attn_k_b` / `attn_v_b` serve the absorbed attention as stored (F16 here, once
/// decoded to f32): per head, exactly the rows of the rebuilt `kv_b_proj`, `W_UK_hᵀ` transposed.
#[test]
fn split_kv_b_stays_as_stored() {
    let store = WeightStore::open_gguf(&fixtures().join("gguf/dsv3-bf16-f16.gguf")).unwrap();
    let (heads, nope, v, rank) = (4, 16, 16, 32);
    let name = "model.layers.0.self_attn.kv_b_proj.weight";
    let (uk_t, uv) = store
        .split_kv_b(name, KvBShape { heads, nope, v, rank })
        .unwrap()
        .unwrap();
    let kv_b = store.matrix(name, heads * (nope + v), rank).unwrap().to_f32();
    assert_eq!((uk_t.len(), uv.len()), (heads, heads));
    for h in 0..heads {
        let (keys, values) = (uk_t[h].to_f32(), uv[h].to_f32());
        assert_eq!(
            (uk_t[h].format(), uv[h].format()),
            (WeightFormat::F16, WeightFormat::F16)
        );
        for c in 0..rank {
            for d in 0..nope {
                assert_eq!(
                    keys[c * nope + d],
                    kv_b[(h * (nope + v) + d) * rank + c],
                    "head {h} [{c}][{d}]"
                );
            }
        }
        assert_eq!(values, kv_b[(h * (nope + v) + nope) * rank..][..v * rank]);
    }
    let wrong = store.split_kv_b(
        name,
        KvBShape {
            heads,
            nope: nope + 1,
            v: v - 1,
            rank,
        },
    );
    assert!(matches!(wrong, Err(ModelError::Gguf { .. })), "{wrong:?}");
    // A legacy file holds one `attn_kv_b`: no split to give.
    let legacy = WeightStore::open_gguf(&fixtures().join("gguf/dsv2-f32.gguf")).unwrap();
    assert!(legacy
        .split_kv_b(name, KvBShape { heads, nope, v, rank })
        .unwrap()
        .is_none());
}

#[test]
fn config_translation_matches_the_fixture_configs() {
    let gguf = ModelDir::open(fixtures().join("gguf/dsv3-bf16-f16.gguf")).unwrap();
    let c = &gguf.config;
    assert_eq!(c["architectures"][0], "DeepseekV3ForCausalLM");
    for (key, value) in [
        ("q_lora_rank", 32),
        ("kv_lora_rank", 32),
        ("qk_nope_head_dim", 16),
        ("v_head_dim", 16),
    ] {
        assert_eq!(c[key], value, "{key}");
    }
    assert_eq!(
        (c["n_group"].as_u64(), c["topk_method"].as_str()),
        (Some(2), Some("noaux_tc"))
    );
    assert_eq!(
        gguf.gguf_path(),
        Some(fixtures().join("gguf/dsv3-bf16-f16.gguf").as_path())
    );
    let llama = ModelDir::open(fixtures().join("gguf/llama-f32.gguf")).unwrap();
    let (_, scaling) = llama.rope().unwrap();
    assert!(
        matches!(scaling, r1serve_kernels::RopeScaling::Llama3 { .. }),
        "{scaling:?}"
    );
    // A directory with one .gguf and no config.json opens it.
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixtures().join("gguf/qwen2-f32.gguf"), dir.path().join("m.gguf")).unwrap();
    assert_eq!(
        ModelDir::open(dir.path()).unwrap().config["architectures"][0],
        "Qwen2ForCausalLM"
    );
    std::fs::copy(fixtures().join("gguf/qwen2-f32.gguf"), dir.path().join("n.gguf")).unwrap();
    let msg = ModelDir::open(dir.path()).unwrap_err().to_string();
    assert!(msg.contains("m.gguf, n.gguf"), "{msg}");
}

// ---------------------------------------------------------------------------------------------
// Variants rewritten from a fixture: fused tensors and Q8_0 weights.

/// Rewrites `source` with `f` deciding each tensor's replacement(s): (name, dims, type, bytes).
type Rewrite<'a> = &'a dyn Fn(&str, &[u64], &[u8]) -> Vec<(String, Vec<u64>, u32, Vec<u8>)>;

fn rewrite(source: &Path, dest: &Path, f: Rewrite) {
    let file = GgufFile::open(source).unwrap();
    let bytes = file.bytes();
    let tensors = &file.header.tensors;
    let kv_end = tensors.iter().map(|t| t.info_offset).min().unwrap();
    let mut w = Writer::new();
    w.kv = bytes[24..kv_end].to_vec();
    w.n_kv = file.header.metadata.len() as u64;
    for t in tensors {
        assert_eq!(t.ggml_type.name, "F32");
        for (name, dims, type_id, data) in f(&t.name, &t.dims, &bytes[t.start..t.start + t.len]) {
            w = w.tensor(&name, &dims, type_id, &data);
        }
    }
    std::fs::write(dest, w.build()).unwrap();
}

fn keep(name: &str, dims: &[u64], data: &[u8]) -> Vec<(String, Vec<u64>, u32, Vec<u8>)> {
    vec![(name.to_owned(), dims.to_vec(), F32, data.to_vec())]
}

#[test]
fn fused_qkv_and_gate_up_experts_match_unfused() {
    let dir = tempfile::tempdir().unwrap();
    // llama: attn_q, attn_k, attn_v → attn_qkv (rows concatenated, q/k still permuted).
    let fused = dir.path().join("llama-qkv.gguf");
    let parts = std::cell::RefCell::new(HashMap::<String, [Vec<u8>; 3]>::new());
    let fuse_qkv = |name: &str, dims: &[u64], data: &[u8]| {
        let Some((slot, layer)) = ["attn_q", "attn_k", "attn_v"]
            .iter()
            .enumerate()
            .find_map(|(i, p)| Some((i, name.strip_suffix(&format!(".{p}.weight"))?)))
        else {
            return keep(name, dims, data);
        };
        let mut parts = parts.borrow_mut();
        let entry = parts.entry(layer.to_owned()).or_default();
        entry[slot] = data.to_vec();
        if entry.iter().any(Vec::is_empty) {
            return Vec::new();
        }
        let all = entry.concat();
        let rows = all.len() as u64 / 4 / dims[0];
        vec![(format!("{layer}.attn_qkv.weight"), vec![dims[0], rows], F32, all)]
    };
    rewrite(&fixtures().join("gguf/llama-f32.gguf"), &fused, &fuse_qkv);
    let model = load_model(&fused, Arc::new(CpuBackend::new(MatmulPrecision::F32))).unwrap();
    assert!(compare(model.as_ref(), "llama-f32") <= 1e-5);

    // deepseek2: ffn_gate_exps + ffn_up_exps → ffn_gate_up_exps (gate rows, then up rows, per expert).
    let fused = dir.path().join("dsv2-gate-up.gguf");
    let gate = std::cell::RefCell::new(Vec::<u8>::new());
    let fuse_gate_up = |name: &str, dims: &[u64], data: &[u8]| {
        if name.ends_with("ffn_gate_exps.weight") {
            *gate.borrow_mut() = data.to_vec();
            return Vec::new();
        }
        let Some(layer) = name.strip_suffix(".ffn_up_exps.weight") else {
            return keep(name, dims, data);
        };
        let gate = std::mem::take(&mut *gate.borrow_mut());
        let expert_bytes = data.len() / dims[2] as usize;
        let mut all = Vec::new();
        for (g, u) in gate.chunks(expert_bytes).zip(data.chunks(expert_bytes)) {
            all.extend_from_slice(g);
            all.extend_from_slice(u);
        }
        vec![(
            format!("{layer}.ffn_gate_up_exps.weight"),
            vec![dims[0], 2 * dims[1], dims[2]],
            F32,
            all,
        )]
    };
    rewrite(&fixtures().join("gguf/dsv2-f32.gguf"), &fused, &fuse_gate_up);
    let model = load_model(&fused, Arc::new(CpuBackend::new(MatmulPrecision::F32))).unwrap();
    assert!(compare(model.as_ref(), "dsv2-f32") <= 1e-5);
}

#[test]
fn q8_0_weights_load_and_stay_close() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("llama-q8_0.gguf");
    let quantize = |name: &str, dims: &[u64], data: &[u8]| {
        if dims.len() != 2 || name.contains("norm") {
            return keep(name, dims, data);
        }
        let values: Vec<f32> = data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let q = r1serve_kernels::quant::quantize(WeightFormat::Q8_0, &values).unwrap();
        vec![(name.to_owned(), dims.to_vec(), Q8_0, q)]
    };
    let source = fixtures().join("gguf/llama-f32.gguf");
    rewrite(&source, &path, &quantize);
    // Weight level: every matrix (q/k un-permuted by whole Q8_0 rows) is the F32 one to within
    // one quantization step of its row (a misplaced row would be off by the weights themselves).
    let (q8, f32s) = (
        WeightStore::open_gguf(&path).unwrap(),
        WeightStore::open_gguf(&source).unwrap(),
    );
    let mut shapes = vec![
        ("model.embed_tokens.weight".to_owned(), 320, 64),
        ("lm_head.weight".to_owned(), 320, 64),
    ];
    for layer in 0..2 {
        let p = format!("model.layers.{layer}");
        for (name, rows, cols) in [
            ("self_attn.q_proj", 64, 64),
            ("self_attn.k_proj", 32, 64),
            ("self_attn.v_proj", 32, 64),
            ("self_attn.o_proj", 64, 64),
            ("mlp.gate_proj", 160, 64),
            ("mlp.up_proj", 160, 64),
            ("mlp.down_proj", 64, 160),
        ] {
            shapes.push((format!("{p}.{name}.weight"), rows, cols));
        }
    }
    for (name, rows, cols) in shapes {
        let q = q8.matrix(&name, rows, cols).unwrap();
        assert_eq!(q.format(), WeightFormat::Q8_0, "{name}");
        let (q, f) = (q.to_f32(), f32s.matrix(&name, rows, cols).unwrap().to_f32());
        for (qr, fr) in q.chunks(cols).zip(f.chunks(cols)) {
            let step = fr.iter().fold(0.0f32, |m, v| m.max(v.abs())) / 127.0;
            for (a, b) in qr.iter().zip(fr) {
                assert!((a - b).abs() <= step, "{name}: {a} vs {b}");
            }
        }
    }
    // Model level: Q8_0 weights and Q8_0-rounded activations stay near the F32 logits.
    let model = load_model(&path, Arc::new(CpuBackend::new(MatmulPrecision::F32))).unwrap();
    let reference = load_model(&source, Arc::new(CpuBackend::new(MatmulPrecision::F32))).unwrap();
    let tokens = [0u32, 5, 17, 42, 99, 3];
    let (a, b) = (logits(model.as_ref(), &tokens), logits(reference.as_ref(), &tokens));
    let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
    let scale = b.iter().map(|v| v.abs()).fold(0.0, f32::max);
    eprintln!("Q8_0 llama vs F32: max |Δlogit| = {worst:.3e} (max |logit| {scale:.2})");
    assert!(worst <= 0.1 * scale, "{worst} vs scale {scale}");
}

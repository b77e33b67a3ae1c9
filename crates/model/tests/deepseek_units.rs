//! DeepSeek V2/V3 beyond the golden logits: batching and chunked prefill agree with single-sequence
//! runs, `summarize` counts exactly the fixtures' tensors, and broken checkpoints are errors.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use r1serve_kernels::{CpuBackend, PagedKvCache};
use r1serve_model::{load_model, summarize, Batch, CausalLm, LogitsWanted, ModelDir, SeqInput};
use safetensors::tensor::TensorView;
use safetensors::SafeTensors;
use serde_json::Value;

const DEEPSEEK_FIXTURES: [&str; 6] = [
    "dsv3-f32",
    "dsv3-noqlora-f32",
    "dsv3-fp8",
    "dsv3-bf16",
    "dsv2-f32",
    "dsv2-group-f32",
];

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

fn prompt_ids(dir: &Path, case: usize) -> Vec<u32> {
    let golden: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    golden["cases"][case]["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

fn run(model: &dyn CausalLm, cache: &mut PagedKvCache, seqs: Vec<SeqInput>) -> Vec<f32> {
    let mut logits = Vec::new();
    model.forward(&Batch { seqs }, cache, &mut logits).unwrap();
    logits
}

fn assert_close(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
    assert!(worst < 1e-4, "{what}: max difference {worst}");
}

/// Two sequences in one batch (MoE tokens grouped across them) equal each run alone, and a prompt
/// prefilled in two chunks equals one pass.
#[test]
fn batched_and_chunked_prefill_match_single_runs() {
    for name in ["dsv3-f32", "dsv2-group-f32"] {
        let dir = fixture(name);
        let model = load_model(&dir, Arc::new(CpuBackend::default())).unwrap();
        let vocab = model.info().vocab_size;
        let widths = model.kv_entry_widths();
        let (a, mut b) = (prompt_ids(&dir, 0), prompt_ids(&dir, 1));
        b.extend_from_slice(&a[..3]);
        let (ta, tb): (Vec<u32>, Vec<u32>) = ((0..4).rev().collect(), (4..8).collect());
        let seq = |tokens, start_pos, block_table, logits| SeqInput {
            tokens,
            start_pos,
            block_table,
            logits,
        };

        let mut cache = PagedKvCache::new(4, 8, &widths);
        let both = run(
            model.as_ref(),
            &mut cache,
            vec![seq(&a, 0, &ta, LogitsWanted::Last), seq(&b, 0, &tb, LogitsWanted::All)],
        );
        assert_eq!(both.len(), (1 + b.len()) * vocab);
        let mut cache = PagedKvCache::new(4, 8, &widths);
        let a_alone = run(model.as_ref(), &mut cache, vec![seq(&a, 0, &ta, LogitsWanted::All)]);
        let b_alone = run(model.as_ref(), &mut cache, vec![seq(&b, 0, &tb, LogitsWanted::All)]);
        assert_close(&both[..vocab], &a_alone[(a.len() - 1) * vocab..], name);
        assert_close(&both[vocab..], &b_alone, name);

        let mut cache = PagedKvCache::new(4, 8, &widths);
        let split = 5;
        let first = run(
            model.as_ref(),
            &mut cache,
            vec![seq(&b[..split], 0, &tb, LogitsWanted::None)],
        );
        assert!(first.is_empty());
        let rest = run(
            model.as_ref(),
            &mut cache,
            vec![seq(&b[split..], split, &tb, LogitsWanted::All)],
        );
        assert_close(&rest, &b_alone[split * vocab..], name);
    }
}

/// Element counts of a fixture's tensors: (main model, MTP layers), block scales excluded.
fn tensor_elements(dir: &Path, layers: usize) -> (u64, u64) {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (mut main, mut mtp) = (0, 0);
    for (name, view) in st.tensors() {
        if name.ends_with("_scale_inv") {
            continue;
        }
        let count = view.shape().iter().product::<usize>() as u64;
        let layer = name
            .strip_prefix("model.layers.")
            .and_then(|rest| rest.split('.').next())
            .and_then(|i| i.parse::<usize>().ok());
        match layer {
            Some(i) if i >= layers => mtp += count,
            _ => main += count,
        }
    }
    (main, mtp)
}

#[test]
fn summary_counts_every_fixture_tensor() {
    for name in DEEPSEEK_FIXTURES {
        let dir = fixture(name);
        let summary = summarize(&ModelDir::open(&dir).unwrap(), true).unwrap();
        let (main, mtp) = tensor_elements(&dir, summary.num_layers);
        assert_eq!(summary.params_total, main, "{name}: params_total");
        assert_eq!(summary.params_mtp, mtp, "{name}: params_mtp");
        assert!(summary.params_active < summary.params_total, "{name}");
        assert!(summary.attention.starts_with("MLA ("), "{name}");
        assert!(summary.moe.is_some(), "{name}");
    }
}

/// Copies `name` into a temporary directory with its config and tensors edited.
fn broken_copy(
    name: &str,
    edit_config: impl Fn(&mut Value),
    edit_tensors: impl Fn(&mut Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>),
) -> tempfile::TempDir {
    let src = fixture(name);
    let out = tempfile::tempdir().unwrap();
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    edit_config(&mut config);
    std::fs::write(out.path().join("config.json"), config.to_string()).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    edit_tensors(&mut tensors);
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, dtype, shape, data)| (n.clone(), TensorView::new(*dtype, shape.clone(), data).unwrap()))
        .collect();
    let file = safetensors::serialize(views, None::<HashMap<String, String>>).unwrap();
    std::fs::write(out.path().join("model.safetensors"), file).unwrap();
    out
}

fn load_error(dir: &Path) -> String {
    match load_model(dir, Arc::new(CpuBackend::default())) {
        Ok(_) => panic!("{} loaded although it is broken", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn broken_checkpoints_are_errors_naming_the_problem() {
    let missing_expert = "model.layers.1.mlp.experts.3.up_proj.weight";
    let dir = broken_copy("dsv3-f32", |_| {}, |t| t.retain(|(n, ..)| n != missing_expert));
    assert!(load_error(dir.path()).contains(missing_expert));

    let kv_b = "model.layers.2.self_attn.kv_b_proj.weight";
    let dir = broken_copy(
        "dsv3-f32",
        |_| {},
        |t| {
            let entry = t.iter_mut().find(|(n, ..)| n == kv_b).unwrap();
            entry.2.reverse();
        },
    );
    let msg = load_error(dir.path());
    assert!(msg.contains(kv_b) && msg.contains("shape"), "{msg}");

    let scales = "model.layers.1.mlp.shared_experts.down_proj.weight_scale_inv";
    let dir = broken_copy("dsv3-fp8", |_| {}, |t| t.retain(|(n, ..)| n != scales));
    assert!(load_error(dir.path()).contains(scales));

    let bias = "model.layers.1.mlp.gate.e_score_correction_bias";
    let dir = broken_copy("dsv3-bf16", |_| {}, |t| t.retain(|(n, ..)| n != bias));
    assert!(load_error(dir.path()).contains(bias));

    let dir = broken_copy("dsv2-f32", |c| c["q_lora_rank"] = 16.into(), |_| {});
    assert!(load_error(dir.path()).contains("q_a_proj"));

    let dir = broken_copy("dsv3-f32", |c| c["n_group"] = 3.into(), |_| {});
    assert!(load_error(dir.path()).contains("n_group"));

    let dir = broken_copy("dsv2-group-f32", |c| c["topk_method"] = "noaux_tc".into(), |_| {});
    let msg = load_error(dir.path());
    assert!(msg.contains("group_limited_greedy"), "{msg}");

    // A truncated weight file.
    let dir = broken_copy("dsv3-noqlora-f32", |_| {}, |_| {});
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    load_error(dir.path());
}

/// The MTP layer of dsv3-f32 is in the file but not loaded: deleting it changes nothing.
#[test]
fn mtp_layers_are_ignored() {
    let dir = broken_copy(
        "dsv3-f32",
        |_| {},
        |t| t.retain(|(n, ..)| !n.starts_with("model.layers.3.")),
    );
    let with_mtp = load_model(fixture("dsv3-f32"), Arc::new(CpuBackend::default())).unwrap();
    let without = load_model(dir.path(), Arc::new(CpuBackend::default())).unwrap();
    let ids = prompt_ids(&fixture("dsv3-f32"), 0);
    let table: Vec<u32> = (0..4).collect();
    let seq = SeqInput {
        tokens: &ids,
        start_pos: 0,
        block_table: &table,
        logits: LogitsWanted::All,
    };
    let mut cache = PagedKvCache::new(4, 4, &with_mtp.kv_entry_widths());
    let a = run(with_mtp.as_ref(), &mut cache, vec![seq]);
    let b = run(without.as_ref(), &mut cache, vec![seq]);
    assert_eq!(a, b);
}

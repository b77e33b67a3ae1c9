#!/usr/bin/env python3
"""Write the GGUF test fixtures under tests/fixtures/gguf/ from the safetensors fixtures.

Usage:  python3 tools/make_gguf_fixtures.py [--only NAME[,NAME...]] [--check]

Needs only `gguf`, `tokenizers` (pinned in tools/requirements-fixtures.txt) and numpy: no torch,
no transformers, no network. The safetensors files are parsed by hand (BF16 has no numpy dtype).

This is an independent writer for r1serve's GGUF loader tests. It follows the conventions of
llama.cpp's `convert_hf_to_gguf.py`, re-implemented from a reading of that converter (no code
taken from it), so that a loader bug and a writer bug are unlikely to cancel out:

* metadata keys `{arch}.*` as the converter's `TextModel.set_gguf_parameters` plus the
  per-architecture overrides write them (llama: `vocab_size`, `rope.dimension_count`;
  deepseek2: MLA ranks and head sizes, `head_count_kv` = 1, expert keys, and
  `rope.scaling.yarn_log_multiplier` = 0.1 * mscale_all_dim);
* llama3 rope scaling is not written as keys but as a `rope_freqs.weight` tensor of per-frequency
  divisors (the converter's `generate_extra_tensors`);
* llama q/k projections are row-permuted for GGML's adjacent-pair ("NORM") rope: within each head
  (n_head for q, n_head_kv for k) the rows are reshaped to (2, head_dim / 2), the two axes swapped
  and flattened back; qwen2 is not permuted, neither is deepseek2 (its HF weights already use
  adjacent pairs);
* deepseek2 routed experts are stacked as `blk.N.ffn_{gate,up,down}_exps.weight`
  ([n_expert, rows, cols] in numpy order), multi-token-prediction layers are dropped, and
  `kv_b_proj` is either kept whole (`attn_kv_b`, the legacy layout) or split the way current
  converters do: `attn_k_b` = the per-head nope rows transposed ([n_head, kv_lora_rank, nope]),
  `attn_v_b` = the per-head value rows ([n_head, v_head_dim, kv_lora_rank]);
* 1-D tensors, `*_norm.weight`, `ffn_gate_inp` and `exp_probs_b.bias` stay F32; the other
  weights take the output type (F32 or F16).

GGUF dims are written by GGUFWriter in reverse numpy order (ne[0] is the innermost axis).

Two files also carry a tokenizer converted from HF tokenizer files as the converter's
`get_vocab_base` + `SpecialVocab` do (see write_tokenizer): llama-f32.gguf the llama-f32 fixture's
own tokenizer.json (GPT-2 split, `pre` "gpt-2"); qwen2-f32.gguf an R1-Distill-Qwen-style tokenizer
trained here, deterministically (Qwen2 split + NFC, R1's added tokens, BOS prepended, r1serve's
built-in R1 chat template; `pre` "deepseek-r1-qwen"), whose HF files are kept in
tests/fixtures/gguf/qwen2-f32-tokenizer/ as the reference. Details: tests/fixtures/gguf/README.md.
"""

import argparse
import hashlib
import json
import struct
import sys
from pathlib import Path

import numpy as np
import gguf

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "tests" / "fixtures"
OUT = SRC / "gguf"

# output file -> (source fixture, output type, split kv_b into k_b / v_b)
FIXTURES = {
    "llama-f32": ("llama-f32", "f32", False),
    "qwen2-f32": ("qwen2-f32", "f32", False),
    "dsv2-f32": ("dsv2-f32", "f32", False),
    "dsv3-bf16-f16": ("dsv3-bf16", "f16", True),
}

# fixture -> (directory of the HF tokenizer files, `tokenizer.ggml.pre`)
R1_TOKENIZER_DIR = OUT / "qwen2-f32-tokenizer"
TOKENIZERS = {
    "llama-f32": (SRC / "llama-f32", "gpt-2"),
    "qwen2-f32": (R1_TOKENIZER_DIR, "deepseek-r1-qwen"),
}
BUILTIN_TEMPLATE = ROOT / "crates" / "chat" / "src" / "template" / "builtin_r1.jinja"

# Qwen2's pre-tokenizer split (transformers' Qwen2Converter), kept by R1-Distill-Qwen.
QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# Added after the 282 trained tokens, in id order; True = special in R1's tokenizer.json.
R1_ADDED = [
    ("<｜User｜>", False),
    ("<｜Assistant｜>", False),
    ("<｜begin▁of▁sentence｜>", True),
    ("<｜end▁of▁sentence｜>", True),
    ("<think>", False),
    ("</think>", False),
]
R1_CORPUS = """\
A reasoning model thinks before it answers. It writes its thoughts between two tags, then the
answer the user reads. The server splits the two, so that a client can show the thinking apart
from the answer, or hide it. Numbers such as 12, 345 and 6789 are split into single digits here.
Qwen's tokenizer normalises text to NFC first: a letter and its accent become one character.
"""

ARCH = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "DeepseekV2ForCausalLM": "deepseek2",
    "DeepseekV3ForCausalLM": "deepseek2",
}

# HF per-layer suffix -> GGUF per-layer name (without the `blk.N.` prefix).
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    # deepseek2 (MLA, MoE)
    "self_attn.q_a_proj.weight": "attn_q_a.weight",
    "self_attn.q_a_layernorm.weight": "attn_q_a_norm.weight",
    "self_attn.q_b_proj.weight": "attn_q_b.weight",
    "self_attn.kv_a_proj_with_mqa.weight": "attn_kv_a_mqa.weight",
    "self_attn.kv_a_layernorm.weight": "attn_kv_a_norm.weight",
    "self_attn.kv_b_proj.weight": "attn_kv_b.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",
    "mlp.gate.e_score_correction_bias": "exp_probs_b.bias",
    "mlp.shared_experts.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_experts.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_experts.down_proj.weight": "ffn_down_shexp.weight",
}
GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def read_safetensors(path):
    """name -> float32 array (F32, F16 and BF16 only), in file order."""
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    base = 8 + header_len
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        data = raw[base + start : base + end]
        if info["dtype"] == "F32":
            array = np.frombuffer(data, dtype="<f4")
        elif info["dtype"] == "F16":
            array = np.frombuffer(data, dtype="<f2").astype(np.float32)
        elif info["dtype"] == "BF16":
            array = (np.frombuffer(data, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            raise SystemExit(f"{path}: tensor {name} has dtype {info['dtype']}, not F32/F16/BF16")
        tensors[name] = array.reshape(info["shape"]).copy()
    return tensors


def read_fixture(directory):
    index = directory / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    tensors = {}
    for file in files:
        tensors.update(read_safetensors(directory / file))
    return tensors


def rope_params(cfg):
    """(theta, params) from either `rope_parameters` (transformers 5) or `rope_scaling`."""
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = params.get("rope_theta", cfg.get("rope_theta"))
    kind = params.get("rope_type", params.get("type"))
    return theta, kind, params


def permute_for_ggml_rope(weight, heads):
    """Rows (i, i + d/2) of each head become adjacent rows (2i, 2i + 1)."""
    rows = weight.shape[0]
    head_dim = rows // heads
    shaped = weight.reshape(heads, 2, head_dim // 2, *weight.shape[1:])
    return np.ascontiguousarray(shaped.swapaxes(1, 2).reshape(weight.shape))


def llama3_rope_factors(cfg, params, theta):
    dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    factor = params.get("factor", 8.0)
    low = params.get("low_freq_factor", 1.0)
    high = params.get("high_freq_factor", 4.0)
    old_ctx = params.get("original_max_position_embeddings", 8192)
    low_wavelen = old_ctx / low
    high_wavelen = old_ctx / high
    out = []
    for i in range(0, dim, 2):
        freq = 1.0 / theta ** (i / dim)
        wavelen = 2 * np.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1.0 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def write_metadata(w, arch, cfg, name, outtype):
    is_ds = arch == "deepseek2"
    theta, kind, params = rope_params(cfg)
    w.add_name(name)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    # deepseek2: MLA is written as MQA over the latent, one "kv head".
    w.add_head_count_kv(1 if is_ds else cfg.get("num_key_value_heads", cfg["num_attention_heads"]))
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(params["factor"])
    elif kind == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(params["factor"])
        w.add_rope_scaling_orig_ctx_len(params["original_max_position_embeddings"])
        if "beta_fast" in params:
            w.add_rope_scaling_yarn_beta_fast(params["beta_fast"])
        if "beta_slow" in params:
            w.add_rope_scaling_yarn_beta_slow(params["beta_slow"])
    if theta is not None:
        w.add_rope_freq_base(theta)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    if cfg.get("n_routed_experts") is not None:
        w.add_expert_count(cfg["n_routed_experts"])
    if cfg.get("num_experts_per_tok") is not None:
        w.add_expert_used_count(cfg["num_experts_per_tok"])
    if cfg.get("n_group") is not None:
        w.add_expert_group_count(cfg["n_group"])
    if cfg.get("topk_group") is not None:
        w.add_expert_group_used_count(cfg["topk_group"])
    scoring = cfg.get("scoring_func")
    if scoring is None and cfg["architectures"][0] == "DeepseekV3ForCausalLM":
        # transformers-5 configs drop the key; the published V3/R1 config states "sigmoid".
        scoring = "sigmoid"
    if scoring == "sigmoid":
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    elif scoring == "softmax":
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SOFTMAX)
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if outtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)

    if arch == "llama":
        w.add_vocab_size(cfg["vocab_size"])
        w.add_rope_dimension_count(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])
    if cfg.get("head_dim") is not None and not is_ds:
        w.add_key_length(cfg["head_dim"])
        w.add_value_length(cfg["head_dim"])
    if is_ds:
        kv_lora = cfg["kv_lora_rank"]
        rope_dim = cfg["qk_rope_head_dim"]
        first_dense = cfg.get("first_k_dense_replace")
        if first_dense is None:
            first_dense = 0 if cfg.get("n_routed_experts") is not None else cfg["num_hidden_layers"]
        w.add_leading_dense_block_count(first_dense)
        w.add_vocab_size(cfg["vocab_size"])
        if cfg.get("q_lora_rank") is not None:
            w.add_q_lora_rank(cfg["q_lora_rank"])
        w.add_kv_lora_rank(kv_lora)
        w.add_key_length(kv_lora + rope_dim)
        w.add_value_length(kv_lora)
        w.add_key_length_mla(cfg["qk_nope_head_dim"] + rope_dim)
        w.add_value_length_mla(cfg["v_head_dim"])
        w.add_expert_feed_forward_length(cfg.get("moe_intermediate_size") or cfg["intermediate_size"])
        w.add_expert_shared_count(cfg.get("n_shared_experts") or 0)
        if cfg.get("routed_scaling_factor") is not None:
            w.add_expert_weights_scale(cfg["routed_scaling_factor"])
        if cfg.get("norm_topk_prob"):
            w.add_expert_weights_norm(True)
        w.add_rope_dimension_count(rope_dim)
        if params.get("mscale_all_dim") is not None:
            w.add_rope_scaling_yarn_log_mul(0.1 * params["mscale_all_dim"])

    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])


def looks_special(token):
    """The converter's `does_token_look_special` for the token shapes used here."""
    return (token.startswith("<|") and token.endswith("|>")) or (token.startswith("<｜") and token.endswith("｜>"))


def write_tokenizer(w, directory, pre, cfg):
    """Tokenizer metadata from an HF tokenizer directory, as llama.cpp's converter writes it."""
    tok = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.exists() else {}
    added = {t["id"]: t for t in tok["added_tokens"]}
    by_id = {i: t for t, i in tok["model"]["vocab"].items()}
    by_id.update({i: t["content"] for i, t in added.items()})
    tokens, types = [], []
    for i in range(cfg["vocab_size"]):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            token = added[i]["content"]
            if added[i]["special"] or looks_special(token):
                types.append(gguf.TokenType.CONTROL)
            else:
                token = token.replace("\u2581", " ")
                types.append(gguf.TokenType.USER_DEFINED)
            tokens.append(token)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    merges = []
    for merge in tok["model"]["merges"]:
        a, b = merge if isinstance(merge, list) else merge.split(" ")
        assert " " not in a + b, merge
        merges.append(f"{a} {b}")
    add_bos = config.get("add_bos_token")
    if add_bos is None:
        post = tok.get("post_processor") or {}
        for processor in post.get("processors", [post]):
            if processor.get("type") == "TemplateProcessing":
                add_bos = "SpecialToken" in processor["single"][0]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    if add_bos is not None:
        w.add_add_bos_token(bool(add_bos))
    if "add_eos_token" in config:
        w.add_add_eos_token(bool(config["add_eos_token"]))
    if config.get("chat_template"):
        w.add_chat_template(config["chat_template"])


def build_r1_tokenizer(vocab_size, bos_id, eos_id):
    """The R1-Distill-Qwen-style tokenizer of qwen2-f32.gguf, written to R1_TOKENIZER_DIR."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
    from tokenizers import pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    n_trained = vocab_size - len(R1_ADDED)
    trainer = trainers.BpeTrainer(
        vocab_size=n_trained, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(R1_CORPUS.splitlines(keepends=True), trainer=trainer)
    assert tok.get_vocab_size() == n_trained, tok.get_vocab_size()
    for content, special in R1_ADDED:
        token = AddedToken(content, special=special, normalized=not special)
        (tok.add_special_tokens if special else tok.add_tokens)([token])
    ids = [tok.token_to_id(content) for content, _ in R1_ADDED]
    assert ids == list(range(n_trained, vocab_size)), ids
    bos, eos = R1_ADDED[2][0], R1_ADDED[3][0]
    assert (tok.token_to_id(bos), tok.token_to_id(eos)) == (bos_id, eos_id)
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
            ),
        ]
    )
    R1_TOKENIZER_DIR.mkdir(parents=True, exist_ok=True)
    tok.save(str(R1_TOKENIZER_DIR / "tokenizer.json"))
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": bos,
        "eos_token": eos,
        "chat_template": BUILTIN_TEMPLATE.read_text(encoding="utf-8"),
        "tokenizer_class": "LlamaTokenizerFast",
    }
    text = json.dumps(config, ensure_ascii=False, indent=2) + "\n"
    (R1_TOKENIZER_DIR / "tokenizer_config.json").write_text(text, encoding="utf-8")


def gguf_tensors(arch, cfg, tensors, split_kv_b):
    """Yields (gguf name, float32 array) in the converter's order."""
    n_layers = cfg["num_hidden_layers"]
    n_head = cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads", n_head)
    theta, kind, params = rope_params(cfg)
    if arch == "llama" and kind == "llama3":
        yield "rope_freqs.weight", llama3_rope_factors(cfg, params, theta)
    tied = cfg.get("tie_word_embeddings", False)
    experts = {}
    for hf, value in tensors.items():
        if hf in GLOBAL_NAMES:
            if hf == "lm_head.weight" and tied:
                continue
            yield GLOBAL_NAMES[hf], value
            continue
        parts = hf.split(".")
        assert parts[:2] == ["model", "layers"], hf
        layer, suffix = int(parts[2]), ".".join(parts[3:])
        if layer >= n_layers:
            continue  # multi-token-prediction layer
        prefix = f"blk.{layer}."
        if suffix.startswith("mlp.experts."):
            expert, proj = int(parts[5]), parts[6]
            bucket = experts.setdefault(layer, {})
            bucket[(proj, expert)] = value
            n_exp = cfg["n_routed_experts"]
            if len(bucket) == 3 * n_exp:
                for proj in ("down_proj", "gate_proj", "up_proj"):
                    stacked = np.stack([bucket[(proj, e)] for e in range(n_exp)])
                    yield prefix + f"ffn_{proj.split('_')[0]}_exps.weight", stacked
            continue
        if arch == "llama" and suffix in ("self_attn.q_proj.weight", "self_attn.q_proj.bias"):
            value = permute_for_ggml_rope(value, n_head)
        if arch == "llama" and suffix in ("self_attn.k_proj.weight", "self_attn.k_proj.bias"):
            value = permute_for_ggml_rope(value, n_kv)
        if suffix == "self_attn.kv_b_proj.weight" and split_kv_b:
            nope, v_dim = cfg["qk_nope_head_dim"], cfg["v_head_dim"]
            kv_b = value.reshape(n_head, nope + v_dim, value.shape[-1])
            k_b = np.ascontiguousarray(kv_b[:, :nope, :].transpose(0, 2, 1))  # [H, kv_lora, nope]
            v_b = np.ascontiguousarray(kv_b[:, nope:, :])  # [H, v, kv_lora]
            yield prefix + "attn_k_b.weight", k_b
            yield prefix + "attn_v_b.weight", v_b
            continue
        yield prefix + LAYER_NAMES[suffix], value


def stored(name, value, outtype):
    keep_f32 = (
        value.ndim <= 1
        or name.endswith("_norm.weight")
        or name.endswith("ffn_gate_inp.weight")
        or not name.endswith(".weight")
    )
    if outtype == "f16" and not keep_f32:
        return value.astype(np.float16)
    return value.astype(np.float32)


def convert(out_name, src_name, outtype, split_kv_b):
    src = SRC / src_name
    cfg = json.loads((src / "config.json").read_text())
    arch = ARCH[cfg["architectures"][0]]
    tensors = read_fixture(src)
    path = OUT / f"{out_name}.gguf"
    w = gguf.GGUFWriter(path, arch)
    write_metadata(w, arch, cfg, out_name, outtype)
    if out_name in TOKENIZERS:
        directory, pre = TOKENIZERS[out_name]
        if directory == R1_TOKENIZER_DIR:
            build_r1_tokenizer(cfg["vocab_size"], cfg["bos_token_id"], cfg["eos_token_id"])
        write_tokenizer(w, directory, pre, cfg)
    for name, value in gguf_tensors(arch, cfg, tensors, split_kv_b):
        w.add_tensor(name, stored(name, value, outtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", help="comma-separated fixture names")
    parser.add_argument("--check", action="store_true", help="regenerate into memory and compare with the files")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(FIXTURES)
    OUT.mkdir(parents=True, exist_ok=True)
    for name in names:
        if name not in FIXTURES:
            raise SystemExit(f"unknown fixture {name}; known: {', '.join(FIXTURES)}")
        before = (OUT / f"{name}.gguf").read_bytes() if args.check and (OUT / f"{name}.gguf").exists() else None
        path = convert(name, *FIXTURES[name])
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()[:16]
        status = ""
        if args.check:
            status = " (unchanged)" if before == data else " (CHANGED)"
        print(f"{path.relative_to(ROOT)}: {len(data)} bytes, sha256 {digest}{status}")
        reader = gguf.GGUFReader(path)  # round-trip through gguf-py's own reader
        assert len(reader.tensors) > 0
    total = sum(p.stat().st_size for p in OUT.glob("*.gguf"))
    print(f"total {total} bytes under {OUT.relative_to(ROOT)}")
    if total >= 2 * 1024 * 1024:
        sys.exit("fixtures exceed the 2 MiB budget")


if __name__ == "__main__":
    main()

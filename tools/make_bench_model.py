#!/usr/bin/env python3
"""Random-weight GGUF of a real model's shape, for side-by-side speed runs (r1serve vs llama.cpp).

    python3 tools/make_bench_model.py ../shared/model-configs/deepseek-r1-distill-qwen-1.5b.json /tmp/bench/qwen1.5b-bf16.gguf

Writes BF16 matrices (norms and biases F32) with a placeholder vocabulary ("<0>", "<1>", ...) so
llama.cpp accepts the file; quantise it further with llama.cpp's `llama-quantize`. Both engines then
read the very same file. Supports the dense architectures (Llama, Qwen2). Needs numpy and gguf.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import gguf

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_gguf_fixtures as fx  # noqa: E402  (shared metadata writer and tensor names)


def random_bf16(rng, shape, scale=0.02):
    """uint16 BF16 bit patterns of uniform(-scale, scale) values."""
    values = rng.uniform(-scale, scale, size=shape).astype(np.float32)
    return (values.view(np.uint32) >> 16).astype(np.uint16)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    cfg = json.loads(args.config.read_text())
    arch = fx.ARCH[cfg["architectures"][0]]
    if arch not in ("llama", "qwen2"):
        sys.exit(f"{arch}: only dense architectures are supported here")
    rng = np.random.default_rng(args.seed)
    h, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads", heads)
    hd = cfg.get("head_dim") or h // heads

    args.out.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(args.out, arch)
    # The shared writer labels files F16; this one is BF16.
    w.add_file_type = lambda _ftype: gguf.GGUFWriter.add_file_type(w, gguf.LlamaFileType.MOSTLY_BF16)
    fx.write_metadata(w, arch, cfg, args.config.stem, "f16")
    w.add_tokenizer_model("llama")
    w.add_token_list([f"<{i}>" for i in range(vocab)])
    w.add_token_scores([0.0] * vocab)
    w.add_token_types([gguf.TokenType.NORMAL] * vocab)

    def matrix(name, rows, cols):
        w.add_tensor(name, random_bf16(rng, (rows, cols)), raw_shape=(rows, cols), raw_dtype=gguf.GGMLQuantizationType.BF16)

    def vector(name, n, value=None):
        data = np.full(n, value, np.float32) if value is not None else rng.uniform(-0.02, 0.02, n).astype(np.float32)
        w.add_tensor(name, data)

    matrix("token_embd.weight", vocab, h)
    for i in range(cfg["num_hidden_layers"]):
        p = f"blk.{i}."
        vector(p + "attn_norm.weight", h, 1.0)
        matrix(p + "attn_q.weight", heads * hd, h)
        matrix(p + "attn_k.weight", kv * hd, h)
        matrix(p + "attn_v.weight", kv * hd, h)
        if arch == "qwen2":
            vector(p + "attn_q.bias", heads * hd)
            vector(p + "attn_k.bias", kv * hd)
            vector(p + "attn_v.bias", kv * hd)
        matrix(p + "attn_output.weight", h, heads * hd)
        vector(p + "ffn_norm.weight", h, 1.0)
        matrix(p + "ffn_gate.weight", inter, h)
        matrix(p + "ffn_up.weight", inter, h)
        matrix(p + "ffn_down.weight", h, inter)
    vector("output_norm.weight", h, 1.0)
    if not cfg.get("tie_word_embeddings"):
        matrix("output.weight", vocab, h)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"wrote {args.out} ({args.out.stat().st_size / 2**30:.2f} GiB)")


if __name__ == "__main__":
    main()

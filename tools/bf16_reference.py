#!/usr/bin/env python3
"""How far transformers' own bfloat16 inference lands from the f32 golden log-probs.

Usage:  python3 tools/bf16_reference.py    (tools/make_fixtures.py also runs it)

For every golden fixture that holds BF16 weights (qwen2-bf16, dsv3-bf16, and dsv3-fp8, whose
unquantised tensors are BF16), runs transformers with dtype=torch.bfloat16 on the same weights
(FP8 ones dequantised, as tools/make_fixtures.py does for its reference) over each golden case,
and writes tests/fixtures/<name>/bf16_reference.json with the largest |Δlogprob| against the f32
golden log-probs (over the whole vocabulary, and on the greedy tokens). crates/model/tests/golden.rs holds r1serve's default matmul precision (BF16
activations for BF16 and FP8 weights) to that bound: rounding the matmul inputs must cost no more than
running the reference itself in bf16.
"""

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402  (sets the offline / thread settings first)

import json  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

FIXTURES = ["qwen2-bf16", "dsv3-bf16", "dsv3-fp8"]


def arch_of(config):
    return {
        "LlamaForCausalLM": "llama",
        "Qwen2ForCausalLM": "qwen2",
        "DeepseekV3ForCausalLM": "deepseek_v3",
        "DeepseekV2ForCausalLM": "deepseek_v2",
    }[config["architectures"][0]]


def load_bf16(d, config, tmp):
    """The fixture's model in bfloat16; FP8 weights dequantised to f32 first."""
    _, model_cls = mf.ARCHS[arch_of(config)]
    if "quantization_config" in config:
        block = config["quantization_config"]["weight_block_size"]
        on_disk = mf.read_weight_files(d)
        plain = {}
        for k, v in on_disk.items():
            if k.endswith("_scale_inv"):
                continue
            scale = on_disk.get(k + "_scale_inv")
            plain[k] = mf.fp8_dequantize(v, scale, block) if scale is not None else v.to(torch.float32)
        ref_dir = Path(tmp) / "ref"
        ref_dir.mkdir()
        mf.write_json(ref_dir / "config.json", {k: v for k, v in config.items() if k != "quantization_config"})
        save_file(plain, str(ref_dir / "model.safetensors"), metadata={"format": "pt"})
        d = ref_dir
    model = model_cls.from_pretrained(str(d), dtype=torch.bfloat16, attn_implementation="eager")
    model.eval()
    return model


def main(names=None):
    for name in FIXTURES:
        if names is not None and name not in names:
            continue
        d = mf.OUT_DIR / name
        config = json.loads((d / "config.json").read_text())
        golden = json.loads((d / "golden.json").read_text())
        with tempfile.TemporaryDirectory() as tmp:
            model = load_bf16(d, config, tmp)
            worst, worst_chosen = 0.0, 0.0
            for case in golden["cases"]:
                seq = case["prompt_ids"] + case["greedy"][:-1]
                lp = torch.log_softmax(mf.logits_of(model, seq), dim=-1)
                diff = (lp - torch.tensor(case["logprobs"], dtype=torch.float32)).abs()
                worst = max(worst, diff.max().item())
                first = len(case["prompt_ids"]) - 1
                for i, token in enumerate(case["greedy"]):
                    worst_chosen = max(worst_chosen, diff[first + i, token].item())
        out = {
            "what": "max |logprob(transformers, dtype=bfloat16) - golden f32 logprob| over the golden cases:"
            " every position and vocabulary entry, and the greedy tokens only",
            "max_abs_dlogprob": mf.r6(worst),
            "max_abs_dlogprob_greedy": mf.r6(worst_chosen),
            "torch": torch.__version__.split("+")[0],
            "transformers": transformers.__version__,
        }
        (d / "bf16_reference.json").write_text(json.dumps(out, indent=2) + "\n")
        print(
            f"{name:12s} transformers bf16 vs f32 golden: max |Δlogprob| = {worst:.4g}, greedy tokens {worst_chosen:.4g}",
            flush=True,
        )


if __name__ == "__main__":
    main()

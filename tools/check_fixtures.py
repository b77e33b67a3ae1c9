#!/usr/bin/env python3
"""Independent re-implementation of the fixture models, used to cross-check the goldens.

Usage:  python3 tools/check_fixtures.py [NAME ...]

Reads only what a loader of published checkpoints would read (config.json, the safetensors
files, golden.json) -- no transformers -- and recomputes every golden log-prob row with plain
torch ops written from the published-checkpoint conventions (classic or transformers-5 style
config keys, interleaved-pair rope for DeepSeek, block FP8 dequantisation, ...). It is what the
Rust engine has to do, so it also shows the accuracy the engine can expect (printed per fixture).
"""

import json
import math
import sys
from pathlib import Path

import torch
from safetensors import safe_open

torch.set_num_threads(1)

FIXTURES_DIR = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
TOL = 2e-4  # max |log-prob difference| accepted (goldens are rounded to 6 significant digits)


def load_weights(d, config):
    w = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                w[k] = h.get_tensor(k)
    if (d / "model.safetensors.index.json").exists():
        index = json.loads((d / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(w)
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in w.values())
    qc = config.get("quantization_config")
    out = {}
    for k, t in w.items():
        if k.endswith("_scale_inv"):
            continue
        if t.dtype == torch.float8_e4m3fn:
            assert qc and qc["quant_method"] == "fp8" and qc["fmt"] == "e4m3"
            b0, b1 = qc["weight_block_size"]
            s = w[k + "_scale_inv"]
            rows, cols = t.shape
            assert s.shape == (math.ceil(rows / b0), math.ceil(cols / b1))
            t32 = t.to(torch.float32)
            deq = torch.empty_like(t32)
            for i in range(rows):
                for bj in range(s.shape[1]):
                    deq[i, bj * b1 : (bj + 1) * b1] = t32[i, bj * b1 : (bj + 1) * b1] * s[i // b0, bj]
            out[k] = deq
        else:
            out[k] = t.to(torch.float32)
    return out


def rope_params(config):
    """(theta, scaling dict or None) from either config style."""
    if "rope_parameters" in config:
        rp = dict(config["rope_parameters"])
        theta = rp.pop("rope_theta")
        kind = rp.get("rope_type", rp.get("type", "default"))
    else:
        theta = config.get("rope_theta", 10000.0)
        rp = dict(config.get("rope_scaling") or {})
        kind = rp.get("rope_type", rp.get("type", "default"))
    return theta, kind, rp


def inv_freq_and_mscale(config, dim):
    theta, kind, rp = rope_params(config)
    idx = torch.arange(0, dim, 2, dtype=torch.float64)
    base = 1.0 / (theta ** (idx / dim))
    if kind == "default":
        return base, 1.0, 1.0
    if kind == "llama3":
        f, lo, hi, old = rp["factor"], rp["low_freq_factor"], rp["high_freq_factor"], rp["original_max_position_embeddings"]
        out = []
        for fr in base.tolist():
            wl = 2 * math.pi / fr
            if wl < old / hi:
                out.append(fr)
            elif wl > old / lo:
                out.append(fr / f)
            else:
                sm = (old / wl - lo) / (hi - lo)
                out.append((1 - sm) * fr / f + sm * fr)
        return torch.tensor(out, dtype=torch.float64), 1.0, 1.0
    if kind == "yarn":
        f = rp["factor"]
        orig = rp["original_max_position_embeddings"]
        bf, bs = rp.get("beta_fast", 32), rp.get("beta_slow", 1)

        def corr_dim(rot):
            return dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(theta))

        lo = max(math.floor(corr_dim(bf)), 0)
        hi = min(math.ceil(corr_dim(bs)), dim - 1)
        if lo == hi:
            hi += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float64) - lo) / (hi - lo)).clamp(0, 1)
        inv = base / f * ramp + base * (1 - ramp)

        def gm(scale, m):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        m, mad = rp.get("mscale"), rp.get("mscale_all_dim")
        cos_scale = gm(f, m) / gm(f, mad) if (m and mad) else gm(f, 1.0)
        softmax_mult = gm(f, mad) ** 2 if mad else 1.0
        return inv, cos_scale, softmax_mult
    raise ValueError(kind)


def rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def lin(x, w, b=None):
    y = x @ w.T
    return y if b is None else y + b


def attend(q, k, v, scale):
    # q [T,H,Dk], k [T,H,Dk], v [T,H,Dv]; causal
    T = q.shape[0]
    s = torch.einsum("thd,shd->hts", q, k) * scale
    s = s.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
    p = s.softmax(-1)
    return torch.einsum("hts,shd->thd", p, v).reshape(T, -1)


def rope_half(x, cos, sin):
    # non-interleaved (Llama/Qwen2): rotate first half against second half
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def rope_pairs(x, cos, sin):
    # interleaved pairs (x0,x1),(x2,x3),... (DeepSeek published weights); output keeps the pair layout
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x2 * cos + x1 * sin
    return out


def mlp(x, w, p):
    return lin(torch.nn.functional.silu(lin(x, w[p + "gate_proj.weight"])) * lin(x, w[p + "up_proj.weight"]), w[p + "down_proj.weight"])


def moe(x, w, p, config):
    E = config["n_routed_experts"]
    k = config["num_experts_per_tok"]
    logits = lin(x, w[p + "gate.weight"])
    is_v3 = config["model_type"] == "deepseek_v3"
    ng = config.get("n_group") or 1
    tg = config.get("topk_group") or 1
    if is_v3:
        scores = logits.sigmoid()
        choice = scores + w[p + "gate.e_score_correction_bias"]
        gscore = choice.view(-1, ng, E // ng).topk(2, -1).values.sum(-1)
    else:
        scores = logits.softmax(-1)
        choice = scores
        method = config.get("topk_method", "greedy")
        gscore = scores.view(-1, ng, E // ng).max(-1).values if method == "group_limited_greedy" else None
    if gscore is not None and tg < ng:
        gsel = gscore.topk(tg, -1).indices
        gmask = torch.zeros_like(gscore).scatter_(1, gsel, 1.0).bool()
        choice = choice.masked_fill(~gmask.repeat_interleave(E // ng, 1), float("-inf"))
    idx = choice.topk(k, -1).indices
    wts = scores.gather(1, idx)
    if is_v3 and config.get("norm_topk_prob"):
        wts = wts / wts.sum(-1, keepdim=True)
    wts = wts * config.get("routed_scaling_factor", 1.0)
    out = mlp(x, w, p + "shared_experts.")
    for t in range(x.shape[0]):
        for j in range(k):
            e = int(idx[t, j])
            out[t] += wts[t, j] * mlp(x[t : t + 1], w, p + f"experts.{e}.")[0]
    return out


def forward(config, w, ids):
    mt = config["model_type"]
    T = len(ids)
    eps = config["rms_norm_eps"]
    H = config["num_attention_heads"]
    pos = torch.arange(T, dtype=torch.float64)
    x = w["model.embed_tokens.weight"][ids]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms(x, w[p + "input_layernorm.weight"], eps)
        a = p + "self_attn."
        if mt in ("llama", "qwen2"):
            D = config.get("head_dim") or config["hidden_size"] // H
            KV = config["num_key_value_heads"]
            inv, _, _ = inv_freq_and_mscale(config, D)
            ang = pos[:, None] * inv[None]
            cos, sin = ang.cos().float()[:, None], ang.sin().float()[:, None]
            q = lin(h, w[a + "q_proj.weight"], w.get(a + "q_proj.bias")).view(T, H, D)
            k = lin(h, w[a + "k_proj.weight"], w.get(a + "k_proj.bias")).view(T, KV, D)
            v = lin(h, w[a + "v_proj.weight"], w.get(a + "v_proj.bias")).view(T, KV, D)
            q, k = rope_half(q, cos, sin), rope_half(k, cos, sin)
            rep = H // KV
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
            o = attend(q, k, v, D**-0.5)
        else:
            dn, dr, dv = config["qk_nope_head_dim"], config["qk_rope_head_dim"], config["v_head_dim"]
            C = config["kv_lora_rank"]
            inv, cos_scale, sm_mult = inv_freq_and_mscale(config, dr)
            ang = pos[:, None] * inv[None]
            cos, sin = (ang.cos() * cos_scale).float()[:, None], (ang.sin() * cos_scale).float()[:, None]
            if config.get("q_lora_rank") is None:
                q = lin(h, w[a + "q_proj.weight"])
            else:
                q = lin(rms(lin(h, w[a + "q_a_proj.weight"]), w[a + "q_a_layernorm.weight"], 1e-6), w[a + "q_b_proj.weight"])
            q = q.view(T, H, dn + dr)
            kva = lin(h, w[a + "kv_a_proj_with_mqa.weight"])
            c = rms(kva[:, :C], w[a + "kv_a_layernorm.weight"], 1e-6)
            kpe = kva[:, None, C:]
            kv = lin(c, w[a + "kv_b_proj.weight"]).view(T, H, dn + dv)
            qpe = rope_pairs(q[..., dn:], cos, sin)
            kpe = rope_pairs(kpe, cos, sin).expand(T, H, dr)
            qq = torch.cat([q[..., :dn], qpe], -1)
            kk = torch.cat([kv[..., :dn], kpe], -1)
            o = attend(qq, kk, kv[..., dn:], (dn + dr) ** -0.5 * sm_mult)
        x = x + lin(o, w[a + "o_proj.weight"])
        h = rms(x, w[p + "post_attention_layernorm.weight"], eps)
        if mt.startswith("deepseek") and i >= config["first_k_dense_replace"]:
            x = x + moe(h, w, p + "mlp.", config)
        else:
            x = x + mlp(h, w, p + "mlp.")
    x = rms(x, w["model.norm.weight"], eps)
    head = w["lm_head.weight"] if not config.get("tie_word_embeddings") else w["model.embed_tokens.weight"]
    if config.get("tie_word_embeddings"):
        assert "lm_head.weight" not in w
    return x @ head.T


def check(d):
    config = json.loads((d / "config.json").read_text())
    golden = json.loads((d / "golden.json").read_text())
    gen = json.loads((d / "generation_config.json").read_text())
    w = load_weights(d, config)
    worst = 0.0
    for case in golden["cases"]:
        prompt, greedy = case["prompt_ids"], case["greedy"]
        assert prompt[0] == config["bos_token_id"] == gen["bos_token_id"]
        assert 5 <= len(prompt) <= 9 and len(greedy) == 16 and case["min_margin"] >= 0.05
        full = prompt + greedy[:-1]
        with torch.no_grad():
            lp = torch.log_softmax(forward(config, w, full), -1)
        gold = torch.tensor(case["logprobs"])
        assert gold.shape == (len(full), config["vocab_size"]), gold.shape
        worst = max(worst, (lp - gold).abs().max().item())
        assert lp[len(prompt) - 1 :].argmax(-1).tolist() == greedy, golden["name"]
    if "text_case" in golden:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(d / "tokenizer.json"))
        assert tok.encode(golden["text_case"]["text"]).ids == golden["text_case"]["ids"]
    ok = worst <= TOL
    print(f"{golden['name']:18s} max|dlogprob| = {worst:.2e}  {'ok' if ok else 'FAIL'}", flush=True)
    return ok


def main(argv):
    names = argv or sorted(p.name for p in FIXTURES_DIR.iterdir() if (p / "golden.json").exists())
    bad = [n for n in names if not check(FIXTURES_DIR / n)]
    if bad:
        print(f"FAILED: {bad}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

#!/usr/bin/env python3
"""Train r1-tiny, r1serve's embedded default model, from nothing.

Usage:  python3 tools/train_r1_tiny/train.py [--out models/r1-tiny] [--steps N] [--seed S]

One command builds the tokenizer, trains a miniature DeepSeek-V3 (MLA with q LoRA, DeepSeekMoE with
sigmoid group-limited routing and a shared expert, a dense first layer, YaRN) on generated
arithmetic traces, evaluates it greedily on held-out problems with transformers, and writes the
model directory (BF16 safetensors, tokenizer, chat template, model card, held-out set with the
transformers replies). Deterministic for a given seed, torch version and thread count.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tasks  # noqa: E402

BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
USER, ASSISTANT, THINK, END_THINK = "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"
SPECIAL_TOKENS = [BOS, EOS, PAD, USER, ASSISTANT, THINK, END_THINK]

# R1-style: system prompts first, then <｜User｜>/<｜Assistant｜> turns; earlier turns' reasoning is not
# sent back; the generation prompt opens the thinking.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(system='') -%}"
    "{%- for m in messages if m.role == 'system' -%}"
    "{%- set ns.system = ns.system + ('\\n\\n' if ns.system else '') + m.content -%}"
    "{%- endfor -%}"
    "{{- bos_token ~ ns.system -}}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'user' -%}"
    "{{- '<｜User｜>' ~ m.content -}}"
    "{%- elif m.role == 'assistant' -%}"
    "{%- set content = m.content or '' -%}"
    "{%- if '</think>' in content -%}{%- set content = content.split('</think>')[-1].lstrip() -%}{%- endif -%}"
    "{{- '<｜Assistant｜>' ~ content ~ eos_token -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<｜Assistant｜><think>\\n' -}}{%- endif -%}"
)

MODEL_CONFIG = dict(
    hidden_size=128,
    intermediate_size=384,
    moe_intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    q_lora_rank=64,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=16,
    v_head_dim=16,
    n_routed_experts=8,
    n_group=4,
    topk_group=2,
    num_experts_per_tok=2,
    n_shared_experts=1,
    first_k_dense_replace=1,
    norm_topk_prob=True,
    routed_scaling_factor=2.5,
    max_position_embeddings=2048,
    rms_norm_eps=1e-6,
    rope_parameters=dict(
        rope_type="yarn",
        rope_theta=10000.0,
        factor=4.0,
        mscale=1.0,
        mscale_all_dim=1.0,
        beta_fast=32,
        beta_slow=1,
        original_max_position_embeddings=512,
    ),
    tie_word_embeddings=False,
    num_nextn_predict_layers=0,
    initializer_range=0.02,
)

HELD_OUT_SEED = 20261130
TOKENIZER_CORPUS = 20000


def render(messages):
    """The chat template applied in Python (same layout as CHAT_TEMPLATE) with the generation prompt."""
    text = BOS + "".join(m["content"] for m in messages if m["role"] == "system")
    for m in messages:
        if m["role"] == "user":
            text += USER + m["content"]
        elif m["role"] == "assistant":
            text += ASSISTANT + m["content"].split(END_THINK)[-1].lstrip() + EOS
    return text + ASSISTANT + THINK + "\n"


def random_conversation(rng, held_out):
    """(messages so far, reply): mostly single questions, some follow-ups after earlier turns."""
    turns = 1 if rng.random() < 0.8 else rng.randint(2, 3)
    messages = []
    for t in range(turns):
        if rng.random() < 0.02:
            prompt, reply = rng.choice(tasks.GREETINGS), tasks.greeting_reply()
        else:
            while True:
                p = tasks.random_problem(rng)
                if p.key not in held_out:
                    break
            prompt, reply = p.prompt, tasks.reply(p)
        messages.append({"role": "user", "content": prompt})
        if t < turns - 1:
            messages.append({"role": "assistant", "content": reply})
    return messages, reply


def build_tokenizer(rng, held_out, vocab_size):
    tok = Tokenizer(models.BPE())
    # digits stay single (with their leading space), as arithmetic needs one token per digit
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r" ?\d"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([t for t in SPECIAL_TOKENS if t not in (THINK, END_THINK)])
    corpus = []
    for _ in range(TOKENIZER_CORPUS):
        messages, reply = random_conversation(rng, held_out)
        corpus.append(" ".join(m["content"] for m in messages) + " " + reply)
    corpus += tasks.GREETINGS + [tasks.GREETING_ANSWER]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok


def tokenizer_files(tok, out):
    data = json.loads(tok.to_str())
    for added in data["added_tokens"]:
        added["special"] = added["content"] not in (THINK, END_THINK)
    (out / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MODEL_CONFIG["max_position_embeddings"],
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n")


class BalanceTracker:
    """DeepSeek-V3's auxiliary-loss-free balancing: after each step, nudge every router's
    e_score_correction_bias up for under-loaded experts and down for over-loaded ones."""

    def __init__(self, model, speed):
        self.speed = speed
        self.routers = [m for m in model.modules() if type(m).__name__ == "DeepseekV3TopkRouter"]
        self.counts = {id(r): torch.zeros(r.num_experts) for r in self.routers}
        for r in self.routers:
            r.register_forward_hook(self.hook)

    def hook(self, module, _inputs, output):
        if module.training:
            indices = output[2].reshape(-1)
            self.counts[id(module)] += torch.bincount(indices, minlength=module.num_experts).float()

    @torch.no_grad()
    def update(self):
        imbalance = 0.0
        for r in self.routers:
            c = self.counts[id(r)]
            r.e_score_correction_bias += self.speed * torch.sign(c.mean() - c)
            imbalance = max(imbalance, (c.max() / c.mean().clamp(min=1)).item())
            c.zero_()
        return imbalance


def batch_tensors(examples, pad_id):
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (ids, prompt_len) in enumerate(examples):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, prompt_len : len(ids)] = torch.tensor(ids[prompt_len:])
        mask[i, : len(ids)] = 1
    return input_ids, labels, mask


def encode_example(tok, messages, reply):
    prompt_ids = tok.encode(render(messages), add_special_tokens=False).ids
    reply_ids = tok.encode(reply, add_special_tokens=False).ids + [tok.token_to_id(EOS)]
    return prompt_ids + reply_ids, len(prompt_ids)


@torch.no_grad()
def greedy_replies(model, tok, prompts, max_new_tokens, batch_size=50):
    """Greedy continuations with transformers (left-padded batches), decoded with special tokens."""
    model.eval()
    pad_id, eos_id = tok.token_to_id(PAD), tok.token_to_id(EOS)
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = [tok.encode(render([{"role": "user", "content": p}]), add_special_tokens=False).ids for p in
                 prompts[start : start + batch_size]]
        width = max(len(c) for c in chunk)
        ids = torch.tensor([[pad_id] * (width - len(c)) + c for c in chunk])
        mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in chunk])
        gen = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
            eos_token_id=eos_id,
        )
        for row in gen[:, width:].tolist():
            if eos_id in row:
                row = row[: row.index(eos_id)]
            out.append(row)
    return out


def evaluate(model, tok, problems, max_new_tokens=256):
    replies = greedy_replies(model, tok, [p.prompt for p in problems], max_new_tokens)
    rows, correct = [], 0
    for p, ids in zip(problems, replies):
        text = tok.decode(ids, skip_special_tokens=False)
        answer = tasks.parse_answer(text.split(END_THINK)[-1]) if END_THINK in text else None
        correct += answer == p.answer
        rows.append(dict(kind=p.kind, prompt=p.prompt, answer=p.answer, reply_token_ids=ids, reply=text,
                         parsed=answer))
    return correct / len(problems), rows


def write_card(out):
    """The model card, from training_log.json and (when measured) r1serve_eval.json."""
    log = json.loads((out / "training_log.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    measured = out / "r1serve_eval.json"
    r1 = json.loads(measured.read_text()) if measured.exists() else None
    rp = cfg["rope_parameters"]
    pct = lambda x: f"{100 * x:.1f} %"  # noqa: E731
    losses = ", ".join(f"{e['step']}: {e['loss']}" for e in log["log"] if e["step"] % 600 == 0 or e is log["log"][-1])
    kinds = ", ".join(f"{k} {pct(v)}" for k, v in log["per_kind_accuracy"].items())
    lines = [
        "# r1-tiny",
        "",
        "r1serve's embedded default model: a miniature DeepSeek-V3/R1-architecture reasoning model that the",
        "project trains itself, from nothing, on generated arithmetic. It thinks column by column inside",
        "`<think>…</think>` and then answers. It exists so that a fresh clone can run r1serve's real job",
        "offline; it knows nothing but whole-number addition, subtraction and multiplication by one digit.",
        "",
        "Licence: Apache-2.0 (same as r1serve). No third-party data or weights: the training data is",
        "generated by `tools/train_r1_tiny/tasks.py`.",
        "",
        "## Architecture (`DeepseekV3ForCausalLM`, BF16 safetensors)",
        "",
        f"- {log['parameters'] / 1e6:.2f}M parameters, vocabulary {cfg['vocab_size']}, hidden size {cfg['hidden_size']},"
        f" {cfg['num_hidden_layers']} layers (layer 0 dense, intermediate {cfg['intermediate_size']}).",
        f"- MLA: {cfg['num_attention_heads']} heads, q LoRA rank {cfg['q_lora_rank']}, kv LoRA rank"
        f" {cfg['kv_lora_rank']}, qk nope {cfg['qk_nope_head_dim']} + rope {cfg['qk_rope_head_dim']}, v {cfg['v_head_dim']}.",
        f"- DeepSeekMoE: {cfg['n_routed_experts']} routed experts (intermediate {cfg['moe_intermediate_size']}) in"
        f" {cfg['n_group']} groups, top-{cfg['topk_group']} groups, {cfg['num_experts_per_tok']} experts per token,"
        f" sigmoid scores with `e_score_correction_bias` (noaux_tc), routed scaling {cfg['routed_scaling_factor']},"
        f" {cfg['n_shared_experts']} shared expert.",
        f"- YaRN rope: factor {rp['factor']}, original context {rp['original_max_position_embeddings']},"
        f" context {cfg['max_position_embeddings']}.",
        "",
        "## Tokenizer",
        "",
        f"Byte-level BPE with {cfg['vocab_size']} tokens trained on the generated data; every digit is its own",
        "token (with its leading space). R1's special tokens `<｜begin▁of▁sentence｜>`, `<｜end▁of▁sentence｜>`,",
        "`<｜User｜>`, `<｜Assistant｜>`, `<think>`, `</think>` (the last two are plain added tokens, as in R1).",
        "The chat template in `tokenizer_config.json` is R1-style: earlier turns' reasoning is not sent",
        "back, and the generation prompt ends with `<｜Assistant｜><think>\\n`.",
        "",
        "## Task and data",
        "",
        "Each example is a request in one of seven phrasings per operation (\"What is 347 + 589?\",",
        "\"Subtract 12 from 90.\", \"Multiply 128 by 7.\", …) with operands of 1–3 digits (the number",
        "of digits uniform, then the value); multiplication has one single-digit factor. The reply",
        "restates the problem, works one column per line from the right (digits, carries or borrows; for",
        "a negative difference it subtracts the other way round and adds the sign), lists the digits",
        "written and reads the result off, then closes the thinking and answers `a op b = result`.",
        "20 % of examples are 2–3 turn conversations (loss on the last reply only); 2 % are greetings",
        "answered with a short self-description. Held-out problems (all phrasings of them) never occur",
        "in training.",
        "",
        "## Training",
        "",
        "```sh",
        "pip install -r tools/train_r1_tiny/requirements.txt",
        "python3 tools/train_r1_tiny/train.py            # writes models/r1-tiny/",
        "```",
        "",
        f"transformers {log['transformers']} `DeepseekV3ForCausalLM`, torch {log['torch']}, {log['threads']} CPU threads,"
        f" seed {log['seed']}: {log['steps']} steps of {log['batch']} conversations, AdamW (β 0.9/0.98, weight decay",
        f"0.01 on matrices), peak learning rate {log['peak_lr']} with linear warm-up and cosine decay to 10 %,",
        "gradient clipping 1.0, f32; stored in BF16. Experts are balanced without an auxiliary loss, as in",
        "DeepSeek-V3: after each step every router's correction bias moves by 0.001 towards the",
        "under-loaded experts.",
        f"Training took {log['train_minutes']} minutes, the whole command {log['total_minutes']} minutes.",
        f"Mean loss per reply token by step: {losses}.",
        "",
        "## Evaluation",
        "",
        f"{log['held_out_problems']} held-out problems (`held_out.jsonl`, balanced over the three operations),",
        "greedy decoding, answer = the integer after the last `=` of the text after `</think>`.",
        "",
        f"- transformers on the stored BF16 weights (upcast to f32): {pct(log['transformers_accuracy'])} ({kinds}).",
    ]
    if r1:
        lines += [
            f"- r1serve (`r1serve eval --problems models/r1-tiny/held_out.jsonl`): {pct(r1['accuracy'])} correct;"
            f" agreement with transformers: {pct(r1['answer_agreement'])} of answers,"
            f" {pct(r1['token_agreement'])} of replies token for token.",
        ]
    lines += [
        "",
        "`held_out.jsonl` keeps transformers' greedy reply (text and token ids) for every problem; the",
        "test suite runs all of them through r1serve and checks accuracy and agreement.",
        "",
    ]
    (out / "README.md").write_text("\n".join(lines))


def lr_at(step, steps, peak, warmup):
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="models/r1-tiny")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3600)
    ap.add_argument("--batch", type=int, default=48)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=150)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--held-out", type=int, default=300, help="held-out problems evaluated at the end")
    ap.add_argument("--eval-every", type=int, default=0, help="quick evaluation on 60 held-out problems")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--card-only", action="store_true", help="rewrite README.md from the logs and stop")
    args = ap.parse_args()
    if args.card_only:
        write_card(Path(args.out))
        return

    started = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    held_out_problems = tasks.held_out_problems(HELD_OUT_SEED, args.held_out)
    held_out = {p.key for p in held_out_problems}
    tok = build_tokenizer(random.Random(args.seed + 1), held_out, args.vocab)
    tokenizer_files(tok, out)
    pad_id = tok.token_to_id(PAD)
    print(f"tokenizer: {tok.get_vocab_size()} tokens", flush=True)

    config = DeepseekV3Config(
        vocab_size=tok.get_vocab_size(),
        bos_token_id=tok.token_to_id(BOS),
        eos_token_id=tok.token_to_id(EOS),
        pad_token_id=pad_id,
        **MODEL_CONFIG,
    )
    config._attn_implementation = "sdpa"
    model = DeepseekV3ForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters", flush=True)
    balance = BalanceTracker(model, speed=1e-3)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.98),
    )

    log = []
    window_loss, window_tokens, window_start = 0.0, 0, time.time()
    for step in range(args.steps):
        model.train()
        examples = [encode_example(tok, *random_conversation(rng, held_out)) for _ in range(args.batch)]
        input_ids, labels, mask = batch_tensors(examples, pad_id)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        imbalance = balance.update()
        window_loss += loss.item()
        window_tokens += int(mask.sum())
        if (step + 1) % 50 == 0:
            elapsed = time.time() - window_start
            entry = dict(step=step + 1, loss=round(window_loss / 50, 4), max_expert_load=round(imbalance, 2),
                         tokens_per_s=round(window_tokens / elapsed), minutes=round((time.time() - started) / 60, 1))
            if args.eval_every and (step + 1) % args.eval_every == 0:
                entry["quick_accuracy"], _ = evaluate(model, tok, held_out_problems[:60])
            log.append(entry)
            print(json.dumps(entry), flush=True)
            window_loss, window_tokens, window_start = 0.0, 0, time.time()
    train_minutes = (time.time() - started) / 60

    # Store in BF16 and evaluate exactly the stored values (upcast to f32), as r1serve will read them.
    model = model.to(torch.bfloat16)
    model.generation_config.do_sample = False
    model.generation_config.max_new_tokens = 512
    model.save_pretrained(out)
    stored = DeepseekV3ForCausalLM.from_pretrained(out, dtype=torch.float32)
    accuracy, rows = evaluate(stored, tok, held_out_problems)
    with open(out / "held_out.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    per_kind = {k: sum(r["parsed"] == r["answer"] for r in rows if r["kind"] == k) /
                max(1, sum(r["kind"] == k for r in rows)) for k in tasks.KINDS}
    summary = dict(
        seed=args.seed, steps=args.steps, batch=args.batch, peak_lr=args.lr, parameters=n_params,
        vocab=tok.get_vocab_size(), train_minutes=round(train_minutes, 1),
        total_minutes=round((time.time() - started) / 60, 1), threads=args.threads,
        torch=torch.__version__, transformers=transformers.__version__,
        held_out_problems=len(rows), transformers_accuracy=accuracy, per_kind_accuracy=per_kind,
        final_loss=log[-1]["loss"] if log else None, log=log,
    )
    (out / "training_log.json").write_text(json.dumps(summary, indent=1) + "\n")
    write_card(out)
    print(json.dumps({k: v for k, v in summary.items() if k != "log"}), flush=True)


if __name__ == "__main__":
    main()

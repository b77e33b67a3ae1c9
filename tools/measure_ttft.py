#!/usr/bin/env python3
"""Time to first token of a running r1serve (or any OpenAI-compatible) server.

Usage:  python3 tools/measure_ttft.py [--url http://127.0.0.1:8000] [--prompt-tokens 512] [--runs 5]

Each run streams a /v1/completions request whose prompt is `--prompt-tokens` random token ids
(a fresh prompt per run, so the prefix cache cannot help) and times the arrival of the first
chunk that carries a token. Prints one JSON object with every run and the median, in ms.
Standard library only.
"""

import argparse
import http.client
import json
import random
import statistics
import time
import urllib.parse


def first_token_ms(url, model, prompt_ids):
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=600)
    body = json.dumps(
        {"model": model, "prompt": prompt_ids, "max_tokens": 1, "stream": True, "temperature": 0}
    )
    start = time.perf_counter()
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise SystemExit(f"server answered {response.status}: {response.read()[:500]!r}")
    for raw in response:
        line = raw.decode().strip()
        if line.startswith("data: ") and line != "data: [DONE]":
            chunk = json.loads(line[len("data: "):])
            if chunk.get("choices"):
                elapsed = (time.perf_counter() - start) * 1000
                conn.close()
                return elapsed
    raise SystemExit("the stream ended without a token")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--vocab", type=int, default=1000, help="ids are drawn from [100, vocab)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    parts = urllib.parse.urlsplit(args.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=60)
    conn.request("GET", "/v1/models")
    model = json.loads(conn.getresponse().read())["data"][0]["id"]
    conn.close()

    rng = random.Random(args.seed)
    runs = []
    for _ in range(args.runs):
        prompt = [rng.randrange(100, args.vocab) for _ in range(args.prompt_tokens)]
        runs.append(round(first_token_ms(args.url, model, prompt), 1))
    print(json.dumps({"prompt_tokens": args.prompt_tokens, "ttft_ms": runs, "median_ms": statistics.median(runs)}))


if __name__ == "__main__":
    main()

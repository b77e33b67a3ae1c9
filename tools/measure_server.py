#!/usr/bin/env python3
"""Serving speed of a running r1serve (or any OpenAI-compatible) server.

Usage:
  python3 tools/measure_server.py ttft [--url URL] [--prompt-tokens 512] [--runs 5]
  python3 tools/measure_server.py streams [--url URL] [--streams 8] [--max-tokens 64]

`ttft`: each run streams a /v1/completions request whose prompt is `--prompt-tokens` random token
ids (a fresh prompt per run, so the prefix cache cannot help) and times the arrival of the first
chunk that carries a token; prints every run and the median, in ms.
`streams`: decode speed of one stream alone, then of `--streams` concurrent ones (short distinct
prompts, `ignore_eos`, `--max-tokens` each) counted only while all of them decode, tokens taken
from each chunk's `logprobs` (the server must return them); prints both aggregate tokens/s and
their ratio.
Standard library only.
"""

import argparse
import http.client
import json
import random
import selectors
import socket
import statistics
import time
import urllib.parse


def token_arrivals(url, request):
    """Streams a /v1/completions request; yields the arrival time of each chunk with a token."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=600)
    body = json.dumps(dict(request, stream=True, temperature=0))
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise SystemExit(f"server answered {response.status}: {response.read()[:500]!r}")
    try:
        for raw in response:
            line = raw.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]" and json.loads(line[6:]).get("choices"):
                yield time.perf_counter()
    finally:
        conn.close()


def first_token_ms(url, model, prompt_ids):
    start = time.perf_counter()
    for arrival in token_arrivals(url, {"model": model, "prompt": prompt_ids, "max_tokens": 1}):
        return (arrival - start) * 1000
    raise SystemExit("the stream ended without a token")


def decode_tokens_per_s(url, model, prompts, max_tokens):
    """Aggregate decode tokens/s of all `prompts` sent at once, while all of them are decoding.

    One thread reads every stream through `selectors`: the client shares the machine's cores
    with the server, and a heavier one (a thread per stream) falls behind the server at 8 streams
    and then measures its own speed. Tokens are counted from each chunk's `logprobs.tokens`, not
    per chunk: a chunk can carry several tokens (text held back until a character is complete).
    """
    parts = urllib.parse.urlsplit(url)
    selector = selectors.DefaultSelector()
    arrivals = [[] for _ in prompts]
    buffers = [b"" for _ in prompts]
    for i, prompt in enumerate(prompts):
        body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True,
                           "stream": True, "temperature": 0, "logprobs": 0}).encode()
        sock = socket.create_connection((parts.hostname, parts.port or 80), timeout=600)
        head = (f"POST /v1/completions HTTP/1.1\r\nHost: {parts.hostname}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        sock.sendall(head + body)
        selector.register(sock, selectors.EVENT_READ, i)
    open_streams = len(prompts)
    while open_streams:
        for key, _ in selector.select():
            i = key.data
            data = key.fileobj.recv(1 << 16)
            now = time.perf_counter()
            if not data:
                selector.unregister(key.fileobj)
                key.fileobj.close()
                open_streams -= 1
                continue
            buffers[i] += data
            # chunked transfer framing sits between events, never inside "data: {": count whole
            # events (each token's chunk), leave a partial one in the buffer
            *events, buffers[i] = buffers[i].split(b"\n\n")
            for event in events:
                at = event.find(b"data: {")
                if at >= 0:
                    for choice in json.loads(event[at + 6:]).get("choices", []):
                        arrivals[i] += [now] * len((choice.get("logprobs") or {}).get("tokens") or [])
    if any(not a for a in arrivals):
        raise SystemExit("a stream ended without a token")
    # steady state: only while every stream is decoding (after the last first token, before the
    # first last token), so neither the staggered prefills nor the stragglers count
    start, end = max(a[0] for a in arrivals), min(a[-1] for a in arrivals)
    tokens = sum(sum(1 for t in a if start < t <= end) for a in arrivals)
    return tokens / (end - start)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["ttft", "streams"])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
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
    if args.mode == "streams":
        prompt = lambda: [rng.randrange(100, args.vocab) for _ in range(16)]  # noqa: E731
        decode_tokens_per_s(args.url, model, [prompt()], 8)  # warm-up: first touch of mapped weights
        one = decode_tokens_per_s(args.url, model, [prompt()], args.max_tokens)
        many = decode_tokens_per_s(args.url, model, [prompt() for _ in range(args.streams)], args.max_tokens)
        print(json.dumps({"streams": args.streams, "one_stream_tps": round(one, 2),
                          "aggregate_tps": round(many, 2), "ratio": round(many / one, 2)}))
        return
    runs = []
    for _ in range(args.runs):
        prompt = [rng.randrange(100, args.vocab) for _ in range(args.prompt_tokens)]
        runs.append(round(first_token_ms(args.url, model, prompt), 1))
    print(json.dumps({"prompt_tokens": args.prompt_tokens, "ttft_ms": runs, "median_ms": statistics.median(runs)}))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Talks to a running r1serve server with the official `openai` client.

Run by crates/server/tests/python.rs against a server it starts (a tiny reasoning fixture model):
a streamed chat whose reasoning arrives as `delta.reasoning_content` before the answer, a
non-streamed completion with echo and log-probabilities, and an error mapped to the client's
exception type. Exits 0 on success, 77 when the `openai` package is missing, 1 on a failure.
"""

import argparse
import sys


def delta_field(delta, name):
    """A field the OpenAI types do not declare: an attribute, else in model_extra."""
    value = getattr(delta, name, None)
    if value is None:
        value = (getattr(delta, "model_extra", None) or {}).get(name)
    return value


def check(condition, message):
    if not condition:
        raise AssertionError(message)


def streamed_chat(client, model):
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Why is the sky blue?"}],
        stream=True,
        max_tokens=24,
        temperature=0,
        stream_options={"include_usage": True},
        extra_body={"thinking_budget": 6, "ignore_eos": True},
    )
    reasoning, content, order, finish, usage = [], [], [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            r = delta_field(choice.delta, "reasoning_content")
            if r:
                reasoning.append(r)
                order.append("reasoning")
            if choice.delta.content:
                content.append(choice.delta.content)
                order.append("content")
            if choice.finish_reason is not None:
                finish = choice.finish_reason
    check(reasoning, "no reasoning_content deltas")
    check("content" in order, f"no content deltas: {order}")
    first_content = order.index("content")
    check("reasoning" not in order[first_content:], f"reasoning after content: {order}")
    check(finish == "length", f"finish_reason {finish!r}")
    check(usage is not None and usage.completion_tokens == 24, f"usage {usage}")
    details = usage.completion_tokens_details
    check(details is not None and details.reasoning_tokens > 6, f"reasoning tokens {details}")
    text = "".join(reasoning)
    check("think>" not in text, f"markers left in the reasoning: {text!r}")
    print(f"stream: {len(reasoning)} reasoning deltas, {len(content)} content deltas, usage {usage.to_dict()}")


def completion(client, model):
    reply = client.completions.create(
        model=model, prompt="The quick", max_tokens=5, temperature=0, logprobs=2, echo=True
    )
    choice = reply.choices[0]
    check(choice.text.startswith("The quick"), f"echo missing: {choice.text!r}")
    lp = choice.logprobs
    prompt_tokens = reply.usage.prompt_tokens
    check(len(lp.tokens) == prompt_tokens + 5, f"{len(lp.tokens)} logprob tokens for {prompt_tokens} + 5")
    check(lp.token_logprobs[0] is None, "the first prompt token has a log-probability")
    check(all(x is not None and x <= 0 for x in lp.token_logprobs[1:]), "bad log-probabilities")
    check(reply.usage.completion_tokens == 5, f"usage {reply.usage}")
    print(f"completion: {choice.text!r}, {len(lp.tokens)} scored tokens")


def errors(client, openai):
    try:
        client.completions.create(model="no-such-model", prompt="x", max_tokens=1)
    except openai.NotFoundError as e:
        check("no-such-model" in str(e), str(e))
    else:
        raise AssertionError("an unknown model was accepted")
    try:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], n=0)
    except openai.BadRequestError as e:
        check("n must be" in str(e), str(e))
    else:
        raise AssertionError("n=0 was accepted")
    print("errors: 404 and 400 mapped to the client's exceptions")


MODEL = ""


def main():
    global MODEL
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--model", required=True)
    parser.add_argument("--api-key", default="unused")
    args = parser.parse_args()
    MODEL = args.model
    try:
        import openai
    except ImportError:
        print("SKIP: the `openai` package is not installed (python3 -m pip install openai)")
        return 77
    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0, timeout=60)
    try:
        streamed_chat(client, args.model)
        completion(client, args.model)
        errors(client, openai)
    except AssertionError as e:
        print(f"FAIL: {e}")
        return 1
    print(f"OK (openai {openai.__version__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

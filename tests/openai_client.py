"""Drives `tulu serve` with the official `openai` Python client (run by tests/server.rs).

Usage: python openai_client.py CONFIG_JSON
CONFIG_JSON holds base_url, model, question, prompt, max_tokens, and the greedy outputs
`tulu generate` printed for them (expected_chat, expected_completion). Every check is an
assert; the first failure exits non-zero with a message tests/server.rs shows.
"""

import json
import sys

import openai
from openai import OpenAI


def main() -> None:
    cfg = json.loads(sys.argv[1])
    # No retries: a 429 or 5xx must surface, not be hidden by the client's backoff.
    client = OpenAI(base_url=cfg["base_url"] + "/v1", api_key="unused", max_retries=0, timeout=120)
    model, max_tokens = cfg["model"], cfg["max_tokens"]
    messages = [{"role": "user", "content": cfg["question"]}]

    ids = [m.id for m in client.models.list().data]
    assert ids == [model], f"models: {ids}"

    # Chat, whole: greedy equals `tulu generate --chat`.
    chat = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=max_tokens)
    choice = chat.choices[0]
    assert choice.message.role == "assistant", choice
    assert choice.message.content == cfg["expected_chat"], (choice.message.content, cfg["expected_chat"])
    assert choice.finish_reason in ("stop", "length"), choice.finish_reason
    assert chat.object == "chat.completion" and chat.id.startswith("chatcmpl-") and chat.model == model
    assert chat.usage.completion_tokens >= 1 and chat.usage.prompt_tokens >= 1, chat.usage
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens

    # Chat, streamed, with usage in a final chunk.
    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        temperature=0,
        max_tokens=max_tokens,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant", chunks[0]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == cfg["expected_chat"], (text, cfg["expected_chat"])
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [choice.finish_reason], finishes
    assert chunks[-1].choices == [] and chunks[-1].usage is not None, chunks[-1]
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens, chunks[-1].usage
    assert all(c.usage is None for c in chunks[:-1])

    # Completions, whole and streamed: greedy equals `tulu generate`.
    comp = client.completions.create(model=model, prompt=cfg["prompt"], temperature=0, max_tokens=max_tokens)
    assert comp.choices[0].text == cfg["expected_completion"], (comp.choices[0].text, cfg["expected_completion"])
    assert comp.object == "text_completion"
    stream = client.completions.create(
        model=model, prompt=cfg["prompt"], temperature=0, max_tokens=max_tokens, stream=True
    )
    text = "".join(c.choices[0].text for c in stream)
    assert text == cfg["expected_completion"], (text, cfg["expected_completion"])

    # n with a seed: n choices, reproducible, each choice i seeded seed + i.
    def sampled(seed):
        r = client.completions.create(
            model=model, prompt=cfg["prompt"], temperature=1.0, max_tokens=6, n=3, seed=seed
        )
        assert [c.index for c in r.choices] == [0, 1, 2], r.choices
        return [c.text for c in r.choices]

    first, again = sampled(11), sampled(11)
    assert first == again, (first, again)
    shifted = sampled(12)
    assert shifted[:2] == first[1:], (first, shifted)

    # Log-probabilities: one entry per generated token, with the alternatives asked for.
    chat = client.chat.completions.create(
        model=model, messages=messages, temperature=0, max_tokens=5, logprobs=True, top_logprobs=2
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens, (len(content), chat.usage)
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content), content
    # Greedy: the chosen token is the likeliest.
    assert all(t.top_logprobs[0].token == t.token for t in content), content
    comp = client.completions.create(model=model, prompt=cfg["prompt"], temperature=0, max_tokens=4, logprobs=1)
    lp = comp.choices[0].logprobs
    assert "".join(lp.tokens) == comp.choices[0].text and len(lp.token_logprobs) == 4, lp

    # A stop string ends the answer before it.
    words = cfg["expected_completion"].split()
    if len(words) >= 2:
        stop = words[1]
        comp = client.completions.create(
            model=model, prompt=cfg["prompt"], temperature=0, max_tokens=max_tokens, stop=[stop]
        )
        c = comp.choices[0]
        assert c.finish_reason == "stop" and stop not in c.text, c
        assert cfg["expected_completion"].startswith(c.text), (c.text, cfg["expected_completion"])

    # Errors surface as the client's typed exceptions, naming the parameter.
    try:
        client.chat.completions.create(model=model, messages=messages, temperature=5)
        raise AssertionError("temperature=5 was accepted")
    except openai.BadRequestError as e:
        assert e.status_code == 400 and e.body["param"] == "temperature", e.body
    try:
        client.chat.completions.create(model="no-such-model", messages=messages, max_tokens=2)
        raise AssertionError("an unknown model was accepted")
    except openai.NotFoundError as e:
        assert e.status_code == 404, e
    print("openai client: all checks passed")


if __name__ == "__main__":
    main()

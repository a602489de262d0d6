"""Structured outputs of `tulu serve` through the official `openai` client (run by
tests/structured.rs): every json_schema answer validates under its schema with the `jsonschema`
package (not tulu's code), across prompts and seeds; regex and choice hold; streaming gives the
text the whole answer gives; a schema that cannot be compiled is a 400 naming its field.

Tool calls: SmolLM2 served with Llama 3.1's chat template passed per request (`chat_template`),
since its own template has no tool section (which is a 400 naming `tools`).

Usage: python openai_structured.py CONFIG_JSON   (base_url, model, llama31_template)
"""

import json
import re
import sys

import jsonschema
import openai
from openai import OpenAI

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "population": {"type": "integer", "minimum": 1, "maximum": 50000000},
        "rating": {"type": "number", "minimum": 0, "maximum": 5},
        "kind": {"enum": ["capital", "port", "village"]},
        "districts": {
            "type": "array",
            "maxItems": 2,
            "items": {
                "type": "object",
                "properties": {"name": {"type": "string", "maxLength": 12}, "big": {"type": "boolean"}},
                "required": ["name", "big"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["city", "population", "rating", "kind", "districts"],
    "additionalProperties": False,
}


def main() -> None:
    cfg = json.loads(sys.argv[1])
    client = OpenAI(base_url=cfg["base_url"] + "/v1", api_key="unused", max_retries=0, timeout=300)
    model = cfg["model"]

    def chat(question, **kw):
        return client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}], **kw)

    fmt = {"type": "json_schema", "json_schema": {"name": "city", "strict": True, "schema": SCHEMA}}
    prompts = ["Describe Paris as JSON.", "Tell me about a small fishing town."]
    # n = 2 seeded choices per prompt, sampled: every finished one validates.
    finished = 0
    for i, question in enumerate(prompts):
        r = chat(question, response_format=fmt, temperature=0.8, seed=i, n=2, max_tokens=120)
        for c in r.choices:
            if c.finish_reason == "stop":
                jsonschema.validate(json.loads(c.message.content), SCHEMA)
                finished += 1
            else:
                assert c.finish_reason == "length", c
    assert finished >= 2, f"only {finished} of {2 * len(prompts)} answers finished within 120 tokens"

    # Greedy: whole and streamed give the same, valid text.
    whole = chat(prompts[0], response_format=fmt, temperature=0, max_tokens=120).choices[0]
    assert whole.finish_reason == "stop", whole
    jsonschema.validate(json.loads(whole.message.content), SCHEMA)
    stream = chat(prompts[0], response_format=fmt, temperature=0, max_tokens=120, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert streamed == whole.message.content, (streamed, whole.message.content)

    # Any JSON object.
    obj = chat("Give me some JSON.", response_format={"type": "json_object"}, temperature=0, max_tokens=60)
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(obj.choices[0].message.content), dict), obj

    # vLLM's fields: regex and choice, on both endpoints.
    for seed in range(2):
        r = chat("Give me a code.", extra_body={"structured_outputs": {"regex": "[A-Z]{2}-[0-9]{3}"}}, temperature=1.0, seed=seed, max_tokens=20)
        assert re.fullmatch("[A-Z]{2}-[0-9]{3}", r.choices[0].message.content), r.choices[0].message.content
        r = chat("Is water wet?", extra_body={"guided_choice": ["yes", "no", "maybe"]}, temperature=1.0, seed=seed)
        assert r.choices[0].message.content in ("yes", "no", "maybe"), r.choices[0].message.content
    comp = client.completions.create(
        model=model, prompt="The answer is", max_tokens=10, temperature=0, extra_body={"guided_choice": ["A", "B"]}
    )
    assert comp.choices[0].text in ("A", "B"), comp.choices[0].text
    lark = 'start: "It is " word "."\nword: "red" | "blue"'
    r = chat("What colour is the sky?", extra_body={"guided_grammar": lark}, temperature=0, max_tokens=20)
    assert r.choices[0].message.content in ("It is red.", "It is blue."), r.choices[0].message.content

    # Schemas and regexes that cannot be compiled: 400 naming the field.
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}
    for kw, param in [
        ({"response_format": bad}, "response_format.json_schema.schema"),
        ({"extra_body": {"structured_outputs": {"regex": "(unclosed"}}}, "structured_outputs.regex"),
        ({"extra_body": {"guided_json": "{not json"}}, "guided_json"),
    ]:
        try:
            chat("x", max_tokens=5, **kw)
        except openai.BadRequestError as e:
            assert e.status_code == 400 and e.body.get("param") == param, (e.status_code, e.body)
        else:
            raise AssertionError(f"{kw} was accepted")
    tool_calls(client, model, cfg["llama31_template"])
    print("structured outputs: ok")


WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "Time in a city", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"],
        "additionalProperties": False}}},
]


def accumulate(chunks):
    """The (name, arguments) of each streamed call, as OpenAI's clients add up the deltas: the
    first delta of an index carries the name, every later one appends arguments text."""
    calls = {}
    for ch in chunks:
        for d in (ch.choices[0].delta.tool_calls or []) if ch.choices else []:
            name, args = calls.get(d.index, (None, ""))
            calls[d.index] = (name or d.function.name, args + (d.function.arguments or ""))
    return [calls[i] for i in sorted(calls)]


def tool_calls(client, model, template):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]

    def ask(**kw):
        return client.chat.completions.create(
            model=model, messages=messages, tools=TOOLS, temperature=0, max_tokens=80, extra_body={"chat_template": template}, **kw
        )

    for choice, name in [("required", None), ({"type": "function", "function": {"name": "get_time"}}, "get_time")]:
        c = ask(tool_choice=choice).choices[0]
        assert c.finish_reason == "tool_calls", c
        assert c.message.content is None and len(c.message.tool_calls) == 1, c.message
        call = c.message.tool_calls[0]
        assert call.type == "function" and call.id, call
        assert name is None or call.function.name == name, call
        schema = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}[call.function.name]
        jsonschema.validate(json.loads(call.function.arguments), schema)
        # Streamed: the same call, its arguments in several deltas the client adds up, and the
        # same finish.
        chunks = list(ask(tool_choice=choice, stream=True))
        deltas = [d for ch in chunks if ch.choices for d in (ch.choices[0].delta.tool_calls or [])]
        assert len(deltas) > 2 and {d.index for d in deltas} == {0}, deltas
        streamed = accumulate(chunks)
        assert [n for n, _ in streamed] == [call.function.name], (streamed, call)
        assert json.loads(streamed[0][1]) == json.loads(call.function.arguments), (streamed, call)
        finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
        assert finishes == ["tool_calls"], finishes
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == ""
    # auto: an answer or a call, either well formed.
    c = ask(tool_choice="auto").choices[0]
    assert (c.finish_reason == "tool_calls") == bool(c.message.tool_calls), c
    # auto, with the text forced (guided_choice) to Llama 3.1's form of two calls: parsed into
    # two tool_calls, whole and streamed (indices 0 and 1); one with parallel_tool_calls=False.
    two = (
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}; '
        '{"name": "get_time", "parameters": {"city": "Lyon"}}'
    )

    def forced(**kw):
        return client.chat.completions.create(
            model=model, messages=messages, tools=TOOLS, tool_choice="auto", temperature=0, max_tokens=80,
            extra_body={"chat_template": template, "guided_choice": [two]}, **kw
        )

    c = forced().choices[0]
    assert c.finish_reason == "tool_calls", c
    names = [(t.function.name, json.loads(t.function.arguments)) for t in c.message.tool_calls]
    expected = [("get_weather", {"city": "Paris", "unit": "celsius"}), ("get_time", {"city": "Lyon"})]
    assert names == expected, names
    assert len({t.id for t in c.message.tool_calls}) == 2, c.message.tool_calls
    chunks = list(forced(stream=True))
    streamed = [(n, json.loads(a)) for n, a in accumulate(chunks)]
    assert streamed == expected, streamed
    # Incremental: the openai SDK's own stream helper adds up the arguments deltas.
    with client.chat.completions.stream(
        model=model, messages=messages, tools=TOOLS, tool_choice="auto", temperature=0, max_tokens=80,
        extra_body={"chat_template": template, "guided_choice": [two]},
    ) as s:
        kinds = [e.type for e in s]
        final = s.get_final_completion()
    assert kinds.count("tool_calls.function.arguments.delta") > 4, kinds
    calls = final.choices[0].message.tool_calls
    assert [(t.function.name, json.loads(t.function.arguments)) for t in calls] == expected, calls
    c = forced(parallel_tool_calls=False).choices[0]
    assert [t.function.name for t in c.message.tool_calls] == ["get_weather"], c.message
    # none: the tools are not shown, and the answer is text.
    c = ask(tool_choice="none").choices[0]
    assert not c.message.tool_calls and c.finish_reason in ("stop", "length"), c
    # SmolLM2's own template has no tool section: a 400 naming `tools`.
    try:
        client.chat.completions.create(model=model, messages=messages, tools=TOOLS, max_tokens=5)
    except openai.BadRequestError as e:
        assert e.body.get("param") == "tools", e.body
    else:
        raise AssertionError("tools were accepted by a template without a tool section")


if __name__ == "__main__":
    main()

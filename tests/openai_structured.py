"""Structured outputs of `tulu serve` through the official `openai` client (run by
tests/structured.rs): every json_schema answer validates under its schema with the `jsonschema`
package (not tulu's code), across prompts and seeds; regex and choice hold; streaming gives the
text the whole answer gives; a schema that cannot be compiled is a 400 naming its field.

Usage: python openai_structured.py CONFIG_JSON   (base_url, model)
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
    prompts = ["Describe Paris as JSON.", "Tell me about a small fishing town.", "A city in Japan, as JSON."]
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
    assert finished >= 3, f"only {finished} of {2 * len(prompts)} answers finished within 120 tokens"

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
    for seed in range(3):
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
    print("structured outputs: ok")


if __name__ == "__main__":
    main()

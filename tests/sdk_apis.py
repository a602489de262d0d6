"""Drives `tulu serve`'s Responses and Messages APIs with the official `openai` and `anthropic`
Python clients (run by tests/server_apis.rs).

Usage: python sdk_apis.py CONFIG_JSON
CONFIG_JSON holds base_url, api_key, model, question, max_tokens, the greedy answer
`tulu generate --chat` printed for the question (expected_chat), and a chat template with a tool
section (chat_template: Llama 3.1's, as SmolLM2's own has none). Every check is an assert; the
first failure exits non-zero with a message tests/server_apis.rs shows.
"""

import json
import sys

import anthropic
from openai import OpenAI


def responses(cfg: dict) -> None:
    client = OpenAI(base_url=cfg["base_url"] + "/v1", api_key=cfg["api_key"], max_retries=0, timeout=120)
    model, max_tokens, expected = cfg["model"], cfg["max_tokens"], cfg["expected_chat"]

    # Whole: the same greedy answer as the chat path, in a message output item.
    r = client.responses.create(model=model, input=cfg["question"], temperature=0, max_output_tokens=max_tokens)
    assert r.object == "response" and r.id.startswith("resp") and r.model == model, r
    assert r.output_text == expected, (r.output_text, expected)
    assert r.status in ("completed", "incomplete"), r.status
    if r.status == "incomplete":
        assert r.incomplete_details.reason == "max_output_tokens", r.incomplete_details
    item = r.output[0]
    assert item.type == "message" and item.role == "assistant" and item.content[0].type == "output_text", item
    assert r.usage.input_tokens >= 1 and r.usage.output_tokens >= 1, r.usage
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens, r.usage
    assert r.store is False, r.store

    # The question as a list of input items (a message with an input_text part) is the same
    # conversation, so it gets the same answer.
    items = [{"role": "user", "content": [{"type": "input_text", "text": cfg["question"]}]}]
    again = client.responses.create(model=model, input=items, temperature=0, max_output_tokens=max_tokens)
    assert again.output_text == expected, (again.output_text, expected)

    # Streamed: the typed events in order, deltas adding up to the whole answer.
    stream = client.responses.create(
        model=model, input=cfg["question"], temperature=0, max_output_tokens=max_tokens, stream=True
    )
    events = list(stream)
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ], kinds
    final = "response.completed" if r.status == "completed" else "response.incomplete"
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        final,
    ], kinds
    assert [e.sequence_number for e in events] == list(range(len(events))), kinds
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == expected, (deltas, expected)
    assert events[-1].response.output_text == expected, events[-1].response
    assert events[-1].response.usage.output_tokens == r.usage.output_tokens, events[-1].response.usage


def messages(cfg: dict) -> None:
    # The anthropic client sends the key as `x-api-key`.
    client = anthropic.Anthropic(base_url=cfg["base_url"], api_key=cfg["api_key"], max_retries=0, timeout=120)
    model, max_tokens, expected = cfg["model"], cfg["max_tokens"], cfg["expected_chat"]
    question = [{"role": "user", "content": cfg["question"]}]
    # anthropic 2.x no longer has `temperature` as an argument (newer Claude models fix it);
    # the API still takes it, and tulu honours it, so greedy decoding goes in `extra_body`.
    greedy = {"temperature": 0}

    m = client.messages.create(model=model, max_tokens=max_tokens, messages=question, extra_body=greedy)
    assert m.type == "message" and m.role == "assistant" and m.model == model, m
    assert m.content[0].type == "text" and m.content[0].text == expected, (m.content, expected)
    assert m.stop_reason in ("end_turn", "max_tokens"), m.stop_reason
    assert m.usage.input_tokens >= 1 and m.usage.output_tokens >= 1, m.usage

    with client.messages.stream(model=model, max_tokens=max_tokens, messages=question, extra_body=greedy) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == expected, (text, expected)
    assert final.content[0].text == expected and final.stop_reason == m.stop_reason, final
    assert final.usage.output_tokens == m.usage.output_tokens, final.usage

    # A stop sequence the greedy answer contains ends it there, and is reported.
    words = expected.split()
    if len(words) >= 3:
        stop = " " + words[2]
        cut = client.messages.create(
            model=model, max_tokens=max_tokens, messages=question, extra_body=greedy, stop_sequences=[stop]
        )
        assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop, cut
        assert expected.startswith(cut.content[0].text) and stop not in cut.content[0].text, cut

    # A bad request is an Anthropic-shaped 400 naming the field.
    try:
        client.messages.create(model=model, max_tokens=max_tokens, messages=question, extra_body={"temperature": 1.5})
        raise AssertionError("temperature 1.5 was accepted")
    except anthropic.BadRequestError as e:
        assert e.body["type"] == "error" and e.body["error"]["type"] == "invalid_request_error", e.body
        assert "`temperature`" in e.body["error"]["message"], e.body


WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}},
    "required": ["city"],
    "additionalProperties": False,
}


def streamed_tools(cfg: dict) -> None:
    """A named tool's call streamed through each client's stream helper: the arguments arrive in
    several deltas that add up to the final call."""
    question = "Weather in Paris?"
    extra = {"chat_template": cfg["chat_template"]}
    client = OpenAI(base_url=cfg["base_url"] + "/v1", api_key=cfg["api_key"], max_retries=0, timeout=120)
    tool = {"type": "function", "name": "get_weather", "parameters": WEATHER, "strict": True}
    with client.responses.stream(
        model=cfg["model"],
        input=question,
        tools=[tool],
        tool_choice={"type": "function", "name": "get_weather"},
        temperature=0,
        max_output_tokens=60,
        extra_body=extra,
    ) as stream:
        events = list(stream)
        final = stream.get_final_response()
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    call = final.output[0]
    assert call.type == "function_call" and call.name == "get_weather", final.output
    assert call.call_id.startswith("call_") and call.status == "completed", call
    assert len(deltas) >= 3 and "".join(deltas) == call.arguments, (deltas, call.arguments)
    # The SDK parses a strict tool's arguments itself.
    assert isinstance(call.parsed_arguments["city"], str), call
    assert events[-1].type == "response.completed", [e.type for e in events]

    claude = anthropic.Anthropic(base_url=cfg["base_url"], api_key=cfg["api_key"], max_retries=0, timeout=120)
    request = dict(
        model=cfg["model"],
        max_tokens=60,
        messages=[{"role": "user", "content": question}],
        tools=[{"name": "get_weather", "description": "Weather in a city", "input_schema": WEATHER}],
        tool_choice={"type": "tool", "name": "get_weather"},
        extra_body={"temperature": 0, **extra},
    )
    with claude.messages.stream(**request) as stream:
        partial = [e.partial_json for e in stream if e.type == "input_json"]
        message = stream.get_final_message()
    block = message.content[0]
    assert block.type == "tool_use" and block.name == "get_weather", message.content
    assert message.stop_reason == "tool_use", message
    assert isinstance(block.input["city"], str) and block.id.startswith("toolu_"), block
    assert len(partial) >= 3 and json.loads("".join(partial)) == block.input, (partial, block.input)
    # The same greedy call, whole, is the same call.
    whole = claude.messages.create(**request)
    assert whole.content[0].input == block.input, (whole.content, block)


def main() -> None:
    cfg = json.loads(sys.argv[1])
    responses(cfg)
    messages(cfg)
    streamed_tools(cfg)
    print("ok")


if __name__ == "__main__":
    main()

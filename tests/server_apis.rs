//! `tulu serve`'s other APIs end to end, on SmolLM2: OpenAI's Responses API and Anthropic's
//! Messages API through their official Python clients (tests/sdk_apis.py, tool calls streamed
//! through their stream helpers included), vLLM's token-id
//! fields and `/tokenize` / `/detokenize` over raw HTTP, and each API's answer to bad requests.
//!
//! Tests take a lock and run one at a time: each starts its own server, and two CPU-bound
//! servers on a 2-core machine would only slow each other down.

mod common;

use std::process::Command;
use std::sync::{Mutex, MutexGuard};

use common::serve::{cli_generate, http, python, Server};
use serde_json::{json, Value};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

const KEY: &str = "sk-tulu-apis";

#[test]
fn openai_responses_and_anthropic_messages_clients_match_tulu_generate() {
    let _serial = serial();
    let python = python();
    let (question, max_tokens) = ("What is the capital of France?", 16);
    let expected_chat = cli_generate(question, true, max_tokens);
    assert!(!expected_chat.is_empty());
    let server = Server::start(&["--api-key", KEY]);
    let config = json!({
        "base_url": server.url(),
        "api_key": KEY,
        "model": server.model,
        "question": question,
        "max_tokens": max_tokens,
        "expected_chat": expected_chat,
        "chat_template": llama31_template(),
    });
    let out = Command::new(python)
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk_apis.py"))
        .arg(config.to_string())
        .output()
        .expect("run the SDK checks");
    let log = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "SDK checks failed:\n{log}");
}

#[test]
fn token_ids_round_trip_through_tokenize_detokenize_and_generation() {
    let _serial = serial();
    let server = Server::start(&[]);
    let question = "Name a color.";
    let messages = json!([{"role": "user", "content": question}]);
    let chat = json!({"model": server.model, "messages": messages, "temperature": 0, "max_tokens": 8,
                      "return_token_ids": true, "logprobs": true});
    let a = server.post("/v1/chat/completions", &chat);
    assert_eq!(a.status, 200, "{}", a.body);
    let a = a.json();
    // The prompt's ids are /tokenize's for the same messages.
    let t = server.post("/tokenize", &json!({"messages": messages}));
    assert_eq!(t.status, 200, "{}", t.body);
    let t = t.json();
    assert_eq!(a["prompt_token_ids"], t["tokens"], "{a}\n{t}");
    assert_eq!(t["count"].as_u64(), t["tokens"].as_array().map(|v| v.len() as u64));
    assert_eq!(t["max_model_len"], 1024);
    assert_eq!(a["usage"]["prompt_tokens"], t["count"]);
    // The answer's ids are the logprob tokens', and decode to its text.
    let ids = a["choices"][0]["token_ids"].as_array().expect("token_ids").clone();
    assert_eq!(ids.len() as u64, a["usage"]["completion_tokens"].as_u64().expect("usage"));
    let d = server.post("/detokenize", &json!({"tokens": ids})).json();
    let text = a["choices"][0]["message"]["content"].as_str().expect("content");
    assert!(d["prompt"].as_str().expect("prompt").starts_with(text), "{d} vs {text:?}");
    let lp = a["choices"][0]["logprobs"]["content"].as_array().expect("logprobs");
    for token in lp {
        let bytes: Vec<u8> =
            token["bytes"].as_array().expect("bytes").iter().map(|b| b.as_u64().unwrap_or(999) as u8).collect();
        assert_eq!(bytes, token["token"].as_str().expect("token").as_bytes(), "{token}");
    }
    // Streamed: the prompt's ids on the first chunk, the choice's on its last.
    let mut stream = chat.clone();
    stream["stream"] = json!(true);
    let r = http(&server.addr, "POST", "/v1/chat/completions", &[], stream.to_string().as_bytes());
    let chunks: Vec<Value> =
        r.events().iter().filter(|e| *e != "[DONE]").map(|e| serde_json::from_str(e).expect("JSON")).collect();
    assert_eq!(chunks[0]["prompt_token_ids"], t["tokens"]);
    let last = chunks.iter().rev().find(|c| !c["choices"][0]["finish_reason"].is_null()).expect("finish");
    assert_eq!(last["choices"][0]["token_ids"].as_array(), Some(&ids), "{last}");
    // Completions: both on the choice; /tokenize of the prompt agrees.
    let c =
        server.post("/v1/completions", &json!({"prompt": "Red, green and", "max_tokens": 4, "return_token_ids": true}));
    let c = c.json();
    let tp = server.post("/tokenize", &json!({"prompt": "Red, green and"})).json();
    assert_eq!(c["choices"][0]["prompt_token_ids"], tp["tokens"], "{c}");
    assert_eq!(c["choices"][0]["token_ids"].as_array().map(Vec::len), Some(4), "{c}");
    // Without the flag, none of vLLM's fields.
    let plain = server.post("/v1/completions", &json!({"prompt": "Red", "max_tokens": 2})).json();
    assert!(plain["choices"][0].get("token_ids").is_none() && plain.get("prompt_token_ids").is_none(), "{plain}");
    // return_token_strs gives each id's vocabulary string.
    let s = server.post("/tokenize", &json!({"prompt": "Red", "return_token_strs": true})).json();
    assert_eq!(s["token_strs"], json!(["Red"]), "{s}");
}

fn check_errors(server: &Server, path: &str, headers: &[(&str, &str)], cases: &[(Value, u16, &str)], anthropic: bool) {
    for (body, status, param) in cases {
        let r = http(&server.addr, "POST", path, headers, body.to_string().as_bytes());
        assert_eq!(r.status, *status, "{path} {body}: {}", r.body);
        let e = r.json();
        if anthropic {
            assert_eq!(e["type"], "error", "{e}");
            let message = e["error"]["message"].as_str().expect("message");
            assert!(message.contains(&format!("`{param}`")), "{path} {body}: {e}");
            assert!(e["error"]["type"].is_string(), "{e}");
        } else {
            assert_eq!(e["error"]["param"], *param, "{path} {body}: {e}");
            assert!(e["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{e}");
        }
    }
}

#[test]
fn bad_requests_to_each_api_get_4xx_naming_the_field() {
    let _serial = serial();
    let server = Server::start(&["--api-key", KEY]);
    let bearer = format!("Bearer {KEY}");
    let auth = [("Authorization", bearer.as_str())];
    let with = |base: &Value, extra: Value| {
        let mut b = base.clone();
        b.as_object_mut().expect("object").extend(extra.as_object().expect("object").clone());
        b
    };
    let resp = json!({"model": "smollm2", "input": "hi", "max_output_tokens": 2});
    let responses = [
        (json!({"model": "smollm2"}), 400, "input"),
        (with(&resp, json!({"input": []})), 400, "input"),
        (with(&resp, json!({"previous_response_id": "resp_123"})), 400, "previous_response_id"),
        (with(&resp, json!({"input": [{"role": "robot", "content": "x"}]})), 400, "input[0].role"),
        (with(&resp, json!({"max_output_tokens": 0})), 400, "max_output_tokens"),
        (with(&resp, json!({"temperature": 9})), 400, "temperature"),
        (with(&resp, json!({"stream": "yes"})), 400, "stream"),
        (
            with(&resp, json!({"text": {"format": {"type": "json_schema", "name": "x", "schema": 3}}})),
            400,
            "text.format.schema",
        ),
        (with(&resp, json!({"tools": [{"type": "web_search"}]})), 400, "tools[0].type"),
        (with(&resp, json!({"model": "gpt-5"})), 404, "model"),
        (with(&resp, json!({"max_output_tokens": 5000})), 400, "max_output_tokens"),
    ];
    check_errors(&server, "/v1/responses", &auth, &responses, false);
    let msg = json!({"model": "smollm2", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]});
    let x_api_key = [("x-api-key", KEY)];
    let messages = [
        (json!({"model": "smollm2", "messages": [{"role": "user", "content": "hi"}]}), 400, "max_tokens"),
        (with(&msg, json!({"messages": []})), 400, "messages"),
        (with(&msg, json!({"messages": [{"role": "system", "content": "x"}]})), 400, "messages[0].role"),
        (with(&msg, json!({"temperature": 1.5})), 400, "temperature"),
        (with(&msg, json!({"top_k": -1})), 400, "top_k"),
        (with(&msg, json!({"stop_sequences": "x"})), 400, "stop_sequences"),
        (with(&msg, json!({"system": 7})), 400, "system"),
        (with(&msg, json!({"model": "claude-opus"})), 404, "model"),
        (with(&msg, json!({"max_tokens": 5000})), 400, "max_tokens"),
    ];
    check_errors(&server, "/v1/messages", &x_api_key, &messages, true);
    // Without a key, Anthropic's shape on its route, OpenAI's elsewhere.
    let r = http(&server.addr, "POST", "/v1/messages", &[], msg.to_string().as_bytes());
    assert_eq!((r.status, r.json()["error"]["type"].clone()), (401, json!("authentication_error")), "{}", r.body);
    let r = http(&server.addr, "POST", "/v1/responses", &[("x-api-key", "wrong")], resp.to_string().as_bytes());
    assert_eq!((r.status, r.json()["error"]["code"].clone()), (401, json!("invalid_api_key")), "{}", r.body);
    let tokenize = [
        (json!({}), 400, "prompt"),
        (json!({"prompt": 5}), 400, "prompt"),
        (json!({"messages": [{"role": "user"}]}), 400, "messages[0].content"),
        (json!({"prompt": "x", "model": "gpt-5"}), 404, "model"),
    ];
    check_errors(&server, "/tokenize", &auth, &tokenize, false);
    let detokenize = [(json!({}), 400, "tokens"), (json!({"tokens": [1, 99999999]}), 400, "tokens")];
    check_errors(&server, "/detokenize", &auth, &detokenize, false);
    // Every refused request harmed nothing: the server still answers.
    let ok = http(&server.addr, "POST", "/v1/messages", &x_api_key, msg.to_string().as_bytes());
    assert_eq!(ok.status, 200, "{}", ok.body);
}

#[test]
fn streamed_tool_call_arguments_arrive_as_incremental_deltas() {
    let _serial = serial();
    let server = Server::start(&[]);
    let template = llama31_template();
    let two = r#"<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}; {"name": "get_time", "parameters": {"city": "Lyon"}}"#;
    let function =
        |name: &str| json!({"type": "function", "function": {"name": name, "parameters": {"type": "object"}}});
    let body = json!({"model": server.model, "messages": [{"role": "user", "content": "Weather in Paris?"}],
        "tools": [function("get_weather"), function("get_time")], "tool_choice": "auto", "temperature": 0,
        "max_tokens": 80, "chat_template": template, "guided_choice": [two], "stream": true});
    let r = http(&server.addr, "POST", "/v1/chat/completions", &[], body.to_string().as_bytes());
    let chunks: Vec<Value> =
        r.events().iter().filter(|e| *e != "[DONE]").map(|e| serde_json::from_str(e).expect("JSON")).collect();
    // OpenAI's shape: a call's first delta has its id, type and name; later ones only append
    // `function.arguments`, under the call's index.
    let mut calls: Vec<(String, String)> = Vec::new();
    let mut pieces = vec![0; 2];
    for delta in
        chunks.iter().flat_map(|c| c["choices"][0]["delta"]["tool_calls"].as_array().cloned().unwrap_or_default())
    {
        let index = delta["index"].as_u64().expect("index") as usize;
        let args = delta["function"]["arguments"].as_str().expect("arguments");
        if let Some(name) = delta["function"]["name"].as_str() {
            assert!(delta["id"].is_string() && delta["type"] == "function" && index == calls.len(), "{delta}");
            calls.push((name.to_owned(), args.to_owned()));
        } else {
            assert!(delta.get("id").is_none() && index + 1 == calls.len(), "{delta}");
            calls[index].1.push_str(args);
        }
        pieces[index] += 1;
    }
    let parsed: Vec<(String, Value)> =
        calls.iter().map(|(n, a)| (n.clone(), serde_json::from_str(a).expect("arguments are JSON"))).collect();
    assert_eq!(
        parsed,
        vec![
            ("get_weather".into(), json!({"city": "Paris", "unit": "celsius"})),
            ("get_time".into(), json!({"city": "Lyon"}))
        ]
    );
    // Token by token: the first call's arguments (a dozen tokens) come in several deltas.
    assert!(pieces[0] >= 4, "{pieces:?} deltas per call: arguments were not streamed");
    let finishes: Vec<&Value> =
        chunks.iter().map(|c| &c["choices"][0]["finish_reason"]).filter(|f| !f.is_null()).collect();
    assert_eq!(finishes, [&json!("tool_calls")]);
    let content: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(content, "");

    // Text the model writes after its call is the message's content, streamed or not.
    let after = r#"{"name": "get_time", "parameters": {"city": "Lyon"}} It is noon there."#;
    let mut body = body.clone();
    body["guided_choice"] = json!([after]);
    let r = http(&server.addr, "POST", "/v1/chat/completions", &[], body.to_string().as_bytes());
    let chunks: Vec<Value> =
        r.events().iter().filter(|e| *e != "[DONE]").map(|e| serde_json::from_str(e).expect("JSON")).collect();
    let content: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    let names: Vec<&str> = chunks
        .iter()
        .flat_map(|c| c["choices"][0]["delta"]["tool_calls"].as_array().into_iter().flatten())
        .filter_map(|d| d["function"]["name"].as_str())
        .collect();
    assert_eq!((content.as_str(), names), ("It is noon there.", vec!["get_time"]), "{}", r.body);
    body["stream"] = json!(false);
    let whole = server.post("/v1/chat/completions", &body).json();
    let message = &whole["choices"][0]["message"];
    assert_eq!(message["content"], "It is noon there.", "{whole}");
    assert_eq!(message["tool_calls"][0]["function"]["name"], "get_time", "{whole}");
    assert_eq!(whole["choices"][0]["finish_reason"], "tool_calls", "{whole}");
}

/// The `data` of each typed server-sent event (`event: <type>` then `data: {...}`).
fn typed_events(body: &str) -> Vec<Value> {
    body.split("\n\n")
        .filter_map(|e| e.lines().find_map(|l| l.strip_prefix("data: ")))
        .map(|d| serde_json::from_str(d).unwrap_or_else(|e| panic!("{e}: {d}")))
        .collect()
}

/// The events' `type`s.
fn kinds(events: &[Value]) -> Vec<&str> {
    events.iter().map(|e| e["type"].as_str().unwrap_or("?")).collect()
}

#[test]
fn responses_and_messages_stream_tool_calls_as_they_are_written() {
    let _serial = serial();
    let server = Server::start(&[]);
    let template = llama31_template();
    let schema = json!({"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
        "required": ["city"], "additionalProperties": false});
    // Responses: a function_call item, its arguments as deltas, then done events.
    let tool = json!({"type": "function", "name": "get_weather", "parameters": schema});
    let body = json!({"model": server.model, "input": "Weather in Paris?", "tools": [tool], "stream": true,
        "tool_choice": {"type": "function", "name": "get_weather"}, "temperature": 0, "max_output_tokens": 60,
        "chat_template": template});
    let r = http(&server.addr, "POST", "/v1/responses", &[], body.to_string().as_bytes());
    assert_eq!(r.status, 200, "{}", r.body);
    let events = typed_events(&r.body);
    let k = kinds(&events);
    assert_eq!(k[..3], ["response.created", "response.in_progress", "response.output_item.added"], "{k:?}");
    let item = &events[2]["item"];
    assert_eq!((item["type"].as_str(), item["name"].as_str()), (Some("function_call"), Some("get_weather")), "{item}");
    assert_eq!((item["arguments"].as_str(), item["status"].as_str()), (Some(""), Some("in_progress")), "{item}");
    let deltas: Vec<&str> = events
        .iter()
        .filter(|e| e["type"] == "response.function_call_arguments.delta")
        .map(|e| {
            assert_eq!((&e["item_id"], &e["output_index"]), (&item["id"], &json!(0)), "{e}");
            e["delta"].as_str().expect("delta")
        })
        .collect();
    assert!(deltas.len() >= 3, "{deltas:?}: the arguments were not streamed");
    let arguments = deltas.concat();
    let args: Value = serde_json::from_str(&arguments).expect("the deltas add up to JSON");
    assert!(args["city"].is_string(), "{args}");
    let n = k.len();
    assert_eq!(
        k[n - 3..],
        ["response.function_call_arguments.done", "response.output_item.done", "response.completed"],
        "{k:?}"
    );
    assert_eq!(events[n - 3]["arguments"], json!(arguments));
    let output = &events[n - 1]["response"]["output"];
    assert_eq!((output[0]["arguments"].as_str(), output[0]["status"].as_str()), (Some(&*arguments), Some("completed")));
    assert_eq!(output.as_array().map(Vec::len), Some(1), "{output}");
    assert!(!k.contains(&"response.output_text.delta"), "{k:?}");
    let sequence: Vec<u64> = events.iter().filter_map(|e| e["sequence_number"].as_u64()).collect();
    assert_eq!(sequence, (0..n as u64).collect::<Vec<_>>());

    // Messages: a tool_use block, its input as input_json_delta pieces.
    let tool = json!({"name": "get_weather", "input_schema": schema});
    let body = json!({"model": server.model, "max_tokens": 60, "temperature": 0, "chat_template": template,
        "messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": [tool], "stream": true,
        "tool_choice": {"type": "tool", "name": "get_weather"}});
    let r = http(&server.addr, "POST", "/v1/messages", &[], body.to_string().as_bytes());
    assert_eq!(r.status, 200, "{}", r.body);
    let events = typed_events(&r.body);
    let k = kinds(&events);
    assert_eq!(k[..3], ["message_start", "ping", "content_block_start"], "{k:?}");
    let block = &events[2]["content_block"];
    assert_eq!((block["type"].as_str(), block["name"].as_str()), (Some("tool_use"), Some("get_weather")), "{block}");
    assert_eq!((&events[2]["index"], &block["input"]), (&json!(0), &json!({})), "{block}");
    let partial: Vec<&str> = events
        .iter()
        .filter(|e| e["type"] == "content_block_delta")
        .map(|e| {
            assert_eq!((&e["index"], &e["delta"]["type"]), (&json!(0), &json!("input_json_delta")), "{e}");
            e["delta"]["partial_json"].as_str().expect("partial_json")
        })
        .collect();
    assert!(partial.len() >= 3, "{partial:?}: the input was not streamed");
    let input: Value = serde_json::from_str(&partial.concat()).expect("the pieces add up to JSON");
    let n = k.len();
    assert_eq!(k[n - 3..], ["content_block_stop", "message_delta", "message_stop"], "{k:?}");
    assert_eq!(events[n - 2]["delta"]["stop_reason"], "tool_use", "{}", events[n - 2]);
    // The same greedy call, whole.
    let mut whole = body.clone();
    whole["stream"] = json!(false);
    let w = server.post("/v1/messages", &whole).json();
    assert_eq!(w["content"][0]["input"], input, "{w}");
}

#[test]
fn responses_function_tools_give_function_call_items() {
    let _serial = serial();
    let server = Server::start(&[]);
    let template = llama31_template();
    let weather = json!({"type": "function", "name": "get_weather", "parameters": {"type": "object",
        "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"], "additionalProperties": false}});
    let body = json!({"model": server.model, "input": "Weather in Paris?", "tools": [weather],
        "tool_choice": {"type": "function", "name": "get_weather"}, "temperature": 0, "max_output_tokens": 60,
        "chat_template": template});
    let r = server.post("/v1/responses", &body);
    assert_eq!(r.status, 200, "{}", r.body);
    let r = r.json();
    let item = &r["output"][0];
    assert_eq!(item["type"], "function_call", "{r}");
    assert_eq!(item["name"], "get_weather", "{r}");
    assert!(item["call_id"].as_str().is_some_and(|c| c.starts_with("call_")), "{item}");
    let args: Value = serde_json::from_str(item["arguments"].as_str().expect("arguments")).expect("JSON arguments");
    assert!(args["city"].is_string(), "{args}");
    assert_eq!(r["tools"], json!([weather]), "{r}");
    // Without a tool section in the template: a 400 naming `tools`, as on chat.
    let plain = json!({"model": server.model, "input": "Hi", "tools": [weather], "max_output_tokens": 4});
    let e = server.post("/v1/responses", &plain);
    assert_eq!(e.status, 400, "{}", e.body);
    assert_eq!(e.json()["error"]["param"], "tools", "{}", e.body);
}

#[test]
fn messages_tools_give_tool_use_blocks() {
    let _serial = serial();
    let server = Server::start(&[]);
    let template = llama31_template();
    let weather = json!({"name": "get_weather", "description": "Weather in a city", "input_schema": {"type": "object",
        "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"], "additionalProperties": false}});
    let body = json!({"model": server.model, "max_tokens": 60, "temperature": 0, "chat_template": template,
        "messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": [weather],
        "tool_choice": {"type": "tool", "name": "get_weather"}});
    let r = server.post("/v1/messages", &body);
    assert_eq!(r.status, 200, "{}", r.body);
    let r = r.json();
    assert_eq!(r["stop_reason"], "tool_use", "{r}");
    let block = &r["content"][0];
    assert_eq!((block["type"].as_str(), block["name"].as_str()), (Some("tool_use"), Some("get_weather")), "{r}");
    assert!(block["input"]["city"].is_string() && block["id"].is_string(), "{block}");
    // The call and its result, sent back, render through the template into a next turn.
    let mut next = body.clone();
    next["tool_choice"] = json!({"type": "none"});
    next["max_tokens"] = json!(4);
    next["messages"] = json!([{"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "content": [block]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": block["id"], "content": "sunny"}]}]);
    let n = server.post("/v1/messages", &next);
    assert_eq!(n.status, 200, "{}", n.body);
    assert_eq!(n.json()["content"][0]["type"], "text", "{}", n.body);
    // Errors name the field, in Anthropic's shape.
    let mut bad = body.clone();
    bad["tools"] = json!([{"name": "f", "input_schema": 3}]);
    let e = server.post("/v1/messages", &bad);
    assert_eq!(e.status, 400, "{}", e.body);
    assert!(e.body.contains("tools[0].input_schema"), "{}", e.body);
}

#[test]
fn responses_logprobs_come_whole_and_with_each_streamed_delta() {
    let _serial = serial();
    let server = Server::start(&[]);
    let body = json!({"model": server.model, "input": "Name a colour.", "temperature": 0, "max_output_tokens": 6,
        "include": ["message.output_text.logprobs"], "top_logprobs": 2});
    let r = server.post("/v1/responses", &body);
    assert_eq!(r.status, 200, "{}", r.body);
    let part = &r.json()["output"][0]["content"][0];
    let logprobs = part["logprobs"].as_array().expect("logprobs").clone();
    let tokens: String = logprobs.iter().map(|l| l["token"].as_str().expect("token")).collect();
    assert_eq!((logprobs.len(), tokens.as_str()), (6, part["text"].as_str().expect("text")), "{part}");
    for l in &logprobs {
        let top = l["top_logprobs"].as_array().expect("top_logprobs");
        assert!(top.len() == 2 && l["logprob"].as_f64().is_some_and(|p| p <= 0.0), "{l}");
        assert_eq!(l["bytes"], json!(l["token"].as_str().expect("token").as_bytes()), "{l}");
        // Greedy: the chosen token is the likeliest.
        assert_eq!(top[0]["token"], l["token"], "{l}");
    }
    // Streamed: each delta carries the logprobs of its own tokens, and they add up.
    let mut stream = body.clone();
    stream["stream"] = json!(true);
    let r = http(&server.addr, "POST", "/v1/responses", &[], stream.to_string().as_bytes());
    let events = typed_events(&r.body);
    let deltas: Vec<&Value> = events.iter().filter(|e| e["type"] == "response.output_text.delta").collect();
    for d in &deltas {
        let text: String =
            d["logprobs"].as_array().expect("logprobs").iter().filter_map(|l| l["token"].as_str()).collect();
        assert_eq!(text.as_str(), d["delta"].as_str().expect("delta"), "{d}");
    }
    let streamed: Vec<Value> =
        deltas.iter().flat_map(|d| d["logprobs"].as_array().cloned().unwrap_or_default()).collect();
    assert_eq!(streamed, logprobs);
    // Without `include`, none; an unknown `include` value is named.
    let plain = server.post("/v1/responses", &json!({"model": server.model, "input": "Hi", "max_output_tokens": 2}));
    assert_eq!(plain.json()["output"][0]["content"][0]["logprobs"], json!([]), "{}", plain.body);
    let bad = json!({"model": server.model, "input": "Hi", "include": ["message.output_text.nope"]});
    let e = server.post("/v1/responses", &bad);
    assert_eq!((e.status, e.json()["error"]["param"].as_str()), (400, Some("include[0]")), "{}", e.body);
}

/// A chat template that shows the tools' names and then the messages' text as they are, so a
/// test can write the model's prompt (a few-shot list of calls) itself.
const RAW_TEMPLATE: &str =
    "Tools:{% for t in tools %} {{ t.function.name }}{% endfor %}\n{% for m in messages %}{{ m.content }}{% endfor %}";

#[test]
fn strict_tools_in_auto_constrain_a_call_once_it_opens_and_leave_free_text_free() {
    let _serial = serial();
    let server = Server::start(&[]);
    // The few-shot calls name four cities; the strict schema allows none of them. A line ends
    // the answer (`stop`), so that a call is a finished answer.
    let params = json!({"type": "object", "properties": {"city": {"enum": ["Oslo", "Rome"]}}, "required": ["city"],
        "additionalProperties": false});
    let tool = |strict: bool| {
        json!({"type": "function", "function": {"name": "get_weather", "parameters": params,
        "strict": strict}})
    };
    let call = |city: &str| format!("{{\"name\": \"get_weather\", \"parameters\": {{\"city\": \"{city}\"}}}}\n");
    let calls = format!(
        "Calls, one JSON object per line:\n{}{}{}{}",
        call("Paris"),
        call("Lyon"),
        call("Nice"),
        call("Nantes")
    );
    let ask = |content: &str, strict: bool| {
        let body = json!({"model": server.model, "messages": [{"role": "user", "content": content}],
            "tools": [tool(strict)], "tool_choice": "auto", "parallel_tool_calls": false, "temperature": 0,
            "max_tokens": 24, "stop": ["\n"], "chat_template": RAW_TEMPLATE});
        let r = server.post("/v1/chat/completions", &body);
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()["choices"][0].clone()
    };
    // Steered to a call: strict, its arguments are valid; the model alone writes an invalid one.
    let free = ask(&calls, false);
    let strict = ask(&calls, true);
    assert_eq!(strict["finish_reason"], "tool_calls", "{strict}");
    let call = &strict["message"]["tool_calls"][0]["function"];
    assert_eq!(call["name"], "get_weather", "{strict}");
    let args: Value = serde_json::from_str(call["arguments"].as_str().expect("arguments")).expect("JSON");
    assert!(args == json!({"city": "Oslo"}) || args == json!({"city": "Rome"}), "{args}");
    let loose = free["message"]["tool_calls"][0]["function"]["arguments"].as_str().map(str::to_owned);
    assert_ne!(loose.as_deref(), call["arguments"].as_str(), "the constraint changed nothing: {free}");
    // Free text before any call is untouched: the same answer, strict or not.
    let prose = "The weather in Paris today is";
    let (free, strict) = (ask(prose, false), ask(prose, true));
    assert!(free["message"]["tool_calls"].is_null() && free["message"]["content"].is_string(), "{free}");
    assert_eq!(strict["message"], free["message"]);
    // `strict` with another output constraint: a 400 naming it; a malformed one is named too.
    let mut body = json!({"model": server.model, "messages": [{"role": "user", "content": "x"}],
        "tools": [tool(true)], "guided_choice": ["a"], "chat_template": RAW_TEMPLATE});
    let r = server.post("/v1/chat/completions", &body);
    assert_eq!((r.status, r.json()["error"]["param"].as_str()), (400, Some("tools[0].function.strict")), "{}", r.body);
    body["guided_choice"] = Value::Null;
    body["tools"][0]["function"]["strict"] = json!("yes");
    let r = server.post("/v1/chat/completions", &body);
    assert_eq!((r.status, r.json()["error"]["param"].as_str()), (400, Some("tools[0].function.strict")), "{}", r.body);
}

/// The Llama 3.1 chat template (it has a tool section), as a request's `chat_template`.
fn llama31_template() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/chat/llama31_chat_template.jinja"))
        .expect("the Llama 3.1 template")
}

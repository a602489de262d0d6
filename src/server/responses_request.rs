//! Parsing and validating `/v1/responses` bodies (OpenAI's Responses API) into the chat request
//! the engine runs. Stateless: nothing is stored, so `store` is accepted but each response says
//! `"store": false`, and `previous_response_id` is a 400 naming it (the client must send the
//! conversation in `input`). Unknown fields are ignored, as OpenAI's other endpoints on this
//! server do; known options tulu cannot honour (tools other than functions, background mode)
//! are refused naming the field. Log-probabilities come with `include:
//! ["message.output_text.logprobs"]` (`top_logprobs` alternatives per token, 0 to 20); the other
//! `include` values OpenAI knows are about tools tulu does not have, so they add nothing. vLLM's
//! `chat_template` is accepted, as on chat.

use serde_json::{json, Map, Value};

use super::error::ApiError;
use super::fields::{kind, Fields};
use super::openai::{self, ApiRequest, Endpoint, PromptInput, MAX_LOGPROBS};
use super::responses_tools;
use super::structured;
use crate::tokenizer::{ChatMessage, ToolCall};

/// A parsed `/v1/responses` request: the chat request plus what the response echoes back.
#[derive(Debug, Clone)]
pub struct ResponsesRequest {
    /// The request as the chat path runs it.
    pub chat: ApiRequest,
    /// `instructions`, echoed.
    pub instructions: Option<String>,
    /// `metadata`, echoed.
    pub metadata: Value,
    /// `text`, echoed (`{"format": {"type": "text"}}` when absent).
    pub text: Value,
    /// `tools`, echoed (`[]` when absent).
    pub tools: Value,
    /// `tool_choice`, echoed (`"auto"` when absent).
    pub tool_choice: Value,
}

/// Parses and validates a `/v1/responses` body.
pub fn parse(body: &[u8]) -> Result<ResponsesRequest, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid("body", format!("the request body is not valid JSON: {e}")))?;
    let Value::Object(obj) = &value else {
        return Err(ApiError::invalid("body", format!("the request body must be a JSON object, got {}", kind(&value))));
    };
    let f = Fields(obj);
    if f.get("previous_response_id").is_some() {
        return Err(ApiError::param(
            "previous_response_id",
            "is not supported: this server keeps no responses (stateless); send the whole conversation in `input`",
        ));
    }
    if f.get("conversation").is_some() {
        return Err(ApiError::param("conversation", "is not supported: this server keeps no conversations"));
    }
    if f.bool("background")?.unwrap_or(false) {
        return Err(ApiError::param("background", "is not supported (only false)"));
    }
    f.bool("store")?;
    let tools = responses_tools::parse(obj)?;
    let stream = f.bool("stream")?.unwrap_or(false);
    let logprobs = logprobs(&f)?;
    let instructions = f.string("instructions")?.map(str::to_owned);
    let mut messages: Vec<ChatMessage> = instructions.iter().map(ChatMessage::system).collect();
    messages.extend(input(f.require("input")?)?);
    let max_tokens = match f.int("max_output_tokens")? {
        Some(m) if m < 1 => return Err(ApiError::param("max_output_tokens", format!("must be at least 1, got {m}"))),
        m => m.map(|m| m as u64),
    };
    let (constraint, text) = text_format(&f)?;
    let constraint = match (constraint, tools.as_ref().and_then(|t| Some((t, t.constraint()?)))) {
        (Some(_), Some((t, _))) => {
            let mut e = t.conflict("text.format");
            e.param = e.param.map(|p| p.replace(".function.", "."));
            return Err(e);
        }
        (c, t) => c.or(t.map(|(_, t)| t)),
    };
    let metadata = match f.get("metadata") {
        None => json!({}),
        Some(m @ Value::Object(_)) => m.clone(),
        Some(v) => return Err(ApiError::param("metadata", format!("must be an object, got {}", kind(v)))),
    };
    let chat = ApiRequest {
        endpoint: Endpoint::Chat,
        model: f.string("model")?.map(str::to_owned),
        prompts: vec![PromptInput::Chat(messages)],
        n: 1,
        stream,
        include_usage: false,
        max_tokens,
        max_tokens_param: "max_output_tokens",
        stop: Vec::new(),
        sampling: openai::sampling(&f)?,
        logprobs,
        echo: false,
        ignore_eos: false,
        constraint,
        tools,
        chat_template: f.string("chat_template")?.map(str::to_owned),
        return_token_ids: false,
    };
    let echo = |key: &str, default: Value| f.get(key).filter(|v| !v.is_null()).cloned().unwrap_or(default);
    let (tools, tool_choice) = (echo("tools", json!([])), echo("tool_choice", json!("auto")));
    Ok(ResponsesRequest { chat, instructions, metadata, text, tools, tool_choice })
}

/// `include` values OpenAI knows; only the logprobs one adds anything here.
const INCLUDABLE: [&str; 8] = [
    "message.output_text.logprobs",
    "file_search_call.results",
    "web_search_call.results",
    "web_search_call.action.sources",
    "message.input_image.image_url",
    "computer_call_output.output.image_url",
    "code_interpreter_call.outputs",
    "reasoning.encrypted_content",
];

/// Alternatives per token when `include` asks for `message.output_text.logprobs`
/// (`top_logprobs`, default 0); `None` otherwise.
fn logprobs(f: &Fields) -> Result<Option<usize>, ApiError> {
    let top = match f.int("top_logprobs")? {
        Some(k) if !(0..=MAX_LOGPROBS as i64).contains(&k) => {
            return Err(ApiError::param("top_logprobs", format!("must be in [0, {MAX_LOGPROBS}], got {k}")))
        }
        k => k.unwrap_or(0) as usize,
    };
    let items = match f.get("include") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Array(items)) => items,
        Some(v) => return Err(ApiError::param("include", format!("must be a list of strings, got {}", kind(v)))),
    };
    let mut wanted = false;
    for (i, item) in items.iter().enumerate() {
        match item.as_str() {
            Some(s) if INCLUDABLE.contains(&s) => wanted |= s == INCLUDABLE[0],
            Some(s) => return Err(ApiError::param(&format!("include[{i}]"), format!("`{s}` is not a known value"))),
            None => {
                return Err(ApiError::param(&format!("include[{i}]"), format!("must be a string, got {}", kind(item))))
            }
        }
    }
    Ok(wanted.then_some(top))
}

/// `input`: a string (one user message) or a list of items — messages (`role` + `content`,
/// a string or `input_text` / `output_text` parts), `function_call` and
/// `function_call_output` items.
fn input(v: &Value) -> Result<Vec<ChatMessage>, ApiError> {
    let items = match v {
        Value::String(s) if s.is_empty() => return Err(ApiError::param("input", "must not be empty")),
        Value::String(s) => return Ok(vec![ChatMessage::user(s.clone())]),
        Value::Array(items) if items.is_empty() => return Err(ApiError::param("input", "must not be empty")),
        Value::Array(items) => items,
        v => return Err(ApiError::param("input", format!("must be a string or a list of items, got {}", kind(v)))),
    };
    let mut messages = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let at = |field: &str| format!("input[{i}]{field}");
        let bad = |field: &str, what: String| ApiError::param(&at(field), what);
        let Value::Object(obj) = item else {
            return Err(bad("", format!("must be an object, got {}", kind(item))));
        };
        let f = Fields(obj);
        let string = |name: &str| match f.get(name) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(v) => Err(bad(&format!(".{name}"), format!("must be a string, got {}", kind(v)))),
            None => Err(bad(&format!(".{name}"), "is required".into())),
        };
        match f.get("type").and_then(Value::as_str).unwrap_or("message") {
            "message" => {
                let role = match string("role")?.as_str() {
                    "developer" | "system" => "system",
                    "user" => "user",
                    "assistant" => "assistant",
                    r => return Err(bad(".role", format!("must be user, assistant, system or developer, got `{r}`"))),
                };
                messages.push(ChatMessage::new(
                    role,
                    content(f.require("content").map_err(|_| bad(".content", "is required".into()))?, &at(".content"))?,
                ));
            }
            "function_call" => {
                let arguments = string("arguments")?;
                let arguments: Value = serde_json::from_str(&arguments)
                    .map_err(|e| bad(".arguments", format!("must be JSON text: {e}")))?;
                let call = ToolCall::function(string("call_id")?, string("name")?, arguments);
                match messages.last_mut() {
                    // Parallel calls: one assistant turn carrying them all.
                    Some(m) if m.role == "assistant" && !m.tool_calls.is_empty() => m.tool_calls.push(call),
                    _ => messages.push(ChatMessage::assistant("").with_tool_calls(vec![call])),
                }
            }
            "function_call_output" => messages.push(ChatMessage::tool(string("call_id")?, string("output")?)),
            t => {
                return Err(bad(".type", format!("must be message, function_call or function_call_output, got `{t}`")))
            }
        }
    }
    Ok(messages)
}

/// A message's `content`: a string or a list of text parts, joined with newlines.
fn content(v: &Value, param: &str) -> Result<String, ApiError> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => parts
            .iter()
            .enumerate()
            .map(|(j, part)| match (part.get("type").and_then(Value::as_str), part.get("text")) {
                (Some("input_text" | "output_text" | "text"), Some(Value::String(t))) => Ok(t.as_str()),
                _ => Err(ApiError::param(
                    &format!("{param}[{j}]"),
                    "must be an {\"type\": \"input_text\", \"text\": ...} part (this model reads text only)",
                )),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(|parts| parts.join("\n")),
        v => Err(ApiError::param(param, format!("must be a string or a list of parts, got {}", kind(v)))),
    }
}

/// `text.format`: `text`, `json_object` or `json_schema` (`name`, `schema`, `strict` inline),
/// as the chat path's `response_format` constraint; returns it and `text` to echo.
fn text_format(f: &Fields) -> Result<(Option<structured::RequestConstraint>, Value), ApiError> {
    let text = match f.get("text") {
        None => return Ok((None, json!({"format": {"type": "text"}}))),
        Some(t @ Value::Object(_)) => t.clone(),
        Some(v) => return Err(ApiError::param("text", format!("must be an object, got {}", kind(v)))),
    };
    let format = match text.get("format") {
        None | Some(Value::Null) => return Ok((None, json!({"format": {"type": "text"}}))),
        Some(Value::Object(m)) => m,
        Some(v) => return Err(ApiError::param("text.format", format!("must be an object, got {}", kind(v)))),
    };
    let response_format = match format.get("type").and_then(Value::as_str) {
        Some("text") => return Ok((None, text.clone())),
        Some("json_object") => json!({"type": "json_object"}),
        Some("json_schema") => {
            let mut js = Map::new();
            for key in ["name", "schema", "strict"] {
                if let Some(v) = format.get(key) {
                    js.insert(key.into(), v.clone());
                }
            }
            json!({"type": "json_schema", "json_schema": js})
        }
        _ => return Err(ApiError::param("text.format.type", "must be \"text\", \"json_object\" or \"json_schema\"")),
    };
    let mut body = Map::new();
    body.insert("response_format".into(), response_format);
    // The chat path names `response_format…`; this API's field is `text.format…`.
    let rename = |p: &str| {
        p.replacen("response_format.json_schema", "text.format", 1).replacen("response_format", "text.format", 1)
    };
    let constraint = structured::parse(&body).map_err(|mut e| {
        if let Some(p) = e.param.take() {
            e.message = e.message.replace(&p, &rename(&p));
            e.param = Some(rename(&p));
        }
        e
    })?;
    let constraint = constraint.map(|mut c| {
        c.param = rename(&c.param);
        c
    });
    Ok((constraint, text.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn param(body: Value) -> Option<String> {
        match parse(body.to_string().as_bytes()) {
            Ok(r) => panic!("{body} parsed: {r:?}"),
            Err(e) => e.param,
        }
    }

    #[test]
    fn reads_input_items_into_chat_messages() {
        let body = json!({"input": [
            {"role": "developer", "content": "Be brief."},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
            {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{\"city\": \"Paris\"}"},
            {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        ], "instructions": "You are tulu.", "max_output_tokens": 9});
        let r = parse(body.to_string().as_bytes()).expect("parses");
        let PromptInput::Chat(m) = &r.chat.prompts[0] else { panic!("not a chat") };
        let roles: Vec<&str> = m.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "system", "user", "assistant", "tool"]);
        assert_eq!(m[2].content, "Weather?");
        assert_eq!(m[3].tool_calls[0].function.arguments, json!({"city": "Paris"}));
        assert_eq!(m[4].tool_call_id.as_deref(), Some("c1"));
        assert_eq!(r.chat.max_tokens, Some(9));
        let r = parse(br#"{"input": "hi"}"#).expect("parses");
        assert_eq!(r.chat.prompts, [PromptInput::Chat(vec![ChatMessage::user("hi")])]);
    }

    #[test]
    fn names_the_field_at_fault() {
        let cases = [
            (json!({}), "input"),
            (json!({"input": 3}), "input"),
            (json!({"input": "x", "previous_response_id": "resp_1"}), "previous_response_id"),
            (json!({"input": [{"role": "robot", "content": "x"}]}), "input[0].role"),
            (json!({"input": [{"role": "user"}]}), "input[0].content"),
            (json!({"input": [{"role": "user", "content": [{"type": "input_image"}]}]}), "input[0].content[0]"),
            (
                json!({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{"}]}),
                "input[0].arguments",
            ),
            (json!({"input": "x", "max_output_tokens": 0}), "max_output_tokens"),
            (json!({"input": "x", "temperature": 3}), "temperature"),
            (json!({"input": "x", "text": {"format": {"type": "yaml"}}}), "text.format.type"),
            (json!({"input": "x", "text": {"format": {"type": "json_schema", "name": "x"}}}), "text.format"),
            (json!({"input": "x", "tools": [{"type": "web_search"}]}), "tools[0].type"),
            (json!({"input": "x", "stream": 1}), "stream"),
        ];
        for (body, expected) in cases {
            assert_eq!(param(body.clone()).as_deref().map(|p| p.starts_with(expected)), Some(true), "{body}");
        }
    }
}

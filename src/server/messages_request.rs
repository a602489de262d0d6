//! Parsing and validating `/v1/messages` bodies (Anthropic's Messages API) into the chat
//! request the engine runs. Checked as Anthropic documents them: `model` and `max_tokens`
//! required, `messages` alternating content of `text`, `tool_use` and `tool_result` blocks,
//! `system` a string or text blocks, `temperature` in [0, 1], `top_p` in (0, 1], `top_k` ≥ 0,
//! `stop_sequences` non-empty strings. Unknown fields (`metadata`, `service_tier`, ...) are
//! ignored; client `tools` are read by `messages_tools.rs`; server tools and enabled `thinking` are refused naming the field. vLLM's
//! `chat_template` is accepted, as on chat.

use serde_json::Value;

use super::error::ApiError;
use super::fields::{kind, Fields};
use super::messages_tools;
use super::openai::{ApiRequest, Endpoint, PromptInput, SamplingOverrides};
use super::tools::Tools;
use crate::tokenizer::{ChatMessage, ToolCall};

/// Parses and validates a `/v1/messages` body.
pub fn parse(body: &[u8]) -> Result<ApiRequest, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid("body", format!("the request body is not valid JSON: {e}")))?;
    let Value::Object(obj) = &value else {
        return Err(ApiError::invalid("body", format!("the request body must be a JSON object, got {}", kind(&value))));
    };
    let f = Fields(obj);
    let model = f.string("model")?.ok_or_else(|| ApiError::param("model", "is required"))?;
    let max_tokens = match f.int("max_tokens")? {
        None => return Err(ApiError::param("max_tokens", "is required")),
        Some(m) if m < 1 => return Err(ApiError::param("max_tokens", format!("must be at least 1, got {m}"))),
        Some(m) => m as u64,
    };
    let tools = messages_tools::parse(obj)?;
    let stream = f.bool("stream")?.unwrap_or(false);
    if f.get("thinking").and_then(|t| t.get("type")).and_then(Value::as_str) == Some("enabled") {
        return Err(ApiError::param("thinking", "is not supported (this model does not think aloud)"));
    }
    let mut messages = system(f.get("system"))?;
    messages.extend(turns(f.require("messages")?)?);
    Ok(ApiRequest {
        endpoint: Endpoint::Chat,
        model: Some(model.to_owned()),
        prompts: vec![PromptInput::Chat(messages)],
        n: 1,
        stream,
        include_usage: false,
        max_tokens: Some(max_tokens),
        max_tokens_param: "max_tokens",
        stop: stop_sequences(f.get("stop_sequences"))?,
        sampling: sampling(&f)?,
        logprobs: None,
        echo: false,
        ignore_eos: false,
        constraint: tools.as_ref().and_then(Tools::constraint),
        tools,
        chat_template: f.string("chat_template")?.map(str::to_owned),
        return_token_ids: false,
    })
}

/// `temperature` in [0, 1], `top_p` in (0, 1], `top_k` ≥ 0 (0: off).
fn sampling(f: &Fields) -> Result<SamplingOverrides, ApiError> {
    let temperature = f.float("temperature")?;
    if let Some(t) = temperature.filter(|t| !(0.0..=1.0).contains(t)) {
        return Err(ApiError::param("temperature", format!("must be in [0, 1], got {t}")));
    }
    let top_p = f.float("top_p")?;
    if let Some(p) = top_p.filter(|p| !(*p > 0.0 && *p <= 1.0)) {
        return Err(ApiError::param("top_p", format!("must be in (0, 1], got {p}")));
    }
    let top_k = match f.int("top_k")? {
        Some(k) if k < 0 => return Err(ApiError::param("top_k", format!("must be at least 0, got {k}"))),
        k => k.map(|k| k as usize),
    };
    Ok(SamplingOverrides {
        temperature: temperature.map(|t| t as f32),
        top_p: top_p.map(|p| p as f32),
        top_k,
        ..SamplingOverrides::default()
    })
}

fn stop_sequences(v: Option<&Value>) -> Result<Vec<String>, ApiError> {
    let items = match v {
        None => return Ok(Vec::new()),
        Some(Value::Array(items)) => items,
        Some(v) => {
            return Err(ApiError::param("stop_sequences", format!("must be a list of strings, got {}", kind(v))))
        }
    };
    items
        .iter()
        .enumerate()
        .map(|(i, s)| match s {
            Value::String(s) if !s.is_empty() => Ok(s.clone()),
            v => Err(ApiError::param(
                &format!("stop_sequences[{i}]"),
                format!("must be a non-empty string, got {}", kind(v)),
            )),
        })
        .collect()
}

/// `system`: a string or a list of text blocks, as one system message.
fn system(v: Option<&Value>) -> Result<Vec<ChatMessage>, ApiError> {
    match v {
        None => Ok(Vec::new()),
        Some(Value::String(s)) if s.is_empty() => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![ChatMessage::system(s.clone())]),
        Some(Value::Array(blocks)) => {
            let text = texts(blocks, "system")?;
            Ok(if text.is_empty() { Vec::new() } else { vec![ChatMessage::system(text)] })
        }
        Some(v) => {
            Err(ApiError::param("system", format!("must be a string or a list of text blocks, got {}", kind(v))))
        }
    }
}

/// Text blocks joined with newlines; any other block is refused naming it.
fn texts(blocks: &[Value], param: &str) -> Result<String, ApiError> {
    blocks
        .iter()
        .enumerate()
        .map(|(j, b)| match (b.get("type").and_then(Value::as_str), b.get("text")) {
            (Some("text"), Some(Value::String(t))) => Ok(t.as_str()),
            _ => Err(ApiError::param(&format!("{param}[{j}]"), "must be a {\"type\": \"text\", \"text\": ...} block")),
        })
        .collect::<Result<Vec<_>, _>>()
        .map(|t| t.join("\n"))
}

/// `messages`: user and assistant turns; an assistant's `tool_use` blocks become tool calls,
/// a user's `tool_result` blocks become `tool` messages.
fn turns(v: &Value) -> Result<Vec<ChatMessage>, ApiError> {
    let items = match v {
        Value::Array(items) if items.is_empty() => return Err(ApiError::param("messages", "must not be empty")),
        Value::Array(items) => items,
        v => return Err(ApiError::param("messages", format!("must be a list of messages, got {}", kind(v)))),
    };
    let mut out = Vec::with_capacity(items.len());
    for (i, m) in items.iter().enumerate() {
        let at = |field: &str| format!("messages[{i}]{field}");
        let role = match m.get("role") {
            Some(Value::String(r)) if r == "user" || r == "assistant" => r.clone(),
            Some(v) => {
                return Err(ApiError::param(&at(".role"), format!("must be \"user\" or \"assistant\", got {v}")))
            }
            None => return Err(ApiError::param(&at(".role"), "is required")),
        };
        let blocks = match m.get("content") {
            Some(Value::String(s)) => {
                out.push(ChatMessage::new(role, s.clone()));
                continue;
            }
            Some(Value::Array(blocks)) => blocks,
            Some(v) => {
                return Err(ApiError::param(
                    &at(".content"),
                    format!("must be a string or a list of blocks, got {}", kind(v)),
                ))
            }
            None => return Err(ApiError::param(&at(".content"), "is required")),
        };
        let mut message = ChatMessage::new(role.clone(), "");
        let mut text = Vec::new();
        for (j, b) in blocks.iter().enumerate() {
            let p = |field: &str| at(&format!(".content[{j}]{field}"));
            let string = |name: &str| {
                b.get(name)
                    .and_then(Value::as_str)
                    .map(str::to_owned)
                    .ok_or_else(|| ApiError::param(&p(&format!(".{name}")), "must be a string"))
            };
            match (b.get("type").and_then(Value::as_str), role.as_str()) {
                (Some("text"), _) => text.push(string("text")?),
                (Some("tool_use"), "assistant") => {
                    let input = match b.get("input") {
                        Some(i @ Value::Object(_)) => i.clone(),
                        _ => return Err(ApiError::param(&p(".input"), "must be an object")),
                    };
                    message.tool_calls.push(ToolCall::function(string("id")?, string("name")?, input));
                }
                (Some("tool_result"), "user") => {
                    let content = match b.get("content") {
                        None | Some(Value::Null) => String::new(),
                        Some(Value::String(s)) => s.clone(),
                        Some(Value::Array(inner)) => texts(inner, &p(".content"))?,
                        Some(v) => {
                            return Err(ApiError::param(
                                &p(".content"),
                                format!("must be a string or text blocks, got {}", kind(v)),
                            ))
                        }
                    };
                    out.push(ChatMessage::tool(string("tool_use_id")?, content));
                }
                (Some(t), _) => {
                    return Err(ApiError::param(
                        &p(".type"),
                        format!(
                        "`{t}` is not supported here (text, tool_use from the assistant, tool_result from the user)"
                    ),
                    ))
                }
                (None, _) => return Err(ApiError::param(&p(".type"), "is required")),
            }
        }
        if !text.is_empty() || !message.tool_calls.is_empty() {
            message.content = text.join("\n");
            out.push(message);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_system_blocks_and_tool_turns() {
        let body = json!({"model": "m", "max_tokens": 5, "system": [{"type": "text", "text": "Be brief."}],
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "get_weather", "input": {"city": "Paris"}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "sunny"}]},
            ], "stop_sequences": ["\n\n"], "top_k": 5});
        let r = parse(body.to_string().as_bytes()).expect("parses");
        let PromptInput::Chat(m) = &r.prompts[0] else { panic!("not a chat") };
        let roles: Vec<&str> = m.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "tool"]);
        assert_eq!(m[2].tool_calls[0].function.name, "get_weather");
        assert_eq!(m[3].tool_call_id.as_deref(), Some("t1"));
        assert_eq!((r.max_tokens, r.stop.as_slice(), r.sampling.top_k), (Some(5), &["\n\n".to_owned()][..], Some(5)));
    }

    #[test]
    fn names_the_field_at_fault() {
        let ok = json!([{"role": "user", "content": "hi"}]);
        let cases = [
            (json!({"model": "m", "messages": ok}), "max_tokens"),
            (json!({"max_tokens": 3, "messages": ok}), "model"),
            (json!({"model": "m", "max_tokens": 3}), "messages"),
            (json!({"model": "m", "max_tokens": 3, "messages": ok, "temperature": 1.5}), "temperature"),
            (json!({"model": "m", "max_tokens": 3, "messages": ok, "top_k": -1}), "top_k"),
            (json!({"model": "m", "max_tokens": 3, "messages": ok, "stop_sequences": ["a", ""]}), "stop_sequences[1]"),
            (
                json!({"model": "m", "max_tokens": 3, "messages": [{"role": "system", "content": "x"}]}),
                "messages[0].role",
            ),
            (
                json!({"model": "m", "max_tokens": 3, "messages": [{"role": "user", "content": [{"type": "image"}]}]}),
                "messages[0].content[0].type",
            ),
            (json!({"model": "m", "max_tokens": 3, "messages": ok, "system": 5}), "system"),
        ];
        for (body, param) in cases {
            match parse(body.to_string().as_bytes()) {
                Err(e) => assert_eq!(e.param.as_deref(), Some(param), "{body}"),
                Ok(r) => panic!("{body} parsed: {r:?}"),
            }
        }
    }
}

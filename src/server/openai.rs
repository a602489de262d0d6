//! Parsing and validating `/v1/completions` and `/v1/chat/completions` bodies.
//!
//! Bodies are read as `serde_json::Value` and checked field by field, rather than deserialized
//! into structs, so every malformed field is reported by name (`messages[1].content`,
//! `temperature`) with what was expected. Limits follow vLLM's: temperature in [0, 2], top_p in
//! (0, 1], top_k ≥ -1, n ≥ 1, max_tokens ≥ 1. Unknown fields are ignored, as vLLM and OpenAI do,
//! so clients' extra options do not break requests; known options tulu cannot honour are refused.

use serde_json::{Map, Value};

use super::error::ApiError;
use super::fields::{kind, Fields};
use super::structured::{self, RequestConstraint};
use super::tools::{self, Tools};
use crate::runtime::sampler::SamplingParams;
use crate::tokenizer::{ChatMessage, ToolCall};

/// Most choices one request may ask for (`n` × prompts): each is a sequence in the engine.
pub const MAX_CHOICES: usize = 128;
/// Most alternatives per token for `logprobs` / `top_logprobs` (vLLM's default cap).
pub const MAX_LOGPROBS: usize = 20;

/// Which API a request came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `/v1/completions`.
    Completions,
    /// `/v1/chat/completions`.
    Chat,
}

/// One prompt of a request, before tokenization.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptInput {
    /// Completion text.
    Text(String),
    /// Completion token ids.
    Tokens(Vec<u32>),
    /// A conversation for the chat template.
    Chat(Vec<ChatMessage>),
}

/// Sampling options the request set; the rest come from the model's defaults.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SamplingOverrides {
    /// `temperature`.
    pub temperature: Option<f32>,
    /// `top_p`.
    pub top_p: Option<f32>,
    /// `top_k`, with -1 and 0 already mapped to 0 (off).
    pub top_k: Option<usize>,
    /// `min_p`.
    pub min_p: Option<f32>,
    /// `repetition_penalty`.
    pub repetition_penalty: Option<f32>,
    /// `seed`.
    pub seed: Option<u64>,
}

impl SamplingOverrides {
    /// The sampling for choice `index`: `None` (model defaults) when nothing was set; with a
    /// seed, choice i is seeded `seed + i` so that `n` choices differ yet reproduce.
    pub fn params(&self, defaults: SamplingParams, index: usize) -> Option<SamplingParams> {
        let any = self.temperature.is_some()
            || self.top_p.is_some()
            || self.top_k.is_some()
            || self.min_p.is_some()
            || self.repetition_penalty.is_some()
            || self.seed.is_some();
        any.then(|| SamplingParams {
            temperature: self.temperature.unwrap_or(defaults.temperature),
            top_k: self.top_k.unwrap_or(defaults.top_k),
            top_p: self.top_p.unwrap_or(defaults.top_p),
            min_p: self.min_p.unwrap_or(defaults.min_p),
            repetition_penalty: self.repetition_penalty.unwrap_or(defaults.repetition_penalty),
            seed: self.seed.map(|s| s.wrapping_add(index as u64)),
        })
    }
}

/// A validated completion or chat request.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiRequest {
    /// Which endpoint.
    pub endpoint: Endpoint,
    /// The `model` the client named, if any.
    pub model: Option<String>,
    /// The prompts (one for chat; completions may batch several).
    pub prompts: Vec<PromptInput>,
    /// Choices per prompt.
    pub n: usize,
    /// Stream with server-sent events.
    pub stream: bool,
    /// `stream_options.include_usage`.
    pub include_usage: bool,
    /// Cap on generated tokens per choice.
    pub max_tokens: Option<u64>,
    /// Which parameter set `max_tokens` (for error messages).
    pub max_tokens_param: &'static str,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Sampling options set by the request.
    pub sampling: SamplingOverrides,
    /// Alternatives to report per token; `None`: no log-probabilities.
    pub logprobs: Option<usize>,
    /// Completions: prepend the prompt to the output.
    pub echo: bool,
    /// Keep generating past EOS (vLLM's extension, for benchmarks).
    pub ignore_eos: bool,
    /// What the text must match (`response_format`, `structured_outputs`, `guided_*`, or
    /// `tool_choice` `required` / a named function).
    pub constraint: Option<RequestConstraint>,
    /// Chat: the tools offered and `tool_choice`.
    pub tools: Option<Tools>,
    /// Chat: the caller's chat template, in place of the model's.
    pub chat_template: Option<String>,
    /// `return_token_ids` (vLLM's): answer with the prompt's and each choice's token ids.
    pub return_token_ids: bool,
}

impl ApiRequest {
    /// The name of the prompt parameter, for errors about the prompt.
    pub fn prompt_param(&self) -> &'static str {
        match self.endpoint {
            Endpoint::Completions => "prompt",
            Endpoint::Chat => "messages",
        }
    }
}

/// Parses and validates a request body for `endpoint`.
pub fn parse(endpoint: Endpoint, body: &[u8]) -> Result<ApiRequest, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid("body", format!("the request body is not valid JSON: {e}")))?;
    let Value::Object(obj) = &value else {
        return Err(ApiError::invalid("body", format!("the request body must be a JSON object, got {}", kind(&value))));
    };
    let f = Fields(obj);
    let prompts = match endpoint {
        Endpoint::Completions => completion_prompts(f.require("prompt")?)?,
        Endpoint::Chat => vec![PromptInput::Chat(messages(f.require("messages")?)?)],
    };
    let n = choices(&f, prompts.len())?;
    let stream = f.bool("stream")?.unwrap_or(false);
    let include_usage = include_usage(&f, stream)?;
    let (max_tokens_param, max_tokens) = max_tokens(&f, endpoint)?;
    let logprobs = logprobs(&f, endpoint)?;
    let echo = match endpoint {
        Endpoint::Completions => f.bool("echo")?.unwrap_or(false),
        Endpoint::Chat => false,
    };
    if let Some(s) = f.string("suffix")? {
        if !s.is_empty() {
            return Err(ApiError::param("suffix", "is not supported"));
        }
    }
    unsupported(&f)?;
    let (constraint, tools) = constraints(obj, endpoint)?;
    Ok(ApiRequest {
        endpoint,
        model: f.string("model")?.map(str::to_owned),
        prompts,
        n,
        stream,
        include_usage,
        max_tokens,
        max_tokens_param,
        stop: stop(f.get("stop"))?,
        sampling: sampling(&f)?,
        logprobs,
        echo,
        ignore_eos: f.bool("ignore_eos")?.unwrap_or(false),
        constraint,
        tools,
        chat_template: match endpoint {
            Endpoint::Chat => f.string("chat_template")?.map(str::to_owned),
            Endpoint::Completions => None,
        },
        return_token_ids: f.bool("return_token_ids")?.unwrap_or(false),
    })
}

/// The output constraint and the tools: tools only on chat, and `tool_choice` `required`, a
/// named function or strict tools in `auto` (which constrain the answer) not with another
/// constraint.
fn constraints(
    obj: &Map<String, Value>,
    endpoint: Endpoint,
) -> Result<(Option<RequestConstraint>, Option<Tools>), ApiError> {
    let constraint = structured::parse(obj)?;
    let tools = tools::parse(obj)?;
    if endpoint == Endpoint::Completions && tools.is_some() {
        return Err(ApiError::param("tools", "are only offered on /v1/chat/completions"));
    }
    match (constraint, tools.as_ref().and_then(|t| Some((t, t.constraint()?)))) {
        (Some(c), Some((t, _))) => Err(t.conflict(&c.param)),
        (c, t) => Ok((c.or(t.map(|(_, t)| t)), tools)),
    }
}

/// `n`: choices per prompt, at most [`MAX_CHOICES`] over all prompts.
fn choices(f: &Fields, prompts: usize) -> Result<usize, ApiError> {
    let n = match f.int("n")? {
        None => 1,
        Some(n) if n < 1 => return Err(ApiError::param("n", format!("must be at least 1, got {n}"))),
        Some(n) if n as u64 > MAX_CHOICES as u64 => {
            return Err(ApiError::param("n", format!("must be at most {MAX_CHOICES}, got {n}")))
        }
        Some(n) => n as usize,
    };
    if n * prompts > MAX_CHOICES {
        return Err(ApiError::param(
            "n",
            format!("asks for {} choices ({prompts} prompts × n = {n}); at most {MAX_CHOICES}", n * prompts),
        ));
    }
    Ok(n)
}

/// `stream_options.include_usage`, which only a streamed request may set.
fn include_usage(f: &Fields, stream: bool) -> Result<bool, ApiError> {
    match f.get("stream_options") {
        None => Ok(false),
        Some(_) if !stream => Err(ApiError::param("stream_options", "can only be set when `stream` is true")),
        Some(Value::Object(opts)) => {
            Ok(Fields(opts).bool_named("include_usage", "stream_options.include_usage")?.unwrap_or(false))
        }
        Some(v) => Err(ApiError::param("stream_options", format!("must be an object, got {}", kind(v)))),
    }
}

/// The cap on generated tokens and the parameter that set it (chat's `max_completion_tokens`
/// wins over `max_tokens`).
fn max_tokens(f: &Fields, endpoint: Endpoint) -> Result<(&'static str, Option<u64>), ApiError> {
    let (param, max_tokens) = match (endpoint, f.int("max_completion_tokens")?) {
        (Endpoint::Chat, Some(m)) => ("max_completion_tokens", Some(m)),
        _ => ("max_tokens", f.int("max_tokens")?),
    };
    match max_tokens {
        Some(m) if m < 1 => Err(ApiError::param(param, format!("must be at least 1, got {m}"))),
        m => Ok((param, m.map(|m| m as u64))),
    }
}

/// Alternatives per token: completions' `logprobs`, or chat's `logprobs` + `top_logprobs`.
fn logprobs(f: &Fields, endpoint: Endpoint) -> Result<Option<usize>, ApiError> {
    let in_range = |param: &str, k: i64| {
        if (0..=MAX_LOGPROBS as i64).contains(&k) {
            Ok(k as usize)
        } else {
            Err(ApiError::param(param, format!("must be in [0, {MAX_LOGPROBS}], got {k}")))
        }
    };
    match endpoint {
        Endpoint::Completions => f.int("logprobs")?.map(|k| in_range("logprobs", k)).transpose(),
        Endpoint::Chat => {
            let top = f.int("top_logprobs")?.map(|k| in_range("top_logprobs", k)).transpose()?;
            match (f.bool("logprobs")?.unwrap_or(false), top) {
                (true, top) => Ok(Some(top.unwrap_or(0))),
                (false, Some(k)) if k > 0 => Err(ApiError::param("top_logprobs", "requires `logprobs` to be true")),
                (false, _) => Ok(None),
            }
        }
    }
}

pub(crate) fn sampling(f: &Fields) -> Result<SamplingOverrides, ApiError> {
    let temperature = f.float("temperature")?;
    if let Some(t) = temperature {
        if !(0.0..=2.0).contains(&t) {
            return Err(ApiError::param("temperature", format!("must be in [0, 2], got {t}")));
        }
    }
    let top_p = f.float("top_p")?;
    if let Some(p) = top_p {
        if !(p > 0.0 && p <= 1.0) {
            return Err(ApiError::param("top_p", format!("must be in (0, 1], got {p}")));
        }
    }
    let top_k = match f.int("top_k")? {
        Some(k) if k < -1 => {
            return Err(ApiError::param("top_k", format!("must be -1 or 0 (off) or at least 1, got {k}")));
        }
        Some(k) => Some(k.max(0) as usize),
        None => None,
    };
    let min_p = f.float("min_p")?;
    if let Some(p) = min_p {
        if !(0.0..=1.0).contains(&p) {
            return Err(ApiError::param("min_p", format!("must be in [0, 1], got {p}")));
        }
    }
    let repetition_penalty = f.float("repetition_penalty")?;
    if let Some(r) = repetition_penalty {
        if !(r > 0.0 && r <= 2.0) {
            return Err(ApiError::param("repetition_penalty", format!("must be in (0, 2], got {r}")));
        }
    }
    for name in ["presence_penalty", "frequency_penalty"] {
        match f.float(name)? {
            Some(p) if !(-2.0..=2.0).contains(&p) => {
                return Err(ApiError::param(name, format!("must be in [-2, 2], got {p}")));
            }
            Some(p) if p != 0.0 => return Err(ApiError::param(name, "is not supported (only 0)")),
            _ => {}
        }
    }
    let seed = match f.get("seed") {
        None => None,
        Some(v) => Some(
            v.as_u64()
                .or_else(|| v.as_i64().map(|s| s as u64))
                .ok_or_else(|| ApiError::param("seed", format!("must be an integer, got {}", kind(v))))?,
        ),
    };
    Ok(SamplingOverrides {
        temperature: temperature.map(|t| t as f32),
        top_p: top_p.map(|p| p as f32),
        top_k,
        min_p: min_p.map(|p| p as f32),
        repetition_penalty: repetition_penalty.map(|r| r as f32),
        seed,
    })
}

/// Options OpenAI defines that tulu cannot honour: refused rather than silently ignored.
fn unsupported(f: &Fields) -> Result<(), ApiError> {
    if let Some(v) = f.get("logit_bias") {
        match v {
            Value::Object(m) if m.is_empty() => {}
            Value::Object(_) => return Err(ApiError::param("logit_bias", "is not supported")),
            v => return Err(ApiError::param("logit_bias", format!("must be an object, got {}", kind(v)))),
        }
    }
    if let Some(b) = f.int("best_of")? {
        if b != 1 {
            return Err(ApiError::param("best_of", "is not supported (only 1)"));
        }
    }
    Ok(())
}

fn stop(v: Option<&Value>) -> Result<Vec<String>, ApiError> {
    let one = |v: &Value, param: String| match v {
        Value::String(s) if s.is_empty() => {
            Err(ApiError::invalid(param.clone(), format!("`{param}` must not be empty")))
        }
        Value::String(s) => Ok(s.clone()),
        v => Err(ApiError::invalid(param.clone(), format!("`{param}` must be a string, got {}", kind(v)))),
    };
    match v {
        None => Ok(Vec::new()),
        Some(Value::Array(items)) => items.iter().enumerate().map(|(i, s)| one(s, format!("stop[{i}]"))).collect(),
        Some(v) => Ok(vec![one(v, "stop".into())?]),
    }
}

fn completion_prompts(v: &Value) -> Result<Vec<PromptInput>, ApiError> {
    let tokens = |items: &[Value], param: &str| -> Result<Vec<u32>, ApiError> {
        items
            .iter()
            .enumerate()
            .map(|(i, t)| {
                t.as_u64().and_then(|t| u32::try_from(t).ok()).ok_or_else(|| {
                    ApiError::invalid(param, format!("`{param}[{i}]` must be a token id (an integer ≥ 0), got {t}"))
                })
            })
            .collect()
    };
    let prompts = match v {
        Value::String(s) => vec![PromptInput::Text(s.clone())],
        Value::Array(items) if items.is_empty() => return Err(ApiError::param("prompt", "must not be empty")),
        Value::Array(items) => match &items[0] {
            Value::Number(_) => vec![PromptInput::Tokens(tokens(items, "prompt")?)],
            _ => items
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    let param = format!("prompt[{i}]");
                    match p {
                        Value::String(s) => Ok(PromptInput::Text(s.clone())),
                        Value::Array(ids) => Ok(PromptInput::Tokens(tokens(ids, &param)?)),
                        v => Err(ApiError::invalid(
                            param.clone(),
                            format!("`{param}` must be a string or a list of token ids, got {}", kind(v)),
                        )),
                    }
                })
                .collect::<Result<_, _>>()?,
        },
        v => {
            return Err(ApiError::param(
                "prompt",
                format!("must be a string, a list of strings or a list of token ids, got {}", kind(v)),
            ))
        }
    };
    for (i, p) in prompts.iter().enumerate() {
        let empty = match p {
            PromptInput::Text(s) => s.is_empty(),
            PromptInput::Tokens(t) => t.is_empty(),
            PromptInput::Chat(m) => m.is_empty(),
        };
        if empty {
            let param = if prompts.len() == 1 { "prompt".to_owned() } else { format!("prompt[{i}]") };
            return Err(ApiError::invalid(param.clone(), format!("`{param}` must not be empty")));
        }
    }
    Ok(prompts)
}

pub(crate) fn messages(v: &Value) -> Result<Vec<ChatMessage>, ApiError> {
    let Value::Array(items) = v else {
        return Err(ApiError::param("messages", format!("must be a list of messages, got {}", kind(v))));
    };
    if items.is_empty() {
        return Err(ApiError::param("messages", "must not be empty"));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let at = |field: &str| format!("messages[{i}]{field}");
            let Value::Object(obj) = m else {
                return Err(ApiError::invalid(at(""), format!("`{}` must be an object, got {}", at(""), kind(m))));
            };
            let role = match obj.get("role") {
                Some(Value::String(r)) if !r.is_empty() => r.clone(),
                Some(v) => {
                    let p = at(".role");
                    return Err(ApiError::invalid(p.clone(), format!("`{p}` must be a role string, got {}", kind(v))));
                }
                None => return Err(ApiError::invalid(at(".role"), format!("`{}` is required", at(".role")))),
            };
            let content = match obj.get("content") {
                // OpenAI: only an assistant turn that called tools may leave out its content.
                None | Some(Value::Null) if role != "assistant" => {
                    return Err(ApiError::invalid(at(".content"), format!("`{}` is required", at(".content"))));
                }
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                // Content parts: only text can be given to a text-only model; parts are joined
                // with newlines, as vLLM does.
                Some(Value::Array(parts)) => parts
                    .iter()
                    .enumerate()
                    .map(|(j, part)| match (part.get("type").and_then(Value::as_str), part.get("text")) {
                        (Some("text"), Some(Value::String(t))) => Ok(t.as_str()),
                        _ => {
                            let p = at(&format!(".content[{j}]"));
                            Err(ApiError::invalid(
                                p.clone(),
                                format!("`{p}` must be a {{\"type\": \"text\", \"text\": ...}} part"),
                            ))
                        }
                    })
                    .collect::<Result<Vec<_>, _>>()?
                    .join("\n"),
                Some(v) => {
                    let p = at(".content");
                    return Err(ApiError::invalid(
                        p.clone(),
                        format!("`{p}` must be a string or a list of parts, got {}", kind(v)),
                    ));
                }
            };
            let mut message = ChatMessage::new(role, content);
            message.tool_calls = tool_calls(obj.get("tool_calls"), &at)?;
            message.tool_call_id = match obj.get("tool_call_id") {
                None | Some(Value::Null) => None,
                Some(Value::String(id)) => Some(id.clone()),
                Some(v) => {
                    let p = at(".tool_call_id");
                    return Err(ApiError::invalid(p.clone(), format!("`{p}` must be a string, got {}", kind(v))));
                }
            };
            if message.role == "tool" && message.tool_call_id.is_none() {
                return Err(ApiError::invalid(at(".tool_call_id"), format!("`{}` is required", at(".tool_call_id"))));
            }
            Ok(message)
        })
        .collect()
}

/// An assistant message's `tool_calls`: OpenAI's `[{"id", "type": "function", "function":
/// {"name", "arguments": "<JSON text>"}}]`, the arguments parsed for the chat template.
fn tool_calls(v: Option<&Value>, at: &dyn Fn(&str) -> String) -> Result<Vec<ToolCall>, ApiError> {
    let items = match v {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(items)) => items,
        Some(v) => {
            let p = at(".tool_calls");
            return Err(ApiError::invalid(p.clone(), format!("`{p}` must be a list of calls, got {}", kind(v))));
        }
    };
    items
        .iter()
        .enumerate()
        .map(|(j, call)| {
            let p = |field: &str| at(&format!(".tool_calls[{j}]{field}"));
            let bad = |field: &str, what: &str| {
                let name = p(field);
                ApiError::invalid(name.clone(), format!("`{name}` {what}"))
            };
            let id = call.get("id").and_then(Value::as_str).ok_or_else(|| bad(".id", "must be a string"))?;
            let function = call.get("function").ok_or_else(|| bad(".function", "is required"))?;
            let name = function
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| bad(".function.name", "must be a string"))?;
            let arguments = match function.get("arguments") {
                Some(Value::String(text)) => serde_json::from_str(text)
                    .map_err(|e| bad(".function.arguments", &format!("must be JSON text: {e}")))?,
                None | Some(Value::Null) => Value::Object(Map::new()),
                Some(_) => return Err(bad(".function.arguments", "must be a string of JSON")),
            };
            Ok(ToolCall::function(id, name, arguments))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(endpoint: Endpoint, body: &str) -> ApiError {
        match parse(endpoint, body.as_bytes()) {
            Ok(r) => panic!("{body} parsed: {r:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn names_the_field_at_fault() {
        let chat = |b: &str| err(Endpoint::Chat, b).param;
        assert_eq!(chat(r#"{"messages": [{"role": "user", "content": 3}]}"#).as_deref(), Some("messages[0].content"));
        assert_eq!(
            chat(r#"{"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}"#).as_deref(),
            Some("temperature")
        );
        assert_eq!(chat(r#"{"messages": [{"content": "hi"}]}"#).as_deref(), Some("messages[0].role"));
        assert_eq!(
            chat(r#"{"messages": [{"role":"user","content":"x"}], "top_logprobs": 2}"#).as_deref(),
            Some("top_logprobs")
        );
        let comp = |b: &str| err(Endpoint::Completions, b).param;
        assert_eq!(comp(r#"{"prompt": [1, -2]}"#).as_deref(), Some("prompt"));
        assert_eq!(comp(r#"{"prompt": "x", "stop": ["a", 1]}"#).as_deref(), Some("stop[1]"));
        assert_eq!(comp(r#"{"prompt": "x", "top_k": -2}"#).as_deref(), Some("top_k"));
        assert_eq!(comp("{").as_deref(), Some("body"));
    }

    #[test]
    fn seeds_choices_in_order_and_keeps_defaults_when_unset() {
        let r = parse(Endpoint::Completions, br#"{"prompt": "x", "seed": 7, "n": 3, "top_k": -1}"#).unwrap();
        let seeds: Vec<_> = (0..3).map(|i| r.sampling.params(SamplingParams::greedy(), i).unwrap().seed).collect();
        assert_eq!(seeds, [Some(7), Some(8), Some(9)]);
        assert_eq!(r.sampling.top_k, Some(0));
        let r = parse(Endpoint::Completions, br#"{"prompt": ["a", [1, 2]], "stop": "x"}"#).unwrap();
        assert_eq!(r.prompts, [PromptInput::Text("a".into()), PromptInput::Tokens(vec![1, 2])]);
        assert_eq!(r.stop, ["x"]);
        assert_eq!(r.sampling.params(SamplingParams::greedy(), 0), None);
    }
}

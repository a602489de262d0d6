//! `/v1/completions` and `/v1/chat/completions`: parse, tokenize, check the context, submit
//! one engine request per choice, then answer whole (here) or as a stream ([`super::sse`]).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::error::ApiError;
use super::openai::{self, ApiRequest, Endpoint, PromptInput};
use super::tools::ToolChoice;
use super::{sse, AppState};
use crate::engine::{Event, GenerateRequest, Prompt, Summary, TokenLogprob};
use crate::error::Result;

/// `POST /v1/completions`.
pub async fn completions(State(state): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    handle(state, Endpoint::Completions, body).await.unwrap_or_else(IntoResponse::into_response)
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(State(state): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    handle(state, Endpoint::Chat, body).await.unwrap_or_else(IntoResponse::into_response)
}

/// One prompt, tokenized.
pub(super) struct Tokenized {
    /// The token ids the engine gets.
    pub ids: Vec<u32>,
    /// The prompt's text, for `echo`.
    pub text: String,
}

/// One event of one choice, forwarded from its engine stream.
pub(super) type ChoiceEvent = (usize, Result<Event>);

/// What the response builders need to know about the request.
pub(super) struct Reply {
    pub state: Arc<AppState>,
    pub request: ApiRequest,
    pub prompts: Vec<Tokenized>,
    pub id: String,
    pub created: u64,
}

impl Reply {
    /// Choices in all: `n` per prompt.
    pub fn choices(&self) -> usize {
        self.request.n * self.prompts.len()
    }

    /// The response `object` for whole answers and for stream chunks.
    pub fn object(&self, chunk: bool) -> &'static str {
        match (self.request.endpoint, chunk) {
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Completions, _) => "text_completion",
        }
    }

    /// The log-probabilities of `tokens` in the endpoint's format; `offset` tracks completions'
    /// `text_offset` (characters into the choice's text) across stream chunks.
    pub fn logprobs(&self, tokens: &[TokenLogprob], offset: &mut usize) -> Value {
        // JSON has no -inf; vLLM reports such log-probabilities as -9999.
        let lp = |x: f32| if x.is_finite() { x.max(-9999.0) } else { -9999.0 };
        match self.request.endpoint {
            Endpoint::Chat => json!({
                "content": tokens.iter().map(|t| json!({
                    "token": t.text,
                    "logprob": lp(t.logprob),
                    "bytes": t.text.as_bytes(),
                    "top_logprobs": t.top.iter().map(|(_, s, l)| json!({
                        "token": s, "logprob": lp(*l), "bytes": s.as_bytes()
                    })).collect::<Vec<_>>(),
                })).collect::<Vec<_>>()
            }),
            Endpoint::Completions => {
                let mut offsets = Vec::with_capacity(tokens.len());
                for t in tokens {
                    offsets.push(*offset);
                    *offset += t.text.chars().count();
                }
                json!({
                    "tokens": tokens.iter().map(|t| &t.text).collect::<Vec<_>>(),
                    "token_logprobs": tokens.iter().map(|t| lp(t.logprob)).collect::<Vec<_>>(),
                    "top_logprobs": tokens.iter().map(|t| {
                        let mut top = serde_json::Map::new();
                        top.insert(t.text.clone(), json!(lp(t.logprob)));
                        for (_, s, l) in &t.top {
                            top.entry(s.clone()).or_insert(json!(lp(*l)));
                        }
                        Value::Object(top)
                    }).collect::<Vec<_>>(),
                    "text_offset": offsets,
                })
            }
        }
    }

    /// The tool calls a finished chat answer `text` starts with, when tools were offered and
    /// it ended on its own (Llama 3.1's JSON forms, several with `parallel_tool_calls`): each
    /// call's name and arguments (JSON text), and the text written after the calls.
    pub fn tool_calls(&self, text: &str, summary: &Summary) -> Option<(Vec<(String, String)>, String)> {
        let tools = self.request.tools.as_ref().filter(|t| t.active())?;
        if summary.finish_reason != crate::engine::FinishReason::Stop {
            return None;
        }
        tools.parse_calls(text)
    }

    /// Whether a chat answer's text is held back while streaming, because it may be a tool
    /// call: always with `required` or a named function, and with `auto` while the text so
    /// far is blank or starts like a JSON object.
    pub fn holds_back(&self, text_so_far: &str) -> bool {
        match self.request.tools.as_ref().map(|t| &t.choice) {
            None | Some(ToolChoice::None) => false,
            Some(ToolChoice::Auto) => {
                let t = text_so_far.trim_start();
                t.is_empty() || t.starts_with('{') || "<|python_tag|>".starts_with(t) || t.starts_with("<|python_tag|>")
            }
            Some(_) => true,
        }
    }

    /// With `return_token_ids`, adds vLLM's fields to choice `i`'s finishing JSON: its
    /// `token_ids` and, on completions (one prompt per choice), its `prompt_token_ids`.
    pub fn add_token_ids(&self, choice: &mut Value, i: usize, summary: &Summary) {
        if !self.request.return_token_ids {
            return;
        }
        choice["token_ids"] = json!(summary.tokens);
        if self.request.endpoint == Endpoint::Completions {
            choice["prompt_token_ids"] = json!(self.prompts[i / self.request.n].ids);
        }
    }

    /// Chat with `return_token_ids`: the response's top-level `prompt_token_ids`.
    pub fn chat_prompt_token_ids(&self) -> Option<Value> {
        (self.request.return_token_ids && self.request.endpoint == Endpoint::Chat)
            .then(|| json!(self.prompts.first().map(|p| p.ids.as_slice()).unwrap_or_default()))
    }

    /// `usage`: prompts counted once each, completions summed over choices; cached prompt
    /// tokens from each prompt's first choice.
    pub fn usage(&self, summaries: &[Option<Summary>]) -> Value {
        let prompt: usize = self.prompts.iter().map(|p| p.ids.len()).sum();
        let completion: usize = summaries.iter().flatten().map(|s| s.tokens.len()).sum();
        let cached: usize =
            summaries.iter().step_by(self.request.n.max(1)).flatten().map(|s| s.cached_prompt_tokens).sum();
        json!({
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        })
    }
}

async fn handle(
    state: Arc<AppState>,
    endpoint: Endpoint,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = read_body(&state, body)?;
    let request = openai::parse(endpoint, &body)?;
    let prefix = if endpoint == Endpoint::Chat { "chatcmpl" } else { "cmpl" };
    let (reply, events) = start(state, request, prefix).await?;
    if reply.request.stream {
        Ok(sse::response(reply, events))
    } else {
        whole(reply, events).await
    }
}

/// The request body, or the error for one too large or unreadable.
pub(super) fn read_body(state: &AppState, body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|r| match r.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::too_large(state.body_limit),
        _ => ApiError::invalid("body", format!("cannot read the request body: {}", r.body_text())),
    })
}

/// Checks the model, tokenizes and submits a parsed request; the reply's id is
/// `{id_prefix}-{random}`.
pub(super) async fn start(
    state: Arc<AppState>,
    request: ApiRequest,
    id_prefix: &str,
) -> Result<(Reply, mpsc::UnboundedReceiver<ChoiceEvent>), ApiError> {
    if let Some(model) = &request.model {
        if *model != state.model_name {
            return Err(ApiError::model_not_found(model, &state.model_name));
        }
    }
    if let Some(why) = state.engine.failure() {
        return Err(ApiError::unavailable(format!("the engine has failed: {why}")));
    }
    // Tokenizing (and rendering the chat template) is CPU work: keep it off the async threads.
    let prompts = {
        let (state, request) = (state.clone(), request.clone());
        tokio::task::spawn_blocking(move || tokenize(&state, &request))
            .await
            .map_err(|e| ApiError::internal(format!("tokenizer task failed: {e}")))??
    };
    let id = format!("{id_prefix}-{:032x}", rand::random::<u128>());
    let created = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let reply = Reply { state, request, prompts, id, created };
    let events = submit(&reply)?;
    Ok((reply, events))
}

/// Tokenizes each prompt and checks it, with the completion, against the context.
fn tokenize(state: &AppState, request: &ApiRequest) -> Result<Vec<Tokenized>, ApiError> {
    let tokenizer = state.engine.tokenizer();
    let param = request.prompt_param();
    let shutting_down = state.shutting_down.load(Ordering::SeqCst);
    let ctx = state.engine.context_len() as u64;
    request
        .prompts
        .iter()
        .map(|p| {
            let (ids, text) = match p {
                PromptInput::Text(t) => (tokenizer.encode_prompt(t), t.clone()),
                PromptInput::Tokens(ids) => {
                    // Ids outside the vocabulary are the engine's to report (400 naming `prompt`).
                    let text =
                        if request.echo { tokenizer.decode(ids, false).unwrap_or_default() } else { String::new() };
                    (Ok(ids.clone()), text)
                }
                PromptInput::Chat(m) => {
                    let tools = request.tools.as_ref().filter(|t| t.active()).map(|t| &t.list);
                    (tokenizer.encode_chat_with(m, tools, request.chat_template.as_deref()), String::new())
                }
            };
            let ids = ids.map_err(|e| match e {
                crate::Error::ChatTemplate { .. } | crate::Error::Request { .. } => {
                    ApiError::from_engine(e, shutting_down)
                }
                e => ApiError::invalid(param, format!("`{param}` cannot be tokenized: {e}")),
            })?;
            let len = ids.len() as u64;
            if ids.is_empty() {
                return Err(ApiError::param(param, "tokenizes to no tokens"));
            }
            match request.max_tokens {
                Some(m) if len.saturating_add(m) > ctx => {
                    return Err(ApiError::invalid(
                        if len >= ctx { param } else { request.max_tokens_param },
                        format!(
                            "This model's maximum context length is {ctx} tokens. However, you requested {} tokens \
                             ({len} in the messages, {m} in the completion). Please reduce the length of the \
                             messages or completion.",
                            len.saturating_add(m)
                        ),
                    )
                    .code("context_length_exceeded"))
                }
                None if len >= ctx => {
                    return Err(ApiError::invalid(
                        param,
                        format!(
                            "This model's maximum context length is {ctx} tokens. However, your request has {len} \
                             input tokens. Please reduce the length of the input messages."
                        ),
                    )
                    .code("context_length_exceeded"))
                }
                _ => {}
            }
            Ok(Tokenized { ids, text })
        })
        .collect()
}

/// Queues one engine request per choice and forwards their events, tagged with the choice's
/// index, into one channel. Dropping the receiver (a client gone, a response dropped) makes
/// every forwarder drop its `Generation`, which aborts the engine request at its next step.
fn submit(reply: &Reply) -> Result<mpsc::UnboundedReceiver<ChoiceEvent>, ApiError> {
    let engine = &reply.state.engine;
    let req = &reply.request;
    let defaults = engine.default_sampling();
    let mut requests = Vec::with_capacity(reply.choices());
    for (p, prompt) in reply.prompts.iter().enumerate() {
        for j in 0..req.n {
            let index = p * req.n + j;
            requests.push(GenerateRequest {
                prompt: Prompt::Tokens(prompt.ids.clone()),
                sampling: req.sampling.params(defaults.clone(), index),
                max_tokens: req.max_tokens.map(|m| usize::try_from(m).unwrap_or(usize::MAX)),
                stop: req.stop.clone(),
                ignore_eos: req.ignore_eos,
                logprobs: req.logprobs,
                constraint: req.constraint.as_ref().map(|c| c.constraint.clone()),
                constraint_param: req.constraint.as_ref().map(|c| c.param.clone()),
                speculative: true,
            });
        }
    }
    // All choices are admitted (or refused with 429) together.
    let generations = engine
        .generate_all(requests)
        .map_err(|e| ApiError::from_engine(e, reply.state.shutting_down.load(Ordering::SeqCst)))?;
    let (tx, rx) = mpsc::unbounded_channel();
    for (index, mut generation) in generations.into_iter().enumerate() {
        let tx = tx.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    event = generation.next_event() => match event {
                        Some(event) => if tx.send((index, event)).is_err() { break },
                        None => break,
                    },
                    _ = tx.closed() => break,
                }
            }
        });
    }
    Ok(rx)
}

/// Every choice run to its end: texts (after the echoed prompt), log-probabilities, summaries.
pub(super) struct Collected {
    pub texts: Vec<String>,
    pub logprobs: Vec<Vec<TokenLogprob>>,
    pub summaries: Vec<Option<Summary>>,
}

/// Waits for every choice of `reply` to finish; the first engine error fails the request.
pub(super) async fn collect(
    reply: &Reply,
    mut events: mpsc::UnboundedReceiver<ChoiceEvent>,
) -> Result<Collected, ApiError> {
    let n = reply.choices();
    let mut texts: Vec<String> = (0..n).map(|i| reply.prompts[i / reply.request.n].text.clone()).collect();
    if !reply.request.echo {
        texts.iter_mut().for_each(String::clear);
    }
    let mut logprobs: Vec<Vec<TokenLogprob>> = vec![Vec::new(); n];
    let mut summaries: Vec<Option<Summary>> = vec![None; n];
    while let Some((i, event)) = events.recv().await {
        match event {
            Ok(Event::Text(t)) => texts[i].push_str(&t),
            Ok(Event::Logprobs(l)) => logprobs[i].extend(l),
            Ok(Event::Done(s)) => summaries[i] = Some(s),
            Err(e) => return Err(ApiError::from_engine(e, reply.state.shutting_down.load(Ordering::SeqCst))),
        }
    }
    Ok(Collected { texts, logprobs, summaries })
}

/// Collects every choice and answers with one JSON object.
async fn whole(reply: Reply, events: mpsc::UnboundedReceiver<ChoiceEvent>) -> Result<Response, ApiError> {
    let n = reply.choices();
    let Collected { texts, logprobs, summaries } = collect(&reply, events).await?;
    let mut choices = Vec::with_capacity(n);
    for (i, text) in texts.into_iter().enumerate() {
        let Some(summary) = &summaries[i] else {
            return Err(ApiError::internal(format!("choice {i} ended without finishing")));
        };
        let lp = reply.request.logprobs.map(|_| {
            let mut offset =
                if reply.request.echo { reply.prompts[i / reply.request.n].text.chars().count() } else { 0 };
            reply.logprobs(&logprobs[i], &mut offset)
        });
        let finish = summary.finish_reason.as_str();
        let mut choice = match reply.request.endpoint {
            Endpoint::Chat => match reply.tool_calls(&text, summary) {
                Some((calls, after)) => json!({
                    "index": i,
                    "message": {
                        "role": "assistant",
                        // The text the model wrote after its calls, if any.
                        "content": (!after.is_empty()).then_some(after),
                        "tool_calls": calls.iter().map(|(n, a)| super::tools::call_json(n, a)).collect::<Vec<_>>(),
                    },
                    "logprobs": lp,
                    "finish_reason": "tool_calls",
                }),
                None => json!({
                    "index": i,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": lp,
                    "finish_reason": finish,
                }),
            },
            Endpoint::Completions => json!({"index": i, "text": text, "logprobs": lp, "finish_reason": finish}),
        };
        reply.add_token_ids(&mut choice, i, summary);
        choices.push(choice);
    }
    let mut answer = json!({
        "id": reply.id,
        "object": reply.object(false),
        "created": reply.created,
        "model": reply.state.model_name,
        "choices": choices,
        "usage": reply.usage(&summaries),
    });
    if let Some(ids) = reply.chat_prompt_token_ids() {
        answer["prompt_token_ids"] = ids;
    }
    Ok(Json(answer).into_response())
}

//! `POST /v1/messages`: Anthropic's Messages API over the chat path, whole or streamed as its
//! events (`message_start`, `content_block_start`, `ping`, `content_block_delta`,
//! `content_block_stop`, `message_delta`, `message_stop`). Errors are Anthropic-shaped:
//! `{"type": "error", "error": {"type": "invalid_request_error", "message": "`field` ..."}}`,
//! the message naming the field (Anthropic's errors have no `param`).

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::completions::{self, ChoiceEvent, Collected, Reply};
use super::error::ApiError;
use super::messages_request;
use super::messages_tools;
use super::AppState;
use crate::engine::{Event, FinishReason, Summary};

/// `POST /v1/messages`.
pub async fn messages(State(state): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    handle(state, body).await.unwrap_or_else(|e| anthropic_error(&e).into_response())
}

async fn handle(state: Arc<AppState>, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let body = completions::read_body(&state, body)?;
    let request = messages_request::parse(&body)?;
    let (reply, events) = completions::start(state, request, "msg").await?;
    if reply.request.stream {
        return Ok(stream(reply, events));
    }
    let Collected { texts, summaries, .. } = completions::collect(&reply, events).await?;
    let summary = summaries.into_iter().next().flatten();
    let summary = summary.ok_or_else(|| ApiError::internal("the message ended without finishing"))?;
    let text = texts.into_iter().next().unwrap_or_default();
    let (mut stop_reason, stop_sequence) = stop_reason(&reply, &text, &summary);
    let content = match reply.tool_calls(&text, &summary) {
        Some(calls) => {
            stop_reason = "tool_use";
            let block = |c: &Value| {
                let f = &c["function"];
                messages_tools::tool_use_block(
                    f["name"].as_str().unwrap_or_default(),
                    f["arguments"].as_str().unwrap_or_default(),
                )
            };
            calls.iter().map(block).collect()
        }
        None => vec![json!({"type": "text", "text": text})],
    };
    Ok(Json(json!({
        "id": reply.id,
        "type": "message",
        "role": "assistant",
        "model": reply.state.model_name,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": usage(&reply, Some(&summary)),
    }))
    .into_response())
}

/// An error as Anthropic sends it: its status, and its `type` for that status.
pub fn anthropic_error(e: &ApiError) -> (StatusCode, Json<Value>) {
    (e.status, Json(anthropic_error_body(e)))
}

fn anthropic_error_body(e: &ApiError) -> Value {
    let kind = match e.status.as_u16() {
        400 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 => "overloaded_error",
        _ => "api_error",
    };
    // Anthropic's errors have no `param`: the message names the field.
    let message = match &e.param {
        Some(p) if !e.message.contains(&format!("`{p}`")) => format!("`{p}`: {}", e.message),
        _ => e.message.clone(),
    };
    json!({"type": "error", "error": {"type": kind, "message": message}})
}

/// Anthropic's `stop_reason` and `stop_sequence`: `max_tokens`, `end_turn` (EOS) or
/// `stop_sequence` (the engine ended on a stop string: the one the decoded tokens show right
/// after the text).
fn stop_reason(reply: &Reply, text: &str, summary: &Summary) -> (&'static str, Option<String>) {
    if summary.finish_reason == FinishReason::Length {
        return ("max_tokens", None);
    }
    let eos = reply.state.engine.eos_token_ids();
    if reply.request.stop.is_empty() || summary.tokens.last().is_some_and(|t| eos.contains(t)) {
        return ("end_turn", None);
    }
    let full = reply.state.engine.tokenizer().decode(&summary.tokens, true).unwrap_or_default();
    let after = full.get(text.len()..).unwrap_or("");
    let matched = reply.request.stop.iter().find(|s| after.starts_with(s.as_str())).cloned();
    ("stop_sequence", matched)
}

fn usage(reply: &Reply, summary: Option<&Summary>) -> Value {
    let input = reply.prompts.first().map_or(0, |p| p.ids.len());
    json!({
        "input_tokens": input,
        "output_tokens": summary.map_or(0, |s| s.tokens.len()),
        "cache_read_input_tokens": summary.map_or(0, |s| s.cached_prompt_tokens),
        "cache_creation_input_tokens": 0,
    })
}

/// The streamed message. Dropping the body (a client gone) aborts the engine request.
fn stream(reply: Reply, events: mpsc::UnboundedReceiver<ChoiceEvent>) -> Response {
    let start = Events { reply, events, text: String::new(), queue: Vec::new(), started: false, finished: false };
    let body = futures_util::stream::unfold(start, |mut s| async move {
        s.next().await.map(|bytes| (Ok::<Bytes, Infallible>(bytes), s))
    });
    ([(header::CONTENT_TYPE, "text/event-stream"), (header::CACHE_CONTROL, "no-cache")], Body::from_stream(body))
        .into_response()
}

struct Events {
    reply: Reply,
    events: mpsc::UnboundedReceiver<ChoiceEvent>,
    /// The text so far (to tell which stop sequence ended it).
    text: String,
    /// Encoded events not yet sent, in reverse order.
    queue: Vec<Bytes>,
    started: bool,
    finished: bool,
}

impl Events {
    async fn next(&mut self) -> Option<Bytes> {
        if !self.started {
            self.started = true;
            let message = json!({
                "id": self.reply.id, "type": "message", "role": "assistant", "model": self.reply.state.model_name,
                "content": [], "stop_reason": null, "stop_sequence": null, "usage": usage(&self.reply, None),
            });
            self.queue = vec![
                event("ping", json!({})),
                event("content_block_start", json!({"index": 0, "content_block": {"type": "text", "text": ""}})),
                event("message_start", json!({"message": message})),
            ];
        }
        loop {
            if let Some(bytes) = self.queue.pop() {
                return Some(bytes);
            }
            if self.finished {
                return None;
            }
            match self.events.recv().await {
                Some((_, Ok(Event::Text(delta)))) => {
                    self.text.push_str(&delta);
                    let delta = json!({"index": 0, "delta": {"type": "text_delta", "text": delta}});
                    self.queue.push(event("content_block_delta", delta));
                }
                Some((_, Ok(Event::Logprobs(_)))) => {}
                Some((_, Ok(Event::Done(summary)))) => {
                    let (stop_reason, stop_sequence) = stop_reason(&self.reply, &self.text, &summary);
                    let usage = usage(&self.reply, Some(&summary));
                    self.queue = vec![
                        event("message_stop", json!({})),
                        event(
                            "message_delta",
                            json!({"delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence}, "usage": usage}),
                        ),
                        event("content_block_stop", json!({"index": 0})),
                    ];
                    self.finished = true;
                }
                Some((_, Err(e))) => {
                    let shutting_down = self.reply.state.shutting_down.load(Ordering::SeqCst);
                    let body = anthropic_error_body(&ApiError::from_engine(e, shutting_down));
                    self.queue = vec![error_event(&body)];
                    self.finished = true;
                }
                None => {
                    let e = ApiError::internal("the message ended without finishing");
                    self.queue = vec![error_event(&anthropic_error_body(&e))];
                    self.finished = true;
                }
            }
        }
    }
}

/// One `event: <type>` with its data, `type` included.
fn event(kind: &str, mut fields: Value) -> Bytes {
    fields["type"] = json!(kind);
    Bytes::from(format!("event: {kind}\ndata: {fields}\n\n"))
}

/// An `error` event: the whole error body, as Anthropic streams it.
fn error_event(body: &Value) -> Bytes {
    Bytes::from(format!("event: error\ndata: {body}\n\n"))
}

//! `POST /v1/messages`: Anthropic's Messages API over the chat path, whole or streamed as its
//! events (`message_start`, `content_block_start`, `ping`, `content_block_delta`,
//! `content_block_stop`, `message_delta`, `message_stop`; with tools, `tool_use` blocks whose
//! input streams as `input_json_delta`s). Errors are Anthropic-shaped:
//! `{"type": "error", "error": {"type": "invalid_request_error", "message": "`field` ..."}}`,
//! the message naming the field (Anthropic's errors have no `param`).

use std::collections::VecDeque;
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

use super::answer_stream::AnswerStream;
use super::completions::{self, ChoiceEvent, Collected, Reply};
use super::error::ApiError;
use super::messages_request;
use super::messages_tools;
use super::tool_stream::Piece;
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
        Some((calls, after)) => {
            stop_reason = "tool_use";
            let mut blocks: Vec<Value> = calls.iter().map(|(n, a)| messages_tools::tool_use_block(n, a)).collect();
            // The text the model wrote after its calls.
            if !after.is_empty() {
                blocks.push(json!({"type": "text", "text": after}));
            }
            blocks
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

/// The streamed message: a content block per piece of the answer (`text` with `text_delta`s,
/// `tool_use` with `input_json_delta`s as the call's arguments are written). Dropping the body
/// (a client gone) aborts the engine request.
fn stream(reply: Reply, events: mpsc::UnboundedReceiver<ChoiceEvent>) -> Response {
    let pieces = AnswerStream::new(&reply);
    let start = Events {
        reply,
        events,
        pieces,
        text: String::new(),
        queue: VecDeque::new(),
        blocks: 0,
        open: None,
        started: false,
        finished: false,
    };
    let body = futures_util::stream::unfold(start, |mut s| async move {
        s.next().await.map(|bytes| (Ok::<Bytes, Infallible>(bytes), s))
    });
    ([(header::CONTENT_TYPE, "text/event-stream"), (header::CACHE_CONTROL, "no-cache")], Body::from_stream(body))
        .into_response()
}

/// The kind of the content block being written.
#[derive(PartialEq)]
enum Block {
    Text,
    ToolUse,
}

struct Events {
    reply: Reply,
    events: mpsc::UnboundedReceiver<ChoiceEvent>,
    pieces: AnswerStream,
    /// The text so far (to tell which stop sequence ended it).
    text: String,
    /// Encoded events not yet sent.
    queue: VecDeque<Bytes>,
    /// Content blocks started.
    blocks: usize,
    open: Option<Block>,
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
            self.push(event("message_start", json!({"message": message})));
            // An answer that may be a tool call waits to be known before its first block.
            if !self.pieces.holding() {
                self.start(Block::Text, json!({"type": "text", "text": ""}));
            }
            self.push(event("ping", json!({})));
        }
        loop {
            if let Some(bytes) = self.queue.pop_front() {
                return Some(bytes);
            }
            if self.finished {
                return None;
            }
            match self.events.recv().await {
                Some((_, Ok(Event::Text(delta)))) => {
                    let pieces = self.pieces.push(&self.reply, delta);
                    self.apply(pieces);
                }
                Some((_, Ok(Event::Logprobs(_)))) => {}
                Some((_, Ok(Event::Done(summary)))) => self.done(&summary),
                Some((_, Err(e))) => {
                    let shutting_down = self.reply.state.shutting_down.load(Ordering::SeqCst);
                    let body = anthropic_error_body(&ApiError::from_engine(e, shutting_down));
                    self.push(error_event(&body));
                    self.finished = true;
                }
                None => {
                    let e = ApiError::internal("the message ended without finishing");
                    self.push(error_event(&anthropic_error_body(&e)));
                    self.finished = true;
                }
            }
        }
    }

    /// Sends `pieces` as events, starting and stopping blocks as they change kind.
    fn apply(&mut self, pieces: Vec<Piece>) {
        for piece in pieces {
            match piece {
                Piece::Text(delta) => {
                    if self.open != Some(Block::Text) {
                        self.stop();
                        self.start(Block::Text, json!({"type": "text", "text": ""}));
                    }
                    self.text.push_str(&delta);
                    let delta = json!({"index": self.blocks - 1, "delta": {"type": "text_delta", "text": delta}});
                    self.push(event("content_block_delta", delta));
                }
                Piece::Call(name) => {
                    self.stop();
                    let id = messages_tools::tool_use_id();
                    self.start(Block::ToolUse, json!({"type": "tool_use", "id": id, "name": name, "input": {}}));
                }
                Piece::Arguments(json) => {
                    let delta =
                        json!({"index": self.blocks - 1, "delta": {"type": "input_json_delta", "partial_json": json}});
                    self.push(event("content_block_delta", delta));
                }
            }
        }
    }

    /// The answer's end: its last pieces, the open block stopped (an empty text block when
    /// there was no content at all), the stop reason and usage.
    fn done(&mut self, summary: &Summary) {
        let pieces = self.pieces.finish(&self.reply, summary);
        self.apply(pieces);
        if self.blocks == 0 {
            self.start(Block::Text, json!({"type": "text", "text": ""}));
        }
        self.stop();
        let (mut stop_reason, mut stop_sequence) = stop_reason(&self.reply, &self.text, summary);
        if self.pieces.called() && summary.finish_reason == FinishReason::Stop {
            (stop_reason, stop_sequence) = ("tool_use", None);
        }
        let usage = usage(&self.reply, Some(summary));
        let delta = json!({"delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence}, "usage": usage});
        self.push(event("message_delta", delta));
        self.push(event("message_stop", json!({})));
        self.finished = true;
    }

    fn start(&mut self, kind: Block, block: Value) {
        self.push(event("content_block_start", json!({"index": self.blocks, "content_block": block})));
        self.blocks += 1;
        self.open = Some(kind);
    }

    fn stop(&mut self) {
        if self.open.take().is_some() {
            self.push(event("content_block_stop", json!({"index": self.blocks - 1})));
        }
    }

    fn push(&mut self, bytes: Bytes) {
        self.queue.push_back(bytes);
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

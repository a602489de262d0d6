//! `POST /v1/responses`: OpenAI's Responses API over the chat path, whole or streamed as its
//! typed server-sent events (`response.created`, `response.in_progress`,
//! `response.output_item.added`, `response.content_part.added`, `response.output_text.delta`,
//! `response.output_text.done`, `response.content_part.done`, `response.output_item.done`,
//! `response.completed`). Errors before the stream are OpenAI-shaped JSON; an engine error
//! after it began is an `error` event. Stateless: see [`super::responses_request`].

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::completions::{self, ChoiceEvent, Collected, Reply};
use super::error::ApiError;
use super::responses_request::{self, ResponsesRequest};
use super::responses_tools;
use super::AppState;
use crate::engine::{Event, FinishReason, Summary};

/// `POST /v1/responses`.
pub async fn responses(State(state): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    handle(state, body).await.unwrap_or_else(IntoResponse::into_response)
}

async fn handle(state: Arc<AppState>, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let body = completions::read_body(&state, body)?;
    let request = responses_request::parse(&body)?;
    let (reply, events) = completions::start(state, request.chat.clone(), "resp").await?;
    let answer = Answer { message_id: format!("msg_{:032x}", rand::random::<u128>()), request, reply };
    if answer.reply.request.stream {
        Ok(stream(answer, events))
    } else {
        let Collected { texts, summaries, .. } = completions::collect(&answer.reply, events).await?;
        let summary = summaries.into_iter().next().flatten();
        let summary = summary.ok_or_else(|| ApiError::internal("the response ended without finishing"))?;
        let text = texts.into_iter().next().unwrap_or_default();
        Ok(Json(answer.response(Some((&text, &summary)))).into_response())
    }
}

/// What a response object is built from.
struct Answer {
    request: ResponsesRequest,
    reply: Reply,
    message_id: String,
}

impl Answer {
    /// The output message item; `done` holds the final text once finished.
    fn message(&self, done: Option<&str>) -> Value {
        json!({
            "type": "message",
            "id": self.message_id,
            "status": if done.is_some() { "completed" } else { "in_progress" },
            "role": "assistant",
            "content": done.map(|t| vec![output_text(t)]).unwrap_or_default(),
        })
    }

    /// The response object: in progress (`None`) or finished with its text and summary.
    fn response(&self, done: Option<(&str, &Summary)>) -> Value {
        let req = &self.reply.request;
        let (status, incomplete, output, usage) = match done {
            None => ("in_progress", Value::Null, json!([]), Value::Null),
            Some((text, summary)) => {
                let (status, incomplete) = match summary.finish_reason {
                    FinishReason::Length => ("incomplete", json!({"reason": "max_output_tokens"})),
                    _ => ("completed", Value::Null),
                };
                let output = match self.reply.tool_calls(text, summary) {
                    Some(calls) => calls
                        .iter()
                        .map(|c| {
                            let f = &c["function"];
                            responses_tools::function_call_item(
                                f["name"].as_str().unwrap_or_default(),
                                f["arguments"].as_str().unwrap_or_default(),
                            )
                        })
                        .collect(),
                    None => vec![self.message(Some(text))],
                };
                (status, incomplete, Value::Array(output), self.usage(summary))
            }
        };
        json!({
            "id": self.reply.id,
            "object": "response",
            "created_at": self.reply.created,
            "status": status,
            "background": false,
            "error": null,
            "incomplete_details": incomplete,
            "instructions": self.request.instructions,
            "max_output_tokens": req.max_tokens,
            "metadata": self.request.metadata,
            "model": self.reply.state.model_name,
            "output": output,
            "parallel_tool_calls": true,
            "previous_response_id": null,
            "store": false,
            "temperature": req.sampling.temperature,
            "text": self.request.text,
            "tool_choice": self.request.tool_choice,
            "tools": self.request.tools,
            "top_p": req.sampling.top_p,
            "truncation": "disabled",
            "usage": usage,
        })
    }

    fn usage(&self, summary: &Summary) -> Value {
        let input = self.reply.prompts.first().map_or(0, |p| p.ids.len());
        let output = summary.tokens.len();
        json!({
            "input_tokens": input,
            "input_tokens_details": {"cached_tokens": summary.cached_prompt_tokens},
            "output_tokens": output,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input + output,
        })
    }
}

fn output_text(text: &str) -> Value {
    json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []})
}

/// The streamed response: typed events, each `event: <type>` + `data: {...}` with a
/// `sequence_number`. Dropping the body (a client gone) aborts the engine request, as on chat.
fn stream(answer: Answer, events: mpsc::UnboundedReceiver<ChoiceEvent>) -> Response {
    let start = Events { answer, events, text: String::new(), sequence: 0, queue: Vec::new(), finished: false };
    let body = futures_util::stream::unfold(start, |mut s| async move {
        s.next().await.map(|bytes| (Ok::<Bytes, Infallible>(bytes), s))
    });
    ([(header::CONTENT_TYPE, "text/event-stream"), (header::CACHE_CONTROL, "no-cache")], Body::from_stream(body))
        .into_response()
}

struct Events {
    answer: Answer,
    events: mpsc::UnboundedReceiver<ChoiceEvent>,
    /// The text so far.
    text: String,
    sequence: u64,
    /// Encoded events not yet sent, in reverse order.
    queue: Vec<Bytes>,
    finished: bool,
}

impl Events {
    async fn next(&mut self) -> Option<Bytes> {
        if self.sequence == 0 {
            self.opening();
        }
        loop {
            if let Some(bytes) = self.queue.pop() {
                return Some(bytes);
            }
            if self.finished {
                return None;
            }
            let mut batch = Vec::new();
            match self.events.recv().await {
                Some((_, Ok(Event::Text(delta)))) => {
                    self.text.push_str(&delta);
                    batch.push(self.part_event("response.output_text.delta", json!({"delta": delta, "logprobs": []})));
                }
                Some((_, Ok(Event::Logprobs(_)))) => {}
                Some((_, Ok(Event::Done(summary)))) => {
                    let text = std::mem::take(&mut self.text);
                    batch.push(self.part_event("response.output_text.done", json!({"text": text, "logprobs": []})));
                    batch.push(self.part_event("response.content_part.done", json!({"part": output_text(&text)})));
                    let item = self.answer.message(Some(&text));
                    batch.push(self.event("response.output_item.done", json!({"output_index": 0, "item": item})));
                    let kind = match summary.finish_reason {
                        FinishReason::Length => "response.incomplete",
                        _ => "response.completed",
                    };
                    let response = self.answer.response(Some((&text, &summary)));
                    batch.push(self.event(kind, json!({"response": response})));
                    self.finished = true;
                }
                Some((_, Err(e))) => {
                    let shutting_down = self.answer.reply.state.shutting_down.load(Ordering::SeqCst);
                    let error = ApiError::from_engine(e, shutting_down);
                    let fields = json!({"code": error.code, "message": error.message, "param": error.param});
                    batch.push(self.event("error", fields));
                    self.finished = true;
                }
                None => {
                    let error = json!({"code": null, "message": "the response ended without finishing", "param": null});
                    batch.push(self.event("error", error));
                    self.finished = true;
                }
            }
            batch.reverse();
            self.queue = batch;
        }
    }

    /// The events before any text: created, in progress, the message item and its text part.
    fn opening(&mut self) {
        let response = self.answer.response(None);
        let mut batch = vec![
            self.event("response.created", json!({"response": response})),
            self.event("response.in_progress", json!({"response": response})),
        ];
        let item = self.answer.message(None);
        batch.push(self.event("response.output_item.added", json!({"output_index": 0, "item": item})));
        batch.push(self.part_event("response.content_part.added", json!({"part": output_text("")})));
        batch.reverse();
        self.queue = batch;
    }

    /// An event about the message's (only) text part.
    fn part_event(&mut self, kind: &str, mut fields: Value) -> Bytes {
        fields["item_id"] = json!(self.answer.message_id);
        fields["output_index"] = json!(0);
        fields["content_index"] = json!(0);
        self.event(kind, fields)
    }

    fn event(&mut self, kind: &str, mut fields: Value) -> Bytes {
        fields["type"] = json!(kind);
        fields["sequence_number"] = json!(self.sequence);
        self.sequence += 1;
        Bytes::from(format!("event: {kind}\ndata: {fields}\n\n"))
    }
}

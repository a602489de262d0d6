//! `POST /v1/responses`: OpenAI's Responses API over the chat path, whole or streamed as its
//! typed server-sent events (`response.created`, `response.in_progress`,
//! `response.output_item.added`, `response.content_part.added`, `response.output_text.delta`,
//! `response.output_text.done`, `response.content_part.done`, `response.output_item.done`,
//! `response.completed`; with tools, `function_call` items whose arguments stream as
//! `response.function_call_arguments.delta` / `.done`). Errors before the stream are OpenAI-shaped JSON; an engine error
//! after it began is an `error` event. Stateless: see [`super::responses_request`].
//!
//! With `include: ["message.output_text.logprobs"]`, the `output_text` part carries each
//! token's `logprobs` (`token`, `bytes`, `logprob`, `top_logprobs`), and so does each
//! `response.output_text.delta` for the tokens of its delta; otherwise they are `[]`.

use std::collections::VecDeque;
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

use super::answer_stream::AnswerStream;
use super::completions::{self, ChoiceEvent, Collected, Reply};
use super::error::ApiError;
use super::responses_request::{self, ResponsesRequest};
use super::responses_tools;
use super::tool_stream::Piece;
use super::AppState;
use crate::engine::{Event, FinishReason, Summary, TokenLogprob};

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
        let Collected { texts, summaries, logprobs } = completions::collect(&answer.reply, events).await?;
        let summary = summaries.into_iter().next().flatten();
        let summary = summary.ok_or_else(|| ApiError::internal("the response ended without finishing"))?;
        let text = texts.into_iter().next().unwrap_or_default();
        let logprobs = logprobs.into_iter().next().unwrap_or_default();
        let output = answer.output(&text, &summary, &logprobs);
        Ok(Json(answer.response(Some((output, &summary)))).into_response())
    }
}

/// What a response object is built from.
struct Answer {
    request: ResponsesRequest,
    reply: Reply,
    message_id: String,
}

impl Answer {
    /// The output message item; `done` holds the final text once finished, with its tokens'
    /// log-probabilities (`[]` unless asked for).
    fn message(&self, done: Option<(&str, &[Value])>) -> Value {
        json!({
            "type": "message",
            "id": self.message_id,
            "status": if done.is_some() { "completed" } else { "in_progress" },
            "role": "assistant",
            "content": done.map(|(t, l)| vec![output_text(t, l)]).unwrap_or_default(),
        })
    }

    /// `tokens`' log-probabilities in the Responses API's shape (chat's `content` entries).
    fn logprobs(&self, tokens: &[TokenLogprob]) -> Vec<Value> {
        let chat = self.reply.logprobs(tokens, &mut 0);
        chat["content"].as_array().cloned().unwrap_or_default()
    }

    /// The output items of a finished answer `text`: its calls as `function_call` items, then
    /// its text (all of it, or what the model wrote after its calls) as a message, with the
    /// log-probabilities of its tokens (of those that end the answer, after calls).
    fn output(&self, text: &str, summary: &Summary, logprobs: &[TokenLogprob]) -> Vec<Value> {
        match self.reply.tool_calls(text, summary) {
            Some((calls, after)) => {
                let mut items: Vec<Value> =
                    calls.iter().map(|(n, a)| responses_tools::function_call_item(n, a, "completed")).collect();
                if !after.is_empty() {
                    items.push(self.message(Some((&after, &self.logprobs(covering_tail(logprobs, &after))))));
                }
                items
            }
            None => vec![self.message(Some((text, &self.logprobs(logprobs))))],
        }
    }

    /// The response object: in progress (`None`) or finished with its output items and summary.
    fn response(&self, done: Option<(Vec<Value>, &Summary)>) -> Value {
        let req = &self.reply.request;
        let (status, incomplete, output, usage) = match done {
            None => ("in_progress", Value::Null, json!([]), Value::Null),
            Some((output, summary)) => {
                let (status, incomplete) = match summary.finish_reason {
                    FinishReason::Length => ("incomplete", json!({"reason": "max_output_tokens"})),
                    _ => ("completed", Value::Null),
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
            "parallel_tool_calls": req.tools.as_ref().is_none_or(|t| t.parallel),
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

fn output_text(text: &str, logprobs: &[Value]) -> Value {
    json!({"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs})
}

/// The last of `tokens` that together write at least as many bytes as `text` (the text after
/// an answer's calls, which the answer ends with, trimmed: a blank token may be counted).
fn covering_tail<'a>(tokens: &'a [TokenLogprob], text: &str) -> &'a [TokenLogprob] {
    let want = text.len();
    let mut written = 0;
    for (i, t) in tokens.iter().enumerate().rev() {
        written += t.text.len();
        if written >= want {
            return &tokens[i..];
        }
    }
    tokens
}

/// The streamed response: typed events, each `event: <type>` + `data: {...}` with a
/// `sequence_number`. Output items open and close as the answer's pieces come: a `message`
/// with its `output_text` part, or a `function_call` whose `arguments` stream as deltas.
/// Dropping the body (a client gone) aborts the engine request, as on chat.
fn stream(answer: Answer, events: mpsc::UnboundedReceiver<ChoiceEvent>) -> Response {
    let pieces = AnswerStream::new(&answer.reply);
    let start = Events {
        answer,
        events,
        pieces,
        sequence: 0,
        queue: VecDeque::new(),
        items: Vec::new(),
        open: None,
        finished: false,
        pending_logprobs: Vec::new(),
        message_logprobs: Vec::new(),
    };
    let body = futures_util::stream::unfold(start, |mut s| async move {
        s.next().await.map(|bytes| (Ok::<Bytes, Infallible>(bytes), s))
    });
    ([(header::CONTENT_TYPE, "text/event-stream"), (header::CACHE_CONTROL, "no-cache")], Body::from_stream(body))
        .into_response()
}

/// The output item being written.
enum Open {
    /// The message, with its text so far.
    Message(String),
    /// A `function_call` item, its `arguments` so far included.
    Call(Value),
}

struct Events {
    answer: Answer,
    events: mpsc::UnboundedReceiver<ChoiceEvent>,
    pieces: AnswerStream,
    sequence: u64,
    /// Encoded events not yet sent.
    queue: VecDeque<Bytes>,
    /// The finished output items.
    items: Vec<Value>,
    open: Option<Open>,
    finished: bool,
    /// Log-probabilities of tokens whose text is not sent yet.
    pending_logprobs: Vec<TokenLogprob>,
    /// Those of the open message's text so far (Responses' shape).
    message_logprobs: Vec<Value>,
}

impl Events {
    async fn next(&mut self) -> Option<Bytes> {
        if self.sequence == 0 {
            self.opening();
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
                    let pieces = self.pieces.push(&self.answer.reply, delta);
                    self.apply(pieces);
                }
                Some((_, Ok(Event::Logprobs(l)))) => self.pending_logprobs.extend(l),
                Some((_, Ok(Event::Done(summary)))) => self.done(&summary),
                Some((_, Err(e))) => {
                    let shutting_down = self.answer.reply.state.shutting_down.load(Ordering::SeqCst);
                    let error = ApiError::from_engine(e, shutting_down);
                    let fields = json!({"code": error.code, "message": error.message, "param": error.param});
                    self.event("error", fields);
                    self.finished = true;
                }
                None => {
                    let error = json!({"code": null, "message": "the response ended without finishing", "param": null});
                    self.event("error", error);
                    self.finished = true;
                }
            }
        }
    }

    /// The events before any text: created, in progress, and (unless the answer may be a tool
    /// call, which is held back until it is known) the message item and its text part.
    fn opening(&mut self) {
        let response = self.answer.response(None);
        self.event("response.created", json!({"response": response}));
        self.event("response.in_progress", json!({"response": response}));
        if !self.pieces.holding() {
            self.open_message();
        }
    }

    /// Sends `pieces` as events, opening and closing items as they change kind.
    fn apply(&mut self, pieces: Vec<Piece>) {
        for piece in pieces {
            match piece {
                Piece::Text(delta) => {
                    if !matches!(self.open, Some(Open::Message(_))) {
                        self.close();
                        self.open_message();
                    }
                    if let Some(Open::Message(text)) = self.open.as_mut() {
                        text.push_str(&delta);
                    }
                    // The tokens received so far wrote this text (their logprobs come first).
                    let logprobs = self.answer.logprobs(&std::mem::take(&mut self.pending_logprobs));
                    self.message_logprobs.extend(logprobs.iter().cloned());
                    self.part_event("response.output_text.delta", json!({"delta": delta, "logprobs": logprobs}));
                }
                Piece::Call(name) => {
                    self.pending_logprobs.clear();
                    self.close();
                    let item = responses_tools::function_call_item(&name, "", "in_progress");
                    self.event("response.output_item.added", json!({"output_index": self.items.len(), "item": item}));
                    self.open = Some(Open::Call(item));
                }
                Piece::Arguments(delta) => {
                    self.pending_logprobs.clear();
                    let Some(Open::Call(item)) = self.open.as_mut() else { continue };
                    let arguments = format!("{}{delta}", item["arguments"].as_str().unwrap_or_default());
                    item["arguments"] = json!(arguments);
                    let fields = json!({"item_id": item["id"], "output_index": self.items.len(), "delta": delta});
                    self.event("response.function_call_arguments.delta", fields);
                }
            }
        }
    }

    /// The answer's end: its last pieces, the open item closed (an empty message when there
    /// was no output at all), and the finished response.
    fn done(&mut self, summary: &Summary) {
        let pieces = self.pieces.finish(&self.answer.reply, summary);
        self.apply(pieces);
        if self.items.is_empty() && self.open.is_none() {
            self.open_message();
        }
        self.close();
        let kind = match summary.finish_reason {
            FinishReason::Length => "response.incomplete",
            _ => "response.completed",
        };
        let response = self.answer.response(Some((self.items.clone(), summary)));
        self.event(kind, json!({"response": response}));
        self.finished = true;
    }

    fn open_message(&mut self) {
        let item = self.answer.message(None);
        self.event("response.output_item.added", json!({"output_index": self.items.len(), "item": item}));
        self.part_event("response.content_part.added", json!({"part": output_text("", &[])}));
        self.open = Some(Open::Message(String::new()));
        self.message_logprobs.clear();
    }

    /// Closes the open item: its `done` events, and it joins the finished items.
    fn close(&mut self) {
        let index = self.items.len();
        let item = match self.open.take() {
            None => return,
            Some(Open::Message(text)) => {
                let logprobs = std::mem::take(&mut self.message_logprobs);
                self.part_event("response.output_text.done", json!({"text": text, "logprobs": logprobs}));
                self.part_event("response.content_part.done", json!({"part": output_text(&text, &logprobs)}));
                self.answer.message(Some((&text, &logprobs)))
            }
            Some(Open::Call(mut item)) => {
                item["status"] = json!("completed");
                let fields = json!({"item_id": item["id"], "output_index": index, "name": item["name"],
                                    "arguments": item["arguments"]});
                self.event("response.function_call_arguments.done", fields);
                item
            }
        };
        self.event("response.output_item.done", json!({"output_index": index, "item": item}));
        self.items.push(item);
    }

    /// An event about the open message's (only) text part.
    fn part_event(&mut self, kind: &str, mut fields: Value) {
        fields["item_id"] = json!(self.answer.message_id);
        fields["output_index"] = json!(self.items.len());
        fields["content_index"] = json!(0);
        self.event(kind, fields)
    }

    fn event(&mut self, kind: &str, mut fields: Value) {
        fields["type"] = json!(kind);
        fields["sequence_number"] = json!(self.sequence);
        self.sequence += 1;
        self.queue.push_back(Bytes::from(format!("event: {kind}\ndata: {fields}\n\n")));
    }
}

//! Streamed answers: server-sent events `data: {chunk}\n\n` ending with `data: [DONE]\n\n`,
//! as OpenAI's clients parse them.
//!
//! The response body owns the channel the choices' events arrive on: when a client
//! disconnects, hyper drops the body, the channel closes, and every choice's forwarder drops its
//! `Generation`, which aborts the engine request and frees its KV blocks.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::Ordering;

use axum::body::{Body, Bytes};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::answer_stream::AnswerStream;
use super::completions::{ChoiceEvent, Reply};
use super::error::ApiError;
use super::openai::Endpoint;
use super::tool_stream::Piece;
use crate::engine::{Event, Summary, TokenLogprob};

/// The streaming response for `reply`, fed by `events`.
pub(super) fn response(reply: Reply, events: mpsc::UnboundedReceiver<ChoiceEvent>) -> Response {
    let n = reply.choices();
    let mut stream = ChunkStream {
        queue: VecDeque::new(),
        events,
        pending: vec![Vec::new(); n],
        offsets: vec![0; n],
        summaries: vec![None; n],
        answers: (0..n).map(|_| AnswerStream::new(&reply)).collect(),
        calls_started: vec![0; n],
        finished: false,
        reply,
    };
    // The first chunks: the assistant role (chat), or the echoed prompt (completions).
    for i in 0..n {
        let prompt = &stream.reply.prompts[i / stream.reply.request.n];
        match stream.reply.request.endpoint {
            Endpoint::Chat => {
                let mut chunk = stream.choice_chunk(i, json!({"role": "assistant", "content": ""}), None, None);
                if let (0, Some(ids)) = (i, stream.reply.chat_prompt_token_ids()) {
                    // vLLM sends the prompt's ids on the first chunk.
                    chunk["prompt_token_ids"] = ids;
                }
                stream.push(&chunk);
            }
            Endpoint::Completions if stream.reply.request.echo => {
                stream.offsets[i] = prompt.text.chars().count();
                let text = prompt.text.clone();
                stream.push_choice(i, json!(text), None, None);
            }
            Endpoint::Completions => {}
        }
    }
    let body = futures_util::stream::unfold(stream, |mut s| async move {
        s.next().await.map(|bytes| (Ok::<Bytes, Infallible>(bytes), s))
    });
    ([(header::CONTENT_TYPE, "text/event-stream"), (header::CACHE_CONTROL, "no-cache")], Body::from_stream(body))
        .into_response()
}

struct ChunkStream {
    reply: Reply,
    events: mpsc::UnboundedReceiver<ChoiceEvent>,
    /// Encoded events not yet sent.
    queue: VecDeque<Bytes>,
    /// Log-probabilities waiting for the text they complete, per choice.
    pending: Vec<Vec<TokenLogprob>>,
    /// Completions' `text_offset` so far, per choice.
    offsets: Vec<usize>,
    summaries: Vec<Option<Summary>>,
    /// Per choice, its answer's pieces (text, or tool calls as they are written).
    answers: Vec<AnswerStream>,
    /// Per choice, the tool calls started (the next call's index).
    calls_started: Vec<usize>,
    finished: bool,
}

impl ChunkStream {
    /// The next event to send; `None` once `[DONE]` has been sent.
    async fn next(&mut self) -> Option<Bytes> {
        loop {
            if let Some(bytes) = self.queue.pop_front() {
                return Some(bytes);
            }
            if self.finished {
                return None;
            }
            match self.events.recv().await {
                Some((i, Ok(Event::Text(text)))) => {
                    let pieces = self.answers[i].push(&self.reply, text);
                    if !pieces.is_empty() {
                        let lp = self.take_logprobs(i);
                        self.push_pieces(i, pieces, lp);
                    }
                }
                Some((i, Ok(Event::Logprobs(l)))) => self.pending[i].extend(l),
                Some((i, Ok(Event::Done(summary)))) => {
                    let mut lp = self.take_logprobs(i);
                    let pieces = self.answers[i].finish(&self.reply, &summary);
                    if !pieces.is_empty() {
                        self.push_pieces(i, pieces, lp.take());
                    }
                    let mut finish = summary.finish_reason.as_str();
                    if self.answers[i].called() && summary.finish_reason == crate::engine::FinishReason::Stop {
                        finish = "tool_calls";
                    }
                    let delta = match self.reply.request.endpoint {
                        Endpoint::Chat => json!({}),
                        Endpoint::Completions => json!(""),
                    };
                    self.push_finish(i, delta, lp, finish, &summary);
                    self.summaries[i] = Some(summary);
                }
                Some((_, Err(e))) => {
                    // The headers are sent: the error goes in the stream, and the other
                    // choices are aborted by closing their channel.
                    let error = ApiError::from_engine(e, self.reply.state.shutting_down.load(Ordering::SeqCst));
                    self.events.close();
                    self.push(&error.body());
                    self.queue.push_back(Bytes::from_static(b"data: [DONE]\n\n"));
                    self.finished = true;
                }
                None => {
                    if self.reply.request.include_usage {
                        let usage = self.reply.usage(&self.summaries);
                        let mut chunk = self.envelope(Vec::new());
                        chunk["usage"] = usage;
                        self.push(&chunk);
                    }
                    self.queue.push_back(Bytes::from_static(b"data: [DONE]\n\n"));
                    self.finished = true;
                }
            }
        }
    }

    /// Queues choice `i`'s pieces: text as `content` (chat) or `text`, calls as `tool_calls`
    /// deltas (a call's first carries its index, id, type and name; later ones add to its
    /// `function.arguments`). `logprobs` go on the first chunk.
    fn push_pieces(&mut self, i: usize, pieces: Vec<Piece>, mut logprobs: Option<Value>) {
        let mut calls: Vec<Value> = Vec::new();
        for piece in pieces {
            match piece {
                Piece::Call(name) => {
                    calls.push(json!({
                        "index": self.calls_started[i],
                        "id": format!("chatcmpl-tool-{:032x}", rand::random::<u128>()),
                        "type": "function",
                        "function": {"name": name, "arguments": ""},
                    }));
                    self.calls_started[i] += 1;
                }
                Piece::Arguments(a) => {
                    let index = self.calls_started[i].saturating_sub(1);
                    match calls.last_mut().filter(|c| c["index"] == json!(index)) {
                        Some(c) => {
                            let joined = format!("{}{a}", c["function"]["arguments"].as_str().unwrap_or_default());
                            c["function"]["arguments"] = json!(joined);
                        }
                        None => calls.push(json!({"index": index, "function": {"arguments": a}})),
                    }
                }
                Piece::Text(text) => {
                    self.flush_calls(i, &mut calls, &mut logprobs);
                    let delta = match self.reply.request.endpoint {
                        Endpoint::Chat => json!({"content": text}),
                        Endpoint::Completions => json!(text),
                    };
                    self.push_choice(i, delta, logprobs.take(), None);
                }
            }
        }
        self.flush_calls(i, &mut calls, &mut logprobs);
    }

    fn flush_calls(&mut self, i: usize, calls: &mut Vec<Value>, logprobs: &mut Option<Value>) {
        if !calls.is_empty() {
            let calls = std::mem::take(calls);
            self.push_choice(i, json!({"tool_calls": calls}), logprobs.take(), None);
        }
    }

    fn take_logprobs(&mut self, i: usize) -> Option<Value> {
        self.reply.request.logprobs?;
        if self.pending[i].is_empty() {
            return None;
        }
        let tokens = std::mem::take(&mut self.pending[i]);
        Some(self.reply.logprobs(&tokens, &mut self.offsets[i]))
    }

    /// Queues a chunk for choice `i`: `delta` is the chat delta object or the completion text.
    fn push_choice(&mut self, i: usize, delta: Value, logprobs: Option<Value>, finish: Option<&str>) {
        let chunk = self.choice_chunk(i, delta, logprobs, finish);
        self.push(&chunk);
    }

    /// Choice `i`'s last chunk, with its token ids when asked for.
    fn push_finish(&mut self, i: usize, delta: Value, logprobs: Option<Value>, finish: &str, summary: &Summary) {
        let mut chunk = self.choice_chunk(i, delta, logprobs, Some(finish));
        self.reply.add_token_ids(&mut chunk["choices"][0], i, summary);
        self.push(&chunk);
    }

    fn choice_chunk(&self, i: usize, delta: Value, logprobs: Option<Value>, finish: Option<&str>) -> Value {
        let choice = match self.reply.request.endpoint {
            Endpoint::Chat => json!({"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}),
            Endpoint::Completions => json!({"index": i, "text": delta, "logprobs": logprobs, "finish_reason": finish}),
        };
        self.envelope(vec![choice])
    }

    fn envelope(&self, choices: Vec<Value>) -> Value {
        let mut chunk = json!({
            "id": self.reply.id,
            "object": self.reply.object(true),
            "created": self.reply.created,
            "model": self.reply.state.model_name,
            "choices": choices,
        });
        // With include_usage, OpenAI sends `"usage": null` on every chunk but the last.
        if self.reply.request.include_usage {
            chunk["usage"] = Value::Null;
        }
        chunk
    }

    fn push(&mut self, value: &Value) {
        self.queue.push_back(Bytes::from(format!("data: {value}\n\n")));
    }
}

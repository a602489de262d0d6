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

use super::completions::{ChoiceEvent, Reply};
use super::error::ApiError;
use super::openai::Endpoint;
use super::tool_stream::{Step, ToolStream};
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
        held: (0..n)
            .map(|_| (reply.request.endpoint == Endpoint::Chat && reply.holds_back("")).then(ToolStream::new))
            .collect(),
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
    /// Per chat choice, the text read while it may be a tool call, whose calls stream as they
    /// are written (`None` once released as text, or when no tools are offered).
    held: Vec<Option<ToolStream>>,
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
                    let text = match self.held[i].as_mut() {
                        Some(held) => {
                            let step = match self.reply.request.tools.as_ref() {
                                Some(tools) => held.push(&text, tools),
                                None => Step::Hold,
                            };
                            if let Step::Deltas(calls) = step {
                                let lp = self.take_logprobs(i);
                                self.push_choice(i, json!({"tool_calls": calls}), lp, None);
                                continue;
                            }
                            if held.started() || self.reply.holds_back(held.text()) {
                                continue;
                            }
                            self.held[i].take().map(|h| h.text().to_owned()).unwrap_or_default()
                        }
                        None => text,
                    };
                    let lp = self.take_logprobs(i);
                    let delta = match self.reply.request.endpoint {
                        Endpoint::Chat => json!({"content": text}),
                        Endpoint::Completions => json!(text),
                    };
                    self.push_choice(i, delta, lp, None);
                }
                Some((i, Ok(Event::Logprobs(l)))) => self.pending[i].extend(l),
                Some((i, Ok(Event::Done(summary)))) => {
                    let lp = self.take_logprobs(i);
                    let mut finish = summary.finish_reason.as_str();
                    let streamed = self.held[i].as_ref().is_some_and(ToolStream::started);
                    if streamed {
                        // The calls went out as they were written.
                        self.held[i] = None;
                        if summary.finish_reason == crate::engine::FinishReason::Stop {
                            finish = "tool_calls";
                        }
                        self.push_finish(i, json!({}), lp, finish, &summary);
                    } else if let Some(held) = self.held[i].take() {
                        // The whole answer was held back: a tool call, or text after all.
                        let held = held.text().to_owned();
                        let delta = match self.reply.tool_calls(&held, &summary) {
                            Some(mut calls) => {
                                finish = "tool_calls";
                                for (index, call) in calls.iter_mut().enumerate() {
                                    call["index"] = json!(index);
                                }
                                json!({"tool_calls": calls})
                            }
                            None => json!({"content": held}),
                        };
                        self.push_choice(i, delta, lp, None);
                        self.push_finish(i, json!({}), None, finish, &summary);
                    } else {
                        let delta = match self.reply.request.endpoint {
                            Endpoint::Chat => json!({}),
                            Endpoint::Completions => json!(""),
                        };
                        self.push_finish(i, delta, lp, finish, &summary);
                    }
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

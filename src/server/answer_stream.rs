//! One chat answer, streamed as [`Piece`]s whatever the API: text as it comes when no tool
//! may be called; with tools, the text held back while it may be a call, calls streamed as they
//! are written ([`ToolStream`]), and what was held parsed whole at the end. Chat's chunks,
//! Responses' items and Anthropic's blocks are each API's shape of these pieces.

use super::completions::Reply;
use super::openai::Endpoint;
use super::tool_stream::{Piece, ToolStream};
use crate::engine::Summary;

/// The pieces of one choice's answer.
#[derive(Debug)]
pub struct AnswerStream {
    /// The text read while it may be a tool call (`None` once released as text, or when no
    /// tools are offered).
    held: Option<ToolStream>,
    /// Calls sent so far.
    calls: usize,
}

impl AnswerStream {
    /// The stream of one chat choice of `reply` (a completion's text is never held).
    pub fn new(reply: &Reply) -> Self {
        let held = (reply.request.endpoint == Endpoint::Chat && reply.holds_back("")).then(ToolStream::new);
        AnswerStream { held, calls: 0 }
    }

    /// Whether the text is held back for now (the answer may be a tool call).
    pub fn holding(&self) -> bool {
        self.held.as_ref().is_some_and(|h| !h.started())
    }

    /// Whether the answer has called a tool.
    pub fn called(&self) -> bool {
        self.calls > 0
    }

    /// The model's next text; returns the pieces to send now.
    pub fn push(&mut self, reply: &Reply, text: String) -> Vec<Piece> {
        let Some(held) = self.held.as_mut() else {
            return if text.is_empty() { Vec::new() } else { vec![Piece::Text(text)] };
        };
        let pieces = match reply.request.tools.as_ref() {
            Some(tools) => held.push(&text, tools),
            None => Vec::new(),
        };
        if held.started() || reply.holds_back(held.text()) {
            return self.count(pieces);
        }
        // Not a call after all: what was held goes out as text, and the rest as it comes.
        let text = self.held.take().map(|h| h.text().to_owned()).unwrap_or_default();
        vec![Piece::Text(text)]
    }

    /// The pieces left once the answer has ended: the text after streamed calls that was
    /// still waiting, or the whole held answer, parsed as calls (and the text after them) or
    /// released as text.
    pub fn finish(&mut self, reply: &Reply, summary: &Summary) -> Vec<Piece> {
        let Some(mut held) = self.held.take() else { return Vec::new() };
        if held.started() {
            return self.count(held.finish());
        }
        let text = held.text();
        let pieces = match reply.tool_calls(text, summary) {
            Some((calls, after)) => {
                let mut pieces = Vec::new();
                for (name, arguments) in calls {
                    pieces.extend([Piece::Call(name), Piece::Arguments(arguments)]);
                }
                if !after.is_empty() {
                    pieces.push(Piece::Text(after));
                }
                pieces
            }
            None if text.is_empty() => Vec::new(),
            None => vec![Piece::Text(text.to_owned())],
        };
        self.count(pieces)
    }

    fn count(&mut self, pieces: Vec<Piece>) -> Vec<Piece> {
        self.calls += pieces.iter().filter(|p| matches!(p, Piece::Call(_))).count();
        pieces
    }
}

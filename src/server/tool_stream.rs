//! Streaming tool calls as OpenAI does: once a call object of Llama 3.1's form
//! (`{"name": "f", "parameters": {...}}`, after an optional `<|python_tag|>`, several separated
//! by `;` or whitespace) has shown its function's name and the `{` of its arguments, the first
//! delta carries the call's id, type and name, and every later piece of the arguments object is
//! sent as a `function.arguments` delta as the model writes it.
//!
//! Text that is not of that form (keys in another order, an unknown function) is held back to
//! the end and parsed whole, as before. Once a call has been sent it cannot be taken back: text
//! the model writes after its calls is dropped.

use serde_json::{json, Value};

use super::tools::Tools;

/// What the caller does with the text seen so far.
#[derive(Debug, PartialEq)]
pub enum Step {
    /// Nothing to send yet.
    Hold,
    /// These `tool_calls` delta entries are to be sent.
    Deltas(Vec<Value>),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    /// Before a call object (the start, or after a finished call).
    Between,
    /// Inside the current call's arguments object, `depth` brackets deep.
    Arguments { depth: usize, in_string: bool, escaped: bool },
    /// After the arguments object, before the call's closing `}`.
    Closing,
    /// The text is not streamable as calls: held to the end (no call sent yet) or dropped.
    Done,
}

/// One chat choice's tool-call streamer.
#[derive(Debug)]
pub struct ToolStream {
    text: String,
    /// Bytes of `text` already read.
    at: usize,
    state: State,
    /// Calls sent so far.
    calls: usize,
}

/// How a call object's start matched.
enum Header {
    Incomplete,
    NoMatch,
    /// The function's name, and the byte offset just past the arguments' `{`.
    Match(String, usize),
}

impl Default for ToolStream {
    fn default() -> Self {
        Self::new()
    }
}

impl ToolStream {
    /// An empty streamer.
    pub fn new() -> Self {
        Self { text: String::new(), at: 0, state: State::Between, calls: 0 }
    }

    /// Whether any call has been sent.
    pub fn started(&self) -> bool {
        self.calls > 0
    }

    /// All text received.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Adds the model's next text and returns what to send.
    pub fn push(&mut self, piece: &str, tools: &Tools) -> Step {
        self.text.push_str(piece);
        let mut deltas = Vec::new();
        loop {
            match self.state {
                State::Done => break,
                State::Between => {
                    let rest = &self.text[self.at..];
                    let skipped = skip_separators(rest, self.calls == 0);
                    self.at += rest.len() - skipped.len();
                    if skipped.is_empty() || "<|python_tag|>".starts_with(skipped) && self.calls == 0 {
                        break;
                    }
                    if self.calls > 0 && !tools.parallel {
                        self.state = State::Done;
                        break;
                    }
                    match header(skipped, tools) {
                        Header::Incomplete => break,
                        Header::NoMatch => {
                            self.state = State::Done;
                            break;
                        }
                        Header::Match(name, len) => {
                            deltas.push(json!({
                                "index": self.calls,
                                "id": format!("chatcmpl-tool-{:032x}", rand::random::<u128>()),
                                "type": "function",
                                "function": {"name": name, "arguments": "{"},
                            }));
                            self.at += len;
                            self.state = State::Arguments { depth: 1, in_string: false, escaped: false };
                        }
                    }
                }
                State::Arguments { .. } => {
                    let start = self.at;
                    self.scan_arguments();
                    if self.at > start {
                        let piece = &self.text[start..self.at];
                        deltas.push(json!({"index": self.calls, "function": {"arguments": piece}}));
                    }
                    if !matches!(self.state, State::Closing) {
                        break;
                    }
                }
                State::Closing => {
                    let rest = &self.text[self.at..];
                    let trimmed = rest.trim_start();
                    self.at += rest.len() - trimmed.len();
                    match trimmed.chars().next() {
                        None => break,
                        Some('}') => {
                            self.at += 1;
                            self.calls += 1;
                            self.state = State::Between;
                        }
                        Some(_) => {
                            // Another key after the arguments: the call as sent stands.
                            self.calls += 1;
                            self.state = State::Done;
                        }
                    }
                }
            }
        }
        if deltas.is_empty() {
            Step::Hold
        } else {
            Step::Deltas(merge(deltas))
        }
    }

    /// Reads the arguments object as far as the text goes, ending in `Closing` at its `}`.
    fn scan_arguments(&mut self) {
        let State::Arguments { mut depth, mut in_string, mut escaped } = self.state else { return };
        for (i, c) in self.text[self.at..].char_indices() {
            if in_string {
                match (escaped, c) {
                    (true, _) => escaped = false,
                    (false, '\\') => escaped = true,
                    (false, '"') => in_string = false,
                    _ => {}
                }
            } else {
                match c {
                    '"' => in_string = true,
                    '{' | '[' => depth += 1,
                    '}' | ']' => depth -= 1,
                    _ => {}
                }
                if depth == 0 {
                    self.at += i + 1;
                    self.state = State::Closing;
                    return;
                }
            }
        }
        self.at = self.text.len();
        self.state = State::Arguments { depth, in_string, escaped };
    }
}

/// Joins the argument pieces of one step into one delta per call.
fn merge(deltas: Vec<Value>) -> Vec<Value> {
    let mut out: Vec<Value> = Vec::new();
    for d in deltas {
        if let Some(last) = out.last_mut().filter(|l| l["index"] == d["index"]) {
            let joined = format!(
                "{}{}",
                last["function"]["arguments"].as_str().unwrap_or_default(),
                d["function"]["arguments"].as_str().unwrap_or_default()
            );
            last["function"]["arguments"] = json!(joined);
        } else {
            out.push(d);
        }
    }
    out
}

/// `text` past leading whitespace, `;` (between calls) and `<|python_tag|>` (first call).
fn skip_separators(text: &str, first: bool) -> &str {
    let mut rest = text.trim_start();
    if first {
        rest = rest.strip_prefix("<|python_tag|>").unwrap_or(rest).trim_start();
    } else {
        rest = rest.strip_prefix(';').unwrap_or(rest).trim_start();
    }
    rest
}

/// Matches `{"name": "<offered function>", "parameters"|"arguments": {` at the start of `text`.
fn header(text: &str, tools: &Tools) -> Header {
    let mut rest = text;
    for lit in ["{", "\"name\"", ":"] {
        match literal(rest, lit) {
            Ok(r) => rest = r,
            Err(h) => return h,
        }
    }
    rest = rest.trim_start();
    let Some(body) = rest.strip_prefix('"') else {
        return if rest.is_empty() { Header::Incomplete } else { Header::NoMatch };
    };
    let Some(end) = string_end(body) else { return Header::Incomplete };
    let Ok(name) = serde_json::from_str::<String>(&rest[..end + 2]) else { return Header::NoMatch };
    if !tools.functions.iter().any(|(n, _)| *n == name) {
        return Header::NoMatch;
    }
    rest = &body[end + 1..];
    match literal(rest, ",") {
        Ok(r) => rest = r,
        Err(h) => return h,
    }
    let key = rest.trim_start();
    rest = match (literal(key, "\"parameters\""), literal(key, "\"arguments\"")) {
        (Ok(r), _) | (_, Ok(r)) => r,
        (Err(Header::Incomplete), _) | (_, Err(Header::Incomplete)) => return Header::Incomplete,
        _ => return Header::NoMatch,
    };
    for lit in [":", "{"] {
        match literal(rest, lit) {
            Ok(r) => rest = r,
            Err(h) => return h,
        }
    }
    Header::Match(name, text.len() - rest.len())
}

/// `text` past leading whitespace and `lit`; `Incomplete` when the text ends inside it.
fn literal<'a>(text: &'a str, lit: &str) -> Result<&'a str, Header> {
    let t = text.trim_start();
    if let Some(r) = t.strip_prefix(lit) {
        Ok(r)
    } else if lit.starts_with(t) {
        Err(Header::Incomplete)
    } else {
        Err(Header::NoMatch)
    }
}

/// The byte offset of the `"` that closes a JSON string whose body starts `body`.
fn string_end(body: &str) -> Option<usize> {
    let mut escaped = false;
    for (i, c) in body.char_indices() {
        match (escaped, c) {
            (true, _) => escaped = false,
            (false, '\\') => escaped = true,
            (false, '"') => return Some(i),
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tools(parallel: bool) -> Tools {
        let body = json!({"tools": [
            {"type": "function", "function": {"name": "get_weather"}},
            {"type": "function", "function": {"name": "get_time"}}], "parallel_tool_calls": parallel});
        super::super::tools::parse(body.as_object().expect("object")).expect("ok").expect("tools")
    }

    /// Feeds `text` in pieces of `size` chars; returns the (index, name, arguments) calls the
    /// deltas add up to, and how many deltas carried arguments text.
    fn stream(text: &str, size: usize, parallel: bool) -> (Vec<(u64, String, String)>, usize) {
        let tools = tools(parallel);
        let mut s = ToolStream::new();
        let mut calls: Vec<(u64, String, String)> = Vec::new();
        let mut pieces = 0;
        let chars: Vec<char> = text.chars().collect();
        for chunk in chars.chunks(size) {
            if let Step::Deltas(ds) = s.push(&chunk.iter().collect::<String>(), &tools) {
                for d in ds {
                    let index = d["index"].as_u64().expect("index");
                    let args = d["function"]["arguments"].as_str().expect("arguments");
                    pieces += 1;
                    match d["function"]["name"].as_str() {
                        Some(name) => {
                            assert!(d["id"].is_string() && d["type"] == "function", "{d}");
                            calls.push((index, name.into(), args.into()));
                        }
                        None => calls.last_mut().expect("a call started").2.push_str(args),
                    }
                }
            }
        }
        (calls, pieces)
    }

    #[test]
    fn arguments_arrive_piece_by_piece_and_add_up() {
        let two = r#"<|python_tag|>{"name": "get_weather", "parameters": {"city": "Pa}ris\"{", "n": [1, {"a": 2}]}}; {"name": "get_time", "arguments": {"city": "Lyon"}}"#;
        for size in [1, 2, 3, 7, 1000] {
            let (calls, pieces) = stream(two, size, true);
            let want = vec![
                (0, "get_weather".to_owned(), r#"{"city": "Pa}ris\"{", "n": [1, {"a": 2}]}"#.to_owned()),
                (1, "get_time".to_owned(), r#"{"city": "Lyon"}"#.to_owned()),
            ];
            assert_eq!(calls, want, "pieces of {size}");
            if size == 1 {
                assert!(pieces > 20, "{pieces} deltas: arguments must stream");
            }
        }
        let (calls, _) = stream(two, 1, false);
        assert_eq!(calls.len(), 1);
    }

    #[test]
    fn other_text_is_not_streamed() {
        for text in [
            r#"{"parameters": {}, "name": "get_weather"}"#,
            r#"{"name": "nope", "parameters": {"a": 1}}"#,
            r#"{"name": "get_weather", "parameters": 3}"#,
            "Paris is sunny.",
        ] {
            let tools = tools(true);
            let mut s = ToolStream::new();
            for c in text.chars() {
                assert_eq!(s.push(&c.to_string(), &tools), Step::Hold, "{text}");
            }
            assert!(!s.started() && s.text() == text);
        }
    }
}

//! Streaming tool calls as they are written: once a call object of Llama 3.1's form
//! (`{"name": "f", "parameters": {...}}`, after an optional `<|python_tag|>`, several separated
//! by `;` or whitespace) has shown its function's name and the `{` of its arguments, the call
//! starts ([`Piece::Call`]) and every later piece of the arguments object follows
//! ([`Piece::Arguments`]) as the model writes it. Each API shapes the pieces its own way (chat's
//! `tool_calls` deltas, Responses' `function_call` items, Anthropic's `tool_use` blocks).
//!
//! Text that does not start as such a call (keys in another order, an unknown function) is held
//! back to the end and parsed whole. Text the model writes after its calls streams as
//! [`Piece::Text`], as [`super::tools::Tools::parse_calls`] splits a whole answer. A second
//! call without `parallel_tool_calls` is read and dropped (only the first call counts, as when
//! parsed whole); so is whatever follows an unexpected key after a call's arguments.

use super::tools::Tools;

/// A piece of a streamed answer, in the order written.
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    /// A call of this function starts; its arguments follow.
    Call(String),
    /// More of the current call's arguments (JSON text).
    Arguments(String),
    /// Free text after the calls.
    Text(String),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    /// Before a call object (the start, or after a finished call).
    Between,
    /// Inside the current call's arguments object, `depth` brackets deep.
    Arguments { depth: usize, in_string: bool, escaped: bool },
    /// After the arguments object, before the call's closing `}`.
    Closing,
    /// After the calls: free text, streamed.
    Text,
    /// The text is not streamable as calls (no call sent): held to the end.
    Held,
    /// After an unexpected key in a call: the rest is dropped.
    Dropped,
}

/// One chat choice's tool-call streamer.
#[derive(Debug)]
pub struct ToolStream {
    text: String,
    /// Bytes of `text` already read.
    at: usize,
    state: State,
    /// Calls sent so far (the current one included).
    calls: usize,
    /// Whether the call being read is dropped (a second one without `parallel_tool_calls`).
    silent: bool,
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
        Self { text: String::new(), at: 0, state: State::Between, calls: 0, silent: false }
    }

    /// Whether any call has been sent.
    pub fn started(&self) -> bool {
        self.calls > 0
    }

    /// All text received.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Adds the model's next text and returns the pieces it completes.
    pub fn push(&mut self, piece: &str, tools: &Tools) -> Vec<Piece> {
        self.text.push_str(piece);
        let mut out = Vec::new();
        loop {
            match self.state {
                State::Held | State::Dropped => break,
                State::Text => {
                    if self.at < self.text.len() {
                        out.push(Piece::Text(self.text[self.at..].to_owned()));
                        self.at = self.text.len();
                    }
                    break;
                }
                State::Between => {
                    let rest = &self.text[self.at..];
                    let skipped = skip_separators(rest, self.calls == 0);
                    self.at += rest.len() - skipped.len();
                    if skipped.is_empty() || "<|python_tag|>".starts_with(skipped) && self.calls == 0 {
                        break;
                    }
                    match header(skipped, tools) {
                        Header::Incomplete => break,
                        Header::NoMatch if self.calls == 0 => self.state = State::Held,
                        Header::NoMatch => self.state = State::Text,
                        Header::Match(name, len) => {
                            self.silent = self.calls > 0 && !tools.parallel;
                            if !self.silent {
                                self.calls += 1;
                                out.push(Piece::Call(name));
                                out.push(Piece::Arguments("{".into()));
                            }
                            self.at += len;
                            self.state = State::Arguments { depth: 1, in_string: false, escaped: false };
                        }
                    }
                }
                State::Arguments { .. } => {
                    let start = self.at;
                    self.scan_arguments();
                    if self.at > start && !self.silent {
                        out.push(Piece::Arguments(self.text[start..self.at].to_owned()));
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
                            self.silent = false;
                            self.state = State::Between;
                        }
                        // Another key after the arguments: the call as sent stands.
                        Some(_) => self.state = State::Dropped,
                    }
                }
            }
        }
        merge(out)
    }

    /// The pieces left at the end of the answer: text after the calls that was waiting to be
    /// told from the start of another call.
    pub fn finish(&mut self) -> Vec<Piece> {
        if self.state != State::Between || self.calls == 0 {
            return Vec::new();
        }
        let rest = skip_separators(&self.text[self.at..], false).to_owned();
        self.at = self.text.len();
        if rest.is_empty() {
            Vec::new()
        } else {
            vec![Piece::Text(rest)]
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

/// Joins neighbouring pieces of arguments and of text.
fn merge(pieces: Vec<Piece>) -> Vec<Piece> {
    let mut out: Vec<Piece> = Vec::new();
    for p in pieces {
        match (out.last_mut(), p) {
            (Some(Piece::Arguments(a)), Piece::Arguments(b)) | (Some(Piece::Text(a)), Piece::Text(b)) => a.push_str(&b),
            (_, p) => out.push(p),
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
    use serde_json::json;

    use super::*;

    fn tools(parallel: bool) -> Tools {
        let body = json!({"tools": [
            {"type": "function", "function": {"name": "get_weather"}},
            {"type": "function", "function": {"name": "get_time"}}], "parallel_tool_calls": parallel});
        super::super::tools::parse(body.as_object().expect("object")).expect("ok").expect("tools")
    }

    /// What a stream added up to: the (name, arguments) calls and the text after them.
    #[derive(Debug, Default, PartialEq)]
    struct Streamed {
        calls: Vec<(String, String)>,
        text: String,
        /// Pieces of arguments sent.
        argument_pieces: usize,
    }

    /// Feeds `text` in pieces of `size` chars, then finishes.
    fn stream(text: &str, size: usize, parallel: bool) -> Streamed {
        let tools = tools(parallel);
        let mut s = ToolStream::new();
        let mut out = Streamed::default();
        let chars: Vec<char> = text.chars().collect();
        let mut pieces = Vec::new();
        for chunk in chars.chunks(size) {
            pieces.extend(s.push(&chunk.iter().collect::<String>(), &tools));
        }
        pieces.extend(s.finish());
        for p in pieces {
            match p {
                Piece::Call(name) => out.calls.push((name, String::new())),
                Piece::Arguments(a) => {
                    assert!(out.text.is_empty(), "arguments after text");
                    out.calls.last_mut().expect("a call started").1.push_str(&a);
                    out.argument_pieces += 1;
                }
                Piece::Text(t) => out.text.push_str(&t),
            }
        }
        out
    }

    #[test]
    fn arguments_arrive_piece_by_piece_and_add_up() {
        let two = r#"<|python_tag|>{"name": "get_weather", "parameters": {"city": "Pa}ris\"{", "n": [1, {"a": 2}]}}; {"name": "get_time", "arguments": {"city": "Lyon"}}"#;
        let want = vec![
            ("get_weather".to_owned(), r#"{"city": "Pa}ris\"{", "n": [1, {"a": 2}]}"#.to_owned()),
            ("get_time".to_owned(), r#"{"city": "Lyon"}"#.to_owned()),
        ];
        for size in [1, 2, 3, 7, 1000] {
            let s = stream(two, size, true);
            assert_eq!((&s.calls, s.text.as_str()), (&want, ""), "pieces of {size}");
            if size == 1 {
                assert!(s.argument_pieces > 20, "{} pieces: arguments must stream", s.argument_pieces);
            }
        }
        // Without parallel calls, the second is read and dropped.
        let s = stream(&format!("{two} Done."), 1, false);
        assert_eq!((&s.calls[..], s.text.as_str()), (&want[..1], "Done."));
    }

    #[test]
    fn text_after_the_calls_streams_as_text() {
        let call = r#"{"name": "get_time", "parameters": {"city": "Lyon"}}"#;
        let lyon = vec![("get_time".to_owned(), r#"{"city": "Lyon"}"#.to_owned())];
        for (after, text) in [
            ("\n\nIt is noon in Lyon.", "It is noon in Lyon."),
            ("; {\"name\": \"nope\", \"parameters\": {}}", "{\"name\": \"nope\", \"parameters\": {}}"),
            // Cut off while it might still have been a call: text all the same.
            (" {\"na", "{\"na"),
            ("  \n", ""),
        ] {
            for size in [1, 4, 1000] {
                let s = stream(&format!("{call}{after}"), size, true);
                assert_eq!((&s.calls, s.text.as_str()), (&lyon, text), "{after:?} in pieces of {size}");
            }
        }
        // An unexpected key after the arguments: the call stands, the rest is dropped.
        let s = stream(r#"{"name": "get_time", "parameters": {}, "id": 1} text"#, 1, true);
        assert_eq!((s.calls.len(), s.text.as_str()), (1, ""));
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
                assert_eq!(s.push(&c.to_string(), &tools), vec![], "{text}");
            }
            assert_eq!(s.finish(), vec![]);
            assert!(!s.started() && s.text() == text);
        }
    }
}

//! Strict tool calls in free output (`tool_choice: "auto"` with `strict` functions): the answer
//! is either free text or, when it opens as a call, Llama 3.1's JSON tool calls whose arguments
//! follow their function's schema.
//!
//! The switch is made by the grammar itself, not by watching the text: its start is a choice
//! between a free-text lexeme that may begin with anything but `{` (after optional whitespace)
//! and the calls, which begin with `{` or `<|python_tag|>` — the two ways Llama 3.1 opens a call,
//! and the only openings the server's call parser ([`crate::server`]'s `parse_calls`) reads as a
//! call. Until the first non-blank byte is written every token is allowed (free text keeps every
//! token a free answer could take, so a free answer is the same as without the constraint); once
//! it is `{` or the tag, the rest must be `{"name": <an offered function>, "parameters": <valid
//! under its schema>}` objects (one, or several separated by whitespace or `;` with parallel
//! calls), optionally followed by free text that does not open another call.
//!
//! Parameter schemas compile leniently, as response formats do ([`super::json_schema`]): what
//! llguidance cannot enforce is checked after generation, call by call, by [`CallsCheck`].

use std::collections::HashMap;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::TokTrie;
use serde_json::{json, Value};

/// Llama 3.1's tag before a call (a special token in its vocabulary).
const PYTHON_TAG: &str = "<|python_tag|>";

/// A blank byte, in a Lark regex.
const BLANK: &str = "[ \\t\\r\\n]";

/// The functions a strict `auto` answer may call.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCalls {
    /// Each function's name and its parameters' schema; `None` for a function that is not
    /// strict (its parameters may be any object).
    pub functions: Vec<(String, Option<Value>)>,
    /// Whether one answer may hold several calls.
    pub parallel: bool,
}

impl ToolCalls {
    /// The JSON schema of one call object: an offered function's name, then its parameters.
    fn call_schema(&self) -> Value {
        let calls: Vec<Value> = self
            .functions
            .iter()
            .map(|(name, params)| {
                json!({
                    "type": "object",
                    "properties": {
                        "name": {"const": name},
                        "parameters": params.clone().unwrap_or_else(|| json!({"type": "object"}))
                    },
                    "required": ["name", "parameters"],
                    "additionalProperties": false
                })
            })
            .collect();
        json!({"x-guidance": {"lenient": true}, "anyOf": calls})
    }

    /// The grammar over `trie`'s vocabulary (the tag is offered only where it is a token).
    pub fn grammar(&self, trie: &TokTrie) -> Result<TopLevelGrammar, String> {
        if self.functions.is_empty() {
            return Err("must offer at least one function".into());
        }
        let tag = if trie.get_special_token(PYTHON_TAG).is_some() {
            format!("({PYTHON_TAG} LEAD?)? ")
        } else {
            String::new()
        };
        let more = if self.parallel { "(SEP call)* " } else { "" };
        // Every blank outside the calls' JSON is in an outer lexeme (llguidance does not hand
        // blanks it has lexed over to the nested JSON grammar): FREE and TAIL are single greedy
        // lexemes (blanks inside them are text; a blank-only answer or tail is one too), LEAD
        // the blanks before a call or its tag, SEP a `;` or blanks between calls.
        let lark = format!(
            "start: FREE? | LEAD? {tag}call {more}TAIL?\n\
             FREE: /{BLANK}+|{BLANK}*[^{{ \\t\\r\\n](?s:.)*/\n\
             TAIL: /{BLANK}+|{BLANK}*[^{{; \\t\\r\\n](?s:.)*/\n\
             SEP: /{BLANK}*;{BLANK}*|{BLANK}+/\n\
             LEAD: /{BLANK}+/\n\
             call: %json {}\n",
            self.call_schema()
        );
        Ok(TopLevelGrammar::from_lark(lark))
    }
}

/// The parameters of each call in a finished answer, checked against their function's whole
/// schema (after a lenient compile left part of it to this check).
pub struct CallsCheck {
    validators: HashMap<String, jsonschema::Validator>,
}

impl CallsCheck {
    /// The check of `calls`' strict functions; an error when a schema cannot be checked.
    pub fn new(calls: &ToolCalls, relaxed: &[String]) -> Result<CallsCheck, String> {
        let mut validators = HashMap::new();
        for (name, schema) in &calls.functions {
            let Some(schema) = schema else { continue };
            let validator = super::json_schema::validator(schema, relaxed)
                .map_err(|e| format!("function `{name}`'s parameters {e}"))?;
            validators.insert(name.clone(), validator);
        }
        Ok(CallsCheck { validators })
    }

    /// Checks a finished answer (its text, special tokens left out): free text passes; each
    /// call's parameters must be valid under its function's schema.
    pub fn check(&self, answer: &[u8]) -> Result<(), String> {
        let text = String::from_utf8_lossy(answer);
        let mut rest = text.trim_start();
        if !rest.starts_with('{') {
            return Ok(());
        }
        let mut index = 0;
        while rest.starts_with('{') {
            let mut values = serde_json::Deserializer::from_str(rest).into_iter::<Value>();
            let Some(Ok(call)) = values.next() else {
                return Err("a tool call is not JSON, which its grammar should have prevented".into());
            };
            let name = call.get("name").and_then(Value::as_str).unwrap_or_default();
            if let (Some(v), Some(params)) = (self.validators.get(name), call.get("parameters")) {
                if let Some(e) = v.iter_errors(params).next() {
                    return Err(super::json_schema::violation(
                        &e,
                        &format!("the arguments of call {index} (`{name}`)"),
                    ));
                }
            }
            let after = rest[values.byte_offset()..].trim_start();
            rest = after.strip_prefix(';').unwrap_or(after).trim_start();
            index += 1;
        }
        Ok(())
    }
}

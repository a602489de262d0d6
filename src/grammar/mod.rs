//! Structured outputs: a request's [`Constraint`] (a JSON schema, any JSON object, a regex, a
//! choice among strings, a Lark grammar) compiled by llguidance into a [`TokenMatcher`] that, at
//! every step, says which logits rows may be sampled (a bitmask as wide as the logits) and
//! follows the tokens that are.
//!
//! The vocabulary's trie is built once, on the first constrained request ([`Grammars`]), so a
//! model serving only free text never pays for it. Compiling happens on the caller's thread
//! when the request is validated, so a constraint that does not compile is a request error
//! naming its parameter, and the step loop only computes masks and commits tokens.

mod json_schema;
mod tool_calls;
mod vocabulary;

pub use tool_calls::ToolCalls;

use std::sync::{Arc, OnceLock};

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::TokEnv;

use json_schema::PostCheck;
use llguidance::{Matcher, ParserFactory};
use tool_calls::CallsCheck;

use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

/// What a generation's text must match, enforced token by token.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq)]
pub enum Constraint {
    /// JSON valid under this JSON schema.
    JsonSchema(serde_json::Value),
    /// Any JSON object.
    JsonObject,
    /// Text matching this regular expression, whole.
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// Text of this Lark grammar (llguidance's Lark dialect; `start` is the start rule).
    Lark(String),
    /// Free text, or Llama 3.1 JSON tool calls whose arguments follow their function's schema
    /// once a call opens (`tool_choice: "auto"` with strict tools; see [`ToolCalls`]).
    ToolCalls(ToolCalls),
}

/// How the error of a finished answer that breaks its JSON schema starts (a keyword the
/// grammar could not enforce, checked after generation); a grammar's dead end starts otherwise.
pub const SCHEMA_VIOLATION: &str = "the answer breaks the schema's";

impl Constraint {
    /// The request parameter an error in this constraint is reported under, unless the caller
    /// names another (the server names its own fields).
    pub fn param(&self) -> &'static str {
        match self {
            Constraint::JsonSchema(_) => "json_schema",
            Constraint::JsonObject => "json_object",
            Constraint::Regex(_) => "regex",
            Constraint::Choice(_) => "choice",
            Constraint::Lark(_) => "grammar",
            Constraint::ToolCalls(_) => "tools",
        }
    }

    /// The llguidance grammar of this constraint.
    fn grammar(&self, env: &TokEnv) -> std::result::Result<TopLevelGrammar, String> {
        Ok(match self {
            Constraint::JsonSchema(schema) => {
                if !schema.is_object() && !schema.is_boolean() {
                    return Err("a JSON schema must be an object (or a boolean)".into());
                }
                json_schema::grammar(schema)
            }
            Constraint::JsonObject => TopLevelGrammar::from_json_schema(serde_json::json!({"type": "object"})),
            Constraint::Regex(rx) => TopLevelGrammar::from_regex(rx),
            Constraint::Choice(choices) => {
                if choices.is_empty() {
                    return Err("must list at least one string".into());
                }
                // Lark string literals are JSON strings, so any text is one literal.
                let alternatives: Vec<String> =
                    choices.iter().map(|c| serde_json::Value::from(c.as_str()).to_string()).collect();
                TopLevelGrammar::from_lark(format!("start: {}", alternatives.join(" | ")))
            }
            Constraint::Lark(text) => TopLevelGrammar::from_lark(text.clone()),
            Constraint::ToolCalls(calls) => calls.grammar(env.tok_trie())?,
        })
    }
}

/// Compiles constraints against one model's vocabulary; the vocabulary's trie is built on the
/// first compile.
pub struct Grammars {
    tokenizer: Arc<Tokenizer>,
    width: usize,
    eos: Vec<u32>,
    factory: OnceLock<std::result::Result<ParserFactory, String>>,
}

impl Grammars {
    /// Grammars over `width` logits rows of `tokenizer`'s model; `eos` ends a generation (the
    /// first is the one a finished grammar allows when the others are not in the vocabulary).
    pub fn new(tokenizer: Arc<Tokenizer>, width: usize, eos: Vec<u32>) -> Self {
        Grammars { tokenizer, width, eos, factory: OnceLock::new() }
    }

    fn factory(&self) -> Result<&ParserFactory> {
        let made = self.factory.get_or_init(|| {
            let env = vocabulary::token_env(self.tokenizer.clone(), self.width, &self.eos)?;
            factory(&env)
        });
        made.as_ref().map_err(|e| Error::Backend(format!("structured outputs are unavailable for this model: {e}")))
    }

    /// `constraint` compiled into a fresh matcher; an error names `param` (or the constraint's
    /// own parameter when `None`).
    pub fn compile(&self, constraint: &Constraint, param: Option<&str>) -> Result<TokenMatcher> {
        compile(self.factory()?, constraint, param.unwrap_or(constraint.param()), &self.eos)
    }

    /// Logits rows a mask covers.
    pub fn width(&self) -> usize {
        self.width
    }
}

fn factory(env: &TokEnv) -> std::result::Result<ParserFactory, String> {
    let mut factory = ParserFactory::new_simple(env).map_err(|e| format!("llguidance: {e}"))?;
    // llguidance logs grammar warnings to stderr by default; they reach the caller as errors.
    factory.quiet();
    Ok(factory)
}

fn compile(factory: &ParserFactory, constraint: &Constraint, param: &str, eos: &[u32]) -> Result<TokenMatcher> {
    let grammar = constraint.grammar(factory.tok_env()).map_err(|m| Error::request(param, m))?;
    // The grammar is the client's: whatever it holds must end as an error naming it.
    let parser = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| factory.create_parser(grammar)))
        .map_err(|_| Error::request(param, "cannot be compiled (the grammar compiler failed on it)"))?
        .map_err(|e| Error::request(param, format!("cannot be compiled: {}", first_line(&e.to_string()))))?;
    let mut matcher = Matcher::new(Ok(parser));
    if let Some(e) = matcher.get_error() {
        return Err(Error::request(param, format!("cannot be compiled: {}", first_line(&e))));
    }
    let relaxed = match constraint {
        Constraint::JsonSchema(_) | Constraint::ToolCalls(_) => json_schema::relaxations(&matcher.grammar_warnings()),
        _ => vec![],
    };
    let check = match constraint {
        Constraint::JsonSchema(schema) => {
            PostCheck::for_schema(schema, &relaxed).map_err(|m| Error::request(param, m))?.map(Check::Whole)
        }
        Constraint::ToolCalls(calls) if !relaxed.is_empty() => {
            Some(Check::Calls(CallsCheck::new(calls, &relaxed).map_err(|m| Error::request(param, m))?))
        }
        _ => None,
    };
    let check = check.map(|c| PostChecked { check: Arc::new(c), env: factory.tok_env().clone(), tokens: vec![] });
    let width = factory.tok_env().tok_trie().vocab_size();
    Ok(TokenMatcher { matcher, eos: eos.to_vec(), width, relaxed, check })
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}

/// One generation's grammar state: which rows the next token may take, and the tokens taken.
#[derive(Clone)]
pub struct TokenMatcher {
    matcher: Matcher,
    eos: Vec<u32>,
    width: usize,
    relaxed: Vec<String>,
    check: Option<PostChecked>,
}

/// What a relaxed JSON schema's answer is checked against at the end.
enum Check {
    /// The whole answer, against the response format's schema.
    Whole(PostCheck),
    /// Each tool call's arguments, against its function's schema.
    Calls(CallsCheck),
}

/// A relaxed JSON schema's check, and the tokens of the answer it checks at the end.
#[derive(Clone)]
struct PostChecked {
    check: Arc<Check>,
    env: TokEnv,
    tokens: Vec<u32>,
}

impl std::fmt::Debug for TokenMatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenMatcher").field("width", &self.width).finish_non_exhaustive()
    }
}

impl TokenMatcher {
    /// 32-bit words of a mask over `width` rows.
    pub fn words(width: usize) -> usize {
        width.div_ceil(32)
    }

    /// Writes the rows the next token may take into `out` (bit `t % 32` of word `t / 32`; one
    /// word per 32 rows of the logits). Once the grammar is complete only EOS is allowed. An
    /// error when no row is: the grammar is at a dead end (the request must end).
    pub fn fill_mask(&mut self, out: &mut [u32]) -> std::result::Result<(), String> {
        let mask = self.matcher.compute_mask_or_eos().map_err(|e| {
            format!("the grammar allows no next token, a dead end (llguidance: {})", first_line(&e.to_string()))
        })?;
        let words = mask.as_slice();
        let n = out.len().min(words.len());
        out[..n].copy_from_slice(&words[..n]);
        out[n..].fill(0);
        if !self.width.is_multiple_of(32) {
            // Rows past the logits (the last word's tail) are never allowed.
            if let Some(last) = out.get_mut(self.width / 32) {
                *last &= (1u32 << (self.width % 32)) - 1;
            }
        }
        if out.iter().all(|&w| w == 0) {
            return Err("the grammar allows no next token, a dead end".into());
        }
        Ok(())
    }

    /// Follows the sampled `token`. An EOS token ends the generation and is not fed to the
    /// grammar; any other token the mask did not allow is an error. When the grammar is a
    /// relaxed JSON schema, the EOS that finishes the answer is an error if the answer breaks
    /// the schema (naming the keyword).
    pub fn commit(&mut self, token: u32) -> std::result::Result<(), String> {
        if self.eos.contains(&token) {
            return match &self.check {
                Some(c) => {
                    // Special tokens (`<|python_tag|>`) are no part of the JSON.
                    let text = c.env.tok_trie().decode_ext(&c.tokens, false);
                    match &*c.check {
                        Check::Whole(check) => check.check(&text),
                        Check::Calls(check) => check.check(&text),
                    }
                }
                None => Ok(()),
            };
        }
        self.matcher
            .consume_token(token)
            .map_err(|e| format!("token {token} breaks the grammar: {}", first_line(&e.to_string())))?;
        if let Some(c) = &mut self.check {
            c.tokens.push(token);
        }
        Ok(())
    }

    /// What the grammar leaves to the check after generation (a JSON schema's keywords that
    /// llguidance cannot enforce, one note each); empty when the grammar is exact.
    pub fn relaxed(&self) -> &[String] {
        &self.relaxed
    }

    /// The masks of a speculative step's rows (`draft.len() + 1` of them, `words` words each,
    /// in `out`): row `i` after `draft[..i]`. Rows after the first draft token the grammar
    /// refuses (or an EOS) allow every token: verification stops at that row, so they are never
    /// used. The grammar is left as it was. Returns each row's dead end, if it has one.
    pub fn fill_draft_masks(&mut self, draft: &[u32], out: &mut [u32], words: usize) -> Vec<Option<String>> {
        let mut dead_ends = vec![None; draft.len() + 1];
        let mut fed = 0;
        for (i, row) in out.chunks_mut(words).enumerate().take(draft.len() + 1) {
            if fed < i {
                row.fill(u32::MAX);
                continue;
            }
            if let Err(why) = self.fill_mask(row) {
                row.fill(u32::MAX);
                dead_ends[i] = Some(why);
                continue;
            }
            let next = draft.get(i).copied();
            let allowed = next.is_some_and(|t| row.get(t as usize / 32).is_some_and(|w| w >> (t % 32) & 1 == 1));
            if let Some(t) = next.filter(|t| allowed && !self.eos.contains(t)) {
                if self.matcher.consume_token(t).is_ok() {
                    fed += 1;
                }
            }
        }
        if fed > 0 {
            // Back to the state before the draft: what the step emits is committed later.
            let _ = self.matcher.rollback(fed);
        }
        dead_ends
    }

    /// Whether the grammar is complete (only EOS may follow).
    pub fn is_complete(&self) -> bool {
        self.matcher.is_stopped()
    }
}

#[cfg(test)]
mod json_schema_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tool_calls_tests;

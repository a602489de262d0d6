//! Streaming detokenization: text out as tokens come in, never a broken character.
//!
//! Decoding one token at a time is wrong in two ways: a character can span several tokens
//! (byte-level BPE splits emoji and CJK into byte tokens), and some decoders change a token's
//! text depending on what precedes it (SentencePiece's leading space). So each step decodes a
//! short window of recent tokens twice, without and with the new ones, and emits the difference
//! (the prefix-offset/read-offset technique of vLLM and text-generation-inference). A step whose
//! window ends in U+FFFD is an incomplete character: nothing is emitted until it completes.

use super::Tokenizer;
use crate::error::Result;

/// Incremental decoder returned by [`Tokenizer::stream_decoder`]; special tokens are skipped.
///
/// The pieces returned by [`push`](Self::push) followed by [`finish`](Self::finish) concatenate to
/// `decode(all ids, skip_special_tokens = true)`.
#[derive(Debug)]
pub struct StreamDecoder<'a> {
    tokenizer: &'a Tokenizer,
    /// The ids from the prefix offset on; earlier ones are never needed again.
    window: Vec<u32>,
    /// How many ids of `window` have been emitted (the read offset, relative to the window).
    read: usize,
    /// `decode(window[..read])`, the text the next decode must start with.
    prefix_text: String,
}

impl<'a> StreamDecoder<'a> {
    pub(super) fn new(tokenizer: &'a Tokenizer) -> Self {
        StreamDecoder { tokenizer, window: Vec::new(), read: 0, prefix_text: String::new() }
    }

    /// Adds one token; returns the text it completes, or `None` while a character is still
    /// incomplete (or the token is special and contributes no text).
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.window.push(id);
        let text = self.tokenizer.decode(&self.window, true)?;
        if text.len() <= self.prefix_text.len() || text.ends_with('\u{FFFD}') {
            return Ok(None);
        }
        let new = new_suffix(&self.prefix_text, &text).to_owned();
        // Slide: the tokens just read become the next step's prefix window, so its decode
        // keeps the context that decoders like SentencePiece's need.
        self.window.drain(..self.read);
        self.read = self.window.len();
        self.prefix_text = self.tokenizer.decode(&self.window, true)?;
        Ok(Some(new))
    }

    /// Ends the stream, returning whatever text is still held back (an incomplete character
    /// decodes here as U+FFFD, exactly as a full decode would show it).
    pub fn finish(self) -> Result<String> {
        let text = self.tokenizer.decode(&self.window, true)?;
        if text.len() <= self.prefix_text.len() {
            return Ok(String::new());
        }
        Ok(new_suffix(&self.prefix_text, &text).to_owned())
    }
}

/// The part of `text` after `prefix`. Decoding a longer window normally only appends; should a
/// decoder ever rewrite the tail, fall back to the text after the longest common prefix,
/// cut at a character boundary, rather than panic on a bad slice.
fn new_suffix<'t>(prefix: &str, text: &'t str) -> &'t str {
    if let Some(rest) = text.strip_prefix(prefix) {
        return rest;
    }
    let common = prefix
        .char_indices()
        .zip(text.chars())
        .find(|((_, a), b)| a != b)
        .map(|((i, _), _)| i)
        .unwrap_or(prefix.len().min(text.len()));
    text.get(common..).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::new_suffix;

    #[test]
    fn new_suffix_appends_and_survives_rewrites() {
        assert_eq!(new_suffix("ab", "abcd"), "cd");
        assert_eq!(new_suffix("", "x"), "x");
        // A rewritten tail: everything after the common prefix "a" is new.
        assert_eq!(new_suffix("ab", "aXYZ"), "XYZ");
        assert_eq!(new_suffix("é", "e\u{301}x"), "e\u{301}x");
    }
}

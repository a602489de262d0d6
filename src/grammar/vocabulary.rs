//! The model's vocabulary as llguidance sees it: every logits row's bytes in a token trie.
//!
//! llguidance's own `toktrie_hf_tokenizers` adapter pins an older `tokenizers`; instead the
//! trie is built here from the tokenizer tulu already loaded: its `tokenizer.json` form (added
//! tokens from `tokenizer_config.json` included) goes through llguidance's
//! `token_bytes_from_tokenizer_json`, and the rows past the tokenizer (vocab padding: Tülu 3 has
//! 128,264 rows for 128,257 tokens) get no bytes, so no grammar ever allows them.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use llguidance::toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};

use crate::tokenizer::Tokenizer;

/// A token trie over `width` logits rows plus the tokenizer llguidance calls to tokenize the
/// literal strings of a grammar.
struct ModelTokEnv {
    trie: TokTrie,
    tokenizer: Arc<Tokenizer>,
}

impl TokenizerEnv for ModelTokEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        // Bytes that are not UTF-8 cannot come from a grammar's text; the trie's greedy
        // tokenization is the fallback llguidance itself uses.
        match std::str::from_utf8(s) {
            Ok(text) => self.tokenizer.encode_raw(text).unwrap_or_else(|_| self.trie.greedy_tokenize(s)),
            Err(_) => self.trie.greedy_tokenize(s),
        }
    }
}

/// The llguidance token environment of `tokenizer` over `width` logits rows, with `eos` (every
/// id that ends a generation; the first is the one a finished grammar asks for) as its EOS set.
pub fn token_env(tokenizer: Arc<Tokenizer>, width: usize, eos: &[u32]) -> Result<TokEnv, String> {
    let json = tokenizer.inner().to_string(false).map_err(|e| format!("cannot serialize the tokenizer: {e}"))?;
    let json: serde_json::Value =
        serde_json::from_str(&json).map_err(|e| format!("cannot read the tokenizer's JSON: {e}"))?;
    // The parser asserts on malformed byte-fallback names rather than returning an error.
    let words = catch_unwind(AssertUnwindSafe(|| llguidance::token_bytes_from_tokenizer_json(&json)))
        .map_err(|_| "llguidance could not read the tokenizer's vocabulary".to_string())?
        .map_err(|e| format!("llguidance cannot read the tokenizer's vocabulary: {e}"))?;
    let trie = trie(words, width, eos)?;
    Ok(Arc::new(ModelTokEnv { trie, tokenizer }))
}

/// A trie of `words` (token bytes by id; special tokens start with 0xFF) padded to `width`
/// rows, with `eos` as its EOS set.
pub fn trie(mut words: Vec<Vec<u8>>, width: usize, eos: &[u32]) -> Result<TokTrie, String> {
    if words.len() > width {
        return Err(format!("the tokenizer has {} tokens, more than the {width} logits rows", words.len()));
    }
    words.resize(width, Vec::new());
    let Some(&first) = eos.first() else { return Err("the model has no EOS token".into()) };
    if let Some(bad) = eos.iter().find(|&&t| t as usize >= width) {
        return Err(format!("EOS token {bad} is outside the {width} logits rows"));
    }
    let width = u32::try_from(width).map_err(|_| format!("{width} logits rows are too many"))?;
    catch_unwind(AssertUnwindSafe(|| TokTrie::from(&TokRxInfo::new(width, first), &words).with_eos_tokens(eos)))
        .map_err(|_| "llguidance could not build the token trie".to_string())
}

/// A token environment over hand-written `words` (tests): literals are tokenized greedily.
/// With `canonical`, llguidance takes that tokenization as the only one and, where the grammar
/// forces the next bytes, allows only its first token (as it does with a real tokenizer);
/// without, every token that keeps the text inside the grammar is allowed.
#[cfg(test)]
pub fn env_of_words(words: Vec<Vec<u8>>, width: usize, eos: &[u32], canonical: bool) -> TokEnv {
    struct Greedy(TokTrie, bool);
    impl TokenizerEnv for Greedy {
        fn tok_trie(&self) -> &TokTrie {
            &self.0
        }
        fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
            self.0.greedy_tokenize(s)
        }
        fn tokenize_is_canonical(&self) -> bool {
            self.1
        }
    }
    Arc::new(Greedy(trie(words, width, eos).expect("a valid test vocabulary"), canonical))
}

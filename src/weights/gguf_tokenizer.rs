//! Byte-level BPE tokenizers as Hugging Face `tokenizer.json` files: rebuilt from a GGUF's
//! `tokenizer.ggml.*` metadata, or made up for synthetic checkpoints.
//!
//! Both paths build a `tokenizers` crate `Tokenizer` in memory and let the crate serialize it,
//! so the files are exactly what `Tokenizer::from_file` (and Python's `tokenizers`) read back.

use std::collections::{BTreeMap, HashMap};

use serde_json::{json, Map, Value};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer};

/// llama.cpp's `tokenizer.ggml.token_type` for a control token (`<|im_start|>`).
const TOKEN_TYPE_CONTROL: i64 = 3;
/// llama.cpp's `tokenizer.ggml.token_type` for a user-defined added token.
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// The pre-tokenizer a GGUF names in `tokenizer.ggml.pre`, among those tulu can rebuild.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreTokenizerKind {
    /// GPT-2's regex split plus byte-level mapping (`gpt2`, `default`).
    Gpt2,
    /// SmolLM2's: every digit on its own, then GPT-2's byte-level split (`smollm`).
    SmolLm,
}

impl PreTokenizerKind {
    /// The kind for a `tokenizer.ggml.pre` value, or `None` when tulu cannot rebuild it.
    pub fn from_gguf_name(name: &str) -> Option<Self> {
        match name {
            "gpt2" | "default" => Some(Self::Gpt2),
            "smollm" => Some(Self::SmolLm),
            _ => None,
        }
    }

    fn wrapper(self) -> PreTokenizerWrapper {
        let byte_level = ByteLevel::new(false, true, true);
        match self {
            Self::Gpt2 => byte_level.into(),
            Self::SmolLm => Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into(),
        }
    }
}

/// The tokens of a GGUF vocabulary that a byte-level BPE tokenizer is built from.
pub struct BpeSpec<'a> {
    /// Token strings in id order (`tokenizer.ggml.tokens`).
    pub tokens: &'a [String],
    /// Merge rules as `"left right"` strings, highest priority first (`tokenizer.ggml.merges`).
    pub merges: &'a [String],
    /// llama.cpp token types, one per token, when the GGUF has them.
    pub token_types: Option<&'a [i64]>,
    /// How text is split before BPE.
    pub pre: PreTokenizerKind,
    /// The id a post-processor prepends as BOS, when the tokenizer adds one itself.
    pub add_bos: Option<u32>,
}

/// The 256 printable characters GPT-2's byte-level BPE uses for the bytes 0..=255.
pub fn byte_to_char() -> [char; 256] {
    let printable = |b: u32| (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
    let mut out = ['\0'; 256];
    let mut next_unprintable = 256u32;
    for (b, slot) in out.iter_mut().enumerate() {
        let b = b as u32;
        let code = if printable(b) {
            b
        } else {
            next_unprintable += 1;
            next_unprintable - 1
        };
        // Every code is below 0x200, a valid scalar value.
        *slot = char::from_u32(code).unwrap_or('\u{fffd}');
    }
    out
}

/// Builds a byte-level BPE tokenizer; errors are messages for the caller to attach a file to.
pub fn build_bpe_tokenizer(spec: &BpeSpec) -> Result<Tokenizer, String> {
    let mut vocab: Vocab = Vocab::with_capacity(spec.tokens.len());
    for (id, token) in spec.tokens.iter().enumerate() {
        if let Some(prev) = vocab.insert(token.clone(), id as u32) {
            return Err(format!("token {token:?} appears twice (ids {prev} and {id})"));
        }
    }
    let mut merges = Vec::with_capacity(spec.merges.len());
    for (i, merge) in spec.merges.iter().enumerate() {
        // Split at the first space after the first character, as llama.cpp does, so a merge
        // whose left part is itself a space-like token still parses.
        let split = merge.char_indices().skip(1).find(|&(_, c)| c == ' ').map(|(at, _)| at);
        match split {
            Some(at) => merges.push((merge[..at].to_owned(), merge[at + 1..].to_owned())),
            None => return Err(format!("merge #{i} {merge:?} is not two tokens separated by a space")),
        }
    }
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| format!("cannot build the BPE model: {e}"))?;

    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(spec.pre.wrapper()));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    match spec.add_bos {
        None => {
            tokenizer.with_post_processor(Some(ByteLevel::default().trim_offsets(false)));
        }
        Some(bos) => {
            let bos_token =
                spec.tokens.get(bos as usize).ok_or_else(|| format!("BOS id {bos} is past the vocabulary"))?;
            let template = TemplateProcessing::builder()
                .try_single(format!("{bos_token} $A"))
                .and_then(|b| b.try_pair(format!("{bos_token} $A {bos_token} $B:1")))
                .map_err(|e| format!("BOS template: {e}"))?
                .special_tokens(vec![(bos_token.clone(), bos)])
                .build()
                .map_err(|e| format!("BOS template: {e}"))?;
            tokenizer.with_post_processor(Some(template));
        }
    }

    // Control tokens are special (skipped when decoding with skip_special_tokens, never split);
    // user-defined ones are plain added tokens that are still matched whole.
    let mut added = Vec::new();
    if let Some(types) = spec.token_types {
        if types.len() != spec.tokens.len() {
            return Err(format!("{} token types for {} tokens", types.len(), spec.tokens.len()));
        }
        for (token, &kind) in spec.tokens.iter().zip(types) {
            match kind {
                TOKEN_TYPE_CONTROL => added.push(AddedToken::from(token.clone(), true)),
                TOKEN_TYPE_USER_DEFINED => added.push(AddedToken::from(token.clone(), false)),
                _ => {}
            }
        }
    }
    let (special, plain): (Vec<_>, Vec<_>) = added.into_iter().partition(|t| t.special);
    tokenizer.add_special_tokens(&special);
    tokenizer.add_tokens(&plain);
    Ok(tokenizer)
}

/// `tokenizer_config.json` for `tokenizer` as `transformers` writes it: special-token strings,
/// the chat template and `added_tokens_decoder`.
pub fn tokenizer_config_json(
    tokenizer: &Tokenizer,
    ids: &SpecialIds,
    chat_template: Option<&str>,
    model_max_length: usize,
) -> Value {
    let name = |id: Option<u32>| id.and_then(|id| tokenizer.id_to_token(id)).map(Value::String).unwrap_or(Value::Null);
    // BTreeMap by id so the file is stable from run to run (the decoder is a hash map).
    let decoder: BTreeMap<u32, AddedToken> = tokenizer.get_added_tokens_decoder().into_iter().collect();
    let mut added = Map::new();
    for (id, t) in decoder {
        added.insert(
            id.to_string(),
            json!({
                "content": t.content,
                "lstrip": t.lstrip,
                "normalized": t.normalized,
                "rstrip": t.rstrip,
                "single_word": t.single_word,
                "special": t.special,
            }),
        );
    }
    let mut cfg = json!({
        "add_bos_token": ids.add_bos,
        "add_eos_token": false,
        "added_tokens_decoder": added,
        "bos_token": name(ids.bos),
        "eos_token": name(ids.eos),
        "pad_token": name(ids.pad),
        "unk_token": name(ids.unk),
        "clean_up_tokenization_spaces": false,
        "model_max_length": model_max_length,
        "tokenizer_class": "PreTrainedTokenizerFast",
    });
    if let Some(template) = chat_template {
        cfg["chat_template"] = Value::String(template.to_owned());
    }
    cfg
}

/// The special-token ids `tokenizer_config.json` names by string.
#[derive(Debug, Clone, Default)]
pub struct SpecialIds {
    /// Beginning of sequence.
    pub bos: Option<u32>,
    /// The end-of-turn token the chat template closes messages with.
    pub eos: Option<u32>,
    /// Padding.
    pub pad: Option<u32>,
    /// Unknown token.
    pub unk: Option<u32>,
    /// Whether callers should prepend BOS themselves (`add_bos_token`).
    pub add_bos: bool,
}

/// Common English words whose merges make the built-in synthetic tokenizer produce multi-byte
/// tokens, so tests see realistic token counts rather than one token per byte.
const SYNTH_WORDS: &[&str] = &[
    " the", " a", " of", " and", " to", " in", " is", " it", " that", " for", " you", " was", " on", " are", " with",
    " as", " be", " this", " have", " not", " at", " by", " from", " or", " one", " had", " but", " what", " all",
    " were", " we", " when", " your", " can", " said", " there", " use", " an", " each", " which", " she", " do",
    " how", " their", " if", " will", " up", " other", " about", " out", " many", " then", " them", " these", " so",
    " some", " her", " would", " make", " like", " him", " into", " time", " has", " look", " two", " more", " write",
    " go", " see", " number", " no", " way", " could", " people", " my", " than", " first", " water", " been", " call",
    " who", " its", " now", " find", " long", " down", " day", " did", " get", " come", " made", " may", " part",
    " hello", " world", " capital", " France", " Paris", "The", "What", "Hello", "ing", "ed", "er", "es", "ly", "\n\n",
    "  ",
];

/// The token strings and merges of the built-in synthetic tokenizer's ordinary vocabulary:
/// the 256 byte tokens, then tokens made by merging `SYNTH_WORDS` left to right, at most
/// `budget` tokens in all.
pub fn synth_bpe_vocab(budget: usize) -> (Vec<String>, Vec<String>) {
    let chars = byte_to_char();
    let mut tokens: Vec<String> = chars.iter().map(|c| c.to_string()).collect();
    tokens.truncate(budget);
    let mut known: HashMap<String, ()> = tokens.iter().map(|t| (t.clone(), ())).collect();
    let mut merges = Vec::new();
    'words: for word in SYNTH_WORDS {
        let mapped: Vec<String> = word.bytes().map(|b| chars[b as usize].to_string()).collect();
        let mut left = mapped[0].clone();
        for right in &mapped[1..] {
            let joined = format!("{left}{right}");
            if !known.contains_key(&joined) {
                if tokens.len() >= budget {
                    break 'words;
                }
                merges.push(format!("{left} {right}"));
                tokens.push(joined.clone());
                known.insert(joined.clone(), ());
            }
            left = joined;
        }
    }
    (tokens, merges)
}

//! Tokenizer, chat template and streaming detokenizer, behaving as Hugging Face transformers'
//! `AutoTokenizer` does for the same files.
//!
//! `tokenizer.json` is run by the `tokenizers` crate (the same Rust core transformers uses);
//! `tokenizer_config.json` adds what transformers layers on top: the chat template
//! ([`chat`]), the named special tokens, and added tokens missing from `tokenizer.json`.
//! transformers' `clean_up_tokenization_spaces` is never applied: it is a Python-side rewrite of
//! decoded text (`" ."` → `"."`) that streamed text cannot follow, and vLLM skips it too.

pub mod chat;
mod message;
pub mod stream;

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
pub use chat::{ChatTemplate, SpecialTokens};
pub use message::{ChatMessage, FunctionCall, ToolCall};
pub use stream::StreamDecoder;

/// A model's tokenizer: encoding, decoding and chat-template rendering.
#[derive(Debug)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// tokenizer.json's path, named by every encode/decode error.
    file: PathBuf,
    vocab_size: usize,
    special: SpecialTokens,
    chat: ChatState,
}

/// Whether the model has a chat template, and whether it is usable.
#[derive(Debug)]
enum ChatState {
    /// No template; the reason is shown to a user who asks for chat.
    Missing(String),
    /// A template that cannot be used (a syntax error, no `default` entry): kept as an error
    /// for chat requests rather than failing the load, so plain prompts still work.
    Invalid(String),
    Ready(ChatTemplate),
}

impl Tokenizer {
    /// tokenizer.json (required) + tokenizer_config.json (optional: chat_template, bos_token,
    /// eos_token, added special tokens).
    pub fn from_files(tokenizer_json: &Path, tokenizer_config: Option<&Path>) -> Result<Self> {
        Self::load(tokenizer_json, tokenizer_config, None)
    }

    /// Same, from a model directory (tokenizer_config.json used if present). A
    /// `chat_template.jinja` beside them, as newer transformers saves, overrides the config's
    /// template, as it does in transformers.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let config = dir.join("tokenizer_config.json");
        let template = dir.join("chat_template.jinja");
        Self::load(
            &dir.join("tokenizer.json"),
            config.is_file().then_some(config.as_path()),
            template.is_file().then_some(template.as_path()),
        )
    }

    fn load(tokenizer_json: &Path, tokenizer_config: Option<&Path>, template_file: Option<&Path>) -> Result<Self> {
        let tok_err = |file: &Path, message: String| Error::Tokenizer { file: file.to_path_buf(), message };
        let bytes = std::fs::read(tokenizer_json).map_err(|e| tok_err(tokenizer_json, format!("cannot read: {e}")))?;
        let mut inner = tokenizers::Tokenizer::from_bytes(&bytes)
            .map_err(|e| tok_err(tokenizer_json, format!("not a valid tokenizer.json: {e}")))?;
        // Some tokenizer.json files carry training-time truncation/padding; transformers ignores
        // them unless asked, and a silently truncated prompt would be a wrong prompt.
        inner.with_truncation(None).map_err(|e| tok_err(tokenizer_json, format!("cannot disable truncation: {e}")))?;
        inner.with_padding(None);

        let mut special = SpecialTokens::default();
        let mut chat = ChatState::Missing("the model has no tokenizer_config.json".into());
        if let Some(config_path) = tokenizer_config {
            let text =
                std::fs::read_to_string(config_path).map_err(|e| tok_err(config_path, format!("cannot read: {e}")))?;
            let config: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| tok_err(config_path, format!("not valid JSON: {e}")))?;
            if !config.is_object() {
                return Err(tok_err(config_path, "expected a JSON object".into()));
            }
            add_config_tokens(&mut inner, &config).map_err(|m| tok_err(config_path, m))?;
            special = SpecialTokens {
                bos_token: token_string(&config, "bos_token").map_err(|m| tok_err(config_path, m))?,
                eos_token: token_string(&config, "eos_token").map_err(|m| tok_err(config_path, m))?,
                unk_token: token_string(&config, "unk_token").map_err(|m| tok_err(config_path, m))?,
                pad_token: token_string(&config, "pad_token").map_err(|m| tok_err(config_path, m))?,
            };
            // transformers adds named special tokens the vocabulary lacks.
            for token in
                [&special.bos_token, &special.eos_token, &special.unk_token, &special.pad_token].into_iter().flatten()
            {
                if inner.token_to_id(token).is_none() {
                    inner.add_special_tokens(&[tokenizers::AddedToken::from(token.clone(), true)]);
                }
            }
            let field = config.get("chat_template").unwrap_or(&serde_json::Value::Null);
            chat = match chat::template_source(field) {
                Ok(Some(source)) => compile(source),
                Ok(None) => ChatState::Missing(format!("{} has no chat_template", config_path.display())),
                Err(message) => ChatState::Invalid(format!("{}: {message}", config_path.display())),
            };
        }
        if let Some(path) = template_file {
            chat = match std::fs::read_to_string(path) {
                Ok(source) => compile(source),
                Err(e) => ChatState::Invalid(format!("{}: cannot read: {e}", path.display())),
            };
        }

        let vocab_size = inner.get_vocab(true).values().max().map_or(0, |&max| max as usize + 1);
        Ok(Tokenizer { inner, file: tokenizer_json.to_path_buf(), vocab_size, special, chat })
    }

    /// Number of token ids the tokenizer can produce (max id + 1, added tokens included).
    /// Tülu 3 / Llama-3.1+pad: 128257.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// A plain prompt exactly as HF `tokenizer(prompt)` does (add_special_tokens = true, so
    /// Llama 3 gets its BOS via the post-processor; SmolLM2 gets none).
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        self.encode(text, true)
    }

    /// Encode text with no special tokens added (special-token text inside it still maps to
    /// the special ids).
    pub fn encode_raw(&self, text: &str) -> Result<Vec<u32>> {
        self.encode(text, false)
    }

    fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding =
            self.inner.encode_fast(text, add_special_tokens).map_err(|e| self.error(format!("encode: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Whether tokenizer_config.json (or chat_template.jinja) gives a chat template; a template
    /// that does not parse counts, and fails in [`render_chat`](Self::render_chat).
    pub fn has_chat_template(&self) -> bool {
        !matches!(self.chat, ChatState::Missing(_))
    }

    /// Render like HF apply_chat_template(messages, tokenize=False, add_generation_prompt).
    pub fn render_chat(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        match &self.chat {
            ChatState::Ready(template) => template.render(messages, add_generation_prompt, &self.special),
            ChatState::Missing(why) => Err(Error::ChatTemplate {
                message: format!("{why}; this model takes plain prompts, not chat messages"),
            }),
            ChatState::Invalid(message) => Err(Error::ChatTemplate { message: message.clone() }),
        }
    }

    /// Renders and encodes a chat that offers `tools`, with the model's template or the
    /// caller's (`template`, a request's `chat_template`). A template that does not render
    /// tools is a request error naming `tools`, since the model would never see them.
    pub fn encode_chat_with(
        &self,
        messages: &[ChatMessage],
        tools: Option<&serde_json::Value>,
        template: Option<&str>,
    ) -> Result<Vec<u32>> {
        let own;
        let template = match (template, &self.chat) {
            (Some(source), _) => {
                own = ChatTemplate::new(source)?;
                &own
            }
            (None, ChatState::Ready(t)) => t,
            (None, _) => return self.encode_chat(messages, true),
        };
        if tools.is_some() && !template.renders_tools(&self.special) {
            return Err(Error::request(
                "tools",
                "cannot be offered to this model: its chat template has no tool section (it never renders \
                 `tools`, so the model would not see them); pass a `chat_template` that renders them",
            ));
        }
        self.encode_raw(&template.render_with_tools(messages, true, &self.special, tools)?)
    }

    /// Render then encode with no special tokens added (HF apply_chat_template tokenize=True).
    pub fn encode_chat(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<Vec<u32>> {
        self.encode_raw(&self.render_chat(messages, add_generation_prompt)?)
    }

    /// Ids of tokenizer_config's eos_token (if it names a token), for the EOS set.
    pub fn eos_token_ids(&self) -> Vec<u32> {
        self.special.eos_token.as_deref().and_then(|t| self.token_to_id(t)).into_iter().collect()
    }

    /// The id of `token` (a vocabulary entry or added token, in its raw form), if it has one.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Decodes `ids` to text, leaving special tokens out if asked.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner.decode(ids, skip_special_tokens).map_err(|e| self.error(format!("decode: {e}")))
    }

    /// A streaming detokenizer whose pieces concatenate to `decode(all ids, true)`.
    pub fn stream_decoder(&self) -> StreamDecoder<'_> {
        StreamDecoder::new(self)
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    fn error(&self, message: String) -> Error {
        Error::Tokenizer { file: self.file.clone(), message }
    }
}

fn compile(source: String) -> ChatState {
    match ChatTemplate::new(source) {
        Ok(template) => ChatState::Ready(template),
        Err(Error::ChatTemplate { message }) => ChatState::Invalid(message),
        Err(other) => ChatState::Invalid(other.to_string()),
    }
}

/// A special token named in tokenizer_config.json: a plain string, an AddedToken object
/// `{"content": ...}`, or null.
fn token_string(config: &serde_json::Value, key: &str) -> std::result::Result<Option<String>, String> {
    match config.get(key) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        Some(obj @ serde_json::Value::Object(_)) => match obj.get("content").and_then(|c| c.as_str()) {
            Some(s) => Ok(Some(s.to_owned())),
            None => Err(format!("field `{key}`: an AddedToken object needs a string `content`")),
        },
        Some(_) => Err(format!("field `{key}`: expected a string or {{\"content\": ...}}")),
    }
}

/// Adds `added_tokens_decoder` entries that tokenizer.json lacks, as transformers does at load
/// (Tülu 3's `<pad>` at 128256 lives only there in some exports). The ids must come out as the
/// config says: a token the model was trained with at another id would corrupt every prompt.
fn add_config_tokens(inner: &mut tokenizers::Tokenizer, config: &serde_json::Value) -> std::result::Result<(), String> {
    let Some(decoder) = config.get("added_tokens_decoder") else {
        return Ok(());
    };
    let Some(decoder) = decoder.as_object() else {
        return Err("field `added_tokens_decoder`: expected an object of id → token".into());
    };
    let mut entries = Vec::with_capacity(decoder.len());
    for (id, token) in decoder {
        let field = |m: &str| format!("field `added_tokens_decoder.{id}`: {m}");
        let id: u32 = id.parse().map_err(|_| field("the key is not a token id"))?;
        let content = token.get("content").and_then(|c| c.as_str()).ok_or_else(|| field("needs a string `content`"))?;
        let flag = |name: &str, default: bool| token.get(name).and_then(|v| v.as_bool()).unwrap_or(default);
        let special = flag("special", false);
        let added = tokenizers::AddedToken::from(content, special)
            .single_word(flag("single_word", false))
            .lstrip(flag("lstrip", false))
            .rstrip(flag("rstrip", false))
            .normalized(flag("normalized", !special));
        entries.push((id, added));
    }
    entries.sort_by_key(|(id, _)| *id);
    for (id, added) in entries {
        if inner.token_to_id(&added.content).is_none() {
            if added.special {
                inner.add_special_tokens(std::slice::from_ref(&added));
            } else {
                inner.add_tokens(std::slice::from_ref(&added));
            }
        }
        match inner.token_to_id(&added.content) {
            Some(got) if got == id => {}
            got => {
                return Err(format!(
                    "field `added_tokens_decoder.{id}`: token {:?} has id {} in tokenizer.json",
                    added.content,
                    got.map_or_else(|| "none".to_owned(), |g| g.to_string())
                ))
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_string_accepts_strings_and_added_token_objects() {
        let config = serde_json::json!({"a": "<s>", "b": {"content": "</s>", "lstrip": false}, "c": null, "d": 3});
        assert_eq!(token_string(&config, "a"), Ok(Some("<s>".to_owned())));
        assert_eq!(token_string(&config, "b"), Ok(Some("</s>".to_owned())));
        assert_eq!(token_string(&config, "c"), Ok(None));
        assert_eq!(token_string(&config, "missing"), Ok(None));
        assert!(token_string(&config, "d").is_err());
    }

    #[test]
    fn tokenizer_is_send_and_sync() {
        // The engine shares one tokenizer across request threads.
        fn check<T: Send + Sync>() {}
        check::<Tokenizer>();
    }
}

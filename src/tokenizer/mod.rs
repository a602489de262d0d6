//! Tokenizer, chat template and streaming detokenizer (in progress).

pub mod chat;
pub mod stream;

/// One message of a chat conversation.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The message text.
    pub content: String,
}

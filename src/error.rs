//! The one error type of tulu: every failure names the file, tensor, field or parameter at fault.

use std::path::PathBuf;

/// Everything that can go wrong in tulu, each variant naming its culprit.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file at fault.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// `config.json` or `generation_config.json` is missing a field, mistypes one, or its
    /// numbers do not fit together.
    #[error("{}: field `{field}`: {message}", file.display())]
    Config {
        /// The config file at fault.
        file: PathBuf,
        /// The field at fault (dotted path for nested fields).
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// A safetensors file, its index, or one of its tensors is missing, malformed or mismatched.
    #[error("{}{}: {message}", file.display(), tensor.as_ref().map(|t| format!(": tensor `{t}`")).unwrap_or_default())]
    Weights {
        /// The weights file (or index) at fault.
        file: PathBuf,
        /// The tensor at fault, when one is.
        tensor: Option<String>,
        /// What is wrong.
        message: String,
    },
    /// `tokenizer.json` or `tokenizer_config.json` is missing or cannot be used.
    #[error("{}: {message}", file.display())]
    Tokenizer {
        /// The tokenizer file at fault.
        file: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The chat template does not parse or fails to render.
    #[error("chat template: {message}")]
    ChatTemplate {
        /// What is wrong, with the template's own line information where minijinja gives it.
        message: String,
    },
    /// A GGUF file cannot be converted.
    #[error("{}: {message}", file.display())]
    Gguf {
        /// The GGUF file at fault.
        file: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A generation request has an invalid parameter.
    #[error("invalid request: `{param}`: {message}")]
    Request {
        /// The parameter at fault (`prompt`, `temperature`, `top_p`, ...).
        param: String,
        /// What is wrong with it.
        message: String,
    },
    /// A model could not be resolved or downloaded from the Hugging Face hub.
    #[error("hub: model `{repo}`: {message}")]
    Hub {
        /// The repository id at fault.
        repo: String,
        /// What went wrong.
        message: String,
    },
    /// The requested device cannot be used.
    #[error("device `{device}`: {message}")]
    Device {
        /// The device as the user named it.
        device: String,
        /// Why it cannot be used.
        message: String,
    },
    /// The engine cannot take the request now: its waiting queue is full (try again later).
    #[error("busy: {message}")]
    Busy {
        /// Why.
        message: String,
    },
    /// The engine is shutting down: it takes no new request, and aborts what is left at its
    /// deadline.
    #[error("shutting down: {message}")]
    ShuttingDown {
        /// What happened to the request.
        message: String,
    },
    /// The engine has failed (a device lost, a rank dead, a collective timed out): this request
    /// and every other fails, and the engine takes no more; its process should be restarted.
    #[error("the engine has failed: {message}")]
    EngineFailed {
        /// Why.
        message: String,
    },
    /// A request's logits were not finite (NaN or infinity), so no token could be sampled: the
    /// weights or activations overflowed. The request ends instead of emitting a meaningless
    /// token; other requests are unaffected.
    #[error(
        "the logits at position {position} are not finite (NaN or infinity; first on rank {rank}'s \
         vocabulary shard): the model's weights or activations overflowed, so the request ends here"
    )]
    NonFiniteLogits {
        /// The position (in the sequence) of the token whose logits they are.
        position: usize,
        /// The tensor-parallel rank whose shard of the logits holds the first non-finite value.
        rank: usize,
    },
    /// A request's structured-output grammar cannot go on: it allows no next token (a dead
    /// end) or its matcher failed. The request ends here; other requests are unaffected.
    #[error("structured output: {message}; the request ends here")]
    Grammar {
        /// What happened, and at which generated token.
        message: String,
    },
    /// A backend operation failed (a bug or an exhausted resource, not bad input).
    #[error("backend: {0}")]
    Backend(String),
}

/// tulu's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }

    /// An invalid request parameter.
    pub fn request(param: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Request { param: param.into(), message: message.into() }
    }

    /// A weights error on `file`, optionally naming a tensor.
    pub fn weights(file: impl Into<PathBuf>, tensor: Option<&str>, message: impl Into<String>) -> Self {
        Error::Weights { file: file.into(), tensor: tensor.map(str::to_owned), message: message.into() }
    }

    /// A config error on `file`'s `field`.
    pub fn config(file: impl Into<PathBuf>, field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Config { file: file.into(), field: field.into(), message: message.into() }
    }
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Backend(e.to_string())
    }
}

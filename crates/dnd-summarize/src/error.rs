use std::path::PathBuf;

use dnd_models::ModelError;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Why a reply gives no usable label. Kept in the [`crate::Exchange`] rather than returned
/// as an error, so that the request and the reply are recorded either way.
#[derive(Debug, Clone, PartialEq, Eq, Error, Serialize, Deserialize)]
#[serde(tag = "problem", rename_all = "snake_case")]
pub enum ReplyError {
    #[error("the reply is empty")]
    Empty,
    #[error("the reply has {words} words; a label has at most {max}")]
    TooManyWords { words: usize, max: usize },
    #[error("the reply is {chars} characters long; a label has at most {max}")]
    TooLong { chars: usize, max: usize },
}

/// Errors of the summarisers: configuration, the LLM endpoint, the local model.
#[derive(Debug, Error)]
pub enum SummarizeError {
    /// A config value or an argument that cannot work; `field` names it as the user wrote it.
    #[error("invalid {field}: {reason}")]
    Invalid { field: String, reason: String },

    /// The server answered with a 4xx status other than 429: retrying cannot help.
    #[error("{url} answered {status}: {message}{}", help.as_deref().map(|h| format!("\n  help: {h}")).unwrap_or_default())]
    Rejected { url: String, status: u16, message: String, help: Option<String> },

    /// No connection could be made (wrong `base_url`, server down), after every retry.
    #[error(
        "cannot reach {url} ({attempts} attempts): {reason}\n  help: check openai.base_url and that the server is running"
    )]
    Unreachable { url: String, attempts: u32, reason: String },

    /// The server kept failing (429 or 5xx) or timing out until the retries ran out.
    #[error("{url} failed {attempts} attempts; the last: {last}")]
    RetriesExhausted { url: String, attempts: u32, last: String },

    /// A 2xx response that is not an OpenAI chat completion.
    #[error("{url} sent a malformed chat completion: {reason}; body: {body}")]
    MalformedResponse { url: String, reason: String, body: String },

    #[error(transparent)]
    Model(#[from] ModelError),

    #[error("cannot use the tokenizer {path}: {reason}")]
    Tokenizer { path: PathBuf, reason: String },

    /// The model's chat template does not compile or render.
    #[error("chat template of {model}: {reason}")]
    ChatTemplate { model: String, reason: String },

    #[error("language model computation failed: {0}")]
    Candle(#[from] candle_core::Error),

    #[error("internal error: {0}")]
    Internal(String),
}

impl SummarizeError {
    pub(crate) fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        SummarizeError::Invalid { field: field.into(), reason: reason.into() }
    }

    /// True when the user can fix it (a config value, a key, a model path); false for
    /// failures of the server or inside dnd.
    pub fn is_user_error(&self) -> bool {
        match self {
            SummarizeError::Invalid { .. }
            | SummarizeError::Rejected { .. }
            | SummarizeError::Unreachable { .. }
            | SummarizeError::Tokenizer { .. }
            | SummarizeError::ChatTemplate { .. } => true,
            SummarizeError::Model(e) => e.is_user_error(),
            SummarizeError::RetriesExhausted { .. }
            | SummarizeError::MalformedResponse { .. }
            | SummarizeError::Candle(_)
            | SummarizeError::Internal(_) => false,
        }
    }
}

impl From<tokio::task::JoinError> for SummarizeError {
    fn from(e: tokio::task::JoinError) -> Self {
        SummarizeError::Internal(format!("the language model thread failed: {e}"))
    }
}

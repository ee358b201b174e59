use std::path::PathBuf;

use thiserror::Error;

/// Errors of model loading and inference.
#[derive(Debug, Error)]
pub enum ModelError {
    /// A model reference that is not a path nor `hf:<repo>[@revision]`.
    #[error("invalid model reference `{reference}`: {reason}")]
    BadReference { reference: String, reason: String },

    /// The checkpoint is not where the reference says; `help` tells how to provide it.
    #[error("model not found: {what}\n  help: {help}")]
    NotFound { what: String, help: String },

    /// The checkpoint exists but does not fit the architecture.
    #[error("checkpoint {path} does not fit: {reason}")]
    Checkpoint { path: PathBuf, reason: String },

    /// A weights file dnd cannot use: what it holds, what dnd reads, what to do.
    #[error("cannot use checkpoint {path}: it is {found}\n  expected: {expected}\n  help: {help}")]
    BadCheckpoint { path: PathBuf, found: String, expected: String, help: String },

    #[error("invalid model config {path}: {reason}")]
    Config { path: PathBuf, reason: String },

    /// A dictionary of units (SAE, directions) dnd cannot use on the layer it is given for.
    #[error("cannot use dictionary {path}: {reason}")]
    Dictionary { path: PathBuf, reason: String },

    #[error("unknown tap `{name}`; this model has: {available}")]
    UnknownTap { name: String, available: String },

    /// Pooling `cls` asked of a model without a class token.
    #[error(
        "pooling `cls` reads the class token, and {model} has none\n  help: use pooling mean or max"
    )]
    NoClassToken { model: String },

    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },

    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

impl ModelError {
    /// True when the error is about something the user gave (a path, a config, a name),
    /// not a failure of dnd itself.
    pub fn is_user_error(&self) -> bool {
        !matches!(self, ModelError::Candle(_))
    }
}

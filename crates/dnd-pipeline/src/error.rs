use thiserror::Error;

use dnd_core::CoreError;
use dnd_models::ModelError;
use dnd_store::StoreError;

/// Errors of the pipeline's stages.
#[derive(Debug, Error)]
pub enum PipelineError {
    #[error(transparent)]
    Core(#[from] CoreError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The probe set has no image to work on.
    #[error("no probe images in {location}: {detail}")]
    NoImages { location: String, detail: String },
    /// A list of probe images (.txt/.csv) that cannot be used.
    #[error("invalid image list {location}: {reason}")]
    BadImageList { location: String, reason: String },
    /// A job file that cannot be used.
    #[error("invalid job {origin}: {reason}")]
    BadJob { origin: String, reason: String },
    /// A labels file (`dnd evaluate --labels`) that cannot be used.
    #[error("invalid labels file {origin}: {reason}")]
    BadLabels { origin: String, reason: String },
    #[error(transparent)]
    Summarize(#[from] dnd_summarize::SummarizeError),
    #[error("internal error: {0}")]
    Internal(String),
}

impl PipelineError {
    /// True when the user can fix it (bad input); false for failures inside dnd.
    pub fn is_user_error(&self) -> bool {
        match self {
            PipelineError::Core(_)
            | PipelineError::NoImages { .. }
            | PipelineError::BadImageList { .. }
            | PipelineError::BadJob { .. }
            | PipelineError::BadLabels { .. } => true,
            PipelineError::Summarize(e) => e.is_user_error(),
            PipelineError::Model(e) => e.is_user_error(),
            PipelineError::Store(e) => e.is_user_error(),
            PipelineError::Internal(_) => false,
        }
    }
}

impl From<candle_core::Error> for PipelineError {
    fn from(e: candle_core::Error) -> Self {
        PipelineError::Model(ModelError::Candle(e))
    }
}

impl From<tokio::task::JoinError> for PipelineError {
    fn from(e: tokio::task::JoinError) -> Self {
        PipelineError::Internal(format!("a worker thread failed: {e}"))
    }
}

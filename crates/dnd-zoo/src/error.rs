//! The trainer's one error type: training the target, the captioner and the embedder.

use std::path::{Path, PathBuf};

use dnd_models::ModelError;
use dnd_synth::error::SynthError;
use thiserror::Error;

/// Errors of training a zoo model or of reading a trained model's tables.
#[derive(Debug, Error)]
pub enum TrainError {
    #[error("invalid training settings: {0}")]
    Config(String),
    #[error("training diverged at step {step} (loss {loss}); lower lr")]
    Diverged { step: usize, loss: f32 },
    #[error("the data thread stopped")]
    DataThread,
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Synth(#[from] SynthError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Maps an I/O error on `path` to [`TrainError::Io`].
pub(crate) fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io { path: path.to_path_buf(), source }
}

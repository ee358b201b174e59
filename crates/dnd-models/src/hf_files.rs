//! Reading the files of a Hugging Face model directory: JSON configs, tokenizers,
//! safetensors weights, with errors that name the file.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use tokenizers::Tokenizer;

use crate::checkpoint::ModelRef;
use crate::error::ModelError;

/// Reads a JSON file of a Hugging Face model directory into `T`.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ModelError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| ModelError::Io { path: path.into(), source })?;
    serde_json::from_str(&text)
        .map_err(|e| ModelError::Config { path: path.into(), reason: e.to_string() })
}

/// A required file of a model directory, with a message naming it when it is missing.
pub fn model_file(dir: &Path, name: &str, reference: &ModelRef) -> Result<PathBuf, ModelError> {
    let path = dir.join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(ModelError::NotFound {
            what: format!("{reference} has no {name} (looked in {})", dir.display()),
            help: "a Hugging Face model directory holds config.json, model.safetensors, tokenizer.json and preprocessor_config.json; download the whole repository".into(),
        })
    }
}

pub fn load_tokenizer(path: &Path) -> Result<Tokenizer, ModelError> {
    Tokenizer::from_file(path).map_err(|e| ModelError::Config {
        path: path.into(),
        reason: format!("not a tokenizer.json: {e}"),
    })
}

/// The weights of a model directory, in f32 on `device`.
pub fn var_builder(weights: &Path, device: &Device) -> Result<VarBuilder<'static>, ModelError> {
    var_builder_as(weights, DType::F32, device)
}

/// The weights of a model directory, converted to `dtype` on `device`.
pub fn var_builder_as(
    weights: &Path,
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>, ModelError> {
    // SAFETY: the file is memory-mapped read-only; dnd never writes model files.
    unsafe { VarBuilder::from_mmaped_safetensors(&[weights], dtype, device) }.map_err(|e| {
        ModelError::Checkpoint {
            path: weights.into(),
            reason: format!("it is not a readable safetensors file ({e})"),
        }
    })
}

//! Reading the files of a Hugging Face model directory: JSON configs, tokenizers,
//! weights, with errors that name the file.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use tokenizers::Tokenizer;

use crate::checkpoint::ModelRef;
use crate::error::ModelError;
use crate::weights::Checkpoint;

/// Reads a JSON file of a Hugging Face model directory into `T`; Python's `NaN` and
/// `Infinity` are accepted ([`crate::json`]).
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ModelError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| ModelError::Io { path: path.into(), source })?;
    crate::json::from_config_str(&text)
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

/// Loads a `tokenizer.json`, with the same leniency as [`read_json`].
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer, ModelError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| ModelError::Io { path: path.into(), source })?;
    let text = crate::json::python_tokens_to_json(&text);
    Tokenizer::from_bytes(text.as_bytes()).map_err(|e| ModelError::Config {
        path: path.into(),
        reason: format!("not a tokenizer.json: {e}"),
    })
}

/// The weights of a model directory, in f32 on `device`.
pub fn var_builder(weights: &Path, device: &Device) -> Result<VarBuilder<'static>, ModelError> {
    var_builder_as(weights, DType::F32, device)
}

/// The weights of a model directory, converted to `dtype` on `device`, in any format
/// [`Checkpoint`] reads.
pub fn var_builder_as(
    weights: &Path,
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>, ModelError> {
    Checkpoint::open(weights)?.var_builder(dtype, device)
}

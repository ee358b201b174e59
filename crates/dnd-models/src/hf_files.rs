//! Reading the files of a Hugging Face model directory: JSON configs, tokenizers,
//! safetensors weights, with errors that name the file.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use tokenizers::Tokenizer;

use crate::checkpoint::ModelRef;
use crate::error::ModelError;

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

/// Tensor names and shapes from a safetensors header: an 8-byte little-endian length,
/// then that many bytes of JSON (`{"name": {"dtype", "shape", "data_offsets"}, ...}`).
pub fn safetensors_shapes(
    path: &Path,
) -> Result<std::collections::HashMap<String, Vec<usize>>, String> {
    use std::io::Read;
    /// Larger headers are not safetensors files (the format caps them at 100 MB).
    const MAX_HEADER: u64 = 100 << 20;
    #[derive(serde::Deserialize)]
    struct Entry {
        shape: Vec<usize>,
    }
    let mut file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(|e| e.to_string())?;
    let len = u64::from_le_bytes(len);
    if len > MAX_HEADER {
        return Err(format!("a header of {len} bytes"));
    }
    let mut header = vec![0u8; len as usize];
    file.read_exact(&mut header).map_err(|e| e.to_string())?;
    let raw: std::collections::HashMap<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| e.to_string())?;
    raw.into_iter()
        .filter(|(name, _)| name != "__metadata__")
        .map(|(name, v)| {
            let entry: Entry = serde_json::from_value(v).map_err(|e| format!("{name}: {e}"))?;
            Ok((name, entry.shape))
        })
        .collect()
}

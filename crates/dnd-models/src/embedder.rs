//! Image and text embeddings (stage 3's image-similarity weight), from a CLIP checkpoint.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use image::RgbImage;
use tokenizers::Tokenizer;

use crate::checkpoint::ModelRef;
use crate::clip::{ClipConfig, ClipText, ClipVision, l2_normalize};
use crate::error::ModelError;
use crate::preprocess::Preprocess;

/// Embeds images and texts into one space, L2-normalised, so a dot product is a cosine.
pub trait Embedder: Send + Sync {
    /// `(B, D)` unit vectors for a batch of images.
    fn embed_images(&self, images: &[RgbImage]) -> Result<Tensor, ModelError>;
    /// `(B, D)` unit vectors for a batch of texts.
    fn embed_texts(&self, texts: &[&str]) -> Result<Tensor, ModelError>;
}

/// Reads a JSON file of a Hugging Face model directory into `T`.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ModelError> {
    let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io { path: path.into(), source })?;
    serde_json::from_str(&text).map_err(|e| ModelError::Config { path: path.into(), reason: e.to_string() })
}

/// A required file of a model directory, with a message naming it when it is missing.
pub(crate) fn model_file(dir: &Path, name: &str, reference: &ModelRef) -> Result<PathBuf, ModelError> {
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

pub(crate) fn load_tokenizer(path: &Path) -> Result<Tokenizer, ModelError> {
    Tokenizer::from_file(path).map_err(|e| ModelError::Config { path: path.into(), reason: format!("not a tokenizer.json: {e}") })
}

/// The weights of a model directory, in f32 on `device`.
pub(crate) fn var_builder(weights: &Path, device: &Device) -> Result<VarBuilder<'static>, ModelError> {
    var_builder_as(weights, DType::F32, device)
}

/// The weights of a model directory, converted to `dtype` on `device`.
pub(crate) fn var_builder_as(weights: &Path, dtype: DType, device: &Device) -> Result<VarBuilder<'static>, ModelError> {
    // SAFETY: the file is memory-mapped read-only; dnd never writes model files.
    unsafe { VarBuilder::from_mmaped_safetensors(&[weights], dtype, device) }.map_err(|e| ModelError::Checkpoint {
        path: weights.into(),
        reason: format!("it is not a readable safetensors file ({e})"),
    })
}

/// CLIP as an [`Embedder`].
pub struct ClipEmbedder {
    pub reference: String,
    vision: ClipVision,
    text: ClipText,
    tokenizer: Tokenizer,
    pad_id: u32,
    pub preprocess: Preprocess,
    device: Device,
}

impl ClipEmbedder {
    pub fn load(reference: &ModelRef, device: &Device) -> Result<Self, ModelError> {
        let files = reference.resolve("model.safetensors")?;
        let dir = files.weights.parent().map(Path::to_path_buf).unwrap_or_default();
        let config_path = model_file(&dir, "config.json", reference)?;
        let config: ClipConfig = read_json(&config_path)?;
        let preprocess = Preprocess::from_hf_config(&model_file(&dir, "preprocessor_config.json", reference)?)?;
        let tokenizer = load_tokenizer(&model_file(&dir, "tokenizer.json", reference)?)?;
        let vb = var_builder(&files.weights, device)?;
        let checkpoint = |e: candle_core::Error| ModelError::Checkpoint { path: files.weights.clone(), reason: e.to_string() };
        let vision = ClipVision::load(&config, vb.clone()).map_err(checkpoint)?;
        let text = ClipText::load(&config, vb).map_err(checkpoint)?;
        // Pad with the tokenizer's pad token, else end-of-text (as OpenAI's CLIP does):
        // pooling never looks past the end-of-text token, so the choice cannot leak in.
        let pad_id = ["<|pad|>", "<pad>", "[PAD]"]
            .iter()
            .find_map(|t| tokenizer.token_to_id(t))
            .unwrap_or(config.text_config.eos_token_id);
        Ok(Self { reference: reference.to_string(), vision, text, tokenizer, pad_id, preprocess, device: device.clone() })
    }

    /// Token ids and attention masks, right-padded to the longest, truncated to the
    /// model's context.
    pub fn tokenize(&self, texts: &[&str]) -> Result<(Vec<Vec<u32>>, Vec<Vec<u32>>), ModelError> {
        let max = self.text.max_len();
        let mut ids: Vec<Vec<u32>> = Vec::with_capacity(texts.len());
        for t in texts {
            let enc = self.tokenizer.encode(*t, true).map_err(|e| ModelError::Config {
                path: PathBuf::from("tokenizer.json"),
                reason: format!("cannot tokenize {t:?}: {e}"),
            })?;
            let mut row = enc.get_ids().to_vec();
            if row.len() > max {
                // Keep the end-of-text token that pooling needs.
                let last = row[row.len() - 1];
                row.truncate(max);
                row[max - 1] = last;
            }
            ids.push(row);
        }
        let longest = ids.iter().map(Vec::len).max().unwrap_or(0);
        let mask = ids.iter().map(|r| (0..longest).map(|i| u32::from(i < r.len())).collect()).collect();
        for r in &mut ids {
            r.resize(longest, self.pad_id);
        }
        Ok((ids, mask))
    }

    /// Unnormalised image features for already preprocessed pixels `(B, 3, S, S)`.
    pub fn image_features(&self, pixels: &Tensor) -> Result<Tensor, ModelError> {
        Ok(self.vision.features(pixels)?)
    }

    pub fn text_features(&self, ids: &[Vec<u32>], mask: &[Vec<u32>]) -> Result<Tensor, ModelError> {
        Ok(self.text.features(ids, mask, &self.device)?)
    }
}

impl Embedder for ClipEmbedder {
    fn embed_images(&self, images: &[RgbImage]) -> Result<Tensor, ModelError> {
        let pixels = self.preprocess.batch(images, &self.device)?;
        Ok(l2_normalize(&self.image_features(&pixels)?)?)
    }

    fn embed_texts(&self, texts: &[&str]) -> Result<Tensor, ModelError> {
        let (ids, mask) = self.tokenize(texts)?;
        Ok(l2_normalize(&self.text_features(&ids, &mask)?)?)
    }
}

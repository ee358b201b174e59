//! Image and text embeddings (stage 3's image-similarity weight), from a CLIP checkpoint.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use image::RgbImage;
use tokenizers::Tokenizer;

use crate::checkpoint::ModelRef;
use crate::clip::{ClipConfig, ClipText, ClipVision, l2_normalize};
use crate::error::ModelError;
use crate::hf_files::{load_tokenizer, model_file, read_json, var_builder};
use crate::preprocess::Preprocess;

/// Token ids and attention masks of a batch of texts, one row per text.
pub type TokenBatch = (Vec<Vec<u32>>, Vec<Vec<u32>>);

/// Embeds images and texts into one space, L2-normalised, so a dot product is a cosine.
pub trait Embedder: Send + Sync {
    /// `(B, D)` unit vectors for a batch of images.
    fn embed_images(&self, images: &[RgbImage]) -> Result<Tensor, ModelError>;
    /// `(B, D)` unit vectors for a batch of texts.
    fn embed_texts(&self, texts: &[&str]) -> Result<Tensor, ModelError>;
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
        let preprocess =
            Preprocess::from_hf_config(&model_file(&dir, "preprocessor_config.json", reference)?)?;
        let tokenizer = load_tokenizer(&model_file(&dir, "tokenizer.json", reference)?)?;
        let vb = var_builder(&files.weights, device)?;
        let checkpoint = |e: candle_core::Error| ModelError::Checkpoint {
            path: files.weights.clone(),
            reason: e.to_string(),
        };
        let vision = ClipVision::load(&config, vb.clone()).map_err(checkpoint)?;
        let text = ClipText::load(&config, vb).map_err(checkpoint)?;
        // Pad with the tokenizer's pad token, else end-of-text (as OpenAI's CLIP does):
        // pooling never looks past the end-of-text token, so the choice cannot leak in.
        let pad_id = ["<|pad|>", "<pad>", "[PAD]"]
            .iter()
            .find_map(|t| tokenizer.token_to_id(t))
            .unwrap_or(config.text_config.eos_token_id);
        Ok(Self {
            reference: reference.to_string(),
            vision,
            text,
            tokenizer,
            pad_id,
            preprocess,
            device: device.clone(),
        })
    }

    /// Token ids and attention masks, right-padded to the longest, truncated to the
    /// model's context.
    pub fn tokenize(&self, texts: &[&str]) -> Result<TokenBatch, ModelError> {
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
        let mask =
            ids.iter().map(|r| (0..longest).map(|i| u32::from(i < r.len())).collect()).collect();
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

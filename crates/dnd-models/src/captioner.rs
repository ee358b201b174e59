//! Captions of images (stage 2), from a BLIP checkpoint.

use std::path::Path;

use candle_core::{Device, IndexOp, Tensor};
use image::RgbImage;
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::blip::{BlipConfig, BlipTextDecoder, BlipVision};
use crate::checkpoint::ModelRef;
use crate::error::ModelError;
use crate::hf_files::{load_tokenizer, model_file, read_json, var_builder};
use crate::preprocess::Preprocess;

/// Decoding limits; defaults are the method's (greedy, 5 to 32 new tokens).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CaptionConfig {
    pub min_new_tokens: usize,
    pub max_new_tokens: usize,
}

impl Default for CaptionConfig {
    fn default() -> Self {
        Self { min_new_tokens: 5, max_new_tokens: 32 }
    }
}

/// One image's caption.
#[derive(Debug, Clone, PartialEq)]
pub struct Caption {
    pub text: String,
    /// Generated ids, without the decoder's start token.
    pub token_ids: Vec<u32>,
}

/// Captions a batch of images.
pub trait Captioner: Send + Sync {
    fn caption(&self, images: &[RgbImage]) -> Result<Vec<Caption>, ModelError>;
}

/// BLIP as a [`Captioner`]: batched greedy decoding of all images at once.
pub struct BlipCaptioner {
    pub reference: String,
    vision: BlipVision,
    decoder: BlipTextDecoder,
    tokenizer: Tokenizer,
    bos: u32,
    sep: u32,
    pad: u32,
    pub preprocess: Preprocess,
    pub config: CaptionConfig,
    device: Device,
}

impl BlipCaptioner {
    pub fn load(
        reference: &ModelRef,
        device: &Device,
        config: CaptionConfig,
    ) -> Result<Self, ModelError> {
        if config.max_new_tokens == 0 || config.min_new_tokens > config.max_new_tokens {
            return Err(ModelError::BadReference {
                reference: reference.to_string(),
                reason: "caption limits need 0 <= min_new_tokens <= max_new_tokens and max_new_tokens >= 1".into(),
            });
        }
        let files = reference.resolve("model.safetensors")?;
        let dir = files.weights.parent().map(Path::to_path_buf).unwrap_or_default();
        let blip: BlipConfig = read_json(&model_file(&dir, "config.json", reference)?)?;
        let preprocess =
            Preprocess::from_hf_config(&model_file(&dir, "preprocessor_config.json", reference)?)?;
        let tokenizer = load_tokenizer(&model_file(&dir, "tokenizer.json", reference)?)?;
        let vb = var_builder(&files.weights, device)?;
        let checkpoint = |e: candle_core::Error| ModelError::Checkpoint {
            path: files.weights.clone(),
            reason: e.to_string(),
        };
        let vision =
            BlipVision::load(&blip.vision_config, vb.pp("vision_model")).map_err(checkpoint)?;
        let decoder = BlipTextDecoder::load(
            &blip.text_config,
            blip.vision_config.hidden_size,
            vb.pp("text_decoder"),
        )
        .map_err(checkpoint)?;
        let t = &blip.text_config;
        Ok(Self {
            reference: reference.to_string(),
            vision,
            decoder,
            tokenizer,
            bos: t.bos_token_id,
            sep: t.sep_token_id,
            pad: t.pad_token_id,
            preprocess,
            config,
            device: device.clone(),
        })
    }

    /// Vision features `(B, 1 + N, D)` of preprocessed pixels.
    pub fn encode_images(&self, pixels: &Tensor) -> Result<Tensor, ModelError> {
        Ok(self.vision.forward(pixels)?)
    }

    /// Decoder logits `(B, T, vocab)` for token ids `(B, T)` given image features.
    pub fn decoder_logits(&self, image: &Tensor, ids: &Tensor) -> Result<Tensor, ModelError> {
        let mut cache = self.decoder.start(image)?;
        Ok(self.decoder.forward(ids, &mut cache)?)
    }

    /// Greedy decoding of every image at once, as transformers' `generate` does for BLIP:
    /// start from the decoder's start token, forbid the end token until `min_new_tokens`,
    /// stop a row at its end token (then feed padding), stop when all rows are done.
    pub fn generate(&self, pixels: &Tensor) -> Result<Vec<Vec<u32>>, ModelError> {
        let image = self.encode_images(pixels)?;
        let b = image.dim(0)?;
        let mut cache = self.decoder.start(&image)?;
        let mut next = vec![self.bos; b];
        let mut done = vec![false; b];
        let mut out: Vec<Vec<u32>> = vec![Vec::new(); b];
        for step in 0..self.config.max_new_tokens {
            let ids = Tensor::from_vec(next.clone(), (b, 1), &self.device)?;
            let logits = self.decoder.forward(&ids, &mut cache)?.i((.., 0))?.to_vec2::<f32>()?;
            for (row, scores) in logits.iter().enumerate() {
                if done[row] {
                    next[row] = self.pad;
                    continue;
                }
                let mut best = (0usize, f32::NEG_INFINITY);
                for (id, &s) in scores.iter().enumerate() {
                    let forbidden = step < self.config.min_new_tokens && id as u32 == self.sep;
                    if !forbidden && s > best.1 {
                        best = (id, s);
                    }
                }
                let token = best.0 as u32;
                out[row].push(token);
                done[row] = token == self.sep;
                next[row] = token;
            }
            if done.iter().all(|&d| d) {
                break;
            }
        }
        Ok(out)
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String, ModelError> {
        self.tokenizer.decode(ids, true).map_err(|e| ModelError::Config {
            path: "tokenizer.json".into(),
            reason: format!("cannot decode ids: {e}"),
        })
    }
}

impl Captioner for BlipCaptioner {
    fn caption(&self, images: &[RgbImage]) -> Result<Vec<Caption>, ModelError> {
        let pixels = self.preprocess.batch(images, &self.device)?;
        self.generate(&pixels)?
            .into_iter()
            .map(|token_ids| Ok(Caption { text: self.decode(&token_ids)?, token_ids }))
            .collect()
    }
}

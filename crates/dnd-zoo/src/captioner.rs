//! The zoo's captioner: a tiny BLIP (ViT image encoder + BERT text decoder with
//! cross-attention, Hugging Face `BlipForConditionalGeneration` layout) trained from seeds
//! on the world's (image, caption) pairs with teacher-forced cross-entropy, and saved as a
//! model directory that `dnd_models::BlipCaptioner` loads.
//!
//! Captions are taught with a prefix ("a picture of ..."): dnd decodes with
//! `min_new_tokens = 5` by default, and a crop's caption can be three words ("a red
//! circle"); the prefix keeps every caption at least six tokens long, so the forbidden end
//! token never forces the model to invent words. The prefix's words name nothing in the
//! world, so [`dnd_synth::parse_mentions`] and dnd's summariser skip them.

use std::path::Path;
use std::time::Instant;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::pairs::{self, Pair, PairSampling};
pub use eval::{AttributeAccuracy, CaptionEval, CaptionExample, evaluate_captioner};
pub use pretrain::{PretrainReport, ViewAccuracy, VisionPretraining};
pub use slices::{CaptionerSlice, first_to_train, plan_slices, publish_last, slice_dir};

mod eval;
mod init;
mod pretrain;
mod slices;
use super::tiny_transformer::{
    Act, INIT_STD, Init, Lin, Norm, Params, TowerSize, VisionStyle, VisionTower, attention,
    causal_mask, check_all_gradients, masked_cross_entropy, named_tensors, repeat_rows,
};
use super::tokenizer::{CLS_ID, PAD_ID, SEP_ID, WorldTokenizer, write_tokenizer};
use crate::error::{TrainError, io_error};
use dnd_synth::vocab::Shape;

const VISION_EPS: f64 = 1e-5;
/// The vision tower's variables: `vision_model.*`.
const VISION_PREFIX: &str = "vision_model.";
const TEXT_EPS: f64 = 1e-12;

/// Everything that decides a trained captioner. The default is one run from scratch; the
/// committed zoo model is a chain of slices over it (`bench/captioner-slices.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CaptionerTraining {
    /// Seeds the initial weights and the stream of training pairs.
    pub seed: u64,
    /// Seeds the held-out pairs (scenes never trained on).
    pub eval_seed: u64,
    /// Held-out pairs captioned after training (half scenes, half crops, as sampled).
    pub eval_pairs: usize,
    pub sampling: PairSampling,
    pub patch_size: usize,
    pub vision: TowerSize,
    pub text: TowerSize,
    /// The decoder's context, prefix and end token included.
    pub max_positions: usize,
    /// Words every training caption starts with (see the module documentation).
    pub caption_prefix: String,
    pub steps: usize,
    pub batch_size: usize,
    pub learning_rate: f64,
    pub warmup_steps: usize,
    /// The learning rate decays (cosine) to this fraction of its peak.
    pub final_learning_rate_fraction: f64,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    /// Weight of shape words (and their synonyms and plurals) in the caption loss, against
    /// 1 for every other token: shapes are what the captioner learns last.
    pub shape_word_weight: f32,
    /// Teach the vision tower what objects look like before it learns to caption (see
    /// `pretrain.rs`), as BLIP's comes pretrained. `None` (the default) trains it on
    /// captions alone.
    #[serde(default)]
    pub vision_pretraining: Option<VisionPretraining>,
    /// While captioning, the vision tower learns at this fraction of `learning_rate`.
    #[serde(default = "full_rate")]
    pub vision_learning_rate_scale: f64,
    /// Start from the weights of a captioner trained before (its model directory, trained
    /// with the same architecture) instead of `seed`'s random ones: a long run goes in
    /// slices, each continuing the last. The optimiser's moments and the learning-rate
    /// schedule start afresh in each slice (a warm restart), and the pairs and views come
    /// from `seed`, so give each slice its own seed to show it new ones.
    #[serde(default)]
    pub init_from: Option<std::path::PathBuf>,
}

fn full_rate() -> f64 {
    1.0
}

impl Default for CaptionerTraining {
    fn default() -> Self {
        Self {
            seed: 20_240_601,
            eval_seed: 777_001,
            eval_pairs: 512,
            // Half the crops around one object: shapes seen large, and object interiors
            // as attention crops show them.
            sampling: PairSampling { object_crop_fraction: 0.5, ..PairSampling::default() },
            patch_size: 16,
            vision: TowerSize { hidden: 128, intermediate: 512, heads: 4, layers: 4 },
            text: TowerSize { hidden: 96, intermediate: 384, heads: 4, layers: 2 },
            max_positions: 48,
            caption_prefix: "a picture of".into(),
            steps: 4500,
            batch_size: 32,
            learning_rate: 3e-3,
            warmup_steps: 200,
            final_learning_rate_fraction: 0.05,
            weight_decay: 0.01,
            max_grad_norm: 1.0,
            shape_word_weight: 1.0,
            // Neither pretraining the tower nor keeping it frozen made the captioner name
            // shapes (docs/benchmarks.md); both stay experiments (`--settings`).
            vision_pretraining: None,
            vision_learning_rate_scale: 1.0,
            init_from: None,
        }
    }
}

impl CaptionerTraining {
    /// A model small enough for unit tests (seconds in the dev profile).
    pub fn tiny() -> Self {
        let tower = TowerSize { hidden: 32, intermediate: 64, heads: 2, layers: 1 };
        Self {
            eval_pairs: 8,
            sampling: PairSampling {
                image_size: 32,
                render_sizes: vec![32, 48],
                ..PairSampling::default()
            },
            patch_size: 8,
            vision: tower,
            text: tower,
            steps: 30,
            batch_size: 8,
            learning_rate: 3e-3,
            warmup_steps: 3,
            ..Self::default()
        }
    }

    fn check(&self, tokenizer: &WorldTokenizer) -> Result<(), TrainError> {
        self.sampling.check()?;
        let bad = |m: String| Err(TrainError::Config(m));
        let s = self.sampling.image_size as usize;
        if self.patch_size == 0 || !s.is_multiple_of(self.patch_size) {
            return bad(format!(
                "image size {s} must be a multiple of the patch size {}",
                self.patch_size
            ));
        }
        for (name, t) in [("vision", &self.vision), ("text", &self.text)] {
            if t.hidden == 0 || t.heads == 0 || t.hidden % t.heads != 0 || t.intermediate == 0 {
                return bad(format!(
                    "{name}: hidden size must be a positive multiple of the heads"
                ));
            }
        }
        if self.steps == 0 || self.batch_size == 0 || self.max_positions < 8 {
            return bad("steps, batch size must be positive and max_positions at least 8".into());
        }
        if tokenizer.encode(&self.caption_prefix).contains(&super::tokenizer::UNK_ID) {
            return bad(format!(
                "the caption prefix {:?} has words outside the world's vocabulary",
                self.caption_prefix
            ));
        }
        Ok(())
    }

    /// The caption the decoder is taught for a pair's caption.
    pub fn target_text(&self, caption: &str) -> String {
        if self.caption_prefix.is_empty() {
            caption.to_string()
        } else {
            format!("{} {caption}", self.caption_prefix)
        }
    }

    /// The Hugging Face config.json of the model.
    pub fn hf_config(&self, vocab_size: usize) -> serde_json::Value {
        let (v, t) = (&self.vision, &self.text);
        json!({
            "architectures": ["BlipForConditionalGeneration"],
            "model_type": "blip",
            "dtype": "float32",
            "tie_word_embeddings": true,
            "projection_dim": t.hidden,
            "image_text_hidden_size": t.hidden,
            "text_config": {
                "model_type": "blip_text_model",
                "vocab_size": vocab_size,
                "hidden_size": t.hidden,
                "encoder_hidden_size": v.hidden,
                "intermediate_size": t.intermediate,
                "num_attention_heads": t.heads,
                "num_hidden_layers": t.layers,
                "max_position_embeddings": self.max_positions,
                "layer_norm_eps": TEXT_EPS,
                "hidden_act": "gelu",
                "hidden_dropout_prob": 0.0,
                "attention_probs_dropout_prob": 0.0,
                "is_decoder": true,
                "use_cache": true,
                "tie_word_embeddings": true,
                "bos_token_id": CLS_ID,
                "sep_token_id": SEP_ID,
                "eos_token_id": SEP_ID,
                "pad_token_id": PAD_ID
            },
            "vision_config": {
                "model_type": "blip_vision_model",
                "hidden_size": v.hidden,
                "intermediate_size": v.intermediate,
                "num_attention_heads": v.heads,
                "num_hidden_layers": v.layers,
                "image_size": self.sampling.image_size,
                "patch_size": self.patch_size,
                "layer_norm_eps": VISION_EPS,
                "hidden_act": "gelu",
                "attention_dropout": 0.0
            }
        })
    }
}

/// BERT attention with its output block: `LayerNorm(x + dense(attention(x, source)))`.
struct BertAttention {
    query: Lin,
    key: Lin,
    value: Lin,
    dense: Lin,
    norm: Norm,
    heads: usize,
}

impl BertAttention {
    fn new(
        p: &mut Params,
        name: &str,
        hidden: usize,
        kv_in: usize,
        heads: usize,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            query: p.linear(&format!("{name}.self.query"), hidden, hidden, true)?,
            key: p.linear(&format!("{name}.self.key"), kv_in, hidden, true)?,
            value: p.linear(&format!("{name}.self.value"), kv_in, hidden, true)?,
            dense: p.linear(&format!("{name}.output.dense"), hidden, hidden, true)?,
            norm: p.norm(&format!("{name}.output.LayerNorm"), hidden, TEXT_EPS)?,
            heads,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        source: &Tensor,
        mask: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let y = attention(
            &self.query.forward(x)?,
            &self.key.forward(source)?,
            &self.value.forward(source)?,
            self.heads,
            mask,
        )?;
        self.norm.forward(&(self.dense.forward(&y)? + x)?)
    }
}

struct DecoderLayer {
    self_attn: BertAttention,
    cross_attn: BertAttention,
    intermediate: Lin,
    output: Lin,
    output_norm: Norm,
}

/// The BERT text decoder with its tied language-model head.
struct TextDecoder {
    words: Tensor,
    positions: Tensor,
    embed_norm: Norm,
    layers: Vec<DecoderLayer>,
    head_dense: Lin,
    head_norm: Norm,
    head_bias: Tensor,
}

impl TextDecoder {
    fn new(
        p: &mut Params,
        t: &TowerSize,
        vision_hidden: usize,
        vocab: usize,
        positions: usize,
    ) -> candle_core::Result<Self> {
        let h = t.hidden;
        let words = p.get(
            "text_decoder.bert.embeddings.word_embeddings.weight",
            &[vocab, h],
            Init::Normal(INIT_STD),
        )?;
        let positions = p.get(
            "text_decoder.bert.embeddings.position_embeddings.weight",
            &[positions, h],
            Init::Normal(INIT_STD),
        )?;
        let embed_norm = p.norm("text_decoder.bert.embeddings.LayerNorm", h, TEXT_EPS)?;
        let layers = (0..t.layers)
            .map(|i| {
                let l = format!("text_decoder.bert.encoder.layer.{i}");
                Ok(DecoderLayer {
                    self_attn: BertAttention::new(p, &format!("{l}.attention"), h, h, t.heads)?,
                    cross_attn: BertAttention::new(
                        p,
                        &format!("{l}.crossattention"),
                        h,
                        vision_hidden,
                        t.heads,
                    )?,
                    intermediate: p.linear(
                        &format!("{l}.intermediate.dense"),
                        h,
                        t.intermediate,
                        true,
                    )?,
                    output: p.linear(&format!("{l}.output.dense"), t.intermediate, h, true)?,
                    output_norm: p.norm(&format!("{l}.output.LayerNorm"), h, TEXT_EPS)?,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            words,
            positions,
            embed_norm,
            layers,
            head_dense: p.linear("text_decoder.cls.predictions.transform.dense", h, h, true)?,
            head_norm: p.norm("text_decoder.cls.predictions.transform.LayerNorm", h, TEXT_EPS)?,
            head_bias: p.get("text_decoder.cls.predictions.bias", &[vocab], Init::Zeros)?,
        })
    }

    /// Logits `(B, T, vocab)` of `ids: (B, T)` attending to `image: (B, 1 + N, Dv)`.
    fn forward(&self, ids: &Tensor, image: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let h = self.words.dim(1)?;
        let x = self.words.index_select(&ids.flatten_all()?, 0)?.reshape((b, t, h))?;
        let x = (x + repeat_rows(&self.positions.narrow(0, 0, t)?, b)?.reshape((b, t, h))?)?;
        let mut h = self.embed_norm.forward(&x)?;
        let mask = causal_mask(t, ids.device())?;
        for layer in &self.layers {
            h = layer.self_attn.forward(&h, &h, Some(&mask))?;
            h = layer.cross_attn.forward(&h, image, None)?;
            let inner = Act::Gelu.apply(&layer.intermediate.forward(&h)?)?;
            h = layer.output_norm.forward(&(layer.output.forward(&inner)? + &h)?)?;
        }
        let y = self.head_norm.forward(&Act::Gelu.apply(&self.head_dense.forward(&h)?)?)?;
        let (v, hidden) = self.words.dims2()?;
        let logits = y.reshape((b * t, hidden))?.matmul(&self.words.t()?)?;
        (logits + repeat_rows(&self.head_bias, b * t)?)?.reshape((b, t, v))
    }
}

/// The captioner being trained: its variables and the modules computing with them.
pub struct TrainingCaptioner {
    params: Params,
    vision: VisionTower,
    decoder: TextDecoder,
    pub settings: CaptionerTraining,
    pub tokenizer: WorldTokenizer,
    /// Token ids of the shape nouns, weighted by `settings.shape_word_weight`.
    shape_words: Vec<u32>,
}

/// A teacher-forcing batch: decoder inputs and the next-token targets (None on padding).
struct TextBatch {
    inputs: Tensor,
    targets: Vec<Option<u32>>,
}

impl TrainingCaptioner {
    /// A freshly initialised model (weights from `settings.seed`).
    pub fn new(settings: &CaptionerTraining) -> Result<Self, TrainError> {
        let tokenizer = WorldTokenizer::for_sampling(&settings.sampling);
        settings.check(&tokenizer)?;
        let mut p = Params::new(settings.seed);
        let s = settings;
        let vision = VisionTower::new(
            &mut p,
            "vision_model",
            &s.vision,
            s.sampling.image_size as usize,
            s.patch_size,
            VISION_EPS,
            Act::Gelu,
            VisionStyle::Blip,
        )?;
        let decoder = TextDecoder::new(
            &mut p,
            &s.text,
            s.vision.hidden,
            tokenizer.vocab_size(),
            s.max_positions,
        )?;
        let shape_words = Shape::ALL
            .iter()
            .flat_map(|s| [(s.name(), s.plural())].into_iter().chain(s.synonyms().iter().copied()))
            .flat_map(|(one, many)| [one, many])
            .flat_map(|words| words.split(' '))
            .filter_map(|word| tokenizer.id(word))
            .collect();
        Ok(Self { params: p, vision, decoder, settings: settings.clone(), tokenizer, shape_words })
    }

    pub fn parameter_count(&self) -> usize {
        self.params.count()
    }

    /// Vision features `(B, 1 + N, D)` (after `post_layernorm`) of normalised pixels.
    pub fn encode_images(&self, pixels: &Tensor) -> Result<Tensor, TrainError> {
        Ok(self.vision.post_norm.forward(&self.vision.forward(pixels)?)?)
    }

    /// Decoder logits `(B, T, vocab)` for `ids: (B, T)` given image features.
    pub fn decoder_logits(&self, image: &Tensor, ids: &Tensor) -> Result<Tensor, TrainError> {
        Ok(self.decoder.forward(ids, image)?)
    }

    fn text_batch(&self, captions: &[&str]) -> Result<TextBatch, TrainError> {
        let encoded: Vec<Vec<u32>> = captions
            .iter()
            .map(|c| {
                let mut ids = self.tokenizer.encode(&self.settings.target_text(c));
                ids.truncate(self.settings.max_positions + 1);
                ids
            })
            .collect();
        let t = encoded.iter().map(|ids| ids.len() - 1).max().unwrap_or(1);
        let mut inputs = Vec::with_capacity(encoded.len() * t);
        let mut targets = Vec::with_capacity(encoded.len() * t);
        for ids in &encoded {
            for i in 0..t {
                inputs.push(if i + 1 < ids.len() { ids[i] } else { PAD_ID });
                targets.push(ids.get(i + 1).copied());
            }
        }
        Ok(TextBatch {
            inputs: Tensor::from_vec(inputs, (encoded.len(), t), &Device::Cpu)?,
            targets,
        })
    }

    /// Mean teacher-forced cross-entropy per caption token on `pairs`.
    pub fn loss(&self, pairs: &[Pair]) -> Result<Tensor, TrainError> {
        let pixels = pairs::pixels(pairs, &self.settings.sampling)?;
        let captions: Vec<&str> = pairs.iter().map(|p| p.caption.as_str()).collect();
        let batch = self.text_batch(&captions)?;
        let image = self.encode_images(&pixels)?;
        let logits = self.decoder_logits(&image, &batch.inputs)?;
        let (b, t, v) = logits.dims3()?;
        let weight = self.settings.shape_word_weight;
        let weight_of = |id: u32| if self.shape_words.contains(&id) { weight } else { 1.0 };
        Ok(masked_cross_entropy(&logits.reshape((b * t, v))?, &batch.targets, weight_of)?)
    }

    /// Fails unless every variable gets a non-zero gradient from `loss`.
    pub fn check_gradients(&self, loss: &Tensor) -> Result<(), TrainError> {
        let grads = loss.backward()?;
        Ok(check_all_gradients(&self.params.varmap, &grads)?)
    }

    /// Trains for `settings.steps` steps; `progress(step, loss)` after each. Returns the
    /// per-step losses.
    pub fn train(&mut self, progress: impl FnMut(usize, f32)) -> Result<Vec<f32>, TrainError> {
        let s = &self.settings;
        let optimisation = pairs::Optimisation {
            seed: s.seed,
            sampling: &s.sampling,
            scaled: (s.vision_learning_rate_scale != 1.0)
                .then_some((VISION_PREFIX, s.vision_learning_rate_scale)),
            steps: s.steps,
            batch_size: s.batch_size,
            learning_rate: s.learning_rate,
            warmup_steps: s.warmup_steps,
            final_learning_rate_fraction: s.final_learning_rate_fraction,
            weight_decay: s.weight_decay,
            max_grad_norm: s.max_grad_norm,
        };
        pairs::train_on_pairs(
            &self.params.varmap,
            &optimisation,
            |pairs| self.loss(pairs),
            || Ok(()),
            progress,
        )
    }

    /// Writes the model directory: config.json, generation_config.json, model.safetensors
    /// (f32), preprocessor_config.json, tokenizer.json, tokenizer_config.json.
    pub fn save(&self, dir: &Path) -> Result<(), TrainError> {
        std::fs::create_dir_all(dir).map_err(io_error(dir))?;
        let write_json =
            |name: &str, value: &serde_json::Value| pairs::write_json(dir, name, value);
        write_json("config.json", &self.settings.hf_config(self.tokenizer.vocab_size()))?;
        write_json(
            "generation_config.json",
            &json!({"bos_token_id": CLS_ID, "eos_token_id": SEP_ID, "pad_token_id": PAD_ID, "decoder_start_token_id": CLS_ID}),
        )?;
        write_json(
            "preprocessor_config.json",
            &self.settings.sampling.preprocessor_config("BlipImageProcessor"),
        )?;
        write_tokenizer(&self.tokenizer, dir, self.settings.max_positions)
            .map_err(io_error(dir))?;
        let weights = named_tensors(&self.params.varmap);
        candle_core::safetensors::save(&weights, dir.join("model.safetensors"))?;
        Ok(())
    }
}

/// What train_captioner did, as written to train.json.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaptionerReport {
    pub settings: CaptionerTraining,
    pub parameters: usize,
    pub vocab_size: usize,
    /// Mean training loss per window of steps, keyed by the window's last step.
    pub loss_curve: std::collections::BTreeMap<usize, f32>,
    pub first_loss: f32,
    /// Mean loss of the last 5% of steps.
    pub final_loss: f32,
    pub train_seconds: f64,
    pub eval_seconds: f64,
    pub heldout: CaptionEval,
    /// The vision tower's pretraining, when the settings ask for it (its time is part of
    /// `train_seconds`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vision_pretraining: Option<PretrainReport>,
    /// The settings of the slices trained before this one, first to last, when the model
    /// was trained in slices (see `slices.rs`): with `settings`, the whole chain.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub earlier_slices: Vec<CaptionerTraining>,
    /// How the weights were made.
    pub command: String,
    pub threads: usize,
}

/// Trains a captioner with `settings`, writes the model directory and `train.json` to
/// `out_dir`, and measures it on held-out pairs through dnd's loader.
pub fn train_captioner(
    settings: &CaptionerTraining,
    out_dir: &Path,
    progress: impl FnMut(usize, f32),
) -> Result<CaptionerReport, TrainError> {
    train_slice(settings, &[], out_dir, progress)
}

/// [`train_captioner`] for one slice of a chain, after the `earlier` slices.
fn train_slice(
    settings: &CaptionerTraining,
    earlier: &[CaptionerTraining],
    out_dir: &Path,
    mut progress: impl FnMut(usize, f32),
) -> Result<CaptionerReport, TrainError> {
    let started = Instant::now();
    let mut model = TrainingCaptioner::new(settings)?;
    if let Some(dir) = &settings.init_from {
        init::load_initial_weights(&model, dir)?;
    }
    let vision_pretraining = match &settings.vision_pretraining {
        Some(p) => Some(pretrain::pretrain(&model, p, &mut progress)?),
        None => None,
    };
    let losses = model.train(&mut progress)?;
    let train_seconds = started.elapsed().as_secs_f64();
    model.save(out_dir)?;
    let started = Instant::now();
    let heldout = evaluate_captioner(
        out_dir,
        &settings.sampling,
        settings.eval_seed,
        settings.eval_pairs,
        24,
    )?;
    let losses = pairs::summarize_losses(&losses);
    let report = CaptionerReport {
        settings: settings.clone(),
        parameters: model.parameter_count(),
        vocab_size: model.tokenizer.vocab_size(),
        loss_curve: losses.curve,
        first_loss: losses.first,
        final_loss: losses.last,
        train_seconds,
        eval_seconds: started.elapsed().as_secs_f64(),
        heldout,
        vision_pretraining,
        earlier_slices: earlier.to_vec(),
        command: "dnd synth train --model captioner".into(),
        threads: rayon::current_num_threads(),
    };
    pairs::write_json(out_dir, "train.json", &report)?;
    Ok(report)
}

#[cfg(test)]
mod tests;

//! The zoo's embedder: a tiny CLIP (ViT image tower + causal text transformer, Hugging
//! Face `CLIPModel` layout) trained from seeds, contrastively (InfoNCE with a learnable
//! logit scale), on the world's (image, caption) pairs, and saved as a model directory that
//! `dnd_models::ClipEmbedder` loads.
//!
//! Text is pooled at the first end token (`[SEP]`, `eos_token_id` 3 in config.json), as
//! transformers and dnd's loader do for any `eos_token_id` other than the legacy 2.
//! Pairs whose captions describe the same things (same objects and background) count as
//! positives of each other, so that two crops of a red circle are not pushed apart.

use std::path::Path;
use std::time::Instant;

use candle_core::{D, Device, IndexOp, Tensor};
use dnd_models::clip::l2_normalize;
use dnd_models::{ClipEmbedder, Embedder, ModelRef};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::pairs::{self, Pair, PairKind, PairSampling, sample_pairs};
use super::tiny_transformer::{
    Act, EncoderLayer, INIT_STD, Init, Lin, Norm, Params, TowerSize, VisionStyle, VisionTower,
    causal_mask, check_all_gradients, gather_rows, named_tensors, repeat_rows,
};
use super::tokenizer::{CLS_ID, PAD_ID, SEP_ID, WorldTokenizer, write_tokenizer};
use crate::error::{TrainError, io_error};

const EPS: f64 = 1e-5;
/// CLIP's initial logit scale, ln(1 / 0.07).
const LOGIT_SCALE_INIT: f32 = 2.6592;

/// Everything that decides a trained embedder. The default is the committed zoo model's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EmbedderTraining {
    /// Seeds the initial weights and the stream of training pairs.
    pub seed: u64,
    /// Seeds the held-out pairs (scenes never trained on).
    pub eval_seed: u64,
    /// Held-out pairs, ranked in groups of `retrieval_candidates`.
    pub eval_pairs: usize,
    pub retrieval_candidates: usize,
    pub sampling: PairSampling,
    pub patch_size: usize,
    pub vision: TowerSize,
    pub text: TowerSize,
    pub projection_dim: usize,
    /// The text tower's context, start and end tokens included.
    pub max_positions: usize,
    pub steps: usize,
    pub batch_size: usize,
    pub learning_rate: f64,
    pub warmup_steps: usize,
    pub final_learning_rate_fraction: f64,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    /// The logit scale (log of the inverse temperature) is clamped to at most this, as
    /// CLIP does (ln 100).
    pub max_logit_scale: f32,
}

impl Default for EmbedderTraining {
    fn default() -> Self {
        Self {
            seed: 20_240_602,
            eval_seed: 777_002,
            eval_pairs: 1024,
            retrieval_candidates: 64,
            sampling: PairSampling::default(),
            patch_size: 16,
            vision: TowerSize { hidden: 128, intermediate: 512, heads: 4, layers: 4 },
            text: TowerSize { hidden: 64, intermediate: 256, heads: 4, layers: 2 },
            projection_dim: 64,
            max_positions: 48,
            steps: 3800,
            batch_size: 64,
            learning_rate: 2e-3,
            warmup_steps: 200,
            final_learning_rate_fraction: 0.05,
            weight_decay: 0.05,
            max_grad_norm: 1.0,
            max_logit_scale: 4.6052,
        }
    }
}

impl EmbedderTraining {
    /// A model small enough for unit tests (seconds in the dev profile).
    pub fn tiny() -> Self {
        let tower = TowerSize { hidden: 32, intermediate: 64, heads: 2, layers: 1 };
        Self {
            eval_pairs: 16,
            retrieval_candidates: 8,
            sampling: PairSampling {
                image_size: 32,
                render_sizes: vec![32, 48],
                ..PairSampling::default()
            },
            patch_size: 8,
            vision: tower,
            text: tower,
            projection_dim: 16,
            steps: 30,
            batch_size: 16,
            learning_rate: 3e-3,
            warmup_steps: 3,
            ..Self::default()
        }
    }

    fn check(&self) -> Result<(), TrainError> {
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
        if self.steps == 0
            || self.batch_size < 2
            || self.max_positions < 8
            || self.projection_dim == 0
        {
            return bad("steps and projection_dim must be positive, batch size at least 2, max_positions at least 8".into());
        }
        if self.retrieval_candidates < 2 || self.eval_pairs < self.retrieval_candidates {
            return bad(
                "retrieval needs at least 2 candidates and eval_pairs >= retrieval_candidates"
                    .into(),
            );
        }
        Ok(())
    }

    /// The Hugging Face config.json of the model.
    pub fn hf_config(&self, vocab_size: usize) -> serde_json::Value {
        let (v, t) = (&self.vision, &self.text);
        json!({
            "architectures": ["CLIPModel"],
            "model_type": "clip",
            "dtype": "float32",
            "projection_dim": self.projection_dim,
            "logit_scale_init_value": LOGIT_SCALE_INIT,
            "text_config": {
                "model_type": "clip_text_model",
                "vocab_size": vocab_size,
                "hidden_size": t.hidden,
                "intermediate_size": t.intermediate,
                "num_attention_heads": t.heads,
                "num_hidden_layers": t.layers,
                "max_position_embeddings": self.max_positions,
                "hidden_act": Act::QuickGelu.name(),
                "layer_norm_eps": EPS,
                "attention_dropout": 0.0,
                "bos_token_id": CLS_ID,
                "eos_token_id": SEP_ID,
                "pad_token_id": PAD_ID,
                "projection_dim": self.projection_dim
            },
            "vision_config": {
                "model_type": "clip_vision_model",
                "hidden_size": v.hidden,
                "intermediate_size": v.intermediate,
                "num_attention_heads": v.heads,
                "num_hidden_layers": v.layers,
                "image_size": self.sampling.image_size,
                "patch_size": self.patch_size,
                "num_channels": 3,
                "hidden_act": Act::QuickGelu.name(),
                "layer_norm_eps": EPS,
                "attention_dropout": 0.0,
                "projection_dim": self.projection_dim
            }
        })
    }
}

/// The causal text tower, pooled at the end token.
struct TextTower {
    tokens: Tensor,
    positions: Tensor,
    layers: Vec<EncoderLayer>,
    final_norm: Norm,
    projection: Lin,
}

/// The embedder being trained.
pub struct TrainingEmbedder {
    params: Params,
    vision: VisionTower,
    visual_projection: Lin,
    text: TextTower,
    logit_scale: Tensor,
    pub settings: EmbedderTraining,
    pub tokenizer: WorldTokenizer,
}

impl TrainingEmbedder {
    /// A freshly initialised model (weights from `settings.seed`).
    pub fn new(settings: &EmbedderTraining) -> Result<Self, TrainError> {
        settings.check()?;
        let tokenizer = WorldTokenizer::for_sampling(&settings.sampling);
        let s = settings;
        let mut p = Params::new(s.seed);
        let vision = VisionTower::new(
            &mut p,
            "vision_model",
            &s.vision,
            s.sampling.image_size as usize,
            s.patch_size,
            EPS,
            Act::QuickGelu,
            VisionStyle::Clip,
        )?;
        let visual_projection =
            p.linear("visual_projection", s.vision.hidden, s.projection_dim, false)?;
        let t = &s.text;
        let text = TextTower {
            tokens: p.get(
                "text_model.embeddings.token_embedding.weight",
                &[tokenizer.vocab_size(), t.hidden],
                Init::Normal(INIT_STD),
            )?,
            positions: p.get(
                "text_model.embeddings.position_embedding.weight",
                &[s.max_positions, t.hidden],
                Init::Normal(INIT_STD),
            )?,
            layers: (0..t.layers)
                .map(|i| {
                    EncoderLayer::new(
                        &mut p,
                        &format!("text_model.encoder.layers.{i}"),
                        t,
                        EPS,
                        Act::QuickGelu,
                        false,
                    )
                })
                .collect::<candle_core::Result<Vec<_>>>()?,
            final_norm: p.norm("text_model.final_layer_norm", t.hidden, EPS)?,
            projection: p.linear("text_projection", t.hidden, s.projection_dim, false)?,
        };
        let logit_scale = p.get("logit_scale", &[], Init::Const(LOGIT_SCALE_INIT))?;
        Ok(Self {
            params: p,
            vision,
            visual_projection,
            text,
            logit_scale,
            settings: settings.clone(),
            tokenizer,
        })
    }

    pub fn parameter_count(&self) -> usize {
        self.params.count()
    }

    /// Unnormalised image features `(B, projection_dim)` of normalised pixels.
    pub fn image_features(&self, pixels: &Tensor) -> Result<Tensor, TrainError> {
        let h = self.vision.forward(pixels)?;
        let pooled = self.vision.post_norm.forward(&h.i((.., 0))?)?;
        Ok(self.visual_projection.forward(&pooled)?)
    }

    /// Token ids right-padded to the longest, truncated to the context keeping the end
    /// token (as dnd's `ClipEmbedder::tokenize`), and each row's end-token position.
    pub fn tokenize(&self, texts: &[&str]) -> (Vec<Vec<u32>>, Vec<usize>) {
        let max = self.settings.max_positions;
        let mut rows: Vec<Vec<u32>> = texts
            .iter()
            .map(|t| {
                let mut ids = self.tokenizer.encode(t);
                if ids.len() > max {
                    ids.truncate(max);
                    ids[max - 1] = SEP_ID;
                }
                ids
            })
            .collect();
        let ends = rows
            .iter()
            .map(|r| r.iter().position(|&v| v == SEP_ID).unwrap_or(r.len() - 1))
            .collect();
        let longest = rows.iter().map(Vec::len).max().unwrap_or(0);
        for r in &mut rows {
            r.resize(longest, PAD_ID);
        }
        (rows, ends)
    }

    /// Unnormalised text features `(B, projection_dim)`.
    pub fn text_features(&self, texts: &[&str]) -> Result<Tensor, TrainError> {
        let (rows, ends) = self.tokenize(texts);
        let (b, t) = (rows.len(), rows[0].len());
        let ids = Tensor::from_vec(rows.concat(), b * t, &Device::Cpu)?;
        let h = self.text.tokens.dim(1)?;
        let positions =
            repeat_rows(&self.text.positions.narrow(0, 0, t)?, b)?.reshape((b, t, h))?;
        let x = (self.text.tokens.index_select(&ids, 0)?.reshape((b, t, h))? + positions)?;
        // Padding follows the end token, so the causal mask alone keeps it out of the pooled
        // state (dnd's loader also masks it: same result at the end token).
        let mask = causal_mask(t, &Device::Cpu)?;
        let mut x = x;
        for layer in &self.text.layers {
            x = layer.forward(&x, Some(&mask))?;
        }
        let x = self.text.final_norm.forward(&x)?;
        Ok(self.text.projection.forward(&gather_rows(&x, &ends)?)?)
    }

    /// Symmetric InfoNCE on `pairs`: each image against every caption of the batch and each
    /// caption against every image; pairs with equal [`Truth`](super::pairs::Truth) are positives of each other.
    pub fn loss(&self, pairs: &[Pair]) -> Result<Tensor, TrainError> {
        let pixels = pairs::pixels(pairs, &self.settings.sampling)?;
        let texts: Vec<&str> = pairs.iter().map(|p| p.caption.as_str()).collect();
        let images = l2_normalize(&self.image_features(&pixels)?)?;
        let texts = l2_normalize(&self.text_features(&texts)?)?;
        let logits = images.matmul(&texts.t()?)?.broadcast_mul(&self.logit_scale.exp()?)?;
        let b = pairs.len();
        let mut targets = vec![0f32; b * b];
        for (i, a) in pairs.iter().enumerate() {
            let same: Vec<usize> = pairs
                .iter()
                .enumerate()
                .filter(|(_, p)| p.truth == a.truth)
                .map(|(j, _)| j)
                .collect();
            for &j in &same {
                targets[i * b + j] = 1.0 / same.len() as f32;
            }
        }
        // Symmetric: the positive sets are the same both ways.
        let targets = Tensor::from_vec(targets, (b, b), &Device::Cpu)?;
        let per_direction = |l: &Tensor| -> candle_core::Result<Tensor> {
            (candle_nn::ops::log_softmax(l, D::Minus1)? * &targets)?.sum_all()?.neg()? / b as f64
        };
        Ok(((per_direction(&logits)? + per_direction(&logits.t()?)?)? * 0.5)?)
    }

    pub fn logit_scale(&self) -> Result<f32, TrainError> {
        Ok(self.logit_scale.to_scalar::<f32>()?)
    }

    /// Fails unless every variable gets a non-zero gradient from `loss`.
    pub fn check_gradients(&self, loss: &Tensor) -> Result<(), TrainError> {
        let grads = loss.backward()?;
        Ok(check_all_gradients(&self.params.varmap, &grads)?)
    }

    fn clamp_logit_scale(&self) -> Result<(), TrainError> {
        if self.logit_scale()? > self.settings.max_logit_scale {
            let data =
                self.params.varmap.data().lock().expect("the var map lock is never poisoned");
            data["logit_scale"].set(&Tensor::new(self.settings.max_logit_scale, &Device::Cpu)?)?;
        }
        Ok(())
    }

    /// Trains for `settings.steps` steps; `progress(step, loss)` after each. Returns the
    /// per-step losses.
    pub fn train(&mut self, progress: impl FnMut(usize, f32)) -> Result<Vec<f32>, TrainError> {
        let s = &self.settings;
        let optimisation = pairs::Optimisation {
            seed: s.seed,
            sampling: &s.sampling,
            scaled: None,
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
            || self.clamp_logit_scale(),
            progress,
        )
    }

    /// Writes the model directory: config.json, model.safetensors (f32, with
    /// `logit_scale`), preprocessor_config.json, tokenizer.json, tokenizer_config.json.
    pub fn save(&self, dir: &Path) -> Result<(), TrainError> {
        std::fs::create_dir_all(dir).map_err(io_error(dir))?;
        let write_json =
            |name: &str, value: &serde_json::Value| pairs::write_json(dir, name, value);
        write_json("config.json", &self.settings.hf_config(self.tokenizer.vocab_size()))?;
        write_json(
            "preprocessor_config.json",
            &self.settings.sampling.preprocessor_config("CLIPImageProcessor"),
        )?;
        write_tokenizer(&self.tokenizer, dir, self.settings.max_positions)
            .map_err(io_error(dir))?;
        candle_core::safetensors::save(
            &named_tensors(&self.params.varmap),
            dir.join("model.safetensors"),
        )?;
        Ok(())
    }
}

/// Retrieval accuracies of one direction and kind of pair.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Retrieval {
    /// The top candidate is the pair's own.
    pub exact: f32,
    /// The top candidate describes the same things (equal [`Truth`](super::pairs::Truth)).
    pub same_content: f32,
}

/// Held-out retrieval, measured with dnd's own loader (`ClipEmbedder`) on groups of
/// `candidates` pairs: each image ranks the group's captions and each caption the images.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmbedEval {
    pub pairs: usize,
    pub candidates: usize,
    pub image_to_text: Retrieval,
    pub text_to_image: Retrieval,
    /// Image to text, whole scenes only and crops only (candidates are all kinds).
    pub image_to_text_scenes: Retrieval,
    pub image_to_text_crops: Retrieval,
    /// Mean cosine of matching pairs and of non-matching ones.
    pub mean_positive_cosine: f32,
    pub mean_negative_cosine: f32,
}

/// Ranks `count` held-out pairs (stream `seed`) in groups of `candidates` with the model
/// in `dir`, loaded by `dnd_models::ClipEmbedder` and fed the pairs' source images.
pub fn evaluate_embedder(
    dir: &Path,
    sampling: &PairSampling,
    seed: u64,
    count: usize,
    candidates: usize,
) -> Result<EmbedEval, TrainError> {
    let model = ClipEmbedder::load(&ModelRef::Local(dir.to_path_buf()), &Device::Cpu)?;
    let pairs = sample_pairs(seed, 0, count, sampling)?;
    #[derive(Default)]
    struct Tally {
        n: usize,
        exact: usize,
        same: usize,
    }
    impl Tally {
        fn add(&mut self, exact: bool, same: bool) {
            self.n += 1;
            self.exact += usize::from(exact);
            self.same += usize::from(same);
        }
        fn result(&self) -> Retrieval {
            let r = |a: usize| if self.n == 0 { 0.0 } else { a as f32 / self.n as f32 };
            Retrieval { exact: r(self.exact), same_content: r(self.same) }
        }
    }
    let (mut i2t, mut t2i, mut scenes, mut crops) =
        (Tally::default(), Tally::default(), Tally::default(), Tally::default());
    let (mut pos, mut pos_n, mut neg, mut neg_n) = (0f64, 0usize, 0f64, 0usize);
    for group in pairs.chunks_exact(candidates) {
        let images: Vec<_> = group.iter().map(|p| p.source.clone()).collect();
        let texts: Vec<&str> = group.iter().map(|p| p.caption.as_str()).collect();
        let sims = model
            .embed_images(&images)?
            .matmul(&model.embed_texts(&texts)?.t()?)?
            .to_vec2::<f32>()?;
        let argmax = |v: &mut dyn Iterator<Item = f32>| {
            v.enumerate()
                .fold((0, f32::NEG_INFINITY), |b, (i, x)| if x > b.1 { (i, x) } else { b })
                .0
        };
        for (i, p) in group.iter().enumerate() {
            let best = argmax(&mut sims[i].iter().copied());
            let (exact, same) = (best == i, group[best].truth == p.truth);
            i2t.add(exact, same);
            match p.kind {
                PairKind::Scene => scenes.add(exact, same),
                PairKind::Crop => crops.add(exact, same),
            }
            let best = argmax(&mut sims.iter().map(|row| row[i]));
            t2i.add(best == i, group[best].truth == p.truth);
            for (j, &s) in sims[i].iter().enumerate() {
                if j == i {
                    (pos, pos_n) = (pos + f64::from(s), pos_n + 1);
                } else if group[j].truth != p.truth {
                    (neg, neg_n) = (neg + f64::from(s), neg_n + 1);
                }
            }
        }
    }
    Ok(EmbedEval {
        pairs: i2t.n,
        candidates,
        image_to_text: i2t.result(),
        text_to_image: t2i.result(),
        image_to_text_scenes: scenes.result(),
        image_to_text_crops: crops.result(),
        mean_positive_cosine: (pos / pos_n.max(1) as f64) as f32,
        mean_negative_cosine: (neg / neg_n.max(1) as f64) as f32,
    })
}

/// What train_embedder did, as written to train.json.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmbedderReport {
    pub settings: EmbedderTraining,
    pub parameters: usize,
    pub vocab_size: usize,
    pub loss_curve: std::collections::BTreeMap<usize, f32>,
    pub first_loss: f32,
    pub final_loss: f32,
    pub final_logit_scale: f32,
    pub train_seconds: f64,
    pub eval_seconds: f64,
    pub heldout: EmbedEval,
    pub command: String,
    pub threads: usize,
}

/// Trains an embedder with `settings`, writes the model directory and `train.json` to
/// `out_dir`, and measures held-out retrieval through dnd's loader.
pub fn train_embedder(
    settings: &EmbedderTraining,
    out_dir: &Path,
    progress: impl FnMut(usize, f32),
) -> Result<EmbedderReport, TrainError> {
    let started = Instant::now();
    let mut model = TrainingEmbedder::new(settings)?;
    let losses = model.train(progress)?;
    let train_seconds = started.elapsed().as_secs_f64();
    model.save(out_dir)?;
    let started = Instant::now();
    let heldout = evaluate_embedder(
        out_dir,
        &settings.sampling,
        settings.eval_seed,
        settings.eval_pairs,
        settings.retrieval_candidates,
    )?;
    let losses = pairs::summarize_losses(&losses);
    let report = EmbedderReport {
        settings: settings.clone(),
        parameters: model.parameter_count(),
        vocab_size: model.tokenizer.vocab_size(),
        loss_curve: losses.curve,
        first_loss: losses.first,
        final_loss: losses.last,
        final_logit_scale: model.logit_scale()?,
        train_seconds,
        eval_seconds: started.elapsed().as_secs_f64(),
        heldout,
        command: "dnd synth train --model embedder".into(),
        threads: rayon::current_num_threads(),
    };
    pairs::write_json(out_dir, "train.json", &report)?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::UNK_ID;

    #[test]
    fn every_variable_gets_a_gradient() {
        let settings = EmbedderTraining::tiny();
        let model = TrainingEmbedder::new(&settings).unwrap();
        let pairs = sample_pairs(1, 0, 6, &settings.sampling).unwrap();
        let loss = model.loss(&pairs).unwrap();
        model.check_gradients(&loss).unwrap();
        let l = loss.to_scalar::<f32>().unwrap();
        assert!((l - 6f32.ln()).abs() < 0.5, "an untrained model is near chance: {l}");
    }

    #[test]
    fn a_short_run_lowers_the_loss_and_the_saved_model_loads_in_dnd_with_the_same_outputs() {
        let settings = EmbedderTraining { steps: 40, ..EmbedderTraining::tiny() };
        let mut model = TrainingEmbedder::new(&settings).unwrap();
        let losses = model.train(|_, _| {}).unwrap();
        let mean = |s: &[f32]| s.iter().sum::<f32>() / s.len() as f32;
        let (first, last) = (mean(&losses[..5]), mean(&losses[losses.len() - 5..]));
        assert!(last < 0.9 * first, "loss {first} -> {last}: {losses:?}");

        let dir = tempfile::tempdir().unwrap();
        model.save(dir.path()).unwrap();
        let loaded = ClipEmbedder::load(&ModelRef::Local(dir.path().into()), &Device::Cpu).unwrap();
        assert_eq!(loaded.preprocess, settings.sampling.preprocess());
        let pairs = sample_pairs(99, 0, 4, &settings.sampling).unwrap();
        let images: Vec<_> = pairs.iter().map(|p| p.source.clone()).collect();
        let diff = |a: &Tensor, b: &Tensor| {
            (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
        };
        let pixels = pairs::pixels(&pairs, &settings.sampling).unwrap();
        let ours = l2_normalize(&model.image_features(&pixels).unwrap()).unwrap();
        let theirs = loaded.embed_images(&images).unwrap();
        assert!(diff(&ours, &theirs) < 1e-4, "image embeddings differ by {}", diff(&ours, &theirs));
        // Captions of different lengths (padding), a short label and an unknown word.
        let mut texts: Vec<&str> = pairs.iter().map(|p| p.caption.as_str()).collect();
        texts.extend(["red circles", "a zebra on grass"]);
        let ours = l2_normalize(&model.text_features(&texts).unwrap()).unwrap();
        let theirs = loaded.embed_texts(&texts).unwrap();
        assert!(diff(&ours, &theirs) < 1e-4, "text embeddings differ by {}", diff(&ours, &theirs));
        assert!(model.tokenize(&["a zebra"]).0[0].contains(&UNK_ID));
    }

    /// The committed zoo model loads in dnd and still scores what its train.json says.
    #[test]
    fn the_committed_zoo_embedder_scores_what_its_train_json_records() {
        let dir = crate::committed_zoo().join("embedder");
        let report: EmbedderReport =
            serde_json::from_str(&std::fs::read_to_string(dir.join("train.json")).unwrap())
                .unwrap();
        let s = &report.settings;
        let eval =
            evaluate_embedder(&dir, &s.sampling, s.eval_seed, s.eval_pairs, s.retrieval_candidates)
                .unwrap();
        let recorded = &report.heldout;
        for (name, now, then) in [
            ("image to text", eval.image_to_text.exact, recorded.image_to_text.exact),
            ("text to image", eval.text_to_image.exact, recorded.text_to_image.exact),
        ] {
            assert!((now - then).abs() <= 0.02, "{name}: {now} now, {then} in train.json");
        }
        assert!(eval.image_to_text.exact > 0.8, "{eval:?}");
    }
}

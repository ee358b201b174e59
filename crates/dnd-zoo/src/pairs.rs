//! (image, caption) pairs of the world for the zoo's captioner and embedder: whole scenes
//! captioned by [`caption`], and random crops (stretched back to the model's square input,
//! as dnd's attention crops are) captioned by [`caption_visible`]. Each pair is a pure
//! function of `(seed, index)`, so a training run is reproducible and the held-out pairs
//! (another seed) are scenes the model never saw.

use std::collections::BTreeMap;

use dnd_models::preprocess::{CropRounding, Filter, Preprocess, Resize};
use image::RgbImage;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use dnd_synth::caption::{VisibilityRule, caption, caption_visible, visible_in};
use dnd_synth::mask::Rect;
use dnd_synth::phrase::{Mention, parse_mentions};
use dnd_synth::render::{Rendered, render};
use dnd_synth::scene::Scene;
use dnd_synth::vocab::{Colour, Fill, Shape, Texture};

pub use crate::error::TrainError;
use crate::error::io_error;

/// How pairs are drawn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PairSampling {
    /// Side of the square model input.
    pub image_size: u32,
    /// Scenes are rendered at one of these square sizes (then cropped and/or resized to
    /// `image_size` by the model's preprocessing).
    pub render_sizes: Vec<u32>,
    /// Fraction of pairs that are crops rather than whole scenes.
    pub crop_fraction: f32,
    /// A crop's width and height are each at least this fraction of the image's side.
    pub min_crop_side: f32,
    /// Fraction of crops taken around one object instead of at random: its bounding box
    /// scaled by 0.5 to 1.5, from inside the object to some room around it, as attention
    /// crops of a neuron that follows objects come out. Such crops show objects large and
    /// object interiors alone, which random crops rarely do.
    #[serde(default)]
    pub object_crop_fraction: f32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Default for PairSampling {
    fn default() -> Self {
        Self {
            image_size: 64,
            render_sizes: vec![64, 96, 128],
            crop_fraction: 0.5,
            min_crop_side: 0.3,
            object_crop_fraction: 0.0,
            mean: [0.481_454_66, 0.457_827_5, 0.408_210_73],
            std: [0.268_629_54, 0.261_302_6, 0.275_777_1],
        }
    }
}

impl PairSampling {
    pub(crate) fn check(&self) -> Result<(), TrainError> {
        let bad = |m: &str| Err(TrainError::Config(m.into()));
        if self.image_size < 8
            || self.render_sizes.is_empty()
            || self.render_sizes.iter().any(|&s| s < 8)
        {
            return bad(
                "image and render sizes must be at least 8 pixels, with at least one render size",
            );
        }
        if !(0.0..=1.0).contains(&self.crop_fraction) || !(0.05..=1.0).contains(&self.min_crop_side)
        {
            return bad("crop_fraction must be in 0..=1 and min_crop_side in 0.05..=1");
        }
        if !(0.0..=1.0).contains(&self.object_crop_fraction) {
            return bad("object_crop_fraction must be in 0..=1");
        }
        if self.std.iter().any(|&s| s <= 0.0) {
            return bad("std must be positive");
        }
        Ok(())
    }

    /// What dnd's loaders build from the written `preprocessor_config.json`: an exact
    /// (aspect-changing) bicubic resize to `image_size`, then `(x / 255 - mean) / std`.
    pub fn preprocess(&self) -> Preprocess {
        Preprocess {
            resize: Resize::Exact { width: self.image_size, height: self.image_size },
            filter: Filter::Bicubic,
            crop: None,
            crop_rounding: CropRounding::Floor,
            mean: self.mean,
            std: self.std,
        }
    }

    /// A Hugging Face `preprocessor_config.json` that dnd reads back as [`Self::preprocess`].
    pub fn preprocessor_config(&self, processor_type: &str) -> serde_json::Value {
        serde_json::json!({
            "image_processor_type": processor_type,
            "do_resize": true,
            "size": {"height": self.image_size, "width": self.image_size},
            "resample": 3,
            "do_center_crop": false,
            "do_rescale": true,
            "rescale_factor": 1.0 / 255.0,
            "do_normalize": true,
            "image_mean": self.mean,
            "image_std": self.std,
            "do_convert_rgb": true
        })
    }
}

/// What a pair's caption must say, with the grammar's defaults filled in: the objects as
/// sorted (colour, shape, fill) triples and the background, if described.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Truth {
    pub objects: Vec<(Colour, Shape, Fill)>,
    pub background: Option<(Colour, Texture)>,
}

impl Truth {
    /// What a caption says, read with [`parse_mentions`]; `None` if it names an incomplete
    /// object (no colour or no shape) or more than one background.
    pub fn read(text: &str) -> Option<Truth> {
        let mut objects = Vec::new();
        let mut backgrounds = Vec::new();
        for mention in parse_mentions(text) {
            match mention {
                Mention::Object(o) => {
                    let (Some(colour), Some(shape)) = (o.colour, o.shape) else { return None };
                    objects.extend(std::iter::repeat_n(
                        (colour, shape, o.fill.unwrap_or(Fill::Solid)),
                        o.count,
                    ));
                }
                Mention::Background(b) => {
                    backgrounds.push((b.colour?, b.texture.unwrap_or(Texture::Plain)))
                }
            }
        }
        objects.sort();
        if backgrounds.len() > 1 {
            return None;
        }
        Some(Truth { objects, background: backgrounds.pop() })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PairKind {
    Scene,
    Crop,
}

/// One training or held-out example.
#[derive(Debug, Clone)]
pub struct Pair {
    /// The image as dnd would receive it (a rendering or a crop of one, any size).
    pub source: RgbImage,
    /// `source` after the model's geometric preprocessing (`image_size` square).
    pub image: RgbImage,
    pub caption: String,
    pub truth: Truth,
    pub kind: PairKind,
}

fn truth_of(scene: &Scene, objects: &[usize], background: bool) -> Truth {
    let mut o: Vec<_> =
        objects.iter().map(|&i| &scene.objects[i]).map(|o| (o.colour, o.shape, o.fill)).collect();
    o.sort();
    Truth {
        objects: o,
        background: background.then_some((scene.background.colour, scene.background.texture)),
    }
}

/// A crop around a random object of a `side` x `side` rendering: its bounding box scaled
/// by 0.5 to 1.5 about its centre, at least 4 pixels, inside the image. `None` when the
/// scene shows no object.
fn object_crop<R: Rng + ?Sized>(rng: &mut R, rendered: &Rendered, side: u32) -> Option<Rect> {
    let masks = &rendered.object_masks;
    if masks.is_empty() {
        return None;
    }
    let bounds = masks[rng.random_range(0..masks.len())].bounds()?;
    let scale = rng.random_range(0.5f32..=1.5);
    let side = side as f32;
    let (w, h) = (
        (bounds.width as f32 * scale).round().clamp(4.0, side),
        (bounds.height as f32 * scale).round().clamp(4.0, side),
    );
    let centre =
        (bounds.x as f32 + bounds.width as f32 / 2.0, bounds.y as f32 + bounds.height as f32 / 2.0);
    let x = (centre.0 - w / 2.0).round().clamp(0.0, side - w);
    let y = (centre.1 - h / 2.0).round().clamp(0.0, side - h);
    Some(Rect::new(x as u32, y as u32, w as u32, h as u32))
}

/// Pair `index` of the stream `seed`.
pub fn sample_pair(
    seed: u64,
    index: u64,
    sampling: &PairSampling,
    preprocess: &Preprocess,
) -> Result<Pair, TrainError> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(index);
    let scene = Scene::sample(&mut rng);
    let side = sampling.render_sizes[rng.random_range(0..sampling.render_sizes.len())];
    let rendered = render(&scene, side, side);
    let crop = rng.random::<f32>() < sampling.crop_fraction;
    let (source, caption, truth, kind) = if crop {
        // Drawn only when asked for, so that pairs without object crops stay as they were.
        let around_object = sampling.object_crop_fraction > 0.0
            && rng.random::<f32>() < sampling.object_crop_fraction;
        let rect = match around_object.then(|| object_crop(&mut rng, &rendered, side)).flatten() {
            Some(rect) => rect,
            None => {
                let min = ((sampling.min_crop_side * side as f32).round() as u32).clamp(1, side);
                let (w, h) = (rng.random_range(min..=side), rng.random_range(min..=side));
                Rect::new(rng.random_range(0..=side - w), rng.random_range(0..=side - h), w, h)
            }
        };
        let (w, h) = (rect.width, rect.height);
        let visible = visible_in(&scene, &rendered, rect, &VisibilityRule::default())?;
        let text = caption_visible(&scene, &rendered, rect, &mut rng)?;
        let cut = image::imageops::crop_imm(&rendered.image, rect.x, rect.y, w, h).to_image();
        (cut, text, truth_of(&scene, &visible.objects, visible.background), PairKind::Crop)
    } else {
        let text = caption(&scene, &mut rng);
        let all: Vec<usize> = (0..scene.objects.len()).collect();
        (rendered.image, text, truth_of(&scene, &all, true), PairKind::Scene)
    };
    let image = preprocess.transform(&source);
    Ok(Pair { source, image, caption, truth, kind })
}

/// Pairs `start..start + count` of the stream `seed`, rendered in parallel, in order.
pub fn sample_pairs(
    seed: u64,
    start: u64,
    count: usize,
    sampling: &PairSampling,
) -> Result<Vec<Pair>, TrainError> {
    let preprocess = sampling.preprocess();
    (start..start + count as u64)
        .into_par_iter()
        .map(|i| sample_pair(seed, i, sampling, &preprocess))
        .collect()
}

/// `(B, 3, S, S)` normalised pixels of the pairs' preprocessed images.
pub(crate) fn pixels(
    pairs: &[Pair],
    sampling: &PairSampling,
) -> Result<candle_core::Tensor, TrainError> {
    let images: Vec<RgbImage> = pairs.iter().map(|p| p.image.clone()).collect();
    Ok(dnd_models::preprocess::normalized_batch(
        &images,
        sampling.mean,
        sampling.std,
        &candle_core::Device::Cpu,
    )?)
}

/// What train.json says of a run's losses: the curve (means per window, about 30
/// windows), the first loss, and the mean of the last 5% of steps.
pub(crate) struct LossSummary {
    pub curve: BTreeMap<usize, f32>,
    pub first: f32,
    pub last: f32,
}

pub(crate) fn summarize_losses(losses: &[f32]) -> LossSummary {
    let tail = (losses.len() / 20).max(1);
    LossSummary {
        curve: loss_curve(losses, (losses.len() / 30).max(1)),
        first: losses[0],
        last: losses[losses.len() - tail..].iter().sum::<f32>() / tail as f32,
    }
}

/// How the captioner and the embedder are optimised; both settings carry these fields.
pub(crate) struct Optimisation<'a> {
    pub seed: u64,
    pub sampling: &'a PairSampling,
    pub steps: usize,
    pub batch_size: usize,
    pub learning_rate: f64,
    pub warmup_steps: usize,
    pub final_learning_rate_fraction: f64,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
}

/// The training loop of the captioner and the embedder: AdamW (betas 0.9 and 0.98), linear
/// warm-up then cosine decay, global gradient clipping, and the next batch of pairs
/// rendered while the current step computes. `after_step` runs after each update (the
/// embedder clamps its temperature there); `progress` gets each step's loss. The losses.
pub(crate) fn train_on_pairs(
    varmap: &candle_nn::VarMap,
    o: &Optimisation,
    loss_of: impl Fn(&[Pair]) -> Result<candle_core::Tensor, TrainError> + Sync,
    mut after_step: impl FnMut() -> Result<(), TrainError>,
    mut progress: impl FnMut(usize, f32),
) -> Result<Vec<f32>, TrainError> {
    use super::tiny_transformer::{clip_gradients, learning_rate};
    use candle_nn::Optimizer;
    let params = candle_nn::ParamsAdamW {
        lr: o.learning_rate,
        beta1: 0.9,
        beta2: 0.98,
        eps: 1e-8,
        weight_decay: o.weight_decay,
    };
    let mut opt = candle_nn::AdamW::new(varmap.all_vars(), params)?;
    let mut losses = Vec::with_capacity(o.steps);
    let fetch =
        |step: usize| sample_pairs(o.seed, (step * o.batch_size) as u64, o.batch_size, o.sampling);
    let mut next = fetch(0)?;
    for step in 0..o.steps {
        let pairs = std::mem::take(&mut next);
        let (loss, fetched) = rayon::join(
            || loss_of(&pairs),
            || if step + 1 < o.steps { fetch(step + 1).map(Some) } else { Ok(None) },
        );
        let loss = loss?;
        if let Some(f) = fetched? {
            next = f;
        }
        opt.set_learning_rate(learning_rate(
            step,
            o.steps,
            o.warmup_steps,
            o.learning_rate,
            o.final_learning_rate_fraction,
        ));
        let mut grads = loss.backward()?;
        clip_gradients(varmap, &mut grads, o.max_grad_norm)?;
        opt.step(&grads)?;
        after_step()?;
        let value = loss.to_scalar::<f32>()?;
        if !value.is_finite() {
            return Err(TrainError::Config(format!(
                "the loss diverged at step {step}: lower the learning rate"
            )));
        }
        losses.push(value);
        progress(step, value);
    }
    Ok(losses)
}

/// Writes `value` as pretty JSON to `dir/name` (model configs, train.json).
pub(crate) fn write_json(
    dir: &std::path::Path,
    name: &str,
    value: &impl serde::Serialize,
) -> Result<(), TrainError> {
    let path = dir.join(name);
    crate::json::write_json(&path, value).map_err(io_error(&path))
}

/// Mean of `values` per window of `every` steps, for train.json's loss curve.
pub(crate) fn loss_curve(losses: &[f32], every: usize) -> BTreeMap<usize, f32> {
    losses
        .chunks(every.max(1))
        .enumerate()
        .map(|(i, c)| (i * every.max(1) + c.len(), c.iter().sum::<f32>() / c.len() as f32))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_are_reproducible_and_captions_read_back_to_their_truth() {
        let sampling = PairSampling::default();
        let a = sample_pairs(5, 0, 40, &sampling).unwrap();
        let b = sample_pairs(5, 0, 40, &sampling).unwrap();
        let mut kinds = std::collections::HashSet::new();
        for (x, y) in a.iter().zip(&b) {
            assert_eq!((&x.caption, &x.image), (&y.caption, &y.image));
            assert_eq!(x.image.dimensions(), (64, 64));
            assert_eq!(Truth::read(&x.caption).as_ref(), Some(&x.truth), "{}", x.caption);
            kinds.insert(x.kind);
        }
        assert_eq!(kinds.len(), 2);
        let other = sample_pairs(6, 0, 1, &sampling).unwrap();
        assert_ne!(other[0].image, a[0].image);
    }

    #[test]
    fn object_crops_show_an_object_large() {
        let random = PairSampling { crop_fraction: 1.0, ..PairSampling::default() };
        let around = PairSampling { object_crop_fraction: 1.0, ..random.clone() };
        let mean_side = |pairs: &[Pair]| {
            pairs.iter().map(|p| p.source.width() + p.source.height()).sum::<u32>() as f32
                / (2 * pairs.len()) as f32
        };
        let (random, around) =
            (sample_pairs(5, 0, 60, &random).unwrap(), sample_pairs(5, 0, 60, &around).unwrap());
        for p in &around {
            assert_eq!(p.kind, PairKind::Crop);
            assert!(!p.truth.objects.is_empty(), "{}", p.caption);
            assert_eq!(Truth::read(&p.caption).as_ref(), Some(&p.truth), "{}", p.caption);
            // An object's box is at most about half the side (radius 0.24 of it), so scaled
            // by at most 1.5 it is at most about three quarters of the largest render (128).
            assert!(p.source.width().max(p.source.height()) <= 100, "{:?}", p.source.dimensions());
        }
        assert!(
            mean_side(&around) < 0.6 * mean_side(&random),
            "{} vs {}",
            mean_side(&around),
            mean_side(&random)
        );
        // Off by default: the committed models' pairs are drawn as before.
        assert_eq!(PairSampling::default().object_crop_fraction, 0.0);
    }
}

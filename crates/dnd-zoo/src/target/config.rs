//! The target network's training settings and the seeds derived from them.

use serde::{Deserialize, Serialize};

use dnd_models::preprocess::{CropRounding, Filter, Preprocess, Resize};
use dnd_synth::planted::PlantedSpec;

use super::TrainError;
use super::default_planted;

/// Everything that decides the trained weights. [`Default`] is the committed zoo model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TargetTraining {
    /// Input side in pixels; dnd resizes every image to it (config.json's `input_size`).
    pub size: u32,
    pub stem_channels: usize,
    /// Channels of layer1..layer4 (BasicBlocks, so also the stage outputs).
    pub widths: [usize; 4],
    /// BasicBlocks per stage.
    pub layers: [usize; 4],
    pub steps: usize,
    pub batch_size: usize,
    /// Peak learning rate of AdamW (linear warm-up, then cosine decay to zero).
    pub lr: f64,
    /// AdamW's decoupled weight decay, on convolution and fc weights only.
    pub weight_decay: f64,
    pub warmup_steps: usize,
    /// The seed of every random draw: initial weights, training scenes, evaluation scenes.
    pub seed: u64,
    pub planted: Vec<PlantedSpec>,
    /// Weight of the planting loss (weighted mean over planted channels, see
    /// [`PlantedSpec::weight`]) beside the classification cross-entropy.
    pub plant_weight: f64,
    /// Target activation of a map cell fully covered by the channel's concept.
    pub plant_scale: f32,
    /// Extra weight of the cells a concept covers (they are rare).
    pub positive_weight: f32,
    /// Fraction of training scenes built to contain a planted concept (or, for AND and
    /// AND-NOT channels, sometimes a near miss); the rest are plain [`Scene::sample`](dnd_synth::Scene::sample)s.
    pub focus_fraction: f64,
    /// Fraction of training images rendered larger (up to `hires_max`) and downscaled
    /// with dnd's preprocessing, as dnd does with images of any size.
    pub hires_fraction: f64,
    pub hires_max: u32,
    /// BatchNorm running-statistics momentum during training (PyTorch's 0.1).
    pub bn_momentum: f64,
    /// Images of the final BatchNorm recalibration batch.
    pub calibration_images: usize,
    /// Held-out scenes for the report (plain [`Scene::sample`](dnd_synth::Scene::sample)s).
    pub eval_images: usize,
    /// Size at which held-out scenes are rendered before dnd's preprocessing.
    pub eval_render_size: u32,
    /// Normalisation of the input (config.json's `mean`, `std`).
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Default for TargetTraining {
    fn default() -> Self {
        Self {
            size: 96,
            stem_channels: 16,
            widths: [16, 48, 96, 192],
            layers: [1, 1, 1, 1],
            steps: 6000,
            batch_size: 32,
            lr: 5e-3,
            weight_decay: 1e-2,
            warmup_steps: 100,
            seed: 5,
            planted: default_planted(),
            plant_weight: 4.0,
            plant_scale: 3.0,
            positive_weight: 4.0,
            focus_fraction: 0.5,
            hires_fraction: 0.5,
            hires_max: 288,
            bn_momentum: 0.1,
            calibration_images: 256,
            eval_images: 1000,
            eval_render_size: 224,
            mean: [0.5, 0.5, 0.5],
            std: [0.25, 0.25, 0.25],
        }
    }
}

impl TargetTraining {
    pub(crate) fn validate(&self) -> Result<(), TrainError> {
        let bad = |m: String| Err(TrainError::Config(m));
        if self.size < 32 {
            return bad(format!("size {} is below 32: layer4 would have no pixels", self.size));
        }
        if self.widths.contains(&0) || self.layers.contains(&0) || self.stem_channels == 0 {
            return bad("widths, layers and stem_channels must be positive".into());
        }
        if self.steps == 0 || self.batch_size < 2 {
            return bad(
                "steps must be positive and batch_size at least 2 (BatchNorm needs a batch)".into(),
            );
        }
        if !(self.lr > 0.0 && self.lr.is_finite())
            || self.calibration_images < 2
            || self.eval_images == 0
        {
            return bad(
                "lr must be positive, calibration_images at least 2 and eval_images positive"
                    .into(),
            );
        }
        if !(0.0..=1.0).contains(&self.focus_fraction)
            || !(0.0..=1.0).contains(&self.hires_fraction)
        {
            return bad("focus_fraction and hires_fraction are fractions".into());
        }
        if self.hires_fraction > 0.0 && self.hires_max <= self.size {
            return bad(format!("hires_max {} must exceed size {}", self.hires_max, self.size));
        }
        if self.std.iter().any(|&s| s <= 0.0) {
            return bad("std must be positive".into());
        }
        let mut seen = std::collections::HashSet::new();
        for p in &self.planted {
            p.validate(&self.widths).map_err(TrainError::Config)?;
            if !seen.insert((p.layer, p.neuron)) {
                return bad(format!("{} channel {} is planted twice", p.layer_name(), p.neuron));
            }
        }
        Ok(())
    }

    /// The preprocessing dnd derives from the exported config.json (crop_pct 1.0).
    pub fn preprocess(&self) -> Preprocess {
        Preprocess {
            resize: Resize::ShorterSide(self.size),
            filter: Filter::Bilinear,
            crop: Some(self.size),
            crop_rounding: CropRounding::HalfEven,
            mean: self.mean,
            std: self.std,
        }
    }

    /// Side of the maps of stage `stage` (1..=4) for this input size.
    pub fn map_size(&self, stage: usize) -> usize {
        let down = |h: usize| (h - 1) / 2 + 1; // 3x3/2 pad 1, 7x7/2 pad 3 and 1x1/2 alike
        let mut h = down(down(self.size as usize));
        for _ in 1..stage {
            h = down(h);
        }
        h
    }

    pub(crate) fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = (self.steps - self.warmup_steps.min(self.steps)).max(1) as f64;
        let t = (step - self.warmup_steps) as f64 / span;
        self.lr * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
    }
}

// ---------------------------------------------------------------------------------------
// Seeds
// ---------------------------------------------------------------------------------------

pub(crate) fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A seed for one purpose: `derive(&[seed, PURPOSE, step, index])`.
pub(crate) fn derive(parts: &[u64]) -> u64 {
    parts.iter().fold(0x243F_6A88_85A3_08D3, |h, &p| splitmix(h ^ splitmix(p)))
}

pub(crate) const PURPOSE_INIT: u64 = 1;
pub(crate) const PURPOSE_TRAIN: u64 = 2;
pub(crate) const PURPOSE_CALIBRATE: u64 = 3;
pub(crate) const PURPOSE_EVAL: u64 = 4;

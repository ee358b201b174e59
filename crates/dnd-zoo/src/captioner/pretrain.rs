//! The vision tower's pretraining: before it learns to caption, the tower learns what an
//! object looks like. Trained on captions alone it learnt colour and fill but not shape
//! (a shape word is one token of a caption, and a small tower, trained from scratch, kept
//! to the colour statistics that explain most of the loss); BLIP itself starts from a
//! pretrained ViT. Here a linear head on the class token names the shape, colour and fill
//! of one object seen whole ([`crate::pairs::ObjectView`]); the head is dropped afterwards
//! and only the tower's weights go on to caption training.

use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::{D, Device, Tensor};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use super::{TrainingCaptioner, VISION_PREFIX};
use crate::error::TrainError;
use crate::pairs::{self, ObjectView, ViewFraming, sample_object_views};
use crate::tiny_transformer::{Lin, Params, masked_cross_entropy};
use dnd_synth::vocab::{Colour, Fill, Shape};

/// How the tower is pretrained.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VisionPretraining {
    pub steps: usize,
    /// Object views per step.
    pub batch_size: usize,
    pub learning_rate: f64,
    pub warmup_steps: usize,
    /// Held-out views (from the captioner's `eval_seed`) scored after pretraining.
    pub eval_views: usize,
    /// How each view frames its object (the held-out views are framed the same way).
    pub framing: ViewFraming,
}

impl Default for VisionPretraining {
    fn default() -> Self {
        Self {
            steps: 3000,
            batch_size: 64,
            learning_rate: 1e-3,
            warmup_steps: 200,
            eval_views: 512,
            framing: ViewFraming::default(),
        }
    }
}

/// Held-out accuracy of the pretraining head, per attribute.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct ViewAccuracy {
    pub views: usize,
    pub shape: f32,
    pub colour: f32,
    pub fill: f32,
}

/// What pretraining did, in the captioner's train.json.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PretrainReport {
    pub loss_curve: BTreeMap<usize, f32>,
    pub first_loss: f32,
    pub final_loss: f32,
    pub seconds: f64,
    pub heldout: ViewAccuracy,
}

/// Views are drawn from their own stream of the seed, apart from the pairs'.
const VIEW_STREAM: u64 = 0x5_1e55;

/// Classes per attribute, in the head's output order: shape, colour, fill.
const ATTRIBUTES: [usize; 3] = [Shape::ALL.len(), Colour::ALL.len(), Fill::ALL.len()];

fn class_of<T: PartialEq>(all: &[T], x: &T) -> u32 {
    all.iter().position(|a| a == x).expect("every value is in its ALL") as u32
}

/// Each view's class per attribute.
fn classes(view: &ObjectView) -> [u32; 3] {
    [
        class_of(&Shape::ALL, &view.shape),
        class_of(&Colour::ALL, &view.colour),
        class_of(&Fill::ALL, &view.fill),
    ]
}

/// The head's logits `(B, shapes + colours + fills)` on the tower's class token.
fn logits(
    captioner: &TrainingCaptioner,
    head: &Lin,
    views: &[ObjectView],
) -> Result<Tensor, TrainError> {
    let images: Vec<image::RgbImage> = views.iter().map(|v| v.image.clone()).collect();
    let s = &captioner.settings.sampling;
    let pixels = dnd_models::preprocess::normalized_batch(&images, s.mean, s.std, &Device::Cpu)?;
    let features = captioner.encode_images(&pixels)?;
    Ok(head.forward(&features.narrow(1, 0, 1)?.squeeze(1)?)?)
}

/// Mean over the attributes of each one's cross-entropy.
fn loss(logits: &Tensor, views: &[ObjectView]) -> Result<Tensor, TrainError> {
    let targets: Vec<[u32; 3]> = views.iter().map(classes).collect();
    let mut total: Option<Tensor> = None;
    let mut offset = 0;
    for (a, &n) in ATTRIBUTES.iter().enumerate() {
        let t: Vec<Option<u32>> = targets.iter().map(|c| Some(c[a])).collect();
        let ce = masked_cross_entropy(&logits.narrow(1, offset, n)?, &t, |_| 1.0)?;
        total = Some(match total {
            None => ce,
            Some(sum) => (sum + ce)?,
        });
        offset += n;
    }
    let total = total.expect("three attributes");
    Ok((total / ATTRIBUTES.len() as f64)?)
}

/// Share of `views` whose argmax class is right, per attribute.
fn accuracy(logits: &Tensor, views: &[ObjectView]) -> Result<ViewAccuracy, TrainError> {
    let mut right = [0usize; 3];
    let mut offset = 0;
    for (a, &n) in ATTRIBUTES.iter().enumerate() {
        let predicted: Vec<u32> = logits.narrow(1, offset, n)?.argmax(D::Minus1)?.to_vec1()?;
        right[a] = predicted.iter().zip(views).filter(|(p, v)| **p == classes(v)[a]).count();
        offset += n;
    }
    let share = |r: usize| r as f32 / views.len().max(1) as f32;
    Ok(ViewAccuracy {
        views: views.len(),
        shape: share(right[0]),
        colour: share(right[1]),
        fill: share(right[2]),
    })
}

/// Pretrains `captioner`'s vision tower in place; `progress(step, loss)` after each step.
pub(super) fn pretrain(
    captioner: &TrainingCaptioner,
    settings: &VisionPretraining,
    progress: impl FnMut(usize, f32),
) -> Result<PretrainReport, TrainError> {
    let started = Instant::now();
    let s = &captioner.settings;
    let mut head_params = Params::new(s.seed.wrapping_add(VIEW_STREAM));
    let head = head_params.linear("head", s.vision.hidden, ATTRIBUTES.iter().sum(), true)?;
    // One var map over the tower's variables (shared with the captioner) and the head's.
    let varmap = VarMap::new();
    {
        let mut data = varmap.data().lock().expect("the var map lock is never poisoned");
        let tower = captioner.params.varmap.data().lock().expect("never poisoned");
        let head = head_params.varmap.data().lock().expect("never poisoned");
        data.extend(tower.iter().filter(|(n, _)| n.starts_with(VISION_PREFIX)).map(clone_entry));
        data.extend(head.iter().map(|(n, v)| (format!("pretraining.{n}"), v.clone())));
    }
    let o = pairs::Optimisation {
        seed: s.seed,
        sampling: &s.sampling,
        scaled: None,
        steps: settings.steps,
        batch_size: settings.batch_size,
        learning_rate: settings.learning_rate,
        warmup_steps: settings.warmup_steps,
        final_learning_rate_fraction: s.final_learning_rate_fraction,
        weight_decay: s.weight_decay,
        max_grad_norm: s.max_grad_norm,
    };
    let seed = s.seed.wrapping_add(VIEW_STREAM);
    let fetch = |step: usize| {
        let start = (step * settings.batch_size) as u64;
        Ok(sample_object_views(seed, start, settings.batch_size, &s.sampling, &settings.framing))
    };
    let losses = pairs::train_steps(
        &varmap,
        &o,
        fetch,
        |views: &Vec<ObjectView>| loss(&logits(captioner, &head, views)?, views),
        || Ok(()),
        progress,
    )?;
    let seconds = started.elapsed().as_secs_f64();
    let heldout: Vec<ObjectView> = sample_object_views(
        s.eval_seed.wrapping_add(VIEW_STREAM),
        0,
        settings.eval_views,
        &s.sampling,
        &settings.framing,
    );
    let mut rows = Vec::new();
    for chunk in heldout.chunks(64) {
        rows.push(logits(captioner, &head, chunk)?.detach());
    }
    let heldout = accuracy(&Tensor::cat(&rows, 0)?, &heldout)?;
    let summary = pairs::summarize_losses(&losses);
    Ok(PretrainReport {
        loss_curve: summary.curve,
        first_loss: summary.first,
        final_loss: summary.last,
        seconds,
        heldout,
    })
}

fn clone_entry((name, var): (&String, &candle_core::Var)) -> (String, candle_core::Var) {
    (name.clone(), var.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::captioner::CaptionerTraining;

    #[test]
    fn pretraining_moves_only_the_tower_and_its_head_learns_colour() {
        let settings = CaptionerTraining {
            vision_pretraining: Some(VisionPretraining {
                steps: 200,
                batch_size: 16,
                learning_rate: 3e-3,
                warmup_steps: 10,
                eval_views: 64,
                framing: ViewFraming::default(),
            }),
            ..CaptionerTraining::tiny()
        };
        let captioner = TrainingCaptioner::new(&settings).unwrap();
        let snapshot = |prefix: &str| -> Vec<f32> {
            let data = captioner.params.varmap.data().lock().unwrap();
            let mut names: Vec<&String> = data.keys().filter(|n| n.starts_with(prefix)).collect();
            names.sort();
            names
                .iter()
                .flat_map(|n| data[*n].as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap())
                .collect()
        };
        let (tower, decoder) = (snapshot(VISION_PREFIX), snapshot("text_decoder."));
        let report =
            pretrain(&captioner, settings.vision_pretraining.as_ref().unwrap(), |_, _| {}).unwrap();
        assert_ne!(snapshot(VISION_PREFIX), tower, "the tower learnt nothing");
        assert_eq!(snapshot("text_decoder."), decoder, "the decoder is not pretrained");
        assert!(report.final_loss < report.first_loss, "{report:?}");
        // Colour is the easiest attribute: 200 steps beat chance (1 in 12) by far.
        assert!(report.heldout.colour > 0.3, "{report:?}");
        // The head is not the captioner's: nothing but BLIP's weights is saved.
        assert!(
            captioner
                .params
                .varmap
                .data()
                .lock()
                .unwrap()
                .keys()
                .all(|n| !n.contains("pretraining"))
        );
    }
}

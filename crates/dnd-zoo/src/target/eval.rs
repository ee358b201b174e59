//! Held-out quality of the exported checkpoint as dnd loads it: accuracy, and per planted
//! channel its IoU with the concept's mask, its correlation with the concept's area and
//! its AUC for the concept's presence.

use candle_core::{D, Tensor};
use dnd_core::Map2;
use dnd_core::stats::{auc_of, pearson, spearman};
use dnd_models::preprocess::Preprocess;
use dnd_models::{Tap, TargetModel};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use dnd_synth::mask::Mask;
use dnd_synth::planted::PlantedKind;
use dnd_synth::render::render;
use dnd_synth::scene::Scene;

use super::TrainError;
use super::config::{PURPOSE_EVAL, TargetTraining, derive};
use super::data::{cell_fractions, label_of};

/// Held-out quality of one planted channel, measured on the exported checkpoint as dnd
/// loads it, over plain scenes rendered at `eval_render_size`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlantedQuality {
    pub layer: String,
    pub neuron: usize,
    pub kind: PlantedKind,
    pub description: String,
    /// Fraction of held-out images where the concept covers at least one pixel.
    pub prevalence: f32,
    /// Dataset IoU (summed intersections over summed unions) of the map, bilinearly
    /// upsampled to the image and thresholded at `plant_scale / 2` (a cell half covered),
    /// against the concept's exact mask.
    pub iou: f32,
    /// The IoU the same procedure gives the ideal map (`plant_scale` x each cell's exact
    /// coverage): the ceiling at this layer's resolution.
    pub oracle_iou: f32,
    /// Pearson and Spearman correlation between the channel's spatial mean (dnd's pooling)
    /// and the fraction of the image the concept covers.
    pub pearson: f32,
    pub spearman: f32,
    /// AUC of the spatial mean for "the concept is in the image" (covers at least 1%).
    pub auc: f32,
    pub mean_activation_present: f32,
    pub mean_activation_absent: f32,
}

/// Bilinear upsampling of a `g` x `g` map to `size` x `size`, half-pixel centres and edge
/// clamping (PyTorch's `align_corners=False`): the crops' [`Map2::resize_bilinear`].
pub(crate) fn upsample_bilinear(map: &[f32], g: usize, size: usize) -> Vec<f32> {
    Map2 { width: g, height: g, data: map.to_vec() }.resize_bilinear(size, size).data
}

pub(crate) struct EvalImage {
    pub(crate) input: Vec<f32>,
    pub(crate) label: u32,
    /// Per planted spec: its mask at the render size.
    pub(crate) masks: Vec<Mask>,
}

pub(crate) fn eval_image(
    config: &TargetTraining,
    pre: &Preprocess,
    index: usize,
    side: u32,
) -> Result<EvalImage, TrainError> {
    let scene = Scene::sample(&mut ChaCha8Rng::seed_from_u64(derive(&[
        config.seed,
        PURPOSE_EVAL,
        index as u64,
    ])));
    let rendered = render(&scene, side, side);
    let masks =
        config.planted.iter().map(|p| p.mask(&scene, &rendered)).collect::<Result<_, _>>()?;
    Ok(EvalImage { input: pre.apply(&rendered.image), label: label_of(&scene, &rendered), masks })
}

#[derive(Default, Clone)]
pub(crate) struct ChannelTally {
    pub(crate) pooled: Vec<f64>,
    pub(crate) area: Vec<f64>,
    pub(crate) intersection: u64,
    pub(crate) union: u64,
    /// The same for the ideal map (`plant_scale` x the exact cell coverage).
    pub(crate) oracle_intersection: u64,
    pub(crate) oracle_union: u64,
}

pub(crate) fn ratio(a: u64, b: u64) -> f32 {
    if b == 0 { 0.0 } else { (a as f64 / b as f64) as f32 }
}

/// Accuracy and planted-channel quality of the loaded checkpoint.
pub(crate) fn evaluate(
    config: &TargetTraining,
    model: &TargetModel,
) -> Result<(f32, f32, Vec<PlantedQuality>), TrainError> {
    let pre = &model.preprocess;
    let side = config.eval_render_size;
    let s = config.size as usize;
    let taps = [Tap::Layer(3), Tap::Layer(4), Tap::Fc];
    let threshold = config.plant_scale / 2.0;
    let mut tallies = vec![ChannelTally::default(); config.planted.len()];
    let (mut correct, mut correct_native) = (0usize, 0usize);
    let chunk = 50;
    for start in (0..config.eval_images).step_by(chunk) {
        let indices: Vec<usize> = (start..(start + chunk).min(config.eval_images)).collect();
        let n = indices.len();
        let images: Vec<EvalImage> = indices
            .par_iter()
            .map(|&i| eval_image(config, pre, i, side))
            .collect::<Result<_, _>>()?;
        let x = Tensor::from_vec(
            images.iter().flat_map(|e| e.input.iter().copied()).collect::<Vec<f32>>(),
            (n, 3, s, s),
            &model.device,
        )?;
        let outs = model.forward_taps(&x, &taps)?;
        let predictions = outs[2].argmax(D::Minus1)?.to_vec1::<u32>()?;
        correct += predictions.iter().zip(&images).filter(|(p, e)| **p == e.label).count();
        let l3 = outs[0].flatten_from(2)?.to_vec3::<f32>()?;
        let l4 = outs[1].flatten_from(2)?.to_vec3::<f32>()?;
        let updates: Vec<ChannelTally> = config
            .planted
            .par_iter()
            .enumerate()
            .map(|(k, spec)| {
                let (maps, g) = if spec.layer == 3 {
                    (&l3, config.map_size(3))
                } else {
                    (&l4, config.map_size(4))
                };
                let mut t = ChannelTally::default();
                for (b, image) in images.iter().enumerate() {
                    let map = &maps[b][spec.neuron];
                    t.pooled
                        .push(map.iter().map(|&v| f64::from(v)).sum::<f64>() / map.len() as f64);
                    let mask = &image.masks[k];
                    t.area.push(mask.count() as f64 / (side as f64 * side as f64));
                    let up = upsample_bilinear(map, g, side as usize);
                    let ideal: Vec<f32> =
                        cell_fractions(mask, g).iter().map(|f| f * config.plant_scale).collect();
                    let ideal = upsample_bilinear(&ideal, g, side as usize);
                    for ((&on, &v), &o) in mask.as_slice().iter().zip(&up).zip(&ideal) {
                        let (hit, oracle) = (v > threshold, o > threshold);
                        t.intersection += u64::from(on && hit);
                        t.union += u64::from(on || hit);
                        t.oracle_intersection += u64::from(on && oracle);
                        t.oracle_union += u64::from(on || oracle);
                    }
                }
                t
            })
            .collect();
        for (tally, u) in tallies.iter_mut().zip(updates) {
            tally.pooled.extend(u.pooled);
            tally.area.extend(u.area);
            tally.intersection += u.intersection;
            tally.union += u.union;
            tally.oracle_intersection += u.oracle_intersection;
            tally.oracle_union += u.oracle_union;
        }
        // The same scenes rendered at the model's own size.
        let native: Vec<EvalImage> = indices
            .par_iter()
            .map(|&i| eval_image(config, pre, i, config.size))
            .collect::<Result<_, _>>()?;
        let x = Tensor::from_vec(
            native.iter().flat_map(|e| e.input.iter().copied()).collect::<Vec<f32>>(),
            (n, 3, s, s),
            &model.device,
        )?;
        let logits = &model.forward_taps(&x, &[Tap::Fc])?[0];
        let predictions = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
        correct_native += predictions.iter().zip(&native).filter(|(p, e)| **p == e.label).count();
    }
    let quality = config
        .planted
        .iter()
        .zip(&tallies)
        .map(|(spec, t)| {
            let present: Vec<bool> = t.area.iter().map(|&a| a >= 0.01).collect();
            let mean_where = |want: bool| {
                let v: Vec<f64> = t
                    .pooled
                    .iter()
                    .zip(&present)
                    .filter(|(_, p)| **p == want)
                    .map(|(v, _)| *v)
                    .collect();
                if v.is_empty() { 0.0 } else { (v.iter().sum::<f64>() / v.len() as f64) as f32 }
            };
            PlantedQuality {
                layer: spec.layer_name(),
                neuron: spec.neuron,
                kind: spec.kind,
                description: spec.description(),
                prevalence: (t.area.iter().filter(|&&a| a > 0.0).count() as f64
                    / t.area.len() as f64) as f32,
                iou: ratio(t.intersection, t.union),
                oracle_iou: ratio(t.oracle_intersection, t.oracle_union),
                pearson: pearson(&t.pooled, &t.area) as f32,
                spearman: spearman(&t.pooled, &t.area) as f32,
                // 0.5 when the concept is never (or always) present: no evidence either way.
                auc: match auc_of(&t.pooled, &present) {
                    a if a.is_nan() => 0.5,
                    a => a as f32,
                },
                mean_activation_present: mean_where(true),
                mean_activation_absent: mean_where(false),
            }
        })
        .collect();
    let total = config.eval_images as f32;
    Ok((correct as f32 / total, correct_native as f32 / total, quality))
}

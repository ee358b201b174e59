//! dnd-quality: how well a dissection's labels recover the planted concepts of the
//! synthetic zoo, beside two baselines (Network-Dissection-style and CLIP-Dissect-style)
//! and dnd without concept selection (its first candidate). `dnd bench quality` runs the
//! dissections and prints what [`score_planted`] and [`group_scores`] compute.
//!
//! Per neuron: recovery (does the label name the planted concept,
//! [`dnd_synth::quality::recovered`]) and a CoSy-style AUC (how well the neuron's
//! activations separate images rendered from the label from control scenes).

pub mod latents;
pub mod sanity;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use image::RgbImage;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use dnd_core::Map2;
use dnd_core::stats::{auc, pearson, widen};
use dnd_models::{ClipEmbedder, Embedder, ModelError, ModelRef, Tap, TargetModel};
use dnd_pipeline::activations::pooled_activations;
use dnd_pipeline::{JobSpec, PipelineError};
use dnd_store::results::{CandidateRow, DescriptionRow};
use dnd_synth::planted::{PlantedKind, PlantedNeuron};
use dnd_synth::quality::{IouCounts, best, recovered, top_quantile};
use dnd_synth::render::Rendered;
use dnd_synth::{
    Concept, ProbeSetSpec, Scene, SynthError, TextRenderer, all_concepts, read_scenes, render,
};

/// Errors of the benchmark's scoring.
#[derive(Debug, thiserror::Error)]
pub enum QualityError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error(transparent)]
    Synth(#[from] SynthError),
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
    #[error(
        "the job described none of the neurons in planted.json: list planted neurons in target.neurons"
    )]
    NothingPlanted,
}

/// Methods compared, in table order.
pub const METHODS: [&str; 5] = ["dnd", "dnd-first", "netdissect", "clip-dissect", "truth"];

#[derive(Debug, Clone, Serialize)]
pub struct NeuronScore {
    pub layer: String,
    pub neuron: usize,
    pub kind: PlantedKind,
    pub truth: String,
    /// Per method: its label (None where the method does not apply).
    pub labels: BTreeMap<String, Option<String>>,
    pub recovered: BTreeMap<String, Option<bool>>,
    pub auc: BTreeMap<String, Option<f64>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct GroupScore {
    pub layer: String,
    pub kind: String,
    pub neurons: usize,
    /// Share of neurons whose label names the planted concept, per method.
    pub recovery: BTreeMap<String, Option<f64>>,
    pub mean_auc: BTreeMap<String, Option<f64>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Speed {
    pub neurons: usize,
    pub cold_seconds_per_neuron: f64,
    pub warm_seconds_per_neuron: f64,
    pub cold_cache_hit_rate: f64,
    pub warm_cache_hit_rate: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct QualityReport {
    pub job: String,
    pub neurons: Vec<NeuronScore>,
    pub groups: Vec<GroupScore>,
    pub speed: Speed,
    /// The SAE's latents chosen per planted concept, and whether one is labelled with it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latents: Option<Vec<latents::LatentScore>>,
}

/// What the scoring needs: the job that was dissected, its results, and the benchmark's
/// image counts.
pub struct QualityInputs<'a> {
    pub spec: &'a JobSpec,
    pub probe_set: &'a ProbeSetSpec,
    /// Where the job's synthetic probe set was rendered (`<out>/probe-sets/<name>`).
    pub probe_dir: &'a Path,
    pub planted: &'a [PlantedNeuron],
    pub descriptions: &'a [DescriptionRow],
    pub candidates: &'a [CandidateRow],
    /// Images rendered from each label for its AUC.
    pub label_images: usize,
    /// Control images of the world for the AUC.
    pub control_images: usize,
    /// Probe images the baselines see.
    pub baseline_images: usize,
}

/// The neuron's pooled activations on `images`, for every neuron of the tap: `(images, C)`.
fn activations(
    model: &TargetModel,
    images: Vec<RgbImage>,
    tap: Tap,
) -> Result<Vec<Vec<f32>>, QualityError> {
    let images: Vec<Arc<RgbImage>> = images.into_iter().map(Arc::new).collect();
    let readout = dnd_pipeline::Readout::channels(tap);
    Ok(pooled_activations(model, &images, &readout, dnd_core::Pooling::Mean, 32)?)
}

/// Side of the lattice Network Dissection's masks and maps are compared on.
const GRID: usize = 32;

/// `masks[image][concept]`: each concept's mask in each probe scene, sampled on a GRID x
/// GRID lattice.
fn grid_masks(
    scenes: &[Scene],
    renders: &[Rendered],
    concepts: &[Concept],
    size: u32,
) -> Vec<Vec<Vec<bool>>> {
    scenes
        .iter()
        .zip(renders)
        .map(|(scene, rendered)| {
            concepts
                .iter()
                .map(|c| {
                    let mask = c.mask(scene, rendered).expect("the scene was rendered");
                    (0..GRID * GRID)
                        .map(|i| {
                            let (gy, gx) = (i / GRID, i % GRID);
                            let y = ((gy as f32 + 0.5) * size as f32 / GRID as f32) as u32;
                            let x = ((gx as f32 + 0.5) * size as f32 / GRID as f32) as u32;
                            mask.get(x.min(size - 1), y.min(size - 1))
                        })
                        .collect()
                })
                .collect()
        })
        .collect()
}

/// CLIP image-text similarity of every probe image (rows) to every phrase (columns).
fn clip_similarity(
    embedder: &ClipEmbedder,
    renders: &[Rendered],
    phrases: &[String],
) -> Result<Vec<Vec<f32>>, QualityError> {
    let mut rows = Vec::new();
    for chunk in renders.chunks(64) {
        let imgs: Vec<RgbImage> = chunk.iter().map(|r| r.image.clone()).collect();
        rows.push(embedder.embed_images(&imgs)?);
    }
    let image_embeddings = Tensor::cat(&rows, 0)?;
    let text_embeddings =
        embedder.embed_texts(&phrases.iter().map(String::as_str).collect::<Vec<_>>())?;
    Ok(image_embeddings.matmul(&text_embeddings.t()?)?.to_device(&Device::Cpu)?.to_vec2()?)
}

/// Network-Dissection-style label of `neuron`: the phrase of the concept whose masks best
/// overlap (IoU) the neuron's maps over the probe set (`maps`: `(N, C, h, w)`), thresholded
/// at their top 0.5% and upsampled to the lattice.
fn netdissect_label(
    maps: &Tensor,
    neuron: usize,
    masks: &[Vec<Vec<bool>>],
    phrases: &[String],
) -> Result<String, QualityError> {
    let neuron_maps = maps.narrow(1, neuron, 1)?.squeeze(1)?; // (N, h, w)
    let (_, h, w) = neuron_maps.dims3()?;
    let values: Vec<f32> = neuron_maps.flatten_all()?.to_vec1()?;
    let threshold = top_quantile(&values, 0.005);
    let mut counts = vec![IouCounts::default(); phrases.len()];
    for (i, image_masks) in masks.iter().enumerate() {
        let map = Map2 { width: w, height: h, data: values[i * h * w..(i + 1) * h * w].to_vec() };
        let active: Vec<bool> =
            map.resize_bilinear(GRID, GRID).data.into_iter().map(|v| v > threshold).collect();
        for (c, mask) in image_masks.iter().enumerate() {
            counts[c].add(&active, mask);
        }
    }
    let ious: Vec<f64> = counts.iter().map(IouCounts::iou).collect();
    Ok(phrases[best(&ious).unwrap_or(0)].clone())
}

/// `count` plain scenes of the world at `size` px, never seen by a dissection: the
/// negatives of every AUC here.
fn control_scenes(count: usize, size: u32) -> Vec<RgbImage> {
    (0..count)
        .map(|i| {
            render(&Scene::sample(&mut ChaCha8Rng::seed_from_u64(2_000_000 + i as u64)), size, size)
                .image
        })
        .collect()
}

/// Scores every planted neuron the job described, per method.
pub fn score_planted(input: &QualityInputs<'_>) -> Result<Vec<NeuronScore>, QualityError> {
    let spec = input.spec;
    let (planted, descriptions, candidates) = (input.planted, input.descriptions, input.candidates);
    let device = dnd_models::device::parse_device(&spec.device)?;
    let model = TargetModel::load(&spec.target.model.parse::<ModelRef>()?, &device)?;
    let embedder = ClipEmbedder::load(&spec.embedder.model.parse::<ModelRef>()?, &device)?;
    let size = input.probe_set.size;
    let renderer = TextRenderer::new(size, size)?;

    // The probe images the baselines see, with their scenes (the ground truth masks).
    let scenes: Vec<Scene> = read_scenes(input.probe_dir)?
        .into_iter()
        .take(input.baseline_images)
        .map(|(_, s)| s)
        .collect();
    let probe_renders: Vec<_> = scenes.iter().map(|s| render(s, size, size)).collect();
    let concepts = all_concepts();
    let masks = grid_masks(&scenes, &probe_renders, &concepts, size);
    // CLIP-Dissect: similarity of every probe image to every concept phrase.
    let phrases: Vec<String> = concepts.iter().map(Concept::phrase).collect();
    let similarity = clip_similarity(&embedder, &probe_renders, &phrases)?;

    // Controls for the AUC: plain scenes of the world, never seen by the dissection.
    let controls = control_scenes(input.control_images, size);

    let mut scores = Vec::new();
    let mut by_layer: BTreeMap<String, Vec<&PlantedNeuron>> = BTreeMap::new();
    for p in planted {
        if descriptions.iter().any(|d| d.layer.as_str() == p.layer && d.neuron.index() == p.neuron)
        {
            by_layer.entry(p.layer.clone()).or_default().push(p);
        }
    }
    if by_layer.is_empty() {
        return Err(QualityError::NothingPlanted);
    }
    for (layer, neurons) in &by_layer {
        let tap = model.tap(layer)?;
        let control_acts = activations(&model, controls.clone(), tap)?;
        let probe_acts =
            activations(&model, probe_renders.iter().map(|r| r.image.clone()).collect(), tap)?;
        // Network Dissection needs the maps: spatial layers only.
        let maps: Option<Vec<Tensor>> = if tap.is_spatial() {
            let mut out = Vec::new();
            for chunk in probe_renders.chunks(32) {
                let imgs: Vec<RgbImage> = chunk.iter().map(|r| r.image.clone()).collect();
                let x = model.preprocess.batch(&imgs, &model.device)?;
                let t = model.forward_taps(&x, &[tap])?.remove(0).to_device(&Device::Cpu)?;
                out.push(t);
            }
            Some(vec![Tensor::cat(&out, 0)?])
        } else {
            None
        };
        for p in neurons {
            let truth_concepts = p.parsed_concepts();
            let description = descriptions
                .iter()
                .find(|d| d.layer.as_str() == p.layer && d.neuron.index() == p.neuron);
            let mut labels: BTreeMap<String, Option<String>> = BTreeMap::new();
            labels.insert("dnd".into(), description.and_then(|d| d.label.clone()));
            labels.insert(
                "dnd-first".into(),
                candidates
                    .iter()
                    .find(|c| {
                        c.layer.as_str() == p.layer
                            && c.neuron.index() == p.neuron
                            && c.candidate == 0
                    })
                    .map(|c| c.concept.clone()),
            );
            labels.insert("truth".into(), Some(p.description.clone()));
            // CLIP-Dissect-style: the concept whose similarity correlates best with the activations.
            let acts: Vec<f32> = probe_acts.iter().map(|row| row[p.neuron]).collect();
            let correlations: Vec<f64> = (0..concepts.len())
                .map(|c| {
                    let column: Vec<f32> = similarity.iter().map(|row| row[c]).collect();
                    pearson(&widen(&acts), &widen(&column))
                })
                .collect();
            labels.insert("clip-dissect".into(), best(&correlations).map(|c| phrases[c].clone()));
            // Network-Dissection-style: best IoU of the top-0.5% thresholded, upsampled maps.
            labels.insert(
                "netdissect".into(),
                maps.as_ref()
                    .map(|maps| netdissect_label(&maps[0], p.neuron, &masks, &phrases))
                    .transpose()?,
            );
            let mut recovered_by = BTreeMap::new();
            let mut auc_by = BTreeMap::new();
            let negatives: Vec<f32> = control_acts.iter().map(|row| row[p.neuron]).collect();
            for method in METHODS {
                let label = labels.get(method).cloned().flatten();
                recovered_by.insert(
                    method.to_string(),
                    label.as_ref().map(|l| recovered(l, p.kind, &truth_concepts)),
                );
                let value = match &label {
                    Some(l) => {
                        let images: Vec<RgbImage> = (0..input.label_images)
                            .map(|i| renderer.render(l, 1_000_000 + i as u64).1.image)
                            .collect();
                        let positives: Vec<f32> = activations(&model, images, tap)?
                            .iter()
                            .map(|row| row[p.neuron])
                            .collect();
                        Some(auc(&widen(&positives), &widen(&negatives)))
                    }
                    None => None,
                };
                auc_by.insert(method.to_string(), value);
            }
            scores.push(NeuronScore {
                layer: p.layer.clone(),
                neuron: p.neuron,
                kind: p.kind,
                truth: p.description.clone(),
                labels,
                recovered: recovered_by,
                auc: auc_by,
            });
        }
    }

    Ok(scores)
}

/// `single`, `or`, `and`, `and_not`, `class`: as planted.json writes it.
pub fn kind_name(kind: PlantedKind) -> String {
    serde_json::to_value(kind).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default()
}

fn mean(values: impl Iterator<Item = f64>) -> Option<f64> {
    let v: Vec<f64> = values.filter(|x| !x.is_nan()).collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// Per layer and kind, then per kind over all layers, then everything: recovery rate and
/// mean AUC of each method.
pub fn group_scores(scores: &[NeuronScore]) -> Vec<GroupScore> {
    let mut keys: Vec<(String, String)> =
        scores.iter().map(|s| (s.layer.clone(), kind_name(s.kind))).collect();
    keys.sort();
    keys.dedup();
    // Then each kind over all layers (the targets are per kind), then everything.
    let mut kinds: Vec<String> = keys.iter().map(|(_, kind)| kind.clone()).collect();
    kinds.sort();
    kinds.dedup();
    keys.extend(kinds.into_iter().chain(["all".to_string()]).map(|kind| ("all".to_string(), kind)));
    keys.into_iter()
        .map(|(layer, kind)| {
            let in_layer = |s: &NeuronScore| layer == "all" || s.layer == layer;
            let of_kind = |s: &NeuronScore| kind == "all" || kind_name(s.kind) == kind;
            let members: Vec<&NeuronScore> =
                scores.iter().filter(|s| in_layer(s) && of_kind(s)).collect();
            let per =
                |f: &dyn Fn(&NeuronScore) -> Option<f64>| mean(members.iter().filter_map(|s| f(s)));
            GroupScore {
                neurons: members.len(),
                recovery: METHODS
                    .iter()
                    .map(|m| {
                        (m.to_string(), per(&|s| s.recovered[*m].map(|r| f64::from(u8::from(r)))))
                    })
                    .collect(),
                mean_auc: METHODS.iter().map(|m| (m.to_string(), per(&|s| s.auc[*m]))).collect(),
                layer,
                kind,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn score(layer: &str, kind: PlantedKind, recovered: bool, auc: f64) -> NeuronScore {
        NeuronScore {
            layer: layer.into(),
            neuron: 0,
            kind,
            truth: String::new(),
            labels: BTreeMap::new(),
            recovered: METHODS.iter().map(|m| (m.to_string(), Some(recovered))).collect(),
            auc: METHODS.iter().map(|m| (m.to_string(), Some(auc))).collect(),
        }
    }

    #[test]
    fn groups_are_per_layer_and_kind_then_per_kind_then_all() {
        let scores = [
            score("layer3", PlantedKind::Single, true, 0.8),
            score("layer4", PlantedKind::Single, false, 1.0),
            score("layer4", PlantedKind::Or, true, 0.6),
        ];
        let groups = group_scores(&scores);
        let row = |layer: &str, kind: &str| {
            groups.iter().find(|g| g.layer == layer && g.kind == kind).unwrap()
        };
        let keys: Vec<(&str, &str)> =
            groups.iter().map(|g| (g.layer.as_str(), g.kind.as_str())).collect();
        assert_eq!(
            keys,
            [
                ("layer3", "single"),
                ("layer4", "or"),
                ("layer4", "single"),
                ("all", "or"),
                ("all", "single"),
                ("all", "all")
            ]
        );
        let singles = row("all", "single");
        assert_eq!((singles.neurons, singles.recovery["dnd"]), (2, Some(0.5)));
        assert!((singles.mean_auc["dnd"].unwrap() - 0.9).abs() < 1e-12);
        assert_eq!(row("all", "all").neurons, 3);
    }
}

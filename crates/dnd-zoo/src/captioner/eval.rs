//! Held-out captioning quality: the pairs' captions read back to the world's objects and
//! scored as a whole and attribute by attribute.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::Device;
use dnd_models::{BlipCaptioner, CaptionConfig, Captioner, ModelRef};
use dnd_synth::vocab::Fill;
use serde::{Deserialize, Serialize};

use crate::error::TrainError;
use crate::pairs::{PairKind, PairSampling, Truth, sample_pairs};

/// One held-out caption.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaptionExample {
    pub kind: PairKind,
    pub reference: String,
    pub generated: String,
    pub exact: bool,
}

/// Held-out captioning quality, measured with dnd's own loader and greedy decoding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaptionEval {
    pub pairs: usize,
    /// The decoding limits used (dnd's defaults).
    pub min_new_tokens: usize,
    pub max_new_tokens: usize,
    /// Fraction of captions that read back ([`Truth::read`]) to exactly the pair's objects
    /// (colour, shape, fill, count) and background (colour, texture), over all pairs, whole
    /// scenes and crops.
    pub exact: f32,
    pub exact_scenes: f32,
    pub exact_crops: f32,
    /// Of the objects the pairs show, the fraction named with all three attributes right.
    pub object_recall: f32,
    /// Of the objects the captions name, the fraction that are in the image.
    pub object_precision: f32,
    /// Of the pairs whose truth describes a background, the fraction whose caption names
    /// it with the right colour and texture.
    pub background_accuracy: f32,
    /// Pairs that show exactly one object: how often the caption names an object of the
    /// right colour, shape and fill, each attribute scored alone.
    #[serde(default)]
    pub single_object: AttributeAccuracy,
    pub examples: Vec<CaptionExample>,
}

/// Per-attribute accuracy (see [`CaptionEval::single_object`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AttributeAccuracy {
    pub pairs: usize,
    pub colour: f32,
    /// Over the pairs whose object's shape shows (`shape_pairs`): with
    /// `min_shape_fraction` above 0, a crop inside an object names no shape.
    pub shape: f32,
    /// Pairs whose object's shape shows; absent (all pairs) in train.json files written
    /// before crops could hide a shape.
    #[serde(default)]
    pub shape_pairs: Option<usize>,
    pub fill: f32,
    /// All three right on one named object.
    pub all: f32,
    /// For the `shape_pairs`: the object's shape -> what the caption named ("shape" when
    /// it named the object without one, "nothing" when it named no object; a caption
    /// naming several shapes counts the right one if present, else the first) -> pairs.
    #[serde(default)]
    pub shape_confusion: BTreeMap<String, BTreeMap<String, usize>>,
}

fn multiset_overlap<T: PartialEq + Clone>(a: &[T], b: &[T]) -> usize {
    let mut rest = b.to_vec();
    a.iter()
        .filter(|x| match rest.iter().position(|y| y == *x) {
            Some(i) => {
                rest.swap_remove(i);
                true
            }
            None => false,
        })
        .count()
}

/// Captions `count` held-out pairs (stream `seed`) with the model in `dir`, loaded by
/// `dnd_models::BlipCaptioner`, fed the pairs' source images (dnd's preprocessing resizes
/// them), with dnd's default decoding.
pub fn evaluate_captioner(
    dir: &Path,
    sampling: &PairSampling,
    seed: u64,
    count: usize,
    examples: usize,
) -> Result<CaptionEval, TrainError> {
    let config = CaptionConfig::default();
    let model =
        BlipCaptioner::load(&ModelRef::Local(dir.to_path_buf()), &Device::Cpu, config.clone())?;
    let pairs = sample_pairs(seed, 0, count, sampling)?;
    let mut generated = Vec::with_capacity(count);
    for chunk in pairs.chunks(64) {
        let images: Vec<_> = chunk.iter().map(|p| p.source.clone()).collect();
        generated.extend(model.caption(&images)?.into_iter().map(|c| c.text));
    }
    let (mut exact, mut exact_scene, mut scenes, mut exact_crop, mut crops) = (0, 0, 0, 0, 0);
    let (mut truth_objects, mut named_objects, mut matched) = (0, 0, 0);
    let (mut backgrounds, mut backgrounds_right) = (0, 0);
    let mut shown = Vec::new();
    let (mut single, mut colour_ok, mut shape_ok, mut fill_ok, mut all_ok) = (0, 0, 0, 0, 0);
    let mut shape_pairs = 0;
    let mut shape_confusion: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    for (pair, text) in pairs.iter().zip(&generated) {
        let read = Truth::read(text);
        let ok = read.as_ref() == Some(&pair.truth);
        exact += usize::from(ok);
        match pair.kind {
            PairKind::Scene => (scenes, exact_scene) = (scenes + 1, exact_scene + usize::from(ok)),
            PairKind::Crop => (crops, exact_crop) = (crops + 1, exact_crop + usize::from(ok)),
        }
        let said = read.unwrap_or(Truth { objects: vec![], background: None });
        truth_objects += pair.truth.objects.len();
        named_objects += said.objects.len();
        matched += multiset_overlap(&pair.truth.objects, &said.objects);
        if let [(colour, shape, fill)] = pair.truth.objects[..] {
            // Read leniently: incomplete objects still count for the attributes they name.
            let named: Vec<_> = dnd_synth::phrase::parse_mentions(text)
                .into_iter()
                .filter_map(|m| match m {
                    dnd_synth::phrase::Mention::Object(o) => {
                        Some((o.colour, o.shape, o.fill.unwrap_or(Fill::Solid)))
                    }
                    dnd_synth::phrase::Mention::Background(_) => None,
                })
                .collect();
            single += 1;
            colour_ok += usize::from(named.iter().any(|o| o.0 == Some(colour)));
            if shape.is_some() {
                shape_pairs += 1;
                let right = named.iter().any(|o| o.1 == shape);
                shape_ok += usize::from(right);
                let said = match named.first() {
                    _ if right => shape,
                    Some(o) => o.1,
                    None => None,
                };
                let said = match (said, named.is_empty()) {
                    (Some(s), _) => s.name(),
                    (None, false) => "shape",
                    (None, true) => "nothing",
                };
                let truth = shape.map_or("shape", |s| s.name());
                *shape_confusion
                    .entry(truth.to_string())
                    .or_default()
                    .entry(said.to_string())
                    .or_default() += 1;
            }
            fill_ok += usize::from(named.iter().any(|o| o.2 == fill));
            all_ok += usize::from(named.contains(&(Some(colour), shape, fill)));
        }
        if pair.truth.background.is_some() {
            backgrounds += 1;
            backgrounds_right += usize::from(said.background == pair.truth.background);
        }
        if shown.len() < examples {
            shown.push(CaptionExample {
                kind: pair.kind,
                reference: pair.caption.clone(),
                generated: text.clone(),
                exact: ok,
            });
        }
    }
    let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f32 / b as f32 };
    Ok(CaptionEval {
        pairs: count,
        min_new_tokens: config.min_new_tokens,
        max_new_tokens: config.max_new_tokens,
        exact: ratio(exact, count),
        exact_scenes: ratio(exact_scene, scenes),
        exact_crops: ratio(exact_crop, crops),
        object_recall: ratio(matched, truth_objects),
        object_precision: ratio(matched, named_objects),
        background_accuracy: ratio(backgrounds_right, backgrounds),
        single_object: AttributeAccuracy {
            pairs: single,
            colour: ratio(colour_ok, single),
            shape: ratio(shape_ok, shape_pairs),
            shape_pairs: Some(shape_pairs),
            fill: ratio(fill_ok, single),
            all: ratio(all_ok, single),
            shape_confusion,
        },
        examples: shown,
    })
}

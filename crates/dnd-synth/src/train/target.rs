//! Training the zoo's target network: a small ResNet that classifies the colour and shape
//! of the largest object of a scene, with "planted" hidden channels whose maps are tied to
//! the masks of known concepts (MAIA's single / OR / AND / AND-NOT neurons).
//!
//! The result is a checkpoint directory that [`dnd_models::TargetModel::load`] reads as is:
//! `model.safetensors` (torchvision names, BatchNorm with running statistics),
//! `config.json` (`architecture: "resnet"` with an explicit shape and a timm-style
//! `pretrained_cfg` that makes dnd feed it `size` x `size` images, normalised as in
//! training), `planted.json` (what every planted channel and every fc unit means, see
//! [`PlantedNeuron`]) and `train.json` (the [`TrainingReport`]: config, seeds, losses,
//! accuracy and held-out quality of every planted channel).
//!
//! # Why this input size
//! A torchvision ResNet divides the input by 4 in the stem and by 2 in each of layer2..4,
//! so layer3 maps are `size / 16` and layer4 maps `size / 32` wide. At 96 px layer4 is 3x3
//! and layer3 6x6, the smallest size at which layer4 still has a centre and a border (64 px
//! would leave 2x2); the conv cost grows with the square of the size, so 96 keeps training
//! within minutes on two CPU cores.
//!
//! # Data
//! Every training image is drawn on the fly from a seed derived from (`seed`, step, index):
//! a scene of the world (half of them built to contain one planted concept, or for AND and
//! AND-NOT channels a near miss, so that rare conjunctions are seen often enough), rendered
//! either at `size` or at a larger random size and brought to `size` by dnd's own
//! preprocessing (Pillow-style antialiased bilinear resize), since dnd feeds the model
//! images of any size that way. The label is the colour+shape of the object with the most
//! visible pixels: class `colour_index * 6 + shape_index` over [`Colour::ALL`] and
//! [`Shape::ALL`]. A planted channel's target on each cell of its map is `plant_scale`
//! times the fraction of the cell's pixels that its concept's exact mask covers.
//!
//! # Training without missing gradients
//! The convolutions, the stem's max-pool and training-mode BatchNorm are ops of [`ops`],
//! each with its backward pass and a test against candle's own op: candle's `max_pool2d`
//! has no backward when the kernel (3) differs from the stride (2), and its CPU conv2d
//! backward and its reductions over non-trailing dimensions (BatchNorm's statistics) are
//! several times slower. Everything else is candle ops that have a backward pass; a test
//! checks that every variable gets a non-zero gradient. BatchNorm's running statistics
//! are updated outside the graph (PyTorch's momentum rule), and after training recomputed
//! once on a large batch (`calibration_images`), so that the exported eval-mode network
//! equals the training network's forward pass on that batch.
//!
//! # The committed model (`zoo/target`)
//! Defaults: widths 16-48-96-192, one BasicBlock per stage, 6000 steps of 32 images
//! (192,000 images, 49 minutes on one core of the reference machine, beside other work),
//! planting weight 4. On 1000 held-out scenes: 74% top-1 over the 72 classes; colour,
//! background-texture and colour OR channels follow their concept's area closely (Pearson
//! 0.93-1.0, AUC >= 0.97), fill and shape channels less so (striped 0.89 / 0.92, dotted
//! 0.91 / 0.93, circles 0.82 / 0.93), and layer3's stars are the weakest (0.52 / 0.77).
//! `train.json` has every number.
//!
//! # Reproducibility
//! All randomness comes from ChaCha8 streams seeded from `seed`: same config, same weights,
//! bit for bit (the report records an FNV-1a hash of the weights file; a test trains twice
//! and compares the files). The thread count does not change the arithmetic: the ops of
//! [`ops`] reduce each channel in one thread, and candle's kernels split work by output
//! blocks; 1 and 2 threads were checked to give identical files.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::mpsc::sync_channel;
use std::time::Instant;

use candle_core::{D, DType, Device, Tensor, Var};
use candle_nn::VarMap;
use candle_nn::optim::{AdamW, Optimizer, ParamsAdamW};
use dnd_models::preprocess::{CropRounding, Filter, Preprocess, Resize};
use dnd_models::{ModelError, ModelRef, Tap, TargetModel};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::concept::Concept;
use crate::error::SynthError;
use crate::mask::Mask;
use crate::render::{Rendered, render};
use crate::scene::Scene;
use crate::spec::{BackgroundSpec, ObjectSpec, SceneSpec};
use crate::vocab::{Colour, Fill, Shape, Texture};

pub mod ops;

use ops::BN_EPS;

/// The command that regenerates the committed zoo model, recorded in `train.json`.
pub const REGENERATE_COMMAND: &str = "dnd synth train --model target";

/// Number of fc classes: every colour with every shape.
pub const NUM_CLASSES: usize = Colour::ALL.len() * Shape::ALL.len();

/// Errors of training or of reading a trained model's tables.
#[derive(Debug, Error)]
pub enum TrainError {
    #[error("invalid training config: {0}")]
    Config(String),
    #[error("training diverged at step {step} (loss {loss}); lower lr")]
    Diverged { step: usize, loss: f32 },
    #[error("the data thread stopped")]
    DataThread,
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Synth(#[from] SynthError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

// ---------------------------------------------------------------------------------------
// Planted channels
// ---------------------------------------------------------------------------------------

/// How a planted neuron's ground truth is made from its concepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PlantedKind {
    /// One concept's mask.
    Single,
    /// Union of two concepts' masks.
    Or,
    /// Intersection of two concepts' masks.
    And,
    /// The first concept's mask minus the second's.
    AndNot,
    /// An fc unit: the class "largest object is a <colour> <shape>".
    Class,
}

impl PlantedKind {
    fn arity(self) -> usize {
        match self {
            PlantedKind::Single | PlantedKind::Class => 1,
            PlantedKind::Or | PlantedKind::And | PlantedKind::AndNot => 2,
        }
    }
}

/// A hidden channel to plant: the auxiliary loss ties channel `neuron` of `layer{layer}`
/// to the mask that `kind` makes of `concepts`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlantedSpec {
    /// 3 or 4 (`layer3`, `layer4`).
    pub layer: u8,
    pub neuron: usize,
    pub kind: PlantedKind,
    pub concepts: Vec<Concept>,
    /// Multiplier of this channel's share of the planting loss.
    pub weight: f32,
}

impl PlantedSpec {
    pub fn single(layer: u8, neuron: usize, concept: Concept) -> Self {
        Self { layer, neuron, kind: PlantedKind::Single, concepts: vec![concept], weight: 1.0 }
    }

    pub fn or(layer: u8, neuron: usize, a: Concept, b: Concept) -> Self {
        Self { layer, neuron, kind: PlantedKind::Or, concepts: vec![a, b], weight: 1.0 }
    }

    pub fn and(layer: u8, neuron: usize, a: Concept, b: Concept) -> Self {
        Self { layer, neuron, kind: PlantedKind::And, concepts: vec![a, b], weight: 1.0 }
    }

    pub fn and_not(layer: u8, neuron: usize, a: Concept, b: Concept) -> Self {
        Self { layer, neuron, kind: PlantedKind::AndNot, concepts: vec![a, b], weight: 1.0 }
    }

    /// The channel's ground truth in a rendered scene.
    pub fn mask(&self, scene: &Scene, rendered: &Rendered) -> Result<Mask, SynthError> {
        let first = self.concepts[0].mask(scene, rendered)?;
        let second = || self.concepts[1].mask(scene, rendered);
        match self.kind {
            PlantedKind::Single | PlantedKind::Class => Ok(first),
            PlantedKind::Or => first.union(&second()?),
            PlantedKind::And => first.intersection(&second()?),
            PlantedKind::AndNot => first.difference(&second()?),
        }
    }

    /// A plain-words description: "red objects", "yellow objects or purple objects",
    /// "dotted orange objects", "pink objects that are not circles".
    pub fn description(&self) -> String {
        describe(self.kind, &self.concepts)
    }

    /// `layer3` or `layer4`.
    pub fn layer_name(&self) -> String {
        format!("layer{}", self.layer)
    }

    /// The planted.json row.
    pub fn to_neuron(&self) -> PlantedNeuron {
        PlantedNeuron {
            layer: self.layer_name(),
            neuron: self.neuron,
            kind: self.kind,
            concepts: self.concepts.iter().map(Concept::phrase).collect(),
            description: self.description(),
        }
    }

    fn validate(&self, widths: &[usize; 4]) -> Result<(), String> {
        if !(self.layer == 3 || self.layer == 4) {
            return Err(format!(
                "planted channels live in layer3 or layer4, not layer{}",
                self.layer
            ));
        }
        let channels = widths[self.layer as usize - 1];
        if self.neuron >= channels {
            return Err(format!(
                "{} has {channels} channels, cannot plant channel {}",
                self.layer_name(),
                self.neuron
            ));
        }
        if self.kind == PlantedKind::Class {
            return Err("class neurons are the fc units, not planted hidden channels".into());
        }
        if self.concepts.len() != self.kind.arity() {
            return Err(format!(
                "a {:?} channel needs {} concepts, got {}",
                self.kind,
                self.kind.arity(),
                self.concepts.len()
            ));
        }
        if !(self.weight.is_finite() && self.weight >= 0.0) {
            return Err(format!(
                "weight {} of {} channel {} is not a non-negative number",
                self.weight,
                self.layer_name(),
                self.neuron
            ));
        }
        Ok(())
    }
}

fn noun_phrase(c: Concept) -> String {
    match c {
        Concept::Colour(x) => format!("{} objects", x.name()),
        Concept::Shape(s) => s.plural().to_string(),
        Concept::Fill(f) => format!("{} objects", f.name()),
        Concept::Texture(_) => c.phrase(),
        Concept::ColourShape(x, s) => format!("{} {}", x.name(), s.plural()),
    }
}

/// What follows "that are not".
fn predicate(c: Concept) -> String {
    match c {
        Concept::Colour(x) => x.name().to_string(),
        Concept::Fill(f) => f.name().to_string(),
        Concept::Shape(s) => s.plural().to_string(),
        Concept::ColourShape(x, s) => format!("{} {}", x.name(), s.plural()),
        Concept::Texture(_) => format!("on a {}", c.phrase()),
    }
}

/// Objects with both concepts as one noun phrase: "dotted orange objects", "striped rings".
fn conjunction(a: Concept, b: Concept) -> String {
    let (mut colour, mut shape, mut fill) = (None, None, None);
    for c in [a, b] {
        match c {
            Concept::Colour(x) => colour = Some(x),
            Concept::Shape(s) => shape = Some(s),
            Concept::Fill(f) => fill = Some(f),
            Concept::ColourShape(x, s) => (colour, shape) = (Some(x), Some(s)),
            Concept::Texture(_) => return format!("{} and {}", noun_phrase(a), noun_phrase(b)),
        }
    }
    let words: Vec<&str> = [
        fill.map(Fill::name),
        colour.map(Colour::name),
        Some(shape.map_or("objects", Shape::plural)),
    ]
    .into_iter()
    .flatten()
    .collect();
    words.join(" ")
}

fn describe(kind: PlantedKind, concepts: &[Concept]) -> String {
    match (kind, concepts) {
        (PlantedKind::Single, [a]) => noun_phrase(*a),
        (PlantedKind::Class, [a]) => {
            let phrase = a.phrase();
            let article = if phrase.starts_with(['a', 'e', 'i', 'o', 'u']) { "an" } else { "a" };
            format!("the largest object is {article} {phrase}")
        }
        (PlantedKind::Or, [a, b]) => format!("{} or {}", noun_phrase(*a), noun_phrase(*b)),
        (PlantedKind::And, [a, b]) => conjunction(*a, *b),
        (PlantedKind::AndNot, [a, b]) => {
            format!("{} that are not {}", noun_phrase(*a), predicate(*b))
        }
        _ => concepts.iter().map(Concept::phrase).collect::<Vec<_>>().join(", "),
    }
}

/// One row of `planted.json`: what a neuron of the trained model was made to detect.
/// `concepts` are canonical [`Concept::phrase`] strings ([`Concept::parse`] reads them back).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlantedNeuron {
    /// `layer3`, `layer4` or `fc` (dnd's tap names).
    pub layer: String,
    pub neuron: usize,
    pub kind: PlantedKind,
    pub concepts: Vec<String>,
    pub description: String,
}

impl PlantedNeuron {
    /// The concepts, parsed back from their phrases.
    pub fn parsed_concepts(&self) -> Vec<Concept> {
        self.concepts.iter().flat_map(|p| Concept::parse(p).into_iter().take(1)).collect()
    }
}

/// The class of fc unit `i`: (colour, shape) of the largest object.
pub fn class_of(index: usize) -> Option<(Colour, Shape)> {
    (index < NUM_CLASSES)
        .then(|| (Colour::ALL[index / Shape::ALL.len()], Shape::ALL[index % Shape::ALL.len()]))
}

fn class_index(colour: Colour, shape: Shape) -> usize {
    let c = Colour::ALL.iter().position(|&x| x == colour).expect("every colour is in ALL");
    let s = Shape::ALL.iter().position(|&x| x == shape).expect("every shape is in ALL");
    c * Shape::ALL.len() + s
}

/// The fc rows of planted.json: unit i is the class "largest object is a <colour> <shape>".
pub fn class_neurons() -> Vec<PlantedNeuron> {
    (0..NUM_CLASSES)
        .map(|i| {
            let (c, s) = class_of(i).expect("i < NUM_CLASSES");
            let concept = Concept::ColourShape(c, s);
            PlantedNeuron {
                layer: "fc".into(),
                neuron: i,
                kind: PlantedKind::Class,
                concepts: vec![concept.phrase()],
                description: describe(PlantedKind::Class, &[concept]),
            }
        })
        .collect()
}

/// The planted channels of the committed zoo model: in layer4 six single concepts (one of
/// each family: colour, shape, fill, background texture, colour+shape, and another
/// colour), two ORs, two ANDs and two AND-NOTs; in layer3 five singles and one OR.
/// Channel indices are spread over the layer so that they are not a contiguous block.
/// Channels that involve a shape or a fill weigh double in the planting loss: they are
/// learnt more slowly than colours and textures.
pub fn default_planted() -> Vec<PlantedSpec> {
    use Concept as C;
    let l4 = |i: usize| 3 + 9 * i;
    let l3 = |i: usize| 2 + 10 * i;
    let planted = vec![
        PlantedSpec::single(4, l4(0), C::Colour(Colour::Red)),
        PlantedSpec::single(4, l4(1), C::Shape(Shape::Circle)),
        PlantedSpec::single(4, l4(2), C::Fill(Fill::Striped)),
        PlantedSpec::single(4, l4(3), C::Texture(Texture::Checkerboard)),
        PlantedSpec::single(4, l4(4), C::ColourShape(Colour::Blue, Shape::Square)),
        PlantedSpec::single(4, l4(5), C::Colour(Colour::Green)),
        PlantedSpec::or(4, l4(6), C::Colour(Colour::Yellow), C::Colour(Colour::Purple)),
        PlantedSpec::or(4, l4(7), C::Shape(Shape::Triangle), C::Shape(Shape::Cross)),
        PlantedSpec::and(4, l4(8), C::Colour(Colour::Orange), C::Fill(Fill::Dotted)),
        PlantedSpec::and(4, l4(9), C::Shape(Shape::Ring), C::Fill(Fill::Striped)),
        PlantedSpec::and_not(4, l4(10), C::Colour(Colour::Pink), C::Shape(Shape::Circle)),
        PlantedSpec::and_not(4, l4(11), C::Shape(Shape::Square), C::Fill(Fill::Solid)),
        PlantedSpec::single(3, l3(0), C::Colour(Colour::White)),
        PlantedSpec::single(3, l3(1), C::Fill(Fill::Dotted)),
        PlantedSpec::single(3, l3(2), C::Texture(Texture::Stripes)),
        PlantedSpec::single(3, l3(3), C::Texture(Texture::Noise)),
        PlantedSpec::single(3, l3(4), C::Shape(Shape::Star)),
        PlantedSpec::or(3, l3(5), C::Colour(Colour::Black), C::Colour(Colour::Brown)),
    ];
    planted
        .into_iter()
        .map(|p| {
            let slow = p
                .concepts
                .iter()
                .any(|c| matches!(c, C::Shape(_) | C::ColourShape(..) | C::Fill(_)));
            PlantedSpec { weight: if slow { 2.0 } else { 1.0 }, ..p }
        })
        .collect()
}

/// Writes `planted.json` (a JSON array of [`PlantedNeuron`]) into `dir`.
pub fn write_planted(dir: &Path, neurons: &[PlantedNeuron]) -> Result<(), TrainError> {
    write_json(&dir.join("planted.json"), neurons)
}

/// Reads `planted.json` from a model directory (or the file itself).
pub fn read_planted(path: &Path) -> Result<Vec<PlantedNeuron>, TrainError> {
    let file = if path.is_dir() { path.join("planted.json") } else { path.to_path_buf() };
    let text = fs::read_to_string(&file)
        .map_err(|source| TrainError::Io { path: file.clone(), source })?;
    serde_json::from_str(&text).map_err(|source| TrainError::Json { path: file, source })
}

fn write_json<T: Serialize + ?Sized>(path: &Path, value: &T) -> Result<(), TrainError> {
    let mut text = serde_json::to_string_pretty(value)
        .map_err(|source| TrainError::Json { path: path.into(), source })?;
    text.push('\n');
    fs::write(path, text).map_err(|source| TrainError::Io { path: path.into(), source })
}

// ---------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------

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
    /// AND-NOT channels, sometimes a near miss); the rest are plain [`Scene::sample`]s.
    pub focus_fraction: f64,
    /// Fraction of training images rendered larger (up to `hires_max`) and downscaled
    /// with dnd's preprocessing, as dnd does with images of any size.
    pub hires_fraction: f64,
    pub hires_max: u32,
    /// BatchNorm running-statistics momentum during training (PyTorch's 0.1).
    pub bn_momentum: f64,
    /// Images of the final BatchNorm recalibration batch.
    pub calibration_images: usize,
    /// Held-out scenes for the report (plain [`Scene::sample`]s).
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
    fn validate(&self) -> Result<(), TrainError> {
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

    fn lr_at(&self, step: usize) -> f64 {
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

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A seed for one purpose: `derive(&[seed, PURPOSE, step, index])`.
fn derive(parts: &[u64]) -> u64 {
    parts.iter().fold(0x243F_6A88_85A3_08D3, |h, &p| splitmix(h ^ splitmix(p)))
}

const PURPOSE_INIT: u64 = 1;
const PURPOSE_TRAIN: u64 = 2;
const PURPOSE_CALIBRATE: u64 = 3;
const PURPOSE_EVAL: u64 = 4;

// ---------------------------------------------------------------------------------------
// Data
// ---------------------------------------------------------------------------------------

fn constrain(object: &mut ObjectSpec, background: &mut BackgroundSpec, concept: Concept) {
    match concept {
        Concept::Colour(c) => object.colour = Some(c),
        Concept::Shape(s) => object.shape = Some(s),
        Concept::Fill(f) => object.fill = Some(f),
        Concept::ColourShape(c, s) => (object.colour, object.shape) = (Some(c), Some(s)),
        Concept::Texture(t) => background.texture = Some(t),
    }
}

fn other<T: Copy + PartialEq, R: Rng + ?Sized>(rng: &mut R, all: &[T], not: T) -> T {
    let rest: Vec<T> = all.iter().copied().filter(|&x| x != not).collect();
    rest[rng.random_range(0..rest.len())]
}

/// Makes the object (or background) avoid a concept, where the spec leaves room for it.
fn exclude<R: Rng + ?Sized>(
    rng: &mut R,
    object: &mut ObjectSpec,
    background: &mut BackgroundSpec,
    concept: Concept,
) {
    match concept {
        Concept::Colour(c) => {
            object.colour.get_or_insert_with(|| other(rng, &Colour::ALL, c));
        }
        Concept::Shape(s) => {
            object.shape.get_or_insert_with(|| other(rng, &Shape::ALL, s));
        }
        Concept::Fill(f) => {
            object.fill.get_or_insert_with(|| other(rng, &Fill::ALL, f));
        }
        Concept::ColourShape(c, s) => {
            if rng.random_bool(0.5) && object.colour.is_none() {
                object.colour = Some(other(rng, &Colour::ALL, c));
            } else if object.shape.is_none() {
                object.shape = Some(other(rng, &Shape::ALL, s));
            }
        }
        Concept::Texture(t) => {
            background.texture.get_or_insert_with(|| other(rng, &Texture::ALL, t));
        }
    }
}

/// A scene spec that shows the planted concept (or, with `near_miss`, for AND and AND-NOT
/// channels, an object that has one part but not the whole).
fn focus_spec<R: Rng + ?Sized>(rng: &mut R, spec: &PlantedSpec, near_miss: bool) -> SceneSpec {
    let mut object = ObjectSpec::default();
    let mut background = BackgroundSpec::default();
    let c = &spec.concepts;
    match (spec.kind, near_miss) {
        (PlantedKind::Single | PlantedKind::Class, _) => {
            constrain(&mut object, &mut background, c[0])
        }
        (PlantedKind::Or, _) => constrain(&mut object, &mut background, c[rng.random_range(0..2)]),
        (PlantedKind::And, false) => {
            constrain(&mut object, &mut background, c[0]);
            constrain(&mut object, &mut background, c[1]);
        }
        (PlantedKind::And, true) => {
            let i = rng.random_range(0..2);
            constrain(&mut object, &mut background, c[i]);
            exclude(rng, &mut object, &mut background, c[1 - i]);
        }
        (PlantedKind::AndNot, false) => {
            constrain(&mut object, &mut background, c[0]);
            exclude(rng, &mut object, &mut background, c[1]);
        }
        (PlantedKind::AndNot, true) => {
            constrain(&mut object, &mut background, c[0]);
            constrain(&mut object, &mut background, c[1]);
        }
    }
    let objects = if object == ObjectSpec::default() { vec![] } else { vec![object] };
    SceneSpec { background, objects }
}

/// Index of the object with the most visible pixels (the first of equals).
fn largest_object(rendered: &Rendered) -> Option<usize> {
    let counts: Vec<usize> = rendered.object_masks.iter().map(Mask::count).collect();
    let best = *counts.iter().max()?;
    (best > 0).then(|| counts.iter().position(|&c| c == best)).flatten()
}

fn label_of(scene: &Scene, rendered: &Rendered) -> u32 {
    // Every sampled scene has an object that shows; an empty scene would be class 0.
    largest_object(rendered)
        .map_or(0, |i| class_index(scene.objects[i].colour, scene.objects[i].shape) as u32)
}

/// Fraction of each cell of a `grid` x `grid` partition of the image that the mask covers;
/// a pixel belongs to the cell its centre falls in.
fn cell_fractions(mask: &Mask, grid: usize) -> Vec<f32> {
    let (w, h) = (mask.width() as usize, mask.height() as usize);
    let cell = |i: usize, n: usize| ((2 * i + 1) * grid / (2 * n)).min(grid - 1);
    let mut hits = vec![0u32; grid * grid];
    let mut totals = vec![0u32; grid * grid];
    let bits = mask.as_slice();
    for y in 0..h {
        let cy = cell(y, h);
        for x in 0..w {
            let k = cy * grid + cell(x, w);
            totals[k] += 1;
            hits[k] += u32::from(bits[y * w + x]);
        }
    }
    hits.iter()
        .zip(&totals)
        .map(|(&a, &t)| if t == 0 { 0.0 } else { a as f32 / t as f32 })
        .collect()
}

/// Planted channels grouped by layer: what the planting loss indexes.
#[derive(Debug, Clone)]
struct PlantGroup {
    /// 3 or 4.
    layer: u8,
    /// Indices into `config.planted`.
    specs: Vec<usize>,
    grid: usize,
}

fn plant_groups(config: &TargetTraining) -> Vec<PlantGroup> {
    [3u8, 4]
        .into_iter()
        .filter_map(|layer| {
            let specs: Vec<usize> =
                (0..config.planted.len()).filter(|&i| config.planted[i].layer == layer).collect();
            (!specs.is_empty()).then(|| PlantGroup {
                layer,
                specs,
                grid: config.map_size(layer as usize),
            })
        })
        .collect()
}

/// One training example: the model input, its class and per plant group the targets.
struct Example {
    input: Vec<f32>,
    label: u32,
    /// Per group: (planted channel, cell) fractions, `specs.len() * grid * grid`.
    fractions: Vec<Vec<f32>>,
}

fn training_example(
    config: &TargetTraining,
    pre: &Preprocess,
    groups: &[PlantGroup],
    seed: u64,
) -> Result<Example, TrainError> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let scene = if !config.planted.is_empty() && rng.random_bool(config.focus_fraction) {
        let spec = &config.planted[rng.random_range(0..config.planted.len())];
        let near_miss =
            matches!(spec.kind, PlantedKind::And | PlantedKind::AndNot) && rng.random_bool(0.3);
        focus_spec(&mut rng, spec, near_miss).sample(&mut rng)
    } else {
        Scene::sample(&mut rng)
    };
    let side = if config.hires_fraction > 0.0 && rng.random_bool(config.hires_fraction) {
        rng.random_range(config.size + 1..=config.hires_max)
    } else {
        config.size
    };
    let rendered = render(&scene, side, side);
    let mut fractions = Vec::with_capacity(groups.len());
    for group in groups {
        let mut f = Vec::with_capacity(group.specs.len() * group.grid * group.grid);
        for &i in &group.specs {
            f.extend(cell_fractions(&config.planted[i].mask(&scene, &rendered)?, group.grid));
        }
        fractions.push(f);
    }
    Ok(Example { input: pre.apply(&rendered.image), label: label_of(&scene, &rendered), fractions })
}

/// A batch ready for the device.
struct Batch {
    images: Tensor,
    labels: Tensor,
    /// Per group: targets `(N, P, g, g)` (`plant_scale` x coverage) and the covered-cell
    /// indicator of the same shape.
    targets: Vec<(Tensor, Tensor)>,
}

fn make_batch(
    config: &TargetTraining,
    pre: &Preprocess,
    groups: &[PlantGroup],
    seeds: &[u64],
    device: &Device,
) -> Result<Batch, TrainError> {
    let examples: Vec<Example> = seeds
        .par_iter()
        .map(|&s| training_example(config, pre, groups, s))
        .collect::<Result<_, _>>()?;
    let n = examples.len();
    let s = config.size as usize;
    let images: Vec<f32> = examples.iter().flat_map(|e| e.input.iter().copied()).collect();
    let labels: Vec<u32> = examples.iter().map(|e| e.label).collect();
    let mut targets = Vec::with_capacity(groups.len());
    for (gi, group) in groups.iter().enumerate() {
        let fr: Vec<f32> = examples.iter().flat_map(|e| e.fractions[gi].iter().copied()).collect();
        let covered: Vec<f32> = fr.iter().map(|&f| if f > 0.0 { 1.0 } else { 0.0 }).collect();
        let target: Vec<f32> = fr.iter().map(|&f| f * config.plant_scale).collect();
        let shape = (n, group.specs.len(), group.grid, group.grid);
        targets.push((
            Tensor::from_vec(target, shape, device)?,
            Tensor::from_vec(covered, shape, device)?,
        ));
    }
    Ok(Batch {
        images: Tensor::from_vec(images, (n, 3, s, s), device)?,
        labels: Tensor::from_vec(labels, n, device)?,
        targets,
    })
}

fn training_seeds(config: &TargetTraining, step: usize) -> Vec<u64> {
    (0..config.batch_size)
        .map(|i| derive(&[config.seed, PURPOSE_TRAIN, step as u64, i as u64]))
        .collect()
}

// ---------------------------------------------------------------------------------------
// The network
// ---------------------------------------------------------------------------------------

/// Batch statistics of one BatchNorm in a training forward pass (outside the graph).
struct BnStat {
    name: String,
    mean: Tensor,
    /// Biased variance (what normalised the batch).
    var: Tensor,
    /// Elements per channel that the statistics cover.
    count: usize,
}

/// The result of a forward pass.
struct Pass {
    logits: Tensor,
    /// Per stage (0-based), the last block's output before its ReLU.
    pre: Vec<Tensor>,
    /// Per stage, the output after the ReLU (dnd's `layer{i}` taps).
    taps: Vec<Tensor>,
    stats: Vec<BnStat>,
}

/// One BasicBlock's place in the network.
struct BlockInfo {
    prefix: String,
    in_ch: usize,
    out_ch: usize,
    stride: usize,
    downsample: bool,
}

/// The ResNet being trained: trainable tensors in a [`VarMap`] under torchvision names,
/// BatchNorm running statistics beside them.
struct TrainNet {
    stem: usize,
    widths: [usize; 4],
    layers: [usize; 4],
    num_classes: usize,
    varmap: VarMap,
    /// The same variables as the VarMap, in name order.
    params: BTreeMap<String, Var>,
    /// BatchNorm name -> (running mean, running var).
    running: BTreeMap<String, (Tensor, Tensor)>,
    batches_tracked: i64,
    device: Device,
}

impl TrainNet {
    fn new(
        config: &TargetTraining,
        num_classes: usize,
        rng: &mut ChaCha8Rng,
        device: &Device,
    ) -> Result<Self, TrainError> {
        let mut net = Self {
            stem: config.stem_channels,
            widths: config.widths,
            layers: config.layers,
            num_classes,
            varmap: VarMap::new(),
            params: BTreeMap::new(),
            running: BTreeMap::new(),
            batches_tracked: 0,
            device: device.clone(),
        };
        net.add_conv_bn("conv1", "bn1", [net.stem, 3, 7, 7], rng)?;
        for b in net.blocks() {
            let p = &b.prefix;
            net.add_conv_bn(
                &format!("{p}.conv1"),
                &format!("{p}.bn1"),
                [b.out_ch, b.in_ch, 3, 3],
                rng,
            )?;
            net.add_conv_bn(
                &format!("{p}.conv2"),
                &format!("{p}.bn2"),
                [b.out_ch, b.out_ch, 3, 3],
                rng,
            )?;
            if b.downsample {
                net.add_conv_bn(
                    &format!("{p}.downsample.0"),
                    &format!("{p}.downsample.1"),
                    [b.out_ch, b.in_ch, 1, 1],
                    rng,
                )?;
            }
        }
        // torchvision's nn.Linear init: U(-1/sqrt(in), 1/sqrt(in)) for weight and bias.
        let fan_in = net.widths[3];
        let bound = 1.0 / (fan_in as f32).sqrt();
        let w: Vec<f32> =
            (0..num_classes * fan_in).map(|_| rng.random_range(-bound..bound)).collect();
        let b: Vec<f32> = (0..num_classes).map(|_| rng.random_range(-bound..bound)).collect();
        net.add_param("fc.weight", Tensor::from_vec(w, (num_classes, fan_in), device)?)?;
        net.add_param("fc.bias", Tensor::from_vec(b, num_classes, device)?)?;
        Ok(net)
    }

    fn blocks(&self) -> Vec<BlockInfo> {
        let mut out = Vec::new();
        let mut in_ch = self.stem;
        for s in 0..4 {
            for b in 0..self.layers[s] {
                let stride = if s > 0 && b == 0 { 2 } else { 1 };
                let out_ch = self.widths[s];
                out.push(BlockInfo {
                    prefix: format!("layer{}.{b}", s + 1),
                    in_ch,
                    out_ch,
                    stride,
                    downsample: stride != 1 || in_ch != out_ch,
                });
                in_ch = out_ch;
            }
        }
        out
    }

    fn add_param(&mut self, name: &str, value: Tensor) -> Result<(), TrainError> {
        let var = Var::from_tensor(&value)?;
        self.varmap
            .data()
            .lock()
            .expect("the VarMap lock is never poisoned")
            .insert(name.to_string(), var.clone());
        self.params.insert(name.to_string(), var);
        Ok(())
    }

    /// Kaiming-normal (fan_out, ReLU) convolution weights as torchvision; BN gamma 1, beta 0.
    fn add_conv_bn(
        &mut self,
        conv: &str,
        bn: &str,
        shape: [usize; 4],
        rng: &mut ChaCha8Rng,
    ) -> Result<(), TrainError> {
        let fan_out = shape[0] * shape[2] * shape[3];
        let std = (2.0 / fan_out as f32).sqrt();
        let n: usize = shape.iter().product();
        let w: Vec<f32> = (0..n)
            .map(|_| std * Distribution::<f32>::sample(&StandardNormal, rng))
            .collect::<Vec<f32>>();
        let out = shape[0];
        self.add_param(&format!("{conv}.weight"), Tensor::from_vec(w, &shape, &self.device)?)?;
        self.add_param(&format!("{bn}.weight"), Tensor::ones(out, DType::F32, &self.device)?)?;
        self.add_param(&format!("{bn}.bias"), Tensor::zeros(out, DType::F32, &self.device)?)?;
        self.running.insert(
            bn.to_string(),
            (
                Tensor::zeros(out, DType::F32, &self.device)?,
                Tensor::ones(out, DType::F32, &self.device)?,
            ),
        );
        Ok(())
    }

    fn param(&self, name: &str) -> &Tensor {
        self.params
            .get(name)
            .unwrap_or_else(|| panic!("parameter {name} exists by construction"))
            .as_tensor()
    }

    /// (weights that decay: convolutions and fc.weight; the rest: BN affine and fc.bias)
    fn param_groups(&self) -> (Vec<Var>, Vec<Var>) {
        let (decay, rest): (Vec<_>, Vec<_>) = self
            .params
            .iter()
            .partition(|(name, _)| name.as_str() == "fc.weight" || self.param(name).rank() == 4);
        (
            decay.into_iter().map(|(_, v)| v.clone()).collect(),
            rest.into_iter().map(|(_, v)| v.clone()).collect(),
        )
    }

    fn bn(
        &self,
        y: &Tensor,
        name: &str,
        train: bool,
        stats: &mut Vec<BnStat>,
    ) -> candle_core::Result<Tensor> {
        let c = y.dim(1)?;
        if train {
            let (out, moments) = ops::batch_norm_train(
                y,
                self.param(&format!("{name}.weight")),
                self.param(&format!("{name}.bias")),
            )?;
            stats.push(BnStat {
                name: name.to_string(),
                mean: Tensor::from_vec(moments.mean, c, &self.device)?,
                var: Tensor::from_vec(moments.var, c, &self.device)?,
                count: y.elem_count() / c,
            });
            return Ok(out);
        }
        let gamma = self.param(&format!("{name}.weight")).reshape((1, c, 1, 1))?;
        let beta = self.param(&format!("{name}.bias")).reshape((1, c, 1, 1))?;
        let (m, v) = &self.running[name];
        let scale = (v.reshape((1, c, 1, 1))? + BN_EPS)?.sqrt()?.recip()?.broadcast_mul(&gamma)?;
        y.broadcast_sub(&m.reshape((1, c, 1, 1))?)?.broadcast_mul(&scale)?.broadcast_add(&beta)
    }

    fn conv_bn(
        &self,
        x: &Tensor,
        conv: &str,
        bn: &str,
        stride: usize,
        padding: usize,
        train: bool,
        stats: &mut Vec<BnStat>,
    ) -> candle_core::Result<Tensor> {
        let weight = self.param(&format!("{conv}.weight"));
        let y = ops::conv2d(x, weight, stride, padding)?;
        self.bn(&y, bn, train, stats)
    }

    /// The forward pass: with batch statistics (`train`) or running statistics.
    fn forward(&self, x: &Tensor, train: bool) -> candle_core::Result<Pass> {
        let mut stats = Vec::new();
        let h = self.conv_bn(x, "conv1", "bn1", 2, 3, train, &mut stats)?.relu()?;
        let mut h = ops::max_pool_3x3_s2(&h)?;
        let mut pre = Vec::with_capacity(4);
        let mut taps = Vec::with_capacity(4);
        let blocks = self.blocks();
        let mut index = 0;
        for s in 0..4 {
            let mut last_pre = None;
            for _ in 0..self.layers[s] {
                let b = &blocks[index];
                index += 1;
                let p = &b.prefix;
                let y = self
                    .conv_bn(
                        &h,
                        &format!("{p}.conv1"),
                        &format!("{p}.bn1"),
                        b.stride,
                        1,
                        train,
                        &mut stats,
                    )?
                    .relu()?;
                let y = self.conv_bn(
                    &y,
                    &format!("{p}.conv2"),
                    &format!("{p}.bn2"),
                    1,
                    1,
                    train,
                    &mut stats,
                )?;
                let shortcut = if b.downsample {
                    self.conv_bn(
                        &h,
                        &format!("{p}.downsample.0"),
                        &format!("{p}.downsample.1"),
                        b.stride,
                        0,
                        train,
                        &mut stats,
                    )?
                } else {
                    h.clone()
                };
                let before = (y + shortcut)?;
                h = before.relu()?;
                last_pre = Some(before);
            }
            pre.push(last_pre.expect("every stage has a block"));
            taps.push(h.clone());
        }
        let pooled = h.mean(D::Minus1)?.mean(D::Minus1)?;
        let logits =
            pooled.matmul(&self.param("fc.weight").t()?)?.broadcast_add(self.param("fc.bias"))?;
        Ok(Pass { logits, pre, taps, stats })
    }

    /// PyTorch's running-statistics update: `r = (1 - m) r + m batch`, unbiased variance.
    fn update_running(&mut self, stats: &[BnStat], momentum: f64) -> candle_core::Result<()> {
        for s in stats {
            let (m, v) = &self.running[&s.name];
            let unbiased = (&s.var * (s.count as f64 / (s.count.max(2) - 1) as f64))?;
            let m = ((m * (1.0 - momentum))? + (&s.mean * momentum)?)?;
            let v = ((v * (1.0 - momentum))? + (unbiased * momentum)?)?;
            self.running.insert(s.name.clone(), (m, v));
        }
        self.batches_tracked += 1;
        Ok(())
    }

    /// Sets every running statistic to the batch statistics of one training-mode pass over
    /// `x`, so that the eval-mode network reproduces that pass exactly.
    fn calibrate(&mut self, x: &Tensor) -> candle_core::Result<()> {
        let pass = self.forward(x, true)?;
        for s in pass.stats {
            self.running.insert(s.name, (s.mean, s.var));
        }
        Ok(())
    }

    /// torchvision `state_dict` tensors: weights, BN affine, running stats and
    /// `num_batches_tracked`.
    fn state_dict(&self) -> candle_core::Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (name, var) in &self.params {
            out.insert(name.clone(), var.as_tensor().detach().copy()?);
        }
        for (bn, (m, v)) in &self.running {
            out.insert(format!("{bn}.running_mean"), m.copy()?);
            out.insert(format!("{bn}.running_var"), v.copy()?);
            out.insert(
                format!("{bn}.num_batches_tracked"),
                Tensor::new(self.batches_tracked, &self.device)?,
            );
        }
        Ok(out)
    }

    fn config_json(&self, config: &TargetTraining) -> serde_json::Value {
        let labels: Vec<String> = (0..self.num_classes)
            .map(|i| {
                class_of(i)
                    .map_or(format!("class {i}"), |(c, s)| format!("{} {}", c.name(), s.name()))
            })
            .collect();
        serde_json::json!({
            "architecture": "resnet",
            "block": "basic",
            "layers": self.layers,
            "widths": self.widths,
            "stem_channels": self.stem,
            "num_classes": self.num_classes,
            "pretrained_cfg": {
                "input_size": [3, config.size, config.size],
                "crop_pct": 1.0,
                "interpolation": "bilinear",
                "mean": config.mean,
                "std": config.std,
            },
            "label_names": labels,
            "planted": "planted.json",
            "training": "train.json",
        })
    }
}

/// The planting loss: per planted channel, squared error between its pre-ReLU map and
/// `plant_scale` x coverage on covered cells, and the ReLU'd map's square elsewhere (a
/// channel may stay negative where its concept is absent); covered cells weigh
/// `1 + positive_weight`. Mean over cells and images, weighted mean over channels.
fn plant_loss(
    config: &TargetTraining,
    groups: &[PlantGroup],
    pass: &Pass,
    batch: &Batch,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let total_weight: f32 = config.planted.iter().map(|p| p.weight).sum();
    let mut loss = Tensor::zeros((), DType::F32, device)?;
    if total_weight <= 0.0 {
        return Ok(loss);
    }
    for (group, (target, covered)) in groups.iter().zip(&batch.targets) {
        let neurons: Vec<u32> =
            group.specs.iter().map(|&i| config.planted[i].neuron as u32).collect();
        let weights: Vec<f32> = group.specs.iter().map(|&i| config.planted[i].weight).collect();
        let p = neurons.len();
        let ids = Tensor::from_vec(neurons, p, device)?;
        let weights = Tensor::from_vec(weights, (1, p, 1, 1), device)?;
        let map = pass.pre[group.layer as usize - 1].index_select(&ids, 1)?;
        let pred = ((&map * covered)? + (map.relu()? * (1.0 - covered)?)?)?;
        let w = ((covered * f64::from(config.positive_weight))? + 1.0)?;
        let err = ((pred - target)?.sqr()? * w)?.broadcast_mul(&weights)?;
        let cells = (err.dim(0)? * group.grid * group.grid) as f64;
        loss = (loss + (err.sum_all()? / cells)?)?;
    }
    loss / f64::from(total_weight)
}

// ---------------------------------------------------------------------------------------
// Evaluation
// ---------------------------------------------------------------------------------------

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

/// What a training run reports; also written as `train.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainingReport {
    pub config: TargetTraining,
    pub command: String,
    pub threads: usize,
    pub images_seen: usize,
    /// Seconds: training steps, BN recalibration + export, evaluation, all.
    pub train_seconds: f64,
    pub export_seconds: f64,
    pub eval_seconds: f64,
    pub wall_seconds: f64,
    /// Training seconds spent waiting for batches, in forward passes (with the losses),
    /// backward passes, and optimiser and running-statistics updates.
    pub data_wait_seconds: f64,
    pub forward_seconds: f64,
    pub backward_seconds: f64,
    pub update_seconds: f64,
    /// Means over the last 50 steps (or all, if fewer).
    pub final_loss: f32,
    pub final_ce: f32,
    pub final_plant_loss: f32,
    /// `[step, loss, ce, plant]`, means over windows of 50 steps.
    pub loss_curve: Vec<[f32; 4]>,
    /// Top-1 accuracy of the fc classes on held-out scenes rendered at `eval_render_size`
    /// and preprocessed by dnd; and on scenes rendered at `size` directly.
    pub accuracy: f32,
    pub accuracy_native: f32,
    /// Largest difference between the training network's eval-mode logits and layer4 maps
    /// and the exported checkpoint's, as dnd loads it, on held-out images.
    pub export_max_abs_diff: f32,
    /// FNV-1a 64 of model.safetensors, to check bit-for-bit regeneration.
    pub weights_fnv1a64: String,
    pub planted: Vec<PlantedQuality>,
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3))
}

fn pearson(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len() as f64;
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        sxy += (a - mx) * (b - my);
        sxx += (a - mx).powi(2);
        syy += (b - my).powi(2);
    }
    if sxx <= 0.0 || syy <= 0.0 { 0.0 } else { sxy / (sxx * syy).sqrt() }
}

/// Ranks from 1, ties sharing their mean rank.
fn ranks(x: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..x.len()).collect();
    order.sort_by(|&a, &b| x[a].total_cmp(&x[b]));
    let mut r = vec![0.0; x.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && x[order[j + 1]] == x[order[i]] {
            j += 1;
        }
        let mean = (i + j) as f64 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            r[k] = mean;
        }
        i = j + 1;
    }
    r
}

fn spearman(x: &[f64], y: &[f64]) -> f64 {
    pearson(&ranks(x), &ranks(y))
}

/// Mann-Whitney AUC of `scores` for `positive`; 0.5 when a class is empty.
fn auc(scores: &[f64], positive: &[bool]) -> f64 {
    let r = ranks(scores);
    let np = positive.iter().filter(|&&p| p).count() as f64;
    let nn = positive.len() as f64 - np;
    if np == 0.0 || nn == 0.0 {
        return 0.5;
    }
    let sum: f64 = r.iter().zip(positive).filter(|(_, p)| **p).map(|(r, _)| r).sum();
    (sum - np * (np + 1.0) / 2.0) / (np * nn)
}

/// Bilinear upsampling of a `g` x `g` map to `size` x `size`, half-pixel centres and edge
/// clamping (PyTorch's `align_corners=False`).
fn upsample_bilinear(map: &[f32], g: usize, size: usize) -> Vec<f32> {
    let coords: Vec<(usize, usize, f32)> = (0..size)
        .map(|i| {
            let src = ((i as f32 + 0.5) * g as f32 / size as f32 - 0.5).clamp(0.0, (g - 1) as f32);
            let i0 = src.floor() as usize;
            (i0, (i0 + 1).min(g - 1), src - i0 as f32)
        })
        .collect();
    let mut out = vec![0.0; size * size];
    for (y, &(y0, y1, fy)) in coords.iter().enumerate() {
        for (x, &(x0, x1, fx)) in coords.iter().enumerate() {
            let top = map[y0 * g + x0] * (1.0 - fx) + map[y0 * g + x1] * fx;
            let bottom = map[y1 * g + x0] * (1.0 - fx) + map[y1 * g + x1] * fx;
            out[y * size + x] = top * (1.0 - fy) + bottom * fy;
        }
    }
    out
}

struct EvalImage {
    input: Vec<f32>,
    label: u32,
    /// Per planted spec: its mask at the render size.
    masks: Vec<Mask>,
}

fn eval_image(
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
struct ChannelTally {
    pooled: Vec<f64>,
    area: Vec<f64>,
    intersection: u64,
    union: u64,
    /// The same for the ideal map (`plant_scale` x the exact cell coverage).
    oracle_intersection: u64,
    oracle_union: u64,
}

fn ratio(a: u64, b: u64) -> f32 {
    if b == 0 { 0.0 } else { (a as f64 / b as f64) as f32 }
}

/// Accuracy and planted-channel quality of the loaded checkpoint.
fn evaluate(
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
                auc: auc(&t.pooled, &present) as f32,
                mean_activation_present: mean_where(true),
                mean_activation_absent: mean_where(false),
            }
        })
        .collect();
    let total = config.eval_images as f32;
    Ok((correct as f32 / total, correct_native as f32 / total, quality))
}

// ---------------------------------------------------------------------------------------
// Training
// ---------------------------------------------------------------------------------------

/// Losses of one training step, for progress reports.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepLog {
    pub step: usize,
    pub steps: usize,
    pub loss: f32,
    pub ce: f32,
    pub plant: f32,
    pub lr: f64,
    pub seconds: f64,
}

/// Trains the target network and writes the checkpoint directory `out_dir`
/// (model.safetensors, config.json, planted.json, train.json). `progress` sees every step.
pub fn train_target(
    config: &TargetTraining,
    out_dir: &Path,
    mut progress: impl FnMut(&StepLog),
) -> Result<TrainingReport, TrainError> {
    config.validate()?;
    let start = Instant::now();
    let device = Device::Cpu;
    let groups = plant_groups(config);
    let pre = config.preprocess();
    let mut net = TrainNet::new(
        config,
        NUM_CLASSES,
        &mut ChaCha8Rng::seed_from_u64(derive(&[config.seed, PURPOSE_INIT])),
        &device,
    )?;
    let (decay, no_decay) = net.param_groups();
    let adam = |weight_decay| ParamsAdamW { lr: config.lr, weight_decay, ..ParamsAdamW::default() };
    let mut opt_decay = AdamW::new(decay, adam(config.weight_decay))?;
    let mut opt_rest = AdamW::new(no_decay, adam(0.0))?;

    let mut history: Vec<[f32; 3]> = Vec::with_capacity(config.steps);
    // Seconds waiting for data, in forward passes, backward passes, optimiser steps.
    let mut timing = [0f64; 4];
    // Batches are drawn on a second thread, one step ahead of the optimiser.
    std::thread::scope(|scope| -> Result<(), TrainError> {
        let (tx, rx) = sync_channel::<Result<Batch, TrainError>>(1);
        let (groups_ref, pre_ref, device_ref) = (&groups, &pre, &device);
        scope.spawn(move || {
            for step in 0..config.steps {
                let batch = make_batch(
                    config,
                    pre_ref,
                    groups_ref,
                    &training_seeds(config, step),
                    device_ref,
                );
                if tx.send(batch).is_err() {
                    break;
                }
            }
        });
        for step in 0..config.steps {
            let t_wait = Instant::now();
            let batch = rx.recv().map_err(|_| TrainError::DataThread)??;
            let t_fwd = Instant::now();
            let lr = config.lr_at(step);
            opt_decay.set_learning_rate(lr);
            opt_rest.set_learning_rate(lr);
            let pass = net.forward(&batch.images, true)?;
            let ce = candle_nn::loss::cross_entropy(&pass.logits, &batch.labels)?;
            let plant = plant_loss(config, &groups, &pass, &batch, &device)?;
            let loss = (&ce + (&plant * config.plant_weight)?)?;
            let t_bwd = Instant::now();
            let grads = loss.backward()?;
            let t_opt = Instant::now();
            opt_decay.step(&grads)?;
            opt_rest.step(&grads)?;
            net.update_running(&pass.stats, config.bn_momentum)?;
            timing[0] += (t_fwd - t_wait).as_secs_f64();
            timing[1] += (t_bwd - t_fwd).as_secs_f64();
            timing[2] += (t_opt - t_bwd).as_secs_f64();
            timing[3] += t_opt.elapsed().as_secs_f64();
            let values =
                [loss.to_scalar::<f32>()?, ce.to_scalar::<f32>()?, plant.to_scalar::<f32>()?];
            if !values.iter().all(|v| v.is_finite()) {
                return Err(TrainError::Diverged { step, loss: values[0] });
            }
            history.push(values);
            progress(&StepLog {
                step,
                steps: config.steps,
                loss: values[0],
                ce: values[1],
                plant: values[2],
                lr,
                seconds: start.elapsed().as_secs_f64(),
            });
        }
        Ok(())
    })?;
    let train_seconds = start.elapsed().as_secs_f64();

    // Recalibrate BatchNorm on one large batch of the training distribution, then export.
    let calibration: Vec<u64> = (0..config.calibration_images)
        .map(|i| derive(&[config.seed, PURPOSE_CALIBRATE, i as u64]))
        .collect();
    let batch = make_batch(config, &pre, &groups, &calibration, &device)?;
    net.calibrate(&batch.images)?;
    fs::create_dir_all(out_dir)
        .map_err(|source| TrainError::Io { path: out_dir.into(), source })?;
    let weights = out_dir.join("model.safetensors");
    candle_core::safetensors::save(&net.state_dict()?, &weights)?;
    write_json(&out_dir.join("config.json"), &net.config_json(config))?;
    let mut neurons: Vec<PlantedNeuron> =
        config.planted.iter().map(PlantedSpec::to_neuron).collect();
    neurons.extend(class_neurons());
    write_planted(out_dir, &neurons)?;
    let export_seconds = start.elapsed().as_secs_f64() - train_seconds;

    // Evaluate what dnd will load.
    let model = TargetModel::load(&ModelRef::Local(out_dir.to_path_buf()), &device)?;
    let probe: Vec<EvalImage> = (0..8)
        .map(|i| eval_image(config, &pre, i, config.eval_render_size))
        .collect::<Result<_, _>>()?;
    let s = config.size as usize;
    let x = Tensor::from_vec(
        probe.iter().flat_map(|e| e.input.iter().copied()).collect::<Vec<f32>>(),
        (probe.len(), 3, s, s),
        &device,
    )?;
    let export_max_abs_diff = export_difference(&net, &model, &x)?;
    let (accuracy, accuracy_native, planted) = evaluate(config, &model)?;
    let eval_seconds = start.elapsed().as_secs_f64() - train_seconds - export_seconds;

    let tail = &history[history.len().saturating_sub(50)..];
    let mean_of = |k: usize, rows: &[[f32; 3]]| {
        rows.iter().map(|r| r[k]).sum::<f32>() / rows.len().max(1) as f32
    };
    let loss_curve = history
        .chunks(50)
        .enumerate()
        .map(|(i, rows)| {
            [(i * 50 + rows.len() - 1) as f32, mean_of(0, rows), mean_of(1, rows), mean_of(2, rows)]
        })
        .collect();
    let bytes =
        fs::read(&weights).map_err(|source| TrainError::Io { path: weights.clone(), source })?;
    let report = TrainingReport {
        config: config.clone(),
        command: REGENERATE_COMMAND.to_string(),
        threads: rayon::current_num_threads(),
        images_seen: config.steps * config.batch_size,
        train_seconds,
        export_seconds,
        eval_seconds,
        wall_seconds: start.elapsed().as_secs_f64(),
        data_wait_seconds: timing[0],
        forward_seconds: timing[1],
        backward_seconds: timing[2],
        update_seconds: timing[3],
        final_loss: mean_of(0, tail),
        final_ce: mean_of(1, tail),
        final_plant_loss: mean_of(2, tail),
        loss_curve,
        accuracy,
        accuracy_native,
        export_max_abs_diff,
        weights_fnv1a64: format!("{:016x}", fnv1a64(&bytes)),
        planted,
    };
    write_json(&out_dir.join("train.json"), &report)?;
    Ok(report)
}

/// Largest absolute difference of logits and layer3/layer4 maps between the training
/// network in eval mode and the loaded checkpoint.
fn export_difference(net: &TrainNet, model: &TargetModel, x: &Tensor) -> Result<f32, TrainError> {
    let pass = net.forward(x, false)?;
    let outs = model.forward_taps(x, &[Tap::Layer(3), Tap::Layer(4), Tap::Fc])?;
    let mut worst = 0f32;
    for (a, b) in [(&pass.taps[2], &outs[0]), (&pass.taps[3], &outs[1]), (&pass.logits, &outs[2])] {
        worst = worst.max((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?);
    }
    Ok(worst)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> TargetTraining {
        let mut planted = vec![
            PlantedSpec::single(4, 1, Concept::Colour(Colour::Red)),
            PlantedSpec::or(4, 3, Concept::Shape(Shape::Circle), Concept::Shape(Shape::Square)),
            PlantedSpec::and(3, 0, Concept::Colour(Colour::Blue), Concept::Fill(Fill::Striped)),
            PlantedSpec::and_not(3, 5, Concept::Shape(Shape::Star), Concept::Fill(Fill::Solid)),
        ];
        planted[0].weight = 2.0;
        TargetTraining {
            size: 32,
            stem_channels: 4,
            widths: [4, 8, 8, 8],
            steps: 30,
            batch_size: 16,
            lr: 1e-2,
            warmup_steps: 3,
            planted,
            hires_max: 64,
            calibration_images: 32,
            eval_images: 24,
            eval_render_size: 48,
            ..TargetTraining::default()
        }
    }

    #[test]
    fn every_variable_gets_a_gradient() {
        let config = tiny();
        let dev = Device::Cpu;
        let groups = plant_groups(&config);
        let net =
            TrainNet::new(&config, NUM_CLASSES, &mut ChaCha8Rng::seed_from_u64(1), &dev).unwrap();
        let batch =
            make_batch(&config, &config.preprocess(), &groups, &training_seeds(&config, 0), &dev)
                .unwrap();
        let pass = net.forward(&batch.images, true).unwrap();
        let ce = candle_nn::loss::cross_entropy(&pass.logits, &batch.labels).unwrap();
        let plant = plant_loss(&config, &groups, &pass, &batch, &dev).unwrap();
        let grads = (ce + plant).unwrap().backward().unwrap();
        let vars = net.varmap.all_vars();
        assert_eq!(vars.len(), net.params.len());
        for (name, var) in &net.params {
            let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{name} has no gradient"));
            let size = g.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(size > 0.0 && size.is_finite(), "{name}: gradient norm {size}");
        }
        for var in vars {
            assert!(grads.get(var.as_tensor()).is_some());
        }
    }

    #[test]
    fn training_lowers_the_loss_and_the_export_matches_eval_mode() {
        let config = tiny();
        let dir = tempfile::tempdir().unwrap();
        let mut losses = Vec::new();
        let report = train_target(&config, dir.path(), |s| losses.push(s.loss)).unwrap();
        assert_eq!(losses.len(), config.steps);
        let first = losses[..5].iter().sum::<f32>() / 5.0;
        let last = losses[losses.len() - 5..].iter().sum::<f32>() / 5.0;
        assert!(last < first * 0.85, "loss {first} -> {last}");
        assert!(
            report.export_max_abs_diff < 1e-3,
            "export differs by {}",
            report.export_max_abs_diff
        );

        // dnd loads it unchanged, with the preprocessing of training.
        let model =
            TargetModel::load(&ModelRef::Local(dir.path().to_path_buf()), &Device::Cpu).unwrap();
        assert_eq!(model.preprocess, config.preprocess());
        assert_eq!(model.tap_width(Tap::Fc), NUM_CLASSES);
        assert_eq!(model.tap_width(Tap::Layer(4)), 8);
        let planted = read_planted(dir.path()).unwrap();
        assert_eq!(planted.len(), config.planted.len() + NUM_CLASSES);
        let json: TrainingReport =
            serde_json::from_str(&fs::read_to_string(dir.path().join("train.json")).unwrap())
                .unwrap();
        assert_eq!(json.config, config);
        assert_eq!(json.planted.len(), config.planted.len());
        let tensors =
            candle_core::safetensors::load(dir.path().join("model.safetensors"), &Device::Cpu)
                .unwrap();
        assert!(tensors.contains_key("layer2.0.downsample.1.running_var"));
        assert_eq!(
            tensors["bn1.num_batches_tracked"].to_scalar::<i64>().unwrap(),
            config.steps as i64
        );
    }

    #[test]
    fn same_seed_same_weights() {
        let config = TargetTraining {
            steps: 4,
            eval_images: 4,
            calibration_images: 8,
            batch_size: 8,
            ..tiny()
        };
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let ra = train_target(&config, a.path(), |_| {}).unwrap();
        let rb = train_target(&config, b.path(), |_| {}).unwrap();
        assert_eq!(ra.weights_fnv1a64, rb.weights_fnv1a64);
        let read = |d: &Path| fs::read(d.join("model.safetensors")).unwrap();
        assert_eq!(read(a.path()), read(b.path()));
        let other = train_target(&TargetTraining { seed: 6, ..config }, a.path(), |_| {}).unwrap();
        assert_ne!(other.weights_fnv1a64, ra.weights_fnv1a64);
    }

    #[test]
    fn planted_table_round_trips_and_names_world_concepts() {
        let dir = tempfile::tempdir().unwrap();
        let mut neurons: Vec<PlantedNeuron> =
            default_planted().iter().map(PlantedSpec::to_neuron).collect();
        neurons.extend(class_neurons());
        write_planted(dir.path(), &neurons).unwrap();
        assert_eq!(read_planted(dir.path()).unwrap(), neurons);
        assert_eq!(read_planted(&dir.path().join("planted.json")).unwrap(), neurons);
        for (spec, row) in default_planted().iter().zip(&neurons) {
            assert_eq!(row.parsed_concepts(), spec.concepts, "{row:?}");
        }
        let text = fs::read_to_string(dir.path().join("planted.json")).unwrap();
        assert!(text.contains(r#""kind": "and_not""#), "{text}");
        let descriptions: Vec<&str> = neurons.iter().map(|n| n.description.as_str()).collect();
        for expected in [
            "red objects",
            "checkerboard background",
            "blue squares",
            "yellow objects or purple objects",
            "dotted orange objects",
            "striped rings",
            "pink objects that are not circles",
            "squares that are not solid",
        ] {
            assert!(descriptions.contains(&expected), "{expected} not in {descriptions:?}");
        }
        let fc = &neurons[default_planted().len() + 7];
        assert_eq!(
            (fc.layer.as_str(), fc.neuron, fc.concepts.clone()),
            ("fc", 7, vec!["orange square".to_string()])
        );
        assert_eq!(
            fc.description,
            "the largest object is a orange square".replace(" a o", " an o")
        );
        let counts = |k: PlantedKind| {
            default_planted().iter().filter(|p| p.layer == 4 && p.kind == k).count()
        };
        assert_eq!(
            [
                counts(PlantedKind::Single),
                counts(PlantedKind::Or),
                counts(PlantedKind::And),
                counts(PlantedKind::AndNot)
            ],
            [6, 2, 2, 2]
        );
        TargetTraining::default().validate().unwrap();
    }

    /// The committed zoo model is what the defaults train: same config, same tables, and
    /// dnd loads it with the preprocessing of training. (Retraining it takes 15 minutes;
    /// `same_seed_same_weights` checks determinism on a small config.)
    #[test]
    fn the_committed_zoo_model_matches_the_defaults() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("zoo/target");
        let config = TargetTraining::default();
        let report: TrainingReport =
            serde_json::from_str(&fs::read_to_string(dir.join("train.json")).unwrap()).unwrap();
        assert_eq!(
            report.config, config,
            "zoo/target was trained with other settings: regenerate it ({REGENERATE_COMMAND})"
        );
        let mut expected: Vec<PlantedNeuron> =
            config.planted.iter().map(PlantedSpec::to_neuron).collect();
        expected.extend(class_neurons());
        assert_eq!(read_planted(&dir).unwrap(), expected);
        let bytes = fs::read(dir.join("model.safetensors")).unwrap();
        assert_eq!(format!("{:016x}", fnv1a64(&bytes)), report.weights_fnv1a64);
        let model = TargetModel::load(&ModelRef::Local(dir), &Device::Cpu).unwrap();
        assert_eq!(model.preprocess, config.preprocess());
        assert_eq!(
            [
                model.tap_width(Tap::Layer(3)),
                model.tap_width(Tap::Layer(4)),
                model.tap_width(Tap::Fc)
            ],
            [96, 192, NUM_CLASSES]
        );
        assert!(bytes.len() < 10 << 20);
    }

    #[test]
    fn focused_scenes_show_their_concept_and_cells_partition_the_mask() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for spec in default_planted() {
            for near_miss in [false, true] {
                let scene = focus_spec(&mut rng, &spec, near_miss).sample(&mut rng);
                let rendered = render(&scene, 96, 96);
                let covered = spec.mask(&scene, &rendered).unwrap().count();
                let and_like = matches!(spec.kind, PlantedKind::And | PlantedKind::AndNot);
                if !near_miss || !and_like {
                    assert!(covered > 0, "{} not shown in {scene:?}", spec.description());
                }
            }
        }
        let mut m = Mask::empty(96, 96);
        for y in 0..32 {
            for x in 0..48 {
                m.set(x, y, true);
            }
        }
        let f = cell_fractions(&m, 3);
        assert_eq!(f, vec![1.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
        let config = TargetTraining::default();
        assert_eq!(
            [config.map_size(1), config.map_size(2), config.map_size(3), config.map_size(4)],
            [24, 12, 6, 3]
        );
    }

    #[test]
    fn statistics_helpers() {
        assert!((spearman(&[1.0, 2.0, 3.0, 4.0], &[10.0, 20.0, 25.0, 100.0]) - 1.0).abs() < 1e-12);
        assert!((auc(&[0.1, 0.4, 0.35, 0.8], &[false, false, true, true]) - 0.75).abs() < 1e-12);
        assert_eq!(ranks(&[3.0, 1.0, 3.0]), vec![2.5, 1.0, 2.5]);
        let up = upsample_bilinear(&[0.0, 1.0, 2.0, 3.0], 2, 4);
        assert_eq!(&up[..4], &[0.0, 0.25, 0.75, 1.0]);
    }
}

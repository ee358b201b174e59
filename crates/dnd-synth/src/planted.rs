//! The zoo's ground truth: what each planted channel and each fc unit of the target model
//! was made to detect (`planted.json` beside its weights), and the masks that define it.
//! The trainer (`dnd-zoo`) plants these; the CLI, the report and the quality benchmark
//! read them back with [`read_planted`].

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::concept::Concept;
use crate::error::SynthError;
use crate::mask::Mask;
use crate::render::Rendered;
use crate::scene::Scene;
use crate::vocab::{Colour, Fill, Shape};

/// The file beside a target model's weights that holds its [`PlantedNeuron`]s.
pub const PLANTED_FILE: &str = "planted.json";

/// Number of fc classes: every colour with every shape.
pub const NUM_CLASSES: usize = Colour::ALL.len() * Shape::ALL.len();

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
    /// An fc unit: the class "largest object is a `<colour> <shape>`".
    Class,
}

impl PlantedKind {
    /// How many concepts a neuron of this kind combines.
    pub fn arity(self) -> usize {
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

    /// Checks the channel against the stage widths of the network it is planted in.
    pub fn validate(&self, widths: &[usize; 4]) -> Result<(), String> {
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

/// The world's phrase for a neuron of `kind` planted with `concepts` (the `description` of
/// planted.json).
pub fn describe(kind: PlantedKind, concepts: &[Concept]) -> String {
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

/// The fc unit of the class (colour, shape).
pub fn class_index(colour: Colour, shape: Shape) -> usize {
    let c = Colour::ALL.iter().position(|&x| x == colour).expect("every colour is in ALL");
    let s = Shape::ALL.iter().position(|&x| x == shape).expect("every shape is in ALL");
    c * Shape::ALL.len() + s
}

/// The fc rows of planted.json: unit i is the class "largest object is a `<colour> <shape>`".
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

/// Reads `planted.json` from a model directory (or the file itself).
pub fn read_planted(path: &Path) -> Result<Vec<PlantedNeuron>, SynthError> {
    let file = if path.is_dir() { path.join(PLANTED_FILE) } else { path.to_path_buf() };
    let text = std::fs::read_to_string(&file)
        .map_err(|e| SynthError::Io { path: file.clone(), reason: e.to_string() })?;
    serde_json::from_str(&text).map_err(|e| SynthError::Io { path: file, reason: e.to_string() })
}

//! Scoring neuron descriptions against the world's ground truth, and the two baselines
//! they are compared with. Pure functions: the caller runs the models.
//!
//! - **Recovery**: a label names the planted concept when it mentions every attribute of
//!   it (colours, shapes, patterns; plurals, synonyms and word order do not matter). For
//!   OR and AND neurons it must mention both parts; for AND-NOT the positive part and not
//!   the excluded one. Fills and background textures share their pattern words ("striped",
//!   "dots"), so a pattern counts whether the label puts it on objects or the background.
//!   A label that offers alternatives ("black square or circle", "black or white") names a
//!   concept only if each alternative does, so a hedge between two shapes does not name
//!   either; for OR neurons the alternatives together must name both parts ("purple or
//!   yellow circle"). Alternatives are read as the generator reads them
//!   ([`crate::parse_alternatives`]).
//! - **CoSy-style AUC** (`dnd_core::stats::auc`): how well the neuron's activations
//!   separate images rendered from the label from control images of the world (0.5 = not
//!   at all, 1 = perfectly).
//! - **Network-Dissection-style** labels: the concept whose masks best overlap (IoU) the
//!   neuron's thresholded, upsampled activation maps over the probe set (upsampling is
//!   `dnd_core::Map2::resize_bilinear`, the one the attention crops use).
//! - **CLIP-Dissect-style** labels: the concept whose CLIP image-text similarity across the
//!   probe set best correlates with the neuron's activations.

use std::collections::BTreeSet;

use crate::concept::Concept;
use crate::phrase::{Mention, parse_alternatives, parse_mentions};
use crate::planted::PlantedKind as Kind;
use crate::vocab::{Colour, Shape, Texture};

/// An attribute a label can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Attribute {
    Colour(Colour),
    Shape(Shape),
    /// A fill or a background texture, by its pattern.
    Pattern(Texture),
}

/// The attributes a concept is made of.
pub fn concept_attributes(concept: &Concept) -> BTreeSet<Attribute> {
    match *concept {
        Concept::Colour(c) => [Attribute::Colour(c)].into(),
        Concept::Shape(s) => [Attribute::Shape(s)].into(),
        Concept::Fill(f) => [Attribute::Pattern(f.as_texture())].into(),
        Concept::Texture(t) => [Attribute::Pattern(t)].into(),
        Concept::ColourShape(c, s) => [Attribute::Colour(c), Attribute::Shape(s)].into(),
    }
}

/// Every attribute a label mentions, anywhere in it.
pub fn label_attributes(label: &str) -> BTreeSet<Attribute> {
    mention_attributes(&parse_mentions(label))
}

/// Every attribute the mentions name.
fn mention_attributes(mentions: &[Mention]) -> BTreeSet<Attribute> {
    let mut out = BTreeSet::new();
    for &mention in mentions {
        match mention {
            Mention::Object(o) => {
                out.extend(o.colour.map(Attribute::Colour));
                out.extend(o.shape.map(Attribute::Shape));
                out.extend(o.fill.map(|f| Attribute::Pattern(f.as_texture())));
            }
            Mention::Background(b) => {
                out.extend(b.colour.map(Attribute::Colour));
                out.extend(b.texture.map(Attribute::Pattern));
            }
        }
    }
    // "Plain"/"solid" is the absence of a pattern: naming it says nothing.
    out.remove(&Attribute::Pattern(Texture::Plain));
    out
}

/// Whether `label` names the ground truth `concepts` combined by `kind` (see the module
/// documentation). AND-NOT's concepts are `[kept, excluded]`.
pub fn recovered(label: &str, kind: Kind, concepts: &[Concept]) -> bool {
    let alternatives: Vec<BTreeSet<Attribute>> =
        parse_alternatives(label).iter().map(|m| mention_attributes(m)).collect();
    let named: BTreeSet<Attribute> = alternatives.iter().flatten().copied().collect();
    let names = |c: &Concept| concept_attributes(c).is_subset(&named);
    let every_alternative_names =
        |c: &Concept| alternatives.iter().all(|a| concept_attributes(c).is_subset(a));
    match kind {
        Kind::Or => !concepts.is_empty() && concepts.iter().all(names),
        Kind::AndNot => {
            concepts.first().is_some_and(every_alternative_names)
                && !concepts.get(1).is_some_and(names)
        }
        _ => !concepts.is_empty() && concepts.iter().all(every_alternative_names),
    }
}

/// Network Dissection's statistic for one neuron and one concept, accumulated over images:
/// intersection and union of the neuron's thresholded map with the concept's mask.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct IouCounts {
    pub intersection: u64,
    pub union: u64,
}

impl IouCounts {
    /// Adds one image: `active` and `mask` are the same grid, row-major.
    pub fn add(&mut self, active: &[bool], mask: &[bool]) {
        for (&a, &m) in active.iter().zip(mask) {
            self.intersection += u64::from(a && m);
            self.union += u64::from(a || m);
        }
    }

    pub fn iou(&self) -> f64 {
        if self.union == 0 { 0.0 } else { self.intersection as f64 / self.union as f64 }
    }
}

/// The activation value that the top `fraction` of `values` reaches (Network Dissection
/// uses the top 0.5% of all of a neuron's activations over the probe set).
pub fn top_quantile(values: &[f32], fraction: f64) -> f32 {
    if values.is_empty() {
        return f32::INFINITY;
    }
    let mut sorted: Vec<f32> = values.iter().copied().filter(|v| !v.is_nan()).collect();
    sorted.sort_by(f32::total_cmp);
    let keep = ((sorted.len() as f64 * fraction).ceil() as usize).clamp(1, sorted.len());
    sorted[sorted.len() - keep]
}

/// The index of the largest score (the first on ties); `None` for no scores.
pub fn best(scores: &[f64]) -> Option<usize> {
    scores
        .iter()
        .enumerate()
        .fold(None, |acc: Option<(usize, f64)>, (i, &s)| match acc {
            Some((_, b)) if b >= s || s.is_nan() => acc,
            _ if s.is_nan() => acc,
            _ => Some((i, s)),
        })
        .map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vocab::Fill;
    use dnd_core::stats::pearson;

    #[test]
    fn recovery_ignores_plurals_synonyms_and_order() {
        let red = [Concept::Colour(Colour::Red)];
        assert!(recovered("red objects", Kind::Single, &red));
        assert!(recovered("Red circles.", Kind::Single, &red));
        assert!(!recovered("blue circles", Kind::Single, &red));
        let stripes = [Concept::Fill(Fill::Striped)];
        assert!(recovered("stripy squares", Kind::Single, &stripes));
        assert!(
            recovered("striped background", Kind::Single, &stripes),
            "a pattern counts on objects or the background"
        );
        let pair = [Concept::ColourShape(Colour::Blue, Shape::Square)];
        assert!(recovered("blue squares", Kind::Class, &pair));
        assert!(!recovered("blue shapes", Kind::Class, &pair));
        let or = [Concept::Colour(Colour::Red), Concept::Colour(Colour::Blue)];
        assert!(recovered("red or blue shapes", Kind::Or, &or));
        assert!(recovered("red or blue circle", Kind::Or, &or));
        assert!(!recovered("red shapes", Kind::Or, &or));
        // A hedge names a concept only when every alternative does.
        let black_square = [Concept::ColourShape(Colour::Black, Shape::Square)];
        assert!(!recovered("black square or circle", Kind::Class, &black_square));
        assert!(!recovered("square or circle", Kind::Class, &black_square));
        assert!(recovered("black square or black striped square", Kind::Class, &black_square));
        assert!(!recovered("white or black", Kind::Single, &[Concept::Colour(Colour::White)]));
        let stars = [Concept::Shape(Shape::Star)];
        assert!(recovered("yellow or green star", Kind::Single, &stars));
        let and_not = [Concept::Shape(Shape::Circle), Concept::Colour(Colour::Red)];
        assert!(recovered("green circles", Kind::AndNot, &and_not));
        assert!(!recovered("red circles", Kind::AndNot, &and_not));
        assert!(!recovered("", Kind::Single, &red));
    }

    #[test]
    fn iou_quantile_and_correlation() {
        let mut counts = IouCounts::default();
        counts.add(&[true, true, false, false], &[true, false, true, false]);
        assert_eq!(counts, IouCounts { intersection: 1, union: 3 });
        assert!((counts.iou() - 1.0 / 3.0).abs() < 1e-12);
        let values: Vec<f32> = (0..1000).map(|i| i as f32).collect();
        assert_eq!(top_quantile(&values, 0.005), 995.0);
        assert!((pearson(&[1.0, 2.0, 3.0], &[2.0, 4.0, 6.0]) - 1.0).abs() < 1e-12);
        assert_eq!(pearson(&[1.0, 1.0], &[1.0, 2.0]), 0.0);
        assert_eq!(best(&[0.1, 0.5, 0.5, f64::NAN]), Some(1));
        assert_eq!(best(&[]), None);
    }
}

//! NeuronEval's sanity checks on the zoo: a metric worth trusting scores a neuron's planted
//! concept above a narrower and a broader concept (one attribute added, one dropped) and
//! above a random concept that shares nothing with it. The world knows all four, so each
//! planted neuron gets them here; `dnd bench evaluate` scores them (and every method's
//! labels) with `dnd evaluate` and [`sanity_checks`] counts how often the truth wins.

use std::collections::BTreeMap;

use serde::Serialize;

use dnd_store::results::EvaluationRow;
use dnd_synth::planted::{PlantedKind, PlantedNeuron, describe};
use dnd_synth::vocab::{Colour, Fill, Shape};
use dnd_synth::{Concept, all_concepts};

/// The concepts a planted neuron's truth is compared with.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Perturbed {
    /// One attribute more than the truth ("red circles" for "red objects").
    pub narrower: String,
    /// One attribute fewer ("objects" for "red objects").
    pub broader: String,
    /// A concept sharing no attribute with the truth.
    pub random: String,
}

/// The attributes a set of concepts mentions.
#[derive(Default)]
struct Attributes {
    colours: Vec<Colour>,
    shapes: Vec<Shape>,
    fills: Vec<Fill>,
    background: bool,
}

impl Attributes {
    fn of(concepts: &[Concept]) -> Self {
        let mut a = Self::default();
        for c in concepts {
            match *c {
                Concept::Colour(x) => a.colours.push(x),
                Concept::Shape(s) => a.shapes.push(s),
                Concept::Fill(f) => a.fills.push(f),
                Concept::Texture(_) => a.background = true,
                Concept::ColourShape(x, s) => {
                    a.colours.push(x);
                    a.shapes.push(s);
                }
            }
        }
        a
    }

    fn free_colour(&self) -> Colour {
        *Colour::ALL.iter().find(|c| !self.colours.contains(c)).unwrap_or(&Colour::ALL[0])
    }

    fn free_shape(&self) -> Shape {
        *Shape::ALL.iter().find(|s| !self.shapes.contains(s)).unwrap_or(&Shape::ALL[0])
    }

    fn free_fill(&self) -> Fill {
        // Solid is what objects are when nothing is said: a narrower fill is a pattern.
        *Fill::ALL[1..].iter().find(|f| !self.fills.contains(f)).unwrap_or(&Fill::ALL[1])
    }

    fn shares_with(&self, c: Concept) -> bool {
        let other = Attributes::of(&[c]);
        other.colours.iter().any(|x| self.colours.contains(x))
            || other.shapes.iter().any(|x| self.shapes.contains(x))
            || other.fills.iter().any(|x| self.fills.contains(x))
            || (other.background && self.background)
    }
}

/// The concept with one attribute added, where the world has one to add.
fn narrowed(c: Concept, free: &Attributes) -> Option<Concept> {
    match c {
        Concept::Colour(x) => Some(Concept::ColourShape(x, free.free_shape())),
        Concept::Shape(s) => Some(Concept::ColourShape(free.free_colour(), s)),
        _ => None,
    }
}

/// A phrase naming a subset of what `c` names.
fn narrower_phrase(c: Concept, free: &Attributes) -> String {
    match (c, narrowed(c, free)) {
        (_, Some(n)) => describe(PlantedKind::Single, &[n]),
        (Concept::Fill(_), None) => {
            describe(PlantedKind::And, &[c, Concept::Colour(free.free_colour())])
        }
        (Concept::ColourShape(..), None) => {
            describe(PlantedKind::And, &[c, Concept::Fill(free.free_fill())])
        }
        // A textured background behind some object.
        _ => describe(PlantedKind::And, &[c, Concept::Shape(free.free_shape())]),
    }
}

/// A phrase naming a superset of what `c` names.
fn broader_phrase(c: Concept) -> String {
    match c {
        Concept::ColourShape(x, _) => describe(PlantedKind::Single, &[Concept::Colour(x)]),
        Concept::Texture(_) => "background".into(),
        _ => "objects".into(),
    }
}

/// The narrower, broader and random concepts of a planted neuron; `seed` picks the
/// random one. None for a neuron whose concepts do not parse.
pub fn perturb(p: &PlantedNeuron, seed: u64) -> Option<Perturbed> {
    let concepts = p.parsed_concepts();
    let attributes = Attributes::of(&concepts);
    let (narrower, broader) = match (p.kind, concepts.as_slice()) {
        (PlantedKind::Single, [a]) => (narrower_phrase(*a, &attributes), broader_phrase(*a)),
        (PlantedKind::Class, [Concept::ColourShape(x, s)]) => (
            format!(
                "the largest object is a {} {} {}",
                attributes.free_fill().name(),
                x.name(),
                s.name()
            ),
            format!("the largest object is {}", x.name()),
        ),
        // One disjunct names a subset of the union.
        (PlantedKind::Or, [a, _]) => (describe(PlantedKind::Single, &[*a]), "objects".into()),
        (PlantedKind::And, [a, b]) => {
            let narrower = match (narrowed(*b, &attributes), narrowed(*a, &attributes)) {
                (Some(nb), _) => describe(PlantedKind::And, &[*a, nb]),
                (None, Some(na)) => describe(PlantedKind::And, &[na, *b]),
                (None, None) => narrower_phrase(*a, &attributes),
            };
            (narrower, describe(PlantedKind::Single, &[*a]))
        }
        (PlantedKind::AndNot, [a, b]) => {
            let narrower = match narrowed(*a, &attributes) {
                Some(na) => describe(PlantedKind::AndNot, &[na, *b]),
                None => narrower_phrase(*a, &attributes),
            };
            (narrower, describe(PlantedKind::Single, &[*a]))
        }
        _ => return None,
    };
    let unrelated: Vec<Concept> = all_concepts()
        .into_iter()
        .filter(|c| !matches!(c, Concept::ColourShape(..)) && !attributes.shares_with(*c))
        .collect();
    let pick = (seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) as usize % unrelated.len().max(1);
    let random = describe(PlantedKind::Single, &[*unrelated.get(pick)?]);
    Some(Perturbed { narrower, broader, random })
}

/// Labels compared with the truth, as `dnd bench evaluate` names its sources.
pub const CONTROLS: [&str; 3] = ["narrower", "broader", "random"];

/// How one metric (at one quantile) did on the checks.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MetricCheck {
    pub metric: String,
    pub quantile: Option<f64>,
    /// Per compared source: the share of planted neurons whose truth scored strictly
    /// higher, and the number of neurons compared.
    pub truth_wins: BTreeMap<String, (f64, usize)>,
    /// Per source: the mean value over planted neurons.
    pub mean: BTreeMap<String, f64>,
    /// The truth beat the random concept for at least 95% of neurons and each of the
    /// narrower and broader concepts for most of them.
    pub passes: bool,
}

/// Counts, per metric, how often the truth (source `truth`) beats every other source on
/// the same neuron, from the best label (`label_rank` 1) of each.
pub fn sanity_checks(rows: &[EvaluationRow], sources: &[&str]) -> Vec<MetricCheck> {
    // (metric, quantile bits) -> (layer, neuron) -> source -> value.
    type BySource = BTreeMap<String, f64>;
    type ByNeuron = BTreeMap<(String, u32), BySource>;
    let mut values: BTreeMap<(String, Option<u64>), ByNeuron> = BTreeMap::new();
    for r in rows.iter().filter(|r| r.label_rank == 1) {
        let Some(v) = r.value else { continue };
        let key = (r.metric.clone(), r.quantile.map(f64::to_bits));
        values
            .entry(key)
            .or_default()
            .entry((r.layer.to_string(), r.neuron.to_u32()))
            .or_default()
            .insert(r.source.clone(), v);
    }
    values
        .into_iter()
        .map(|((metric, quantile), by_neuron)| {
            let mut truth_wins = BTreeMap::new();
            let mut mean = BTreeMap::new();
            for &source in sources {
                let scored: Vec<f64> =
                    by_neuron.values().filter_map(|m| m.get(source).copied()).collect();
                if !scored.is_empty() {
                    mean.insert(
                        source.to_string(),
                        scored.iter().sum::<f64>() / scored.len() as f64,
                    );
                }
                if source == "truth" {
                    continue;
                }
                let pairs: Vec<(f64, f64)> = by_neuron
                    .values()
                    .filter_map(|m| Some((*m.get("truth")?, *m.get(source)?)))
                    .collect();
                let wins = pairs.iter().filter(|(t, o)| t > o).count();
                let share =
                    if pairs.is_empty() { f64::NAN } else { wins as f64 / pairs.len() as f64 };
                truth_wins.insert(source.to_string(), (share, pairs.len()));
            }
            let share = |s: &str| truth_wins.get(s).map_or(0.0, |(v, _): &(f64, usize)| *v);
            let passes =
                share("random") >= 0.95 && share("narrower") > 0.5 && share("broader") > 0.5;
            MetricCheck { metric, quantile: quantile.map(f64::from_bits), truth_wins, mean, passes }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn planted(kind: PlantedKind, concepts: &[Concept]) -> PlantedNeuron {
        PlantedNeuron {
            layer: "layer4".into(),
            neuron: 0,
            kind,
            concepts: concepts.iter().map(Concept::phrase).collect(),
            description: describe(kind, concepts),
        }
    }

    #[test]
    fn perturbations_add_and_drop_one_attribute_and_random_shares_none() {
        let red = planted(PlantedKind::Single, &[Concept::Colour(Colour::Red)]);
        let p = perturb(&red, 1).unwrap();
        assert_eq!(red.description, "red objects");
        assert!(p.narrower.starts_with("red ") && p.narrower != "red objects", "{p:?}");
        assert_eq!(p.broader, "objects");
        let random = Concept::parse(&p.random);
        assert!(
            !random.is_empty()
                && !random.iter().any(|c| Attributes::of(&red.parsed_concepts()).shares_with(*c)),
            "{p:?}"
        );

        let class =
            planted(PlantedKind::Class, &[Concept::ColourShape(Colour::Red, Shape::ALL[0])]);
        let p = perturb(&class, 1).unwrap();
        assert!(
            p.narrower.contains(Shape::ALL[0].name()) && p.narrower.len() > class.description.len()
        );
        assert_eq!(p.broader, "the largest object is red");

        let or = planted(
            PlantedKind::Or,
            &[Concept::Colour(Colour::Red), Concept::Shape(Shape::ALL[1])],
        );
        assert_eq!(perturb(&or, 1).unwrap().narrower, "red objects");
    }

    fn row(source: &str, neuron: u32, value: f64) -> EvaluationRow {
        EvaluationRow {
            layer: "layer4".into(),
            neuron: dnd_core::NeuronId::new(neuron),
            unit_kind: dnd_core::UnitKind::Channel,
            unit_source: None,
            source: source.into(),
            label_rank: 1,
            label: source.into(),
            metric: "correlation".into(),
            quantile: None,
            value: Some(value),
            ci_low: None,
            ci_high: None,
            images: 10,
        }
    }

    #[test]
    fn a_metric_passes_when_the_truth_beats_every_control() {
        let mut rows = Vec::new();
        for n in 0..20 {
            rows.push(row("truth", n, 0.5));
            rows.push(row("random", n, 0.1));
            rows.push(row("narrower", n, if n < 15 { 0.4 } else { 0.6 }));
            rows.push(row("broader", n, 0.3));
        }
        let checks = sanity_checks(&rows, &["truth", "narrower", "broader", "random"]);
        assert_eq!(checks.len(), 1);
        assert_eq!(checks[0].truth_wins["narrower"], (0.75, 20));
        assert!(checks[0].passes);
        rows.push(row("random", 0, 0.9));
        rows.retain(|r| !(r.source == "random" && r.neuron.index() == 0 && r.value == Some(0.1)));
        let checks = sanity_checks(&rows, &["truth", "narrower", "broader", "random"]);
        assert_eq!(checks[0].truth_wins["random"], (0.95, 20));
        rows.push(row("random", 1, 0.9));
        rows.retain(|r| !(r.source == "random" && r.neuron.index() == 1 && r.value == Some(0.1)));
        assert!(!sanity_checks(&rows, &["truth", "random"])[0].passes);
    }
}

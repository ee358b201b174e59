//! The zoo's SAE against the planted concepts: does some latent of the SAE carry each
//! planted concept, and does dnd's label of that latent name it?
//!
//! Describing every latent of a dictionary costs a dissection of thousands of units, so
//! the benchmark describes, per planted concept, the few latents most selective for it:
//! CoSy-style, by how well each latent's pooled activation separates images rendered from
//! the concept's planted description from control scenes ([`select_latents`]). A concept
//! counts as named when the dnd label of one of its latents names it
//! ([`dnd_synth::quality::recovered`], as for channels): a lower bound on "some latent of
//! the dictionary is labelled with it", since a latent outside the chosen few may be too.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use image::RgbImage;
use serde::Serialize;

use dnd_core::UnitKind;
use dnd_core::stats::{auc, widen};
use dnd_models::dictionary::{self, DeviceEncoder};
use dnd_models::{ModelRef, TargetModel};
use dnd_pipeline::activations::pooled_activations;
use dnd_pipeline::units::{LayerUnits, Readout, UnitLayers};
use dnd_store::results::DescriptionRow;
use dnd_synth::TextRenderer;
use dnd_synth::planted::{PlantedKind, PlantedNeuron};
use dnd_synth::quality::recovered;

use crate::{QualityError, control_scenes, kind_name};

/// A planted concept and the latents chosen for it, most selective first.
#[derive(Debug, Clone, Serialize)]
pub struct ConceptLatents {
    /// The planted neuron that defines the concept (`layer`, `neuron`).
    pub layer: String,
    pub neuron: usize,
    pub kind: PlantedKind,
    pub truth: String,
    /// `(latent, AUC)`: the latent's separation of the concept's images from controls.
    pub latents: Vec<(usize, f64)>,
}

/// How [`select_latents`] chooses.
pub struct LatentSelection<'a> {
    /// The zoo's target (`target.model`).
    pub target: &'a str,
    /// The SAE directory (SAELens layout) and the layer it reads.
    pub sae: &'a Path,
    pub layer: &'a str,
    /// Latents kept per concept.
    pub per_concept: usize,
    /// Images rendered from each planted description.
    pub concept_images: usize,
    /// Control scenes of the world (the same as the channels' AUC uses).
    pub control_images: usize,
    /// Side of the rendered images (the probe set's).
    pub size: u32,
    pub device: &'a str,
}

/// Per planted concept, the `per_concept` latents whose activations best separate images
/// of the concept from control scenes. Latents silent on every image are never chosen.
pub fn select_latents(
    input: &LatentSelection<'_>,
    planted: &[PlantedNeuron],
) -> Result<Vec<ConceptLatents>, QualityError> {
    let device = dnd_models::device::parse_device(input.device)?;
    let model = TargetModel::load(&input.target.parse::<ModelRef>()?, &device)?;
    let tap = model.tap(input.layer)?;
    let info = dictionary::inspect(UnitKind::Sae, input.sae)?;
    dictionary::check_width(&info, input.layer, model.tap_width(tap))?;
    let encoder = DeviceEncoder::new(&dictionary::load(&info)?, &model.device)?;
    let units: UnitLayers = [(tap, Arc::new(LayerUnits { info, encoder }))].into();
    let readout = Readout::of(tap, &units);
    let acts = |images: Vec<RgbImage>| {
        let images: Vec<Arc<RgbImage>> = images.into_iter().map(Arc::new).collect();
        pooled_activations(&model, &images, &readout, dnd_core::Pooling::Mean, 32)
    };
    let size = input.size;
    let controls = acts(control_scenes(input.control_images, size))?;
    let renderer = TextRenderer::new(size, size)?;
    let mut out = Vec::new();
    for p in planted {
        let images = (0..input.concept_images)
            .map(|i| renderer.render(&p.description, 1_000_000 + i as u64).1.image)
            .collect();
        let positives = acts(images)?;
        let latents = most_selective(&positives, &controls, input.per_concept);
        out.push(ConceptLatents {
            layer: p.layer.clone(),
            neuron: p.neuron,
            kind: p.kind,
            truth: p.description.clone(),
            latents,
        });
    }
    Ok(out)
}

/// The `n` units (columns) whose values on `positives` best separate them from
/// `negatives` by AUC, best first; units at 0 on every image are left out.
fn most_selective(positives: &[Vec<f32>], negatives: &[Vec<f32>], n: usize) -> Vec<(usize, f64)> {
    let width = positives.first().map_or(0, Vec::len);
    let column = |rows: &[Vec<f32>], u: usize| -> Vec<f32> { rows.iter().map(|r| r[u]).collect() };
    let mut scored: Vec<(usize, f64)> = (0..width)
        .filter_map(|u| {
            let (pos, neg) = (column(positives, u), column(negatives, u));
            let silent = pos.iter().chain(&neg).all(|&v| v == 0.0);
            (!silent).then(|| (u, auc(&widen(&pos), &widen(&neg))))
        })
        .collect();
    scored.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    scored.truncate(n);
    scored
}

/// Every latent chosen for some concept, once, in order.
pub fn chosen_latents(concepts: &[ConceptLatents]) -> Vec<usize> {
    let ids: BTreeSet<usize> =
        concepts.iter().flat_map(|c| c.latents.iter().map(|l| l.0)).collect();
    ids.into_iter().collect()
}

/// One chosen latent of a concept, as dnd described it.
#[derive(Debug, Clone, Serialize)]
pub struct LatentLabel {
    pub latent: usize,
    pub auc: f64,
    /// The description's status (`ok`, `dead`, `dense`, ...); `missing` if none.
    pub status: String,
    pub label: Option<String>,
    /// Whether the label names the concept.
    pub names_it: bool,
}

/// A planted concept's latents and whether one is labelled with it.
#[derive(Debug, Clone, Serialize)]
pub struct LatentScore {
    pub layer: String,
    pub neuron: usize,
    pub kind: PlantedKind,
    pub truth: String,
    pub latents: Vec<LatentLabel>,
    pub named: bool,
}

/// Scores each concept's latents by the dissection's `descriptions` of them.
pub fn score_latents(
    concepts: &[ConceptLatents],
    planted: &[PlantedNeuron],
    descriptions: &[DescriptionRow],
) -> Vec<LatentScore> {
    let by_latent: BTreeMap<usize, &DescriptionRow> =
        descriptions.iter().map(|d| (d.neuron.index(), d)).collect();
    concepts
        .iter()
        .map(|c| {
            let truth = planted
                .iter()
                .find(|p| p.layer == c.layer && p.neuron == c.neuron)
                .map(PlantedNeuron::parsed_concepts)
                .unwrap_or_default();
            let latents: Vec<LatentLabel> = c
                .latents
                .iter()
                .map(|&(latent, auc)| {
                    let d = by_latent.get(&latent);
                    let label = d.and_then(|d| d.label.clone());
                    LatentLabel {
                        latent,
                        auc,
                        status: d.map_or("missing".into(), |d| d.status.as_str().to_string()),
                        names_it: label.as_deref().is_some_and(|l| recovered(l, c.kind, &truth)),
                        label,
                    }
                })
                .collect();
            LatentScore {
                layer: c.layer.clone(),
                neuron: c.neuron,
                kind: c.kind,
                truth: c.truth.clone(),
                named: latents.iter().any(|l| l.names_it),
                latents,
            }
        })
        .collect()
}

/// Concepts named by a latent's label, per kind and then over all: `(kind, named, of)`.
pub fn latent_groups(scores: &[LatentScore]) -> Vec<(String, usize, usize)> {
    let mut groups: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for s in scores {
        for key in [kind_name(s.kind), "all".to_string()] {
            let g = groups.entry(key).or_default();
            g.0 += usize::from(s.named);
            g.1 += 1;
        }
    }
    let all = groups.remove("all");
    groups
        .into_iter()
        .chain(all.map(|g| ("all".to_string(), g)))
        .map(|(k, (n, of))| (k, n, of))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use dnd_store::results::DescriptionStatus;

    #[test]
    fn the_most_selective_units_come_first_and_silent_ones_never() {
        // Unit 0 separates perfectly, unit 1 is reversed, unit 2 is silent, unit 3 half.
        let positives = vec![vec![5.0, 0.0, 0.0, 1.0], vec![4.0, 0.1, 0.0, 0.0]];
        let negatives = vec![vec![1.0, 2.0, 0.0, 1.0], vec![0.0, 3.0, 0.0, 0.0]];
        let chosen = most_selective(&positives, &negatives, 3);
        let ids: Vec<usize> = chosen.iter().map(|c| c.0).collect();
        assert_eq!(ids, [0, 3, 1]);
        assert!((chosen[0].1 - 1.0).abs() < 1e-12);
        assert!(most_selective(&positives, &negatives, 9).iter().all(|c| c.0 != 2));
    }

    fn description(latent: u32, status: DescriptionStatus, label: Option<&str>) -> DescriptionRow {
        DescriptionRow {
            label: label.map(String::from),
            ..DescriptionRow::unlabelled(
                "layer4".into(),
                dnd_core::NeuronId::new(latent),
                UnitKind::Sae,
                Some("blake3:0".into()),
                status,
                "layer4-00000".into(),
            )
        }
    }

    #[test]
    fn a_concept_is_named_when_one_of_its_latents_labels_names_it() {
        let planted = |description: &str, concept: &str| PlantedNeuron {
            layer: "layer4".into(),
            neuron: 39,
            kind: PlantedKind::Single,
            concepts: vec![concept.into()],
            description: description.into(),
        };
        let blue = planted("blue squares", "blue square");
        let chosen = |latents: Vec<(usize, f64)>| ConceptLatents {
            layer: "layer4".into(),
            neuron: 39,
            kind: PlantedKind::Single,
            truth: "blue squares".into(),
            latents,
        };
        let descriptions = [
            description(5, DescriptionStatus::Ok, Some("red square")),
            description(7, DescriptionStatus::Ok, Some("blue striped square")),
            description(9, DescriptionStatus::Dead, None),
        ];
        let scores = score_latents(
            &[chosen(vec![(5, 0.9), (7, 0.8), (9, 0.7)]), chosen(vec![(5, 0.9), (11, 0.6)])],
            std::slice::from_ref(&blue),
            &descriptions,
        );
        assert!(scores[0].named);
        let names: Vec<bool> = scores[0].latents.iter().map(|l| l.names_it).collect();
        assert_eq!(names, [false, true, false]);
        assert_eq!(scores[0].latents[2].status, "dead");
        assert!(!scores[1].named);
        assert_eq!(scores[1].latents[1].status, "missing");
    }

    /// The committed zoo's SAE holds latents that pick out its blue-squares concept.
    #[test]
    fn the_zoo_sae_has_latents_selective_for_blue_squares() {
        let zoo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dnd-synth/zoo");
        let planted = dnd_synth::read_planted(&zoo.join("target")).unwrap();
        let blue: Vec<PlantedNeuron> =
            planted.into_iter().filter(|p| p.description == "blue squares").collect();
        assert_eq!(blue.len(), 1);
        let target = zoo.join("target");
        let chosen = select_latents(
            &LatentSelection {
                target: target.to_str().unwrap(),
                sae: &zoo.join("sae"),
                layer: "layer4",
                per_concept: 3,
                concept_images: 8,
                control_images: 32,
                size: 96,
                device: "cpu",
            },
            &blue,
        )
        .unwrap();
        let latents = &chosen[0].latents;
        assert_eq!(latents.len(), 3);
        assert!(latents.windows(2).all(|w| w[0].1 >= w[1].1), "{latents:?}");
        assert!(latents[0].1 > 0.85, "{latents:?}");
    }

    #[test]
    fn groups_count_named_concepts_per_kind_then_all() {
        let score = |kind, named| LatentScore {
            layer: "layer4".into(),
            neuron: 0,
            kind,
            truth: String::new(),
            latents: Vec::new(),
            named,
        };
        let scores = [
            score(PlantedKind::Single, true),
            score(PlantedKind::Single, false),
            score(PlantedKind::Or, true),
        ];
        assert_eq!(
            latent_groups(&scores),
            [("or".to_string(), 1, 1), ("single".to_string(), 1, 2), ("all".to_string(), 2, 3)]
        );
    }
}

//! Training data: scenes of the world drawn from seeds (half of them built to show a
//! planted concept), their class labels, and each planted channel's target per map cell.

use candle_core::{Device, Tensor};
use dnd_models::preprocess::Preprocess;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use dnd_synth::concept::Concept;
use dnd_synth::mask::Mask;
use dnd_synth::planted::class_index;
use dnd_synth::planted::{PlantedKind, PlantedSpec};
use dnd_synth::render::{Rendered, render};
use dnd_synth::scene::Scene;
use dnd_synth::spec::{BackgroundSpec, ObjectSpec, SceneSpec};
use dnd_synth::vocab::{Colour, Fill, Shape, Texture};

use super::TrainError;
use super::config::{PURPOSE_TRAIN, TargetTraining, derive};

pub(crate) fn constrain(
    object: &mut ObjectSpec,
    background: &mut BackgroundSpec,
    concept: Concept,
) {
    match concept {
        Concept::Colour(c) => object.colour = Some(c),
        Concept::Shape(s) => object.shape = Some(s),
        Concept::Fill(f) => object.fill = Some(f),
        Concept::ColourShape(c, s) => (object.colour, object.shape) = (Some(c), Some(s)),
        Concept::Texture(t) => background.texture = Some(t),
    }
}

pub(crate) fn other<T: Copy + PartialEq, R: Rng + ?Sized>(rng: &mut R, all: &[T], not: T) -> T {
    let rest: Vec<T> = all.iter().copied().filter(|&x| x != not).collect();
    rest[rng.random_range(0..rest.len())]
}

/// Makes the object (or background) avoid a concept, where the spec leaves room for it.
pub(crate) fn exclude<R: Rng + ?Sized>(
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
pub(crate) fn focus_spec<R: Rng + ?Sized>(
    rng: &mut R,
    spec: &PlantedSpec,
    near_miss: bool,
) -> SceneSpec {
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
pub(crate) fn largest_object(rendered: &Rendered) -> Option<usize> {
    let counts: Vec<usize> = rendered.object_masks.iter().map(Mask::count).collect();
    let best = *counts.iter().max()?;
    (best > 0).then(|| counts.iter().position(|&c| c == best)).flatten()
}

pub(crate) fn label_of(scene: &Scene, rendered: &Rendered) -> u32 {
    // Every sampled scene has an object that shows; an empty scene would be class 0.
    largest_object(rendered)
        .map_or(0, |i| class_index(scene.objects[i].colour, scene.objects[i].shape) as u32)
}

/// Fraction of each cell of a `grid` x `grid` partition of the image that the mask covers;
/// a pixel belongs to the cell its centre falls in.
pub(crate) fn cell_fractions(mask: &Mask, grid: usize) -> Vec<f32> {
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
pub(crate) struct PlantGroup {
    /// 3 or 4.
    pub(crate) layer: u8,
    /// Indices into `config.planted`.
    pub(crate) specs: Vec<usize>,
    pub(crate) grid: usize,
}

pub(crate) fn plant_groups(config: &TargetTraining) -> Vec<PlantGroup> {
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
pub(crate) struct Example {
    pub(crate) input: Vec<f32>,
    pub(crate) label: u32,
    /// Per group: (planted channel, cell) fractions, `specs.len() * grid * grid`.
    pub(crate) fractions: Vec<Vec<f32>>,
}

pub(crate) fn training_example(
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
pub(crate) struct Batch {
    pub(crate) images: Tensor,
    pub(crate) labels: Tensor,
    /// Per group: targets `(N, P, g, g)` (`plant_scale` x coverage) and the covered-cell
    /// indicator of the same shape.
    pub(crate) targets: Vec<(Tensor, Tensor)>,
}

pub(crate) fn make_batch(
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

pub(crate) fn training_seeds(config: &TargetTraining, step: usize) -> Vec<u64> {
    (0..config.batch_size)
        .map(|i| derive(&[config.seed, PURPOSE_TRAIN, step as u64, i as u64]))
        .collect()
}

//! A neuron task: stages 1-3 for a batch of neurons of one layer, composed from
//! [`crate::stages`].
//!
//! Work is batched across the task's neurons at every stage: each distinct probe image is
//! read and run through the model once, each distinct image captioned once, each distinct
//! (prompt, seed) generated once, and all of it goes through the caches. Per neuron, only
//! the summariser's rounds run one after another.

use std::collections::HashMap;
use std::sync::Arc;

use image::RgbImage;

use dnd_core::{LayerName, NeuronId, Scored, Stage, TaskId};
use dnd_models::Tap;
use dnd_store::Location;
use dnd_store::results::NeuronErrorRow;

use crate::error::PipelineError;
use crate::images::{ImageLimits, ImageRef, load_batch};
use crate::job::JobSpec;
use crate::progress::Progress;
use crate::stages::caption::caption_top_images;
use crate::stages::crop::{CropInputs, Evidence, neuron_crops};
use crate::stages::generate::ImageRequests;
use crate::stages::score::{measure, score_neuron};
use crate::stages::summarize::label_neuron;
pub use crate::task_rows::TaskTables;
use crate::task_rows::{NeuronOutcome, RowMaker};
use crate::workbench::{Workbench, image_hash};

/// A batch of neurons of one layer: the unit of work, of retries and of commits.
#[derive(Debug, Clone, PartialEq)]
pub struct NeuronTask {
    /// `<layer>-<5-digit index>`, unique in the job.
    pub id: TaskId,
    pub layer: LayerName,
    pub tap: Tap,
    pub neurons: Vec<NeuronId>,
}

/// Reads every distinct top image of the task once. An image that cannot be read gets an
/// error row for each neuron whose top-K holds it.
async fn read_originals(
    top: &[Vec<Scored>],
    images: &[ImageRef],
    limits: &ImageLimits,
    neurons: &[NeuronId],
    rows: &RowMaker<'_>,
    errors: &mut Vec<NeuronErrorRow>,
) -> HashMap<u32, Arc<RgbImage>> {
    let wanted: Vec<u32> = {
        let mut w: Vec<u32> = top.iter().flatten().map(|s| s.image).collect();
        w.sort_unstable();
        w.dedup();
        w
    };
    let refs: Vec<ImageRef> = wanted.iter().map(|&i| images[i as usize].clone()).collect();
    let mut originals = HashMap::new();
    for (pos, (_, loaded)) in load_batch(&refs, 0, limits, "read").await.into_iter().enumerate() {
        match loaded {
            Ok(img) => {
                originals.insert(wanted[pos], Arc::new(img));
            }
            Err(row) => {
                for (k, list) in top.iter().enumerate() {
                    if list.iter().any(|s| s.image == wanted[pos]) {
                        let reason = &row.reason;
                        let id = Some(row.image_id.clone());
                        errors.push(rows.error(
                            neurons[k],
                            "read",
                            id,
                            reason,
                            row.message.clone(),
                        ));
                    }
                }
            }
        }
    }
    originals
}

/// Each neuron's originals that could be read, with their probe activations.
fn original_evidence(
    top: &[Vec<Scored>],
    images: &[ImageRef],
    originals: &HashMap<u32, Arc<RgbImage>>,
) -> Vec<Vec<Evidence>> {
    top.iter()
        .map(|list| {
            list.iter()
                .filter_map(|s| {
                    let image = originals.get(&s.image)?.clone();
                    let r = &images[s.image as usize];
                    Some(Evidence {
                        image_id: r.id.clone(),
                        crop: None,
                        activation: s.activation,
                        hash: image_hash(&image),
                        image,
                        uri: r.uri(),
                    })
                })
                .collect()
        })
        .collect()
}

/// Runs stages 1-3 for the task's neurons. `top` holds each neuron's probe top-K (indices
/// into `images`), in the task's neuron order. Crop images are stored under
/// `job/images/crops/`. A neuron whose stage fails gets an error row and a `failed`
/// description; only failures that hit every neuron (a model or store error) fail the task.
pub async fn run_neuron_task(
    bench: &Workbench,
    spec: &JobSpec,
    task: &NeuronTask,
    top: &[Vec<Scored>],
    images: &[ImageRef],
    job: &Location,
    progress: &dyn Progress,
) -> Result<TaskTables, PipelineError> {
    let mut tables = TaskTables::default();
    let n = task.neurons.len() as u64;
    let rows = RowMaker { layer: &task.layer, task: &task.id, spec, bench };

    // Stage 1: the originals, and attention crops of them (spatial layers only).
    let originals =
        read_originals(top, images, &spec.probe.limits, &task.neurons, &rows, &mut tables.errors)
            .await;
    let mut evidence = original_evidence(top, images, &originals);
    if task.tap.is_spatial() {
        let crops = neuron_crops(&CropInputs {
            model: &bench.target,
            tap: task.tap,
            neurons: &task.neurons,
            top,
            images,
            originals: &originals,
            config: &spec.crops,
            pooling: spec.probe.pooling,
            batch_size: spec.describe.batch_size,
            job,
        })
        .await?;
        for (list, crops) in evidence.iter_mut().zip(crops) {
            list.extend(crops);
        }
    }
    for list in &mut evidence {
        // Descending activation; the sort is stable, so originals stay ahead of their equal crops.
        list.sort_by(|a, b| b.activation.total_cmp(&a.activation));
    }
    progress.advance_stage(Stage::Crop, n);

    // Stage 2: captions of every neuron's top images, then candidates neuron by neuron.
    let top_n = spec.describe.top_images;
    let captions = caption_top_images(bench, &evidence, top_n, spec.captioner.batch_size).await?;
    progress.advance_stage(Stage::Caption, n);
    let summarizer = bench.cached_summarizer();
    let mut labelling = Vec::with_capacity(evidence.len());
    for list in &evidence {
        let texts = captions.texts(list.iter().take(top_n));
        labelling.push(label_neuron(&summarizer, &texts, spec.seed, spec.summarizer.rounds).await);
    }
    progress.advance_stage(Stage::Summarize, n);

    // Stage 3: generated images for every candidate of every neuron, then the scores.
    let sampling = &spec.generator.sampling;
    let requests =
        ImageRequests::new(&labelling, sampling, spec.generator.images_per_concept, spec.seed);
    let generated = bench.generated(&requests.requests, spec.generator.batch_size).await?;
    progress.advance_stage(Stage::Generate, n);
    let generated_images: Vec<Arc<RgbImage>> = generated.iter().map(|g| g.image.clone()).collect();
    let measured = measure(
        &bench.target,
        &bench.embedder.model,
        task.tap,
        spec.probe.pooling,
        spec.describe.batch_size,
        &captions.distinct,
        &generated_images,
    )
    .await?;
    let generated_hashes: Vec<String> = generated.iter().map(|g| image_hash(&g.image)).collect();
    let seeds: Vec<u64> = requests.requests.iter().map(|r| r.seed).collect();
    for (k, (list, l)) in evidence.iter().zip(&labelling).enumerate() {
        let references = measured.references(list.iter().take(top_n).map(|e| e.hash.as_str()));
        let concept_requests: Vec<Vec<usize>> =
            l.candidates.iter().map(|c| requests.of_concept(sampling, c)).collect();
        let scored =
            score_neuron(task.neurons[k], &concept_requests, &measured, &references, &spec.scoring);
        let outcome = NeuronOutcome {
            neuron: task.neurons[k],
            evidence: list,
            captions: &captions,
            labelling: l,
            scored: &scored,
            generated: &generated,
            generated_hashes: &generated_hashes,
            seeds: &seeds,
        };
        rows.neuron(&mut tables, &outcome);
    }
    progress.advance_stage(Stage::Score, n);
    Ok(tables)
}

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
use rayon::prelude::*;

use dnd_core::screening::rank_survivors_first;
use dnd_core::{CandidateScore, LayerName, NeuronId, Scored, Stage, TaskId, unit_seed};
use dnd_models::ImageRequest;
use dnd_store::Location;
use dnd_store::results::NeuronErrorRow;

use crate::error::PipelineError;
use crate::images::{ImageLimits, ImageRef, load_batch};
use crate::job::JobSpec;
use crate::progress::Progress;
use crate::stages::caption::Captions;
use crate::stages::caption::caption_top_images;
use crate::stages::crop::{CropInputs, Evidence, neuron_crops};
use crate::stages::generate::{ImageCounts, ImageRequests, uniform_counts};
use crate::stages::score::{Measurements, measure, score_neuron};
use crate::stages::summarize::{Labelling, label_neuron};
pub use crate::task_rows::TaskTables;
use crate::task_rows::{NeuronOutcome, RowMaker};
use crate::units::Readout;
use crate::workbench::{GeneratedEntry, Workbench, image_hash};

/// A batch of neurons (units) of one layer: the unit of work, of retries and of commits.
#[derive(Debug, Clone, PartialEq)]
pub struct NeuronTask {
    /// `<layer>-<5-digit index>`, unique in the job.
    pub id: TaskId,
    pub layer: LayerName,
    /// What the neuron ids index: the layer's channels or its dictionary's units.
    pub readout: Readout,
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
    let rows = RowMaker {
        layer: &task.layer,
        unit_kind: task.readout.kind(),
        unit_source: task.readout.source(),
        task: &task.id,
        spec,
        bench,
    };

    // Stage 1: the originals, and attention crops of them (spatial layers only).
    let originals =
        read_originals(top, images, &spec.probe.limits, &task.neurons, &rows, &mut tables.errors)
            .await;
    let mut evidence = original_evidence(top, images, &originals);
    if task.readout.tap.is_spatial() {
        let crops = neuron_crops(&CropInputs {
            model: &bench.target,
            readout: &task.readout,
            neurons: &task.neurons,
            top,
            images,
            originals: &originals,
            config: &spec.crops,
            pooling: spec.probe.pooling,
            batch_size: spec.describe.batch_size,
            job,
            vectors: bench.target_vectors(),
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
    for (list, &neuron) in evidence.iter().zip(&task.neurons) {
        let texts = captions.texts(list.iter().take(top_n));
        let seed = unit_seed(spec.seed, &task.layer, neuron);
        labelling.push(label_neuron(&summarizer, &texts, seed, spec.summarizer.rounds).await);
    }
    progress.advance_stage(Stage::Summarize, n);

    // Stage 3: generated images for every candidate of every neuron, then the scores;
    // with screening, a first round of images decides which candidates get the rest.
    let sampling = &spec.generator.sampling;
    let top_hashes: Vec<Vec<&str>> = evidence
        .iter()
        .map(|list| list.iter().take(top_n).map(|e| e.hash.as_str()).collect())
        .collect();
    let stage3 = Stage3 {
        bench,
        spec,
        task,
        captions: &captions,
        labelling: &labelling,
        top_hashes: &top_hashes,
    };
    let mut made = HashMap::new();
    let (counts, survivors) = stage3.image_counts(&mut made).await?;
    let Round { requests, generated, hashes, measured } =
        stage3.generate_and_measure(&counts, &mut made).await?;
    progress.advance_stage(Stage::Generate, n);
    let concept_requests = requests.per_candidate(&labelling, &counts, sampling);
    let seeds: Vec<u64> = requests.requests.iter().map(|r| r.seed).collect();
    for (k, (list, l)) in evidence.iter().zip(&labelling).enumerate() {
        let references = measured.references(top_hashes[k].iter().copied());
        let mut scored = score_neuron(
            task.readout.column(task.neurons[k]),
            &concept_requests[k],
            &measured,
            &references,
            &spec.scoring,
        );
        if let Some(survivors) = &survivors {
            rank_survivors_first(&mut scored.candidates, &survivors[k]);
        }
        let outcome = NeuronOutcome {
            neuron: task.neurons[k],
            evidence: list,
            captions: &captions,
            labelling: l,
            scored: &scored,
            generated: &generated,
            generated_hashes: &hashes,
            seeds: &seeds,
        };
        rows.neuron(&mut tables, &outcome);
    }
    progress.advance_stage(Stage::Score, n);
    Ok(tables)
}

/// A round of stage 3: the images it asked for and what the models measured on them.
struct Round {
    requests: ImageRequests,
    generated: Vec<GeneratedEntry>,
    /// Each generated image's [`image_hash`].
    hashes: Vec<String>,
    measured: Measurements,
}

/// What stage 3 works from.
struct Stage3<'a> {
    bench: &'a Workbench,
    spec: &'a JobSpec,
    task: &'a NeuronTask,
    captions: &'a Captions,
    labelling: &'a [Labelling],
    /// Each neuron's top images (hashes), the references of the similarity weights.
    top_hashes: &'a [Vec<&'a str>],
}

impl Stage3<'_> {
    /// How many images each candidate gets: `images_per_concept`, or with screening, only
    /// the first round's for the candidates it drops; and, with screening, each neuron's
    /// survivors. The first round's images are kept in `made`.
    async fn image_counts(
        &self,
        made: &mut HashMap<(String, u64), GeneratedEntry>,
    ) -> Result<(ImageCounts, Option<Vec<Vec<usize>>>), PipelineError> {
        let (spec, screening) = (self.spec, self.spec.generator.screening);
        let mut counts = uniform_counts(self.labelling, spec.generator.images_per_concept);
        if !screening.enabled() {
            return Ok((counts, None));
        }
        let first = uniform_counts(self.labelling, screening.first_images);
        let round = self.generate_and_measure(&first, made).await?;
        let kept = self
            .survivors(&round, &first, |scores| screening.survivors(scores, spec.scoring.labels));
        for (counts, kept) in counts.iter_mut().zip(&kept) {
            for (c, count) in counts.iter_mut().enumerate() {
                if !kept.contains(&c) {
                    *count = screening.first_images;
                }
            }
        }
        Ok((counts, Some(kept)))
    }

    /// Generates the images `counts` asks for that `made` lacks (adding them to it), then
    /// measures all of them.
    async fn generate_and_measure(
        &self,
        counts: &ImageCounts,
        made: &mut HashMap<(String, u64), GeneratedEntry>,
    ) -> Result<Round, PipelineError> {
        let (spec, bench) = (self.spec, self.bench);
        let requests =
            ImageRequests::new(self.labelling, counts, &spec.generator.sampling, spec.seed);
        let missing: Vec<ImageRequest> = requests
            .requests
            .iter()
            .filter(|r| !made.contains_key(&(r.prompt.clone(), r.seed)))
            .cloned()
            .collect();
        let fresh = bench.generated(&missing, spec.generator.batch_size).await?;
        for (r, entry) in missing.into_iter().zip(fresh) {
            made.insert((r.prompt, r.seed), entry);
        }
        let generated: Vec<GeneratedEntry> =
            requests.requests.iter().map(|r| made[&(r.prompt.clone(), r.seed)].clone()).collect();
        let images: Vec<Arc<RgbImage>> = generated.iter().map(|g| g.image.clone()).collect();
        let hashes: Vec<String> = images.par_iter().map(|i| image_hash(i)).collect();
        let measured = measure(
            bench,
            &self.task.readout,
            spec.probe.pooling,
            spec.describe.batch_size,
            &self.captions.distinct,
            (&images, &hashes),
        )
        .await?;
        Ok(Round { requests, generated, hashes, measured })
    }

    /// Each neuron's candidates that `keep` keeps from their scores on `round`'s images.
    fn survivors(
        &self,
        round: &Round,
        counts: &ImageCounts,
        keep: impl Fn(&[CandidateScore]) -> Vec<usize>,
    ) -> Vec<Vec<usize>> {
        let sampling = &self.spec.generator.sampling;
        let lists = round.requests.per_candidate(self.labelling, counts, sampling);
        lists
            .iter()
            .zip(&self.task.neurons)
            .zip(self.top_hashes)
            .map(|((lists, &neuron), hashes)| {
                let references = round.measured.references(hashes.iter().copied());
                let column = self.task.readout.column(neuron);
                let scored =
                    score_neuron(column, lists, &round.measured, &references, &self.spec.scoring);
                keep(&scored.candidates)
            })
            .collect()
    }
}

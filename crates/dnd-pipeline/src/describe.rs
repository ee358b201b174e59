//! Stages 1-3 for a task: a batch of neurons of one layer.
//!
//! Work is batched across the task's neurons at every stage: each distinct probe image is
//! read and run through the model once, each distinct image captioned once, each distinct
//! (prompt, seed) generated once, and all of it goes through the caches. Per neuron, only
//! the summariser's rounds run one after another.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use candle_core::{Device, Tensor};
use image::RgbImage;
use rayon::prelude::*;

use dnd_core::scoring::{GeneratedImage, mean_cosine, score_candidates};
use dnd_core::{BoundingBox, Map2, Pooling, Scored, plan_crops};
use dnd_models::preprocess::{normalized_batch, resize_rgb};
use dnd_models::{ImageRequest, Tap, TargetModel};
use dnd_store::Location;
use dnd_store::results::{
    CandidateRow, CaptionRow, DescriptionRow, ExchangeRow, ImageRow, NeuronErrorRow, ScoreRow,
};
use dnd_summarize::{Answer, Exchange, simplify_captions, summarize_rounds};

use crate::error::PipelineError;
use crate::images::ImageRef;
use crate::job::JobSpec;
use crate::probe::{load_batch, pool};
use crate::progress::Progress;
use crate::workbench::{Workbench, encode_png, image_hash};

/// The stages a task reports progress for, in order; each advances by the task's neurons.
pub const DESCRIBE_STAGES: [&str; 5] = ["crop", "caption", "summarize", "generate", "score"];

/// A batch of neurons of one layer: the unit of work, of retries and of commits.
#[derive(Debug, Clone, PartialEq)]
pub struct NeuronTask {
    /// `<layer>-<5-digit index>`, unique in the job.
    pub id: String,
    pub layer: String,
    pub tap: Tap,
    pub neurons: Vec<usize>,
}

/// Every row a task produces, one vector per results table.
#[derive(Debug, Default)]
pub struct TaskTables {
    pub descriptions: Vec<DescriptionRow>,
    pub candidates: Vec<CandidateRow>,
    pub scores: Vec<ScoreRow>,
    pub captions: Vec<CaptionRow>,
    pub images: Vec<ImageRow>,
    pub exchanges: Vec<ExchangeRow>,
    pub errors: Vec<NeuronErrorRow>,
}

/// An original probe image or an attention crop of one, in a neuron's evidence.
#[derive(Clone)]
struct Evidence {
    image_id: String,
    crop: Option<(usize, BoundingBox)>,
    activation: f32,
    image: Arc<RgbImage>,
    hash: String,
    uri: String,
}

/// What stage 2 made of one neuron.
#[derive(Default)]
struct Labelling {
    exchanges: Vec<Exchange>,
    /// Simplified label of each top image's caption, in top-image order.
    simplified: Vec<Option<String>>,
    candidates: Vec<String>,
    failure: Option<String>,
}

/// Pooled activations `(images, channels)` of `images` at `tap`, through the model's own
/// preprocessing, in batches.
pub fn pooled_activations(
    model: &TargetModel,
    images: &[Arc<RgbImage>],
    tap: Tap,
    pooling: Pooling,
    batch_size: usize,
) -> Result<Vec<Vec<f32>>, PipelineError> {
    let mut rows = Vec::with_capacity(images.len());
    for chunk in images.chunks(batch_size.max(1)) {
        let transformed: Vec<RgbImage> =
            chunk.par_iter().map(|i| model.preprocess.transform(i)).collect();
        let x = normalized_batch(
            &transformed,
            model.preprocess.mean,
            model.preprocess.std,
            &model.device,
        )?;
        let out = model.forward_taps(&x, &[tap])?.remove(0);
        rows.extend(pool(&out, pooling)?.to_device(&Device::Cpu)?.to_vec2::<f32>()?);
    }
    Ok(rows)
}

/// Channel maps `(images, channels, h, w)` of `canvases` at `tap`, on the host.
fn spatial_maps(
    model: &TargetModel,
    canvases: &[RgbImage],
    tap: Tap,
    batch_size: usize,
) -> Result<Vec<Tensor>, PipelineError> {
    let mut maps = Vec::new();
    for chunk in canvases.chunks(batch_size.max(1)) {
        let x =
            normalized_batch(chunk, model.preprocess.mean, model.preprocess.std, &model.device)?;
        let out = model.forward_taps(&x, &[tap])?.remove(0).to_device(&Device::Cpu)?;
        for b in 0..chunk.len() {
            maps.push(out.get(b)?);
        }
    }
    Ok(maps)
}

/// Where a crop's PNG is kept in the job directory, by the hash of its pixels.
fn crop_path(hash: &str) -> String {
    format!("images/crops/{}/{hash}.png", &hash[..2])
}

/// Cuts each box out of the canvas and resizes it back to the canvas size (stage 1.5).
pub(crate) fn cut_crops(canvas: &RgbImage, boxes: &[BoundingBox]) -> Vec<RgbImage> {
    let (side_w, side_h) = canvas.dimensions();
    boxes
        .iter()
        .map(|b| {
            resize_rgb(
                &image::imageops::crop_imm(canvas, b.x0, b.y0, b.width(), b.height()).to_image(),
                side_w,
                side_h,
            )
        })
        .collect()
}

fn exchange_row(layer: &str, neuron: usize, seq: usize, e: &Exchange) -> ExchangeRow {
    let (answer, error) = match &e.answer {
        Ok(Answer::Label(l)) => (Some(l.clone()), None),
        Ok(Answer::Several(items)) => (Some(items.join("; ")), None),
        Err(err) => (None, Some(err.to_string())),
    };
    ExchangeRow {
        layer: layer.into(),
        neuron: neuron as i32,
        seq: seq as i32,
        step: serde_json::to_value(e.step)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default(),
        backend: e.backend.clone(),
        model: e.model.clone(),
        prompt_version: e.prompt_version.clone(),
        request: e.request.clone(),
        reply: e.reply.clone(),
        answer,
        error,
        cached: e.cached,
    }
}

/// Runs stages 1-3 for the task's neurons. `top` holds each neuron's probe top-K (indices
/// into `images`), in the task's neuron order. Crop images are stored under
/// `job/images/crops/`. A neuron whose stage fails gets an error row and a `failed`
/// description; only failures that hit every neuron (a model or store error) fail the task.
#[allow(clippy::too_many_arguments)]
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
    let layer = task.layer.as_str();
    let n = task.neurons.len();
    let model = bench.target.clone();
    let neuron_error =
        |neuron: usize, stage: &str, image_id: Option<String>, reason: &str, message: String| {
            NeuronErrorRow {
                layer: layer.into(),
                neuron: neuron as i32,
                stage: stage.into(),
                image_id,
                reason: reason.into(),
                message,
                task: task.id.clone(),
            }
        };

    // Originals: every distinct top image of the task, read once.
    let wanted: Vec<u32> = {
        let mut w: Vec<u32> = top.iter().flatten().map(|s| s.image).collect();
        w.sort_unstable();
        w.dedup();
        w
    };
    let refs: Vec<ImageRef> = wanted.iter().map(|&i| images[i as usize].clone()).collect();
    let mut originals: HashMap<u32, Arc<RgbImage>> = HashMap::new();
    for (pos, (_, loaded)) in
        load_batch(&refs, 0, &spec.probe.limits, "read").await.into_iter().enumerate()
    {
        match loaded {
            Ok(img) => {
                originals.insert(wanted[pos], Arc::new(img));
            }
            Err(row) => {
                for (k, list) in top.iter().enumerate() {
                    if list.iter().any(|s| s.image == wanted[pos]) {
                        tables.errors.push(neuron_error(
                            task.neurons[k],
                            "read",
                            Some(row.image_id.clone()),
                            &row.reason,
                            row.message.clone(),
                        ));
                    }
                }
            }
        }
    }
    let mut evidence: Vec<Vec<Evidence>> = top
        .iter()
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
        .collect();

    // Stage 1: attention crops (spatial layers only).
    if task.tap.is_spatial() {
        let side = spec.crops.canvas_size;
        let order: Vec<u32> = originals
            .keys()
            .copied()
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let canvases: Vec<RgbImage> =
            order.par_iter().map(|i| resize_rgb(&originals[i], side, side)).collect();
        let maps = {
            let (model, tap, batch, canvases) =
                (model.clone(), task.tap, spec.describe.batch_size, canvases.clone());
            tokio::task::spawn_blocking(move || spatial_maps(&model, &canvases, tap, batch))
                .await??
        };
        let slot: HashMap<u32, usize> =
            order.iter().enumerate().map(|(i, &img)| (img, i)).collect();
        let mut crops: Vec<(usize, Evidence)> = Vec::new();
        for (k, list) in top.iter().enumerate() {
            let neuron = task.neurons[k];
            for s in list {
                let Some(&i) = slot.get(&s.image) else { continue };
                let map = maps[i].get(neuron)?;
                let (h, w) = map.dims2()?;
                let map = Map2 { width: w, height: h, data: map.flatten_all()?.to_vec1::<f32>()? };
                let plan = plan_crops(&map, &spec.crops);
                for (c, (b, img)) in
                    plan.crops.iter().zip(cut_crops(&canvases[i], &plan.crops)).enumerate()
                {
                    let hash = image_hash(&img);
                    let rel = crop_path(&hash);
                    crops.push((
                        k,
                        Evidence {
                            image_id: images[s.image as usize].id.clone(),
                            crop: Some((c, *b)),
                            activation: 0.0,
                            image: Arc::new(img),
                            hash,
                            uri: job.display_path(&rel),
                        },
                    ));
                }
            }
        }
        // Their own activations, for re-ranking with the originals.
        let crop_images: Vec<Arc<RgbImage>> = crops.iter().map(|(_, e)| e.image.clone()).collect();
        let pooled = {
            let (model, tap, pooling, batch) =
                (model.clone(), task.tap, spec.probe.pooling, spec.describe.batch_size);
            tokio::task::spawn_blocking(move || {
                pooled_activations(&model, &crop_images, tap, pooling, batch)
            })
            .await??
        };
        for ((k, mut e), row) in crops.into_iter().zip(pooled) {
            e.activation = row[task.neurons[k]];
            job.put_if_absent(&crop_path(&e.hash), encode_png(&e.image)).await?;
            evidence[k].push(e);
        }
    }
    for list in &mut evidence {
        // Descending activation; the sort is stable, so originals stay ahead of their equal crops.
        list.sort_by(|a, b| b.activation.total_cmp(&a.activation));
    }
    progress.advance_stage("crop", n as u64);

    // Stage 2: captions of every neuron's top images, each distinct image once.
    let top_n = spec.describe.top_images;
    let mut distinct: BTreeMap<String, Arc<RgbImage>> = BTreeMap::new();
    for list in &evidence {
        for e in list.iter().take(top_n) {
            distinct.entry(e.hash.clone()).or_insert_with(|| e.image.clone());
        }
    }
    let distinct: Vec<(String, Arc<RgbImage>)> = distinct.into_iter().collect();
    let captioned = bench.captions(&distinct, spec.captioner.batch_size).await?;
    let caption_of: HashMap<&str, &(String, bool)> =
        distinct.iter().map(|(h, _)| h.as_str()).zip(&captioned).collect();
    progress.advance_stage("caption", n as u64);

    // Stage 2: labels and candidates, neuron by neuron.
    let summarizer = bench.cached_summarizer();
    let mut labelling: Vec<Labelling> = Vec::with_capacity(n);
    for list in &evidence {
        let captions: Vec<String> =
            list.iter().take(top_n).map(|e| caption_of[e.hash.as_str()].0.clone()).collect();
        let mut out = Labelling::default();
        match simplify_captions(&summarizer, &captions).await {
            Ok(simplified) => {
                // Map labels back to captions: an exchange per caption, plus merges.
                out.simplified = per_caption_labels(&simplified.exchanges, captions.len());
                out.exchanges = simplified.exchanges;
                if !simplified.labels.is_empty() {
                    match summarize_rounds(
                        &summarizer,
                        &simplified.labels,
                        spec.seed,
                        spec.summarizer.rounds,
                    )
                    .await
                    {
                        Ok(rounds) => {
                            out.exchanges.extend(rounds.exchanges);
                            out.candidates = rounds.labels;
                        }
                        Err(e) => out.failure = Some(e.to_string()),
                    }
                }
            }
            Err(e) => out.failure = Some(e.to_string()),
        }
        labelling.push(out);
    }
    progress.advance_stage("summarize", n as u64);

    // Stage 3: generated images for every candidate of every neuron, each distinct
    // (prompt, seed) once.
    let q = spec.generator.images_per_concept;
    let mut requests: Vec<ImageRequest> = Vec::new();
    let mut request_index: HashMap<(String, u64), usize> = HashMap::new();
    for l in &labelling {
        for concept in &l.candidates {
            let prompt = spec.generator.sampling.prompt(concept);
            for i in 0..q as u64 {
                let seed = spec.seed.wrapping_add(i);
                request_index.entry((prompt.clone(), seed)).or_insert_with(|| {
                    requests.push(ImageRequest { prompt: prompt.clone(), seed });
                    requests.len() - 1
                });
            }
        }
    }
    let generated = bench.generated(&requests, spec.generator.batch_size).await?;
    progress.advance_stage("generate", n as u64);

    // Stage 3: the neuron's activation on every generated image and their similarity to
    // its top images.
    let generated_images: Vec<Arc<RgbImage>> = generated.iter().map(|g| g.image.clone()).collect();
    let activations = {
        let (model, tap, pooling, batch, imgs) = (
            model.clone(),
            task.tap,
            spec.probe.pooling,
            spec.describe.batch_size,
            generated_images.clone(),
        );
        tokio::task::spawn_blocking(move || pooled_activations(&model, &imgs, tap, pooling, batch))
            .await??
    };
    let embed = |imgs: Vec<Arc<RgbImage>>| {
        let embedder = bench.embedder.model.clone();
        let batch = spec.describe.batch_size;
        tokio::task::spawn_blocking(move || -> Result<(Vec<f32>, usize), PipelineError> {
            let mut rows = Vec::new();
            let mut dim = 0;
            for chunk in imgs.chunks(batch.max(1)) {
                let owned: Vec<RgbImage> = chunk.iter().map(|i| (**i).clone()).collect();
                let e = embedder.embed_images(&owned)?.to_device(&Device::Cpu)?;
                dim = e.dim(1)?;
                rows.extend(e.flatten_all()?.to_vec1::<f32>()?);
            }
            Ok((rows, dim))
        })
    };
    let (top_embeddings, dim) = embed(distinct.iter().map(|(_, i)| i.clone()).collect()).await??;
    let (generated_embeddings, _) = embed(generated_images).await??;
    let embedding_of: HashMap<&str, &[f32]> = distinct
        .iter()
        .enumerate()
        .map(|(i, (h, _))| (h.as_str(), &top_embeddings[i * dim..(i + 1) * dim]))
        .collect();
    let generated_hashes: Vec<String> = generated.iter().map(|g| image_hash(&g.image)).collect();

    for (k, (list, l)) in evidence.iter().zip(&labelling).enumerate() {
        let neuron = task.neurons[k];
        let top_list: Vec<&Evidence> = list.iter().take(top_n).collect();
        for (rank, e) in list.iter().enumerate() {
            let (crop_index, b) = match e.crop {
                Some((c, b)) => (Some(c as i32), Some(b)),
                None => (None, None),
            };
            tables.images.push(ImageRow {
                layer: layer.into(),
                neuron: neuron as i32,
                kind: if e.crop.is_some() { "crop" } else { "original" }.into(),
                rank: rank as i32,
                activation: e.activation,
                top: rank < top_n,
                image_id: Some(e.image_id.clone()),
                crop_index,
                canvas_size: b.map(|_| spec.crops.canvas_size as i32),
                x0: b.map(|b| b.x0 as i32),
                y0: b.map(|b| b.y0 as i32),
                x1: b.map(|b| b.x1 as i32),
                y1: b.map(|b| b.y1 as i32),
                candidate: None,
                concept: None,
                seed: None,
                similarity: None,
                uri: e.uri.clone(),
                image_hash: e.hash.clone(),
                cached: false,
            });
        }
        for (rank, e) in top_list.iter().enumerate() {
            let (caption, cached) = caption_of[e.hash.as_str()];
            tables.captions.push(CaptionRow {
                layer: layer.into(),
                neuron: neuron as i32,
                image_rank: rank as i32,
                image_hash: e.hash.clone(),
                caption: caption.clone(),
                simplified: l.simplified.get(rank).cloned().flatten(),
                captioner: bench.captioner.identity.clone(),
                cached: *cached,
            });
        }
        for (seq, e) in l.exchanges.iter().enumerate() {
            tables.exchanges.push(exchange_row(layer, neuron, seq, e));
        }
        if let Some(failure) = &l.failure {
            tables.errors.push(neuron_error(
                neuron,
                "summarize",
                None,
                "summarizer_failed",
                failure.clone(),
            ));
        }

        // Score this neuron's candidates.
        let references: Vec<f32> =
            top_list.iter().flat_map(|e| embedding_of[e.hash.as_str()].iter().copied()).collect();
        let mut scored_images = Vec::new();
        let mut image_requests = Vec::new();
        for (c, concept) in l.candidates.iter().enumerate() {
            let prompt = spec.generator.sampling.prompt(concept);
            for i in 0..q as u64 {
                let r = request_index[&(prompt.clone(), spec.seed.wrapping_add(i))];
                let sim =
                    mean_cosine(&generated_embeddings[r * dim..(r + 1) * dim], &references, dim)[0];
                scored_images.push(GeneratedImage {
                    candidate: c,
                    activation: activations[r][neuron],
                    similarity: sim,
                });
                image_requests.push(r);
            }
        }
        let scores = score_candidates(l.candidates.len(), &scored_images, &spec.scoring);
        let positions = dnd_core::scoring::image_positions(&scored_images);
        for (j, (img, &r)) in scored_images.iter().zip(&image_requests).enumerate() {
            let key = &generated[r].key;
            tables.images.push(ImageRow {
                layer: layer.into(),
                neuron: neuron as i32,
                kind: "generated".into(),
                rank: positions[j] as i32,
                activation: img.activation,
                top: positions[j] < spec.scoring.similarity_top,
                image_id: None,
                crop_index: None,
                canvas_size: None,
                x0: None,
                y0: None,
                x1: None,
                y1: None,
                candidate: Some(img.candidate as i32),
                concept: Some(l.candidates[img.candidate].clone()),
                seed: Some(requests[r].seed as i64),
                similarity: Some(img.similarity),
                uri: bench.cache.display_path(&key),
                image_hash: generated_hashes[r].clone(),
                cached: generated[r].cached,
            });
        }
        let rank_score = serde_json::to_value(spec.scoring.rank_score)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default();
        for s in &scores {
            let concept = l.candidates[s.candidate].clone();
            tables.candidates.push(CandidateRow {
                layer: layer.into(),
                neuron: neuron as i32,
                candidate: s.candidate as i32,
                prompt: spec.generator.sampling.prompt(&concept),
                concept: concept.clone(),
                images: s.positions.len() as i32,
                final_rank: s.final_rank as i32,
                selected: s.final_rank < spec.scoring.labels,
            });
            tables.scores.push(ScoreRow {
                layer: layer.into(),
                neuron: neuron as i32,
                candidate: s.candidate as i32,
                concept,
                topk_sq_mean: s.topk_sq_mean,
                mean: s.mean,
                median: s.median,
                sq_mean: s.sq_mean,
                rank_score: rank_score.clone(),
                rank_order: s.rank_order as i32,
                similarity: s.similarity,
                final_score: s.final_score,
                final_rank: s.final_rank as i32,
            });
        }
        let mut ranked: Vec<_> = scores.iter().collect();
        ranked.sort_by_key(|s| s.final_rank);
        let label = |i: usize| {
            ranked
                .get(i)
                .filter(|_| i < spec.scoring.labels)
                .map(|s| (l.candidates[s.candidate].clone(), s.final_score))
        };
        let status = if l.failure.is_some() {
            "failed"
        } else if l.candidates.is_empty() {
            "no_candidates"
        } else {
            "ok"
        };
        let count = |it: &mut dyn Iterator<Item = bool>| {
            it.fold((0, 0), |(c, t), cached| (c + i32::from(cached), t + 1))
        };
        let (captions_cached, captions_total) =
            count(&mut top_list.iter().map(|e| caption_of[e.hash.as_str()].1));
        let (replies_cached, replies_total) = count(&mut l.exchanges.iter().map(|e| e.cached));
        let (images_cached, images_total) =
            count(&mut image_requests.iter().map(|&r| generated[r].cached));
        tables.descriptions.push(DescriptionRow {
            layer: layer.into(),
            neuron: neuron as i32,
            status: status.into(),
            label: label(0).map(|x| x.0),
            score: label(0).map(|x| x.1),
            label_2: label(1).map(|x| x.0),
            score_2: label(1).map(|x| x.1),
            label_3: label(2).map(|x| x.0),
            score_3: label(2).map(|x| x.1),
            candidates: l.candidates.len() as i32,
            top_images: top_list.len() as i32,
            captions_cached,
            captions_total,
            replies_cached,
            replies_total,
            images_cached,
            images_total,
            error: l.failure.clone(),
            task: task.id.clone(),
        });
    }
    progress.advance_stage("score", n as u64);
    Ok(tables)
}

/// The label each caption got: the simplify exchange's label, or the merge that followed
/// a listing reply. `simplify_captions` asks once per caption, in order.
fn per_caption_labels(exchanges: &[Exchange], captions: usize) -> Vec<Option<String>> {
    use dnd_summarize::Step;
    let mut labels: Vec<Option<String>> = Vec::with_capacity(captions);
    for e in exchanges {
        match e.step {
            Step::Simplify => labels.push(e.label().map(String::from)),
            Step::Merge => {
                if let Some(last) = labels.last_mut() {
                    *last = e.label().map(String::from);
                }
            }
            Step::Summarize => {}
        }
    }
    labels.resize(captions, None);
    labels
}

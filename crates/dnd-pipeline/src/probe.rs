//! Stage 0: pooled activations of every probe image, streamed into per-neuron top-K lists;
//! then, optionally, stage 1 (attention crops) for the top images. A layer described by a
//! dictionary gets its units' top-K lists (all units of the layer from one matrix product
//! per batch) and, per unit, how often it fired (`units/<layer>.parquet`).

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use candle_core::Tensor;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use dnd_core::{CropConfig, Firing, LayerName, LayerTopK, Liveness, NeuronId, NeuronSet, Pooling};
use dnd_models::target::TargetShape;
use dnd_models::{Tap, TargetModel};
use dnd_store::tables::{self, ErrorRow, TopKRow, UnitRow};
use dnd_store::{Location, ParquetSink, write_parquet};

use crate::activations::{pooled_output, pooled_rows};
use crate::error::PipelineError;
use crate::images::{ImageLimits, ProbeImages, load_batch};
use crate::progress::Progress;
use crate::stages::crop::{CropLayer, CropReport, write_probe_crops};
use crate::units::{Readout, UnitLayers};
use crate::vector_cache::VectorCache;
use crate::workbench::image_hash;

/// What the probe stage computes; defaults are the method's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeConfig {
    /// Taps to record, e.g. `layer3`, `layer4`, `fc` (ResNet) or `blocks.11`,
    /// `blocks.11.mlp`, `norm`, `head` (ViT).
    pub layers: Vec<String>,
    /// Images kept per neuron.
    pub top_k: usize,
    pub pooling: Pooling,
    /// Images per forward pass.
    pub batch_size: usize,
    /// Also write every pooled activation (large: images x neurons floats per layer).
    pub write_activations: bool,
    /// Attention crops of the top images (spatial layers only), when set.
    pub crops: Option<CropStageConfig>,
    pub limits: ImageLimits,
    /// Dead and dense SAE latents: the statuses of `units/<layer>.parquet`.
    #[serde(default, skip_serializing_if = "Liveness::is_default")]
    pub liveness: Liveness,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        Self {
            layers: vec!["layer4".into()],
            top_k: 10,
            pooling: Pooling::Mean,
            batch_size: 16,
            write_activations: false,
            crops: None,
            limits: ImageLimits::default(),
            liveness: Liveness::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CropStageConfig {
    pub crop: CropConfig,
    /// Neurons to crop for (all neurons of each layer when `None`).
    pub neurons: Option<NeuronSet>,
}

/// A requested layer, checked against the model.
#[derive(Debug, Clone)]
pub struct LayerPlan {
    pub name: String,
    pub tap: Tap,
    /// Its channels; in a probe run, the units read (a dictionary's, where it has one).
    pub width: usize,
}

/// What a probe run did, also written as `probe.json` beside its outputs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProbeSummary {
    pub dnd_version: String,
    pub model: String,
    pub images_source: String,
    pub layers: Vec<LayerSummary>,
    pub config: ProbeConfig,
    pub images_listed: usize,
    pub images_ok: usize,
    pub images_failed: usize,
    pub files_ignored: usize,
    pub crops_written: usize,
    /// Wall time of the probe forward passes (listing, reading, decoding included).
    pub probe_seconds: f64,
    pub images_per_second: f64,
    pub crop_seconds: f64,
    /// Peak resident memory of the process so far (Linux; 0 elsewhere).
    pub peak_rss_mib: f64,
    /// Files written, relative to the output location.
    pub outputs: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerSummary {
    pub name: String,
    pub neurons: usize,
    pub spatial: bool,
}

impl ProbeConfig {
    /// Checks the config against the model's shape before any work starts.
    pub fn plan(&self, model: &TargetShape) -> Result<Vec<LayerPlan>, PipelineError> {
        use dnd_core::CoreError;
        if self.layers.is_empty() {
            return Err(CoreError::invalid("layers", "name at least one layer, e.g. layer4").into());
        }
        if self.top_k == 0 {
            return Err(CoreError::invalid("top_k", "must be at least 1").into());
        }
        if self.batch_size == 0 {
            return Err(CoreError::invalid("batch_size", "must be at least 1").into());
        }
        if self.pooling == Pooling::Cls && !model.has_class_token() {
            return Err(CoreError::invalid(
                "pooling",
                format!(
                    "`cls` reads a vision transformer's class token, and {} has none; use mean or max",
                    model.reference
                ),
            )
            .into());
        }
        let mut plans: Vec<LayerPlan> = Vec::new();
        for name in &self.layers {
            let tap = model.tap(name)?;
            if plans.iter().any(|p| p.tap == tap) {
                continue;
            }
            plans.push(LayerPlan { name: tap.to_string(), tap, width: model.tap_width(tap) });
        }
        if let Some(crops) = &self.crops {
            crops.crop.validate()?;
            if let Some(set) = &crops.neurons {
                for p in plans.iter().filter(|p| p.tap.is_spatial()) {
                    set.check_within(&p.name, p.width)?;
                }
            }
        }
        Ok(plans)
    }
}

/// One decoded, preprocessed batch on its way to the model.
struct InputBatch {
    /// Indices into the probe set of the images that decoded.
    images: Vec<u32>,
    /// `images.len() x 3 x side x side`, channels first.
    pixels: Vec<f32>,
    /// Each image's [`image_hash`], the vector cache's key.
    hashes: Vec<String>,
    errors: Vec<ErrorRow>,
}

/// Peak resident set size of this process in MiB (VmHWM), 0 where unknown.
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
            line.split_whitespace().nth(1)?.parse::<f64>().ok()
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// Reads, decodes and preprocesses `images` in batches on a task of its own, sending
/// each batch to `tx`.
fn spawn_reader(
    images: &ProbeImages,
    config: &ProbeConfig,
    model: &TargetModel,
    tx: mpsc::Sender<InputBatch>,
) -> tokio::task::JoinHandle<()> {
    let images = images.images.clone();
    let limits = config.limits.clone();
    let preprocess = model.preprocess.clone();
    let batch_size = config.batch_size;
    tokio::spawn(async move {
        for (n, chunk) in images.chunks(batch_size).enumerate() {
            let loaded = load_batch(chunk, (n * batch_size) as u32, &limits, "decode").await;
            let preprocess = preprocess.clone();
            let batch = tokio::task::spawn_blocking(move || {
                let mut batch = InputBatch {
                    images: Vec::new(),
                    pixels: Vec::new(),
                    hashes: Vec::new(),
                    errors: Vec::new(),
                };
                type Prepared = Result<(Vec<f32>, String), ErrorRow>;
                let tensors: Vec<(u32, Prepared)> = loaded
                    .into_par_iter()
                    .map(|(i, r)| (i, r.map(|img| (preprocess.apply(&img), image_hash(&img)))))
                    .collect();
                for (i, r) in tensors {
                    match r {
                        Ok((px, hash)) => {
                            batch.images.push(i);
                            batch.pixels.extend(px);
                            batch.hashes.push(hash);
                        }
                        Err(e) => batch.errors.push(e),
                    }
                }
                batch
            })
            .await
            .expect("preprocessing does not panic");
            if tx.send(batch).await.is_err() {
                break;
            }
        }
    })
}

/// Writes each layer's top-K as `topk/<layer>.parquet`; the files written.
async fn write_topk(
    plans: &[LayerPlan],
    topk: &[LayerTopK],
    images: &ProbeImages,
    out: &Location,
) -> Result<Vec<String>, PipelineError> {
    let mut outputs = Vec::new();
    for (plan, layer_topk) in plans.iter().zip(topk) {
        let rows: Vec<TopKRow> = (0..plan.width)
            .flat_map(|neuron| {
                layer_topk
                    .neuron(neuron)
                    .sorted()
                    .into_iter()
                    .enumerate()
                    .map(move |(rank, s)| (neuron, rank, s))
            })
            .map(|(neuron, rank, s)| TopKRow {
                layer: LayerName::new(plan.name.as_str()),
                neuron: NeuronId::new(neuron as u32),
                rank: rank as i32,
                image_id: images.images[s.image as usize].id.clone(),
                activation: s.activation,
            })
            .collect();
        let rel = format!("topk/{}.parquet", plan.name);
        write_parquet(out, &rel, &tables::topk_batch(&rows)?).await?;
        outputs.push(rel);
    }
    Ok(outputs)
}

/// Stage 1 for the spatial layers of a probe run, when asked for.
#[allow(clippy::too_many_arguments)]
async fn probe_crops(
    model: &Arc<TargetModel>,
    images: &ProbeImages,
    (plans, readouts): (&[LayerPlan], &[Readout]),
    topk: &[LayerTopK],
    crop_stage: &CropStageConfig,
    config: &ProbeConfig,
    out: &Location,
    progress: &dyn Progress,
) -> Result<CropReport, PipelineError> {
    let spatial: Vec<CropLayer<'_>> = plans
        .iter()
        .zip(readouts)
        .zip(topk)
        .filter(|((p, _), _)| p.tap.is_spatial())
        .map(|((p, readout), topk)| CropLayer {
            name: &p.name,
            readout: readout.clone(),
            width: p.width,
            topk,
        })
        .collect();
    if spatial.is_empty() {
        return Ok(CropReport { crops: 0, errors: Vec::new(), outputs: Vec::new() });
    }
    let batching = (config.batch_size, &config.limits);
    write_probe_crops(
        model,
        &images.images,
        &spatial,
        crop_stage.neurons.as_ref(),
        &crop_stage.crop,
        batching,
        out,
        progress,
    )
    .await
}

/// What the vector cache calls a probe row of `readout`: the pooled activations, plus, for
/// a dictionary's units, each unit's share of positions above 0 (`2 x units` values).
fn probe_output(readout: &Readout, pooling: Pooling) -> String {
    match readout.units {
        None => pooled_output(readout, pooling),
        Some(_) => format!("{}/{pooling}", readout.output("probe")),
    }
}

/// Probe rows of a batch at every readout (`rows[readout][image]`, see [`probe_output`]):
/// from `vectors` where it has every readout of an image, the rest through the model, then
/// stored.
async fn batch_rows(
    model: &Arc<TargetModel>,
    readouts: &[Readout],
    pooling: Pooling,
    batch: InputBatch,
    vectors: Option<VectorCache<'_>>,
) -> Result<Vec<Vec<Vec<f32>>>, PipelineError> {
    let n = batch.images.len();
    let outputs: Vec<String> = readouts.iter().map(|r| probe_output(r, pooling)).collect();
    let mut rows: Vec<Vec<Option<Vec<f32>>>> = vec![vec![None; n]; readouts.len()];
    if let Some(vectors) = vectors {
        for (l, output) in outputs.iter().enumerate() {
            let keys: Vec<(&str, &str)> =
                batch.hashes.iter().map(|h| (output.as_str(), h.as_str())).collect();
            rows[l] = vectors.get_all(&keys).await?;
        }
    }
    let missing: Vec<usize> = (0..n).filter(|&i| rows.iter().any(|l| l[i].is_none())).collect();
    if !missing.is_empty() {
        let plane = batch.pixels.len() / n.max(1);
        let pixels: Vec<f32> = if missing.len() == n {
            batch.pixels
        } else {
            missing
                .iter()
                .flat_map(|&i| batch.pixels[i * plane..(i + 1) * plane].to_vec())
                .collect()
        };
        let (model, readouts, m) = (model.clone(), readouts.to_vec(), missing.len());
        let computed = tokio::task::spawn_blocking(move || -> Result<_, PipelineError> {
            let (width, height) = model.preprocess.output_size().ok_or_else(|| {
                PipelineError::Internal("the target model's preprocessing has no fixed size".into())
            })?;
            let shape = (m, 3, height as usize, width as usize);
            let x = Tensor::from_vec(pixels, shape, &model.device)?;
            pooled_rows(&model, &x, &readouts, pooling, true)
        })
        .await??;
        for (l, flat) in computed.into_iter().enumerate() {
            let width = flat.len() / m;
            for (j, &i) in missing.iter().enumerate() {
                rows[l][i] = Some(flat[j * width..(j + 1) * width].to_vec());
            }
            if let Some(vectors) = vectors {
                let items: Vec<(&str, &str, &[f32])> = missing
                    .iter()
                    .map(|&i| {
                        let row = rows[l][i].as_deref().expect("just computed");
                        (outputs[l].as_str(), batch.hashes[i].as_str(), row)
                    })
                    .collect();
                vectors.put_all(&items).await?;
            }
        }
    }
    Ok(rows.into_iter().map(|l| l.into_iter().map(|r| r.expect("every row")).collect()).collect())
}

/// What one pass over the probe images gathers: each layer's top-K, each dictionary
/// layer's firing counts, the images that failed, and the activation tables written.
struct Streamed {
    topk: Vec<LayerTopK>,
    firing: Vec<Option<Firing>>,
    errors: Vec<ErrorRow>,
    images_ok: usize,
    outputs: Vec<String>,
}

/// Streams `images` through the model once: reading and decoding run ahead of it, pooled
/// rows feed the top-K and, when asked, the activation tables under `out`.
async fn stream_images(
    model: &Arc<TargetModel>,
    images: &ProbeImages,
    config: &ProbeConfig,
    (plans, readouts): (&[LayerPlan], &[Readout]),
    vectors: Option<VectorCache<'_>>,
    out: &Location,
    progress: &dyn Progress,
) -> Result<Streamed, PipelineError> {
    let mut firing: Vec<Option<Firing>> = readouts
        .iter()
        .zip(plans)
        .map(|(r, p)| r.units.as_ref().map(|_| Firing::new(p.width)))
        .collect();
    let mut errors = images.errors.clone();
    let mut outputs = Vec::new();

    // Reading and decoding run ahead of the model by two batches.
    let (tx, mut rx) = mpsc::channel::<InputBatch>(2);
    let reader = spawn_reader(images, config, model, tx);

    let mut topk: Vec<LayerTopK> =
        plans.iter().map(|p| LayerTopK::new(p.width, config.top_k)).collect();
    let mut activation_sinks = Vec::new();
    if config.write_activations {
        for p in plans {
            let rel = format!("activations/{}/part-00000.parquet", p.name);
            activation_sinks.push(ParquetSink::create(
                out,
                &rel,
                tables::activations_schema(p.width),
            )?);
            outputs.push(rel);
        }
    }
    progress.begin("probe", images.images.len() as u64);
    let mut images_ok = 0;
    while let Some(mut batch) = rx.recv().await {
        progress.advance((batch.images.len() + batch.errors.len()) as u64);
        errors.extend(std::mem::take(&mut batch.errors));
        if batch.images.is_empty() {
            continue;
        }
        images_ok += batch.images.len();
        let ids = batch.images.clone();
        let rows = batch_rows(model, readouts, config.pooling, batch, vectors).await?;
        for (l, layer_rows) in rows.into_iter().enumerate() {
            let width = plans[l].width;
            let pooled: Vec<f32> = match &mut firing[l] {
                None => layer_rows.concat(),
                Some(firing) => {
                    let shares: Vec<f32> =
                        layer_rows.iter().flat_map(|r| r[width..].iter().copied()).collect();
                    firing.push_shares(&shares);
                    layer_rows.iter().flat_map(|r| r[..width].iter().copied()).collect()
                }
            };
            topk[l].push_batch(&ids, &pooled);
            if let Some(sink) = activation_sinks.get_mut(l) {
                let names: Vec<&str> =
                    ids.iter().map(|&i| images.images[i as usize].id.as_str()).collect();
                sink.write(&tables::activations_batch(&names, plans[l].width, pooled)?).await?;
            }
        }
    }
    reader.await?;
    for sink in activation_sinks {
        sink.close().await?;
    }
    progress.end();
    Ok(Streamed { topk, firing, errors, images_ok, outputs })
}

/// Runs the probe stage over `images` and writes its tables under `out`:
/// `topk/<layer>.parquet`, `errors.parquet`, optionally `activations/<layer>/part-*.parquet`
/// and `crops/<layer>.parquet`, and `probe.json`. With `vectors`, each image's pooled
/// activations come from the vector cache when it has them and go into it when not.
pub async fn run_probe(
    model: Arc<TargetModel>,
    images: ProbeImages,
    out: &Location,
    config: &ProbeConfig,
    units: &UnitLayers,
    vectors: Option<VectorCache<'_>>,
    progress: &dyn Progress,
) -> Result<ProbeSummary, PipelineError> {
    let mut plans = config.plan(&model.shape())?;
    let readouts: Vec<Readout> = plans.iter().map(|p| Readout::of(p.tap, units)).collect();
    for (plan, readout) in plans.iter_mut().zip(&readouts) {
        plan.width = readout.width(&model);
    }
    let started = Instant::now();
    let Streamed { topk, firing, mut errors, images_ok, mut outputs } =
        stream_images(&model, &images, config, (&plans, &readouts), vectors, out, progress).await?;
    let probe_seconds = started.elapsed().as_secs_f64();

    outputs.extend(write_topk(&plans, &topk, &images, out).await?);
    for ((plan, readout), firing) in plans.iter().zip(&readouts).zip(&firing) {
        if let Some(firing) = firing {
            let rel = format!("units/{}.parquet", plan.name);
            let rows = unit_rows(&plan.name, readout, firing, &config.liveness);
            write_parquet(out, &rel, &tables::units_batch(&rows)?).await?;
            outputs.push(rel);
        }
    }

    let images_failed = errors.len();
    let crop_started = Instant::now();
    let mut crops_written = 0;
    if let Some(crop_stage) = &config.crops {
        let report = probe_crops(
            &model,
            &images,
            (&plans, &readouts),
            &topk,
            crop_stage,
            config,
            out,
            progress,
        )
        .await?;
        crops_written = report.crops;
        errors.extend(report.errors);
        outputs.extend(report.outputs);
    }
    let crop_seconds = crop_started.elapsed().as_secs_f64();

    write_parquet(out, "errors.parquet", &tables::errors_batch(&errors)?).await?;
    outputs.push("errors.parquet".into());
    outputs.push("probe.json".into());

    let summary = ProbeSummary {
        dnd_version: env!("CARGO_PKG_VERSION").into(),
        model: model.reference.clone(),
        images_source: images.source.clone(),
        layers: plans
            .iter()
            .map(|p| LayerSummary {
                name: p.name.clone(),
                neurons: p.width,
                spatial: p.tap.is_spatial(),
            })
            .collect(),
        config: config.clone(),
        images_listed: images.images.len(),
        images_ok,
        images_failed,
        files_ignored: images.ignored_files,
        crops_written,
        probe_seconds,
        images_per_second: images_ok as f64 / probe_seconds.max(1e-9),
        crop_seconds,
        peak_rss_mib: peak_rss_mib(),
        outputs,
    };
    let json =
        serde_json::to_vec_pretty(&summary).map_err(|e| PipelineError::Internal(e.to_string()))?;
    out.put("probe.json", Bytes::from(json)).await?;
    Ok(summary)
}

/// The units table of a layer read through a dictionary: each unit's firing counts and
/// status. `firing` holds a probe slice's counts, or the sum of all slices'.
pub fn unit_rows(
    layer: &str,
    readout: &Readout,
    firing: &Firing,
    liveness: &Liveness,
) -> Vec<UnitRow> {
    let names = readout.units.as_ref().map(|u| u.info.names.as_slice()).unwrap_or_default();
    (0..firing.units())
        .map(|u| UnitRow {
            layer: LayerName::new(layer),
            neuron: NeuronId::new(u as u32),
            unit_kind: readout.kind(),
            unit_source: readout.source().map(String::from),
            name: names.get(u).cloned(),
            images: firing.images as i64,
            fired_images: firing.fired_images[u] as i64,
            position_share: firing.position_share[u],
            firing_rate: firing.rate(u),
            status: unit_status(readout.kind(), firing, u, liveness),
        })
        .collect()
}

/// SAE latents are classified; directions, signed, are always active.
pub fn unit_status(
    kind: dnd_core::UnitKind,
    firing: &Firing,
    u: usize,
    liveness: &Liveness,
) -> dnd_core::UnitStatus {
    match kind {
        dnd_core::UnitKind::Sae => firing.status(u, liveness),
        _ => dnd_core::UnitStatus::Active,
    }
}

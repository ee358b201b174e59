//! Stage 1: attention crops of each neuron's top images.
//!
//! Every distinct top image is read once, resized to the crop canvas and run through the
//! model once for all cropped layers; each neuron that has the image in its top-K then
//! gets its crops from its own channel of that pass.

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::Device;
use image::RgbImage;
use rayon::prelude::*;

use dnd_core::{CropConfig, LayerTopK, Map2, NeuronSet, plan_crops};
use dnd_models::preprocess::{normalized_batch, resize_rgb};
use dnd_models::{Tap, TargetModel};
use dnd_store::tables::{self, CropRow, ErrorRow};
use dnd_store::{Location, ParquetSink};

use crate::describe::cut_crops;
use crate::error::PipelineError;
use crate::images::ImageRef;
use crate::probe::{LayerPlan, ProbeConfig, load_batch};
use crate::progress::Progress;
use crate::workbench::encode_png;

pub(crate) struct CropReport {
    pub crops: usize,
    pub errors: Vec<ErrorRow>,
    pub outputs: Vec<String>,
}

/// A neuron that wants crops of one image.
#[derive(Debug, Clone, Copy)]
struct Need {
    layer: usize,
    neuron: usize,
    rank: usize,
    activation: f32,
}

/// The crops of one image for one neuron, as table rows.
fn crop_rows(
    canvas: &RgbImage,
    map: &Map2,
    need: &Need,
    layer: &str,
    image_id: &str,
    config: &CropConfig,
) -> Vec<CropRow> {
    let plan = plan_crops(map, config);
    let side = config.canvas_size;
    plan.crops
        .iter()
        .zip(cut_crops(canvas, &plan.crops))
        .enumerate()
        .map(|(i, (b, resized))| {
            let png = encode_png(&resized).to_vec();
            CropRow {
                layer: layer.to_string(),
                neuron: need.neuron as i32,
                rank: need.rank as i32,
                image_id: image_id.to_string(),
                image_activation: need.activation,
                crop_index: i as i32,
                canvas_size: side as i32,
                x0: b.x0 as i32,
                y0: b.y0 as i32,
                x1: b.x1 as i32,
                y1: b.y1 as i32,
                threshold: i32::from(plan.threshold.unwrap_or(0)),
                png,
            }
        })
        .collect()
}

#[allow(clippy::too_many_arguments)]
pub(crate) async fn run_crops(
    model: &Arc<TargetModel>,
    images: &[ImageRef],
    layers: &[(&LayerPlan, &LayerTopK)],
    neurons: Option<&NeuronSet>,
    crop: &CropConfig,
    config: &ProbeConfig,
    out: &Location,
    progress: &dyn Progress,
) -> Result<CropReport, PipelineError> {
    // image index -> the neurons whose top-K holds it
    let mut needs: BTreeMap<u32, Vec<Need>> = BTreeMap::new();
    for (l, (plan, topk)) in layers.iter().enumerate() {
        for neuron in 0..plan.width {
            if neurons.is_some_and(|s| !s.contains(neuron)) {
                continue;
            }
            for (rank, s) in topk.neuron(neuron).sorted().into_iter().enumerate() {
                needs.entry(s.image).or_default().push(Need {
                    layer: l,
                    neuron,
                    rank,
                    activation: s.activation,
                });
            }
        }
    }
    let taps: Vec<Tap> = layers.iter().map(|(p, _)| p.tap).collect();
    let mut sinks = Vec::new();
    let mut outputs = Vec::new();
    for (plan, _) in layers {
        let rel = format!("crops/{}.parquet", plan.name);
        sinks.push(ParquetSink::create(out, &rel, tables::crops_schema())?);
        outputs.push(rel);
    }
    let mut errors = Vec::new();
    let mut crops = 0;
    let side = crop.canvas_size;
    let order: Vec<u32> = needs.keys().copied().collect();
    progress.begin("crops", order.len() as u64);
    for chunk in order.chunks(config.batch_size) {
        let refs: Vec<ImageRef> = chunk.iter().map(|&i| images[i as usize].clone()).collect();
        let mut loaded = Vec::new();
        for (pos, (_, r)) in
            load_batch(&refs, 0, &config.limits, "crop").await.into_iter().enumerate()
        {
            match r {
                Ok(img) => loaded.push((chunk[pos], img)),
                Err(e) => errors.push(e),
            }
        }
        progress.advance(chunk.len() as u64);
        if loaded.is_empty() {
            continue;
        }
        let model = model.clone();
        let taps = taps.clone();
        let batch_needs: Vec<Vec<Need>> = loaded.iter().map(|(i, _)| needs[i].clone()).collect();
        let ids: Vec<String> = loaded.iter().map(|(i, _)| images[*i as usize].id.clone()).collect();
        let layer_names: Vec<String> = layers.iter().map(|(p, _)| p.name.clone()).collect();
        let crop = crop.clone();
        let rows: Vec<Vec<CropRow>> =
            tokio::task::spawn_blocking(move || -> Result<_, PipelineError> {
                let canvases: Vec<RgbImage> =
                    loaded.par_iter().map(|(_, img)| resize_rgb(img, side, side)).collect();
                let x = normalized_batch(
                    &canvases,
                    model.preprocess.mean,
                    model.preprocess.std,
                    &model.device,
                )?;
                let outs = model.forward_taps(&x, &taps)?;
                // (B, C, h, w) per layer, on the host
                let maps: Vec<(Vec<usize>, Vec<f32>)> = outs
                    .iter()
                    .map(|t| -> Result<_, PipelineError> {
                        Ok((
                            t.dims().to_vec(),
                            t.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?,
                        ))
                    })
                    .collect::<Result<_, _>>()?;
                let mut per_layer = vec![Vec::new(); taps.len()];
                let jobs: Vec<(usize, Need)> = batch_needs
                    .iter()
                    .enumerate()
                    .flat_map(|(b, ns)| ns.iter().map(move |n| (b, *n)))
                    .collect();
                let made: Vec<(usize, Vec<CropRow>)> = jobs
                    .par_iter()
                    .map(|&(b, need)| {
                        let (dims, data) = &maps[need.layer];
                        let (c, h, w) = (dims[1], dims[2], dims[3]);
                        let start = (b * c + need.neuron) * h * w;
                        let map =
                            Map2 { width: w, height: h, data: data[start..start + h * w].to_vec() };
                        (
                            need.layer,
                            crop_rows(
                                &canvases[b],
                                &map,
                                &need,
                                &layer_names[need.layer],
                                &ids[b],
                                &crop,
                            ),
                        )
                    })
                    .collect();
                for (layer, rows) in made {
                    per_layer[layer].extend(rows);
                }
                Ok(per_layer)
            })
            .await??;
        for (sink, rows) in sinks.iter_mut().zip(rows) {
            crops += rows.len();
            sink.write(&tables::crops_batch(&rows)?).await?;
        }
    }
    for sink in sinks {
        sink.close().await?;
    }
    progress.end();
    Ok(CropReport { crops, errors, outputs })
}

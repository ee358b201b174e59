//! Stage 1: attention crops of each neuron's top images. One stage for `dnd probe --crops`
//! (crops of every requested neuron, as a table) and for a neuron task of `dnd dissect`
//! (crops joining the neuron's evidence): both resize each distinct top image to the
//! crop canvas, run the model on the canvases once for all their neurons, and cut each
//! neuron's crops from its own map of that pass with [`crop_neuron`]: a channel's, or a
//! dictionary unit's (see [`Readout`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use candle_core::Device;
use image::RgbImage;
use rayon::prelude::*;

use dnd_core::{
    BoundingBox, CropConfig, CropPlan, LayerName, LayerTopK, Map2, NeuronId, NeuronSet, plan_crops,
};
use dnd_models::TargetModel;
use dnd_models::preprocess::{normalized_batch, resize_rgb};
use dnd_store::tables::{self, CropRow, ErrorRow};
use dnd_store::{Location, ParquetSink};

use crate::activations::pooled_activations_cached;
use crate::error::PipelineError;
use crate::images::{ImageLimits, ImageRef, load_batch};
use crate::progress::Progress;
use crate::units::Readout;
use crate::vector_cache::VectorCache;
use crate::workbench::{encode_png, image_hash};

/// An original probe image or an attention crop of one, in a neuron's evidence.
#[derive(Debug, Clone)]
pub struct Evidence {
    pub image_id: String,
    /// The crop's index among the image's crops for this neuron, and its box.
    pub crop: Option<(usize, BoundingBox)>,
    pub activation: f32,
    pub image: Arc<RgbImage>,
    pub hash: String,
    pub uri: String,
}

/// Channel maps of a batch of canvases at one tap, on the host: `(B, C, h, w)`, row-major.
pub struct ChannelMaps {
    channels: usize,
    height: usize,
    width: usize,
    data: Vec<f32>,
}

impl ChannelMaps {
    /// Channel `channel`'s map of canvas `image` of the batch.
    pub fn map(&self, image: usize, channel: usize) -> Map2 {
        let (h, w) = (self.height, self.width);
        let start = (image * self.channels + channel) * h * w;
        Map2 { width: w, height: h, data: self.data[start..start + h * w].to_vec() }
    }
}

/// Each image resized to the crop canvas (`side` x `side`).
pub fn canvases(images: &[&RgbImage], side: u32) -> Vec<RgbImage> {
    images.par_iter().map(|img| resize_rgb(img, side, side)).collect()
}

/// One forward pass of `canvases` (normalised, not resized again) at each readout's tap:
/// the maps of every unit, per readout.
pub fn canvas_maps(
    model: &TargetModel,
    canvases: &[RgbImage],
    readouts: &[Readout],
) -> Result<Vec<ChannelMaps>, PipelineError> {
    let x = normalized_batch(canvases, model.preprocess.mean, model.preprocess.std, &model.device)?;
    let taps: Vec<_> = readouts.iter().map(|r| r.tap).collect();
    model
        .forward_taps(&x, &taps)?
        .into_iter()
        .zip(readouts)
        .map(|(t, readout)| {
            let t = readout.apply(t)?;
            let (_, channels, height, width) = t.dims4()?;
            let data = t.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
            Ok(ChannelMaps { channels, height, width, data })
        })
        .collect()
}

/// Cuts each box out of the canvas and resizes it back to the canvas size.
pub fn cut_crops(canvas: &RgbImage, boxes: &[BoundingBox]) -> Vec<RgbImage> {
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

/// One neuron's crops of one canvas: the plan (boxes, threshold) and the cut images, in
/// the plan's order.
pub fn crop_neuron(
    canvas: &RgbImage,
    map: &Map2,
    config: &CropConfig,
) -> (CropPlan, Vec<RgbImage>) {
    let plan = plan_crops(map, config);
    let images = cut_crops(canvas, &plan.crops);
    (plan, images)
}

/// Where a crop's PNG is kept in the job directory, by the hash of its pixels.
pub fn crop_path(hash: &str) -> String {
    format!("images/crops/{}/{hash}.png", &hash[..2])
}

// ---------------------------------------------------------------------------------------
// In a neuron task
// ---------------------------------------------------------------------------------------

/// What stage 1 of a neuron task starts from.
pub struct CropInputs<'a> {
    pub model: &'a Arc<TargetModel>,
    pub readout: &'a Readout,
    pub neurons: &'a [NeuronId],
    /// Each neuron's probe top-K, as indices into `images`.
    pub top: &'a [Vec<dnd_core::Scored>],
    pub images: &'a [ImageRef],
    /// The distinct top images that could be read, by index into `images`.
    pub originals: &'a HashMap<u32, Arc<RgbImage>>,
    pub config: &'a CropConfig,
    pub pooling: dnd_core::Pooling,
    /// Images per forward pass.
    pub batch_size: usize,
    /// The job directory: crops are stored under `images/crops/`.
    pub job: &'a Location,
    /// Where the target's channel maps and pooled activations are cached.
    pub vectors: VectorCache<'a>,
}

/// What the vector cache calls a unit's map on the crop canvas: the map's width and
/// height, then its values.
fn map_output(readout: &Readout, side: u32, unit: usize) -> String {
    format!("{}/canvas-{side}/{unit}", readout.output("map"))
}

/// The map of every (canvas slot, channel) the task's neurons need, from the cache where
/// it has them; the canvases with a missing map go through the model once, in batches.
async fn neuron_maps(
    input: &CropInputs<'_>,
    order: &[u32],
    slot: &HashMap<u32, usize>,
    canvases: &[RgbImage],
) -> Result<HashMap<(usize, usize), Map2>, PipelineError> {
    let side = input.config.canvas_size;
    let hashes: Vec<String> =
        order.par_iter().map(|i| image_hash(input.originals[i].as_ref())).collect();
    let mut needs: BTreeSet<(usize, usize)> = BTreeSet::new();
    for (k, list) in input.top.iter().enumerate() {
        for s in list {
            if let Some(&i) = slot.get(&s.image) {
                needs.insert((i, input.readout.column(input.neurons[k])));
            }
        }
    }
    let outputs: Vec<String> =
        needs.iter().map(|&(_, channel)| map_output(input.readout, side, channel)).collect();
    let keys: Vec<(&str, &str)> =
        needs.iter().zip(&outputs).map(|(&(i, _), o)| (o.as_str(), hashes[i].as_str())).collect();
    let mut maps = HashMap::new();
    let mut missing: BTreeSet<usize> = BTreeSet::new();
    for (&(i, channel), found) in needs.iter().zip(input.vectors.get_all(&keys).await?) {
        match found {
            Some(v) if v.len() >= 2 => {
                let (width, height) = (v[0] as usize, v[1] as usize);
                maps.insert((i, channel), Map2 { width, height, data: v[2..].to_vec() });
            }
            _ => {
                missing.insert(i);
            }
        }
    }
    if missing.is_empty() {
        return Ok(maps);
    }
    let missing: Vec<usize> = missing.into_iter().collect();
    let computed: Vec<ChannelMaps> = {
        let (model, readout, batch) =
            (input.model.clone(), input.readout.clone(), input.batch_size.max(1));
        let chosen: Vec<RgbImage> = missing.iter().map(|&i| canvases[i].clone()).collect();
        tokio::task::spawn_blocking(move || -> Result<_, PipelineError> {
            let mut maps = Vec::new();
            for chunk in chosen.chunks(batch) {
                maps.extend(canvas_maps(&model, chunk, std::slice::from_ref(&readout))?);
            }
            Ok(maps)
        })
        .await??
    };
    let batch = input.batch_size.max(1);
    let mut stored: Vec<(String, usize, Vec<f32>)> = Vec::new();
    for (m, &i) in missing.iter().enumerate() {
        for &(_, channel) in needs.range((i, 0)..(i + 1, 0)) {
            let map = computed[m / batch].map(m % batch, channel);
            let mut vector = vec![map.width as f32, map.height as f32];
            vector.extend_from_slice(&map.data);
            stored.push((map_output(input.readout, side, channel), i, vector));
            maps.insert((i, channel), map);
        }
    }
    let items: Vec<(&str, &str, &[f32])> =
        stored.iter().map(|(o, i, v)| (o.as_str(), hashes[*i].as_str(), v.as_slice())).collect();
    input.vectors.put_all(&items).await?;
    Ok(maps)
}

/// The crops of every neuron of the task (spatial layers only), each with its own
/// activation, stored in the job directory; per neuron, in top-K order.
pub async fn neuron_crops(input: &CropInputs<'_>) -> Result<Vec<Vec<Evidence>>, PipelineError> {
    let mut per_neuron: Vec<Vec<Evidence>> = vec![Vec::new(); input.neurons.len()];
    let order: Vec<u32> =
        input.originals.keys().copied().collect::<BTreeSet<_>>().into_iter().collect();
    let side = input.config.canvas_size;
    let canvases = {
        let refs: Vec<&RgbImage> = order.iter().map(|i| input.originals[i].as_ref()).collect();
        canvases(&refs, side)
    };
    let slot: HashMap<u32, usize> = order.iter().enumerate().map(|(i, &img)| (img, i)).collect();
    let maps = neuron_maps(input, &order, &slot, &canvases).await?;
    let mut crops: Vec<(usize, Evidence)> = Vec::new();
    for (k, list) in input.top.iter().enumerate() {
        let neuron = input.readout.column(input.neurons[k]);
        for s in list {
            let Some(&i) = slot.get(&s.image) else { continue };
            let map = &maps[&(i, neuron)];
            let (plan, cut) = crop_neuron(&canvases[i], map, input.config);
            for (c, (b, img)) in plan.crops.iter().zip(cut).enumerate() {
                let hash = image_hash(&img);
                let uri = input.job.display_path(&crop_path(&hash));
                crops.push((
                    k,
                    Evidence {
                        image_id: input.images[s.image as usize].id.clone(),
                        crop: Some((c, *b)),
                        activation: 0.0,
                        image: Arc::new(img),
                        hash,
                        uri,
                    },
                ));
            }
        }
    }
    // Their own activations, for re-ranking with the originals.
    let crop_images: Vec<Arc<RgbImage>> = crops.iter().map(|(_, e)| e.image.clone()).collect();
    let crop_hashes: Vec<String> = crops.iter().map(|(_, e)| e.hash.clone()).collect();
    let pooled = pooled_activations_cached(
        input.vectors,
        input.model,
        (&crop_images, &crop_hashes),
        input.readout,
        input.pooling,
        input.batch_size,
    )
    .await?;
    for ((k, mut e), row) in crops.into_iter().zip(pooled) {
        e.activation = row[input.readout.column(input.neurons[k])];
        input.job.put_if_absent(&crop_path(&e.hash), encode_png(&e.image)).await?;
        per_neuron[k].push(e);
    }
    Ok(per_neuron)
}

// ---------------------------------------------------------------------------------------
// In `dnd probe --crops`
// ---------------------------------------------------------------------------------------

pub(crate) struct CropReport {
    pub crops: usize,
    pub errors: Vec<ErrorRow>,
    pub outputs: Vec<String>,
}

/// A layer `dnd probe --crops` crops for, with its probe top-K.
pub(crate) struct CropLayer<'a> {
    pub name: &'a str,
    pub readout: Readout,
    pub width: usize,
    pub topk: &'a LayerTopK,
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
    let (plan, cut) = crop_neuron(canvas, map, config);
    let side = config.canvas_size;
    plan.crops
        .iter()
        .zip(cut)
        .enumerate()
        .map(|(i, (b, resized))| CropRow {
            layer: LayerName::new(layer),
            neuron: NeuronId::new(need.neuron as u32),
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
            png: encode_png(&resized).to_vec(),
        })
        .collect()
}

/// Image index -> the neurons whose top-K holds it.
fn needs_by_image(
    layers: &[CropLayer<'_>],
    neurons: Option<&NeuronSet>,
) -> BTreeMap<u32, Vec<Need>> {
    let mut needs: BTreeMap<u32, Vec<Need>> = BTreeMap::new();
    for (l, layer) in layers.iter().enumerate() {
        let topk = layer.topk;
        for neuron in 0..layer.width {
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
    needs
}

/// The crop rows of one batch of loaded images, per layer (on a blocking thread).
fn batch_crop_rows(
    model: &TargetModel,
    loaded: &[(u32, RgbImage)],
    needs: &[Vec<Need>],
    ids: &[String],
    readouts: &[Readout],
    layer_names: &[String],
    crop: &CropConfig,
) -> Result<Vec<Vec<CropRow>>, PipelineError> {
    let refs: Vec<&RgbImage> = loaded.iter().map(|(_, img)| img).collect();
    let canvases = canvases(&refs, crop.canvas_size);
    let maps = canvas_maps(model, &canvases, readouts)?;
    let jobs: Vec<(usize, Need)> =
        needs.iter().enumerate().flat_map(|(b, ns)| ns.iter().map(move |n| (b, *n))).collect();
    let made: Vec<(usize, Vec<CropRow>)> = jobs
        .par_iter()
        .map(|&(b, need)| {
            let map = maps[need.layer].map(b, need.neuron);
            let rows =
                crop_rows(&canvases[b], &map, &need, &layer_names[need.layer], &ids[b], crop);
            (need.layer, rows)
        })
        .collect();
    let mut per_layer = vec![Vec::new(); readouts.len()];
    for (layer, rows) in made {
        per_layer[layer].extend(rows);
    }
    Ok(per_layer)
}

/// `dnd probe --crops`: the crops of every (selected) neuron's top images, written as
/// `crops/<layer>.parquet` under `out`; images are read `batch_size` at a time.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn write_probe_crops(
    model: &Arc<TargetModel>,
    images: &[ImageRef],
    layers: &[CropLayer<'_>],
    neurons: Option<&NeuronSet>,
    crop: &CropConfig,
    (batch_size, limits): (usize, &ImageLimits),
    out: &Location,
    progress: &dyn Progress,
) -> Result<CropReport, PipelineError> {
    let needs = needs_by_image(layers, neurons);
    let readouts: Vec<Readout> = layers.iter().map(|l| l.readout.clone()).collect();
    let layer_names: Vec<String> = layers.iter().map(|l| l.name.to_string()).collect();
    let mut sinks = Vec::new();
    let mut outputs = Vec::new();
    for layer in layers {
        let rel = format!("crops/{}.parquet", layer.name);
        sinks.push(ParquetSink::create(out, &rel, tables::crops_schema())?);
        outputs.push(rel);
    }
    let mut errors = Vec::new();
    let mut crops = 0;
    let order: Vec<u32> = needs.keys().copied().collect();
    progress.begin("crops", order.len() as u64);
    for chunk in order.chunks(batch_size) {
        let refs: Vec<ImageRef> = chunk.iter().map(|&i| images[i as usize].clone()).collect();
        let mut loaded = Vec::new();
        for (pos, (_, r)) in load_batch(&refs, 0, limits, "crop").await.into_iter().enumerate() {
            match r {
                Ok(img) => loaded.push((chunk[pos], img)),
                Err(e) => errors.push(e),
            }
        }
        progress.advance(chunk.len() as u64);
        if loaded.is_empty() {
            continue;
        }
        let batch_needs: Vec<Vec<Need>> = loaded.iter().map(|(i, _)| needs[i].clone()).collect();
        let ids: Vec<String> = loaded.iter().map(|(i, _)| images[*i as usize].id.clone()).collect();
        let (model, readouts, names, crop) =
            (model.clone(), readouts.clone(), layer_names.clone(), crop.clone());
        let rows = tokio::task::spawn_blocking(move || {
            batch_crop_rows(&model, &loaded, &batch_needs, &ids, &readouts, &names, &crop)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_maps_index_images_then_channels() {
        // 2 images x 3 channels of 1x2 maps: value = 10 * image + channel.
        let data: Vec<f32> = (0..2)
            .flat_map(|b| (0..3).flat_map(move |c| [10.0 * b as f32 + c as f32; 2]))
            .collect();
        let maps = ChannelMaps { channels: 3, height: 1, width: 2, data };
        assert_eq!(maps.map(1, 2).data, vec![12.0, 12.0]);
        assert_eq!(maps.map(0, 1).data, vec![1.0, 1.0]);
    }

    #[test]
    fn a_neuron_is_cropped_where_its_map_fires() {
        let config = CropConfig { canvas_size: 40, ..CropConfig::default() };
        let canvas = RgbImage::from_fn(40, 40, |x, _| image::Rgb([x as u8 * 6, 0, 0]));
        // A 4x4 map hot in its top-left quarter only.
        let data: Vec<f32> =
            (0..16).map(|i| if i % 4 < 2 && i / 4 < 2 { 1.0 } else { 0.0 }).collect();
        let (plan, images) = crop_neuron(&canvas, &Map2 { width: 4, height: 4, data }, &config);
        assert_eq!(plan.crops.len(), images.len());
        assert!(!images.is_empty());
        let b = plan.crops[0];
        assert!(b.x0 < 20 && b.y0 < 20 && b.x1 <= 30 && b.y1 <= 30, "{b:?}");
        assert!(images.iter().all(|i| i.dimensions() == (40, 40)));
        let path = crop_path("abcdef");
        assert_eq!(path, "images/crops/ab/abcdef.png");
    }
}

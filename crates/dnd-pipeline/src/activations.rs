//! The target model's forward passes that stages share: pooled activations of images
//! through the model's own preprocessing, and pooling a tap's output; and the same
//! through the vector cache. What is pooled is a [`Readout`]'s maps: the tap's channels,
//! or a dictionary's units over them.

use std::sync::Arc;

use candle_core::{D, Device, Tensor};
use image::RgbImage;
use rayon::prelude::*;

use dnd_core::Pooling;
use dnd_models::TargetModel;
use dnd_models::preprocess::normalized_batch;

use crate::error::PipelineError;
use crate::units::{Readout, firing_shares};
use crate::vector_cache::VectorCache;

/// A tap's output pooled to `(B, C)` on its device: spatial maps by `pooling`, vectors as
/// they are. Pooling `cls` is no function of a map: [`forward_pooled`] asks the model.
pub fn pool(output: &Tensor, pooling: Pooling) -> Result<Tensor, PipelineError> {
    if output.rank() != 4 {
        return Ok(output.clone());
    }
    let flat = output.flatten_from(2)?;
    Ok(match pooling {
        Pooling::Mean => flat.mean(D::Minus1)?,
        Pooling::Max => flat.max(D::Minus1)?,
        Pooling::Cls => {
            return Err(PipelineError::Internal(
                "pooling `cls` reads the class token, which a map does not hold".into(),
            ));
        }
    })
}

/// Each readout's maps for the batch `x`, pooled to `(B, U)` on the model's device: the
/// maps by mean or max, or the class token's value at the tap (`cls`, ViT targets).
/// With `shares`, a unit readout's rows also get, after the pooled values, each unit's
/// share of positions above 0 ([`firing_shares`]): `(B, 2U)`.
pub fn forward_pooled(
    model: &TargetModel,
    x: &Tensor,
    readouts: &[Readout],
    pooling: Pooling,
    shares: bool,
) -> Result<Vec<Tensor>, PipelineError> {
    let taps: Vec<_> = readouts.iter().map(|r| r.tap).collect();
    let outputs = if pooling == Pooling::Cls {
        model.forward_class_tokens(x, &taps)?
    } else {
        model.forward_taps(x, &taps)?
    };
    outputs
        .into_iter()
        .zip(readouts)
        .map(|(output, readout)| {
            let maps = readout.apply(output)?;
            // The class token's values are vectors already: pooling leaves them as they are.
            let pooled = pool(&maps, pooling)?;
            if shares && readout.units.is_some() {
                Ok(Tensor::cat(&[pooled, firing_shares(&maps)?], 1)?)
            } else {
                Ok(pooled)
            }
        })
        .collect()
}

/// Each readout's pooled outputs (see [`forward_pooled`]) copied to the host, row-major.
pub(crate) fn pooled_rows(
    model: &TargetModel,
    x: &Tensor,
    readouts: &[Readout],
    pooling: Pooling,
    shares: bool,
) -> Result<Vec<Vec<f32>>, PipelineError> {
    forward_pooled(model, x, readouts, pooling, shares)?
        .iter()
        .map(|t| Ok(t.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?))
        .collect()
}

/// Pooled activations `(images, units)` of `images` at `readout`, through the model's own
/// preprocessing, in batches.
pub fn pooled_activations(
    model: &TargetModel,
    images: &[Arc<RgbImage>],
    readout: &Readout,
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
        let out =
            forward_pooled(model, &x, std::slice::from_ref(readout), pooling, false)?.remove(0);
        rows.extend(out.to_device(&Device::Cpu)?.to_vec2::<f32>()?);
    }
    Ok(rows)
}

/// [`pooled_activations`] on a blocking thread.
pub(crate) async fn pooled_activations_blocking(
    model: Arc<TargetModel>,
    images: Vec<Arc<RgbImage>>,
    readout: Readout,
    pooling: Pooling,
    batch_size: usize,
) -> Result<Vec<Vec<f32>>, PipelineError> {
    tokio::task::spawn_blocking(move || {
        pooled_activations(&model, &images, &readout, pooling, batch_size)
    })
    .await?
}

/// What the vector cache calls a readout's pooled activations (`pooled/<tap>/<pooling>`
/// for channels, as before units existed).
pub fn pooled_output(readout: &Readout, pooling: Pooling) -> String {
    format!("{}/{pooling}", readout.output("pooled"))
}

/// [`pooled_activations`] of the images the cache has not seen; the rest from it.
/// `hashes` are the images' [`crate::workbench::image_hash`]es.
pub(crate) async fn pooled_activations_cached(
    vectors: VectorCache<'_>,
    model: &Arc<TargetModel>,
    (images, hashes): (&[Arc<RgbImage>], &[String]),
    readout: &Readout,
    pooling: Pooling,
    batch_size: usize,
) -> Result<Vec<Vec<f32>>, PipelineError> {
    vectors
        .rows(&pooled_output(readout, pooling), hashes, |missing| {
            let images: Vec<Arc<RgbImage>> = missing.iter().map(|&i| images[i].clone()).collect();
            pooled_activations_blocking(model.clone(), images, readout.clone(), pooling, batch_size)
        })
        .await
}

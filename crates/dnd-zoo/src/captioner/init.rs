//! Starting a captioner from one trained before (`init_from`). Every weight is taken as it
//! is, except the vision tower's position embeddings when the new settings see images at
//! another size: their patch grid is resized bilinearly (the class token's kept), as ViTs
//! are fine-tuned at a higher resolution than they were pretrained at. That is how the
//! zoo's captioner moved from 64 to 96 pixels: its shape errors were on small objects (one
//! of radius 0.12 in a 96-pixel scene is 15 pixels wide at 64, about one 16-pixel patch).

use std::path::Path;

use candle_core::Tensor;
use dnd_core::Map2;

use super::{TrainingCaptioner, VISION_PREFIX};
use crate::error::TrainError;

/// The tower's position embeddings `(1, 1 + grid², hidden)`: the class token's, then the
/// patches' row by row.
const POSITION_EMBEDDING: &str = "embeddings.position_embedding";

/// Sets `model`'s weights to those saved in the model directory `dir`.
pub(super) fn load_initial_weights(
    model: &TrainingCaptioner,
    dir: &Path,
) -> Result<(), TrainError> {
    let file = dir.join("model.safetensors");
    if !file.is_file() {
        return Err(TrainError::Config(format!(
            "init_from: {} is not a captioner's model directory (no model.safetensors)",
            dir.display()
        )));
    }
    let config = |e: candle_core::Error| TrainError::Config(format!("init_from: {e}"));
    let mut saved =
        candle_core::safetensors::load(&file, &candle_core::Device::Cpu).map_err(config)?;
    let name = format!("{VISION_PREFIX}{POSITION_EMBEDDING}");
    let s = &model.settings;
    let grid = s.sampling.image_size as usize / s.patch_size;
    if let Some(positions) = saved.get(&name) {
        let (one, tokens, hidden) = positions.dims3().map_err(config)?;
        let from = square_root(tokens.saturating_sub(1));
        if let (1, Some(from)) = (one, from)
            && from != grid
            && hidden == s.vision.hidden
        {
            let values = positions.flatten_all()?.to_vec1::<f32>()?;
            let (class, patches) = values.split_at(hidden);
            let mut resized = class.to_vec();
            resized.extend(resize_grid(patches, from, grid, hidden));
            tracing::info!(
                "init_from: position embeddings resized from a {from}x{from} to a {grid}x{grid} patch grid"
            );
            saved.insert(
                name,
                Tensor::from_vec(resized, (1, 1 + grid * grid, hidden), positions.device())?,
            );
        }
    }
    model.params.load_tensors(&saved, &file).map_err(config)
}

fn square_root(n: usize) -> Option<usize> {
    let r = (n as f64).sqrt().round() as usize;
    (r * r == n && r > 0).then_some(r)
}

/// Bilinear resize of a `from`x`from` grid of `hidden`-vectors (row-major) to `to`x`to`,
/// each of the `hidden` values on its own, with the crops' resize
/// ([`Map2::resize_bilinear`]: PyTorch's `interpolate(mode="bilinear",
/// align_corners=False)`).
fn resize_grid(grid: &[f32], from: usize, to: usize, hidden: usize) -> Vec<f32> {
    assert_eq!(grid.len(), from * from * hidden, "a {from}x{from} grid of {hidden}-vectors");
    let mut out = vec![0.0; to * to * hidden];
    for h in 0..hidden {
        let data = grid.iter().skip(h).step_by(hidden).copied().collect();
        let resized = Map2 { width: from, height: from, data }.resize_bilinear(to, to);
        for (slot, value) in out.iter_mut().skip(h).step_by(hidden).zip(resized.data) {
            *slot = value;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resizing_a_grid_matches_pytorch_bilinear() {
        // torch.nn.functional.interpolate(torch.tensor([[[[0., 1.], [2., 3.]]]]), size=4,
        // mode="bilinear", align_corners=False)
        let expected = [
            0.0, 0.25, 0.75, 1.0, 0.5, 0.75, 1.25, 1.5, 1.5, 1.75, 2.25, 2.5, 2.0, 2.25, 2.75, 3.0,
        ];
        assert_eq!(resize_grid(&[0.0, 1.0, 2.0, 3.0], 2, 4, 1), expected);
        // Each of the hidden values is resized on its own.
        let two: Vec<f32> = [0.0, 1.0, 2.0, 3.0].iter().flat_map(|&v| [v, -v]).collect();
        let resized = resize_grid(&two, 2, 4, 2);
        assert_eq!(resized.iter().step_by(2).copied().collect::<Vec<_>>(), expected);
        assert_eq!(resized.iter().skip(1).step_by(2).map(|v| -v).collect::<Vec<_>>(), expected);
    }

    #[test]
    fn a_grid_of_the_same_size_is_unchanged() {
        let grid: Vec<f32> = (0..4 * 4 * 3).map(|i| (i as f32).sin()).collect();
        let same = resize_grid(&grid, 4, 4, 3);
        assert!(grid.iter().zip(&same).all(|(a, b)| (a - b).abs() < 1e-6));
    }
}

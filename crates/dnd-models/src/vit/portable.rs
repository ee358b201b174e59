//! The ViT forward pass with candle's ops, on any device and dtype (CUDA runs this; on
//! the CPU in f32, [`super::cpu`] does the same faster). The attention is the one the
//! CLIP and BLIP towers use ([`SelfAttention`]), on the fused projection's parts.

use candle_core::{D, Module, Tensor};
use candle_nn::{LayerNorm, Linear};

use super::params::{HeadParams, Norm, Params};
use super::{HeadInput, Readout, Vit, VitConfig};
use crate::error::ModelError;
use crate::tap::Tap;
use crate::transformer::SelfAttention;

/// Runs `x: (B, 3, H, W)` with the weights `p` and returns each tap's output as
/// [`Vit::forward_taps`] (or, with [`Readout::ClassToken`], the class tokens) does.
pub(super) fn forward(
    vit: &Vit,
    p: &Params<Tensor>,
    x: &Tensor,
    taps: &[Tap],
    readout: Readout,
) -> Result<Vec<Tensor>, ModelError> {
    let c = vit.config();
    let (_, _, h, w) = x.dims4()?;
    let (rows, cols) = (h / c.patch_size, w / c.patch_size);
    let mut tokens = embed(vit, p, x, (rows, cols))?;
    if let Some(n) = &p.pre_norm {
        tokens = norm(c, n, &tokens)?;
    }
    // Token taps are kept as `(B, T, C)` until the end; only those asked for.
    let mut kept: Vec<(Tap, Tensor)> = Vec::new();
    let mut keep = |tap: Tap, t: &Tensor| {
        if taps.contains(&tap) {
            kept.push((tap, t.clone()));
        }
    };
    let dim = c.hidden_size;
    for (i, block) in p.blocks.iter().take(c.depth(taps)).enumerate() {
        let part = |k: usize| -> candle_core::Result<Linear> {
            Ok(linear(
                &block.qkv_weight.narrow(0, k * dim, dim)?,
                &block.qkv_bias.narrow(0, k * dim, dim)?,
            ))
        };
        let proj = linear(&block.proj_weight, &block.proj_bias);
        let attn = SelfAttention::from_parts(part(0)?, part(1)?, part(2)?, proj, c.num_heads);
        tokens = (&tokens + attn.forward(&norm(c, &block.ln1, &tokens)?, None)?)?;
        let fc1 = linear(&block.fc1_weight, &block.fc1_bias);
        let hidden = c.activation.apply(&fc1.forward(&norm(c, &block.ln2, &tokens)?)?)?;
        tokens = (&tokens + linear(&block.fc2_weight, &block.fc2_bias).forward(&hidden)?)?;
        keep(Tap::BlockMlp(i as u16), &hidden);
        keep(Tap::Block(i as u16), &tokens);
    }
    let mut head_out = None;
    if taps.iter().any(|t| matches!(t, Tap::Norm | Tap::Head)) {
        if let Some(n) = &p.norm {
            tokens = norm(c, n, &tokens)?;
            keep(Tap::Norm, &tokens);
        }
        if let Some(head) = &p.head {
            head_out = Some(apply_head(c, head, &tokens, rows * cols)?);
        }
    }
    taps.iter()
        .map(|tap| {
            if *tap == Tap::Head {
                return Ok(head_out.clone().expect("the head was computed"));
            }
            let t = &kept.iter().find(|(k, _)| k == tap).expect("every tap was kept").1;
            Ok(match readout {
                Readout::ClassToken => t.narrow(1, 0, 1)?.squeeze(1)?.contiguous()?,
                Readout::Grid => {
                    let (b, width) = (t.dim(0)?, t.dim(D::Minus1)?);
                    t.narrow(1, c.prefix_tokens(), rows * cols)?
                        .transpose(1, 2)?
                        .reshape((b, width, rows, cols))?
                }
            })
        })
        .collect()
}

/// The tokens `(B, T, C)` before the first block: class token, registers, patches, with
/// their positions.
fn embed(
    vit: &Vit,
    p: &Params<Tensor>,
    x: &Tensor,
    (rows, cols): (usize, usize),
) -> Result<Tensor, ModelError> {
    let c = vit.config();
    let (b, dim) = (x.dim(0)?, c.hidden_size);
    let grid = Tensor::from_vec(vit.grid_positions(rows, cols), (rows * cols, dim), x.device())?;
    let patches = x
        .conv2d(&p.patch_weight, 0, c.patch_size, 1, 1)?
        .broadcast_add(&p.patch_bias.reshape((1, dim, 1, 1))?)?
        .flatten_from(2)?
        .transpose(1, 2)?
        .broadcast_add(&grid)?;
    let mut prefix: Vec<Tensor> = Vec::new();
    if let Some(t) = &p.class_token {
        prefix.push(t.reshape((1, dim))?);
    }
    if let Some(t) = &p.registers {
        prefix.push(t.clone());
    }
    if prefix.is_empty() {
        return Ok(patches);
    }
    let mut prefix = Tensor::cat(&prefix, 0)?;
    if let Some(pos) = &p.pos_prefix {
        let n = pos.dim(0)?;
        let rest = prefix.narrow(0, n, prefix.dim(0)? - n)?;
        prefix = Tensor::cat(&[(prefix.narrow(0, 0, n)? + pos)?, rest], 0)?;
    }
    let prefix = prefix.unsqueeze(0)?.broadcast_as((b, c.prefix_tokens(), dim))?;
    Ok(Tensor::cat(&[&prefix.contiguous()?, &patches], 1)?)
}

/// The head's output `(B, K)` from the final tokens.
fn apply_head(
    c: &VitConfig,
    head: &HeadParams<Tensor>,
    tokens: &Tensor,
    patches: usize,
) -> Result<Tensor, ModelError> {
    let cls = || tokens.narrow(1, 0, 1)?.squeeze(1);
    let mean = || tokens.narrow(1, c.prefix_tokens(), patches)?.mean(1);
    let pooled = match c.head.as_ref().map(|h| h.input) {
        Some(HeadInput::PatchMean) => mean()?,
        Some(HeadInput::ClassTokenAndPatchMean) => Tensor::cat(&[cls()?, mean()?], D::Minus1)?,
        _ => cls()?,
    };
    let pooled = match &head.norm {
        Some(n) => norm(c, n, &pooled)?,
        None => pooled,
    };
    Ok(linear(&head.weight, &head.bias).forward(&pooled)?)
}

fn norm(c: &VitConfig, n: &Norm<Tensor>, t: &Tensor) -> candle_core::Result<Tensor> {
    LayerNorm::new(n.weight.clone(), n.bias.clone(), c.layer_norm_eps).forward(t)
}

fn linear(w: &Tensor, b: &Tensor) -> Linear {
    Linear::new(w.clone(), Some(b.clone()))
}

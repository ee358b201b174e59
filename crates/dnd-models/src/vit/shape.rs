//! Reading a ViT's shape off its checkpoint: the layout from the tensor names, the sizes
//! from the tensor shapes, and from config.json what shapes cannot say (attention heads,
//! activation, pooling, image size); and the layout's usual preprocessing.

use std::collections::HashMap;
use std::path::Path;

use serde::Deserialize;

use super::layout::{Reader, VitLayout, detect};
use super::{HeadConfig, HeadInput, VitConfig};
use crate::error::ModelError;
use crate::hf_files::read_json;
use crate::preprocess::{CropRounding, Filter, Preprocess, Resize};
use crate::transformer::Activation;

const OPENAI_CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
const OPENAI_CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// The parts of a config.json that say what tensor shapes cannot: transformers'
/// (`CLIPVisionConfig`, `CLIPConfig.vision_config`, `Dinov2Config`), timm's (with
/// `model_args`) and dnd's own for torchvision checkpoints (`{"architecture": "vit_b_16"}`
/// or `{"architecture": "vit", "num_heads": 12}`).
#[derive(Debug, Default, Deserialize)]
struct RawConfig {
    architecture: Option<String>,
    num_heads: Option<usize>,
    global_pool: Option<String>,
    model_args: Option<TimmArgs>,
    num_attention_heads: Option<usize>,
    hidden_act: Option<String>,
    layer_norm_eps: Option<f64>,
    image_size: Option<usize>,
    use_swiglu_ffn: Option<bool>,
    vision_config: Option<Box<RawConfig>>,
}

#[derive(Debug, Default, Deserialize)]
struct TimmArgs {
    num_heads: Option<usize>,
    act_layer: Option<String>,
    no_embed_class: Option<bool>,
    global_pool: Option<String>,
    img_size: Option<serde_json::Value>,
}

/// Attention heads of the standard widths (head dim 64 except ViT-H/g and the like),
/// for checkpoints without a config.json that says.
fn heads_of_width(width: usize) -> Option<usize> {
    Some(match width {
        192 => 3,
        384 => 6,
        512 => 8,
        768 => 12,
        1024 | 1152 | 1280 | 1408 | 1664 => 16,
        1536 => 24,
        _ => return None,
    })
}

/// Reads a ViT's shape (see [`VitConfig::from_shapes`]).
pub(super) fn infer(
    shapes: &HashMap<String, Vec<usize>>,
    config: Option<&Path>,
    weights: &Path,
) -> Result<Option<VitConfig>, ModelError> {
    let Some(names) = detect(shapes) else { return Ok(None) };
    let r = Reader { shapes, names, weights };
    let raw: RawConfig = match config {
        Some(path) => read_json(path)?,
        None => RawConfig::default(),
    };
    let vision = raw.vision_config.as_deref().unwrap_or(&raw);
    let args = raw.model_args.as_ref();
    let layout = r.names.layout;

    let patch_dims = r.dims(&format!("{}.weight", r.names.patch()))?;
    let (hidden, patch) = match patch_dims {
        [c, 3, p, q] if p == q => (*c, *p),
        other => {
            return Err(r.unsupported(&format!(
                "a patch embedding of shape {other:?} (expected (C, 3, p, p))"
            )));
        }
    };
    reject_variants(&r, vision)?;
    let mut num_layers = 0;
    while r.has(&format!("{}.weight", r.names.block(num_layers).ln1)) {
        num_layers += 1;
    }
    if num_layers == 0 {
        return Err(r.missing(&format!("{}.weight", r.names.block(0).ln1)));
    }
    let mlp_size = r.dims(&format!("{}.weight", r.names.block(0).fc1))?[0];
    // A packed gated MLP (timm's SwiGLUPacked) has an fc1 twice as tall as fc2 is wide.
    if r.dims(&format!("{}.weight", r.names.block(0).fc2))?.get(1) != Some(&mlp_size) {
        return Err(r.unsupported("a gated MLP (fc1 twice the width fc2 reads)"));
    }
    let class_token = r.has(&r.names.class_token());
    let register_tokens = match r.names.registers() {
        Some(name) if r.has(&name) => *r.dims(&name)?.get(1).unwrap_or(&0),
        _ => 0,
    };
    if layout == VitLayout::Torchvision && !class_token {
        return Err(r.missing(&r.names.class_token()));
    }
    let prefix_tokens = usize::from(class_token) + register_tokens;
    let pos_dims = r.dims(&r.names.positions())?;
    let rows = match pos_dims {
        [rows, c] | [1, rows, c] if *c == hidden => *rows,
        other => {
            return Err(r.unsupported(&format!(
                "a position table of shape {other:?} (expected (1, L, {hidden}) or (L, {hidden}))"
            )));
        }
    };
    let timm_size = args.and_then(|a| a.img_size.as_ref()).and_then(image_size);
    let (positioned_prefix, grid) = position_grid(
        &r,
        rows,
        prefix_tokens,
        patch,
        args,
        timm_size.or(vision.image_size.map(|s| (s, s))),
    )
    .map_err(|reason| r.bad_config(config, reason))?;

    let num_heads = num_heads(&r, &raw, hidden).map_err(|reason| r.bad_config(config, reason))?;
    let activation =
        activation(layout, vision, &raw).map_err(|reason| r.bad_config(config, reason))?;
    let layer_norm_eps = match layout {
        VitLayout::Torchvision | VitLayout::Timm => 1e-6,
        VitLayout::HfClip => vision.layer_norm_eps.unwrap_or(1e-5),
        VitLayout::HfDinov2 => vision.layer_norm_eps.unwrap_or(1e-6),
    };
    let ls = r.names.block(0).ls;
    let config = VitConfig {
        layout,
        prefix: r.names.prefix.clone(),
        hidden_size: hidden,
        num_layers,
        num_heads,
        mlp_size,
        patch_size: patch,
        grid,
        class_token,
        register_tokens,
        positioned_prefix,
        // timm's resample_abs_pos_embed antialiases, as transformers' DINOv2 with
        // registers does; its CLIP and plain DINOv2 (and, here, torchvision) do not.
        antialias_positions: layout == VitLayout::Timm
            || layout == VitLayout::HfDinov2 && register_tokens > 0,
        pre_norm: r.names.pre_norm().is_some_and(|n| r.has(&format!("{n}.weight"))),
        final_norm: r.has(&format!("{}.weight", r.names.norm())),
        layer_scale: ls.is_some_and(|(a, _)| r.has(&a)),
        activation,
        layer_norm_eps,
        head: head_config(&r, &raw, hidden, class_token)?,
    };
    tracing::debug!(?config, "read the shape of a ViT checkpoint");
    Ok(Some(config))
}

/// The attention heads: from config.json (transformers', timm's `model_args`, dnd's),
/// a torchvision architecture name, or the standard widths.
fn num_heads(r: &Reader<'_>, raw: &RawConfig, hidden: usize) -> Result<usize, String> {
    let vision = raw.vision_config.as_deref().unwrap_or(raw);
    let heads = vision
        .num_attention_heads
        .or(raw.model_args.as_ref().and_then(|a| a.num_heads))
        .or(raw.num_heads)
        .or_else(|| raw.architecture.as_deref().and_then(torchvision_heads))
        .or_else(|| heads_of_width(hidden))
        .ok_or_else(|| {
            format!(
                "the number of attention heads of a width-{hidden} {} ViT: config.json needs `num_heads` (dnd), `model_args.num_heads` (timm) or `num_attention_heads` (transformers)",
                r.names.layout
            )
        })?;
    if heads == 0 || !hidden.is_multiple_of(heads) {
        return Err(format!("a number of heads that divides the width {hidden}, not {heads}"));
    }
    Ok(heads)
}

/// Refuses the variants whose arithmetic this file does not do, naming them.
fn reject_variants(r: &Reader<'_>, vision: &RawConfig) -> Result<(), ModelError> {
    let b = r.names.block(0);
    let attn = b.proj.rsplit_once('.').map_or("", |(a, _)| a).to_string();
    let checks = [
        (format!("{attn}.q_norm.weight"), "query/key normalisation (qk_norm)"),
        (format!("{attn}.norm.weight"), "a norm inside attention (scale_attn_norm)"),
        (format!("{attn}.q_bias"), "separate query/value biases (BEiT style)"),
        (
            format!("{}.norm.weight", b.fc1.rsplit_once('.').map_or("", |(m, _)| m)),
            "a norm inside the MLP (scale_mlp_norm)",
        ),
    ];
    let mlp = b.fc1.rsplit_once('.').map_or("", |(m, _)| m);
    let gated = [format!("{mlp}.fc1_g.weight"), format!("{mlp}.weights_in.weight")];
    if gated.iter().any(|name| r.has(name)) {
        return Err(r.unsupported("a SwiGLU MLP (as DINOv2 giant)"));
    }
    if let Some((_, what)) = checks.iter().find(|(name, _)| r.has(name)) {
        return Err(r.unsupported(what));
    }
    if vision.use_swiglu_ffn == Some(true) {
        return Err(r.unsupported("a SwiGLU MLP (DINOv2 giant)"));
    }
    if r.names.layout == VitLayout::Timm && r.has("dist_token") {
        return Err(r.unsupported("a distillation token (DeiT distilled)"));
    }
    if r.names.layout == VitLayout::Torchvision && r.has("heads.pre_logits.weight") {
        return Err(r.unsupported("a pre-logits layer in the head (representation_size)"));
    }
    Ok(())
}

/// `(rows, cols)` of timm's `img_size` (an int or a pair).
fn image_size(v: &serde_json::Value) -> Option<(usize, usize)> {
    match v {
        serde_json::Value::Number(n) => n.as_u64().map(|s| (s as usize, s as usize)),
        serde_json::Value::Array(a) if a.len() == 2 => {
            Some((a[0].as_u64()? as usize, a[1].as_u64()? as usize))
        }
        _ => None,
    }
}

fn torchvision_heads(arch: &str) -> Option<usize> {
    match arch {
        "vit_b_16" | "vit_b_32" => Some(12),
        "vit_l_16" | "vit_l_32" | "vit_h_14" => Some(16),
        _ => None,
    }
}

/// How many prefix tokens have positions, and the grid of the others, from the position
/// table's `rows`: timm leaves the prefix out of the table with `no_embed_class`; the
/// grid is the image size over the patch when config.json gives it, else square.
fn position_grid(
    r: &Reader<'_>,
    rows: usize,
    prefix: usize,
    patch: usize,
    args: Option<&TimmArgs>,
    image: Option<(usize, usize)>,
) -> Result<(usize, (usize, usize)), String> {
    let square = |n: usize| {
        let s = (n as f64).sqrt().round() as usize;
        (s * s == n && s > 0).then_some((s, s))
    };
    let positioned = match r.names.layout {
        VitLayout::Timm => match args.and_then(|a| a.no_embed_class) {
            Some(true) => 0,
            Some(false) => prefix,
            None => match image {
                Some((h, w)) => rows.saturating_sub((h / patch) * (w / patch)),
                None if rows > prefix && square(rows - prefix).is_some() => prefix,
                None => 0,
            },
        },
        _ => 1,
    };
    let valid = match r.names.layout {
        VitLayout::Timm => positioned == 0 || positioned == prefix,
        _ => positioned == 1 && prefix >= 1,
    };
    if !valid || rows <= positioned {
        return Err(format!(
            "a position table that fits the checkpoint: {rows} rows for {prefix} class/register tokens and a patch grid"
        ));
    }
    let patches = rows - positioned;
    let grid = match image {
        Some((h, w)) if (h / patch) * (w / patch) == patches => (h / patch, w / patch),
        _ => square(patches).ok_or_else(|| {
            format!("the image size: {patches} positions are no square grid (config.json `image_size` or `model_args.img_size`)")
        })?,
    };
    Ok((positioned, grid))
}

/// The MLP's activation: from config.json where the layout keeps it there.
fn activation(
    layout: VitLayout,
    vision: &RawConfig,
    raw: &RawConfig,
) -> Result<Activation, String> {
    let named = |name: &str| -> Result<Activation, String> {
        match name {
            "gelu" => Ok(Activation::Gelu),
            "quick_gelu" => Ok(Activation::QuickGelu),
            "gelu_tanh" | "gelu_pytorch_tanh" | "gelu_new" => Ok(Activation::GeluTanh),
            other => {
                Err(format!("a supported activation (gelu, quick_gelu, gelu_tanh), not `{other}`"))
            }
        }
    };
    match layout {
        VitLayout::Torchvision => Ok(Activation::Gelu),
        VitLayout::Timm => match raw.model_args.as_ref().and_then(|a| a.act_layer.as_deref()) {
            Some(name) => named(name),
            // timm's OpenAI CLIP towers say it only in their names.
            None if raw.architecture.as_deref().is_some_and(|a| a.contains("quickgelu")) => {
                Ok(Activation::QuickGelu)
            }
            None => Ok(Activation::Gelu),
        },
        VitLayout::HfClip => named(vision.hidden_act.as_deref().unwrap_or("quick_gelu")),
        VitLayout::HfDinov2 => named(vision.hidden_act.as_deref().unwrap_or("gelu")),
    }
}

/// The head, when the checkpoint has one this file computes.
fn head_config(
    r: &Reader<'_>,
    raw: &RawConfig,
    hidden: usize,
    class_token: bool,
) -> Result<Option<HeadConfig>, ModelError> {
    let name = format!("{}.weight", r.names.head());
    let Some(dims) = r.shapes.get(&name) else { return Ok(None) };
    let (outputs, fan_in) = match dims.as_slice() {
        [k, i] => (*k, *i),
        other => return Err(r.unsupported(&format!("a head `{name}` of shape {other:?}"))),
    };
    let fc_norm = r.has("fc_norm.weight");
    let input = match r.names.layout {
        VitLayout::Timm => {
            let pool = raw
                .global_pool
                .as_deref()
                .or(raw.model_args.as_ref().and_then(|a| a.global_pool.as_deref()))
                .unwrap_or(if fc_norm { "avg" } else { "token" });
            match pool {
                "token" if class_token => HeadInput::ClassToken,
                "avg" => HeadInput::PatchMean,
                other => {
                    tracing::warn!(
                        pool = other,
                        "timm head with this global_pool is not supported: no `head` tap"
                    );
                    return Ok(None);
                }
            }
        }
        VitLayout::HfDinov2 if fan_in == 2 * hidden => HeadInput::ClassTokenAndPatchMean,
        _ => HeadInput::ClassToken,
    };
    let expected_in = if input == HeadInput::ClassTokenAndPatchMean { 2 * hidden } else { hidden };
    if fan_in != expected_in {
        return Err(r.unsupported(&format!(
            "a head `{name}` of shape {dims:?} (expected ({outputs}, {expected_in}))"
        )));
    }
    Ok(Some(HeadConfig { outputs, input, norm: fc_norm && r.names.layout == VitLayout::Timm }))
}

/// The usual preprocessing of a layout, for checkpoints that come without one.
pub(super) fn usual_preprocess(config: &VitConfig) -> Preprocess {
    let side = (config.grid.0 * config.patch_size) as u32;
    match config.layout {
        VitLayout::Torchvision | VitLayout::Timm => Preprocess::imagenet(),
        VitLayout::HfClip => Preprocess {
            resize: Resize::ShorterSide(side),
            filter: Filter::Bicubic,
            crop: Some(side),
            crop_rounding: CropRounding::Floor,
            mean: OPENAI_CLIP_MEAN,
            std: OPENAI_CLIP_STD,
        },
        VitLayout::HfDinov2 => Preprocess {
            filter: Filter::Bicubic,
            crop_rounding: CropRounding::Floor,
            ..Preprocess::imagenet()
        },
    }
}

//! CLIP (Radford et al. 2021) image and text towers, Hugging Face `CLIPModel` layout
//! (`openai/clip-vit-base-patch16`, `-patch32`, `-large-patch14`, or any config).
//!
//! Not candle-transformers' CLIP: it pools text at `argmax(input_ids)` always, which is only
//! right while the end-of-text token has the largest id; transformers pools at the first
//! `eos_token_id` unless the config carries the legacy id 2. This file does what
//! transformers does.

use candle_core::{D, DType, Device, IndexOp, Module, Result, Tensor};
use candle_nn::{Embedding, LayerNorm, Linear, VarBuilder};
use serde::Deserialize;

use crate::transformer::{
    Activation, EncoderLayer, PatchEmbedding, TowerShape, causal_mask, layer_norm, load_encoder,
};

fn default_act() -> Activation {
    Activation::QuickGelu
}
fn default_eps() -> f64 {
    1e-5
}

/// `text_config` of a CLIP config.json; defaults are transformers' `CLIPTextConfig`.
#[derive(Debug, Clone, Deserialize)]
pub struct ClipTextConfig {
    #[serde(default = "d512")]
    pub hidden_size: usize,
    #[serde(default = "d2048")]
    pub intermediate_size: usize,
    #[serde(default = "d8")]
    pub num_attention_heads: usize,
    #[serde(default = "d12")]
    pub num_hidden_layers: usize,
    #[serde(default = "d77")]
    pub max_position_embeddings: usize,
    #[serde(default = "d49408")]
    pub vocab_size: usize,
    #[serde(default = "d2")]
    pub eos_token_id: u32,
    #[serde(default = "default_act")]
    pub hidden_act: Activation,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
}

/// `vision_config` of a CLIP config.json; defaults are transformers' `CLIPVisionConfig`.
#[derive(Debug, Clone, Deserialize)]
pub struct ClipVisionConfig {
    #[serde(default = "d768")]
    pub hidden_size: usize,
    #[serde(default = "d3072")]
    pub intermediate_size: usize,
    #[serde(default = "d12")]
    pub num_attention_heads: usize,
    #[serde(default = "d12")]
    pub num_hidden_layers: usize,
    #[serde(default = "d224")]
    pub image_size: usize,
    #[serde(default = "d32")]
    pub patch_size: usize,
    #[serde(default = "default_act")]
    pub hidden_act: Activation,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
}

/// A `CLIPModel` config.json.
#[derive(Debug, Clone, Deserialize)]
pub struct ClipConfig {
    #[serde(default = "d512")]
    pub projection_dim: usize,
    pub text_config: ClipTextConfig,
    pub vision_config: ClipVisionConfig,
}

macro_rules! defaults {
    ($($name:ident = $v:expr),*) => { $(fn $name() -> usize { $v })* };
}
defaults!(
    d512 = 512,
    d2048 = 2048,
    d8 = 8,
    d12 = 12,
    d77 = 77,
    d49408 = 49408,
    d768 = 768,
    d3072 = 3072,
    d224 = 224,
    d32 = 32
);
fn d2() -> u32 {
    2
}

/// The image tower: patches, class token, encoder, `post_layernorm` of the class token,
/// `visual_projection`.
#[derive(Debug, Clone)]
pub struct ClipVision {
    embeddings: PatchEmbedding,
    pre_norm: LayerNorm,
    layers: Vec<EncoderLayer>,
    post_norm: LayerNorm,
    projection: Linear,
}

impl ClipVision {
    pub fn load(c: &ClipConfig, vb: VarBuilder) -> Result<Self> {
        let v = &c.vision_config;
        let shape = TowerShape {
            hidden: v.hidden_size,
            intermediate: v.intermediate_size,
            heads: v.num_attention_heads,
            layers: v.num_hidden_layers,
            eps: v.layer_norm_eps,
            act: v.hidden_act,
        };
        let m = vb.pp("vision_model");
        Ok(Self {
            embeddings: PatchEmbedding::load(
                v.hidden_size,
                v.image_size,
                v.patch_size,
                m.pp("embeddings"),
            )?,
            // sic: transformers spells it "pre_layrnorm"
            pre_norm: layer_norm(v.hidden_size, v.layer_norm_eps, m.pp("pre_layrnorm"))?,
            layers: load_encoder(&shape, m.clone())?,
            post_norm: layer_norm(v.hidden_size, v.layer_norm_eps, m.pp("post_layernorm"))?,
            projection: candle_nn::linear_no_bias(
                v.hidden_size,
                c.projection_dim,
                vb.pp("visual_projection"),
            )?,
        })
    }

    /// `(B, 3, S, S)` normalised pixels to unnormalised image features `(B, projection_dim)`.
    pub fn features(&self, pixels: &Tensor) -> Result<Tensor> {
        let mut h = self.pre_norm.forward(&self.embeddings.forward(pixels)?)?;
        for layer in &self.layers {
            h = layer.forward(&h, None)?;
        }
        let pooled = self.post_norm.forward(&h.i((.., 0))?)?;
        self.projection.forward(&pooled)
    }
}

/// The text tower: tokens and positions, causal encoder, `final_layer_norm`, pooled at the
/// end-of-text token, `text_projection`.
#[derive(Debug, Clone)]
pub struct ClipText {
    tokens: Embedding,
    positions: Tensor,
    layers: Vec<EncoderLayer>,
    final_norm: LayerNorm,
    /// `text_projection`: CLIP has it, a diffusion model's `CLIPTextModel` does not.
    projection: Option<Linear>,
    eos_token_id: u32,
}

impl ClipText {
    /// The text tower of a `CLIPModel` (with its projection).
    pub fn load(c: &ClipConfig, vb: VarBuilder) -> Result<Self> {
        let projection = candle_nn::linear_no_bias(
            c.text_config.hidden_size,
            c.projection_dim,
            vb.pp("text_projection"),
        )?;
        let mut text = Self::load_tower(&c.text_config, vb.pp("text_model"))?;
        text.projection = Some(projection);
        Ok(text)
    }

    /// A bare text tower, `vb` at its root (`text_model.` in a `CLIPModel`).
    pub fn load_tower(t: &ClipTextConfig, vb: VarBuilder) -> Result<Self> {
        let shape = TowerShape {
            hidden: t.hidden_size,
            intermediate: t.intermediate_size,
            heads: t.num_attention_heads,
            layers: t.num_hidden_layers,
            eps: t.layer_norm_eps,
            act: t.hidden_act,
        };
        let m = vb;
        Ok(Self {
            tokens: candle_nn::embedding(
                t.vocab_size,
                t.hidden_size,
                m.pp("embeddings.token_embedding"),
            )?,
            positions: m.get(
                (t.max_position_embeddings, t.hidden_size),
                "embeddings.position_embedding.weight",
            )?,
            layers: load_encoder(&shape, m.clone())?,
            final_norm: layer_norm(t.hidden_size, t.layer_norm_eps, m.pp("final_layer_norm"))?,
            projection: None,
            eos_token_id: t.eos_token_id,
        })
    }

    pub fn max_len(&self) -> usize {
        self.positions.dim(0).unwrap_or(0)
    }

    /// The last hidden states `(B, T, D)` for `ids: (B, T)` (u32) with `attention: (B, T)`
    /// (1 = token, 0 = padding).
    pub fn hidden_states(&self, ids: &Tensor, attention: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let x = self.tokens.forward(ids)?.broadcast_add(&self.positions.narrow(0, 0, t)?)?;
        let causal = causal_mask(t, x.dtype(), x.device())?;
        // Padding keys get -inf too: (B, 1, 1, T)
        let pad = ((attention.to_dtype(DType::F32)? - 1.0)? * 1e9)?
            .reshape((b, 1, 1, t))?
            .to_dtype(x.dtype())?;
        let mask = causal.broadcast_add(&pad)?;
        let mut h = x;
        for layer in &self.layers {
            h = layer.forward(&h, Some(&mask))?;
        }
        self.final_norm.forward(&h)
    }

    /// Where each row is pooled: the first `eos_token_id`, or `argmax(ids)` for configs with
    /// the legacy id 2 (as transformers does).
    pub fn pool_positions(&self, ids: &[Vec<u32>]) -> Vec<usize> {
        ids.iter()
            .map(|row| {
                if self.eos_token_id == 2 {
                    row.iter()
                        .enumerate()
                        .max_by_key(|(i, v)| (**v, std::cmp::Reverse(*i)))
                        .map_or(0, |(i, _)| i)
                } else {
                    row.iter().position(|&v| v == self.eos_token_id).unwrap_or(row.len() - 1)
                }
            })
            .collect()
    }

    /// Unnormalised text features `(B, projection_dim)`.
    pub fn features(
        &self,
        ids: &[Vec<u32>],
        attention: &[Vec<u32>],
        device: &Device,
    ) -> Result<Tensor> {
        let b = ids.len();
        let t = ids.first().map_or(0, Vec::len);
        let id_t = Tensor::from_vec(ids.concat(), (b, t), device)?;
        let att_t = Tensor::from_vec(attention.concat(), (b, t), device)?;
        let h = self.hidden_states(&id_t, &att_t)?;
        let rows: Vec<Tensor> = self
            .pool_positions(ids)
            .iter()
            .enumerate()
            .map(|(i, &p)| h.i((i, p)))
            .collect::<Result<_>>()?;
        match &self.projection {
            Some(p) => p.forward(&Tensor::stack(&rows, 0)?),
            None => {
                candle_core::bail!("this text tower has no projection (a diffusion text encoder)")
            }
        }
    }
}

/// `x / ||x||` along the last dimension.
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    x.broadcast_div(&x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?)
}

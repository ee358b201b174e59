//! diffusers' `UNet2DConditionModel` (Stable Diffusion 1.x/2.x, SD-Turbo and every UNet of
//! that family), with its `config.json` and weight names.
//!
//! Inference only, channel-major throughout (see `layers.rs`). What depends on the step
//! alone (the time embedding and each resnet block's projection of it) is computed once
//! per step for the whole batch; what depends on the text alone (every cross-attention's
//! keys and values) once per generation, by [`UNet::context`].

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use super::blocks::{ContextKv, ResnetBlock, ResnetSettings, SpatialTransformer};
use super::layers::{Conv2d, GroupNorm, Linear};

/// A number per block, or one for all (`attention_head_dim: 8` or `[5, 10, 20, 20]`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum PerBlock {
    One(usize),
    Each(Vec<usize>),
}

impl PerBlock {
    fn resolve(&self, blocks: usize) -> Vec<usize> {
        match self {
            PerBlock::One(v) => vec![*v; blocks],
            PerBlock::Each(v) => v.clone(),
        }
    }
}

/// `unet/config.json`, the fields that shape the network; the rest must keep the values
/// this file implements (checked by [`UNetConfig::validate`]).
#[derive(Debug, Clone, Deserialize)]
pub struct UNetConfig {
    #[serde(default = "four")]
    pub in_channels: usize,
    #[serde(default = "four")]
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub down_block_types: Vec<String>,
    #[serde(default)]
    pub up_block_types: Vec<String>,
    pub layers_per_block: usize,
    /// diffusers' legacy name: the number of heads unless `num_attention_heads` is set.
    pub attention_head_dim: PerBlock,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock>,
    #[serde(default = "one_per_block")]
    pub transformer_layers_per_block: PerBlock,
    pub cross_attention_dim: usize,
    #[serde(default = "thirty_two")]
    pub norm_num_groups: usize,
    #[serde(default = "norm_eps")]
    pub norm_eps: f64,
    #[serde(default = "yes")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default = "one")]
    pub downsample_padding: usize,
    #[serde(default = "one_f")]
    pub mid_block_scale_factor: f64,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default = "mid_block")]
    pub mid_block_type: Option<String>,
    #[serde(default = "silu")]
    pub act_fn: String,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    #[serde(default)]
    pub only_cross_attention: serde_json::Value,
    #[serde(default)]
    pub dual_cross_attention: bool,
    #[serde(default = "default_shift")]
    pub resnet_time_scale_shift: String,
    #[serde(default = "three")]
    pub conv_in_kernel: usize,
    #[serde(default = "three")]
    pub conv_out_kernel: usize,
    #[serde(default = "positional")]
    pub time_embedding_type: String,
}

fn one() -> usize {
    1
}
fn three() -> usize {
    3
}
fn four() -> usize {
    4
}
fn thirty_two() -> usize {
    32
}
fn one_f() -> f64 {
    1.0
}
fn norm_eps() -> f64 {
    1e-5
}
fn yes() -> bool {
    true
}
fn one_per_block() -> PerBlock {
    PerBlock::One(1)
}
fn mid_block() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}
fn silu() -> String {
    "silu".into()
}
fn default_shift() -> String {
    "default".into()
}
fn positional() -> String {
    "positional".into()
}

impl UNetConfig {
    /// Rejects the variants of the family this file does not implement, naming the field.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let n = self.block_out_channels.len();
        let lists = [
            ("down_block_types", self.down_block_types.len()),
            ("attention_head_dim", self.heads().len()),
            ("transformer_layers_per_block", self.transformer_layers_per_block.resolve(n).len()),
        ];
        for (name, len) in lists {
            if len != n {
                return Err(format!("{name} has {len} entries for {n} blocks"));
            }
        }
        if !self.up_block_types.is_empty() && self.up_block_types.len() != n {
            return Err(format!(
                "up_block_types has {} entries for {n} blocks",
                self.up_block_types.len()
            ));
        }
        for kind in self.down_block_types.iter().chain(&self.up_block_types) {
            if !matches!(
                kind.as_str(),
                "CrossAttnDownBlock2D" | "DownBlock2D" | "CrossAttnUpBlock2D" | "UpBlock2D"
            ) {
                return Err(format!(
                    "block type `{kind}` is not supported (Stable Diffusion 1.x/2.x blocks only)"
                ));
            }
        }
        let unsupported = [
            (
                self.addition_embed_type.is_some(),
                "addition_embed_type (SDXL-style added conditioning)",
            ),
            (self.class_embed_type.is_some(), "class_embed_type"),
            (
                self.time_cond_proj_dim.is_some(),
                "time_cond_proj_dim (LCM-style guidance embedding)",
            ),
            (self.dual_cross_attention, "dual_cross_attention"),
            (
                self.only_cross_attention.as_bool() == Some(true)
                    || self.only_cross_attention.is_array(),
                "only_cross_attention",
            ),
            (
                self.resnet_time_scale_shift != "default",
                "resnet_time_scale_shift other than `default`",
            ),
            (self.act_fn != "silu", "act_fn other than `silu`"),
            (
                self.time_embedding_type != "positional",
                "time_embedding_type other than `positional`",
            ),
            (
                self.conv_in_kernel != 3 || self.conv_out_kernel != 3,
                "conv_in_kernel/conv_out_kernel other than 3",
            ),
            (self.downsample_padding != 1, "downsample_padding other than 1"),
            (
                self.mid_block_type.as_deref() != Some("UNetMidBlock2DCrossAttn"),
                "mid_block_type other than UNetMidBlock2DCrossAttn",
            ),
        ];
        match unsupported.iter().find(|(bad, _)| *bad) {
            Some((_, what)) => Err(format!("{what} is not supported")),
            None => Ok(()),
        }
    }

    /// Attention heads per block (diffusers' `num_attention_heads or attention_head_dim`).
    pub fn heads(&self) -> Vec<usize> {
        let n = self.block_out_channels.len();
        self.num_attention_heads.as_ref().unwrap_or(&self.attention_head_dim).resolve(n)
    }

    fn has_cross_attention(kind: &str) -> bool {
        kind.starts_with("CrossAttn")
    }
}

/// One level of the encoder or decoder path: resnet blocks, each followed by a spatial
/// transformer in cross-attention blocks, then a down- or upsampling convolution.
#[derive(Debug, Clone)]
struct Level {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<SpatialTransformer>,
    /// `downsamplers.0.conv` (stride 2) or `upsamplers.0.conv` (after 2x nearest).
    resample: Option<Conv2d>,
}

/// The text-dependent state of a generation: every cross-attention's keys and values for
/// the batch's contexts, in network order (down levels, mid, up levels).
#[derive(Debug, Clone)]
pub struct UNetContext(Vec<ContextKv>);

/// The step-dependent state: each resnet block's conv1 bias with the time embedding added.
struct StepBiases(Vec<Option<Tensor>>);

#[derive(Debug, Clone)]
pub struct UNet {
    conv_in: Conv2d,
    time_linear_1: Linear,
    time_linear_2: Linear,
    down: Vec<Level>,
    mid_resnets: [ResnetBlock; 2],
    mid_attention: SpatialTransformer,
    up: Vec<Level>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
    config: UNetConfig,
}

impl UNet {
    pub fn load(vb: &VarBuilder, config: UNetConfig) -> Result<Self> {
        config.validate().map_err(candle_core::Error::msg)?;
        let c = &config;
        let channels = &c.block_out_channels;
        let n = channels.len();
        let heads = c.heads();
        let depth = c.transformer_layers_per_block.resolve(n);
        let temb = 4 * channels[0];
        let resnet = |scale: f64| ResnetSettings {
            groups: c.norm_num_groups,
            eps: c.norm_eps,
            temb_channels: Some(temb),
            output_scale_factor: scale,
        };
        let transformer = |vb: &VarBuilder, ch: usize, level: usize| {
            SpatialTransformer::load(
                vb,
                ch,
                heads[level],
                depth[level],
                c.cross_attention_dim,
                c.norm_num_groups,
            )
        };

        let mut down = Vec::with_capacity(n);
        for (i, kind) in c.down_block_types.iter().enumerate() {
            let vb = vb.pp(format!("down_blocks.{i}"));
            let c_out = channels[i];
            let mut c_in = if i == 0 { channels[0] } else { channels[i - 1] };
            let mut level = Level { resnets: Vec::new(), attentions: Vec::new(), resample: None };
            for j in 0..c.layers_per_block {
                level.resnets.push(ResnetBlock::load(
                    &vb.pp(format!("resnets.{j}")),
                    c_in,
                    c_out,
                    resnet(1.0),
                )?);
                if UNetConfig::has_cross_attention(kind) {
                    level.attentions.push(transformer(
                        &vb.pp(format!("attentions.{j}")),
                        c_out,
                        i,
                    )?);
                }
                c_in = c_out;
            }
            if i + 1 < n {
                level.resample =
                    Some(Conv2d::load(&vb.pp("downsamplers.0.conv"), c_out, c_out, 3, 2, 1)?);
            }
            down.push(level);
        }

        let last = channels[n - 1];
        let mid = vb.pp("mid_block");
        let mid_resnets = [
            ResnetBlock::load(&mid.pp("resnets.0"), last, last, resnet(c.mid_block_scale_factor))?,
            ResnetBlock::load(&mid.pp("resnets.1"), last, last, resnet(c.mid_block_scale_factor))?,
        ];
        let mid_attention = transformer(&mid.pp("attentions.0"), last, n - 1)?;

        let up_kinds: Vec<String> = if c.up_block_types.is_empty() {
            c.down_block_types.iter().rev().map(|k| k.replace("Down", "Up")).collect()
        } else {
            c.up_block_types.clone()
        };
        let mut up = Vec::with_capacity(n);
        let mut prev_out = last;
        for (i, kind) in up_kinds.iter().enumerate() {
            let vb = vb.pp(format!("up_blocks.{i}"));
            let level_index = n - 1 - i;
            let c_out = channels[level_index];
            let c_skip_last = channels[level_index.saturating_sub(1)];
            let mut level = Level { resnets: Vec::new(), attentions: Vec::new(), resample: None };
            for j in 0..=c.layers_per_block {
                let skip = if j == c.layers_per_block { c_skip_last } else { c_out };
                let c_in = if j == 0 { prev_out } else { c_out };
                level.resnets.push(ResnetBlock::load(
                    &vb.pp(format!("resnets.{j}")),
                    c_in + skip,
                    c_out,
                    resnet(1.0),
                )?);
                if UNetConfig::has_cross_attention(kind) {
                    level.attentions.push(transformer(
                        &vb.pp(format!("attentions.{j}")),
                        c_out,
                        level_index,
                    )?);
                }
            }
            if i + 1 < n {
                level.resample = Some(
                    Conv2d::load(&vb.pp("upsamplers.0.conv"), c_out, c_out, 3, 1, 1)?.upsampling(),
                );
            }
            prev_out = c_out;
            up.push(level);
        }

        Ok(Self {
            conv_in: Conv2d::load(&vb.pp("conv_in"), c.in_channels, channels[0], 3, 1, 1)?,
            time_linear_1: Linear::load(
                &vb.pp("time_embedding.linear_1"),
                channels[0],
                temb,
                true,
            )?,
            time_linear_2: Linear::load(&vb.pp("time_embedding.linear_2"), temb, temb, true)?,
            down,
            mid_resnets,
            mid_attention,
            up,
            norm_out: GroupNorm::load(
                &vb.pp("conv_norm_out"),
                c.norm_num_groups,
                channels[0],
                c.norm_eps,
            )?,
            conv_out: Conv2d::load(&vb.pp("conv_out"), channels[0], c.out_channels, 3, 1, 1)?,
            config: config.clone(),
        })
    }

    fn transformers(&self) -> impl Iterator<Item = &SpatialTransformer> {
        let down = self.down.iter().flat_map(|l| &l.attentions);
        let up = self.up.iter().flat_map(|l| &l.attentions);
        down.chain(std::iter::once(&self.mid_attention)).chain(up)
    }

    fn resnets(&self) -> impl Iterator<Item = &ResnetBlock> {
        let down = self.down.iter().flat_map(|l| &l.resnets);
        let up = self.up.iter().flat_map(|l| &l.resnets);
        down.chain(&self.mid_resnets).chain(up)
    }

    /// Every cross-attention's keys and values for text states `(B, T_ctx, D)` (the text
    /// encoder's layout), one context per image of the batches to come.
    pub fn context(&self, text: &Tensor) -> Result<UNetContext> {
        let context = text.transpose(1, 2)?.contiguous()?;
        Ok(UNetContext(self.transformers().map(|t| t.context_kv(&context)).collect::<Result<_>>()?))
    }

    /// diffusers' `get_timestep_embedding` (in f32, as PyTorch computes it: at t = 999 an
    /// f64 argument would move the sines by 1e-4), then the time MLP and SiLU:
    /// `(1, 4*C0, 1)`.
    fn time_embedding(&self, timestep: f64, dtype: DType, device: &Device) -> Result<Tensor> {
        let dim = self.config.block_out_channels[0];
        let half = dim / 2;
        let log_period = -(10_000f64.ln()) as f32;
        let denominator = half as f32 - self.config.freq_shift as f32;
        let (sin, cos): (Vec<f32>, Vec<f32>) = (0..half)
            .map(|i| {
                let arg = timestep as f32 * (log_period * i as f32 / denominator).exp();
                (arg.sin(), arg.cos())
            })
            .unzip();
        let emb =
            if self.config.flip_sin_to_cos { [cos, sin].concat() } else { [sin, cos].concat() };
        let emb = Tensor::from_vec(emb, (1, dim, 1), device)?.to_dtype(dtype)?;
        let h = self.time_linear_1.forward(&emb, None)?.silu()?;
        self.time_linear_2.forward(&h, None)?.silu()
    }

    fn step_biases(&self, timestep: f64, dtype: DType, device: &Device) -> Result<StepBiases> {
        let silu_temb = self.time_embedding(timestep, dtype, device)?;
        Ok(StepBiases(
            self.resnets().map(|r| r.step_bias(Some(&silu_temb))).collect::<Result<_>>()?,
        ))
    }

    /// The noise prediction for latents `(B, C, h, w)` at `timestep`, with `context` from
    /// [`Self::context`] for the same B images.
    pub fn forward(
        &self,
        latents: &Tensor,
        timestep: f64,
        context: &UNetContext,
    ) -> Result<Tensor> {
        let step = self.step_biases(timestep, latents.dtype(), latents.device())?;
        let mut biases = step.0.iter().map(Option::as_ref);
        let mut contexts = context.0.iter();
        let mut next_bias = || biases.next().expect("one bias per resnet block");
        let x = if self.config.center_input_sample {
            ((latents * 2.0)? - 1.0)?
        } else {
            latents.clone()
        };

        let mut x = self.conv_in.forward(&x)?;
        let mut skips = vec![x.clone()];
        for level in &self.down {
            for (j, resnet) in level.resnets.iter().enumerate() {
                x = resnet.forward(&x, next_bias())?;
                if let Some(t) = level.attentions.get(j) {
                    x = t.forward(&x, contexts.next().expect("one context per transformer"))?;
                }
                skips.push(x.clone());
            }
            if let Some(conv) = &level.resample {
                x = conv.forward(&x)?;
                skips.push(x.clone());
            }
        }
        x = self.mid_resnets[0].forward(&x, next_bias())?;
        x = self.mid_attention.forward(&x, contexts.next().expect("the mid block's context"))?;
        x = self.mid_resnets[1].forward(&x, next_bias())?;
        for level in &self.up {
            for (j, resnet) in level.resnets.iter().enumerate() {
                let skip = skips.pop().expect("one skip per up resnet");
                x = resnet.forward(&Tensor::cat(&[&x, &skip], 1)?, next_bias())?;
                if let Some(t) = level.attentions.get(j) {
                    x = t.forward(&x, contexts.next().expect("one context per transformer"))?;
                }
            }
            if let Some(conv) = &level.resample {
                x = conv.forward(&x)?;
            }
        }
        let x = self.norm_out.forward(&x, true)?;
        self.conv_out.forward(&x)
    }
}

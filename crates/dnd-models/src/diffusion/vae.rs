//! The decoder half of diffusers' `AutoencoderKL` (every Stable Diffusion 1.x/2.x VAE),
//! with its `config.json` and weight names: `post_quant_conv`, then `decoder.*`.
//! Generation only decodes, so the encoder's weights are never read.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use super::blocks::{ResnetBlock, ResnetSettings, SpatialAttention};
use super::layers::{Conv2d, GroupNorm, Linear};

/// `vae/config.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct VaeConfig {
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    #[serde(default = "four")]
    pub latent_channels: usize,
    #[serde(default = "three")]
    pub out_channels: usize,
    #[serde(default = "thirty_two")]
    pub norm_num_groups: usize,
    #[serde(default = "scaling")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
    #[serde(default = "yes")]
    pub mid_block_add_attention: bool,
    /// The VAE overflows in f16 (SD 1.x/2.x): decode in f32, as diffusers does.
    #[serde(default = "yes")]
    pub force_upcast: bool,
    #[serde(default)]
    pub up_block_types: Vec<String>,
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
fn scaling() -> f64 {
    0.18215
}
fn yes() -> bool {
    true
}

impl VaeConfig {
    /// How many times smaller than the image the latents are (8 for released VAEs).
    pub fn downscale(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.block_out_channels.is_empty() {
            return Err("block_out_channels is empty".into());
        }
        match self.up_block_types.iter().find(|k| k.as_str() != "UpDecoderBlock2D") {
            Some(k) => Err(format!("up block type `{k}` is not supported (UpDecoderBlock2D only)")),
            None => Ok(()),
        }
    }
}

#[derive(Debug, Clone)]
struct UpLevel {
    resnets: Vec<ResnetBlock>,
    upsample: Option<Conv2d>,
}

/// The VAE decoder: latents `(B, latent, h, w)` to images in `[-1, 1]`, `(B, 3, H, W)`.
#[derive(Debug, Clone)]
pub struct VaeDecoder {
    post_quant_conv: Option<Linear>,
    conv_in: Conv2d,
    mid_resnets: [ResnetBlock; 2],
    mid_attention: Option<SpatialAttention>,
    up: Vec<UpLevel>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
    config: VaeConfig,
}

impl VaeDecoder {
    /// `vb` at the checkpoint's root (it holds `post_quant_conv.*` and `decoder.*`).
    pub fn load(vb: &VarBuilder, config: VaeConfig) -> Result<Self> {
        config.validate().map_err(candle_core::Error::msg)?;
        let c = &config;
        let channels: Vec<usize> = c.block_out_channels.iter().rev().copied().collect();
        let resnet = ResnetSettings {
            groups: c.norm_num_groups,
            eps: 1e-6,
            temb_channels: None,
            output_scale_factor: 1.0,
        };
        let d = vb.pp("decoder");
        let top = channels[0];
        let mid = d.pp("mid_block");
        let mut up = Vec::with_capacity(channels.len());
        let mut prev = top;
        for (i, &c_out) in channels.iter().enumerate() {
            let vb = d.pp(format!("up_blocks.{i}"));
            let resnets = (0..=c.layers_per_block)
                .map(|j| {
                    let c_in = if j == 0 { prev } else { c_out };
                    ResnetBlock::load(&vb.pp(format!("resnets.{j}")), c_in, c_out, resnet)
                })
                .collect::<Result<_>>()?;
            let upsample = (i + 1 < channels.len())
                .then(|| {
                    Ok::<_, candle_core::Error>(
                        Conv2d::load(&vb.pp("upsamplers.0.conv"), c_out, c_out, 3, 1, 1)?
                            .upsampling(),
                    )
                })
                .transpose()?;
            up.push(UpLevel { resnets, upsample });
            prev = c_out;
        }
        let last = channels[channels.len() - 1];
        Ok(Self {
            post_quant_conv: c
                .use_post_quant_conv
                .then(|| {
                    Linear::load(
                        &vb.pp("post_quant_conv"),
                        c.latent_channels,
                        c.latent_channels,
                        true,
                    )
                })
                .transpose()?,
            conv_in: Conv2d::load(&d.pp("conv_in"), c.latent_channels, top, 3, 1, 1)?,
            mid_resnets: [
                ResnetBlock::load(&mid.pp("resnets.0"), top, top, resnet)?,
                ResnetBlock::load(&mid.pp("resnets.1"), top, top, resnet)?,
            ],
            mid_attention: c
                .mid_block_add_attention
                .then(|| {
                    SpatialAttention::load(&mid.pp("attentions.0"), top, c.norm_num_groups, 1e-6)
                })
                .transpose()?,
            up,
            norm_out: GroupNorm::load(&d.pp("conv_norm_out"), c.norm_num_groups, last, 1e-6)?,
            conv_out: Conv2d::load(&d.pp("conv_out"), last, c.out_channels, 3, 1, 1)?,
            config,
        })
    }

    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// Decodes latents as the sampler leaves them: divides by `scaling_factor` (and adds
    /// `shift_factor`) first, as diffusers' pipelines do.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let mut z = (latents / self.config.scaling_factor)?;
        if let Some(shift) = self.config.shift_factor {
            z = (z + shift)?;
        }
        if let Some(conv) = &self.post_quant_conv {
            let (b, c, h, w) = z.dims4()?;
            z = conv.forward(&z.reshape((b, c, h * w))?, None)?.reshape((b, c, h, w))?;
        }
        let mut x = self.conv_in.forward(&z)?;
        x = self.mid_resnets[0].forward(&x, None)?;
        if let Some(attention) = &self.mid_attention {
            x = attention.forward(&x)?;
        }
        x = self.mid_resnets[1].forward(&x, None)?;
        for level in &self.up {
            for resnet in &level.resnets {
                x = resnet.forward(&x, None)?;
            }
            if let Some(conv) = &level.upsample {
                x = conv.forward(&x)?;
            }
        }
        let x = self.norm_out.forward(&x, true)?;
        self.conv_out.forward(&x)
    }
}

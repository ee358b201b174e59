//! The blocks the UNet and the VAE share, in diffusers' layout and with its weight names:
//! `ResnetBlock2D`, `Transformer2DModel` with its `BasicTransformerBlock`s, and the VAE's
//! single-head spatial attention.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use super::layers::{Conv2d, GroupNorm, LayerNorm, Linear, attention, gated_gelu, rescale};

/// `ResnetBlock2D`: two 3x3 convolutions after group norm and SiLU, the time embedding
/// (when the model has one) added between them, and a shortcut (1x1 when the channel
/// count changes).
#[derive(Debug, Clone)]
pub struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    shortcut: Option<Linear>,
    /// `time_emb_proj`: the time embedding's projection to this block's channels.
    time_emb_proj: Option<Linear>,
    output_scale_factor: f64,
}

/// What a resnet block's settings are; diffusers' names.
#[derive(Debug, Clone, Copy)]
pub struct ResnetSettings {
    pub groups: usize,
    pub eps: f64,
    /// Width of the time embedding, or `None` (the VAE).
    pub temb_channels: Option<usize>,
    pub output_scale_factor: f64,
}

impl ResnetBlock {
    pub fn load(vb: &VarBuilder, c_in: usize, c_out: usize, s: ResnetSettings) -> Result<Self> {
        let shortcut = (c_in != c_out)
            .then(|| Linear::load(&vb.pp("conv_shortcut"), c_in, c_out, true))
            .transpose()?;
        let time_emb_proj = s
            .temb_channels
            .map(|t| Linear::load(&vb.pp("time_emb_proj"), t, c_out, true))
            .transpose()?;
        Ok(Self {
            norm1: GroupNorm::load(&vb.pp("norm1"), s.groups, c_in, s.eps)?,
            conv1: Conv2d::load(&vb.pp("conv1"), c_in, c_out, 3, 1, 1)?,
            norm2: GroupNorm::load(&vb.pp("norm2"), s.groups, c_out, s.eps)?,
            conv2: Conv2d::load(&vb.pp("conv2"), c_out, c_out, 3, 1, 1)?,
            shortcut,
            time_emb_proj,
            output_scale_factor: s.output_scale_factor,
        })
    }

    /// The first convolution's bias with this step's time embedding added: the
    /// embedding is one vector for every image of a step, so it is folded into the bias
    /// once per step instead of added to every map. `silu_temb` is `silu(temb)` `(1, T, 1)`.
    pub fn step_bias(&self, silu_temb: Option<&Tensor>) -> Result<Option<Tensor>> {
        match (&self.time_emb_proj, silu_temb) {
            (Some(proj), Some(t)) => {
                let projected = proj.forward(t, None)?.flatten_all()?;
                Ok(Some((projected + self.conv1.bias())?))
            }
            _ => Ok(None),
        }
    }

    /// `x` `(B, C_in, H, W)`; `step_bias` from [`Self::step_bias`].
    pub fn forward(&self, x: &Tensor, step_bias: Option<&Tensor>) -> Result<Tensor> {
        let h = self.norm1.forward(x, true)?;
        let h = self.conv1.forward_with(&h, step_bias, None)?;
        let h = self.norm2.forward(&h, true)?;
        let shortcut = match &self.shortcut {
            Some(conv) => {
                let (b, c, hh, w) = x.dims4()?;
                conv.forward(&x.reshape((b, c, hh * w))?, None)?.reshape((
                    b,
                    conv.out_features(),
                    hh,
                    w,
                ))?
            }
            None => x.clone(),
        };
        let y = self.conv2.forward_with(&h, None, Some(&shortcut))?;
        rescale(y, self.output_scale_factor)
    }
}

/// diffusers' `Attention` as a `BasicTransformerBlock` uses it: queries from the tokens,
/// keys and values from the tokens (self-attention) or from the text (cross-attention).
#[derive(Debug, Clone)]
struct Attention {
    /// `to_q`, `to_k`, `to_v` stacked for self-attention; `to_q` alone for cross-attention.
    to_q_or_qkv: Linear,
    /// `to_k` and `to_v` stacked, for cross-attention.
    to_kv: Option<Linear>,
    to_out: Linear,
    heads: usize,
    inner: usize,
}

impl Attention {
    fn load(vb: &VarBuilder, dim: usize, context_dim: Option<usize>, heads: usize) -> Result<Self> {
        let inner = dim;
        let kv_dim = context_dim.unwrap_or(dim);
        let to_q = Linear::load(&vb.pp("to_q"), dim, inner, false)?;
        let to_k = Linear::load(&vb.pp("to_k"), kv_dim, inner, false)?;
        let to_v = Linear::load(&vb.pp("to_v"), kv_dim, inner, false)?;
        let (to_q_or_qkv, to_kv) = match context_dim {
            None => (Linear::stack(&[to_q, to_k, to_v])?, None),
            Some(_) => (to_q, Some(Linear::stack(&[to_k, to_v])?)),
        };
        Ok(Self {
            to_q_or_qkv,
            to_kv,
            to_out: Linear::load(&vb.pp("to_out.0"), inner, dim, true)?,
            heads,
            inner,
        })
    }

    fn scale(&self) -> f64 {
        1.0 / ((self.inner / self.heads) as f64).sqrt()
    }

    /// Keys and values of a cross-attention over `context` `(B, D_ctx, T_ctx)`:
    /// `(B, 2*inner, T_ctx)`. They depend on the text only, so a generation computes them
    /// once, not at every step.
    fn context_kv(&self, context: &Tensor) -> Result<Option<Tensor>> {
        self.to_kv.as_ref().map(|kv| kv.forward(context, None)).transpose()
    }

    /// `x + attn(x_normed)`: `normed` `(B, C, T)`, `kv` from [`Self::context_kv`].
    fn forward(&self, normed: &Tensor, kv: Option<&Tensor>, residual: &Tensor) -> Result<Tensor> {
        let inner = self.inner;
        let out = match kv {
            None => {
                let qkv = self.to_q_or_qkv.forward(normed, None)?;
                attention(
                    &qkv.narrow(1, 0, inner)?,
                    &qkv.narrow(1, inner, inner)?,
                    &qkv.narrow(1, 2 * inner, inner)?,
                    self.heads,
                    self.scale(),
                )?
            }
            Some(kv) => {
                let q = self.to_q_or_qkv.forward(normed, None)?;
                attention(
                    &q,
                    &kv.narrow(1, 0, inner)?,
                    &kv.narrow(1, inner, inner)?,
                    self.heads,
                    self.scale(),
                )?
            }
        };
        self.to_out.forward(&out, Some(residual))
    }
}

/// `BasicTransformerBlock`: self-attention, cross-attention over the text, GEGLU
/// feed-forward, each after a layer norm and with a residual.
#[derive(Debug, Clone)]
struct TransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    /// `ff.net.0.proj`: to twice the inner width (value and gate).
    ff_in: Linear,
    /// `ff.net.2`.
    ff_out: Linear,
}

impl TransformerBlock {
    fn load(vb: &VarBuilder, dim: usize, context_dim: usize, heads: usize) -> Result<Self> {
        let ff_inner = 4 * dim;
        Ok(Self {
            norm1: LayerNorm::load(&vb.pp("norm1"), dim, 1e-5)?,
            attn1: Attention::load(&vb.pp("attn1"), dim, None, heads)?,
            norm2: LayerNorm::load(&vb.pp("norm2"), dim, 1e-5)?,
            attn2: Attention::load(&vb.pp("attn2"), dim, Some(context_dim), heads)?,
            norm3: LayerNorm::load(&vb.pp("norm3"), dim, 1e-5)?,
            ff_in: Linear::load(&vb.pp("ff.net.0.proj"), dim, 2 * ff_inner, true)?,
            ff_out: Linear::load(&vb.pp("ff.net.2"), ff_inner, dim, true)?,
        })
    }

    fn forward(&self, x: &Tensor, context_kv: &Tensor) -> Result<Tensor> {
        let x = self.attn1.forward(&self.norm1.forward(x)?, None, x)?;
        let x = self.attn2.forward(&self.norm2.forward(&x)?, Some(context_kv), &x)?;
        let hidden = gated_gelu(&self.ff_in.forward(&self.norm3.forward(&x)?, None)?)?;
        self.ff_out.forward(&hidden, Some(&x))
    }
}

/// `Transformer2DModel` (continuous input): group norm, `proj_in`, transformer blocks,
/// `proj_out`, plus the input. `proj_in`/`proj_out` are 1x1 convolutions or linear
/// layers (`use_linear_projection`), the same operation in channel-major layout.
#[derive(Debug, Clone)]
pub struct SpatialTransformer {
    norm: GroupNorm,
    proj_in: Linear,
    blocks: Vec<TransformerBlock>,
    proj_out: Linear,
}

/// The keys and values of every cross-attention of a [`SpatialTransformer`] for one
/// batch of text contexts.
#[derive(Debug, Clone)]
pub struct ContextKv(Vec<Tensor>);

impl SpatialTransformer {
    pub fn load(
        vb: &VarBuilder,
        channels: usize,
        heads: usize,
        depth: usize,
        context_dim: usize,
        groups: usize,
    ) -> Result<Self> {
        let blocks = (0..depth)
            .map(|i| {
                TransformerBlock::load(
                    &vb.pp(format!("transformer_blocks.{i}")),
                    channels,
                    context_dim,
                    heads,
                )
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            norm: GroupNorm::load(&vb.pp("norm"), groups, channels, 1e-6)?,
            proj_in: Linear::load(&vb.pp("proj_in"), channels, channels, true)?,
            blocks,
            proj_out: Linear::load(&vb.pp("proj_out"), channels, channels, true)?,
        })
    }

    /// Keys and values of every block's cross-attention over `context` `(B, D, T_ctx)`.
    pub fn context_kv(&self, context: &Tensor) -> Result<ContextKv> {
        let kvs = self
            .blocks
            .iter()
            .map(|b| Ok(b.attn2.context_kv(context)?.expect("attn2 is a cross-attention")))
            .collect::<Result<_>>()?;
        Ok(ContextKv(kvs))
    }

    pub fn forward(&self, x: &Tensor, kv: &ContextKv) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let residual = x.reshape((b, c, h * w))?;
        let mut tokens = self.proj_in.forward(&self.norm.forward(&residual, false)?, None)?;
        for (block, kv) in self.blocks.iter().zip(&kv.0) {
            tokens = block.forward(&tokens, kv)?;
        }
        self.proj_out.forward(&tokens, Some(&residual))?.reshape((b, c, h, w))
    }
}

/// The VAE's spatial self-attention (diffusers' `Attention` with a group norm and a
/// residual, one head over all channels). Older checkpoints name the projections
/// `query`/`key`/`value`/`proj_attn`; diffusers renames them on load, and so does this.
#[derive(Debug, Clone)]
pub struct SpatialAttention {
    group_norm: GroupNorm,
    to_qkv: Linear,
    to_out: Linear,
    channels: usize,
}

impl SpatialAttention {
    pub fn load(vb: &VarBuilder, channels: usize, groups: usize, eps: f64) -> Result<Self> {
        let names = if vb.contains_tensor("to_q.weight") {
            ["to_q", "to_k", "to_v", "to_out.0"]
        } else {
            ["query", "key", "value", "proj_attn"]
        };
        let linear = |name: &str| Linear::load(&vb.pp(name), channels, channels, true);
        Ok(Self {
            group_norm: GroupNorm::load(&vb.pp("group_norm"), groups, channels, eps)?,
            to_qkv: Linear::stack(&[linear(names[0])?, linear(names[1])?, linear(names[2])?])?,
            to_out: linear(names[3])?,
            channels,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let residual = x.reshape((b, c, h * w))?;
        let qkv = self.to_qkv.forward(&self.group_norm.forward(&residual, false)?, None)?;
        let out = attention(
            &qkv.narrow(1, 0, c)?,
            &qkv.narrow(1, c, c)?,
            &qkv.narrow(1, 2 * c, c)?,
            1,
            1.0 / (self.channels as f64).sqrt(),
        )?;
        self.to_out.forward(&out, Some(&residual))?.reshape((b, c, h, w))
    }
}

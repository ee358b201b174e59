//! Pre-norm transformer blocks shared by the ViT towers of CLIP and BLIP, with Hugging Face
//! weight names (`self_attn.*`, `layer_norm1`, `mlp.fc1`, ...).

use candle_core::{D, DType, Module, Result, Tensor};
use candle_nn::{LayerNorm, Linear, VarBuilder};

/// Activation functions named as in Hugging Face configs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// `x * sigmoid(1.702 x)` (OpenAI CLIP).
    QuickGelu,
    /// The exact (erf) GELU.
    Gelu,
    /// The tanh approximation of GELU (`gelu_pytorch_tanh`, `gelu_new`; timm's `gelu_tanh`).
    #[serde(alias = "gelu_pytorch_tanh", alias = "gelu_new")]
    GeluTanh,
}

impl Activation {
    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Activation::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
            Activation::Gelu => x.gelu_erf(),
            Activation::GeluTanh => x.gelu(),
        }
    }
}

pub fn layer_norm(size: usize, eps: f64, vb: VarBuilder) -> Result<LayerNorm> {
    candle_nn::layer_norm(size, eps, vb)
}

/// Multi-head self-attention. CLIP stores `q_proj`/`k_proj`/`v_proj`/`out_proj`; BLIP's
/// vision tower a fused `qkv` and a `projection`: both load here.
#[derive(Debug, Clone)]
pub struct SelfAttention {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    heads: usize,
}

impl SelfAttention {
    pub fn load(hidden: usize, heads: usize, vb: VarBuilder) -> Result<Self> {
        let (q, k, v, out) = if vb.contains_tensor("qkv.weight") {
            let w = vb.get((3 * hidden, hidden), "qkv.weight")?;
            let b = vb.get(3 * hidden, "qkv.bias")?;
            let part = |i: usize| -> Result<Linear> {
                Ok(Linear::new(
                    w.narrow(0, i * hidden, hidden)?,
                    Some(b.narrow(0, i * hidden, hidden)?),
                ))
            };
            (part(0)?, part(1)?, part(2)?, candle_nn::linear(hidden, hidden, vb.pp("projection"))?)
        } else {
            (
                candle_nn::linear(hidden, hidden, vb.pp("q_proj"))?,
                candle_nn::linear(hidden, hidden, vb.pp("k_proj"))?,
                candle_nn::linear(hidden, hidden, vb.pp("v_proj"))?,
                candle_nn::linear(hidden, hidden, vb.pp("out_proj"))?,
            )
        };
        Ok(Self { q, k, v, out, heads })
    }

    /// From its four projections, e.g. the parts of a fused `qkv` of another layout.
    pub fn from_parts(q: Linear, k: Linear, v: Linear, out: Linear, heads: usize) -> Self {
        Self { q, k, v, out, heads }
    }

    /// `x: (B, T, D)`; `mask`: additive, broadcastable to `(B, heads, T, T)`.
    pub fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let hd = d / self.heads;
        let split = |y: Tensor| y.reshape((b, t, self.heads, hd))?.transpose(1, 2)?.contiguous();
        let q = split((self.q.forward(x)? * (hd as f64).powf(-0.5))?)?;
        let k = split(self.k.forward(x)?)?;
        let v = split(self.v.forward(x)?)?;
        let mut scores = q.matmul(&k.t()?)?;
        if let Some(m) = mask {
            scores = scores.broadcast_add(m)?;
        }
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let y = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, d))?;
        self.out.forward(&y)
    }
}

/// `fc2(act(fc1(x)))`.
#[derive(Debug, Clone)]
pub struct Mlp {
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl Mlp {
    pub fn load(
        hidden: usize,
        intermediate: usize,
        act: Activation,
        vb: VarBuilder,
    ) -> Result<Self> {
        Ok(Self {
            fc1: candle_nn::linear(hidden, intermediate, vb.pp("fc1"))?,
            fc2: candle_nn::linear(intermediate, hidden, vb.pp("fc2"))?,
            act,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&self.act.apply(&self.fc1.forward(x)?)?)
    }
}

/// A pre-norm encoder layer: `x + attn(ln1(x))`, then `x + mlp(ln2(x))`.
#[derive(Debug, Clone)]
pub struct EncoderLayer {
    attn: SelfAttention,
    ln1: LayerNorm,
    mlp: Mlp,
    ln2: LayerNorm,
}

/// The shape of a transformer tower, as its config.json gives it.
#[derive(Debug, Clone, Copy)]
pub struct TowerShape {
    pub hidden: usize,
    pub intermediate: usize,
    pub heads: usize,
    pub layers: usize,
    pub eps: f64,
    pub act: Activation,
}

impl EncoderLayer {
    pub fn load(s: &TowerShape, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            attn: SelfAttention::load(s.hidden, s.heads, vb.pp("self_attn"))?,
            ln1: layer_norm(s.hidden, s.eps, vb.pp("layer_norm1"))?,
            mlp: Mlp::load(s.hidden, s.intermediate, s.act, vb.pp("mlp"))?,
            ln2: layer_norm(s.hidden, s.eps, vb.pp("layer_norm2"))?,
        })
    }

    pub fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let x = (x + self.attn.forward(&self.ln1.forward(x)?, mask)?)?;
        &x + self.mlp.forward(&self.ln2.forward(&x)?)?
    }
}

/// `encoder.layers.{i}` of a tower.
pub fn load_encoder(s: &TowerShape, vb: VarBuilder) -> Result<Vec<EncoderLayer>> {
    (0..s.layers).map(|i| EncoderLayer::load(s, vb.pp(format!("encoder.layers.{i}")))).collect()
}

/// Patch embedding + class token + learned positions: `(B, 3, H, W)` to `(B, 1 + N, D)`.
#[derive(Debug, Clone)]
pub struct PatchEmbedding {
    class: Tensor,
    patch_weight: Tensor,
    patch_bias: Option<Tensor>,
    positions: Tensor,
    patch: usize,
}

impl PatchEmbedding {
    /// CLIP has a bias-free patch convolution and an `nn.Embedding` of positions; BLIP a
    /// biased convolution and a `(1, N+1, D)` parameter.
    pub fn load(hidden: usize, image: usize, patch: usize, vb: VarBuilder) -> Result<Self> {
        let n = (image / patch) * (image / patch) + 1;
        let class = vb.get_unchecked("class_embedding")?.flatten_all()?;
        let patch_weight = vb.get((hidden, 3, patch, patch), "patch_embedding.weight")?;
        let patch_bias = if vb.contains_tensor("patch_embedding.bias") {
            Some(vb.get(hidden, "patch_embedding.bias")?)
        } else {
            None
        };
        let positions = if vb.contains_tensor("position_embedding.weight") {
            vb.get((n, hidden), "position_embedding.weight")?
        } else {
            vb.get((1, n, hidden), "position_embedding")?.squeeze(0)?
        };
        Ok(Self { class, patch_weight, patch_bias, positions, patch })
    }

    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let b = pixels.dim(0)?;
        let mut p = pixels.conv2d(&self.patch_weight, 0, self.patch, 1, 1)?;
        if let Some(bias) = &self.patch_bias {
            p = p.broadcast_add(&bias.reshape((1, (), 1, 1))?)?;
        }
        let p = p.flatten_from(2)?.transpose(1, 2)?; // (B, N, D)
        let d = p.dim(D::Minus1)?;
        let class = self.class.reshape((1, 1, d))?.broadcast_as((b, 1, d))?.to_dtype(p.dtype())?;
        Tensor::cat(&[&class, &p], 1)?.broadcast_add(&self.positions)
    }
}

/// An additive causal mask `(1, 1, T, T)`: 0 on and below the diagonal, -inf above.
pub fn causal_mask(t: usize, dtype: DType, device: &candle_core::Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (1, 1, t, t), device)?.to_dtype(dtype)
}

//! BLIP image captioning (Li et al. 2022), Hugging Face `BlipForConditionalGeneration`
//! layout (`Salesforce/blip-image-captioning-base` and `-large`).
//!
//! Written here rather than taken from candle-transformers, whose BLIP cannot decode a
//! batch (a plain add where positions must broadcast) and recomputes every image's
//! cross-attention keys and values at every generated token. Here the text decoder keeps
//! a self-attention cache and computes the cross-attention keys/values once per batch.

use candle_core::{D, Module, Result, Tensor};
use candle_nn::{Embedding, LayerNorm, Linear, VarBuilder};
use serde::Deserialize;

use crate::transformer::{
    Activation, EncoderLayer, PatchEmbedding, TowerShape, causal_mask, layer_norm, load_encoder,
};

fn gelu() -> Activation {
    Activation::Gelu
}

/// `vision_config`; defaults are transformers' `BlipVisionConfig`.
#[derive(Debug, Clone, Deserialize)]
pub struct BlipVisionConfig {
    #[serde(default = "d768")]
    pub hidden_size: usize,
    #[serde(default = "d3072")]
    pub intermediate_size: usize,
    #[serde(default = "d12")]
    pub num_attention_heads: usize,
    #[serde(default = "d12")]
    pub num_hidden_layers: usize,
    #[serde(default = "d384")]
    pub image_size: usize,
    #[serde(default = "d16")]
    pub patch_size: usize,
    #[serde(default = "eps5")]
    pub layer_norm_eps: f64,
    #[serde(default = "gelu")]
    pub hidden_act: Activation,
}

/// `text_config`; defaults are transformers' `BlipTextConfig`. Token ids come from here,
/// never from constants, so any tokenizer works.
#[derive(Debug, Clone, Deserialize)]
pub struct BlipTextConfig {
    #[serde(default = "d30524")]
    pub vocab_size: usize,
    #[serde(default = "d768")]
    pub hidden_size: usize,
    /// Missing from the `-base` checkpoint's config: then the vision width.
    pub encoder_hidden_size: Option<usize>,
    #[serde(default = "d3072")]
    pub intermediate_size: usize,
    #[serde(default = "d12")]
    pub num_attention_heads: usize,
    #[serde(default = "d12")]
    pub num_hidden_layers: usize,
    #[serde(default = "d512")]
    pub max_position_embeddings: usize,
    #[serde(default = "eps12")]
    pub layer_norm_eps: f64,
    #[serde(default = "gelu")]
    pub hidden_act: Activation,
    #[serde(default = "bos")]
    pub bos_token_id: u32,
    #[serde(default = "sep")]
    pub sep_token_id: u32,
    #[serde(default)]
    pub pad_token_id: u32,
}

#[derive(Debug, Clone, Deserialize)]
pub struct BlipConfig {
    pub text_config: BlipTextConfig,
    pub vision_config: BlipVisionConfig,
}

macro_rules! defaults {
    ($($name:ident = $v:expr),*) => { $(fn $name() -> usize { $v })* };
}
defaults!(d768 = 768, d3072 = 3072, d12 = 12, d384 = 384, d16 = 16, d30524 = 30524, d512 = 512);
fn eps5() -> f64 {
    1e-5
}
fn eps12() -> f64 {
    1e-12
}
fn bos() -> u32 {
    30522
}
fn sep() -> u32 {
    102
}

/// The ViT image encoder; its output (after `post_layernorm`) is what the decoder attends to.
#[derive(Debug, Clone)]
pub struct BlipVision {
    embeddings: PatchEmbedding,
    layers: Vec<EncoderLayer>,
    post_norm: LayerNorm,
}

impl BlipVision {
    pub fn load(c: &BlipVisionConfig, vb: VarBuilder) -> Result<Self> {
        let shape = TowerShape {
            hidden: c.hidden_size,
            intermediate: c.intermediate_size,
            heads: c.num_attention_heads,
            layers: c.num_hidden_layers,
            eps: c.layer_norm_eps,
            act: c.hidden_act,
        };
        Ok(Self {
            embeddings: PatchEmbedding::load(
                c.hidden_size,
                c.image_size,
                c.patch_size,
                vb.pp("embeddings"),
            )?,
            layers: load_encoder(&shape, vb.clone())?,
            post_norm: layer_norm(c.hidden_size, c.layer_norm_eps, vb.pp("post_layernorm"))?,
        })
    }

    /// `(B, 3, S, S)` to `(B, 1 + N, D)`.
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let mut h = self.embeddings.forward(pixels)?;
        for layer in &self.layers {
            h = layer.forward(&h, None)?;
        }
        self.post_norm.forward(&h)
    }
}

/// BERT attention (`query`/`key`/`value`) followed by its output block
/// (`output.dense`, `output.LayerNorm`, residual): post-norm.
#[derive(Debug, Clone)]
struct BertAttention {
    query: Linear,
    key: Linear,
    value: Linear,
    dense: Linear,
    norm: LayerNorm,
    heads: usize,
}

impl BertAttention {
    fn load(hidden: usize, kv_in: usize, heads: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            query: candle_nn::linear(hidden, hidden, vb.pp("self.query"))?,
            key: candle_nn::linear(kv_in, hidden, vb.pp("self.key"))?,
            value: candle_nn::linear(kv_in, hidden, vb.pp("self.value"))?,
            dense: candle_nn::linear(hidden, hidden, vb.pp("output.dense"))?,
            norm: layer_norm(hidden, eps, vb.pp("output.LayerNorm"))?,
            heads,
        })
    }

    fn split(&self, y: &Tensor) -> Result<Tensor> {
        let (b, t, d) = y.dims3()?;
        y.reshape((b, t, self.heads, d / self.heads))?.transpose(1, 2)?.contiguous()
    }

    /// Keys and values of `source`, split into heads: `(B, heads, T, hd)` each.
    fn keys_values(&self, source: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((self.split(&self.key.forward(source)?)?, self.split(&self.value.forward(source)?)?))
    }

    /// `LayerNorm(x + dense(attention(x, k, v)))`.
    fn forward(&self, x: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let hd = d / self.heads;
        let q = self.split(&self.query.forward(x)?)?;
        let mut scores = (q.matmul(&k.t()?)? * (hd as f64).powf(-0.5))?;
        if let Some(m) = mask {
            scores = scores.broadcast_add(m)?;
        }
        let y = candle_nn::ops::softmax_last_dim(&scores)?
            .matmul(v)?
            .transpose(1, 2)?
            .reshape((b, t, d))?;
        self.norm.forward(&(self.dense.forward(&y)? + x)?)
    }
}

#[derive(Debug, Clone)]
struct DecoderLayer {
    self_attn: BertAttention,
    cross_attn: BertAttention,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
    act: Activation,
}

/// Per layer: the self-attention keys/values so far, and the image's cross-attention
/// keys/values, computed once.
pub struct DecoderCache {
    self_kv: Vec<Option<(Tensor, Tensor)>>,
    cross_kv: Vec<(Tensor, Tensor)>,
    /// Tokens already in the cache.
    pub len: usize,
}

/// The BERT text decoder with its language-model head.
#[derive(Debug, Clone)]
pub struct BlipTextDecoder {
    words: Embedding,
    positions: Embedding,
    embed_norm: LayerNorm,
    layers: Vec<DecoderLayer>,
    head_dense: Linear,
    head_norm: LayerNorm,
    head_act: Activation,
    head_decoder: Linear,
}

impl BlipTextDecoder {
    pub fn load(c: &BlipTextConfig, vision_hidden: usize, vb: VarBuilder) -> Result<Self> {
        let h = c.hidden_size;
        let bert = vb.pp("bert");
        let words = candle_nn::embedding(c.vocab_size, h, bert.pp("embeddings.word_embeddings"))?;
        let enc = c.encoder_hidden_size.unwrap_or(vision_hidden);
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let l = bert.pp(format!("encoder.layer.{i}"));
                Ok(DecoderLayer {
                    self_attn: BertAttention::load(
                        h,
                        h,
                        c.num_attention_heads,
                        c.layer_norm_eps,
                        l.pp("attention"),
                    )?,
                    cross_attn: BertAttention::load(
                        h,
                        enc,
                        c.num_attention_heads,
                        c.layer_norm_eps,
                        l.pp("crossattention"),
                    )?,
                    intermediate: candle_nn::linear(
                        h,
                        c.intermediate_size,
                        l.pp("intermediate.dense"),
                    )?,
                    output: candle_nn::linear(c.intermediate_size, h, l.pp("output.dense"))?,
                    output_norm: layer_norm(h, c.layer_norm_eps, l.pp("output.LayerNorm"))?,
                    act: c.hidden_act,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let p = vb.pp("cls.predictions");
        // The output projection is tied to the word embeddings, and its bias to
        // `cls.predictions.bias`; recent transformers versions save only the tied sources.
        let decoder_weight = if p.contains_tensor("decoder.weight") {
            p.get((c.vocab_size, h), "decoder.weight")?
        } else {
            words.embeddings().clone()
        };
        let decoder_bias = if p.contains_tensor("decoder.bias") {
            p.get(c.vocab_size, "decoder.bias")?
        } else {
            p.get(c.vocab_size, "bias")?
        };
        Ok(Self {
            positions: candle_nn::embedding(
                c.max_position_embeddings,
                h,
                bert.pp("embeddings.position_embeddings"),
            )?,
            embed_norm: layer_norm(h, c.layer_norm_eps, bert.pp("embeddings.LayerNorm"))?,
            words,
            layers,
            head_dense: candle_nn::linear(h, h, p.pp("transform.dense"))?,
            head_norm: layer_norm(h, c.layer_norm_eps, p.pp("transform.LayerNorm"))?,
            head_act: c.hidden_act,
            head_decoder: Linear::new(decoder_weight, Some(decoder_bias)),
        })
    }

    /// A cache for decoding against `image` (the vision output `(B, 1 + N, D)`).
    pub fn start(&self, image: &Tensor) -> Result<DecoderCache> {
        let cross_kv =
            self.layers.iter().map(|l| l.cross_attn.keys_values(image)).collect::<Result<_>>()?;
        Ok(DecoderCache { self_kv: vec![None; self.layers.len()], cross_kv, len: 0 })
    }

    /// Logits `(B, T, vocab)` for `ids: (B, T)` following what `cache` holds.
    pub fn forward(&self, ids: &Tensor, cache: &mut DecoderCache) -> Result<Tensor> {
        let (_, t) = ids.dims2()?;
        let positions = Tensor::arange(cache.len as u32, (cache.len + t) as u32, ids.device())?;
        let x = self.words.forward(ids)?.broadcast_add(&self.positions.forward(&positions)?)?;
        let mut h = self.embed_norm.forward(&x)?;
        // New tokens see every cached token and the new ones up to themselves.
        let mask = if t > 1 {
            let causal = causal_mask(t, h.dtype(), h.device())?;
            Some(if cache.len > 0 {
                causal.pad_with_zeros(D::Minus1, cache.len, 0)?
            } else {
                causal
            })
        } else {
            None
        };
        for (i, layer) in self.layers.iter().enumerate() {
            let (k, v) = layer.self_attn.keys_values(&h)?;
            let (k, v) = match cache.self_kv[i].take() {
                Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
                None => (k, v),
            };
            h = layer.self_attn.forward(&h, &k, &v, mask.as_ref())?;
            cache.self_kv[i] = Some((k, v));
            let (ck, cv) = &cache.cross_kv[i];
            h = layer.cross_attn.forward(&h, ck, cv, None)?;
            let inner = layer.act.apply(&layer.intermediate.forward(&h)?)?;
            h = layer.output_norm.forward(&(layer.output.forward(&inner)? + &h)?)?;
        }
        cache.len += t;
        let y = self.head_norm.forward(&self.head_act.apply(&self.head_dense.forward(&h)?)?)?;
        self.head_decoder.forward(&y)
    }
}

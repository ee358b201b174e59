//! Training-only transformer pieces for the zoo's BLIP and CLIP, with Hugging Face weight
//! names, so that what they save is what `dnd_models`' loaders read.
//!
//! Only differentiable candle ops: candle's fused `softmax_last_dim` and `layer_norm` (what
//! the inference code uses) record no backward and would silently freeze every weight
//! before them. Weights are created from a seeded generator (candle's CPU `randn` cannot
//! be seeded), in construction order, so a seed fixes the initial model.

use candle_core::{D, DType, Device, Result, Tensor, Var};
use candle_nn::VarMap;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};

/// How a weight starts.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Init {
    Zeros,
    Ones,
    Const(f32),
    Normal(f32),
}

/// The trainable variables of a model, by Hugging Face name, created reproducibly.
pub(crate) struct Params {
    pub varmap: VarMap,
    rng: ChaCha8Rng,
    device: Device,
}

impl Params {
    pub fn new(seed: u64) -> Self {
        Self { varmap: VarMap::new(), rng: ChaCha8Rng::seed_from_u64(seed), device: Device::Cpu }
    }

    /// A new variable `name` of `dims`; returns the tensor to compute with (gradients reach
    /// the variable through it).
    pub fn get(&mut self, name: &str, dims: &[usize], init: Init) -> Result<Tensor> {
        let n: usize = dims.iter().product();
        let values: Vec<f32> = match init {
            Init::Zeros => vec![0.0; n],
            Init::Ones => vec![1.0; n],
            Init::Const(c) => vec![c; n],
            Init::Normal(std) => {
                let normal = Normal::new(0.0f32, std).map_err(candle_core::Error::wrap)?;
                (0..n).map(|_| normal.sample(&mut self.rng)).collect()
            }
        };
        let var = Var::from_tensor(&Tensor::from_vec(values, dims, &self.device)?)?;
        let tensor = var.as_tensor().clone();
        let previous = self
            .varmap
            .data()
            .lock()
            .expect("the var map lock is never poisoned")
            .insert(name.to_string(), var);
        if previous.is_some() {
            candle_core::bail!("parameter {name} is defined twice");
        }
        Ok(tensor)
    }

    pub fn linear(&mut self, name: &str, input: usize, output: usize, bias: bool) -> Result<Lin> {
        let weight =
            self.get(&format!("{name}.weight"), &[output, input], Init::Normal(INIT_STD))?;
        let bias = if bias {
            Some(self.get(&format!("{name}.bias"), &[output], Init::Zeros)?)
        } else {
            None
        };
        Ok(Lin { weight, bias })
    }

    pub fn norm(&mut self, name: &str, size: usize, eps: f64) -> Result<Norm> {
        Ok(Norm {
            weight: self.get(&format!("{name}.weight"), &[size], Init::Ones)?,
            bias: self.get(&format!("{name}.bias"), &[size], Init::Zeros)?,
            eps,
        })
    }

    /// Sets every variable to the tensor of the same name in `saved`, read from `file` (a
    /// `model.safetensors` this trainer wrote): training resumes from those weights. Fails
    /// naming the first variable the file lacks or holds in another shape.
    pub fn load_tensors(
        &self,
        saved: &std::collections::HashMap<String, Tensor>,
        file: &std::path::Path,
    ) -> Result<()> {
        let data = self.varmap.data().lock().expect("the var map lock is never poisoned");
        let mut names: Vec<&String> = data.keys().collect();
        names.sort();
        for name in names {
            let var = &data[name];
            let Some(value) = saved.get(name) else {
                candle_core::bail!(
                    "{} has no `{name}`: it was not trained with this architecture",
                    file.display()
                );
            };
            if value.dims() != var.dims() {
                candle_core::bail!(
                    "{}: `{name}` is {:?}, the settings make it {:?}: give the settings the \
                     model was trained with (its train.json)",
                    file.display(),
                    value.dims(),
                    var.dims()
                );
            }
            var.set(&value.to_dtype(var.dtype())?)?;
        }
        Ok(())
    }

    /// Number of trainable values.
    pub fn count(&self) -> usize {
        self.varmap.all_vars().iter().map(|v| v.elem_count()).sum()
    }
}

/// Initial standard deviation of weights and embeddings (transformers' `initializer_range`).
pub(crate) const INIT_STD: f32 = 0.02;

/// A layer norm built from differentiable ops (candle's `layer_norm_slow`).
#[derive(Debug, Clone)]
pub(crate) struct Norm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl Norm {
    /// Over the last dimension, as `candle_nn::ops::layer_norm_slow` computes it, with the
    /// affine part through [`repeat_rows`].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let d = dims[dims.len() - 1];
        let n = x.elem_count() / d;
        let x = x.reshape((n, d))?;
        let centred = x.broadcast_sub(&(x.sum_keepdim(1)? / d as f64)?)?;
        let variance = (centred.sqr()?.sum_keepdim(1)? / d as f64)?;
        let normed = centred.broadcast_div(&(variance + self.eps)?.sqrt()?)?;
        ((normed * repeat_rows(&self.weight, n)?)? + repeat_rows(&self.bias, n)?)?.reshape(dims)
    }
}

/// `p` (`k` values) repeated as `n` rows, `(n, k)`: a rank-one matmul, so that its backward
/// is a matmul too. (candle's backward of a broadcasting op sums over the broadcast leading
/// dimensions with a slow strided loop: a fifth of the step time when biases and norms
/// broadcast.)
pub(crate) fn repeat_rows(p: &Tensor, n: usize) -> Result<Tensor> {
    let k = p.elem_count();
    Tensor::ones((n, 1), p.dtype(), p.device())?.matmul(&p.reshape((1, k))?)
}

/// A linear layer `x W^T + b` over the last dimension (Hugging Face `weight`, `bias`).
#[derive(Debug, Clone)]
pub(crate) struct Lin {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Lin {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut dims = x.dims().to_vec();
        let d = dims[dims.len() - 1];
        let n = x.elem_count() / d;
        let mut y = x.reshape((n, d))?.matmul(&self.weight.t()?)?;
        if let Some(b) = &self.bias {
            y = (y + repeat_rows(b, n)?)?;
        }
        let last = dims.len() - 1;
        dims[last] = self.weight.dim(0)?;
        y.reshape(dims)
    }
}

/// Activation functions, named as in Hugging Face configs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Act {
    Gelu,
    QuickGelu,
}

impl Act {
    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Act::Gelu => x.gelu_erf(),
            Act::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Act::Gelu => "gelu",
            Act::QuickGelu => "quick_gelu",
        }
    }
}

fn split_heads(y: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, t, d) = y.dims3()?;
    y.reshape((b, t, heads, d / heads))?.transpose(1, 2)?.contiguous()
}

/// Scaled dot-product attention of `q: (B, T, D)` over `k, v: (B, S, D)` with `heads`
/// heads and an additive `mask` broadcastable to `(B, heads, T, S)`; differentiable softmax.
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let (b, t, d) = q.dims3()?;
    let hd = d / heads;
    let (q, k, v) = (split_heads(q, heads)?, split_heads(k, heads)?, split_heads(v, heads)?);
    let mut scores = (q.matmul(&k.t()?)? * (hd as f64).powf(-0.5))?;
    if let Some(m) = mask {
        scores = scores.broadcast_add(m)?;
    }
    let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
    probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, d))
}

/// An additive causal mask `(1, 1, T, T)`: 0 on and below the diagonal, -inf above.
pub(crate) fn causal_mask(t: usize, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (1, 1, t, t), device)
}

/// The shape of a transformer tower.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TowerSize {
    pub hidden: usize,
    pub intermediate: usize,
    pub heads: usize,
    pub layers: usize,
}

/// The query/key/value projections: BLIP's vision tower fuses them (`qkv`, `projection`),
/// CLIP keeps them apart (`q_proj`, ..., `out_proj`).
enum Qkv {
    Fused(Lin),
    Separate(Lin, Lin, Lin),
}

/// A pre-norm encoder layer (`layer_norm1`, `self_attn`, `layer_norm2`, `mlp.fc1/fc2`).
pub(crate) struct EncoderLayer {
    qkv: Qkv,
    out: Lin,
    ln1: Norm,
    ln2: Norm,
    fc1: Lin,
    fc2: Lin,
    act: Act,
    heads: usize,
}

impl EncoderLayer {
    pub fn new(
        p: &mut Params,
        name: &str,
        s: &TowerSize,
        eps: f64,
        act: Act,
        fused: bool,
    ) -> Result<Self> {
        let h = s.hidden;
        let a = format!("{name}.self_attn");
        let (qkv, out) = if fused {
            (
                Qkv::Fused(p.linear(&format!("{a}.qkv"), h, 3 * h, true)?),
                p.linear(&format!("{a}.projection"), h, h, true)?,
            )
        } else {
            let q = p.linear(&format!("{a}.q_proj"), h, h, true)?;
            let k = p.linear(&format!("{a}.k_proj"), h, h, true)?;
            let v = p.linear(&format!("{a}.v_proj"), h, h, true)?;
            (Qkv::Separate(q, k, v), p.linear(&format!("{a}.out_proj"), h, h, true)?)
        };
        Ok(Self {
            qkv,
            out,
            ln1: p.norm(&format!("{name}.layer_norm1"), h, eps)?,
            ln2: p.norm(&format!("{name}.layer_norm2"), h, eps)?,
            fc1: p.linear(&format!("{name}.mlp.fc1"), h, s.intermediate, true)?,
            fc2: p.linear(&format!("{name}.mlp.fc2"), s.intermediate, h, true)?,
            act,
            heads: s.heads,
        })
    }

    pub fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let y = self.ln1.forward(x)?;
        let (q, k, v) = match &self.qkv {
            Qkv::Fused(l) => {
                let all = l.forward(&y)?;
                let h = x.dim(D::Minus1)?;
                (
                    all.narrow(D::Minus1, 0, h)?,
                    all.narrow(D::Minus1, h, h)?,
                    all.narrow(D::Minus1, 2 * h, h)?,
                )
            }
            Qkv::Separate(q, k, v) => (q.forward(&y)?, k.forward(&y)?, v.forward(&y)?),
        };
        let x = (x + self.out.forward(&attention(&q, &k, &v, self.heads, mask)?)?)?;
        let y = self.fc2.forward(&self.act.apply(&self.fc1.forward(&self.ln2.forward(&x)?)?)?)?;
        x + y
    }
}

/// Which model family a vision tower follows: the names and shapes of its embeddings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum VisionStyle {
    /// Biased patch convolution, `(1, 1, D)` class token, `(1, N + 1, D)` positions, fused
    /// qkv, no pre-norm.
    Blip,
    /// Bias-free patch convolution, `(D)` class token, `position_embedding.weight`,
    /// separate q/k/v, `pre_layrnorm`.
    Clip,
}

/// A ViT image tower up to (not including) `post_layernorm`.
pub(crate) struct VisionTower {
    class: Tensor,
    patch_weight: Tensor,
    patch_bias: Option<Tensor>,
    positions: Tensor,
    pre_norm: Option<Norm>,
    layers: Vec<EncoderLayer>,
    pub post_norm: Norm,
    patch: usize,
    hidden: usize,
}

impl VisionTower {
    /// `name` is the tower's prefix (`vision_model`).
    #[allow(clippy::too_many_arguments)] // the tower's shape, field by field
    pub fn new(
        p: &mut Params,
        name: &str,
        s: &TowerSize,
        image: usize,
        patch: usize,
        eps: f64,
        act: Act,
        style: VisionStyle,
    ) -> Result<Self> {
        let h = s.hidden;
        let n = (image / patch) * (image / patch) + 1;
        let e = format!("{name}.embeddings");
        let blip = style == VisionStyle::Blip;
        let class_dims: &[usize] = if blip { &[1, 1, h] } else { &[h] };
        let class = p.get(&format!("{e}.class_embedding"), class_dims, Init::Normal(INIT_STD))?;
        let patch_weight = p.get(
            &format!("{e}.patch_embedding.weight"),
            &[h, 3, patch, patch],
            Init::Normal(INIT_STD),
        )?;
        let patch_bias = if blip {
            Some(p.get(&format!("{e}.patch_embedding.bias"), &[h], Init::Zeros)?)
        } else {
            None
        };
        let positions = if blip {
            p.get(&format!("{e}.position_embedding"), &[1, n, h], Init::Normal(INIT_STD))?
                .squeeze(0)?
        } else {
            p.get(&format!("{e}.position_embedding.weight"), &[n, h], Init::Normal(INIT_STD))?
        };
        let pre_norm =
            if blip { None } else { Some(p.norm(&format!("{name}.pre_layrnorm"), h, eps)?) };
        let layers = (0..s.layers)
            .map(|i| EncoderLayer::new(p, &format!("{name}.encoder.layers.{i}"), s, eps, act, blip))
            .collect::<Result<Vec<_>>>()?;
        let post_norm = p.norm(&format!("{name}.post_layernorm"), h, eps)?;
        Ok(Self {
            class,
            patch_weight,
            patch_bias,
            positions,
            pre_norm,
            layers,
            post_norm,
            patch,
            hidden: h,
        })
    }

    /// `(B, 3, S, S)` pixels to hidden states `(B, 1 + N, D)` before `post_layernorm`. The
    /// patch convolution (stride = kernel) is a matmul over patches, which trains fast.
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let (b, c, hgt, wid) = pixels.dims4()?;
        let p = self.patch;
        let (gh, gw) = (hgt / p, wid / p);
        let patches = pixels
            .reshape((b, c, gh, p, gw, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .reshape((b, gh * gw, c * p * p))?;
        let n = gh * gw;
        let w = self.patch_weight.reshape((self.hidden, c * p * p))?;
        let mut x = patches.reshape((b * n, c * p * p))?.matmul(&w.t()?)?;
        if let Some(bias) = &self.patch_bias {
            x = (x + repeat_rows(bias, b * n)?)?;
        }
        let x = x.reshape((b, n, self.hidden))?;
        let class = repeat_rows(&self.class, b)?.reshape((b, 1, self.hidden))?;
        let positions = repeat_rows(&self.positions, b)?.reshape((b, n + 1, self.hidden))?;
        let mut h = (Tensor::cat(&[&class, &x], 1)? + positions)?;
        if let Some(norm) = &self.pre_norm {
            h = norm.forward(&h)?;
        }
        for layer in &self.layers {
            h = layer.forward(&h, None)?;
        }
        Ok(h)
    }
}

/// Rows `rows[i]` of `x: (B, T, D)` for each batch row `i`: `(B, D)`.
pub(crate) fn gather_rows(x: &Tensor, rows: &[usize]) -> Result<Tensor> {
    let (b, t, d) = x.dims3()?;
    let index: Vec<u32> = rows.iter().enumerate().map(|(i, &r)| (i * t + r) as u32).collect();
    let index = Tensor::from_vec(index, b, x.device())?;
    x.reshape((b * t, d))?.index_select(&index, 0)
}

/// Weighted mean cross-entropy of `logits: (N, V)` against `targets`, counting only rows
/// whose target is `Some`, each with the weight `weight_of(target)`.
pub(crate) fn masked_cross_entropy(
    logits: &Tensor,
    targets: &[Option<u32>],
    weight_of: impl Fn(u32) -> f32,
) -> Result<Tensor> {
    let (n, v) = logits.dims2()?;
    let mut onehot = vec![0f32; n * v];
    let mut total = 0f64;
    for (i, t) in targets.iter().enumerate() {
        if let Some(t) = t {
            let weight = weight_of(*t);
            onehot[i * v + *t as usize] = weight;
            total += f64::from(weight);
        }
    }
    let onehot = Tensor::from_vec(onehot, (n, v), logits.device())?;
    let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    (logp * onehot)?.sum_all()?.neg()? / total.max(1.0)
}

/// The variables' current values, by name, as saved to `model.safetensors`.
pub(crate) fn named_tensors(varmap: &VarMap) -> std::collections::HashMap<String, Tensor> {
    let data = varmap.data().lock().expect("the var map lock is never poisoned");
    data.iter().map(|(k, v)| (k.clone(), v.as_tensor().detach())).collect()
}

/// Biases whose gradient is zero in exact arithmetic: a key bias adds the same amount to
/// every score of a query's row, which the softmax cancels.
fn softmax_invariant(name: &str) -> bool {
    name.ends_with(".key.bias") || name.ends_with(".k_proj.bias")
}

/// Fails naming every variable whose gradient is missing or zero after a backward pass
/// (key biases excepted: see [`softmax_invariant`]).
pub(crate) fn check_all_gradients(
    varmap: &VarMap,
    grads: &candle_core::backprop::GradStore,
) -> Result<()> {
    let data = varmap.data().lock().expect("the var map lock is never poisoned");
    let mut dead: Vec<&str> = Vec::new();
    for (name, var) in data.iter().filter(|(name, _)| !softmax_invariant(name)) {
        let alive = match grads.get(var.as_tensor()) {
            Some(g) => g.abs()?.sum_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()? > 0.0,
            None => false,
        };
        if !alive {
            dead.push(name);
        }
    }
    dead.sort();
    if dead.is_empty() { Ok(()) } else { candle_core::bail!("no gradient reaches {dead:?}") }
}

/// Learning rate at `step`: linear warm-up, then cosine decay to `final_fraction` of `peak`.
pub(crate) fn learning_rate(
    step: usize,
    steps: usize,
    warmup: usize,
    peak: f64,
    final_fraction: f64,
) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = steps.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).min(1.0);
    let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
    peak * (final_fraction + (1.0 - final_fraction) * cosine)
}

/// Scales all gradients so that their global L2 norm is at most `max_norm`; returns the
/// norm before clipping.
pub(crate) fn clip_gradients(
    varmap: &VarMap,
    grads: &mut candle_core::backprop::GradStore,
    max_norm: f64,
) -> Result<f64> {
    let vars = varmap.all_vars();
    let mut total = 0f64;
    for v in &vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            total += f64::from(g.sqr()?.sum_all()?.to_scalar::<f32>()?);
        }
    }
    let norm = total.sqrt();
    if norm > max_norm && norm.is_finite() {
        let scale = max_norm / norm;
        for v in &vars {
            if let Some(g) = grads.remove(v.as_tensor()) {
                grads.insert(v.as_tensor(), (g * scale)?);
            }
        }
    }
    Ok(norm)
}

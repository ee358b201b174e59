//! The layers of the diffusion models, on candle tensors in channel-major layout: a map is
//! `(B, C, H, W)` and a token sequence `(B, C, T)`, so a linear layer is a 1x1 convolution
//! and nothing is ever transposed between the convolutional and the attention parts.
//!
//! On the CPU in f32 every layer runs on its own kernels (the fused convolution of
//! `conv.rs`, the vectorised passes of `kernels.rs`, blocked attention over strided GEMMs)
//! and works image by image, with splits that depend on one image's shape only: an
//! image's result is the same bits whatever else is in its batch. On other devices and
//! dtypes each layer is candle's ops, normalisation and softmax in f32.

use candle_core::{D, DType, Device, Layout, Result, Tensor};
use candle_nn::VarBuilder;
use gemm::Parallelism;
use rayon::prelude::*;

use crate::conv::{ConvGeometry, SendPtr, conv2d_fused, cpu_f32, output_buffer};
use crate::kernels;
use crate::winograd::{self, WinogradKernel};

/// True when the fast CPU kernels apply.
fn on_host(t: &Tensor) -> bool {
    matches!(t.device(), Device::Cpu) && t.dtype() == DType::F32
}

/// For a `(B, R, T)` tensor whose images are each contiguous (a narrow along R keeps
/// that), the offset of image 0 and the distance between images.
fn image_strides(layout: &Layout) -> Option<(usize, usize)> {
    match (layout.dims(), layout.stride()) {
        ([_, r, t], [s0, s1, 1]) if *s1 == *t || *r == 1 => Some((layout.start_offset(), *s0)),
        _ => None,
    }
}

/// A convolution's kernel as the layer computes with it.
#[derive(Debug, Clone)]
enum Kernel {
    /// `(out, in, k, k)`, PyTorch's layout (im2col + GEMM on the CPU, candle elsewhere).
    Direct(Tensor),
    /// A 3x3 stride-1 kernel on the CPU, in the Winograd domain (the only copy kept).
    Winograd(WinogradKernel),
}

/// A convolution with bias (a linear layer is one with a 1x1 kernel).
#[derive(Debug, Clone)]
pub struct Conv2d {
    kernel: Kernel,
    bias: Tensor,
    geometry: ConvGeometry,
}

/// Fewest input and output channels for which a 3x3 convolution uses Winograd (measured
/// with `dnd generate` on the tiny fixture: 32/64 channels ran 5-10% faster direct; SD's
/// 320-1280 channels run faster with Winograd).
const WINOGRAD_MIN_CHANNELS: usize = 128;

impl Conv2d {
    /// `weight` `(out, in, k, k)` and `bias` `(out)` under `vb`.
    pub fn load(
        vb: &VarBuilder,
        c_in: usize,
        c_out: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        let weight = vb.get((c_out, c_in, kernel, kernel), "weight")?;
        // Winograd's transforms cost per channel what its GEMMs save per channel pair:
        // below ~128 channels (tiny test models) the direct convolution is as fast or faster.
        let winograd = on_host(&weight)
            && (kernel, stride, padding) == (3, 1, 1)
            && c_in.min(c_out) >= WINOGRAD_MIN_CHANNELS;
        Ok(Self {
            kernel: if winograd {
                Kernel::Winograd(WinogradKernel::new(&weight)?)
            } else {
                Kernel::Direct(weight)
            },
            bias: vb.get(c_out, "bias")?,
            geometry: ConvGeometry::new(stride, padding),
        })
    }

    /// Upsample the input 2x (nearest) before convolving it.
    pub fn upsampling(mut self) -> Self {
        self.geometry.upsample = true;
        self
    }

    pub fn bias(&self) -> &Tensor {
        &self.bias
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, None, None)
    }

    /// `conv(x) + bias + residual`, with `bias` in place of the layer's own when given
    /// (a resnet block adds its time embedding to the bias once per step).
    pub fn forward_with(
        &self,
        x: &Tensor,
        bias: Option<&Tensor>,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        let bias = bias.unwrap_or(&self.bias);
        match &self.kernel {
            Kernel::Winograd(k) => {
                winograd::conv3x3(x, k, bias, residual, self.geometry.upsample, false)
            }
            Kernel::Direct(w) => conv2d_fused(x, w, bias, residual, false, self.geometry),
        }
    }
}

/// A linear layer applied to every token of a channel-major `(B, in, T)` sequence.
#[derive(Debug, Clone)]
pub struct Linear {
    /// `(out, in, 1, 1)`: the convolution kernel it is.
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    /// `weight` `(out, in)` (or a 1x1 convolution's `(out, in, 1, 1)`) and `bias` under
    /// `vb`; a layer without bias gets zeros.
    pub fn load(vb: &VarBuilder, c_in: usize, c_out: usize, with_bias: bool) -> Result<Self> {
        let weight = match vb.get((c_out, c_in), "weight") {
            Ok(w) => w.reshape((c_out, c_in, 1, 1))?,
            Err(_) => vb.get((c_out, c_in, 1, 1), "weight")?,
        };
        let bias = if with_bias {
            vb.get(c_out, "bias")?
        } else {
            Tensor::zeros(c_out, weight.dtype(), weight.device())?
        };
        Ok(Self { weight, bias })
    }

    /// Several linear layers over the same input as one (their outputs stacked in order):
    /// one GEMM instead of several for attention's queries, keys and values.
    pub fn stack(layers: &[Linear]) -> Result<Self> {
        let weights: Vec<&Tensor> = layers.iter().map(|l| &l.weight).collect();
        let biases: Vec<&Tensor> = layers.iter().map(|l| &l.bias).collect();
        Ok(Self { weight: Tensor::cat(&weights, 0)?, bias: Tensor::cat(&biases, 0)? })
    }

    pub fn out_features(&self) -> usize {
        self.bias.dims()[0]
    }

    /// `(B, in, T)` -> `(B, out, T)`, plus `residual` `(B, out, T)` when given.
    pub fn forward(&self, x: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        let (b, c, t) = x.dims3()?;
        let residual = residual.map(|r| r.reshape((b, self.out_features(), t, 1))).transpose()?;
        let y = conv2d_fused(
            &x.reshape((b, c, t, 1))?,
            &self.weight,
            &self.bias,
            residual.as_ref(),
            false,
            ConvGeometry::new(1, 0),
        )?;
        y.reshape((b, self.out_features(), t))
    }
}

/// Group normalisation of `(B, C, ...)`, optionally followed by SiLU.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    pub fn load(vb: &VarBuilder, groups: usize, channels: usize, eps: f64) -> Result<Self> {
        if groups == 0 || !channels.is_multiple_of(groups) {
            candle_core::bail!("group norm: {channels} channels do not split into {groups} groups");
        }
        Ok(Self {
            weight: vb.get(channels, "weight")?,
            bias: vb.get(channels, "bias")?,
            groups,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        if !on_host(x) {
            return self.forward_candle(x, silu);
        }
        let x = x.contiguous()?;
        let dims = x.dims().to_vec();
        let (b, c) = (dims[0], dims[1]);
        let plane: usize = dims[2..].iter().product();
        let per_group = c / self.groups * plane;
        let (xs, xl) = x.storage_and_layout();
        let input = &cpu_f32(&xs, xl.start_offset())?[..b * c * plane];
        let gamma = self.weight.to_vec1::<f32>()?;
        let beta = self.bias.to_vec1::<f32>()?;
        let mut out = output_buffer(input.len());
        let eps = self.eps;
        // One task per (image, group): a group's channels are one contiguous block.
        out.par_chunks_mut(per_group).zip(input.par_chunks(per_group)).enumerate().for_each(
            |(task, (dst, src))| {
                let group = task % self.groups;
                let (mean, var) = kernels::mean_var(src);
                let rstd = (1.0 / (f64::from(var) + eps).sqrt()) as f32;
                let first = group * (c / self.groups);
                for (j, (d, s)) in dst.chunks_mut(plane).zip(src.chunks(plane)).enumerate() {
                    let scale = rstd * gamma[first + j];
                    let shift = beta[first + j] - mean * scale;
                    kernels::scale_shift(s, scale, shift, silu, d);
                }
            },
        );
        drop(xs);
        Tensor::from_vec(out, dims, &Device::Cpu)
    }

    fn forward_candle(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        let dtype = x.dtype();
        let dims = x.dims().to_vec();
        let (b, c) = (dims[0], dims[1]);
        let x = x.to_dtype(DType::F32)?.reshape((b, self.groups, ()))?;
        let mean = x.mean_keepdim(D::Minus1)?;
        let centred = x.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centred.broadcast_div(&(var + self.eps)?.sqrt()?)?.reshape(dims.clone())?;
        let mut shape = vec![1, c];
        shape.extend(std::iter::repeat_n(1, dims.len() - 2));
        let y = normed
            .broadcast_mul(&self.weight.to_dtype(DType::F32)?.reshape(shape.clone())?)?
            .broadcast_add(&self.bias.to_dtype(DType::F32)?.reshape(shape)?)?;
        let y = if silu { y.silu()? } else { y };
        y.to_dtype(dtype)
    }
}

/// Layer normalisation over the channels of each token of `(B, C, T)`.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn load(vb: &VarBuilder, channels: usize, eps: f64) -> Result<Self> {
        Ok(Self { weight: vb.get(channels, "weight")?, bias: vb.get(channels, "bias")?, eps })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, t) = x.dims3()?;
        if !on_host(x) {
            let dtype = x.dtype();
            let y = candle_nn::ops::layer_norm(
                &x.to_dtype(DType::F32)?.transpose(1, 2)?.contiguous()?,
                &self.weight.to_dtype(DType::F32)?,
                &self.bias.to_dtype(DType::F32)?,
                self.eps as f32,
            )?;
            return y.transpose(1, 2)?.contiguous()?.to_dtype(dtype);
        }
        let x = x.contiguous()?;
        let (xs, xl) = x.storage_and_layout();
        let input = &cpu_f32(&xs, xl.start_offset())?[..b * c * t];
        let gamma = self.weight.to_vec1::<f32>()?;
        let beta = self.bias.to_vec1::<f32>()?;
        let mut out = output_buffer(input.len());
        out.par_chunks_mut(c * t).zip(input.par_chunks(c * t)).for_each(|(dst, src)| {
            kernels::layer_norm_columns(src, c, t, &gamma, &beta, self.eps as f32, dst);
        });
        drop(xs);
        Tensor::from_vec(out, (b, c, t), &Device::Cpu)
    }
}

/// `a * gelu(gate)` where `x` is `(B, 2I, T)` holding `a` in its first `I` channels and
/// `gate` in the rest: the activation of a GEGLU feed-forward layer.
pub fn gated_gelu(x: &Tensor) -> Result<Tensor> {
    let (b, c2, t) = x.dims3()?;
    let inner = c2 / 2;
    if !on_host(x) {
        let a = x.narrow(1, 0, inner)?;
        let gate = x.narrow(1, inner, inner)?;
        return a * gate.gelu_erf()?;
    }
    let x = x.contiguous()?;
    let (xs, xl) = x.storage_and_layout();
    let input = &cpu_f32(&xs, xl.start_offset())?[..b * c2 * t];
    let mut out = output_buffer(b * inner * t);
    // Row by row: enough tasks to share even one image between threads.
    out.par_chunks_mut(t).enumerate().for_each(|(row, dst)| {
        let (i, r) = (row / inner, row % inner);
        let base = i * c2 * t;
        let a = &input[base + r * t..base + (r + 1) * t];
        let gate = &input[base + (inner + r) * t..base + (inner + r + 1) * t];
        kernels::gated_gelu(a, gate, dst);
    });
    drop(xs);
    Tensor::from_vec(out, (b, inner, t), &Device::Cpu)
}

/// Queries of one attention block are handled this many at a time: their scores against
/// every key (`QUERY_BLOCK x T_k` floats) stay in the cache, and the full `T_q x T_k`
/// matrix of a head is never materialised.
const QUERY_BLOCK: usize = 64;

/// Multi-head attention `softmax(scale * Q_h^T K_h) V_h^T` for every head `h`, on
/// channel-major `q` `(B, heads*d, T_q)`, `k` and `v` `(B, heads*d, T_k)`; returns
/// `(B, heads*d, T_q)`. Heads are row ranges of the inputs, read in place.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    let (b, inner, tq) = q.dims3()?;
    let (_, _, tk) = k.dims3()?;
    if !inner.is_multiple_of(heads) {
        candle_core::bail!("attention: {inner} channels do not split into {heads} heads");
    }
    let dh = inner / heads;
    if !on_host(q) {
        let dtype = q.dtype();
        let split = |x: &Tensor, t: usize| -> Result<Tensor> {
            x.to_dtype(DType::F32)?.reshape((b, heads, dh, t))?.contiguous()
        };
        let (qh, kh, vh) = (split(q, tq)?, split(k, tk)?, split(v, tk)?);
        let scores = (qh.transpose(2, 3)?.contiguous()?.matmul(&kh)? * scale)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        // (B, H, Tq, Tk) x (B, H, Tk, d) -> (B, H, Tq, d) -> (B, H, d, Tq)
        let out = probs.matmul(&vh.transpose(2, 3)?.contiguous()?)?.transpose(2, 3)?;
        return out.contiguous()?.reshape((b, inner, tq))?.to_dtype(dtype);
    }
    let contiguous_images = |x: &Tensor| -> Result<Tensor> {
        if image_strides(x.layout()).is_some() { Ok(x.clone()) } else { x.contiguous() }
    };
    let (q, k, v) = (contiguous_images(q)?, contiguous_images(k)?, contiguous_images(v)?);
    let (qs, ql) = q.storage_and_layout();
    let (ks, kl) = k.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let strides = |l: &Layout| image_strides(l).expect("made image-contiguous above");
    let ((q0, qstep), (k0, kstep), (v0, vstep)) = (strides(ql), strides(kl), strides(vl));
    let (qd, kd, vd) = (cpu_f32(&qs, 0)?, cpu_f32(&ks, 0)?, cpu_f32(&vs, 0)?);
    let mut out = output_buffer(b * inner * tq);
    let out_ptr = SendPtr(out.as_mut_ptr());
    let blocks = tq.div_ceil(QUERY_BLOCK);
    let tasks = b * heads * blocks;
    let parallelism = if tasks >= rayon::current_num_threads() {
        Parallelism::None
    } else {
        Parallelism::Rayon(0)
    };
    (0..tasks).into_par_iter().for_each_init(
        || vec![0f32; QUERY_BLOCK.min(tq) * tk],
        |scores, task| {
            let (i, h, blk) = (task / (heads * blocks), (task / blocks) % heads, task % blocks);
            let first = blk * QUERY_BLOCK;
            let rows = QUERY_BLOCK.min(tq - first);
            let scores = &mut scores[..rows * tk];
            let qh = &qd[q0 + i * qstep + h * dh * tq + first..];
            let kh = &kd[k0 + i * kstep + h * dh * tk..];
            let vh = &vd[v0 + i * vstep + h * dh * tk..];
            // SAFETY (both GEMMs): every operand is read within its image's `inner x T`
            // block at the strides given; `scores` is rows x tk row-major; the output
            // block (head h's d rows, this task's query columns) is written by this task
            // only.
            unsafe {
                // scores (rows x tk) = scale * Q_h^T (rows x dh) . K_h (dh x tk)
                gemm::gemm(
                    rows,
                    tk,
                    dh,
                    scores.as_mut_ptr(),
                    1,
                    tk as isize,
                    false,
                    qh.as_ptr(),
                    tq as isize,
                    1,
                    kh.as_ptr(),
                    1,
                    tk as isize,
                    0.0,
                    scale as f32,
                    false,
                    false,
                    false,
                    parallelism,
                );
            }
            scores.chunks_exact_mut(tk).for_each(kernels::softmax_in_place);
            unsafe {
                // O_h^T (rows x dh) = P (rows x tk) . V_h^T (tk x dh), written as the
                // (dh x rows) block of head h's rows and this task's columns.
                let dst = out_ptr.get().add(i * inner * tq + h * dh * tq + first);
                gemm::gemm(
                    rows,
                    dh,
                    tk,
                    dst,
                    tq as isize,
                    1,
                    false,
                    scores.as_ptr(),
                    1,
                    tk as isize,
                    vh.as_ptr(),
                    tk as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    parallelism,
                );
            }
        },
    );
    drop((qs, ks, vs));
    Tensor::from_vec(out, (b, inner, tq), &Device::Cpu)
}

/// `y = x / factor` unless the factor is 1 (every released checkpoint).
pub fn rescale(x: Tensor, factor: f64) -> Result<Tensor> {
    if factor == 1.0 { Ok(x) } else { x / factor }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
    }

    fn reference_attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64) -> Tensor {
        let (b, inner, tq) = q.dims3().unwrap();
        let tk = k.dim(2).unwrap();
        let dh = inner / heads;
        let qh =
            q.reshape((b, heads, dh, tq)).unwrap().transpose(2, 3).unwrap().contiguous().unwrap();
        let kh = k.reshape((b, heads, dh, tk)).unwrap().contiguous().unwrap();
        let vh =
            v.reshape((b, heads, dh, tk)).unwrap().transpose(2, 3).unwrap().contiguous().unwrap();
        let p =
            candle_nn::ops::softmax_last_dim(&(qh.matmul(&kh).unwrap() * scale).unwrap()).unwrap();
        p.matmul(&vh)
            .unwrap()
            .transpose(2, 3)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((b, inner, tq))
            .unwrap()
    }

    #[test]
    fn blocked_attention_matches_the_plain_formula() {
        let dev = Device::Cpu;
        for &(b, heads, dh, tq, tk) in &[(2, 2, 4, 70, 70), (1, 3, 5, 130, 7), (3, 1, 8, 9, 65)] {
            let inner = heads * dh;
            let q = Tensor::randn(0f32, 1.0, (b, inner, tq), &dev).unwrap();
            let k = Tensor::randn(0f32, 1.0, (b, inner, tk), &dev).unwrap();
            let v = Tensor::randn(0f32, 1.0, (b, inner, tk), &dev).unwrap();
            let scale = 1.0 / (dh as f64).sqrt();
            let got = attention(&q, &k, &v, heads, scale).unwrap();
            let want = reference_attention(&q, &k, &v, heads, scale);
            assert!(max_diff(&got, &want) < 1e-5, "b={b} heads={heads} tq={tq} tk={tk}");
            // Views into a stacked projection give the same answer as copies.
            if tq == tk {
                let qkv = Tensor::cat(&[&q, &k, &v], 1).unwrap();
                let (qv, kv) =
                    (qkv.narrow(1, 0, inner).unwrap(), qkv.narrow(1, inner, inner).unwrap());
                let vv = qkv.narrow(1, 2 * inner, inner).unwrap();
                let viewed = attention(&qv, &kv, &vv, heads, scale).unwrap();
                assert_eq!(max_diff(&viewed, &got), 0.0);
            }
        }
    }

    #[test]
    fn norms_match_their_definitions() {
        let dev = Device::Cpu;
        let x = (Tensor::randn(0f32, 2.0, (2, 8, 5, 3), &dev).unwrap() + 1.5).unwrap();
        let vb = VarBuilder::from_tensors(
            [
                ("weight".to_string(), Tensor::randn(1f32, 0.2, 8, &dev).unwrap()),
                ("bias".to_string(), Tensor::randn(0f32, 0.2, 8, &dev).unwrap()),
            ]
            .into_iter()
            .collect(),
            DType::F32,
            &dev,
        );
        let gn = GroupNorm::load(&vb, 4, 8, 1e-5).unwrap();
        for silu in [false, true] {
            let got = gn.forward(&x, silu).unwrap();
            let want = gn.forward_candle(&x, silu).unwrap();
            assert!(max_diff(&got, &want) < 1e-5, "silu {silu}");
        }
        let ln = LayerNorm::load(&vb, 8, 1e-5).unwrap();
        let seq = x.reshape((2, 8, 15)).unwrap();
        let got = ln.forward(&seq).unwrap();
        let want = candle_nn::ops::layer_norm(
            &seq.transpose(1, 2).unwrap().contiguous().unwrap(),
            &vb.get(8, "weight").unwrap(),
            &vb.get(8, "bias").unwrap(),
            1e-5,
        )
        .unwrap()
        .transpose(1, 2)
        .unwrap();
        assert!(max_diff(&got, &want) < 1e-5);
        let g = gated_gelu(&seq).unwrap();
        let want = (seq.narrow(1, 0, 4).unwrap()
            * seq.narrow(1, 4, 4).unwrap().gelu_erf().unwrap())
        .unwrap();
        assert!(max_diff(&g, &want) < 1e-5);
    }
}

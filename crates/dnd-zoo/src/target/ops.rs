//! The target network's training ops that candle's CPU backend lacks or runs slowly, each
//! with its backward pass and a test against candle's own op.
//!
//! - [`max_pool_3x3_s2`]: the stem's 3x3 stride-2 max-pool. candle's `max_pool2d` has no
//!   backward when the kernel differs from the stride. [`max_pool_3x3_s2_views`] writes it
//!   from differentiable candle ops (elementwise maxima of stride-2 views of the padded map);
//!   [`max_pool_3x3_s2`] is the same function as one op with an argmax backward, five times
//!   cheaper to differentiate; the tests check all three agree.
//! - [`conv2d`]: im2col and one GEMM forward; backward two GEMMs and a col2im, and no input
//!   gradient where the input needs none (the image). candle's CPU conv2d backward runs a
//!   direct transposed convolution, several times slower, and its output padding is wrong
//!   for non-square inputs.
//! - [`batch_norm_train`]: BatchNorm with batch statistics, forward and analytic backward
//!   in one op each. Composed from candle ops it needs reductions over non-trailing
//!   dimensions, candle's slowest path, several times per layer and pass.

use std::sync::{Arc, Mutex};

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, Device, Layout, Result, Shape, Tensor,
};
use rayon::prelude::*;

/// torchvision's BatchNorm2d epsilon, which dnd's loader folds with.
pub const BN_EPS: f64 = 1e-5;

fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    match layout.contiguous_offsets() {
        Some((a, b)) => Ok(&storage.as_slice::<f32>()?[a..b]),
        None => candle_core::bail!("the training ops need contiguous f32 tensors"),
    }
}

// ---------------------------------------------------------------------------------------
// Max-pool
// ---------------------------------------------------------------------------------------

fn pooled_size(size: usize) -> usize {
    (size - 1) / 2 + 1
}

/// The 3x3 stride-2 max-pool with padding 1 from differentiable candle ops: the maximum of
/// the stride-2 views of the zero-padded map at the three row offsets, then of that at the
/// three column offsets (the 3x3 maximum is separable). Zero padding equals -inf padding
/// for non-negative inputs, which the stem's ReLU guarantees; dnd's loader pads the same.
pub fn max_pool_3x3_s2_views(x: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let (oh, ow) = (pooled_size(h), pooled_size(w));
    // Pad to (2*oh + 2, 2*ow + 2): one row/column before, the rest after. Padded row
    // 2i + r (r = 0, 1, 2) is row-pair i + r / 2, slot r % 2; columns alike.
    let xp = x.pad_with_zeros(2, 1, 2 * oh + 1 - h)?.pad_with_zeros(3, 1, 2 * ow + 1 - w)?;
    let wp = 2 * ow + 2;
    let rows = xp.reshape((n, c, oh + 1, 2, wp))?;
    let row = |pair: usize, slot: usize| {
        rows.narrow(2, pair, oh)?.narrow(3, slot, 1)?.reshape((n, c, oh, wp))
    };
    let by_rows = row(0, 0)?.maximum(&row(0, 1)?)?.maximum(&row(1, 0)?)?;
    let cols = by_rows.reshape((n, c, oh, ow + 1, 2))?;
    let col = |pair: usize, slot: usize| {
        cols.narrow(3, pair, ow)?.narrow(4, slot, 1)?.reshape((n, c, oh, ow))
    };
    col(0, 0)?.maximum(&col(0, 1)?)?.maximum(&col(1, 0)?)
}

/// The 3x3 stride-2 max-pool with zero padding 1 as one op; its backward sends each
/// output's gradient to the first maximum of its window (PyTorch's choice), nothing to the
/// padding.
pub fn max_pool_3x3_s2(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(MaxPool)
}

struct MaxPool;

/// Per output of one `h` x `w` plane: the input index of its window's first maximum, or
/// `None` where the zero padding is larger than every value of the window.
fn argmax_plane(
    plane: &[f32],
    h: usize,
    w: usize,
    mut visit: impl FnMut(usize, Option<usize>, f32),
) {
    let (oh, ow) = (pooled_size(h), pooled_size(w));
    for oy in 0..oh {
        for ox in 0..ow {
            let mut best: Option<(usize, f32)> = None;
            let mut touches_padding = false;
            for dy in 0..3 {
                let Some(y) = (2 * oy + dy).checked_sub(1).filter(|&y| y < h) else {
                    touches_padding = true;
                    continue;
                };
                for dx in 0..3 {
                    let Some(x) = (2 * ox + dx).checked_sub(1).filter(|&x| x < w) else {
                        touches_padding = true;
                        continue;
                    };
                    let v = plane[y * w + x];
                    if best.is_none_or(|(_, b)| v > b) {
                        best = Some((y * w + x, v));
                    }
                }
            }
            let (index, value) = best.expect("every window holds an input pixel");
            if touches_padding && value < 0.0 {
                visit(oy * ow + ox, None, 0.0);
            } else {
                visit(oy * ow + ox, Some(index), value);
            }
        }
    }
}

impl CustomOp1 for MaxPool {
    fn name(&self) -> &'static str {
        "max-pool-3x3-s2"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout)?;
        let (n, c, h, w) = layout.shape().dims4()?;
        let (oh, ow) = (pooled_size(h), pooled_size(w));
        let mut out = vec![0f32; n * c * oh * ow];
        out.par_chunks_mut(oh * ow).zip(x.par_chunks(h * w)).for_each(|(dst, src)| {
            argmax_plane(src, h, w, |o, _, v| dst[o] = v);
        });
        Ok((CpuStorage::F32(out), (n, c, oh, ow).into()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (n, c, h, w) = arg.dims4()?;
        let (oh, ow) = (pooled_size(h), pooled_size(w));
        let x = arg.flatten_all()?.to_vec1::<f32>()?;
        let g = grad.flatten_all()?.to_vec1::<f32>()?;
        let mut dx = vec![0f32; n * c * h * w];
        dx.par_chunks_mut(h * w).zip(x.par_chunks(h * w)).zip(g.par_chunks(oh * ow)).for_each(
            |((dst, src), g)| {
                argmax_plane(src, h, w, |o, i, _| {
                    if let Some(i) = i {
                        dst[i] += g[o];
                    }
                });
            },
        );
        Ok(Some(Tensor::from_vec(dx, (n, c, h, w), arg.device())?))
    }
}

// ---------------------------------------------------------------------------------------
// Convolution
// ---------------------------------------------------------------------------------------

/// Geometry of a square-kernel convolution over an `h` x `w` input.
#[derive(Debug, Clone, Copy)]
struct Unfold {
    k: usize,
    stride: usize,
    padding: usize,
    h: usize,
    w: usize,
}

impl Unfold {
    fn out(&self) -> (usize, usize) {
        (
            (self.h + 2 * self.padding - self.k) / self.stride + 1,
            (self.w + 2 * self.padding - self.k) / self.stride + 1,
        )
    }

    /// Input coordinate of output `o` and kernel offset `j`, if inside the image.
    fn source(&self, o: usize, j: usize, size: usize) -> Option<usize> {
        (o * self.stride + j).checked_sub(self.padding).filter(|&i| i < size)
    }
}

/// `(N, C, H, W)` -> `(C*k*k, N*OH*OW)`: row `(c*k + ky)*k + kx`, column
/// `(n*OH + oy)*OW + ox`, zeros where the kernel overlaps the padding.
fn im2col(x: &[f32], n: usize, c: usize, u: Unfold) -> Vec<f32> {
    let (oh, ow) = u.out();
    let (k, plane, cols) = (u.k, u.h * u.w, n * oh * ow);
    let mut out = vec![0f32; c * k * k * cols];
    out.par_chunks_mut(cols).enumerate().for_each(|(row, dst)| {
        let (ci, ky, kx) = (row / (k * k), row / k % k, row % k);
        let xs: Vec<Option<usize>> = (0..ow).map(|ox| u.source(ox, kx, u.w)).collect();
        for b in 0..n {
            let src = &x[(b * c + ci) * plane..][..plane];
            for oy in 0..oh {
                let Some(iy) = u.source(oy, ky, u.h) else { continue };
                let line = &mut dst[(b * oh + oy) * ow..][..ow];
                for (v, ix) in line.iter_mut().zip(&xs) {
                    if let Some(ix) = ix {
                        *v = src[iy * u.w + ix];
                    }
                }
            }
        }
    });
    out
}

/// The adjoint of [`im2col`]: sums every column entry back onto its input pixel.
fn col2im(cols_data: &[f32], n: usize, c: usize, u: Unfold) -> Vec<f32> {
    let (oh, ow) = u.out();
    let (k, h, w, cols) = (u.k, u.h, u.w, n * oh * ow);
    let mut out = vec![0f32; n * c * h * w];
    out.par_chunks_mut(h * w).enumerate().for_each(|(bc, dst)| {
        let (b, ci) = (bc / c, bc % c);
        for ky in 0..k {
            for kx in 0..k {
                let row = &cols_data[((ci * k + ky) * k + kx) * cols..][..cols];
                for oy in 0..oh {
                    let Some(iy) = u.source(oy, ky, h) else { continue };
                    let line = &row[(b * oh + oy) * ow..][..ow];
                    for (ox, &v) in line.iter().enumerate() {
                        if let Some(ix) = u.source(ox, kx, w) {
                            dst[iy * w + ix] += v;
                        }
                    }
                }
            }
        }
    });
    out
}

/// A bias-free 2-D convolution, `x: (N, C, H, W)`, `weight: (O, C, k, k)`, as im2col and
/// one GEMM; its backward is two GEMMs and a col2im (skipped when `x` needs no gradient).
pub fn conv2d(x: &Tensor, weight: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    let (_, c, h, w) = x.dims4()?;
    let (_, wc, k, kw) = weight.dims4()?;
    if wc != c || kw != k {
        candle_core::bail!(
            "conv2d: input has {c} channels and the kernel shape {:?}",
            weight.dims()
        );
    }
    let op = Conv { unfold: Unfold { k, stride, padding, h, w }, cols: Arc::new(Mutex::new(None)) };
    x.contiguous()?.apply_op2(&weight.contiguous()?, op)
}

struct Conv {
    unfold: Unfold,
    /// The forward pass's im2col matrix, kept for the weight gradient.
    cols: Arc<Mutex<Option<Tensor>>>,
}

impl CustomOp2 for Conv {
    fn name(&self) -> &'static str {
        "conv2d-gemm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, wt) = (contiguous_f32(s1, l1)?, contiguous_f32(s2, l2)?);
        let (n, c, _, _) = l1.shape().dims4()?;
        let (o, ..) = l2.shape().dims4()?;
        let u = self.unfold;
        let (oh, ow) = u.out();
        let depth = c * u.k * u.k;
        let cols = Tensor::from_vec(im2col(x, n, c, u), (depth, n * oh * ow), &Device::Cpu)?;
        let y = Tensor::from_slice(wt, (o, depth), &Device::Cpu)?.matmul(&cols)?;
        let y = y.reshape((o, n, oh * ow))?.transpose(0, 1)?.flatten_all()?.to_vec1::<f32>()?;
        *self.cols.lock().expect("not poisoned") = Some(cols);
        Ok((CpuStorage::F32(y), (n, o, oh, ow).into()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (n, c, _, _) = x.dims4()?;
        let (o, _, k, _) = weight.dims4()?;
        let (oh, ow) = self.unfold.out();
        let cols = self.cols.lock().expect("not poisoned").take();
        let cols = match cols {
            Some(cols) => cols,
            None => {
                let xs = x.flatten_all()?.to_vec1::<f32>()?;
                Tensor::from_vec(
                    im2col(&xs, n, c, self.unfold),
                    (c * k * k, n * oh * ow),
                    &Device::Cpu,
                )?
            }
        };
        // (N, O, OH, OW) -> (O, N*OH*OW), the layout of the GEMM's output.
        let g = grad
            .detach()
            .reshape((n, o, oh * ow))?
            .transpose(0, 1)?
            .contiguous()?
            .reshape((o, n * oh * ow))?;
        let dw = g.matmul(&cols.t()?)?.reshape(weight.dims())?;
        let dx = if x.track_op() {
            let dcols = weight
                .detach()
                .reshape((o, c * k * k))?
                .t()?
                .matmul(&g)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            Some(Tensor::from_vec(col2im(&dcols, n, c, self.unfold), x.dims(), x.device())?)
        } else {
            None
        };
        Ok((dx, Some(dw)))
    }
}

// ---------------------------------------------------------------------------------------
// BatchNorm
// ---------------------------------------------------------------------------------------

/// Per-channel batch moments that a training-mode BatchNorm measured.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Moments {
    pub mean: Vec<f32>,
    /// Biased variance (what normalised the batch).
    pub var: Vec<f32>,
}

/// Training-mode BatchNorm of `x: (N, C, H, W)`: `(x - mean) / sqrt(var + eps) * gamma +
/// beta` with the batch's per-channel moments over N, H and W, which it also returns (for
/// the running statistics; they carry no gradient). Differentiable in all three inputs.
pub fn batch_norm_train(x: &Tensor, gamma: &Tensor, beta: &Tensor) -> Result<(Tensor, Moments)> {
    let moments = Arc::new(Mutex::new(Moments::default()));
    let y = x.contiguous()?.apply_op3(
        &gamma.contiguous()?,
        &beta.contiguous()?,
        BatchNorm { moments: moments.clone() },
    )?;
    let m = moments.lock().expect("not poisoned").clone();
    Ok((y, m))
}

struct BatchNorm {
    moments: Arc<Mutex<Moments>>,
}

impl CustomOp3 for BatchNorm {
    fn name(&self) -> &'static str {
        "batch-norm-train"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, gamma, beta) =
            (contiguous_f32(s1, l1)?, contiguous_f32(s2, l2)?, contiguous_f32(s3, l3)?);
        let (n, c, h, w) = l1.shape().dims4()?;
        let plane = h * w;
        let count = (n * plane) as f64;
        // Two passes in f64 per channel: the mean, then the variance around it.
        let moments: Vec<(f32, f32)> = (0..c)
            .into_par_iter()
            .map(|ci| {
                let planes = || (0..n).map(|b| &x[(b * c + ci) * plane..][..plane]);
                let mean =
                    planes().map(|p| p.iter().map(|&v| f64::from(v)).sum::<f64>()).sum::<f64>()
                        / count;
                let var = planes()
                    .map(|p| p.iter().map(|&v| (f64::from(v) - mean).powi(2)).sum::<f64>())
                    .sum::<f64>()
                    / count;
                (mean as f32, var as f32)
            })
            .collect();
        let affine: Vec<(f32, f32)> = moments
            .iter()
            .zip(gamma.iter().zip(beta))
            .map(|(&(mean, var), (&g, &b))| {
                let scale = g / (var + BN_EPS as f32).sqrt();
                (scale, b - mean * scale)
            })
            .collect();
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(plane).zip(x.par_chunks(plane)).enumerate().for_each(
            |(bc, (dst, src))| {
                let (scale, shift) = affine[bc % c];
                for (d, &v) in dst.iter_mut().zip(src) {
                    *d = v * scale + shift;
                }
            },
        );
        *self.moments.lock().expect("not poisoned") = Moments {
            mean: moments.iter().map(|m| m.0).collect(),
            var: moments.iter().map(|m| m.1).collect(),
        };
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, c, h, w) = x.dims4()?;
        let plane = h * w;
        let count = (n * plane) as f32;
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let gs = grad.flatten_all()?.to_vec1::<f32>()?;
        let gamma = gamma.to_vec1::<f32>()?;
        let Moments { mean, var } = self.moments.lock().expect("not poisoned").clone();
        let inv: Vec<f32> = var.iter().map(|&v| 1.0 / (v + BN_EPS as f32).sqrt()).collect();
        // Per channel: the sums of g (d beta) and of g * x_hat (d gamma).
        let sums: Vec<(f64, f64)> = (0..c)
            .into_par_iter()
            .map(|ci| {
                let (mut sg, mut sgx) = (0f64, 0f64);
                for b in 0..n {
                    let off = (b * c + ci) * plane;
                    for (&xv, &gv) in xs[off..off + plane].iter().zip(&gs[off..off + plane]) {
                        sg += f64::from(gv);
                        sgx += f64::from(gv) * f64::from((xv - mean[ci]) * inv[ci]);
                    }
                }
                (sg, sgx)
            })
            .collect();
        // dx = gamma * inv / M * (M g - sum g - x_hat * sum(g x_hat))
        let mut dx = vec![0f32; xs.len()];
        dx.par_chunks_mut(plane).enumerate().for_each(|(bc, dst)| {
            let ci = bc % c;
            let off = bc * plane;
            let k = gamma[ci] * inv[ci] / count;
            let (sg, sgx) = (sums[ci].0 as f32, sums[ci].1 as f32);
            for (i, d) in dst.iter_mut().enumerate() {
                let x_hat = (xs[off + i] - mean[ci]) * inv[ci];
                *d = k * (count * gs[off + i] - sg - x_hat * sgx);
            }
        });
        let device = x.device();
        let dgamma =
            Tensor::from_vec(sums.iter().map(|s| s.1 as f32).collect::<Vec<_>>(), c, device)?;
        let dbeta =
            Tensor::from_vec(sums.iter().map(|s| s.0 as f32).collect::<Vec<_>>(), c, device)?;
        Ok((Some(Tensor::from_vec(dx, (n, c, h, w), device)?), Some(dgamma), Some(dbeta)))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Var;

    use super::*;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// Gradients of `sum(f(x) * weights)` for each var, weights random so that every
    /// output counts differently.
    fn grads_of(out: &Tensor, vars: &[&Var]) -> Vec<Tensor> {
        let weights = Tensor::randn(0f32, 1.0, out.dims(), out.device()).unwrap();
        let g = (out * weights).unwrap().sum_all().unwrap().backward().unwrap();
        vars.iter().map(|v| g.get(v.as_tensor()).expect("a gradient").clone()).collect()
    }

    #[test]
    fn max_pools_equal_candles_and_each_other() {
        let dev = Device::Cpu;
        for (h, w) in [(8, 8), (7, 9), (1, 2), (48, 48), (5, 6), (47, 48)] {
            let x = Tensor::randn(0f32, 1.0, (2, 3, h, w), &dev).unwrap().relu().unwrap();
            let theirs = x
                .pad_with_zeros(3, 1, 1)
                .unwrap()
                .pad_with_zeros(2, 1, 1)
                .unwrap()
                .max_pool2d_with_stride(3, 2)
                .unwrap();
            for ours in [max_pool_3x3_s2_views(&x).unwrap(), max_pool_3x3_s2(&x).unwrap()] {
                assert_eq!(ours.dims(), theirs.dims(), "{h}x{w}");
                assert_eq!(max_diff(&ours, &theirs), 0.0, "{h}x{w}");
            }
            // Without ties (positive, distinct values) both backward passes agree.
            let v = Var::from_tensor(
                &(Tensor::rand(0f32, 1.0, (2, 3, h, w), &dev).unwrap() + 0.01).unwrap(),
            )
            .unwrap();
            let a = max_pool_3x3_s2_views(v.as_tensor()).unwrap();
            let b = max_pool_3x3_s2(v.as_tensor()).unwrap();
            let weights = Tensor::randn(0f32, 1.0, a.dims(), &dev).unwrap();
            let ga = (&a * &weights).unwrap().sum_all().unwrap().backward().unwrap();
            let gb = (&b * &weights).unwrap().sum_all().unwrap().backward().unwrap();
            assert!(
                max_diff(ga.get(v.as_tensor()).unwrap(), gb.get(v.as_tensor()).unwrap()) < 1e-6,
                "{h}x{w}"
            );
        }
        // The gradient reaches every window's maximum: on a 4x4 ramp the windows' maxima
        // are (1,1)=5, (1,3)=7, (3,1)=13, (3,3)=15.
        let v = Var::from_tensor(
            &Tensor::arange(0f32, 16.0, &dev).unwrap().reshape((1, 1, 4, 4)).unwrap(),
        )
        .unwrap();
        let expected: Vec<f32> =
            (0..16).map(|i| if [5, 7, 13, 15].contains(&i) { 1.0 } else { 0.0 }).collect();
        for pooled in
            [max_pool_3x3_s2_views(v.as_tensor()).unwrap(), max_pool_3x3_s2(v.as_tensor()).unwrap()]
        {
            let grads = pooled.sum_all().unwrap().backward().unwrap();
            assert_eq!(
                grads.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                expected
            );
        }
    }

    #[test]
    fn convolution_matches_candles_with_gradients() {
        let dev = Device::Cpu;
        // Square inputs only for the comparison: candle's own conv2d backward takes the
        // output padding of both axes from the height.
        for (k, stride, padding, size) in
            [(7, 2, 3, 11), (7, 2, 3, 12), (3, 1, 1, 6), (3, 2, 1, 7), (1, 2, 0, 6), (1, 1, 0, 5)]
        {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, size, size), &dev).unwrap())
                .unwrap();
            let wt =
                Var::from_tensor(&Tensor::randn(0f32, 1.0, (4, 3, k, k), &dev).unwrap()).unwrap();
            let ours = conv2d(x.as_tensor(), wt.as_tensor(), stride, padding).unwrap();
            let theirs = x.as_tensor().conv2d(wt.as_tensor(), padding, stride, 1, 1).unwrap();
            assert_eq!(ours.dims(), theirs.dims());
            assert!(
                max_diff(&ours, &theirs) < 1e-4,
                "k{k} s{stride}: {}",
                max_diff(&ours, &theirs)
            );
            let weights = Tensor::randn(0f32, 1.0, ours.dims(), &dev).unwrap();
            let g1 = (&ours * &weights).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (&theirs * &weights).unwrap().sum_all().unwrap().backward().unwrap();
            for v in [&x, &wt] {
                let (a, b) = (g1.get(v.as_tensor()).unwrap(), g2.get(v.as_tensor()).unwrap());
                assert!(
                    max_diff(a, b) < 1e-3,
                    "k{k} s{stride}: gradient differs by {}",
                    max_diff(a, b)
                );
            }
        }
        // Non-square inputs: the forward pass still matches, and an input that is not a
        // variable gets no gradient while the weight still does.
        let x = Tensor::randn(0f32, 1.0, (2, 3, 9, 6), &dev).unwrap();
        let wt = Var::from_tensor(&Tensor::randn(0f32, 1.0, (4, 3, 3, 3), &dev).unwrap()).unwrap();
        let ours = conv2d(&x, wt.as_tensor(), 2, 1).unwrap();
        assert!(max_diff(&ours, &x.conv2d(wt.as_tensor(), 1, 2, 1, 1).unwrap()) < 1e-4);
        assert_eq!(grads_of(&ours, &[&wt])[0].dims(), wt.dims());
    }

    /// BatchNorm in training mode composed of differentiable candle ops.
    fn batch_norm_reference(y: &Tensor, gamma: &Tensor, beta: &Tensor) -> Result<Tensor> {
        let c = y.dim(1)?;
        let mean = y.mean_keepdim(vec![0, 2, 3])?;
        let centered = y.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(vec![0, 2, 3])?;
        let scale =
            (var + BN_EPS)?.sqrt()?.recip()?.broadcast_mul(&gamma.reshape((1, c, 1, 1))?)?;
        centered.broadcast_mul(&scale)?.broadcast_add(&beta.reshape((1, c, 1, 1))?)
    }

    #[test]
    fn batch_norm_matches_its_composition_from_candle_ops() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(
            &(Tensor::randn(0f32, 2.0, (3, 4, 5, 6), &dev).unwrap() + 0.7).unwrap(),
        )
        .unwrap();
        let gamma = Var::from_tensor(&Tensor::randn(1f32, 0.3, 4, &dev).unwrap()).unwrap();
        let beta = Var::from_tensor(&Tensor::randn(0f32, 0.3, 4, &dev).unwrap()).unwrap();
        let (ours, moments) =
            batch_norm_train(x.as_tensor(), gamma.as_tensor(), beta.as_tensor()).unwrap();
        let reference =
            batch_norm_reference(x.as_tensor(), gamma.as_tensor(), beta.as_tensor()).unwrap();
        assert!(max_diff(&ours, &reference) < 1e-5);
        let mean = x
            .as_tensor()
            .mean_keepdim(vec![0, 2, 3])
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(
            moments.mean.iter().zip(&mean).all(|(a, b)| (a - b).abs() < 1e-5),
            "{moments:?} vs {mean:?}"
        );
        let weights = Tensor::randn(0f32, 1.0, ours.dims(), &dev).unwrap();
        let g1 = (&ours * &weights).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (&reference * &weights).unwrap().sum_all().unwrap().backward().unwrap();
        for v in [&x, &gamma, &beta] {
            let (a, b) = (g1.get(v.as_tensor()).unwrap(), g2.get(v.as_tensor()).unwrap());
            assert!(max_diff(a, b) < 1e-4, "gradient differs by {}", max_diff(a, b));
        }
    }
}

//! Inference convolution on the CPU: im2col and one GEMM per image, with the bias, the
//! residual and the ReLU applied in the GEMM's own output pass.
//!
//! candle's CPU conv2d re-lays out the input (NCHW -> NHWC) and the kernel on every call
//! and adds bias, residual and ReLU as separate passes over memory; on ResNet-50 that
//! overhead cost as much as the arithmetic. Weights here stay in PyTorch's
//! `[c_out, c_in, kh, kw]` layout, which already is the GEMM's `[c_out, c_in*kh*kw]`.
//! Other devices and dtypes take candle's path, so results never depend on the backend
//! choice beyond rounding.

use candle_core::{DType, Device, Result, Storage, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

/// Geometry of a convolution (square kernels, equal stride and padding on both axes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvGeometry {
    pub stride: usize,
    pub padding: usize,
    pub groups: usize,
}

/// `act(conv(x, weight) + bias [+ residual])` for `x: (B, C, H, W)`, `weight:
/// (O, C/groups, k, k)`, `bias: (O)`, `residual: (B, O, H', W')`.
pub fn conv2d_fused(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    residual: Option<&Tensor>,
    relu: bool,
    g: ConvGeometry,
) -> Result<Tensor> {
    let fast = matches!(x.device(), Device::Cpu)
        && x.dtype() == DType::F32
        && weight.dtype() == DType::F32
        && g.groups == 1;
    if !fast {
        let mut y = x.conv2d(weight, g.padding, g.stride, 1, g.groups)?;
        y = y.broadcast_add(&bias.reshape((1, (), 1, 1))?)?;
        if let Some(r) = residual {
            y = (y + r)?;
        }
        return if relu { y.relu() } else { Ok(y) };
    }
    let (b, c, h, w) = x.dims4()?;
    let (o, c_k, kh, kw) = weight.dims4()?;
    if c_k != c {
        candle_core::bail!("conv2d: input has {c} channels, the kernel expects {c_k}");
    }
    let oh = (h + 2 * g.padding - kh) / g.stride + 1;
    let ow = (w + 2 * g.padding - kw) / g.stride + 1;
    let x = x.contiguous()?;
    let weight = weight.contiguous()?;
    let bias = bias.contiguous()?;
    let residual = residual.map(Tensor::contiguous).transpose()?;
    if let Some(r) = &residual
        && r.dims() != [b, o, oh, ow]
    {
        candle_core::bail!(
            "conv2d: residual has shape {:?}, the output {:?}",
            r.dims(),
            [b, o, oh, ow]
        );
    }

    let (xs, xl) = x.storage_and_layout();
    let (ws, wl) = weight.storage_and_layout();
    let (bs, bl) = bias.storage_and_layout();
    let rs = residual.as_ref().map(|r| r.storage_and_layout());
    let input = cpu_f32(&xs, xl.start_offset())?;
    let kernel = cpu_f32(&ws, wl.start_offset())?;
    let bias_v = cpu_f32(&bs, bl.start_offset())?;
    let res_v = match &rs {
        Some((s, l)) => Some(cpu_f32(s, l.start_offset())?),
        None => None,
    };

    let (in_plane, out_plane, k) = (c * h * w, o * oh * ow, c * kh * kw);
    let shape = Shape2 { c, h, w, kh, kw, oh, ow, stride: g.stride, padding: g.padding };
    let direct = kh == 1 && kw == 1 && g.stride == 1 && g.padding == 0;
    let mut out = vec![0f32; b * out_plane];
    let threads = rayon::current_num_threads();
    let per_image = |(i, dst): (usize, &mut [f32]), parallelism: Parallelism| {
        let src = &input[i * in_plane..(i + 1) * in_plane];
        let n = oh * ow;
        // Start from bias (+ residual): the GEMM then accumulates into it.
        for (oc, row) in dst.chunks_exact_mut(n).enumerate() {
            match res_v {
                Some(r) => {
                    let r = &r[i * out_plane + oc * n..i * out_plane + (oc + 1) * n];
                    row.iter_mut().zip(r).for_each(|(d, r)| *d = r + bias_v[oc]);
                }
                None => row.fill(bias_v[oc]),
            }
        }
        let col_buf;
        let col: &[f32] = if direct {
            src
        } else {
            col_buf = im2col(src, &shape);
            &col_buf
        };
        // SAFETY: dst is o x n row-major, kernel o x k row-major, col k x n row-major, all
        // within their slices' bounds as checked by the shapes above.
        unsafe {
            gemm::gemm(
                o,
                n,
                k,
                dst.as_mut_ptr(),
                1,
                n as isize,
                true,
                kernel.as_ptr(),
                1,
                k as isize,
                col.as_ptr(),
                1,
                n as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                parallelism,
            );
        }
        if relu {
            dst.iter_mut().for_each(|v| *v = v.max(0.0));
        }
    };
    if b >= threads {
        // One image per thread: no synchronisation inside the GEMMs.
        out.par_chunks_mut(out_plane).enumerate().for_each(|job| per_image(job, Parallelism::None));
    } else {
        out.chunks_mut(out_plane)
            .enumerate()
            .for_each(|job| per_image(job, Parallelism::Rayon(threads)));
    }
    drop((xs, ws, bs, rs));
    Tensor::from_vec(out, (b, o, oh, ow), &Device::Cpu)
}

fn cpu_f32(storage: &Storage, offset: usize) -> Result<&[f32]> {
    match storage {
        Storage::Cpu(s) => Ok(&s.as_slice::<f32>()?[offset..]),
        _ => candle_core::bail!("conv2d fast path called on a non-CPU tensor"),
    }
}

struct Shape2 {
    c: usize,
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    oh: usize,
    ow: usize,
    stride: usize,
    padding: usize,
}

/// Unfolds one image `(C, H, W)` into `(C*kh*kw, OH*OW)`, row `(c*kh + ky)*kw + kx`.
fn im2col(src: &[f32], s: &Shape2) -> Vec<f32> {
    let n = s.oh * s.ow;
    let mut col = vec![0f32; s.c * s.kh * s.kw * n];
    let (p, st) = (s.padding as isize, s.stride as isize);
    col.par_chunks_mut(n).with_min_len(8).enumerate().for_each(|(row_idx, row)| {
        let kx = (row_idx % s.kw) as isize;
        let ky = ((row_idx / s.kw) % s.kh) as isize;
        let ch = row_idx / (s.kw * s.kh);
        let plane = &src[ch * s.h * s.w..(ch + 1) * s.h * s.w];
        // Output columns whose input column `ox*st + kx - p` is inside the image.
        let ox_lo = ((p - kx).max(0) + st - 1) / st;
        let last = s.w as isize - 1 + p - kx; // ox*st <= last
        let ox_hi = if last < 0 { 0 } else { (last / st + 1).min(s.ow as isize) };
        let (ox_lo, ox_hi) = (ox_lo as usize, ox_hi.max(ox_lo as isize) as usize);
        for oy in 0..s.oh {
            let iy = oy as isize * st + ky - p;
            if iy < 0 || iy >= s.h as isize {
                continue;
            }
            let in_row = &plane[iy as usize * s.w..(iy as usize + 1) * s.w];
            let out_row = &mut row[oy * s.ow..(oy + 1) * s.ow];
            let ix0 = (ox_lo as isize * st + kx - p) as usize;
            if s.stride == 1 {
                out_row[ox_lo..ox_hi].copy_from_slice(&in_row[ix0..ix0 + (ox_hi - ox_lo)]);
            } else {
                for (j, ox) in (ox_lo..ox_hi).enumerate() {
                    out_row[ox] = in_row[ix0 + j * s.stride];
                }
            }
        }
    });
    col
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fused CPU path against candle's own ops, over the geometries ResNets use.
    #[test]
    fn fused_conv_matches_candle() {
        let dev = Device::Cpu;
        for &(c, o, k, stride, padding, hw, batch) in &[
            (3, 8, 7, 2, 3, 17, 2),
            (8, 8, 3, 1, 1, 9, 3),
            (8, 16, 3, 2, 1, 10, 1),
            (8, 16, 1, 1, 0, 6, 2),
            (8, 16, 1, 2, 0, 7, 2),
        ] {
            let x = Tensor::randn(0f32, 1.0, (batch, c, hw, hw), &dev).unwrap();
            let wt = Tensor::randn(0f32, 0.3, (o, c, k, k), &dev).unwrap();
            let b = Tensor::randn(0f32, 0.3, o, &dev).unwrap();
            let g = ConvGeometry { stride, padding, groups: 1 };
            let expected = x
                .conv2d(&wt, padding, stride, 1, 1)
                .unwrap()
                .broadcast_add(&b.reshape((1, o, 1, 1)).unwrap())
                .unwrap();
            let res = Tensor::randn(0f32, 1.0, expected.dims(), &dev).unwrap();
            let expected = (expected + &res).unwrap().relu().unwrap();
            let got = conv2d_fused(&x, &wt, &b, Some(&res), true, g).unwrap();
            let diff = (got - expected)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff < 1e-4, "c={c} o={o} k={k} s={stride} p={padding}: {diff}");
        }
    }
}

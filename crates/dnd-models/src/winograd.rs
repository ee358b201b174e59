//! 3x3 stride-1 convolutions on the CPU by Winograd's minimal filtering F(2x2, 3x3)
//! (Lavin and Gray, 2016): each 2x2 block of outputs costs 16 multiplications per
//! input-output channel pair instead of 36, so the GEMMs, which are nearly all of a
//! diffusion UNet's or VAE's time, shrink 2.25x.
//!
//! For every 2x2 output tile the 4x4 input patch `d` becomes `V = B^T d B`, the kernel `g`
//! becomes `U = G g G^T` (once, at load), and the 16 products `M = U .* V` summed over
//! input channels are 16 GEMMs `M_k (O x tiles) = U_k (O x C) . V_k (C x tiles)`; the tile's
//! outputs are `A^T M A`, to which the bias and the residual are added in the same pass.
//! The transforms use only 0, +-1 and +-1/2, so rounding stays that of a direct
//! convolution (PyTorch parity holds at the same tolerances).
//!
//! Work is split into chunks of tiles of one image, sized from that image's shape only,
//! so an image's result does not depend on its batch.

use candle_core::{Device, Result, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use crate::conv::{SendPtr, cpu_f32, output_buffer, with_scratch};
use crate::kernels;

/// Floats of one chunk's transformed input and products (`16 x (C + O) x tiles`).
const CHUNK_FLOATS: usize = 1 << 22;

/// A 3x3 kernel `(O, C, 3, 3)` in the Winograd domain: 16 matrices `U_k (O x C)`.
#[derive(Debug, Clone)]
pub struct WinogradKernel {
    u: Vec<f32>,
    out_channels: usize,
    in_channels: usize,
}

impl WinogradKernel {
    /// `U = G g G^T` for every (output, input) channel pair of an f32 `(O, C, 3, 3)` kernel.
    pub fn new(weight: &Tensor) -> Result<Self> {
        let (o, c, kh, kw) = weight.dims4()?;
        if (kh, kw) != (3, 3) {
            candle_core::bail!("Winograd F(2x2, 3x3) needs a 3x3 kernel, not {kh}x{kw}");
        }
        let g = weight.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let mut u = vec![0f32; 16 * o * c];
        for (pair, g) in g.chunks_exact(9).enumerate() {
            // G g: 4x3, then (G g) G^T: 4x4.
            let mut gg = [[0f32; 3]; 4];
            for col in 0..3 {
                let (g0, g1, g2) = (g[col], g[3 + col], g[6 + col]);
                gg[0][col] = g0;
                gg[1][col] = 0.5 * (g0 + g1 + g2);
                gg[2][col] = 0.5 * (g0 - g1 + g2);
                gg[3][col] = g2;
            }
            for (row, r) in gg.iter().enumerate() {
                let t = [r[0], 0.5 * (r[0] + r[1] + r[2]), 0.5 * (r[0] - r[1] + r[2]), r[2]];
                for (col, v) in t.into_iter().enumerate() {
                    u[(row * 4 + col) * o * c + pair] = v;
                }
            }
        }
        Ok(Self { u, out_channels: o, in_channels: c })
    }

    pub fn out_channels(&self) -> usize {
        self.out_channels
    }
}

/// `conv3x3(x, kernel, padding 1) + bias [+ residual]`, then ReLU when `relu`, for
/// `x: (B, C, H, W)` on the CPU in f32, optionally on `x` upsampled 2x (nearest) first.
pub fn conv3x3(
    x: &Tensor,
    kernel: &WinogradKernel,
    bias: &Tensor,
    residual: Option<&Tensor>,
    upsample: bool,
    relu: bool,
) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let (o, up) = (kernel.out_channels, if upsample { 2 } else { 1 });
    if c != kernel.in_channels {
        candle_core::bail!(
            "conv3x3: input has {c} channels, the kernel expects {}",
            kernel.in_channels
        );
    }
    let (oh, ow) = (h * up, w * up);
    let x = x.contiguous()?;
    let bias = bias.to_vec1::<f32>()?;
    let residual = residual.map(Tensor::contiguous).transpose()?;
    if let Some(r) = &residual
        && r.dims() != [b, o, oh, ow]
    {
        candle_core::bail!(
            "conv3x3: residual has shape {:?}, the output {:?}",
            r.dims(),
            [b, o, oh, ow]
        );
    }
    let (xs, xl) = x.storage_and_layout();
    let input = cpu_f32(&xs, xl.start_offset())?;
    let rs = residual.as_ref().map(|r| r.storage_and_layout());
    let res = match &rs {
        Some((s, l)) => Some(cpu_f32(s, l.start_offset())?),
        None => None,
    };

    let (tiles_y, tiles_x) = (oh.div_ceil(2), ow.div_ceil(2));
    let tiles = tiles_y * tiles_x;
    let per_chunk = (CHUNK_FLOATS / (16 * (c + o))).clamp(16.min(tiles), tiles);
    let chunks = tiles.div_ceil(per_chunk);
    let per_chunk = tiles.div_ceil(chunks);
    let tasks = b * chunks;
    let threads = rayon::current_num_threads();
    let parallelism =
        if tasks >= threads { Parallelism::None } else { Parallelism::Rayon(threads) };
    let geometry = Geometry { c, h, w, up, oh, ow, tiles_x, relu };

    let mut out = output_buffer(b * o * oh * ow);
    let out_ptr = SendPtr(out.as_mut_ptr());
    let multiply_chunk = |scratch: &mut [f32], i: usize, t0: usize, n: usize| {
        let (v, m) = scratch.split_at_mut(16 * c * n);
        let image = &input[i * c * h * w..(i + 1) * c * h * w];
        transform_input(image, &geometry, t0, n, v);
        for k in 0..16 {
            // SAFETY: U_k is o x c row-major, V_k c x n and M_k o x n row-major, each
            // inside its buffer.
            unsafe {
                gemm::gemm(
                    o,
                    n,
                    c,
                    m[k * o * n..].as_mut_ptr(),
                    1,
                    n as isize,
                    false,
                    kernel.u[k * o * c..].as_ptr(),
                    1,
                    c as isize,
                    v[k * c * n..].as_ptr(),
                    1,
                    n as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    parallelism,
                );
            }
        }
        let res = res.map(|r| &r[i * o * oh * ow..(i + 1) * o * oh * ow]);
        // SAFETY: this task writes only the outputs of tiles t0..t0+n of image i.
        let dst = unsafe { out_ptr.get().add(i * o * oh * ow) };
        transform_output(m, &geometry, o, t0, n, &bias, res, dst);
    };
    let run = |task: usize| {
        let (i, chunk) = (task / chunks, task % chunks);
        let t0 = chunk * per_chunk;
        let n = per_chunk.min(tiles - t0);
        with_scratch(16 * (c + o) * n, |scratch| multiply_chunk(scratch, i, t0, n));
    };
    if tasks >= threads {
        (0..tasks).into_par_iter().for_each(run);
    } else {
        (0..tasks).for_each(run);
    }
    drop((xs, rs));
    Tensor::from_vec(out, (b, o, oh, ow), &Device::Cpu)
}

struct Geometry {
    c: usize,
    h: usize,
    w: usize,
    /// 2 when the input is upsampled first (it is then read at half the coordinates).
    up: usize,
    oh: usize,
    ow: usize,
    tiles_x: usize,
    /// ReLU on the outputs, after the bias and the residual.
    relu: bool,
}

impl Geometry {
    /// The tile rows that tiles `t0..t0+n` span, each with its first and last tile column.
    fn rows(&self, t0: usize, n: usize) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
        let (first, last) = (t0 / self.tiles_x, (t0 + n - 1) / self.tiles_x);
        (first..=last).map(move |ty| {
            let x_lo = if ty == first { t0 % self.tiles_x } else { 0 };
            let x_hi = if ty == last { (t0 + n - 1) % self.tiles_x + 1 } else { self.tiles_x };
            (ty, x_lo, x_hi)
        })
    }
}

/// `V_k[c][t]` for tiles `t0..t0+n` of one image: `B^T d B` of each tile's 4x4 input patch
/// (rows and columns `2t-1 .. 2t+2` of the, possibly upsampled, zero-padded input), a row
/// of tiles at a time.
fn transform_input(image: &[f32], g: &Geometry, t0: usize, n: usize, v: &mut [f32]) {
    let plane = g.h * g.w;
    // Input columns -1 ..= 2*tiles_x of a row, split: even[i] is column 2i-1, odd[i] 2i.
    let width = g.tiles_x + 1;
    let mut split = vec![0f32; 8 * width];
    let mut tiles = vec![0f32; 16 * g.tiles_x];
    let column = |row: &[f32], x: isize| -> f32 {
        if x < 0 || x >= g.ow as isize { 0.0 } else { row[x as usize / g.up] }
    };
    for ci in 0..g.c {
        let ch = &image[ci * plane..(ci + 1) * plane];
        for (ty, x_lo, x_hi) in g.rows(t0, n) {
            for (r, pair) in split.chunks_exact_mut(2 * width).enumerate() {
                let y = (2 * ty + r) as isize - 1;
                let (even, odd) = pair.split_at_mut(width);
                if y < 0 || y >= g.oh as isize {
                    even.fill(0.0);
                    odd.fill(0.0);
                    continue;
                }
                let row = &ch[(y as usize / g.up) * g.w..][..g.w];
                for i in 0..width {
                    even[i] = column(row, 2 * i as isize - 1);
                    odd[i] = column(row, 2 * i as isize);
                }
            }
            let count = x_hi - x_lo;
            let part =
                |r: usize, parity: usize| &split[(2 * r + parity) * width + x_lo..][..count + 1];
            let even = [part(0, 0), part(1, 0), part(2, 0), part(3, 0)];
            let odd = [part(0, 1), part(1, 1), part(2, 1), part(3, 1)];
            kernels::winograd_input_tiles(&even, &odd, count, &mut tiles);
            let j0 = ty * g.tiles_x + x_lo - t0;
            for k in 0..16 {
                v[(k * g.c + ci) * n + j0..][..count].copy_from_slice(&tiles[k * count..][..count]);
            }
        }
    }
}

/// The outputs of tiles `t0..t0+n`: `A^T M A` of each tile's 16 products, plus the bias
/// and the residual, written into one image's `(O, OH, OW)` output at `dst`.
#[allow(clippy::too_many_arguments)]
fn transform_output(
    m: &[f32],
    g: &Geometry,
    o: usize,
    t0: usize,
    n: usize,
    bias: &[f32],
    residual: Option<&[f32]>,
    dst: *mut f32,
) {
    let plane = g.oh * g.ow;
    let mut rows = vec![0f32; 4 * g.tiles_x];
    for oc in 0..o {
        for (ty, x_lo, x_hi) in g.rows(t0, n) {
            let (count, j0) = (x_hi - x_lo, ty * g.tiles_x + x_lo - t0);
            let products: [&[f32]; 16] =
                std::array::from_fn(|k| &m[(k * o + oc) * n + j0..][..count]);
            let (top, bottom) = rows.split_at_mut(2 * g.tiles_x);
            kernels::winograd_output_tiles(
                &products,
                &mut top[..2 * count],
                &mut bottom[..2 * count],
            );
            for (r, values) in [&top[..2 * count], &bottom[..2 * count]].into_iter().enumerate() {
                let y = 2 * ty + r;
                if y >= g.oh {
                    continue;
                }
                let x0 = 2 * x_lo;
                let len = (2 * count).min(g.ow - x0);
                let at = oc * plane + y * g.ow + x0;
                // SAFETY: these outputs belong to this task's tiles of this image.
                let out = unsafe { std::slice::from_raw_parts_mut(dst.add(at), len) };
                match residual {
                    Some(res) => {
                        for ((d, &v), &e) in out.iter_mut().zip(values).zip(&res[at..at + len]) {
                            *d = v + bias[oc] + e;
                        }
                    }
                    None => {
                        for (d, &v) in out.iter_mut().zip(values) {
                            *d = v + bias[oc];
                        }
                    }
                }
                if g.relu {
                    for d in out.iter_mut() {
                        *d = d.max(0.0);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conv::{ConvGeometry, conv2d_fused};

    #[test]
    fn winograd_matches_the_direct_convolution() {
        let dev = Device::Cpu;
        for &(b, c, o, h, w, upsample) in &[
            (2, 3, 5, 8, 8, false),
            (1, 4, 6, 7, 5, false),
            (2, 3, 4, 5, 6, true),
            (1, 2, 3, 1, 1, false),
            // 1024 + 1024 channels: chunks of 128 tiles, boundaries inside a row of 15.
            (1, 1024, 1024, 30, 29, false),
        ] {
            let x = Tensor::randn(0f32, 1.0, (b, c, h, w), &dev).unwrap();
            let weight = Tensor::randn(0f32, 0.3, (o, c, 3, 3), &dev).unwrap();
            let bias = Tensor::randn(0f32, 0.3, o, &dev).unwrap();
            let up = if upsample { 2 } else { 1 };
            let res = Tensor::randn(0f32, 1.0, (b, o, h * up, w * up), &dev).unwrap();
            let g = ConvGeometry { upsample, ..ConvGeometry::new(1, 1) };
            let want = conv2d_fused(&x, &weight, &bias, Some(&res), false, g).unwrap();
            let kernel = WinogradKernel::new(&weight).unwrap();
            let got = conv3x3(&x, &kernel, &bias, Some(&res), upsample, false).unwrap();
            let max = |t: Tensor| -> f32 {
                t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
            };
            // Relative to the outputs' scale: 9 * 1024 terms round in another order.
            let diff = max((&got - &want).unwrap()) / max(want.clone()).max(1.0);
            assert!(diff < 1e-5, "b={b} c={c} o={o} {h}x{w} up={upsample}: {diff}");
            // With the ReLU fused (ResNet's convolutions).
            let got = conv3x3(&x, &kernel, &bias, Some(&res), upsample, true).unwrap();
            let diff = max((&got - &want.relu().unwrap()).unwrap()) / max(want).max(1.0);
            assert!(diff < 1e-5, "relu, b={b} c={c} o={o} {h}x{w} up={upsample}: {diff}");
        }
    }
}

//! Inference convolution on the CPU: im2col and GEMM per image, with the bias, the
//! residual and the ReLU applied in the GEMM's own output pass, and an optional nearest
//! 2x upsampling of the input folded into the im2col (the decoder blocks of a UNet or a
//! VAE upsample and convolve in one step; the upsampled map is never materialised).
//!
//! candle's CPU conv2d re-lays out the input (NCHW -> NHWC) and the kernel on every call
//! and adds bias, residual and ReLU as separate passes over memory; on ResNet-50 that
//! overhead cost as much as the arithmetic. Weights here stay in PyTorch's
//! `[c_out, c_in, kh, kw]` layout, which already is the GEMM's `[c_out, c_in*kh*kw]`.
//!
//! Work is split into tiles of whole output rows of one image, sized from that image's
//! shape alone, and every tile is one GEMM: an image's output is therefore the same bits
//! whatever else is in its batch (batch invariance), and large maps (a 512x512 VAE decode)
//! never need an im2col buffer of the whole image. Other devices and dtypes take candle's
//! path, so results never depend on the backend choice beyond rounding.

use candle_core::{DType, Device, Result, Storage, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

/// Geometry of a convolution (square kernels, equal stride and padding on both axes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvGeometry {
    pub stride: usize,
    pub padding: usize,
    pub groups: usize,
    /// Upsample the input 2x (nearest) before convolving it.
    pub upsample: bool,
}

impl ConvGeometry {
    /// Stride and padding, one group, no upsampling.
    pub fn new(stride: usize, padding: usize) -> Self {
        Self { stride, padding, groups: 1, upsample: false }
    }
}

/// Floats of one tile's im2col buffer at most: large enough that the GEMM's packing of
/// the kernel, repeated for every tile, stays small next to its arithmetic, small enough
/// that a 512x512 VAE decode does not hold a gigabyte of im2col.
const TILE_FLOATS: usize = 1 << 22;

thread_local! {
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` on this thread's scratch buffer of `len` floats (contents unspecified). The
/// buffer is kept between calls: a fresh allocation of the size of an im2col tile costs
/// as much in page faults as the work done in it. A nested call (a task that rayon runs
/// while this one waits) gets a buffer of its own.
pub(crate) fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    let mut buffer = SCRATCH.take();
    if buffer.len() < len {
        buffer.resize(len, 0.0);
    }
    let result = f(&mut buffer[..len]);
    SCRATCH.set(buffer);
    result
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
        return conv2d_candle(x, weight, bias, residual, relu, g);
    }
    let (b, c, h, w) = x.dims4()?;
    let (o, c_k, kh, kw) = weight.dims4()?;
    if c_k != c {
        candle_core::bail!("conv2d: input has {c} channels, the kernel expects {c_k}");
    }
    let up = if g.upsample { 2 } else { 1 };
    let shape = Shape2 {
        h,
        w,
        vh: h * up,
        vw: w * up,
        kh,
        kw,
        oh: (h * up + 2 * g.padding - kh) / g.stride + 1,
        ow: (w * up + 2 * g.padding - kw) / g.stride + 1,
        stride: g.stride,
        padding: g.padding,
        up,
    };
    let (oh, ow) = (shape.oh, shape.ow);
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

    let (in_plane, n, k) = (c * h * w, oh * ow, c * kh * kw);
    let out_plane = o * n;
    let direct = kh == 1 && kw == 1 && g.stride == 1 && g.padding == 0 && !g.upsample;
    // Whole output rows per tile, from the image's shape only.
    let rows_per_tile =
        if direct || k * n <= TILE_FLOATS { oh } else { (TILE_FLOATS / (k * ow)).clamp(1, oh) };
    let tiles_per_image = oh.div_ceil(rows_per_tile);
    let tasks = b * tiles_per_image;
    let threads = rayon::current_num_threads();
    let parallelism =
        if tasks >= threads { Parallelism::None } else { Parallelism::Rayon(threads) };

    let mut out = output_buffer(b * out_plane);
    let out_ptr = SendPtr(out.as_mut_ptr());
    let run_tile = |task: usize| {
        let (i, tile) = (task / tiles_per_image, task % tiles_per_image);
        let oy0 = tile * rows_per_tile;
        let oy1 = (oy0 + rows_per_tile).min(oh);
        let (n0, tn) = (oy0 * ow, (oy1 - oy0) * ow);
        let src = &input[i * in_plane..(i + 1) * in_plane];
        // SAFETY: tiles write disjoint column ranges [n0, n0+tn) of each output row of
        // image i, and `out` outlives the parallel loop.
        let dst = unsafe { out_ptr.get().add(i * out_plane + n0) };
        for oc in 0..o {
            // SAFETY: row oc of this tile, inside image i's output plane.
            let row = unsafe { std::slice::from_raw_parts_mut(dst.add(oc * n), tn) };
            match res_v {
                Some(r) => {
                    let r = &r[i * out_plane + oc * n + n0..][..tn];
                    row.iter_mut().zip(r).for_each(|(d, r)| *d = r + bias_v[oc]);
                }
                None => row.fill(bias_v[oc]),
            }
        }
        let multiply = |col: &[f32], col_rs: usize| {
            // SAFETY: dst is o x tn with row stride n inside `out`; kernel is o x k
            // row-major; col is k x tn with row stride col_rs, all within their buffers by
            // the shapes above.
            unsafe {
                gemm::gemm(
                    o,
                    tn,
                    k,
                    dst,
                    1,
                    n as isize,
                    true,
                    kernel.as_ptr(),
                    1,
                    k as isize,
                    col.as_ptr(),
                    1,
                    col_rs as isize,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    parallelism,
                );
            }
        };
        if direct {
            multiply(&src[n0..], n);
        } else {
            with_scratch(k * tn, |col| {
                im2col(src, &shape, oy0, oy1, col);
                multiply(col, tn);
            });
        }
        if relu {
            for oc in 0..o {
                // SAFETY: as above.
                let row = unsafe { std::slice::from_raw_parts_mut(dst.add(oc * n), tn) };
                row.iter_mut().for_each(|v| *v = v.max(0.0));
            }
        }
    };
    if tasks >= threads {
        (0..tasks).into_par_iter().for_each(run_tile);
    } else {
        (0..tasks).for_each(run_tile);
    }
    drop((xs, ws, bs, rs));
    Tensor::from_vec(out, (b, o, oh, ow), &Device::Cpu)
}

/// The same computation with candle's ops, for devices and dtypes the fast path does not
/// cover.
fn conv2d_candle(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    residual: Option<&Tensor>,
    relu: bool,
    g: ConvGeometry,
) -> Result<Tensor> {
    let upsampled;
    let x = if g.upsample {
        let (_, _, h, w) = x.dims4()?;
        upsampled = x.upsample_nearest2d(2 * h, 2 * w)?;
        &upsampled
    } else {
        x
    };
    let mut y = x.conv2d(weight, g.padding, g.stride, 1, g.groups)?;
    y = y.broadcast_add(&bias.reshape((1, (), 1, 1))?)?;
    if let Some(r) = residual {
        y = (y + r)?;
    }
    if relu { y.relu() } else { Ok(y) }
}

/// A raw pointer that parallel tiles share to write their disjoint parts of one buffer.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub(crate) *mut f32);

impl SendPtr {
    /// The pointer (a method, so that closures capture the `Send` wrapper, not the field).
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}
// SAFETY: every user writes through it to disjoint elements only (see the call sites).
unsafe impl Send for SendPtr {}
// SAFETY: as above.
unsafe impl Sync for SendPtr {}

/// A zeroed buffer for an output map. Large ones are asked to be backed by transparent
/// huge pages (Linux, where THP is in `madvise` mode as on most distributions): a 512x512
/// decoder map of 128 channels is 134 MB, and faulting it in 4 KiB pages cost a tenth of
/// the decode; 2 MiB pages make that 512 times fewer faults.
pub(crate) fn output_buffer(len: usize) -> Vec<f32> {
    let buffer = vec![0f32; len];
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let bytes = len * std::mem::size_of::<f32>();
        if bytes >= 4 * HUGE {
            let start = buffer.as_ptr() as usize;
            let aligned = start.next_multiple_of(HUGE);
            let end = (start + bytes) / HUGE * HUGE;
            // SAFETY: advice only, on whole pages inside this allocation, before any write;
            // the kernel may ignore it, and the buffer's contents are zero either way.
            unsafe {
                libc::madvise(aligned as *mut libc::c_void, end - aligned, libc::MADV_HUGEPAGE);
            }
        }
    }
    buffer
}

pub(crate) fn cpu_f32(storage: &Storage, offset: usize) -> Result<&[f32]> {
    match storage {
        Storage::Cpu(s) => Ok(&s.as_slice::<f32>()?[offset..]),
        _ => candle_core::bail!("a CPU fast path was called on a non-CPU tensor"),
    }
}

struct Shape2 {
    h: usize,
    w: usize,
    /// The input's size as the kernel sees it (2x the stored one when upsampling).
    vh: usize,
    vw: usize,
    kh: usize,
    kw: usize,
    oh: usize,
    ow: usize,
    stride: usize,
    padding: usize,
    up: usize,
}

/// Unfolds output rows `oy0..oy1` of one image `(C, H, W)` into `col`, `(C*kh*kw,
/// rows*OW)`, row `(c*kh + ky)*kw + kx`; every element is written (zeros in the padding).
fn im2col(src: &[f32], s: &Shape2, oy0: usize, oy1: usize, col: &mut [f32]) {
    let n = (oy1 - oy0) * s.ow;
    let (p, st) = (s.padding as isize, s.stride as isize);
    for (row_idx, row) in col.chunks_exact_mut(n).enumerate() {
        let kx = (row_idx % s.kw) as isize;
        let ky = ((row_idx / s.kw) % s.kh) as isize;
        let ch = row_idx / (s.kw * s.kh);
        let plane = &src[ch * s.h * s.w..(ch + 1) * s.h * s.w];
        // Output columns whose (virtual) input column `ox*st + kx - p` is inside the image.
        let ox_lo = ((p - kx).max(0) + st - 1) / st;
        let last = s.vw as isize - 1 + p - kx; // ox*st <= last
        let ox_hi = if last < 0 { 0 } else { (last / st + 1).min(s.ow as isize) };
        let (ox_lo, ox_hi) = (ox_lo as usize, ox_hi.max(ox_lo) as usize);
        for oy in oy0..oy1 {
            let iy = oy as isize * st + ky - p;
            let out_row = &mut row[(oy - oy0) * s.ow..(oy - oy0 + 1) * s.ow];
            if iy < 0 || iy >= s.vh as isize {
                out_row.fill(0.0);
                continue;
            }
            out_row[..ox_lo].fill(0.0);
            out_row[ox_hi..].fill(0.0);
            let iy = iy as usize / s.up;
            let in_row = &plane[iy * s.w..(iy + 1) * s.w];
            let ix0 = (ox_lo as isize * st + kx - p) as usize;
            if s.up == 1 && s.stride == 1 {
                out_row[ox_lo..ox_hi].copy_from_slice(&in_row[ix0..ix0 + (ox_hi - ox_lo)]);
            } else {
                for (j, ox) in (ox_lo..ox_hi).enumerate() {
                    out_row[ox] = in_row[(ix0 + j * s.stride) / s.up];
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
    }

    /// The fused CPU path against candle's own ops, over the geometries ResNets, UNets and
    /// VAEs use.
    #[test]
    fn fused_conv_matches_candle() {
        let dev = Device::Cpu;
        for &(c, o, k, stride, padding, hw, batch, upsample) in &[
            (3, 8, 7, 2, 3, 17, 2, false),
            (8, 8, 3, 1, 1, 9, 3, false),
            (8, 16, 3, 2, 1, 10, 1, false),
            (8, 16, 1, 1, 0, 6, 2, false),
            (8, 16, 1, 2, 0, 7, 2, false),
            (8, 4, 3, 1, 1, 5, 2, true),
            (6, 4, 3, 1, 1, 6, 1, true),
        ] {
            let x = Tensor::randn(0f32, 1.0, (batch, c, hw, hw), &dev).unwrap();
            let wt = Tensor::randn(0f32, 0.3, (o, c, k, k), &dev).unwrap();
            let b = Tensor::randn(0f32, 0.3, o, &dev).unwrap();
            let g = ConvGeometry { stride, padding, groups: 1, upsample };
            let expected = conv2d_candle(&x, &wt, &b, None, false, g).unwrap();
            let res = Tensor::randn(0f32, 1.0, expected.dims(), &dev).unwrap();
            let expected = (expected + &res).unwrap().relu().unwrap();
            let got = conv2d_fused(&x, &wt, &b, Some(&res), true, g).unwrap();
            let diff = max_diff(&got, &expected);
            assert!(diff < 1e-4, "c={c} o={o} k={k} s={stride} p={padding} up={upsample}: {diff}");
        }
    }

    /// Large maps are computed in tiles of output rows; the tiles agree with one GEMM over
    /// the whole image, and an image's output does not depend on its batch.
    #[test]
    fn tiles_and_batches_do_not_change_an_image() {
        let dev = Device::Cpu;
        // k = 128*9 = 1152 and n = 64*64 = 4096: 4.7M floats, so two tiles.
        let x = Tensor::randn(0f32, 1.0, (3, 128, 64, 64), &dev).unwrap();
        let wt = Tensor::randn(0f32, 0.1, (16, 128, 3, 3), &dev).unwrap();
        let b = Tensor::randn(0f32, 0.3, 16, &dev).unwrap();
        let g = ConvGeometry::new(1, 1);
        let batched = conv2d_fused(&x, &wt, &b, None, false, g).unwrap();
        let expected = conv2d_candle(&x, &wt, &b, None, false, g).unwrap();
        assert!(max_diff(&batched, &expected) < 1e-4);
        let alone = conv2d_fused(&x.narrow(0, 1, 1).unwrap(), &wt, &b, None, false, g).unwrap();
        let a: Vec<f32> = alone.flatten_all().unwrap().to_vec1().unwrap();
        let bb: Vec<f32> = batched.get(1).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert!(a.iter().zip(&bb).all(|(x, y)| x.to_bits() == y.to_bits()));
    }
}

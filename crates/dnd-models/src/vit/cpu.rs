//! The ViT forward pass on the CPU in f32, on plain slices. The linear layers are
//! [`crate::linear::PackedLinear`]s (weights packed at load time, an AVX-512
//! micro-kernel); attention is `gemm` calls on strided views: each head's query, key and
//! value are read in place from the fused projection's output and its output written in
//! place into the heads' concatenation, so no per-head or transposed copy is made. Biases
//! and the residual ride in the products' output (accumulated into a destination that
//! already holds them).
//!
//! Images are independent: a batch of at least as many images as threads runs one image
//! per task, single-threaded GEMMs inside; a smaller batch runs its images one after the
//! other with threaded GEMMs and the heads in parallel. Both give the same bits, and an
//! image's outputs never depend on the rest of its batch (the vector cache relies on it).

use candle_core::{Device, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use super::params::{CpuParams, HostTensor, Norm, Params};
use super::{HeadInput, Readout, VitConfig};
use crate::conv::{SendPtr, cpu_f32, with_scratch};
use crate::error::ModelError;
use crate::kernels;
use crate::tap::Tap;
use crate::transformer::Activation;

/// Everything one image's pass reads.
struct Pass<'a> {
    config: &'a VitConfig,
    params: &'a Params<HostTensor>,
    packed: &'a CpuParams,
    /// The patch rows of the position table for this input size.
    positions: &'a [f32],
    taps: &'a [Tap],
    readout: Readout,
    height: usize,
    width: usize,
    depth: usize,
}

impl Pass<'_> {
    fn rows_cols(&self) -> (usize, usize) {
        (self.height / self.config.patch_size, self.width / self.config.patch_size)
    }

    fn patches(&self) -> usize {
        let (r, c) = self.rows_cols();
        r * c
    }

    fn tokens(&self) -> usize {
        self.config.prefix_tokens() + self.patches()
    }

    /// Floats one image writes for `tap`.
    fn out_len(&self, tap: Tap) -> usize {
        let width = self.config.tap_width(tap);
        match (tap, self.readout) {
            (Tap::Head, _) | (_, Readout::ClassToken) => width,
            _ => width * self.patches(),
        }
    }

    fn out_shape(&self, tap: Tap, batch: usize) -> Vec<usize> {
        let width = self.config.tap_width(tap);
        let (rows, cols) = self.rows_cols();
        match (tap, self.readout) {
            (Tap::Head, _) | (_, Readout::ClassToken) => vec![batch, width],
            _ => vec![batch, width, rows, cols],
        }
    }
}

/// Runs `x: (B, 3, H, W)` and returns each tap's output as [`super::Vit::forward`] does.
pub(super) fn forward(
    config: &VitConfig,
    packed: &CpuParams,
    positions: &[f32],
    x: &Tensor,
    taps: &[Tap],
    readout: Readout,
) -> Result<Vec<Tensor>, ModelError> {
    let (batch, _, height, width) = x.dims4()?;
    let pass = Pass {
        config,
        params: &packed.params,
        packed,
        positions,
        taps,
        readout,
        height,
        width,
        depth: config.depth(taps),
    };
    let x = x.contiguous()?;
    let (storage, layout) = x.storage_and_layout();
    let pixels = cpu_f32(&storage, layout.start_offset())?;
    let plane = 3 * height * width;

    let mut outs: Vec<Vec<f32>> =
        taps.iter().map(|&t| vec![0f32; batch * pass.out_len(t)]).collect();
    let mut slots: Vec<Vec<&mut [f32]>> =
        (0..batch).map(|_| Vec::with_capacity(taps.len())).collect();
    for (buf, &tap) in outs.iter_mut().zip(taps) {
        for (slot, chunk) in slots.iter_mut().zip(buf.chunks_mut(pass.out_len(tap))) {
            slot.push(chunk);
        }
    }
    let threads = rayon::current_num_threads();
    if batch >= threads {
        slots.into_par_iter().enumerate().for_each(|(i, mut slot)| {
            run_image(&pass, &pixels[i * plane..][..plane], &mut slot, false);
        });
    } else {
        for (i, mut slot) in slots.into_iter().enumerate() {
            run_image(&pass, &pixels[i * plane..][..plane], &mut slot, true);
        }
    }
    drop(storage);
    outs.into_iter()
        .zip(taps)
        .map(|(data, &tap)| Ok(Tensor::from_vec(data, pass.out_shape(tap, batch), &Device::Cpu)?))
        .collect()
}

/// One image through the network, writing each tap's output into its slot; with
/// `parallel`, each product is split over the threads.
fn run_image(pass: &Pass<'_>, image: &[f32], slots: &mut [&mut [f32]], parallel: bool) {
    let c = pass.config;
    let p = pass.params;
    let (t, dim, mlp) = (pass.tokens(), c.hidden_size, c.mlp_size);
    let eps = c.layer_norm_eps as f32;
    let mut x = embed(pass, image, parallel);
    let mut normed = vec![0f32; t * dim];
    if let Some(n) = &p.pre_norm {
        layer_norm(&x, n, eps, &mut normed);
        std::mem::swap(&mut x, &mut normed);
    }
    let mut qkv = vec![0f32; t * 3 * dim];
    let mut heads = vec![0f32; t * dim];
    let mut hidden = vec![0f32; t * mlp];
    let blocks = p.blocks.iter().zip(&pass.packed.blocks);
    for (i, (block, [w_qkv, w_proj, w_fc1, w_fc2])) in blocks.take(pass.depth).enumerate() {
        layer_norm(&x, &block.ln1, eps, &mut normed);
        fill_rows(&mut qkv, &block.qkv_bias.data);
        w_qkv.apply(&normed, t, &mut qkv, parallel);
        attention(&qkv, t, dim, c.num_heads, &mut heads, parallel);
        add_rows(&mut x, &block.proj_bias.data);
        w_proj.apply(&heads, t, &mut x, parallel);

        layer_norm(&x, &block.ln2, eps, &mut normed);
        fill_rows(&mut hidden, &block.fc1_bias.data);
        w_fc1.apply(&normed, t, &mut hidden, parallel);
        activate(c.activation, &mut hidden);
        write_tap(pass, Tap::BlockMlp(i as u16), &hidden, mlp, slots);
        add_rows(&mut x, &block.fc2_bias.data);
        w_fc2.apply(&hidden, t, &mut x, parallel);
        write_tap(pass, Tap::Block(i as u16), &x, dim, slots);
    }
    if !pass.taps.iter().any(|t| matches!(t, Tap::Norm | Tap::Head)) {
        return;
    }
    let last = match &p.norm {
        Some(n) => {
            layer_norm(&x, n, eps, &mut normed);
            write_tap(pass, Tap::Norm, &normed, dim, slots);
            &normed
        }
        None => &x,
    };
    if let Some(head) = &p.head {
        let pooled = head_input(pass, last);
        let pooled = match &head.norm {
            Some(n) => {
                let mut out = vec![0f32; pooled.len()];
                layer_norm(&pooled, n, eps, &mut out);
                out
            }
            None => pooled,
        };
        let mut logits = head.bias.data.clone();
        for (o, w) in logits.iter_mut().zip(head.weight.data.chunks_exact(pooled.len())) {
            *o += w.iter().zip(&pooled).map(|(a, b)| a * b).sum::<f32>();
        }
        write_tap(pass, Tap::Head, &logits, logits.len(), slots);
    }
}

/// The token matrix `(T, C)` before the first block: the class and register tokens, then
/// each patch's projection, with their positions.
fn embed(pass: &Pass<'_>, image: &[f32], parallel: bool) -> Vec<f32> {
    let (c, p) = (pass.config, pass.params);
    let (dim, ps, pre) = (c.hidden_size, c.patch_size, c.prefix_tokens());
    let (rows, cols) = pass.rows_cols();
    let (h, w) = (pass.height, pass.width);
    let mut x = vec![0f32; pass.tokens() * dim];
    let mut row = 0;
    for token in [&p.class_token, &p.registers].into_iter().flatten() {
        x[row * dim..][..token.data.len()].copy_from_slice(&token.data);
        row += token.data.len() / dim;
    }
    if let Some(pos) = &p.pos_prefix {
        kernels::add_in_place(&mut x[..pos.data.len()], &pos.data);
    }
    // Each patch row starts as bias + position; the projection is accumulated onto it.
    let patch_rows = &mut x[pre * dim..];
    for (dst, pos) in patch_rows.chunks_exact_mut(dim).zip(pass.positions.chunks_exact(dim)) {
        for ((d, &b), &q) in dst.iter_mut().zip(&p.patch_bias.data).zip(pos) {
            *d = b + q;
        }
    }
    // im2col of non-overlapping patches: row j = patch j's (channel, y, x) values, the
    // order of the kernel's `(C, 3, p, p)` weights.
    let k = 3 * ps * ps;
    let mut col = vec![0f32; rows * cols * k];
    for (j, dst) in col.chunks_exact_mut(k).enumerate() {
        let (py, px) = (j / cols, j % cols);
        for ch in 0..3 {
            for ky in 0..ps {
                let src = &image[ch * h * w + (py * ps + ky) * w + px * ps..][..ps];
                dst[(ch * ps + ky) * ps..][..ps].copy_from_slice(src);
            }
        }
    }
    pass.packed.patch.apply(&col, rows * cols, patch_rows, parallel);
    x
}

/// Multi-head self-attention of `t` tokens: `qkv: (t, 3C)` (queries, keys, values side by
/// side, head `h` at columns `h*D..(h+1)*D` of each third); writes `out: (t, C)`, head `h`
/// at its columns.
fn attention(qkv: &[f32], t: usize, dim: usize, heads: usize, out: &mut [f32], parallel: bool) {
    let d = dim / heads;
    let scale = (d as f32).powf(-0.5);
    let stride = 3 * dim;
    let dst = SendPtr(out.as_mut_ptr());
    let head = |h: usize| {
        with_scratch(t * t, |scores| {
            let (q, k, v) = (&qkv[h * d..], &qkv[dim + h * d..], &qkv[2 * dim + h * d..]);
            // SAFETY: scores is t x t (row stride t); q is t x d read with row stride 3C
            // from inside `qkv`; kᵀ is d x t read with row stride 1 and column stride 3C;
            // the last element read, (t-1)*3C + 2C + h*d + d - 1, is inside `qkv` (t x 3C).
            unsafe {
                gemm::gemm(
                    t,
                    t,
                    d,
                    scores.as_mut_ptr(),
                    1,
                    t as isize,
                    false,
                    q.as_ptr(),
                    1,
                    stride as isize,
                    k.as_ptr(),
                    stride as isize,
                    1,
                    0.0,
                    scale,
                    false,
                    false,
                    false,
                    Parallelism::None,
                );
            }
            scores.chunks_exact_mut(t).for_each(kernels::softmax_in_place);
            // SAFETY: the destination is t x d at column h*d of `out` (t x C, row stride
            // C): heads write disjoint columns, and `out` outlives the parallel loop; v is
            // t x d with row stride 3C inside `qkv`; scores t x t.
            unsafe {
                gemm::gemm(
                    t,
                    d,
                    t,
                    dst.get().add(h * d),
                    1,
                    dim as isize,
                    false,
                    scores.as_ptr(),
                    1,
                    t as isize,
                    v.as_ptr(),
                    1,
                    stride as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    Parallelism::None,
                );
            }
        });
    };
    if parallel {
        (0..heads).into_par_iter().for_each(head);
    } else {
        (0..heads).for_each(head);
    }
}

fn layer_norm(x: &[f32], n: &Norm<HostTensor>, eps: f32, out: &mut [f32]) {
    kernels::layer_norm_rows(x, &n.weight.data, &n.bias.data, eps, out);
}

fn activate(activation: Activation, x: &mut [f32]) {
    match activation {
        Activation::Gelu => kernels::gelu_in_place(x),
        Activation::QuickGelu => kernels::quick_gelu_in_place(x),
        Activation::GeluTanh => kernels::gelu_tanh_in_place(x),
    }
}

/// Every row of `x` set to `row`.
fn fill_rows(x: &mut [f32], row: &[f32]) {
    x.chunks_exact_mut(row.len()).for_each(|r| r.copy_from_slice(row));
}

/// `row` added to every row of `x`.
fn add_rows(x: &mut [f32], row: &[f32]) {
    x.chunks_exact_mut(row.len()).for_each(|r| kernels::add_in_place(r, row));
}

/// What the head reads from the final tokens `(T, C)`.
fn head_input(pass: &Pass<'_>, tokens: &[f32]) -> Vec<f32> {
    let c = pass.config;
    let dim = c.hidden_size;
    let pre = c.prefix_tokens();
    let class = || tokens[..dim].to_vec();
    let mean = || {
        let mut sum = vec![0f32; dim];
        for row in tokens[pre * dim..].chunks_exact(dim) {
            kernels::add_in_place(&mut sum, row);
        }
        let inv = 1.0 / pass.patches() as f32;
        sum.iter_mut().for_each(|v| *v *= inv);
        sum
    };
    match c.head.as_ref().map(|h| h.input) {
        Some(HeadInput::PatchMean) => mean(),
        Some(HeadInput::ClassTokenAndPatchMean) => [class(), mean()].concat(),
        _ => class(),
    }
}

/// Copies `tap`'s value (`values`, `(T, width)` tokens, or the head's vector) into the
/// slot of every request for it.
fn write_tap(pass: &Pass<'_>, tap: Tap, values: &[f32], width: usize, slots: &mut [&mut [f32]]) {
    let pre = pass.config.prefix_tokens();
    let patches = pass.patches();
    for (slot, _) in slots.iter_mut().zip(pass.taps).filter(|(_, t)| **t == tap) {
        if tap == Tap::Head || pass.readout == Readout::ClassToken {
            slot.copy_from_slice(&values[..width]);
            continue;
        }
        // Tokens are rows; a map is channel-major: a transpose of the patch rows.
        for (j, token) in values[pre * width..][..patches * width].chunks_exact(width).enumerate() {
            for (ch, &v) in token.iter().enumerate() {
                slot[ch * patches + j] = v;
            }
        }
    }
}

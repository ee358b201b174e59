//! Times the fused CPU convolution on one shape: `conv_bench C_IN C_OUT HW [BATCH] [REPS]` (the fastest of REPS runs).
use std::time::Instant;

use candle_core::{Device, Tensor};
use dnd_models::conv::{ConvGeometry, conv2d_fused};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a: Vec<usize> = std::env::args().skip(1).map(|s| s.parse().unwrap()).collect();
    let (c, o, hw) = (a[0], a[1], a[2]);
    let b = a.get(3).copied().unwrap_or(1);
    let reps = a.get(4).copied().unwrap_or(3);
    let x = Tensor::randn(0f32, 1.0, (b, c, hw, hw), &Device::Cpu)?;
    let w = Tensor::randn(0f32, 0.05, (o, c, 3, 3), &Device::Cpu)?;
    let bias = Tensor::zeros(o, candle_core::DType::F32, &Device::Cpu)?;
    let g = ConvGeometry::new(1, 1);
    conv2d_fused(&x, &w, &bias, None, false, g)?;
    let mut s = f64::INFINITY;
    for _ in 0..reps {
        let t = Instant::now();
        conv2d_fused(&x, &w, &bias, None, false, g)?;
        s = s.min(t.elapsed().as_secs_f64());
    }
    let flops = 2.0 * (b * o * c * 9 * hw * hw) as f64;
    println!("dnd   {c}->{o} at {hw}x{hw} x{b}: {:.1} ms, {:.1} GFLOP/s", s * 1e3, flops / s / 1e9);
    Ok(())
}

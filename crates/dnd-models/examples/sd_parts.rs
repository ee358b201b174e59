//! Times the parts of a Stable Diffusion generation (text encoding, one guided UNet step,
//! the VAE decode) on a diffusers directory, for profiling the CPU kernels:
//! `cargo run --release -p dnd-models --example sd_parts -- DIR SIZE [BATCH] [STEPS]`.

use std::time::Instant;

use candle_core::{Device, Tensor};
use dnd_models::{DiffusionGenerator, GenerationConfig, ModelRef};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let dir: ModelRef = args.get(1).ok_or("usage: sd_parts DIR SIZE [BATCH] [STEPS]")?.parse()?;
    let size: usize = args.get(2).map_or(Ok(512), |s| s.parse())?;
    let batch: usize = args.get(3).map_or(Ok(1), |s| s.parse())?;
    let steps: usize = args.get(4).map_or(Ok(2), |s| s.parse())?;
    let config =
        GenerationConfig { steps: steps.max(1), width: size, height: size, ..Default::default() };
    let sd = DiffusionGenerator::load(&dir, &Device::Cpu, config)?;
    let prompts = vec!["a red circle"; batch];
    let t = Instant::now();
    let text =
        Tensor::cat(&[sd.encode_prompts(&vec![""; batch])?, sd.encode_prompts(&prompts)?], 0)?;
    println!("text encoding: {:.3} s", t.elapsed().as_secs_f64());
    let noise: Vec<Tensor> =
        (0..batch as u64).map(|s| sd.initial_noise(s)).collect::<Result<_, _>>()?;
    let latents = Tensor::cat(&noise, 0)?;
    let doubled = Tensor::cat(&[&latents, &latents], 0)?;
    for i in 0..steps {
        let t = Instant::now();
        sd.predict_noise(&doubled, 500.0, &text)?;
        println!("guided UNet step {i} (batch {}): {:.3} s", 2 * batch, t.elapsed().as_secs_f64());
    }
    let t = Instant::now();
    sd.decode_latents(&latents)?;
    println!("VAE decode (batch {batch}): {:.3} s", t.elapsed().as_secs_f64());
    Ok(())
}

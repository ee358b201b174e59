//! Stable Diffusion's networks, ours: the UNet and the VAE decoder in diffusers' layout,
//! on CPU kernels that fuse what diffusers runs as separate passes and that keep every
//! image's numerics independent of its batch. The pipeline around them (text encoder,
//! sampler, caches) is `generator.rs`.

mod blocks;
mod layers;
mod unet;
mod vae;

pub use unet::{PerBlock, UNet, UNetConfig, UNetContext};
pub use vae::{VaeConfig, VaeDecoder};

//! dnd-models: candle model code for dnd.
//!
//! Target vision models expose activation taps; checkpoints load from local files
//! (safetensors, sharded safetensors, PyTorch pickles: [`weights`]) or the Hugging Face hub
//! cache in the layouts their authors publish. Config JSON is read as Python writes it
//! ([`json`]).

pub mod blip;
pub mod captioner;
pub mod checkpoint;
pub mod clip;
pub mod conv;
pub mod device;
pub mod dictionary;
pub mod diffusion;
pub mod embedder;
pub mod error;
pub mod generator;
pub mod hf_files;
pub mod json;
pub mod kernels;
pub mod linear;
pub mod preprocess;
pub mod resnet;
pub mod tap;
pub mod target;
pub mod transformer;
pub mod vit;
pub mod weights;
pub mod winograd;

pub use captioner::{BlipCaptioner, Caption, CaptionConfig, Captioner};
pub use checkpoint::{ModelFiles, ModelRef};
pub use embedder::{ClipEmbedder, Embedder};
pub use error::ModelError;
pub use generator::{DiffusionGenerator, GenerationConfig, Generator, ImageRequest};
pub use preprocess::Preprocess;
pub use resnet::{ResNet, ResNetConfig};
pub use target::{Tap, TargetModel};
pub use vit::{Vit, VitConfig};
pub use weights::Checkpoint;

//! dnd-models: candle model code for dnd.
//!
//! Target vision models expose activation taps; checkpoints load from local safetensors or
//! the Hugging Face hub cache in the layouts their authors publish.

pub mod checkpoint;
pub mod conv;
pub mod device;
pub mod error;
pub mod preprocess;
pub mod resnet;
pub mod target;

pub use checkpoint::{ModelFiles, ModelRef};
pub use error::ModelError;
pub use preprocess::Preprocess;
pub use resnet::{ResNet, ResNetConfig, Tap};
pub use target::TargetModel;

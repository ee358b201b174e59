//! dnd-zoo: training the synthetic world's zoo with candle, reproducibly from seeds: the
//! target ResNet with its planted channels, the captioner (a tiny BLIP) and the embedder
//! (a tiny CLIP). The world and the ground truth the trainer plants live in `dnd-synth`;
//! only the `dnd synth train` command links this crate, never a worker.

pub mod captioner;
pub mod embedder;
pub mod error;
pub mod json;
pub mod pairs;
pub mod sae;
pub mod target;
pub mod tiny_transformer;
pub mod tokenizer;

/// Where the committed zoo lives: `crates/dnd-synth/zoo/`, beside the world it was
/// trained on (the README's main job reads it from there).
pub fn committed_zoo() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../dnd-synth/zoo")
}

//! Training the zoo's models with candle, reproducibly from seeds.

pub mod captioner;
pub mod embedder;
pub mod pairs;
pub mod target;
pub mod tiny_transformer;
pub mod tokenizer;

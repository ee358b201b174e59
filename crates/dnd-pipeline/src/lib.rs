//! dnd-pipeline: the stage code of Describe-and-Dissect, shared by the embedded runner and
//! (later) the workers: probe images, the probe stage (pooled activations, streaming
//! top-K), attention crops.

mod crops;
pub mod error;
pub mod images;
pub mod probe;
pub mod progress;

pub use error::PipelineError;
pub use images::{ImageLimits, ProbeImages};
pub use probe::{CropStageConfig, ProbeConfig, ProbeSummary, run_probe};
pub use progress::{NoProgress, Progress};

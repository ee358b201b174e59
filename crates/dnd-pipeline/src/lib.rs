//! dnd-pipeline: the stage code of Describe-and-Dissect, shared by the embedded runner and
//! (later) the workers: probe images, the probe stage (pooled activations, streaming
//! top-K), attention crops, and stages 1-3 as neuron tasks behind content-addressed caches.

mod crops;
pub mod describe;
pub mod dissect;
pub mod error;
pub mod images;
pub mod job;
pub mod probe;
pub mod progress;
pub mod workbench;

pub use describe::{DESCRIBE_STAGES, NeuronTask, TaskTables, run_neuron_task};
pub use dissect::{DissectOutcome, DissectSummary, Dissection, plan_tasks, run_dissect};
pub use error::PipelineError;
pub use images::{ImageLimits, ProbeImages};
pub use job::{JobSpec, NeuronSpec};
pub use probe::{CropStageConfig, ProbeConfig, ProbeSummary, run_probe};
pub use progress::{NoProgress, Progress};
pub use workbench::{CachedSummarizer, Workbench};

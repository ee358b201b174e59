//! dnd-pipeline: the stage code of Describe-and-Dissect, shared by the workers and the
//! coordinator: probe images, the probe stage (pooled activations, streaming top-K),
//! the stages of a neuron task (crop, caption, summarize, generate, score; one module each)
//! composed into neuron tasks behind content-addressed caches, a job's
//! plan of tasks, running one task, and merging and compacting their outputs.

pub mod activations;
pub mod error;
pub mod evaluate;
pub mod execute;
pub mod finish;
pub mod images;
pub mod job;
pub mod job_dir;
pub mod neuron_task;
pub mod plan;
pub mod probe;
pub mod progress;
pub mod stages;
pub mod summary;
mod task_rows;
pub mod units;
pub mod vector_cache;
pub mod workbench;

pub use error::PipelineError;
pub use evaluate::{EvaluationOutcome, LabelSource, evaluate_job};
pub use execute::{JobContext, TaskStats};
pub use finish::RunFacts;
pub use images::{ImageLimits, ProbeImages};
pub use job::{JobSpec, NeuronSpec};
pub use job_dir::JobDir;
pub use neuron_task::{NeuronTask, TaskTables, run_neuron_task};
pub use plan::JobPlan;
pub use probe::{CropStageConfig, ProbeConfig, ProbeSummary, run_probe};
pub use progress::{NoProgress, Progress};
pub use summary::DissectSummary;
pub use units::{Readout, UnitLayers};
pub use workbench::{CachedSummarizer, Workbench};

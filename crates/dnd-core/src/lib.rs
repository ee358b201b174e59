//! dnd-core: the domain types and pure algorithms of Describe-and-Dissect.
//!
//! Nothing here does I/O or touches a GPU, so every algorithm is tested on hand-made
//! inputs with known answers.

pub mod crop;
pub mod error;
pub mod evaluation;
pub mod ids;
pub mod liveness;
pub mod neurons;
pub mod pooling;
pub mod scoring;
pub mod screening;
pub mod seeds;
pub mod stage;
pub mod stats;
pub mod task;
pub mod topk;
pub mod units;

pub use crop::{BoundingBox, CropConfig, CropPlan, Map2, plan_crops};
pub use error::CoreError;
pub use ids::{JobName, LayerName, NeuronId, TaskId};
pub use liveness::{Firing, Liveness, UnitStatus};
pub use neurons::NeuronSet;
pub use pooling::Pooling;
pub use scoring::{CandidateScore, GeneratedImage, RankScore, ScoringConfig, score_candidates};
pub use screening::Screening;
pub use seeds::unit_seed;
pub use stage::Stage;
pub use task::{TaskDef, TaskWork};
pub use topk::{LayerTopK, Scored, TopK};
pub use units::{Activation, Encoder, UnitKind};

//! What a task computes: the unit of work a coordinator leases to a worker.

use crate::ids::{LayerName, NeuronId, TaskId};
use crate::stage::Stage;

/// The work of a task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskWork {
    /// Stage 0 over probe images `[start, end)` of the sorted probe set.
    Probe { start: usize, end: usize },
    /// Stages 1-3 for these neurons of `layer`.
    Neurons { layer: LayerName, neurons: Vec<NeuronId> },
}

impl TaskWork {
    /// Units of work per stage when done (images for the probe stage, neurons for the others).
    pub fn units(&self) -> u64 {
        match self {
            TaskWork::Probe { start, end } => (end - start) as u64,
            TaskWork::Neurons { neurons, .. } => neurons.len() as u64,
        }
    }

    /// The stages the task goes through, in order.
    pub fn stages(&self) -> &'static [Stage] {
        match self {
            TaskWork::Probe { .. } => &[Stage::Probe],
            TaskWork::Neurons { .. } => &Stage::DESCRIBE,
        }
    }
}

/// A task of a job: its id and its work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskDef {
    pub id: TaskId,
    pub work: TaskWork,
}

//! Conversions between the domain types and their messages, in one place: `to_proto`
//! (`From<domain> for pb::X`) and `from_proto` (`TryFrom<pb::X> for domain`, which checks
//! what a peer sent).

use dnd_core::{JobName, LayerName, NeuronId, Stage, TaskDef, TaskId, TaskWork};

use crate::v1 as pb;

/// A task as a worker leased it: what to compute, for which job, under which lease.
#[derive(Debug, Clone, PartialEq)]
pub struct LeasedTask {
    pub job: JobName,
    pub task: TaskDef,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// Fencing token: only its holder may heartbeat, complete or fail the task.
    pub token: u64,
    /// Where this attempt writes, relative to the job directory (unique per attempt).
    pub attempt_name: String,
    pub lease_deadline_unix_ms: i64,
    /// The store root the coordinator serves (jobs live under `<store>/jobs/<job>`).
    pub store: String,
}

/// A message that does not say what the contract requires.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {message} from the peer: {reason}")]
pub struct InvalidMessage {
    pub message: &'static str,
    pub reason: String,
}

// ---------------------------------------------------------------------------------------
// to_proto
// ---------------------------------------------------------------------------------------

impl From<&LeasedTask> for pb::Task {
    fn from(t: &LeasedTask) -> Self {
        let mut task = pb::Task {
            job: t.job.to_string(),
            task_id: t.task.id.to_string(),
            attempt: t.attempt,
            token: t.token,
            attempt_name: t.attempt_name.clone(),
            lease_deadline_unix_ms: t.lease_deadline_unix_ms,
            store: t.store.clone(),
            ..Default::default()
        };
        match &t.task.work {
            TaskWork::Probe { start, end } => {
                task.kind = pb::TaskKind::Probe as i32;
                task.probe_start = *start as u32;
                task.probe_end = *end as u32;
            }
            TaskWork::Neurons { layer, neurons } => {
                task.kind = pb::TaskKind::Neurons as i32;
                task.layer = layer.to_string();
                task.neurons = neurons.iter().map(|n| n.to_u32()).collect();
            }
        }
        task
    }
}

/// Units done per stage, as heartbeats and job statuses carry them.
pub fn stage_progress_to_proto(stage: Stage, done: u64, total: u64) -> pb::StageProgress {
    pb::StageProgress { stage: stage.name().to_string(), done, total }
}

// ---------------------------------------------------------------------------------------
// from_proto
// ---------------------------------------------------------------------------------------

impl TryFrom<pb::Task> for LeasedTask {
    type Error = InvalidMessage;

    fn try_from(t: pb::Task) -> Result<Self, Self::Error> {
        let bad = |reason: String| InvalidMessage { message: "Task", reason };
        let work = match pb::TaskKind::try_from(t.kind) {
            Ok(pb::TaskKind::Probe) => {
                if t.probe_start > t.probe_end {
                    return Err(bad(format!(
                        "probe slice {}..{} is reversed",
                        t.probe_start, t.probe_end
                    )));
                }
                TaskWork::Probe { start: t.probe_start as usize, end: t.probe_end as usize }
            }
            Ok(pb::TaskKind::Neurons) => {
                if t.layer.is_empty() || t.neurons.is_empty() {
                    return Err(bad("a neuron task names no layer or no neurons".into()));
                }
                TaskWork::Neurons {
                    layer: LayerName::new(t.layer),
                    neurons: t.neurons.into_iter().map(NeuronId::new).collect(),
                }
            }
            _ => return Err(bad(format!("unknown task kind {}", t.kind))),
        };
        if t.job.is_empty() || t.task_id.is_empty() || t.attempt_name.is_empty() {
            return Err(bad("job, task_id and attempt_name must be set".into()));
        }
        Ok(Self {
            job: JobName::new(t.job),
            task: TaskDef { id: TaskId::new(t.task_id), work },
            attempt: t.attempt,
            token: t.token,
            attempt_name: t.attempt_name,
            lease_deadline_unix_ms: t.lease_deadline_unix_ms,
            store: t.store,
        })
    }
}

/// Units done per known stage; progress of stages this build does not know is dropped.
pub fn stage_progress_from_proto(progress: &[pb::StageProgress]) -> Vec<(Stage, u64)> {
    progress.iter().filter_map(|p| Some((p.stage.parse().ok()?, p.done))).collect()
}

/// A job state's name, as `dnd status` prints it.
pub fn job_state_name(state: i32) -> &'static str {
    match pb::JobState::try_from(state).unwrap_or(pb::JobState::Unspecified) {
        pb::JobState::Probing => "probing",
        pb::JobState::Describing => "describing",
        pb::JobState::Compacting => "compacting",
        pb::JobState::Succeeded => "succeeded",
        pb::JobState::Failed => "failed",
        pb::JobState::Cancelled => "cancelled",
        pb::JobState::Unspecified => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leased(work: TaskWork) -> LeasedTask {
        LeasedTask {
            job: JobName::new("zoo"),
            task: TaskDef { id: TaskId::new("layer4-00001"), work },
            attempt: 2,
            token: 77,
            attempt_name: "attempt-2-4d".into(),
            lease_deadline_unix_ms: 1_000,
            store: "out".into(),
        }
    }

    #[test]
    fn tasks_round_trip_through_the_proto() {
        for work in [
            TaskWork::Probe { start: 10, end: 20 },
            TaskWork::Neurons {
                layer: LayerName::new("layer4"),
                neurons: vec![NeuronId::new(3), NeuronId::new(12)],
            },
        ] {
            let task = leased(work);
            assert_eq!(LeasedTask::try_from(pb::Task::from(&task)).unwrap(), task);
        }
    }

    #[test]
    fn a_task_without_its_work_is_refused() {
        let mut message = pb::Task::from(&leased(TaskWork::Neurons {
            layer: LayerName::new("fc"),
            neurons: vec![NeuronId::new(0)],
        }));
        message.neurons.clear();
        assert!(LeasedTask::try_from(message.clone()).is_err());
        message.kind = 0;
        let err = LeasedTask::try_from(message).unwrap_err();
        assert!(err.to_string().contains("task kind"), "{err}");
        let progress = [
            stage_progress_to_proto(Stage::Caption, 3, 8),
            pb::StageProgress { stage: "unknown".into(), done: 1, total: 0 },
        ];
        assert_eq!(stage_progress_from_proto(&progress), [(Stage::Caption, 3)]);
    }
}

//! The coordinator's bookkeeping, free of I/O and clocks (callers pass `now` in unix
//! milliseconds): which task is queued, leased (to whom, under which fencing token, until
//! when), committed or failed; retries; lease expiry; progress; and each job's event log.
//!
//! The store, not this state, is the truth: commits are create-only markers in the store,
//! and a restarted coordinator rebuilds this from them.

use std::collections::{BTreeMap, HashMap, VecDeque};

use serde::{Deserialize, Serialize};

use dnd_core::{JobName, Stage, TaskId};

pub use dnd_core::{TaskDef, TaskWork};

/// A job's phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Probing,
    /// Every probe task is committed; the coordinator is merging their top-K lists.
    Merging,
    Describing,
    /// Every neuron task is committed (or failed); the coordinator is compacting.
    Compacting,
    Succeeded,
    Failed,
    Cancelled,
}

impl Phase {
    pub const ALL: [Phase; 7] = [
        Phase::Probing,
        Phase::Merging,
        Phase::Describing,
        Phase::Compacting,
        Phase::Succeeded,
        Phase::Failed,
        Phase::Cancelled,
    ];

    /// The phase as events, metrics and JSON spell it.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Probing => "probing",
            Phase::Merging => "merging",
            Phase::Describing => "describing",
            Phase::Compacting => "compacting",
            Phase::Succeeded => "succeeded",
            Phase::Failed => "failed",
            Phase::Cancelled => "cancelled",
        }
    }

    pub fn is_final(self) -> bool {
        matches!(self, Phase::Succeeded | Phase::Failed | Phase::Cancelled)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub worker: String,
    pub attempt: u32,
    pub token: u64,
    pub deadline_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Neuron tasks wait for the probe merge.
    Waiting,
    Queued,
    Leased(Lease),
    Committed,
    Failed(String),
}

#[derive(Debug, Clone)]
struct TaskEntry {
    def: TaskDef,
    state: State,
    /// Attempts started (the next attempt gets `attempts + 1`).
    attempts: u32,
    /// Attempts that ended in failure or an expired lease.
    failures: u32,
    last_error: String,
    /// Units done per stage by the current attempt, as last reported.
    progress: BTreeMap<Stage, u64>,
}

/// One line of a job's event log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub seq: u64,
    pub unix_ms: i64,
    pub kind: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub task: String,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub attempt: u32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub worker: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

#[derive(Debug)]
struct JobEntry {
    phase: Phase,
    tasks: Vec<TaskEntry>,
    index: HashMap<TaskId, usize>,
    queue: VecDeque<usize>,
    error: String,
    retried: u32,
    events: Vec<Event>,
    /// Events not yet handed to [`Scheduler::drain_new_events`].
    unflushed: usize,
    stage_totals: BTreeMap<Stage, u64>,
}

/// A leased task, as handed to a worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leased {
    pub job: JobName,
    pub task: TaskDef,
    pub lease: Lease,
}

/// What the coordinator must do after a change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    Nothing,
    /// Every probe task is committed: merge them, then call [`Scheduler::probe_merged`].
    MergeProbe,
    /// Every neuron task is done: compact, then call [`Scheduler::finish`].
    Compact,
    /// The task failed for good: record it ([`dnd_pipeline::finish::commit_failed_task`]),
    /// then call [`Scheduler::failure_recorded`].
    RecordFailure {
        task: String,
        attempts: u32,
        error: String,
    },
}

/// Why a worker's call about a task was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("no job `{0}`")]
    UnknownJob(String),
    #[error("job `{job}` has no task `{task}`")]
    UnknownTask { job: String, task: String },
    #[error("the lease of task `{0}` is no longer yours (it expired, or the job ended)")]
    LeaseLost(String),
}

/// Counts for a job's status.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct JobCounts {
    pub total: u32,
    pub queued: u32,
    pub leased: u32,
    pub committed: u32,
    pub failed: u32,
    pub retried: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct JobView {
    pub job: String,
    pub phase: Phase,
    pub counts: JobCounts,
    /// (stage, done, total), in stage order.
    pub stages: Vec<(Stage, u64, u64)>,
    pub error: String,
}

pub struct Scheduler {
    jobs: HashMap<JobName, JobEntry>,
    /// Submission order: earlier jobs' tasks lease first.
    order: Vec<JobName>,
    next_token: u64,
    max_attempts: u32,
}

impl Scheduler {
    /// `token_base` seeds the fencing tokens: give each coordinator incarnation a larger
    /// one (its start time), so a token from before a restart never matches.
    pub fn new(max_attempts: u32, token_base: u64) -> Self {
        Self {
            jobs: HashMap::new(),
            order: Vec::new(),
            next_token: token_base.max(1),
            max_attempts: max_attempts.max(1),
        }
    }

    pub fn has_job(&self, job: &str) -> bool {
        self.jobs.contains_key(job)
    }

    /// Adds a job. `done` maps already committed tasks to whether their output is a
    /// failure record; `probe_merged` says stage 0 was merged before. `earlier_events` is
    /// the job's log so far (a restarted coordinator continues it).
    pub fn add_job(
        &mut self,
        job: &str,
        tasks: Vec<TaskDef>,
        done: &HashMap<String, bool>,
        probe_merged: bool,
        earlier_events: Vec<Event>,
        now: i64,
    ) -> Next {
        let mut stage_totals = BTreeMap::new();
        let entries: Vec<TaskEntry> = tasks
            .into_iter()
            .map(|def| {
                for stage in def.work.stages() {
                    *stage_totals.entry(*stage).or_insert(0) += def.work.units();
                }
                let state = match (done.get(def.id.as_str()), &def.work) {
                    (Some(false), _) => State::Committed,
                    (Some(true), _) => {
                        State::Failed("failed before the coordinator restarted".into())
                    }
                    (None, TaskWork::Probe { .. }) => State::Queued,
                    (None, TaskWork::Neurons { .. }) if probe_merged => State::Queued,
                    (None, TaskWork::Neurons { .. }) => State::Waiting,
                };
                TaskEntry {
                    def,
                    state,
                    attempts: 0,
                    failures: 0,
                    last_error: String::new(),
                    progress: BTreeMap::new(),
                }
            })
            .collect();
        let index = entries.iter().enumerate().map(|(i, t)| (t.def.id.clone(), i)).collect();
        let queue = entries
            .iter()
            .enumerate()
            .filter(|(_, t)| t.state == State::Queued)
            .map(|(i, _)| i)
            .collect();
        let seq = earlier_events.last().map_or(0, |e| e.seq + 1);
        let entry = JobEntry {
            phase: if probe_merged { Phase::Describing } else { Phase::Probing },
            tasks: entries,
            index,
            queue,
            error: String::new(),
            retried: 0,
            unflushed: 0,
            events: earlier_events,
            stage_totals,
        };
        let committed = done.len();
        debug_assert!(entry.events.last().is_none_or(|e| e.seq + 1 == seq));
        if !self.jobs.contains_key(job) {
            self.order.push(JobName::new(job));
        }
        let mut added = entry;
        let message = format!("{} tasks, {committed} already committed", added.tasks.len());
        push_event(&mut added, now, "submitted", "", 0, "", &message);
        self.jobs.insert(JobName::new(job), added);
        self.advance(job)
    }

    /// Leases the first queued task of the earliest job to `worker`.
    pub fn lease(&mut self, worker: &str, now: i64, lease_ms: i64) -> Option<Leased> {
        for name in &self.order {
            let Some(job) = self.jobs.get_mut(name) else { continue };
            if job.phase.is_final() {
                continue;
            }
            while let Some(i) = job.queue.pop_front() {
                let task = &mut job.tasks[i];
                if task.state != State::Queued {
                    continue;
                }
                task.attempts += 1;
                self.next_token += 1;
                let lease = Lease {
                    worker: worker.to_string(),
                    attempt: task.attempts,
                    token: self.next_token,
                    deadline_ms: now + lease_ms,
                };
                task.state = State::Leased(lease.clone());
                task.progress.clear();
                let leased = Leased { job: name.clone(), task: task.def.clone(), lease };
                let id = leased.task.id.clone();
                push_event(job, now, "leased", &id, leased.lease.attempt, worker, "");
                return Some(leased);
            }
        }
        None
    }

    fn task_mut(&mut self, job: &str, task: &str) -> Result<(&mut JobEntry, usize), Refused> {
        let entry = self.jobs.get_mut(job).ok_or_else(|| Refused::UnknownJob(job.into()))?;
        let i = *entry
            .index
            .get(task)
            .ok_or_else(|| Refused::UnknownTask { job: job.into(), task: task.into() })?;
        Ok((entry, i))
    }

    /// Extends the lease held under `token` and records progress; the new deadline.
    pub fn heartbeat(
        &mut self,
        job: &str,
        task: &str,
        token: u64,
        progress: &[(Stage, u64)],
        now: i64,
        lease_ms: i64,
    ) -> Result<i64, Refused> {
        let (entry, i) = self.task_mut(job, task)?;
        let final_phase = entry.phase.is_final();
        let t = &mut entry.tasks[i];
        match &mut t.state {
            State::Leased(lease) if lease.token == token && !final_phase => {
                lease.deadline_ms = now + lease_ms;
                for (stage, done) in progress {
                    t.progress.insert(*stage, *done);
                }
                Ok(lease.deadline_ms)
            }
            _ => Err(Refused::LeaseLost(task.into())),
        }
    }

    /// The task's output is committed in the store (the caller checked the marker). Any
    /// token is accepted: the marker, not the lease, decides which attempt counts.
    pub fn committed(
        &mut self,
        job: &str,
        task: &str,
        token: u64,
        now: i64,
    ) -> Result<Next, Refused> {
        let (entry, i) = self.task_mut(job, task)?;
        let t = &mut entry.tasks[i];
        if matches!(t.state, State::Committed | State::Failed(_)) {
            return Ok(Next::Nothing);
        }
        let (attempt, worker) = match &t.state {
            State::Leased(l) => (l.attempt, l.worker.clone()),
            _ => (t.attempts, String::new()),
        };
        let stale = !matches!(&t.state, State::Leased(l) if l.token == token);
        t.state = State::Committed;
        t.progress.clear();
        push_event(
            entry,
            now,
            "committed",
            task,
            attempt,
            &worker,
            if stale { "by an earlier attempt" } else { "" },
        );
        Ok(self.advance(job))
    }

    /// The attempt under `token` failed (or was handed back, which does not count).
    /// `Ok(true)` when the task goes back to the queue.
    pub fn failed(
        &mut self,
        job: &str,
        task: &str,
        token: u64,
        error: &str,
        handed_back: bool,
        now: i64,
    ) -> Result<(bool, Next), Refused> {
        let (entry, i) = self.task_mut(job, task)?;
        let t = &mut entry.tasks[i];
        let State::Leased(lease) = &t.state else { return Err(Refused::LeaseLost(task.into())) };
        if lease.token != token {
            return Err(Refused::LeaseLost(task.into()));
        }
        let (attempt, worker) = (lease.attempt, lease.worker.clone());
        if handed_back {
            // Not the task's fault: it gets its attempt back.
            t.attempts -= 1;
            requeue(entry, i);
            push_event(entry, now, "handed_back", task, attempt, &worker, error);
            return Ok((true, Next::Nothing));
        }
        Ok(self.attempt_failed(job, i, error, now, "failed"))
    }

    fn attempt_failed(
        &mut self,
        job: &str,
        i: usize,
        error: &str,
        now: i64,
        kind: &str,
    ) -> (bool, Next) {
        let max_attempts = self.max_attempts;
        let entry = self.jobs.get_mut(job).expect("the caller found the job");
        let t = &mut entry.tasks[i];
        let (attempt, worker) = match &t.state {
            State::Leased(l) => (l.attempt, l.worker.clone()),
            _ => (t.attempts, String::new()),
        };
        t.failures += 1;
        t.last_error = error.to_string();
        let id = t.def.id.clone();
        let retry = t.failures < max_attempts && !entry.phase.is_final();
        push_event(entry, now, kind, &id, attempt, &worker, error);
        if retry {
            entry.retried += 1;
            requeue(entry, i);
            push_event(
                entry,
                now,
                "retried",
                &id,
                attempt + 1,
                "",
                &format!("attempt {} of {max_attempts}", attempt + 1),
            );
            return (true, Next::Nothing);
        }
        let t = &mut entry.tasks[i];
        t.state = State::Failed(error.to_string());
        let failures = t.failures;
        push_event(
            entry,
            now,
            "task_failed",
            &id,
            attempt,
            &worker,
            &format!("gave up after {failures} attempts: {error}"),
        );
        if matches!(entry.tasks[i].def.work, TaskWork::Probe { .. }) {
            // Without every probe slice no neuron can be described.
            let message = format!("probe task {id} failed {failures} times: {error}");
            self.fail_job(job, &message, now);
            return (false, Next::Nothing);
        }
        let task = id.to_string();
        (false, Next::RecordFailure { task, attempts: failures, error: error.to_string() })
    }

    /// The failure record of a task is committed.
    pub fn failure_recorded(&mut self, job: &str) -> Next {
        self.advance(job)
    }

    /// Returns expired leases to the queue (or fails their tasks); what to do next, per job.
    pub fn reap(&mut self, now: i64) -> Vec<(JobName, Next)> {
        let mut expired = Vec::new();
        for (name, job) in &self.jobs {
            for (i, t) in job.tasks.iter().enumerate() {
                if let State::Leased(l) = &t.state
                    && l.deadline_ms < now
                {
                    expired.push((name.clone(), i, l.worker.clone()));
                }
            }
        }
        let mut next = Vec::new();
        for (job, i, worker) in expired {
            let (_, n) = self.attempt_failed(
                &job,
                i,
                &format!("lease expired: worker {worker} stopped sending heartbeats"),
                now,
                "lease_expired",
            );
            if n != Next::Nothing {
                next.push((job, n));
            }
        }
        next
    }

    /// Where a job goes next, and its phase change.
    fn advance(&mut self, job: &str) -> Next {
        let Some(entry) = self.jobs.get_mut(job) else { return Next::Nothing };
        let probe_done = entry
            .tasks
            .iter()
            .filter(|t| matches!(t.def.work, TaskWork::Probe { .. }))
            .all(|t| t.state == State::Committed);
        let all_done =
            entry.tasks.iter().all(|t| matches!(t.state, State::Committed | State::Failed(_)));
        match entry.phase {
            Phase::Probing if probe_done => {
                entry.phase = Phase::Merging;
                Next::MergeProbe
            }
            Phase::Describing if all_done => {
                entry.phase = Phase::Compacting;
                Next::Compact
            }
            _ => Next::Nothing,
        }
    }

    /// Stage 0 is merged: neuron tasks become leasable.
    pub fn probe_merged(&mut self, job: &str, now: i64) -> Next {
        let Some(entry) = self.jobs.get_mut(job) else { return Next::Nothing };
        if entry.phase != Phase::Merging {
            return Next::Nothing;
        }
        entry.phase = Phase::Describing;
        for i in 0..entry.tasks.len() {
            if entry.tasks[i].state == State::Waiting {
                entry.tasks[i].state = State::Queued;
                entry.queue.push_back(i);
            }
        }
        push_event(entry, now, "probe_merged", "", 0, "", "");
        self.advance(job)
    }

    pub fn finish(&mut self, job: &str, now: i64) {
        if let Some(entry) = self.jobs.get_mut(job) {
            entry.phase = Phase::Succeeded;
            let failed = entry.tasks.iter().filter(|t| matches!(t.state, State::Failed(_))).count();
            push_event(entry, now, "succeeded", "", 0, "", &format!("{failed} tasks failed"));
        }
    }

    pub fn fail_job(&mut self, job: &str, error: &str, now: i64) {
        if let Some(entry) = self.jobs.get_mut(job)
            && !entry.phase.is_final()
        {
            entry.phase = Phase::Failed;
            entry.error = error.to_string();
            push_event(entry, now, "failed", "", 0, "", error);
        }
    }

    /// Stops a job: queued tasks are dropped, leased ones are told to stop at their next
    /// heartbeat.
    pub fn cancel(&mut self, job: &str, now: i64) -> Result<(), Refused> {
        let entry = self.jobs.get_mut(job).ok_or_else(|| Refused::UnknownJob(job.into()))?;
        if !entry.phase.is_final() {
            entry.phase = Phase::Cancelled;
            entry.queue.clear();
            push_event(entry, now, "cancelled", "", 0, "", "");
        }
        Ok(())
    }

    pub fn view(&self, job: &str) -> Option<JobView> {
        let entry = self.jobs.get(job)?;
        let mut counts = JobCounts {
            total: entry.tasks.len() as u32,
            retried: entry.retried,
            ..Default::default()
        };
        let mut done: BTreeMap<Stage, u64> = entry.stage_totals.keys().map(|&k| (k, 0)).collect();
        for t in &entry.tasks {
            match &t.state {
                State::Waiting | State::Queued => counts.queued += 1,
                State::Leased(_) => {
                    counts.leased += 1;
                    for (stage, units) in &t.progress {
                        if let Some(d) = done.get_mut(stage) {
                            *d += units.min(&t.def.work.units());
                        }
                    }
                }
                State::Committed | State::Failed(_) => {
                    if matches!(t.state, State::Committed) {
                        counts.committed += 1;
                    } else {
                        counts.failed += 1;
                    }
                    for stage in t.def.work.stages() {
                        *done.entry(*stage).or_default() += t.def.work.units();
                    }
                }
            }
        }
        let stages = Stage::ALL
            .into_iter()
            .filter_map(|s| Some((s, done.get(&s).copied()?, *entry.stage_totals.get(&s)?)))
            .collect();
        Some(JobView {
            job: job.to_string(),
            phase: entry.phase,
            counts,
            stages,
            error: entry.error.clone(),
        })
    }

    /// Jobs in submission order.
    pub fn jobs(&self) -> impl Iterator<Item = &str> {
        self.order.iter().map(JobName::as_str)
    }

    pub fn events(&self, job: &str) -> &[Event] {
        self.jobs.get(job).map_or(&[], |j| &j.events)
    }

    /// Events added since the last call, per job (to persist and to broadcast).
    pub fn drain_new_events(&mut self) -> Vec<(JobName, Vec<Event>)> {
        let mut out = Vec::new();
        for (name, job) in &mut self.jobs {
            if job.unflushed > 0 {
                let from = job.events.len() - job.unflushed;
                out.push((name.clone(), job.events[from..].to_vec()));
                job.unflushed = 0;
            }
        }
        out
    }

    /// The work of a leased task (for the worker that holds it).
    pub fn lease_of(&self, job: &str, task: &str) -> Option<Lease> {
        let entry = self.jobs.get(job)?;
        match &entry.tasks[*entry.index.get(task)?].state {
            State::Leased(l) => Some(l.clone()),
            _ => None,
        }
    }
}

fn requeue(entry: &mut JobEntry, i: usize) {
    let t = &mut entry.tasks[i];
    t.state = State::Queued;
    t.progress.clear();
    // Retries go to the front: a job should not wait at its end for one slow task.
    entry.queue.push_front(i);
}

fn push_event(
    entry: &mut JobEntry,
    now: i64,
    kind: &str,
    task: &str,
    attempt: u32,
    worker: &str,
    message: &str,
) {
    let seq = entry.events.last().map_or(0, |e| e.seq + 1);
    entry.events.push(Event {
        seq,
        unix_ms: now,
        kind: kind.into(),
        task: task.into(),
        attempt,
        worker: worker.into(),
        message: message.into(),
    });
    entry.unflushed += 1;
}

#[cfg(test)]
mod tests;

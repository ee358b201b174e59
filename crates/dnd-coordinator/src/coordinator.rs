//! The coordinator: the [`Scheduler`] behind a lock, plus the I/O it needs (planning a
//! submitted job, checking commit markers, merging the probe, recording failures,
//! compacting), the background reaper, and the event log (persisted under
//! `jobs/<job>/events/`, broadcast to watchers).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{Notify, broadcast};

use dnd_models::ModelRef;
use dnd_models::target::TargetShape;
use dnd_pipeline::finish::{self, RunFacts};
use dnd_pipeline::plan::{self, JobPlan};
use dnd_pipeline::units;
use dnd_pipeline::{JobDir, JobSpec, PipelineError, ProbeImages};
use dnd_store::tasks::check_name;
use dnd_store::{Location, StoreError};

use dnd_core::{JobName, LayerName, NeuronId, Stage, TaskId};

use crate::scheduler::{Event, JobView, Leased, Next, Phase, Refused, Scheduler};

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Refused(#[from] Refused),
    #[error("no job `{0}` on this coordinator; `dnd list` shows the jobs it knows")]
    NotFound(String),
    #[error(
        "task `{task}` of job `{job}` has no commit marker: write its outputs and commit before calling Complete"
    )]
    NotCommitted { job: String, task: String },
    #[error("{0}")]
    BadRequest(String),
}

impl CoordinatorError {
    pub fn is_user_error(&self) -> bool {
        match self {
            CoordinatorError::Pipeline(e) => e.is_user_error(),
            CoordinatorError::Store(e) => e.is_user_error(),
            CoordinatorError::BadRequest(_) | CoordinatorError::NotFound(_) => true,
            CoordinatorError::Refused(_) | CoordinatorError::NotCommitted { .. } => false,
        }
    }
}

/// Lease timing and retry policy.
#[derive(Debug, Clone)]
pub struct Settings {
    /// A lease lasts this long without a heartbeat.
    pub lease: Duration,
    /// Workers heartbeat this often (a third of the lease by default).
    pub heartbeat: Duration,
    /// Attempts a task gets before it is marked failed.
    pub max_attempts: u32,
    /// Resume the unfinished jobs found in the store at start (a service does; an
    /// embedded run serves its own job only).
    pub resume_unfinished: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(60),
            heartbeat: Duration::from_secs(20),
            max_attempts: 3,
            resume_unfinished: true,
        }
    }
}

/// What a submission found and did.
#[derive(Debug, Clone)]
pub struct Submitted {
    pub job: String,
    pub tasks_total: usize,
    pub tasks_resumed: usize,
}

struct JobRun {
    plan: Arc<JobPlan>,
    dir: JobDir,
    top_k: usize,
    /// `[units]`: the statuses the probe merge gives dictionary units.
    liveness: dnd_core::Liveness,
    started: Instant,
    resumed: usize,
    load_seconds: f64,
    /// A scheduler benchmark's job: tasks commit markers only, nothing to compact.
    simulated: bool,
}

pub struct Coordinator {
    store: Location,
    settings: Settings,
    scheduler: Mutex<Scheduler>,
    runs: Mutex<HashMap<JobName, Arc<JobRun>>>,
    work_ready: Notify,
    events: broadcast::Sender<(JobName, Event)>,
    /// Target models' shapes by reference: planning needs layer names and widths only.
    targets: tokio::sync::Mutex<HashMap<String, Arc<TargetShape>>>,
    workers: Mutex<HashMap<String, String>>,
    submissions: tokio::sync::Mutex<()>,
    metrics: dnd_metrics::Metrics,
}

/// Declares the coordinator's metrics (docs/metrics.md).
fn coordinator_metrics() -> dnd_metrics::Metrics {
    use dnd_metrics::Kind;
    let m = dnd_metrics::Metrics::new();
    m.describe("dnd_tasks", Kind::Gauge, "Tasks of the coordinator's jobs by state: queued (or waiting for the probe merge), leased, committed, failed.");
    m.describe("dnd_jobs", Kind::Gauge, "Jobs by phase.");
    m.describe("dnd_task_events_total", Kind::Counter, "Task and job events by kind (leased, committed, failed, retried, lease_expired, handed_back, task_failed, ...).");
    m.describe("dnd_task_retries_total", Kind::Counter, "Task attempts that were retried.");
    m.describe(
        "dnd_lease_expiries_total",
        Kind::Counter,
        "Leases that expired without a heartbeat.",
    );
    m.describe("dnd_workers_joined_total", Kind::Counter, "Workers that joined.");
    m
}

pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock leaves consistent state (every update is one step).
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Coordinator {
    /// A coordinator over the store root `store`; resumes every unfinished job found there.
    pub async fn open(store: Location, settings: Settings) -> Result<Arc<Self>, CoordinatorError> {
        let token_base =
            SystemTime::now().duration_since(UNIX_EPOCH).map_or(1, |d| d.as_micros() as u64) << 8;
        let (events, _) = broadcast::channel(4096);
        let coordinator = Arc::new(Self {
            scheduler: Mutex::new(Scheduler::new(settings.max_attempts, token_base)),
            store,
            settings,
            runs: Mutex::new(HashMap::new()),
            work_ready: Notify::new(),
            events,
            targets: tokio::sync::Mutex::new(HashMap::new()),
            workers: Mutex::new(HashMap::new()),
            submissions: tokio::sync::Mutex::new(()),
            metrics: coordinator_metrics(),
        });
        if coordinator.settings.resume_unfinished {
            coordinator.recover().await?;
        }
        coordinator.clone().spawn_background();
        Ok(coordinator)
    }

    pub fn store(&self) -> &Location {
        &self.store
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    fn job_dir(&self, job: &str) -> Result<JobDir, CoordinatorError> {
        JobDir::under(&self.store, job).map_err(|e| CoordinatorError::BadRequest(e.to_string()))
    }

    /// Resumes the unfinished jobs in the store: those with a plan, no summary and no
    /// cancel marker.
    async fn recover(self: &Arc<Self>) -> Result<(), CoordinatorError> {
        for job in self.store.list_dirs("jobs").await? {
            if check_name("job", &job).is_err() {
                continue;
            }
            let dir = JobDir::under(&self.store, &job)?;
            if !dir.has_plan().await? || dir.summary().await?.is_some() || dir.cancelled().await? {
                continue;
            }
            let (_, spec) = dir.spec().await?;
            let stored = dir.plan().await?;
            tracing::info!(job, "resuming an unfinished job");
            self.start_job(&job, &spec, stored, dir, 0.0).await?;
        }
        Ok(())
    }

    /// Reads (once) the shape of a spec's target model, for planning: its config.json or
    /// its safetensors header, never its weights.
    async fn target(&self, spec: &JobSpec) -> Result<Arc<TargetShape>, CoordinatorError> {
        let mut targets = self.targets.lock().await;
        if let Some(t) = targets.get(&spec.target.model) {
            return Ok(t.clone());
        }
        let reference: ModelRef = spec.target.model.parse().map_err(PipelineError::from)?;
        let shape = tokio::task::spawn_blocking(move || TargetShape::read(&reference))
            .await
            .map_err(PipelineError::from)?
            .map_err(PipelineError::from)?;
        let shape = Arc::new(shape);
        targets.insert(spec.target.model.clone(), shape.clone());
        Ok(shape)
    }

    /// Makes the shape of an already loaded target model available for planning
    /// (embedded runs).
    pub async fn provide_target(&self, reference: &str, shape: TargetShape) {
        self.targets.lock().await.insert(reference.to_string(), Arc::new(shape));
    }

    /// Checks and plans a job, claims its directory and queues its tasks. A job already in
    /// the store under this name resumes, if its spec is the same.
    pub async fn submit(
        self: &Arc<Self>,
        mut spec: JobSpec,
        load_seconds: f64,
    ) -> Result<Submitted, CoordinatorError> {
        // Jobs always live in this coordinator's store, wherever the submitter pointed.
        spec.out = self.store.to_string();
        spec.validate()?;
        let name = spec.job_name();
        let dir = self.job_dir(&name)?;
        let _one_at_a_time = self.submissions.lock().await;
        if let Some(view) = self.view(&name)
            && !view.phase.is_final()
        {
            let total = view.counts.total as usize;
            return Ok(Submitted { job: name, tasks_total: total, tasks_resumed: 0 });
        }
        let target = self.target(&spec).await?;
        plan::layer_plans(&spec, &target)?;
        let units = {
            let (spec, target) = (spec.clone(), target.clone());
            tokio::task::spawn_blocking(move || units::inspect_units(&spec, &target))
                .await
                .map_err(PipelineError::from)??
        };
        // Every check passed: from here on, the store is written.
        let source = plan::resolve_probe_images(&spec, &self.store).await?;
        let images = ProbeImages::discover(&source).await?;
        let fresh = JobPlan::make(&spec, &target, &units, &images)?;
        dir.claim(&name, &spec).await?;
        let stored = dir.store_plan(&fresh).await?;
        // A resubmission re-runs what a cancel left undone.
        dir.set_cancelled(false).await?;
        let submitted = self.start_job(&name, &spec, stored, dir, load_seconds).await?;
        Ok(submitted)
    }

    async fn start_job(
        self: &Arc<Self>,
        name: &str,
        spec: &JobSpec,
        plan: JobPlan,
        dir: JobDir,
        load_seconds: f64,
    ) -> Result<Submitted, CoordinatorError> {
        let done = finish::committed_tasks(&dir, &plan).await?;
        let merged = dir.probe_merged().await?;
        let earlier = read_events(&dir).await?;
        let tasks = plan.tasks();
        let submitted = Submitted {
            job: name.to_string(),
            tasks_total: tasks.len(),
            tasks_resumed: done.len(),
        };
        let run = JobRun {
            plan: Arc::new(plan),
            dir,
            top_k: spec.probe.top_k,
            liveness: spec.units.clone(),
            started: Instant::now(),
            resumed: done.len(),
            load_seconds,
            simulated: false,
        };
        lock(&self.runs).insert(JobName::new(name), Arc::new(run));
        let next = lock(&self.scheduler).add_job(name, tasks, &done, merged, earlier, now_ms());
        self.after(name, next);
        self.work_ready.notify_waiters();
        Ok(submitted)
    }

    /// A job of `tasks` neuron tasks that only commit markers, for `dnd bench scheduler`:
    /// it measures the scheduling path (lease, commit check, complete) and nothing else.
    pub fn submit_simulated(
        self: &Arc<Self>,
        name: &str,
        tasks: usize,
    ) -> Result<Submitted, CoordinatorError> {
        let plan = JobPlan {
            job: JobName::new(name),
            probe_images: String::new(),
            images: 0,
            layers: Vec::new(),
            probe_tasks: Vec::new(),
            neuron_tasks: (0..tasks)
                .map(|i| dnd_pipeline::plan::NeuronBatch {
                    id: TaskId::new(format!("sim-{i:06}")),
                    layer: LayerName::new("sim"),
                    neurons: vec![NeuronId::new(i as u32)],
                })
                .collect(),
        };
        self.submit_simulated_plan(name, plan)
    }

    /// A planned job whose neuron tasks only commit markers (its probe tasks are dropped
    /// and its probe taken as merged), for `dnd bench units`: what the coordinator holds
    /// and does for a plan of that size, and nothing else.
    pub fn submit_simulated_plan(
        self: &Arc<Self>,
        name: &str,
        mut plan: JobPlan,
    ) -> Result<Submitted, CoordinatorError> {
        let dir = self.job_dir(name)?;
        plan.probe_tasks.clear();
        let defs = plan.tasks();
        let tasks = defs.len();
        let run = JobRun {
            plan: Arc::new(plan),
            dir,
            top_k: 0,
            liveness: dnd_core::Liveness::default(),
            started: Instant::now(),
            resumed: 0,
            load_seconds: 0.0,
            simulated: true,
        };
        lock(&self.runs).insert(JobName::new(name), Arc::new(run));
        let next =
            lock(&self.scheduler).add_job(name, defs, &HashMap::new(), true, Vec::new(), now_ms());
        self.after(name, next);
        self.work_ready.notify_waiters();
        Ok(Submitted { job: name.into(), tasks_total: tasks, tasks_resumed: 0 })
    }

    /// Runs the store work a scheduler change calls for, in the background.
    fn after(self: &Arc<Self>, job: &str, next: Next) {
        if next == Next::Nothing {
            return;
        }
        let this = self.clone();
        let job = job.to_string();
        tokio::spawn(async move {
            if let Err(e) = this.step(&job, next).await {
                tracing::error!(job, error = %e, "job failed");
                lock(&this.scheduler).fail_job(&job, &e.to_string(), now_ms());
            }
        });
    }

    async fn step(self: &Arc<Self>, job: &str, next: Next) -> Result<(), CoordinatorError> {
        let Some(run) = lock(&self.runs).get(job).cloned() else { return Ok(()) };
        let next = match next {
            Next::Nothing => return Ok(()),
            Next::MergeProbe => {
                finish::merge_probe(&run.dir, &run.plan, run.top_k, &run.liveness).await?;
                let next = lock(&self.scheduler).probe_merged(job, now_ms());
                self.work_ready.notify_waiters();
                next
            }
            Next::RecordFailure { task, attempts, error } => {
                finish::commit_failed_task(&run.dir, &run.plan, &task, attempts, &error).await?;
                lock(&self.scheduler).failure_recorded(job)
            }
            Next::Compact if run.simulated => {
                lock(&self.scheduler).finish(job, now_ms());
                Next::Nothing
            }
            Next::Compact => {
                let facts = RunFacts {
                    tasks_resumed: run.resumed,
                    total_seconds: run.started.elapsed().as_secs_f64(),
                    load_seconds: run.load_seconds,
                };
                // The summary is written last: the event log must be whole before it
                // appears (watchers and tests read the log once they see the summary).
                self.flush_events().await;
                finish::finish_job(&run.dir, &run.plan, &facts).await?;
                lock(&self.scheduler).finish(job, now_ms());
                self.flush_events().await;
                Next::Nothing
            }
        };
        Box::pin(self.step(job, next)).await
    }

    fn spawn_background(self: Arc<Self>) {
        let weak = Arc::downgrade(&self);
        let tick =
            (self.settings.lease / 8).clamp(Duration::from_millis(20), Duration::from_millis(500));
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(tick);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                interval.tick().await;
                let Some(this) = weak.upgrade() else { break };
                let expired = lock(&this.scheduler).reap(now_ms());
                let requeued = !expired.is_empty();
                for (job, next) in expired {
                    this.after(&job, next);
                }
                if requeued {
                    this.work_ready.notify_waiters();
                }
                this.flush_events().await;
            }
        });
    }

    /// Persists new events (one object per batch, so nothing is rewritten) and hands them
    /// to watchers.
    async fn flush_events(&self) {
        let batches = lock(&self.scheduler).drain_new_events();
        for (job, events) in batches {
            let Some(first) = events.first() else { continue };
            let Ok(dir) = self.job_dir(&job) else { continue };
            if let Err(e) = dir.append_events(first.seq, &events).await {
                tracing::warn!(job = %job, error = %e, "cannot persist the event log");
            }
            for event in events {
                self.metrics.inc("dnd_task_events_total", &[("kind", &event.kind)], 1.0);
                match event.kind.as_str() {
                    "retried" => self.metrics.inc("dnd_task_retries_total", &[], 1.0),
                    "lease_expired" => self.metrics.inc("dnd_lease_expiries_total", &[], 1.0),
                    _ => {}
                }
                let _ = self.events.send((job.clone(), event));
            }
        }
    }

    /// Registers a worker; its id.
    pub fn join(&self, name: &str) -> String {
        let mut workers = lock(&self.workers);
        let id = format!("{name}-{}", workers.len() + 1);
        workers.insert(id.clone(), name.to_string());
        self.metrics.inc("dnd_workers_joined_total", &[], 1.0);
        tracing::info!(worker = id, "worker joined");
        id
    }

    /// The next task for `worker`, waiting up to `wait` for one.
    pub async fn lease(&self, worker: &str, wait: Duration) -> Option<(Leased, Arc<JobPlan>)> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.work_ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let leased = lock(&self.scheduler).lease(
                worker,
                now_ms(),
                self.settings.lease.as_millis() as i64,
            );
            if let Some(leased) = leased {
                let plan = lock(&self.runs).get(&leased.job).map(|r| r.plan.clone())?;
                return Some((leased, plan));
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
    }

    pub fn heartbeat(
        &self,
        job: &str,
        task: &str,
        token: u64,
        progress: &[(Stage, u64)],
    ) -> Result<i64, Refused> {
        lock(&self.scheduler).heartbeat(
            job,
            task,
            token,
            progress,
            now_ms(),
            self.settings.lease.as_millis() as i64,
        )
    }

    /// A worker says it committed `task`: the marker in the store decides.
    pub async fn complete(
        self: &Arc<Self>,
        job: &str,
        task: &str,
        token: u64,
    ) -> Result<(), CoordinatorError> {
        let dir = self.job_dir(job)?;
        check_name("task", task).map_err(|e| CoordinatorError::BadRequest(e.to_string()))?;
        if dir.tasks().committed(task).await?.is_none() {
            return Err(CoordinatorError::NotCommitted { job: job.into(), task: task.into() });
        }
        let next = lock(&self.scheduler).committed(job, task, token, now_ms())?;
        self.after(job, next);
        Ok(())
    }

    /// A worker's attempt failed or was handed back; true when the task is queued again.
    pub fn fail(
        self: &Arc<Self>,
        job: &str,
        task: &str,
        token: u64,
        error: &str,
        handed_back: bool,
    ) -> Result<bool, CoordinatorError> {
        let (retried, next) =
            lock(&self.scheduler).failed(job, task, token, error, handed_back, now_ms())?;
        self.after(job, next);
        if retried {
            self.work_ready.notify_waiters();
        }
        Ok(retried)
    }

    pub async fn cancel(&self, job: &str) -> Result<JobView, CoordinatorError> {
        let dir = self.job_dir(job)?;
        lock(&self.scheduler)
            .cancel(job, now_ms())
            .map_err(|_| CoordinatorError::NotFound(job.into()))?;
        dir.set_cancelled(true).await?;
        self.view(job).ok_or_else(|| CoordinatorError::NotFound(job.into()))
    }

    pub fn view(&self, job: &str) -> Option<JobView> {
        lock(&self.scheduler).view(job)
    }

    /// A job's status: live, or for a job finished before this coordinator started, from
    /// its summary in the store.
    pub async fn status(&self, job: &str) -> Result<(JobView, String), CoordinatorError> {
        let dir = self.job_dir(job)?;
        if let Some(view) = self.view(job) {
            return Ok((view, dir.location().to_string()));
        }
        let Some(summary) =
            dir.summary().await.map_err(|e| CoordinatorError::BadRequest(e.to_string()))?
        else {
            return Err(CoordinatorError::NotFound(job.into()));
        };
        let counts = crate::scheduler::JobCounts {
            total: summary.tasks as u32,
            committed: (summary.tasks - summary.tasks_failed) as u32,
            failed: summary.tasks_failed as u32,
            ..Default::default()
        };
        Ok((
            JobView {
                job: job.into(),
                phase: Phase::Succeeded,
                counts,
                stages: Vec::new(),
                error: String::new(),
            },
            dir.location().to_string(),
        ))
    }

    pub fn jobs(&self) -> Vec<JobView> {
        let scheduler = lock(&self.scheduler);
        scheduler.jobs().filter_map(|j| scheduler.view(j)).collect()
    }

    /// The job's event log so far.
    pub fn events(&self, job: &str) -> Vec<Event> {
        lock(&self.scheduler).events(job).to_vec()
    }

    /// The coordinator's metrics registry.
    pub fn metrics(&self) -> &dnd_metrics::Metrics {
        &self.metrics
    }

    /// Brings the gauges computed from the jobs (tasks by state, jobs by phase) up to date,
    /// before a scrape. Every phase is set, so a phase no job is in any more reads 0.
    pub fn refresh_metrics(&self) {
        let jobs = self.jobs();
        let mut states = [("queued", 0u32), ("leased", 0), ("committed", 0), ("failed", 0)];
        let mut phases = Phase::ALL.map(|p| (p, 0u32));
        for v in &jobs {
            states[0].1 += v.counts.queued;
            states[1].1 += v.counts.leased;
            states[2].1 += v.counts.committed;
            states[3].1 += v.counts.failed;
            if let Some(entry) = phases.iter_mut().find(|(p, _)| *p == v.phase) {
                entry.1 += 1;
            }
        }
        for (state, n) in states {
            self.metrics.set("dnd_tasks", &[("state", state)], n as f64);
        }
        for (phase, n) in phases {
            self.metrics.set("dnd_jobs", &[("phase", phase.name())], n as f64);
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<(JobName, Event)> {
        self.events.subscribe()
    }

    pub fn job_location(&self, job: &str) -> Option<Location> {
        lock(&self.runs).get(job).map(|r| r.dir.location().clone())
    }
}

/// A job's persisted event log, in order.
pub async fn read_events(job: &JobDir) -> Result<Vec<Event>, PipelineError> {
    let mut events: Vec<Event> = job.events().await?;
    events.sort_by_key(|e| e.seq);
    Ok(events)
}

//! dnd-worker: the pull loop of a GPU worker. It joins the coordinator, leases a task
//! (long-poll), runs the pipeline's stage code for it with its models kept resident
//! between tasks, heartbeats while it runs (progress, lease extension), writes the
//! attempt's outputs under a path unique to the attempt and commits them with a
//! create-only marker, then reports. On shutdown it stops leasing and finishes the current
//! task, or hands it back when the grace period runs out.

pub mod gpu;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tonic::Code;

use dnd_core::Stage;
use dnd_models::TargetModel;
use dnd_models::device::parse_device;
use dnd_pipeline::{JobContext, JobDir, JobSpec, PipelineError, Progress, Workbench};
use dnd_proto::transport::{AuthedChannel, ClientConfig, MAX_MESSAGE_BYTES};
use dnd_proto::v1::worker_service_client::WorkerServiceClient;
use dnd_proto::v1::{self as pb};
use dnd_proto::{LeasedTask, PROTOCOL_VERSION, TransportError};
use dnd_store::{ContentCache, Location};

/// Tasks to fail on purpose, comma-separated task ids: a fault-injection hook for tests
/// of the retry path (a task that always fails).
pub const FAIL_TASKS_ENV: &str = "DND_FAIL_TASKS";

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("the coordinator refused this worker: {0}")]
    Refused(String),
}

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub client: ClientConfig,
    /// Reported to the coordinator (a pod name, say).
    pub name: String,
    /// Runs models here instead of the job's `device` (e.g. `cuda:0` on a GPU node).
    pub device: Option<String>,
    /// How long a task may keep running after shutdown is asked for before it is handed back.
    pub grace: Duration,
    /// How long one lease request waits for work.
    pub lease_wait: Duration,
}

/// What a worker did, when it stops.
#[derive(Debug, Clone, Default)]
pub struct WorkerReport {
    pub committed: usize,
    pub failed: usize,
    pub handed_back: usize,
    pub abandoned: usize,
}

/// Progress of the running attempt, per stage, for heartbeats; and when each stage last
/// moved, for the stage-duration metrics.
struct AttemptProgress {
    started: std::time::Instant,
    current: Mutex<String>,
    done: Mutex<BTreeMap<String, u64>>,
    /// Stages in the order they first moved, with the time they last moved.
    moved: Mutex<Vec<(String, std::time::Instant)>>,
}

impl Default for AttemptProgress {
    fn default() -> Self {
        Self {
            started: std::time::Instant::now(),
            current: Mutex::default(),
            done: Mutex::default(),
            moved: Mutex::default(),
        }
    }
}

impl AttemptProgress {
    fn snapshot(&self) -> Vec<pb::StageProgress> {
        lock(&self.done)
            .iter()
            .map(|(stage, done)| pb::StageProgress { stage: stage.clone(), done: *done, total: 0 })
            .collect()
    }

    fn moved(&self, stage: &str, done: u64) {
        *lock(&self.done).entry(stage.to_string()).or_default() += done;
        let now = std::time::Instant::now();
        let mut moved = lock(&self.moved);
        match moved.iter_mut().find(|(s, _)| s == stage) {
            Some(entry) => entry.1 = now,
            None => moved.push((stage.to_string(), now)),
        }
    }

    /// Seconds per stage: the batch goes through the stages one after another, so a
    /// stage's time runs from the previous stage's last move to its own.
    fn stage_seconds(&self) -> Vec<(String, f64)> {
        let mut last = self.started;
        lock(&self.moved)
            .iter()
            .map(|(stage, at)| {
                let seconds = at.saturating_duration_since(last).as_secs_f64();
                last = last.max(*at);
                (stage.clone(), seconds)
            })
            .collect()
    }
}

impl Progress for AttemptProgress {
    fn begin(&self, stage: &str, _total: u64) {
        *lock(&self.current) = stage.to_string();
    }
    fn advance(&self, done: u64) {
        let stage = lock(&self.current).clone();
        self.moved(&stage, done);
    }
    fn end(&self) {}
    fn advance_stage(&self, stage: Stage, done: u64) {
        self.moved(stage.name(), done);
    }
}

/// Declares the worker's metrics (docs/metrics.md).
fn worker_metrics() -> dnd_metrics::Metrics {
    use dnd_metrics::Kind;
    let m = dnd_metrics::Metrics::new();
    m.describe(
        "dnd_worker_tasks_total",
        Kind::Counter,
        "Task attempts this worker ran, by outcome: committed, failed, handed_back, abandoned.",
    );
    m.describe(
        "dnd_task_seconds",
        Kind::Histogram,
        "Wall time of committed task attempts, by kind (probe, neurons).",
    );
    m.describe("dnd_stage_seconds", Kind::Histogram, "Wall time of each stage within a task attempt (probe, crop, caption, summarize, generate, score).");
    m.describe("dnd_cache_lookups_total", Kind::Counter, "Content-cache lookups by kind (images, captions, replies, vectors) and result (hit, miss); a miss is one model call.");
    m.describe(
        "dnd_images_generated_total",
        Kind::Counter,
        "Images the generator made (image cache misses).",
    );
    m.describe(
        "dnd_model_load_seconds",
        Kind::Gauge,
        "Seconds the last model load (target, captioner, generator, embedder, summariser) took.",
    );
    m.describe(
        "dnd_models_loaded_total",
        Kind::Counter,
        "Model sets loaded (a new job with other models loads anew).",
    );
    m.describe("dnd_gpu_memory_used_bytes", Kind::Gauge, "GPU memory in use on each visible GPU, by every process (NVML; absent without an NVIDIA driver).");
    m.describe(
        "dnd_gpu_memory_total_bytes",
        Kind::Gauge,
        "GPU memory installed on each visible GPU (NVML; absent without an NVIDIA driver).",
    );
    m
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The models a spec needs, on a device, with a cache: workbenches are shared by jobs
/// whose key is equal.
pub fn bench_key(spec: &JobSpec, device: &str) -> String {
    serde_json::to_string(&(
        &spec.target.model,
        &spec.captioner,
        &spec.generator,
        &spec.embedder,
        &spec.summarizer,
        device,
        spec.cache.as_deref().unwrap_or(&format!("{}/cache", spec.out)),
    ))
    .expect("a job spec serialises")
}

pub struct Worker {
    config: WorkerConfig,
    benches: tokio::sync::Mutex<HashMap<String, Arc<Workbench>>>,
    jobs: tokio::sync::Mutex<HashMap<(String, String), Arc<JobContext>>>,
    stores: Mutex<HashMap<String, Location>>,
    fail_tasks: Vec<String>,
    metrics: dnd_metrics::Metrics,
    gpus: Option<gpu::GpuMemory>,
}

enum Outcome {
    Committed,
    Failed,
    /// The lease was lost (expired, job cancelled): the work is dropped.
    Abandoned,
    HandedBack,
}

impl Worker {
    pub fn new(config: WorkerConfig) -> Self {
        let fail_tasks = std::env::var(FAIL_TASKS_ENV)
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect();
        Self {
            config,
            benches: Default::default(),
            jobs: Default::default(),
            stores: Default::default(),
            fail_tasks,
            metrics: worker_metrics(),
            gpus: gpu::GpuMemory::open(),
        }
    }

    /// The worker's metrics registry.
    pub fn metrics(&self) -> &dnd_metrics::Metrics {
        &self.metrics
    }

    /// Updates the gauges read on demand (GPU memory) before a scrape.
    pub fn refresh_metrics(&self) {
        if let Some(gpus) = &self.gpus {
            gpu::record(&self.metrics, &gpus.read());
        }
    }

    /// Hands the worker models already loaded for `spec` (an embedded run loads them
    /// before any work, to check them).
    pub async fn provide_bench(&self, spec: &JobSpec, bench: Arc<Workbench>) {
        let device = self.config.device.clone().unwrap_or_else(|| spec.device.clone());
        self.benches.lock().await.insert(bench_key(spec, &device), bench);
    }

    /// Hands the worker an opened store under the name the coordinator gives it (an
    /// in-memory store cannot be reopened by name).
    pub fn provide_store(&self, name: &str, store: Location) {
        lock(&self.stores).insert(name.to_string(), store);
    }

    fn store(&self, name: &str) -> Result<Location, PipelineError> {
        if let Some(s) = lock(&self.stores).get(name) {
            return Ok(s.clone());
        }
        let opened = Location::open(name)?;
        lock(&self.stores).insert(name.to_string(), opened.clone());
        Ok(opened)
    }

    async fn bench(&self, spec: &JobSpec) -> Result<Arc<Workbench>, PipelineError> {
        let mut spec = spec.clone();
        if let Some(device) = &self.config.device {
            spec.device = device.clone();
        }
        let key = bench_key(&spec, &spec.device);
        let mut benches = self.benches.lock().await;
        if let Some(b) = benches.get(&key) {
            return Ok(b.clone());
        }
        tracing::info!(target_model = spec.target.model, "loading the job's models");
        let loading = std::time::Instant::now();
        let device = parse_device(&spec.device)?;
        let reference = spec.target.model.parse()?;
        let target = Arc::new(
            tokio::task::spawn_blocking(move || TargetModel::load(&reference, &device)).await??,
        );
        let cache = ContentCache::new(match &spec.cache {
            Some(c) => Location::create(c)?,
            None => self.store(&spec.out)?.join("cache"),
        });
        let bench = Arc::new(Workbench::load(&spec, target, cache).await?);
        self.metrics.set("dnd_model_load_seconds", &[], loading.elapsed().as_secs_f64());
        self.metrics.inc("dnd_models_loaded_total", &[], 1.0);
        // One set of resident models at a time: a new job's models replace the old ones.
        benches.clear();
        benches.insert(key, bench.clone());
        Ok(bench)
    }

    async fn context(&self, store: &str, job: &str) -> Result<Arc<JobContext>, PipelineError> {
        dnd_store::tasks::check_name("job", job)?;
        let key = (store.to_string(), job.to_string());
        let mut jobs = self.jobs.lock().await;
        if let Some(c) = jobs.get(&key) {
            return Ok(c.clone());
        }
        let context = Arc::new(JobContext::open(JobDir::under(&self.store(store)?, job)?).await?);
        jobs.insert(key, context.clone());
        Ok(context)
    }

    /// Runs one attempt and commits it.
    async fn execute(
        &self,
        task: &pb::Task,
        progress: &AttemptProgress,
    ) -> Result<(), PipelineError> {
        if self.fail_tasks.iter().any(|t| t == &task.task_id) {
            return Err(PipelineError::Internal(format!(
                "injected failure ({FAIL_TASKS_ENV} names task {})",
                task.task_id
            )));
        }
        // The task as leased: its work comes from the message, not from plan.json.
        let leased = LeasedTask::try_from(task.clone())
            .map_err(|e| PipelineError::Internal(e.to_string()))?;
        let context = self.context(&leased.store, &leased.job).await?;
        let bench = self.bench(&context.spec).await?;
        let stats = context.run_task(&bench, &leased.task, &leased.attempt_name, progress).await?;
        self.metrics.observe("dnd_task_seconds", &[("kind", &stats.kind)], stats.seconds);
        for (stage, seconds) in progress.stage_seconds() {
            self.metrics.observe("dnd_stage_seconds", &[("stage", &stage)], seconds);
        }
        for (kind, counts) in &stats.cache {
            self.metrics.inc(
                "dnd_cache_lookups_total",
                &[("kind", kind), ("result", "hit")],
                counts.hits as f64,
            );
            self.metrics.inc(
                "dnd_cache_lookups_total",
                &[("kind", kind), ("result", "miss")],
                counts.misses as f64,
            );
            if kind == "images" {
                self.metrics.inc("dnd_images_generated_total", &[], counts.misses as f64);
            }
        }
        let committed = context.dir.tasks().commit(&task.task_id, &task.attempt_name).await?;
        if !committed {
            tracing::info!(
                task = task.task_id,
                "another attempt committed first; this one's outputs are ignored"
            );
        }
        Ok(())
    }

    /// Pulls and runs tasks until `shutdown` turns true.
    pub async fn run(
        self: Arc<Self>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<WorkerReport, WorkerError> {
        let channel = self.config.client.connect_lazy()?;
        let mut client =
            WorkerServiceClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES);
        let mut report = WorkerReport::default();
        let Some(joined) = self.join(&mut client, &mut shutdown).await? else { return Ok(report) };
        tracing::info!(worker = joined.worker_id, coordinator = self.config.client.url, "joined");
        let heartbeat = Duration::from_millis(joined.heartbeat_ms.max(50) as u64);
        let mut backoff = Duration::from_millis(100);
        // A task handed out with the last Complete's reply.
        let mut next: Option<pb::Task> = None;
        while !*shutdown.borrow() {
            let task = match next.take() {
                Some(t) => t,
                None => {
                    let request = pb::LeaseRequest {
                        version: PROTOCOL_VERSION,
                        worker_id: joined.worker_id.clone(),
                        wait_ms: self.config.lease_wait.as_millis() as u32,
                    };
                    let leased = tokio::select! {
                        r = client.lease(request) => r,
                        _ = shutdown.changed() => break,
                    };
                    match leased {
                        Ok(reply) => {
                            backoff = Duration::from_millis(100);
                            match reply.into_inner().task {
                                Some(t) => t,
                                None => continue,
                            }
                        }
                        Err(status) => {
                            fatal(&status)?;
                            tracing::warn!(error = status.message(), "lease failed; retrying");
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(5));
                            continue;
                        }
                    }
                }
            };
            tracing::info!(job = task.job, task = task.task_id, attempt = task.attempt, "leased");
            let (outcome, following) = self
                .run_leased(&mut client, &joined.worker_id, &task, heartbeat, &mut shutdown)
                .await;
            next = following;
            let (name, count) = match outcome {
                Outcome::Committed => ("committed", &mut report.committed),
                Outcome::Failed => ("failed", &mut report.failed),
                Outcome::HandedBack => ("handed_back", &mut report.handed_back),
                Outcome::Abandoned => ("abandoned", &mut report.abandoned),
            };
            *count += 1;
            self.metrics.inc("dnd_worker_tasks_total", &[("outcome", name)], 1.0);
        }
        if let Some(task) = next {
            // Leased just as shutdown came: give it straight back.
            let request = fail_request(
                &joined.worker_id,
                &task,
                format!("worker {} is shutting down", self.config.name),
                true,
            );
            if client.fail(request).await.is_ok() {
                report.handed_back += 1;
            }
        }
        tracing::info!(?report, "worker stopping");
        Ok(report)
    }

    async fn join(
        &self,
        client: &mut WorkerServiceClient<AuthedChannel>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<Option<pb::JoinReply>, WorkerError> {
        let mut backoff = Duration::from_millis(100);
        loop {
            let request = pb::JoinRequest {
                version: PROTOCOL_VERSION,
                name: self.config.name.clone(),
                capabilities: Some(pb::Capabilities {
                    device: self.config.device.clone().unwrap_or_default(),
                    memory_bytes: 0,
                    models: Vec::new(),
                    dnd_version: env!("CARGO_PKG_VERSION").into(),
                }),
            };
            let result = tokio::select! {
                r = client.join(request) => r,
                _ = shutdown.changed() => return Ok(None),
            };
            match result {
                Ok(reply) => return Ok(Some(reply.into_inner())),
                Err(status) => {
                    fatal(&status)?;
                    tracing::warn!(
                        error = status.message(),
                        url = self.config.client.url,
                        "cannot join the coordinator yet; retrying"
                    );
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    async fn run_leased(
        self: &Arc<Self>,
        client: &mut WorkerServiceClient<AuthedChannel>,
        worker_id: &str,
        task: &pb::Task,
        heartbeat: Duration,
        shutdown: &mut watch::Receiver<bool>,
    ) -> (Outcome, Option<pb::Task>) {
        let progress = Arc::new(AttemptProgress::default());
        // Its own task, so heartbeats go out however long a stage keeps it busy.
        let mut work = {
            let (this, task, progress) = (self.clone(), task.clone(), progress.clone());
            tokio::spawn(async move { this.execute(&task, &progress).await })
        };
        let mut beat = tokio::time::interval(heartbeat);
        beat.tick().await;
        let mut grace_end: Option<tokio::time::Instant> = if *shutdown.borrow() {
            Some(tokio::time::Instant::now() + self.config.grace)
        } else {
            None
        };
        let result = loop {
            let grace = async {
                match grace_end {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = &mut work => break Some(r.unwrap_or_else(|e| Err(PipelineError::Internal(format!("the task panicked: {e}"))))),
                _ = beat.tick() => {
                    let request = pb::HeartbeatRequest {
                        version: PROTOCOL_VERSION,
                        worker_id: worker_id.into(),
                        job: task.job.clone(),
                        task_id: task.task_id.clone(),
                        token: task.token,
                        progress: progress.snapshot(),
                    };
                    match client.heartbeat(request).await {
                        Ok(reply) if !reply.get_ref().keep_going => {
                            tracing::warn!(task = task.task_id, "lease lost; dropping the attempt");
                            work.abort();
                            return (Outcome::Abandoned, None);
                        }
                        Ok(_) => {}
                        // A coordinator restarting: keep working, the marker decides later.
                        Err(status) => tracing::warn!(error = status.message(), "heartbeat failed"),
                    }
                }
                _ = shutdown.changed(), if grace_end.is_none() => {
                    tracing::info!(task = task.task_id, grace_s = self.config.grace.as_secs_f64(), "shutdown asked: finishing the current task within the grace period");
                    grace_end = Some(tokio::time::Instant::now() + self.config.grace);
                }
                _ = grace => break None,
            }
        };
        let Some(result) = result else {
            work.abort();
            let request = fail_request(
                worker_id,
                task,
                format!("worker {} shut down before the task finished", self.config.name),
                true,
            );
            if let Err(status) = client.fail(request).await {
                tracing::warn!(
                    error = status.message(),
                    "could not hand the task back; its lease will expire"
                );
            }
            return (Outcome::HandedBack, None);
        };
        match result {
            Ok(()) => {
                let request = pb::CompleteRequest {
                    version: PROTOCOL_VERSION,
                    worker_id: worker_id.into(),
                    job: task.job.clone(),
                    task_id: task.task_id.clone(),
                    token: task.token,
                    lease_next: !*shutdown.borrow(),
                };
                let mut next = None;
                // The commit is in the store; telling the coordinator may need retries
                // while it restarts (a restarted one finds the marker by itself too).
                for wait in [0, 200, 1000, 3000] {
                    tokio::time::sleep(Duration::from_millis(wait)).await;
                    match client.complete(request.clone()).await {
                        Ok(reply) => {
                            next = reply.into_inner().next;
                            break;
                        }
                        Err(status)
                            if status.code() == Code::Unavailable
                                || status.code() == Code::Unknown =>
                        {
                            continue;
                        }
                        Err(status) => {
                            tracing::warn!(error = status.message(), "complete refused");
                            break;
                        }
                    }
                }
                tracing::info!(task = task.task_id, "committed");
                (Outcome::Committed, next)
            }
            Err(e) => {
                let error = e.to_string();
                tracing::warn!(task = task.task_id, error, "task failed");
                let request = fail_request(worker_id, task, error, false);
                if let Err(status) = client.fail(request).await {
                    tracing::warn!(
                        error = status.message(),
                        "could not report the failure; the lease will expire"
                    );
                }
                (Outcome::Failed, None)
            }
        }
    }
}

fn fail_request(
    worker_id: &str,
    task: &pb::Task,
    error: String,
    handed_back: bool,
) -> pb::FailRequest {
    pb::FailRequest {
        version: PROTOCOL_VERSION,
        worker_id: worker_id.into(),
        job: task.job.clone(),
        task_id: task.task_id.clone(),
        token: task.token,
        error,
        handed_back,
    }
}

/// Errors no retry can fix.
fn fatal(status: &tonic::Status) -> Result<(), WorkerError> {
    let refused = matches!(status.code(), Code::Unauthenticated | Code::PermissionDenied)
        || (status.code() == Code::FailedPrecondition
            && status.message().contains("protocol version"));
    if refused { Err(WorkerError::Refused(status.message().to_string())) } else { Ok(()) }
}

//! The distributed commands: `dnd coordinator`, `dnd worker`, and the clients `dnd submit`,
//! `dnd status`, `dnd watch`, `dnd cancel`, `dnd list`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tokio::sync::watch;
use tonic::Code;

use dnd_coordinator::{Coordinator, Settings};
use dnd_core::Stage;
use dnd_pipeline::Progress;
use dnd_proto::convert::job_state_name;
use dnd_proto::transport::{AuthedChannel, MAX_MESSAGE_BYTES};
use dnd_proto::v1::job_service_client::JobServiceClient;
use dnd_proto::v1::{self as pb};
use dnd_proto::{BearerToken, ClientConfig, PROTOCOL_VERSION, ServerConfig};
use dnd_store::Location;
use dnd_worker::{Worker, WorkerConfig};

use crate::BadInput;
use crate::progress::Bars;

#[derive(Args, Clone)]
pub struct AuthArgs {
    /// A file holding the shared auth token; default: the DND_TOKEN environment variable.
    #[arg(long, env = "DND_TOKEN_FILE", value_name = "FILE")]
    token_file: Option<PathBuf>,
}

#[derive(Args, Clone)]
pub struct ClientArgs {
    /// The coordinator: http://host:port, or https://host:port when it serves TLS.
    #[arg(
        long,
        env = "DND_COORDINATOR",
        default_value = "http://127.0.0.1:7070",
        value_name = "URL"
    )]
    coordinator: String,
    #[command(flatten)]
    auth: AuthArgs,
    /// A CA certificate (PEM) to trust for https://, beside the system's roots.
    #[arg(long, env = "DND_TLS_CA", value_name = "FILE")]
    tls_ca: Option<PathBuf>,
}

impl ClientArgs {
    fn config(&self) -> anyhow::Result<ClientConfig> {
        let token = BearerToken::load(self.auth.token_file.as_deref())
            .map_err(|e| BadInput(e.to_string()))?;
        Ok(ClientConfig { url: self.coordinator.clone(), token, tls_ca: self.tls_ca.clone() })
    }

    async fn jobs(&self) -> anyhow::Result<JobServiceClient<AuthedChannel>> {
        let channel = self.config()?.connect().await?;
        Ok(JobServiceClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES))
    }
}

/// A gRPC error as the user should read it; bad input (a refused spec, a wrong token)
/// exits 2.
fn rpc_error(status: tonic::Status) -> anyhow::Error {
    let text = format!("{} ({:?})", status.message(), status.code());
    match status.code() {
        Code::InvalidArgument | Code::Unauthenticated | Code::NotFound | Code::PermissionDenied => {
            BadInput(text).into()
        }
        _ => anyhow::anyhow!(text),
    }
}

#[derive(Args)]
pub struct CoordinatorArgs {
    /// The store every job lives in: a directory or an object store URL (s3://, gs://, az://).
    #[arg(long, env = "DND_STORE", value_name = "DIR|URL")]
    store: String,
    /// Where to listen for workers and clients.
    #[arg(long, env = "DND_LISTEN", default_value = "0.0.0.0:7070", value_name = "ADDR")]
    listen: String,
    #[command(flatten)]
    auth: AuthArgs,
    /// TLS certificate chain (PEM); with --tls-key, the coordinator serves https only.
    #[arg(long, env = "DND_TLS_CERT", value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    #[arg(long, env = "DND_TLS_KEY", value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Seconds a lease lasts without a heartbeat; a worker that dies loses its task after this.
    #[arg(long, env = "DND_LEASE_SECONDS", default_value_t = 60.0)]
    lease_seconds: f64,
    /// Attempts a task gets before it is recorded as failed.
    #[arg(long, env = "DND_MAX_ATTEMPTS", default_value_t = 3)]
    max_attempts: u32,
    /// Serve Prometheus metrics on http://ADDR/metrics (and /healthz), e.g. 0.0.0.0:9090.
    #[arg(long, env = "DND_METRICS_LISTEN", value_name = "ADDR")]
    metrics_listen: Option<String>,
}

#[derive(Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// This worker's name in logs and events (default: the host name).
    #[arg(long, env = "DND_WORKER_NAME")]
    name: Option<String>,
    /// Run models here instead of the job's device: cpu, cuda or cuda:N.
    #[arg(long, env = "DND_DEVICE")]
    device: Option<String>,
    /// Seconds the current task may run on after SIGTERM before it is handed back.
    #[arg(long, env = "DND_GRACE_SECONDS", default_value_t = 25.0)]
    grace_seconds: f64,
    /// Compute threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Serve Prometheus metrics on http://ADDR/metrics and a liveness check on /healthz.
    #[arg(long, env = "DND_METRICS_LISTEN", value_name = "ADDR")]
    metrics_listen: Option<String>,
}

#[derive(Args)]
pub struct SubmitArgs {
    /// The job file (TOML): the same file `dnd dissect --config` reads; its `out` is
    /// replaced by the coordinator's store.
    job: PathBuf,
    #[command(flatten)]
    client: ClientArgs,
    /// Follow the job until it ends (as `dnd watch`).
    #[arg(long)]
    watch: bool,
}

#[derive(Args)]
pub struct JobArgs {
    /// The job's name, as `dnd submit` printed it.
    job: String,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Args)]
pub struct ListArgs {
    #[command(flatten)]
    client: ClientArgs,
}

/// Resolves on SIGTERM or Ctrl-C.
async fn terminated() {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return std::future::pending().await,
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

/// Declares the store's counters on `metrics` (docs/metrics.md); what brings them up to
/// date before a scrape. They count this process's calls, whichever component made them.
fn store_metrics(metrics: &dnd_metrics::Metrics) -> impl Fn() + Send + Sync + 'static {
    use dnd_metrics::Kind;
    metrics.describe(
        "dnd_store_retries_total",
        Kind::Counter,
        "Store calls retried after a transient failure (one per retry).",
    );
    metrics.describe(
        "dnd_store_gave_up_total",
        Kind::Counter,
        "Store calls that still failed after their last retry.",
    );
    metrics.describe(
        "dnd_store_faults_injected_total",
        Kind::Counter,
        "Faults injected into store calls by kind (chaos tests with DND_STORE_FAULTS only).",
    );
    let metrics = metrics.clone();
    move || {
        let retries = dnd_store::retry::retry_counts();
        metrics.set("dnd_store_retries_total", &[], retries.retries as f64);
        metrics.set("dnd_store_gave_up_total", &[], retries.gave_up as f64);
        if let Some(f) = dnd_store::faults::installed_counts() {
            for (kind, n) in [
                ("error", f.error),
                ("timeout", f.timeout),
                ("throttle", f.throttle),
                ("after_apply", f.after_apply),
            ] {
                metrics.set("dnd_store_faults_injected_total", &[("kind", kind)], n as f64);
            }
        }
    }
}

pub async fn coordinator(args: CoordinatorArgs) -> anyhow::Result<()> {
    let token =
        BearerToken::load(args.auth.token_file.as_deref()).map_err(|e| BadInput(e.to_string()))?;
    if args.lease_seconds.is_nan() || args.lease_seconds <= 0.0 {
        return Err(BadInput("--lease-seconds must be positive".into()).into());
    }
    let store = Location::create(&args.store)?;
    let lease = Duration::from_secs_f64(args.lease_seconds);
    let settings = Settings {
        lease,
        heartbeat: lease / 3,
        max_attempts: args.max_attempts.max(1),
        resume_unfinished: true,
    };
    let server = ServerConfig { tls_cert: args.tls_cert, tls_key: args.tls_key };
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .map_err(|e| BadInput(format!("cannot listen on {}: {e}", args.listen)))?;
    let coordinator = Coordinator::open(store.clone(), settings).await?;
    let metrics_addr = match &args.metrics_listen {
        Some(addr) => {
            let live = coordinator.clone();
            let store_counts = store_metrics(coordinator.metrics());
            let refresh = move || {
                live.refresh_metrics();
                store_counts();
            };
            Some(
                dnd_metrics::serve(coordinator.metrics().clone(), addr, refresh)
                    .await
                    .map_err(|e| BadInput(format!("cannot serve metrics on {addr}: {e}")))?,
            )
        }
        None => None,
    };
    let served =
        dnd_coordinator::serve(coordinator, listener, token, &server, terminated()).await?;
    // Tests and scripts read the bound address from this line.
    println!("coordinator listening on {} (store {store})", served.addr);
    if let Some(addr) = metrics_addr {
        println!("metrics on http://{addr}/metrics");
    }
    served.task.await?.context("the coordinator's server stopped")?;
    tracing::info!("coordinator stopped");
    Ok(())
}

pub async fn worker(args: WorkerArgs) -> anyhow::Result<()> {
    let name =
        args.name.or_else(|| std::env::var("HOSTNAME").ok()).unwrap_or_else(|| "worker".into());
    let config = WorkerConfig {
        client: args.client.config()?,
        name,
        device: args.device,
        grace: Duration::from_secs_f64(args.grace_seconds.max(0.0)),
        lease_wait: Duration::from_secs(20),
    };
    let worker = std::sync::Arc::new(Worker::new(config));
    if let Some(addr) = &args.metrics_listen {
        let live = worker.clone();
        let store_counts = store_metrics(worker.metrics());
        let refresh = move || {
            live.refresh_metrics();
            store_counts();
        };
        let bound = dnd_metrics::serve(worker.metrics().clone(), addr, refresh)
            .await
            .map_err(|e| BadInput(format!("cannot serve metrics on {addr}: {e}")))?;
        // Scripts and tests read the bound address from this line (ADDR may end in :0);
        // Rust's stdout is line-buffered, so it goes out at once.
        println!("metrics on http://{bound}/metrics");
    }
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(async move {
        terminated().await;
        tracing::info!("shutdown asked: no new tasks; finishing or handing back the current one");
        let _ = stop.send(true);
    });
    let report = worker.run(stopped).await.map_err(|e| match e {
        dnd_worker::WorkerError::Refused(m) => {
            anyhow::Error::from(BadInput(format!("the coordinator refused this worker: {m}")))
        }
        other => other.into(),
    })?;
    println!(
        "worker done: {} tasks committed, {} failed, {} handed back, {} abandoned",
        report.committed, report.failed, report.handed_back, report.abandoned
    );
    Ok(())
}

pub async fn submit(args: SubmitArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.job)
        .map_err(|e| BadInput(format!("cannot read the job file {}: {e}", args.job.display())))?;
    // Checked here too, so that a typo is reported before anything is sent.
    dnd_pipeline::JobSpec::from_toml(&text, &args.job.display().to_string())?;
    let mut jobs = args.client.jobs().await?;
    let reply = jobs
        .submit(pb::SubmitRequest { version: PROTOCOL_VERSION, spec_toml: text })
        .await
        .map_err(rpc_error)?
        .into_inner();
    println!(
        "submitted job {} ({} tasks, {} already committed)",
        reply.job, reply.tasks_total, reply.tasks_resumed
    );
    if args.watch {
        return follow(&mut jobs, &reply.job).await;
    }
    Ok(())
}

fn print_status(s: &pb::JobStatus) {
    println!(
        "{}: {}; tasks {} total, {} queued, {} running, {} committed, {} failed, {} retried",
        s.job,
        job_state_name(s.state),
        s.tasks_total,
        s.tasks_queued,
        s.tasks_leased,
        s.tasks_committed,
        s.tasks_failed,
        s.tasks_retried
    );
    for p in &s.stages {
        println!("  {:>9} {}/{}", p.stage, p.done, p.total);
    }
    if !s.error.is_empty() {
        println!("  error: {}", s.error);
    }
    if !s.location.is_empty() {
        println!("  results: {}/results/", s.location);
    }
}

pub async fn status(args: JobArgs) -> anyhow::Result<()> {
    let mut jobs = args.client.jobs().await?;
    let s = jobs
        .status(pb::StatusRequest { version: PROTOCOL_VERSION, job: args.job })
        .await
        .map_err(rpc_error)?
        .into_inner();
    print_status(&s);
    Ok(())
}

pub async fn watch_job(args: JobArgs) -> anyhow::Result<()> {
    let mut jobs = args.client.jobs().await?;
    follow(&mut jobs, &args.job).await
}

/// Follows a job's event stream: one bar per stage, events as log lines; fails when the
/// job does.
async fn follow(jobs: &mut JobServiceClient<AuthedChannel>, job: &str) -> anyhow::Result<()> {
    let mut stream = jobs
        .watch(pb::WatchRequest { version: PROTOCOL_VERSION, job: job.into() })
        .await
        .map_err(rpc_error)?
        .into_inner();
    let bars = Bars::new();
    let mut shown: std::collections::BTreeMap<String, u64> = Default::default();
    let mut last: Option<pb::JobStatus> = None;
    while let Some(event) = stream.message().await.map_err(rpc_error)? {
        if !matches!(event.kind.as_str(), "status" | "progress") && !event.kind.is_empty() {
            let attempt = if event.attempt > 0 {
                format!(" attempt {}", event.attempt)
            } else {
                String::new()
            };
            tracing::info!(
                "{} {}{}{} {}",
                event.kind,
                event.task_id,
                attempt,
                if event.worker.is_empty() {
                    String::new()
                } else {
                    format!(" on {}", event.worker)
                },
                event.message
            );
        }
        let Some(status) = event.status else { continue };
        if status.stages.is_empty() {
            continue;
        }
        if shown.is_empty() {
            let totals: Vec<(Stage, u64)> = Stage::ALL
                .into_iter()
                .filter_map(|s| {
                    status.stages.iter().find(|p| p.stage == s.name()).map(|p| (s, p.total))
                })
                .collect();
            bars.begin_stages(&totals);
        }
        for p in &status.stages {
            let before = shown.get(&p.stage).copied().unwrap_or(0);
            if let Ok(stage) = p.stage.parse::<Stage>() {
                bars.advance_stage(stage, p.done.saturating_sub(before));
            }
            shown.insert(p.stage.clone(), p.done.max(before));
        }
        last = Some(status);
    }
    bars.end_stages();
    drop(bars);
    let Some(status) = last else { return Ok(()) };
    print_status(&status);
    match pb::JobState::try_from(status.state) {
        Ok(pb::JobState::Succeeded) => Ok(()),
        Ok(pb::JobState::Failed) => anyhow::bail!("job {} failed: {}", status.job, status.error),
        Ok(pb::JobState::Cancelled) => anyhow::bail!("job {} was cancelled", status.job),
        _ => anyhow::bail!("the coordinator ended the stream before job {} finished", status.job),
    }
}

pub async fn cancel(args: JobArgs) -> anyhow::Result<()> {
    let mut jobs = args.client.jobs().await?;
    let s = jobs
        .cancel(pb::CancelRequest { version: PROTOCOL_VERSION, job: args.job })
        .await
        .map_err(rpc_error)?
        .into_inner();
    print_status(&s);
    Ok(())
}

pub async fn list(args: ListArgs) -> anyhow::Result<()> {
    let mut jobs = args.client.jobs().await?;
    let reply = jobs
        .list(pb::ListRequest { version: PROTOCOL_VERSION })
        .await
        .map_err(rpc_error)?
        .into_inner();
    if reply.jobs.is_empty() {
        println!("no jobs");
    }
    for s in &reply.jobs {
        println!(
            "{}\t{}\t{}/{} tasks committed, {} failed",
            s.job,
            job_state_name(s.state),
            s.tasks_committed,
            s.tasks_total,
            s.tasks_failed
        );
    }
    Ok(())
}

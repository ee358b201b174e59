//! `dnd bench scheduler`: what the coordinator costs. A job of N tasks runs on W simulated
//! workers, each a real gRPC client on loopback whose task is to sleep a set time, commit
//! the task's marker in the store and complete it. The makespan against the ideal
//! (N x task time / W) is the scheduling overhead.

use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;

use dnd_coordinator::{Coordinator, Phase, Settings};
use dnd_proto::transport::AuthedChannel;
use dnd_proto::v1::worker_service_client::WorkerServiceClient;
use dnd_proto::v1::{self as pb};
use dnd_proto::{ClientConfig, PROTOCOL_VERSION};
use dnd_store::{Location, TaskStore};

#[derive(Args)]
pub struct SchedulerArgs {
    /// Tasks in the job.
    #[arg(long, default_value_t = 10_000)]
    tasks: usize,
    /// Simulated workers, each with its own gRPC connection.
    #[arg(long, default_value_t = 64)]
    workers: usize,
    /// Milliseconds each task takes.
    #[arg(long, default_value_t = 100)]
    task_ms: u64,
    /// The store the markers go to (default: in memory, so that the store's speed does
    /// not count).
    #[arg(long, default_value = "memory:///")]
    store: String,
    /// Also write the numbers as JSON.
    #[arg(long, value_name = "FILE")]
    json: Option<std::path::PathBuf>,
}

#[derive(Debug, Serialize)]
struct SchedulerReport {
    tasks: usize,
    workers: usize,
    task_ms: u64,
    makespan_seconds: f64,
    /// Total work (time the simulated tasks actually slept) / workers.
    ideal_seconds: f64,
    /// ceil(tasks / workers) x the mean task time: no schedule can beat it.
    whole_tasks_bound_seconds: f64,
    mean_task_ms: f64,
    /// (makespan - ideal) / makespan.
    overhead_fraction: f64,
    tasks_per_second: f64,
    /// Per task, seen by workers: time in Lease calls (only when no task came with the last
    /// Complete), and in commit + Complete (which also leases the next task).
    lease_ms_mean: f64,
    complete_ms_mean: f64,
}

pub(crate) async fn simulated_worker(
    channel: AuthedChannel,
    store: Location,
    task_time: Duration,
) -> anyhow::Result<(usize, Duration, Duration, Duration)> {
    let mut client = WorkerServiceClient::new(channel);
    let joined = client
        .join(pb::JoinRequest { version: PROTOCOL_VERSION, name: "sim".into(), capabilities: None })
        .await?
        .into_inner();
    let (mut done, mut lease_time, mut complete_time, mut worked) =
        (0, Duration::ZERO, Duration::ZERO, Duration::ZERO);
    let mut next = None;
    loop {
        // As `dnd worker` does: the next task comes with the last Complete's reply, and a
        // Lease (long-poll) only when none did.
        let task = match next.take() {
            Some(t) => t,
            None => {
                let asked = Instant::now();
                let reply = client
                    .lease(pb::LeaseRequest {
                        version: PROTOCOL_VERSION,
                        worker_id: joined.worker_id.clone(),
                        wait_ms: 500,
                    })
                    .await?
                    .into_inner();
                lease_time += asked.elapsed();
                match reply.task {
                    Some(t) => t,
                    None => return Ok((done, lease_time, complete_time, worked)),
                }
            }
        };
        // The work: a sleep, which the timer may stretch by a millisecond; the ideal below
        // counts the time actually slept.
        let working = Instant::now();
        tokio::time::sleep(task_time).await;
        worked += working.elapsed();
        let started = Instant::now();
        TaskStore::new(store.join(&format!("jobs/{}", task.job)))
            .commit(&task.task_id, &task.attempt_name)
            .await?;
        let request = pb::CompleteRequest {
            version: PROTOCOL_VERSION,
            worker_id: joined.worker_id.clone(),
            job: task.job,
            task_id: task.task_id,
            token: task.token,
            lease_next: true,
        };
        next = client.complete(request).await?.into_inner().next;
        complete_time += started.elapsed();
        done += 1;
    }
}

pub async fn scheduler(args: SchedulerArgs) -> anyhow::Result<()> {
    let store = Location::create(&args.store)?;
    let settings = Settings {
        lease: Duration::from_secs(60),
        heartbeat: Duration::from_secs(20),
        max_attempts: 3,
        resume_unfinished: false,
    };
    let coordinator = Coordinator::open(store.clone(), settings).await?;
    let server = Loopback::serve(&coordinator).await?;
    let mut channels = Vec::new();
    for _ in 0..args.workers {
        channels.push(server.client.connect().await?);
    }

    let job = "bench-scheduler";
    let started = Instant::now();
    coordinator.submit_simulated(job, args.tasks)?;
    let task_time = Duration::from_millis(args.task_ms);
    let workers: Vec<_> = channels
        .into_iter()
        .map(|c| tokio::spawn(simulated_worker(c, store.clone(), task_time)))
        .collect();
    wait_for_success(&coordinator, job, Duration::from_millis(1)).await?;
    let makespan = started.elapsed().as_secs_f64();
    let (mut done, mut lease, mut complete, mut worked) =
        (0, Duration::ZERO, Duration::ZERO, Duration::ZERO);
    for w in workers {
        let (d, l, c, work) = w.await??;
        done += d;
        lease += l;
        complete += c;
        worked += work;
    }
    server.stop();
    anyhow::ensure!(done == args.tasks, "{done} tasks completed of {}", args.tasks);
    // Total work / workers, with the work as slept; and the bound that whole tasks set
    // (some worker runs ceil(tasks / workers) of them).
    let ideal = worked.as_secs_f64() / args.workers as f64;
    let mean_task = worked.as_secs_f64() / done.max(1) as f64;
    let whole_tasks_bound = args.tasks.div_ceil(args.workers) as f64 * mean_task;
    let report = SchedulerReport {
        tasks: args.tasks,
        workers: args.workers,
        task_ms: args.task_ms,
        makespan_seconds: makespan,
        ideal_seconds: ideal,
        whole_tasks_bound_seconds: whole_tasks_bound,
        mean_task_ms: mean_task * 1000.0,
        overhead_fraction: (makespan - ideal) / makespan,
        tasks_per_second: args.tasks as f64 / makespan,
        lease_ms_mean: lease.as_secs_f64() * 1000.0 / done.max(1) as f64,
        complete_ms_mean: complete.as_secs_f64() * 1000.0 / done.max(1) as f64,
    };
    println!(
        "{} tasks of {} ms (slept {:.2} ms) on {} workers: makespan {:.2} s, ideal {:.2} s (whole tasks: {:.2} s), scheduling overhead {:.2}% of the makespan; {:.0} tasks/s; per task: {:.2} ms in Lease, {:.2} ms in commit + Complete-and-lease-next",
        report.tasks,
        report.task_ms,
        report.mean_task_ms,
        report.workers,
        report.makespan_seconds,
        report.ideal_seconds,
        report.whole_tasks_bound_seconds,
        100.0 * report.overhead_fraction,
        report.tasks_per_second,
        report.lease_ms_mean,
        report.complete_ms_mean
    );
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
    }
    Ok(())
}

/// A coordinator served over gRPC on loopback with a fresh token: what the benches'
/// simulated workers connect to.
pub(crate) struct Loopback {
    pub client: ClientConfig,
    stop: tokio::sync::oneshot::Sender<()>,
}

impl Loopback {
    pub async fn serve(coordinator: &std::sync::Arc<Coordinator>) -> anyhow::Result<Self> {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (_served, client) = dnd_coordinator::serve_loopback(coordinator.clone(), async move {
            let _ = stopped.await;
        })
        .await?;
        Ok(Self { client, stop })
    }

    /// Ends the server.
    pub fn stop(self) {
        let _ = self.stop.send(());
    }
}

/// Waits, polling every `poll`, until `job` has succeeded; fails if it failed, was
/// cancelled or is unknown.
pub(crate) async fn wait_for_success(
    coordinator: &Coordinator,
    job: &str,
    poll: Duration,
) -> anyhow::Result<()> {
    loop {
        match coordinator.view(job).map(|v| v.phase) {
            Some(Phase::Succeeded) => return Ok(()),
            Some(Phase::Failed | Phase::Cancelled) | None => {
                anyhow::bail!("the benchmark job did not succeed")
            }
            _ => tokio::time::sleep(poll).await,
        }
    }
}

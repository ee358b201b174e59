//! `dnd bench chaos`: a real job on a coordinator and N worker processes on loopback,
//! under continuous failure. Every `--kill-every` seconds one of the processes (each in
//! turn of a shuffled round, the coordinator included) is SIGKILLed and started again,
//! and every process's store fails a share of its calls (errors, timeouts, throttling, and
//! replies lost after the call took effect, create-only commits included). At the end
//! every neuron must be described exactly once, and every results table must equal, row
//! for row, that of a clean run of the same job in one process.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use dnd_embedded::run_dissect;
use dnd_pipeline::{JobDir, JobSpec};
use dnd_store::Location;
use dnd_store::faults::FaultConfig;

use crate::BadInput;
use crate::chaos_check::{LogCounts, Verdict, count_logs, verify, wasted_task_seconds};
use crate::chaos_cluster::{Cluster, ClusterSettings, Role};
use crate::progress::Bars;

#[derive(Args)]
pub struct ChaosArgs {
    /// The job to run (its `out` is replaced): by default 1,028 one-neuron tasks with the
    /// fixture models.
    #[arg(long, value_name = "FILE", default_value = "bench/chaos-job.toml")]
    config: PathBuf,
    /// A smaller (or other) set of neurons, as `dnd dissect --neurons` takes them:
    /// LAYER=IDS, repeated, e.g. --neurons layer4=0..4 --neurons fc=0..40.
    #[arg(long, value_name = "[LAYER=]IDS")]
    neurons: Vec<String>,
    /// Worker processes.
    #[arg(long, default_value_t = 3)]
    workers: usize,
    /// Seconds between kills (each kills one process, and starts it again at once).
    #[arg(long, default_value_t = 30.0)]
    kill_every: f64,
    /// The store faults every process meets (`none` for none): rates of `error`,
    /// `timeout`, `throttle` and `after_apply` (the call took effect, its reply was lost),
    /// `timeout_ms`, `seed`.
    #[arg(
        long,
        default_value = "error=0.03,timeout=0.01,throttle=0.03,after_apply=0.02,timeout_ms=200"
    )]
    faults: String,
    /// The coordinator's lease: how soon a killed worker's task goes to another.
    #[arg(long, default_value_t = 5.0)]
    lease_seconds: f64,
    /// Compute threads per worker.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Seeds the order of the kills (and, with `seed=` of --faults, the faults).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Each run writes its stores and the processes' logs to a new directory here.
    #[arg(long, value_name = "DIR", default_value = "out/bench-chaos")]
    out: PathBuf,
    /// Fail if the job has not finished after this many minutes under chaos.
    #[arg(long, default_value_t = 120.0)]
    timeout_minutes: f64,
    /// Also write the report as JSON.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
struct ChaosReport {
    tasks: usize,
    workers: usize,
    kill_every_seconds: f64,
    /// Kills survived, by what was killed (`coordinator`, `worker`).
    kills: BTreeMap<String, u64>,
    /// Processes that exited by themselves (restarted; there should be none).
    unexpected_exits: Vec<String>,
    faults_setting: String,
    store: LogCounts,
    wasted_task_seconds: f64,
    chaos_makespan_seconds: f64,
    clean_makespan_seconds: f64,
    verdict: Verdict,
    run_dir: String,
}

/// Victims in rounds: each round kills every process once, in a shuffled order, so the
/// coordinator dies as often as each worker and no process is spared for long. The very
/// first kill is the coordinator's, the hardest case, so that even a short run has it.
struct Victims {
    rng: ChaCha8Rng,
    roles: Vec<Role>,
    round: Vec<Role>,
    first: bool,
}

impl Victims {
    fn new(seed: u64, roles: Vec<Role>) -> Self {
        Self { rng: ChaCha8Rng::seed_from_u64(seed), roles, round: Vec::new(), first: true }
    }

    fn next(&mut self) -> Role {
        if self.round.is_empty() {
            self.round = self.roles.clone();
            self.round.shuffle(&mut self.rng);
            if std::mem::take(&mut self.first) {
                // `pop` takes from the end.
                self.round.retain(|r| *r != Role::Coordinator);
                self.round.push(Role::Coordinator);
            }
        }
        self.round.pop().unwrap_or(Role::Coordinator)
    }
}

fn job_spec(args: &ChaosArgs) -> anyhow::Result<JobSpec> {
    let text = std::fs::read_to_string(&args.config).map_err(|e| {
        BadInput(format!("cannot read the job file {}: {e}", args.config.display()))
    })?;
    let mut spec = JobSpec::from_toml(&text, &args.config.display().to_string())?;
    if !args.neurons.is_empty() {
        spec.target.neurons = crate::dissect::neuron_spec(&args.neurons)?;
    }
    // Each run has its own caches: a chaos run served from the clean run's would do no work.
    spec.cache = None;
    spec.name = Some(spec.job_name());
    spec.validate()?;
    Ok(spec)
}

pub async fn chaos(args: ChaosArgs) -> anyhow::Result<()> {
    if dnd_store::faults::installed_counts().is_some() {
        return Err(BadInput(
            "unset DND_STORE_FAULTS: the bench's clean run must be clean; --faults sets the cluster's"
                .into(),
        )
        .into());
    }
    let faults = match args.faults.trim() {
        "none" | "" => None,
        text => Some(text.parse::<FaultConfig>().map_err(|e| BadInput(format!("--faults: {e}")))?),
    };
    let positive = |v: f64| v.is_finite() && v > 0.0;
    if !positive(args.kill_every) || !positive(args.lease_seconds) || args.workers == 0 {
        return Err(BadInput(
            "--kill-every, --lease-seconds and --workers must be positive".into(),
        )
        .into());
    }
    let mut spec = job_spec(&args)?;
    let name = spec.job_name();
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let run_dir = std::path::absolute(args.out.join(format!("run-{nonce}")))?;
    let (clean_dir, chaos_dir, logs) =
        (run_dir.join("clean"), run_dir.join("chaos"), run_dir.join("logs"));

    // The reference: the same job, in one process, nothing killed, no faults.
    tracing::info!(job = name, out = %clean_dir.display(), "the clean run");
    spec.out = clean_dir.display().to_string();
    let started = Instant::now();
    let clean = run_dissect(&spec, &Bars::new()).await.context("the clean run failed")?;
    let clean_seconds = started.elapsed().as_secs_f64();
    tracing::info!(seconds = clean_seconds, tasks = clean.summary.tasks, "clean run done");

    spec.out = chaos_dir.display().to_string();
    let job_file = run_dir.join("job.toml");
    std::fs::write(&job_file, toml::to_string(&spec)?)
        .with_context(|| format!("writing {}", job_file.display()))?;
    let settings = ClusterSettings {
        exe: std::env::current_exe().context("finding the dnd binary")?,
        store: chaos_dir.clone(),
        logs: logs.clone(),
        workers: args.workers,
        threads: args.threads.max(1),
        lease_seconds: args.lease_seconds,
        faults: faults.clone(),
        token: format!("chaos-{:032x}", rand::random::<u128>()),
    };
    let outcome = run_under_chaos(&args, settings, &job_file, &name).await?;

    let chaos_store = Location::open(&chaos_dir.display().to_string())?;
    let job = JobDir::under(&chaos_store, &name)?;
    let clean_job = Location::open(&clean_dir.display().to_string())?.join(&format!("jobs/{name}"));
    let verdict = verify(&clean_job, job.location()).await?;
    let events = dnd_coordinator::read_events(&job).await?;
    let report = ChaosReport {
        tasks: clean.summary.tasks,
        workers: args.workers,
        kill_every_seconds: args.kill_every,
        kills: outcome.kills,
        unexpected_exits: outcome.unexpected_exits,
        faults_setting: faults.map_or("none".into(), |f| f.to_string()),
        store: count_logs(&logs)?,
        wasted_task_seconds: wasted_task_seconds(&events),
        chaos_makespan_seconds: outcome.seconds,
        clean_makespan_seconds: clean_seconds,
        verdict,
        run_dir: run_dir.display().to_string(),
    };
    print_report(&report);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if !report.verdict.passed() {
        bail!(
            "the chaos run lost, duplicated or changed results (see above; logs in {})",
            logs.display()
        );
    }
    Ok(())
}

struct ChaosOutcome {
    seconds: f64,
    kills: BTreeMap<String, u64>,
    unexpected_exits: Vec<String>,
}

/// Starts the cluster, submits the job, and kills a process every `--kill-every`
/// seconds until the job's summary appears.
async fn run_under_chaos(
    args: &ChaosArgs,
    settings: ClusterSettings,
    job_file: &std::path::Path,
    name: &str,
) -> anyhow::Result<ChaosOutcome> {
    let store = Location::create(&settings.store.display().to_string())?;
    let job = JobDir::under(&store, name)?;
    let (exe, token) = (settings.exe.clone(), settings.token.clone());
    let started = Instant::now();
    let mut cluster = Cluster::start(settings).await?;
    let submitted = tokio::process::Command::new(&exe)
        .arg("submit")
        .arg(job_file)
        .args(["--coordinator", &cluster.url()])
        .env("DND_TOKEN", &token)
        .env_remove("DND_TOKEN_FILE")
        .output()
        .await?;
    if !submitted.status.success() {
        cluster.stop().await;
        bail!("submitting the job failed: {}", String::from_utf8_lossy(&submitted.stderr));
    }
    tracing::info!("{}", String::from_utf8_lossy(&submitted.stdout).trim());

    let every = Duration::from_secs_f64(args.kill_every);
    let deadline = started + Duration::from_secs_f64(args.timeout_minutes * 60.0);
    let mut victims = Victims::new(args.seed, cluster.roles());
    let mut next_kill = Instant::now() + every;
    let mut kills: BTreeMap<String, u64> = BTreeMap::new();
    let mut unexpected_exits = Vec::new();
    let finished = loop {
        if job.summary().await?.is_some() {
            break Ok(());
        }
        if Instant::now() > deadline {
            break Err(anyhow::anyhow!(
                "the job did not finish within {} minutes under chaos",
                args.timeout_minutes
            ));
        }
        for (role, status) in cluster.restart_exited().await? {
            tracing::warn!(%role, status, "a process exited by itself; restarted");
            unexpected_exits.push(format!("{role}: {status}"));
        }
        if Instant::now() >= next_kill {
            let victim = victims.next();
            tracing::info!(%victim, at_s = started.elapsed().as_secs(), "SIGKILL and restart");
            cluster.kill_and_restart(victim).await?;
            let what = if victim == Role::Coordinator { "coordinator" } else { "worker" };
            *kills.entry(what.into()).or_default() += 1;
            next_kill += every;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let seconds = started.elapsed().as_secs_f64();
    tracing::info!(starts = cluster.starts(), "stopping the cluster");
    cluster.stop().await;
    finished?;
    Ok(ChaosOutcome { seconds, kills, unexpected_exits })
}

fn print_report(r: &ChaosReport) {
    let v = &r.verdict;
    let kills: u64 = r.kills.values().sum();
    let of = |what: &str| r.kills.get(what).copied().unwrap_or(0);
    println!(
        "chaos: {} tasks on a coordinator and {} workers, a SIGKILL every {} s: {kills} kills survived ({} of the coordinator, {} of workers), {} unexpected exits",
        r.tasks,
        r.workers,
        r.kill_every_seconds,
        of("coordinator"),
        of("worker"),
        r.unexpected_exits.len()
    );
    let kinds: Vec<String> = r.store.faults.iter().map(|(k, n)| format!("{k} {n}")).collect();
    println!(
        "store: {} faults injected ({}; {} on commit markers), {} retries, {} calls gave up, {} lost replies found applied on retry ({})",
        r.store.faults_total(),
        if kinds.is_empty() { "none".into() } else { kinds.join(", ") },
        r.store.commit_faults,
        r.store.retries,
        r.store.gave_up,
        r.store.settled,
        r.faults_setting
    );
    println!(
        "results: {} neurons, {} lost, {} duplicated; {} rows over {} tables {}; {} orphaned attempts left uncommitted, none counted{}",
        v.neurons,
        v.lost.len(),
        v.duplicated.len(),
        v.rows_compared,
        dnd_store::results::ResultTable::ALL.len(),
        if v.differing_tables.is_empty() {
            "identical to the clean run".to_string()
        } else {
            format!("DIFFERENT from the clean run in {}", v.differing_tables.join(", "))
        },
        v.orphaned_attempts,
        if v.passed() { "" } else { " (FAILED)" }
    );
    for (what, list) in [("lost", &v.lost), ("duplicated", &v.duplicated)] {
        if !list.is_empty() {
            println!("  {what}: {}", list.join(" "));
        }
    }
    println!(
        "time: {:.1} task-seconds wasted; makespan {:.1} s under chaos, {:.1} s clean (one process): {:.2}x",
        r.wasted_task_seconds,
        r.chaos_makespan_seconds,
        r.clean_makespan_seconds,
        r.chaos_makespan_seconds / r.clean_makespan_seconds.max(1e-9)
    );
    println!("stores and logs: {}", r.run_dir);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_round_kills_each_process_once_starting_with_the_coordinator() {
        let roles = vec![Role::Coordinator, Role::Worker(0), Role::Worker(1), Role::Worker(2)];
        let mut victims = Victims::new(7, roles.clone());
        let mut rounds: Vec<Vec<Role>> =
            (0..5).map(|_| (0..4).map(|_| victims.next()).collect()).collect();
        assert_eq!(rounds[0][0], Role::Coordinator);
        let orders: std::collections::BTreeSet<Vec<Role>> = rounds.iter().cloned().collect();
        assert!(orders.len() > 1, "the order is shuffled: {rounds:?}");
        for round in &mut rounds {
            round.sort();
            assert_eq!(round, &roles);
        }
    }
}

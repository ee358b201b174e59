//! The processes of `dnd bench chaos`: one `dnd coordinator` and N `dnd worker`s on
//! loopback, children of this process, each killed (SIGKILL) and started again at will.
//! The coordinator always listens on the same port, so workers find its successor.

use std::fmt;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use dnd_store::faults::{FAULTS_ENV, FaultConfig};

/// How long a starting coordinator may take to say where it listens: it reads every
/// unfinished job's commits from the store first.
const COORDINATOR_READY: Duration = Duration::from_secs(120);

/// One of the cluster's processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    Coordinator,
    Worker(usize),
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Role::Coordinator => f.write_str("coordinator"),
            Role::Worker(i) => write!(f, "worker-{i}"),
        }
    }
}

/// How the cluster's processes are started.
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    /// The `dnd` binary (this one).
    pub exe: PathBuf,
    /// The coordinator's store (a local directory).
    pub store: PathBuf,
    /// Each process's stderr goes to `<logs>/<role>-<start>.log`.
    pub logs: PathBuf,
    pub workers: usize,
    /// Compute threads per worker.
    pub threads: usize,
    pub lease_seconds: f64,
    /// Injected into every process's store calls; each start gets its own seed.
    pub faults: Option<FaultConfig>,
    pub token: String,
}

/// The running processes.
pub struct Cluster {
    settings: ClusterSettings,
    listen: String,
    coordinator: Option<Child>,
    workers: Vec<Option<Child>>,
    /// Processes started so far: numbers the log files and seeds the faults.
    starts: u64,
}

impl Cluster {
    /// Starts the coordinator, waits until it listens, then starts the workers.
    pub async fn start(settings: ClusterSettings) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&settings.logs)
            .with_context(|| format!("creating {}", settings.logs.display()))?;
        // A free port, fixed for the run: every incarnation of the coordinator takes it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let workers = (0..settings.workers).map(|_| None).collect();
        let mut cluster = Self {
            settings,
            listen: format!("127.0.0.1:{port}"),
            coordinator: None,
            workers,
            starts: 0,
        };
        cluster.spawn(Role::Coordinator).await?;
        for i in 0..cluster.settings.workers {
            cluster.spawn(Role::Worker(i)).await?;
        }
        Ok(cluster)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.listen)
    }

    /// Every role, the coordinator first.
    pub fn roles(&self) -> Vec<Role> {
        std::iter::once(Role::Coordinator)
            .chain((0..self.workers.len()).map(Role::Worker))
            .collect()
    }

    pub fn starts(&self) -> u64 {
        self.starts
    }

    fn command(&mut self, role: Role) -> anyhow::Result<Command> {
        self.starts += 1;
        let s = &self.settings;
        let log = s.logs.join(format!("{role}-{}.log", self.starts));
        let stderr = std::fs::File::create(&log)
            .with_context(|| format!("creating the log {}", log.display()))?;
        let mut cmd = Command::new(&s.exe);
        match role {
            Role::Coordinator => {
                cmd.arg("coordinator")
                    .arg("--store")
                    .arg(&s.store)
                    .args(["--listen", &self.listen])
                    .args(["--lease-seconds", &s.lease_seconds.to_string()]);
            }
            Role::Worker(i) => {
                cmd.args(["worker", "--coordinator", &self.url()])
                    .args(["--name", &format!("w{i}")])
                    .args(["--threads", &s.threads.to_string()]);
            }
        }
        cmd.env("DND_TOKEN", &s.token)
            .env_remove("DND_TOKEN_FILE")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stderr(stderr)
            .kill_on_drop(true);
        match &s.faults {
            Some(faults) => {
                let seeded =
                    FaultConfig { seed: faults.seed.wrapping_add(self.starts), ..faults.clone() };
                cmd.env(FAULTS_ENV, seeded.to_string());
            }
            None => {
                cmd.env_remove(FAULTS_ENV);
            }
        }
        Ok(cmd)
    }

    /// Starts `role` (again); for the coordinator, waits until it listens.
    async fn spawn(&mut self, role: Role) -> anyhow::Result<()> {
        match role {
            Role::Worker(i) => {
                let child = self.command(role)?.stdout(Stdio::null()).spawn()?;
                self.workers[i] = Some(child);
            }
            Role::Coordinator => {
                // The killed coordinator's port may linger for a moment: try a few times.
                let mut tries = 0;
                loop {
                    tries += 1;
                    let mut child = self.command(role)?.stdout(Stdio::piped()).spawn()?;
                    match ready(&mut child).await {
                        Ok(()) => {
                            self.coordinator = Some(child);
                            return Ok(());
                        }
                        Err(e) if tries < 5 => {
                            tracing::warn!(error = %e, "the coordinator did not start; again");
                            let _ = child.kill().await;
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        Ok(())
    }

    fn slot(&mut self, role: Role) -> &mut Option<Child> {
        match role {
            Role::Coordinator => &mut self.coordinator,
            Role::Worker(i) => &mut self.workers[i],
        }
    }

    /// SIGKILLs `role` and starts it again at once.
    pub async fn kill_and_restart(&mut self, role: Role) -> anyhow::Result<()> {
        if let Some(mut child) = self.slot(role).take() {
            child.kill().await.with_context(|| format!("killing the {role}"))?;
        }
        self.spawn(role).await
    }

    /// Processes that exited by themselves since the last look (none should): restarted,
    /// and returned with how they ended.
    pub async fn restart_exited(&mut self) -> anyhow::Result<Vec<(Role, String)>> {
        let mut exited = Vec::new();
        for role in self.roles() {
            let status = match self.slot(role) {
                Some(child) => child.try_wait()?,
                None => None,
            };
            if let Some(status) = status {
                exited.push((role, status.to_string()));
                self.spawn(role).await?;
            }
        }
        Ok(exited)
    }

    /// Stops every process.
    pub async fn stop(&mut self) {
        for role in self.roles() {
            if let Some(mut child) = self.slot(role).take() {
                let _ = child.kill().await;
            }
        }
    }
}

/// Waits for a starting coordinator's `coordinator listening on ...` line, then keeps
/// reading its stdout in the background (a closed pipe would fail its later prints).
async fn ready(child: &mut Child) -> anyhow::Result<()> {
    let stdout = child.stdout.take().context("the coordinator's stdout is piped")?;
    let mut lines = BufReader::new(stdout).lines();
    let first = tokio::time::timeout(COORDINATOR_READY, lines.next_line())
        .await
        .context("the coordinator did not say where it listens in time")??;
    match first {
        Some(line) if line.starts_with("coordinator listening on ") => {
            tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
            Ok(())
        }
        Some(line) => bail!("unexpected first line from the coordinator: {line}"),
        None => bail!("the coordinator exited before listening ({:?})", child.try_wait()?),
    }
}

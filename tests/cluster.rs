//! The distributed mode, multi-process, on loopback: `dnd coordinator`, `dnd worker`s and
//! `dnd submit` on the tiny fixture job. A worker killed mid-task, a coordinator killed
//! mid-job, tokens, a malformed spec and a task that always fails.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use dnd_store::results::{DescriptionRow, ResultTable};
use dnd_store::{Location, batches_rows, read_parquet};
use dnd_tests::{Proc, dnd_binary, http_get, repo, results_only, table};

const TOKEN: &str = "test-token-0123456789abcdef";
/// Every wait in these tests ends by this deadline, so a hang fails instead of blocking CI.
const PATIENCE: Duration = Duration::from_secs(300);

fn dnd_cmd(args: &[&str]) -> Command {
    let mut cmd = Command::new(dnd_binary());
    cmd.args(args)
        .current_dir(repo())
        .env("RUST_LOG", "info")
        .env("DND_TOKEN", TOKEN)
        .env_remove("DND_TOKEN_FILE");
    cmd
}

/// Starts a coordinator on `listen` (`127.0.0.1:0` for any port); its address.
fn coordinator(store: &Path, listen: &str, extra: &[&str]) -> (Proc, String) {
    let store = store.display().to_string();
    let mut args =
        vec!["coordinator", "--store", store.as_str(), "--listen", listen, "--lease-seconds", "2"];
    args.extend(extra);
    let mut child = dnd_cmd(&args).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr = line
        .split_whitespace()
        .nth(3)
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_string();
    (Proc(child), format!("http://{addr}"))
}

fn worker(url: &str, name: &str, env: &[(&str, &str)]) -> Proc {
    worker_with(url, name, env, &["--grace-seconds", "30"])
}

fn worker_with(url: &str, name: &str, env: &[(&str, &str)], extra: &[&str]) -> Proc {
    let mut args = vec!["worker", "--coordinator", url, "--name", name, "--threads", "1"];
    args.extend(extra);
    let mut cmd = dnd_cmd(&args);
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    Proc(cmd.spawn().unwrap())
}

struct Done {
    code: i32,
    stdout: String,
    stderr: String,
}

fn run(cmd: &mut Command) -> Done {
    let out = cmd.output().unwrap();
    Done {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into(),
        stderr: String::from_utf8_lossy(&out.stderr).into(),
    }
}

/// The tiny fixture job, split finely: 3 probe tasks (3 images each) and 5 neuron tasks.
fn job_file(dir: &Path, name: &str) -> PathBuf {
    let text = std::fs::read_to_string(repo().join("tests/fixtures/tiny-job.toml"))
        .unwrap()
        .replacen("seed = 0", &format!("seed = 0\nname = \"{name}\""), 1)
        .replace("top_k = 3", "top_k = 3\nimages_per_task = 3")
        .replace("neurons_per_task = 2", "neurons_per_task = 1");
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < PATIENCE, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The job's event log as (kind, task, attempt, worker) tuples.
fn events(store: &Path, job: &str) -> Vec<serde_json::Value> {
    let dir = store.join(format!("jobs/{job}/events"));
    let mut files: Vec<PathBuf> =
        std::fs::read_dir(&dir).map(|d| d.map(|e| e.unwrap().path()).collect()).unwrap_or_default();
    files.sort();
    let mut events: Vec<serde_json::Value> = files
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(f)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect::<Vec<_>>()
        })
        .collect();
    events.sort_by_key(|e| e["seq"].as_u64());
    events
}

fn committed_tasks(store: &Path, job: &str) -> BTreeSet<String> {
    let dir = store.join(format!("jobs/{job}/tasks"));
    std::fs::read_dir(&dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.path().join("_COMMITTED").is_file())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

async fn descriptions(store: &Path, job: &str) -> Vec<DescriptionRow> {
    let dir = Location::open(store.join(format!("jobs/{job}")).to_str().unwrap()).unwrap();
    batches_rows("descriptions", &read_parquet(&dir, "results/descriptions.parquet").await.unwrap())
        .unwrap()
}

/// Each of the job's neurons appears once.
fn assert_every_neuron_once(rows: &[DescriptionRow]) {
    let mut seen = BTreeMap::new();
    for r in rows {
        *seen.entry((r.layer.to_string(), r.neuron.to_i32())).or_insert(0) += 1;
    }
    let expected: BTreeMap<(String, i32), i32> =
        [("layer4", 0), ("layer4", 1), ("layer4", 2), ("fc", 0), ("fc", 1)]
            .iter()
            .map(|(l, n)| ((l.to_string(), *n), 1))
            .collect();
    assert_eq!(seen, expected);
}

fn submit(url: &str, job: &Path, watch: bool) -> Done {
    let job = job.display().to_string();
    let mut args = vec!["submit", job.as_str(), "--coordinator", url];
    if watch {
        args.push("--watch");
    }
    run(&mut dnd_cmd(&args))
}

#[tokio::test(flavor = "multi_thread")]
async fn three_workers_give_the_embedded_results_row_for_row() {
    let dir = tempfile::tempdir().unwrap();
    let job = job_file(dir.path(), "same");
    let embedded = dir.path().join("embedded");
    let distributed = dir.path().join("distributed");

    let out = embedded.display().to_string();
    let local =
        run(&mut dnd_cmd(&["dissect", "--config", job.to_str().unwrap(), "--out", out.as_str()]));
    assert_eq!(local.code, 0, "{}", local.stderr);

    let (_coordinator, url) = coordinator(&distributed, "127.0.0.1:0", &[]);
    let _workers: Vec<Proc> = (0..3).map(|i| worker(&url, &format!("w{i}"), &[])).collect();
    let done = submit(&url, &job, true);
    assert_eq!(done.code, 0, "{}\n{}", done.stdout, done.stderr);
    assert!(done.stdout.contains("succeeded"), "{}", done.stdout);

    for t in ResultTable::ALL {
        let a = results_only(&table(&embedded, "same", t).await);
        let b = results_only(&table(&distributed, "same", t).await);
        assert_eq!(
            a,
            b,
            "results/{} differs between the embedded and the distributed run",
            t.name()
        );
    }
    let workers_used: BTreeSet<String> = events(&distributed, "same")
        .iter()
        .filter(|e| e["kind"] == "committed")
        .filter_map(|e| e["worker"].as_str().map(String::from))
        .collect();
    assert!(workers_used.len() >= 2, "the tasks were spread over the workers: {workers_used:?}");

    let status = run(&mut dnd_cmd(&["status", "same", "--coordinator", &url]));
    assert_eq!(status.code, 0, "{}", status.stderr);
    assert!(
        status.stdout.contains("succeeded") && status.stdout.contains("8 committed"),
        "{}",
        status.stdout
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_killed_mid_task_is_replaced_and_every_neuron_is_described_once() {
    let dir = tempfile::tempdir().unwrap();
    let job = job_file(dir.path(), "killed");
    let store = dir.path().join("store");
    let (_coordinator, url) = coordinator(&store, "127.0.0.1:0", &[]);
    let victim = worker(&url, "victim", &[]);
    let submitted = submit(&url, &job, false);
    assert_eq!(submitted.code, 0, "{}", submitted.stderr);
    // Kill the worker while it holds a neuron task.
    let mut victim_task = String::new();
    wait_until("the victim to lease a neuron task", || {
        let leased = events(&store, "killed")
            .into_iter()
            .rev()
            .find(|e| e["kind"] == "leased" && !e["task"].as_str().unwrap().starts_with("probe"));
        if let Some(e) = leased {
            victim_task = e["task"].as_str().unwrap().to_string();
            true
        } else {
            false
        }
    });
    victim.signal("-KILL");
    drop(victim);
    let _rescuer = worker(&url, "rescuer", &[]);
    wait_until("the job to finish", || store.join("jobs/killed/summary.json").is_file());

    assert_every_neuron_once(&descriptions(&store, "killed").await);
    let log = events(&store, "killed");
    let of_task: Vec<String> = log
        .iter()
        .filter(|e| e["task"] == victim_task.as_str())
        .map(|e| format!("{}:{}", e["kind"].as_str().unwrap(), e["attempt"]))
        .collect();
    assert!(of_task.contains(&"lease_expired:1".to_string()), "{of_task:?}");
    assert!(of_task.contains(&"retried:2".to_string()), "{of_task:?}");
    assert!(of_task.contains(&"committed:2".to_string()), "{of_task:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_coordinator_killed_mid_job_resumes_without_redoing_committed_tasks() {
    let dir = tempfile::tempdir().unwrap();
    let job = job_file(dir.path(), "restarted");
    let store = dir.path().join("store");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let listen = format!("127.0.0.1:{port}");
    let (first, url) = coordinator(&store, &listen, &[]);
    let _worker = worker(&url, "w", &[]);
    let submitted = submit(&url, &job, false);
    assert_eq!(submitted.code, 0, "{}", submitted.stderr);
    wait_until("a neuron task to commit", || {
        committed_tasks(&store, "restarted").iter().any(|t| !t.starts_with("probe"))
    });
    first.signal("-KILL");
    drop(first);
    let before = committed_tasks(&store, "restarted");
    let seq_at_kill = events(&store, "restarted").last().map_or(0, |e| e["seq"].as_u64().unwrap());

    let (_second, _) = coordinator(&store, &listen, &[]);
    wait_until("the restarted coordinator to finish the job", || {
        store.join("jobs/restarted/summary.json").is_file()
    });
    assert_every_neuron_once(&descriptions(&store, "restarted").await);
    let log = events(&store, "restarted");
    for task in &before {
        let releases: Vec<&serde_json::Value> = log
            .iter()
            .filter(|e| {
                e["seq"].as_u64().unwrap() > seq_at_kill
                    && e["kind"] == "leased"
                    && e["task"] == task.as_str()
            })
            .collect();
        assert!(
            releases.is_empty(),
            "task {task} was committed before the restart and ran again: {releases:?}"
        );
        let attempts = std::fs::read_dir(store.join(format!("jobs/restarted/tasks/{task}")))
            .unwrap()
            .filter(|e| e.as_ref().unwrap().path().is_dir())
            .count();
        assert_eq!(attempts, 1, "task {task} has one attempt directory");
    }
    assert!(
        log.iter().filter(|e| e["kind"] == "submitted").count() >= 2,
        "the restart continued the same log"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_bad_specs_and_a_task_that_always_fails() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let (_coordinator, url) = coordinator(&store, "127.0.0.1:0", &["--max-attempts", "2"]);

    // No token, or the wrong one: UNAUTHENTICATED, for clients and workers alike.
    let anonymous = run(dnd_cmd(&["list", "--coordinator", &url])
        .env_remove("DND_TOKEN")
        .env("DND_TOKEN_FILE", dir.path().join("missing")));
    assert_eq!(anonymous.code, 2, "{}", anonymous.stderr);
    let wrong =
        run(dnd_cmd(&["list", "--coordinator", &url]).env("DND_TOKEN", "wrong-token-0123456789"));
    assert_eq!(wrong.code, 2, "{}", wrong.stderr);
    assert!(wrong.stderr.contains("Unauthenticated"), "{}", wrong.stderr);
    let intruder =
        run(dnd_cmd(&["worker", "--coordinator", &url]).env("DND_TOKEN", "wrong-token-0123456789"));
    assert_eq!(intruder.code, 2, "{}", intruder.stderr);
    assert!(intruder.stderr.contains("wrong auth token"), "{}", intruder.stderr);

    // A malformed spec is refused by the coordinator, naming the field.
    let bad = job_file(dir.path(), "bad");
    std::fs::write(
        &bad,
        std::fs::read_to_string(&bad)
            .unwrap()
            .replace("neurons_per_task = 1", "neurons_per_task = 0"),
    )
    .unwrap();
    let refused = submit(&url, &bad, false);
    assert_eq!(refused.code, 2, "{}", refused.stderr);
    assert!(refused.stderr.contains("describe.neurons_per_task"), "{}", refused.stderr);
    assert!(refused.stderr.contains("InvalidArgument"), "{}", refused.stderr);

    // A task that always fails ends failed, with its error; the other neurons complete.
    let job = job_file(dir.path(), "failing");
    let _worker = worker(&url, "w", &[("DND_FAIL_TASKS", "layer4-00001")]);
    let done = submit(&url, &job, true);
    assert_eq!(done.code, 0, "{}\n{}", done.stdout, done.stderr);
    assert!(done.stdout.contains("1 failed"), "{}", done.stdout);
    let rows = descriptions(&store, "failing").await;
    assert_every_neuron_once(&rows);
    for r in &rows {
        if (r.layer.as_str(), r.neuron.index()) == ("layer4", 1) {
            assert_eq!(r.status, "failed");
            assert!(r.error.as_deref().unwrap().contains("injected failure"), "{r:?}");
        } else {
            assert_eq!(r.status, "ok", "{r:?}");
        }
    }
    let failed: Vec<serde_json::Value> =
        events(&store, "failing").into_iter().filter(|e| e["task"] == "layer4-00001").collect();
    assert_eq!(failed.iter().filter(|e| e["kind"] == "failed").count(), 2, "{failed:?}");
    assert!(failed.iter().any(|e| e["kind"] == "task_failed"), "{failed:?}");
}

#[test]
fn tls_serves_clients_that_trust_its_certificate_and_only_them() {
    let dir = tempfile::tempdir().unwrap();
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, signing_key.serialize_pem()).unwrap();
    let store = dir.path().join("store");
    let (cert_arg, key_arg) = (cert_path.display().to_string(), key_path.display().to_string());
    let (_coordinator, url) =
        coordinator(&store, "127.0.0.1:0", &["--tls-cert", &cert_arg, "--tls-key", &key_arg]);
    let port = url.rsplit(':').next().unwrap();
    let https = format!("https://localhost:{port}");

    let trusted = run(&mut dnd_cmd(&["list", "--coordinator", &https, "--tls-ca", &cert_arg]));
    assert_eq!(trusted.code, 0, "{}", trusted.stderr);
    assert!(trusted.stdout.contains("no jobs"), "{}", trusted.stdout);
    let untrusted = run(&mut dnd_cmd(&["list", "--coordinator", &https]));
    assert_ne!(
        untrusted.code, 0,
        "a certificate nobody vouches for is refused:\n{}",
        untrusted.stdout
    );
    let plaintext = run(&mut dnd_cmd(&["list", "--coordinator", &url]));
    assert_ne!(
        plaintext.code, 0,
        "a TLS coordinator does not speak plaintext:\n{}",
        plaintext.stdout
    );
}

/// The port of a `metrics on http://127.0.0.1:PORT/metrics` line a process printed.
fn metrics_port(line: &str) -> u16 {
    let addr = line
        .trim()
        .strip_prefix("metrics on http://")
        .and_then(|rest| rest.strip_suffix("/metrics"))
        .unwrap_or_else(|| panic!("no metrics address in {line:?}"));
    addr.rsplit(':').next().unwrap().parse().unwrap()
}

/// `GET /metrics` from a process on loopback; the body (empty while nothing answers).
fn scrape(port: u16) -> String {
    http_get("127.0.0.1", port, "/metrics").map(|(_, body)| body).unwrap_or_default()
}

/// The value of one series (`name{labels}` exactly as exposed), if present.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_move_while_a_job_runs_and_sigterm_hands_the_task_back() {
    let dir = tempfile::tempdir().unwrap();
    let job = job_file(dir.path(), "observed");
    let store = dir.path().join("store");
    // Every process binds its own free port (picking one here could race with the other
    // tests' connections) and prints it.
    let store_arg = store.display().to_string();
    let mut child = dnd_cmd(&[
        "coordinator",
        "--store",
        &store_arg,
        "--listen",
        "127.0.0.1:0",
        "--lease-seconds",
        "2",
        "--metrics-listen",
        "127.0.0.1:0",
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    let url = format!("http://{}", first.split_whitespace().nth(3).unwrap());
    let coordinator_metrics = metrics_port(&lines.next().unwrap().unwrap());
    let _coordinator = Proc(child);
    // Grace 0: on SIGTERM the current task goes straight back.
    let mut child = dnd_cmd(&[
        "worker",
        "--coordinator",
        &url,
        "--name",
        "leaving",
        "--threads",
        "1",
        "--metrics-listen",
        "127.0.0.1:0",
        "--grace-seconds",
        "0",
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    let mut worker_out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    worker_out.read_line(&mut line).unwrap();
    let worker_metrics = metrics_port(&line);
    let leaving = Proc(child);
    let before = scrape(coordinator_metrics);
    assert!(before.contains("# TYPE dnd_tasks gauge"), "{before}");
    let submitted = submit(&url, &job, false);
    assert_eq!(submitted.code, 0, "{}", submitted.stderr);

    // The probe tasks commit: the coordinator's counters and the worker's histograms move.
    wait_until("committed tasks in the coordinator's metrics", || {
        sample(&scrape(coordinator_metrics), "dnd_task_events_total{kind=\"committed\"}")
            .is_some_and(|v| v >= 3.0)
    });
    wait_until("the worker's stage metrics", || {
        let w = scrape(worker_metrics);
        sample(&w, "dnd_stage_seconds_count{stage=\"probe\"}").is_some_and(|v| v >= 1.0)
            && sample(&w, "dnd_worker_tasks_total{outcome=\"committed\"}").is_some_and(|v| v >= 1.0)
            && sample(&w, "dnd_model_load_seconds").is_some()
    });

    // SIGTERM while it holds a neuron task: it hands the task back and exits.
    wait_until("the worker to lease a neuron task", || {
        let log = events(&store, "observed");
        log.iter()
            .rev()
            .find(|e| e["kind"] == "leased")
            .is_some_and(|e| !e["task"].as_str().unwrap().starts_with("probe"))
    });
    let mut leaving = leaving;
    leaving.signal("-TERM");
    let status = leaving
        .wait_for_exit(Duration::from_secs(30))
        .expect("the worker did not stop after SIGTERM");
    assert!(status.success(), "{status:?}");
    // The task it held then (it may have moved on to the next one since the check above).
    let mut held = String::new();
    wait_until("the hand-back in the event log", || {
        if let Some(e) = events(&store, "observed").into_iter().find(|e| e["kind"] == "handed_back")
        {
            held = e["task"].as_str().unwrap().to_string();
        }
        !held.is_empty()
    });
    let _rescuer = worker(&url, "rescuer", &[]);
    wait_until("the job to finish on the other worker", || {
        store.join("jobs/observed/summary.json").is_file()
    });
    assert_every_neuron_once(&descriptions(&store, "observed").await);
    let log = events(&store, "observed");
    let committed_by = log
        .iter()
        .find(|e| e["kind"] == "committed" && e["task"] == held.as_str())
        .map(|e| e["worker"].as_str().unwrap().to_string());
    assert!(committed_by.is_some_and(|w| w.starts_with("rescuer")), "{log:?}");
    let after = scrape(coordinator_metrics);
    assert!(
        sample(&after, "dnd_task_events_total{kind=\"handed_back\"}").is_some_and(|v| v >= 1.0),
        "{after}"
    );
}

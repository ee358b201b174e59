//! Shared helpers of dnd's end-to-end tests.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use std::process::Command;
use std::sync::OnceLock;

/// `tests/fixtures/` of this repository.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// The `dnd` binary, built (or found up to date) by the same cargo that runs the tests,
/// so a test never runs a stale binary.
pub fn dnd_binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--quiet", "-p", "dnd-cli", "--bin", "dnd"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("cargo runs");
        assert!(status.success(), "building the dnd binary failed");
        // target/<profile>/deps/<test> -> target/<profile>/dnd
        let mut dir = std::env::current_exe().expect("the test knows its own path");
        dir.pop();
        if dir.ends_with("deps") {
            dir.pop();
        }
        let bin = dir.join(format!("dnd{}", std::env::consts::EXE_SUFFIX));
        assert!(bin.is_file(), "{} is missing after the build", bin.display());
        bin
    })
    .clone()
}

/// Output of one `dnd` run.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `dnd` with `args`.
pub fn dnd(args: &[&str]) -> Run {
    dnd_in(Path::new("."), args)
}

/// Runs `dnd` with `args` in the directory `cwd`.
pub fn dnd_in(cwd: &Path, args: &[&str]) -> Run {
    let out = Command::new(dnd_binary())
        .args(args)
        .current_dir(cwd)
        .env("RUST_LOG", "warn")
        .output()
        .expect("dnd starts");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Reference outputs of a fixture script: `<dir>/<name>.json` (what was computed, how)
/// and `<dir>/<name>.safetensors` (the tensors).
pub struct Reference {
    pub json: serde_json::Value,
    pub tensors: HashMap<String, Tensor>,
}

impl Reference {
    pub fn load(dir: &Path, name: &str) -> Self {
        let json =
            serde_json::from_slice(&std::fs::read(dir.join(format!("{name}.json"))).unwrap())
                .unwrap();
        let tensors =
            candle_core::safetensors::load(dir.join(format!("{name}.safetensors")), &Device::Cpu)
                .unwrap();
        Self { json, tensors }
    }
}

/// The largest absolute difference between two tensors of one shape (on any devices, in
/// any float dtypes: both are compared in f32 on the CPU).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let host =
        |t: &Tensor| t.to_device(&Device::Cpu).unwrap().to_dtype(candle_core::DType::F32).unwrap();
    (host(a) - host(b))
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// The device the model-parity tests of the generator run on: `DND_TEST_DEVICE` (e.g.
/// `cuda:0`, which bench/gpu_check.sh sets on a GPU machine), the CPU by default.
pub fn test_device() -> Device {
    let spec = std::env::var("DND_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    dnd_models::device::parse_device(&spec)
        .unwrap_or_else(|e| panic!("DND_TEST_DEVICE={spec}: {e}"))
}

/// A tool or package a test needs is missing: a failure under CI (`.ci/run` installs
/// everything), a skip (None) elsewhere.
pub fn skip_outside_ci<T>(what: &str) -> Option<T> {
    assert!(std::env::var_os("CI").is_none(), "{what}");
    eprintln!("skipping: {what}");
    None
}

/// Runs `python3 script args`; its stdout. None (a skip, outside CI only) when python3 is
/// missing or the script exits 3, its way of saying that its packages are.
pub fn run_python(what: &str, script: &Path, args: &[&std::ffi::OsStr]) -> Option<String> {
    let output = match Command::new("python3").arg(script).args(args).output() {
        Ok(o) => o,
        Err(e) => return skip_outside_ci(&format!("{what}: python3 is needed: {e}")),
    };
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    if output.status.code() == Some(3) {
        return skip_outside_ci(&format!("{what}: {stderr}"));
    }
    assert!(output.status.success(), "{what} failed:\n{stdout}\n{stderr}");
    Some(stdout)
}

/// pandas, DuckDB and Polars open the tables as they are (`tests/read_tables.py ARGS`).
pub fn python_readers(args: &[&std::ffi::OsStr]) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("read_tables.py");
    if let Some(stdout) = run_python("the Python readers", &script, args) {
        eprintln!("{stdout}");
    }
}

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the repository")
        .to_path_buf()
}

/// A job's `summary.json` under the store `out`.
pub fn summary(out: &Path, name: &str) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(out.join(format!("jobs/{name}/summary.json"))).unwrap())
        .unwrap()
}

/// A compacted results table of job `name` under the store `out`.
pub async fn table(
    out: &Path,
    name: &str,
    table: dnd_store::results::ResultTable,
) -> arrow::record_batch::RecordBatch {
    let job =
        dnd_store::Location::open(out.join(format!("jobs/{name}")).to_str().unwrap()).unwrap();
    let batches =
        dnd_store::read_parquet(&job, &format!("results/{}", table.file())).await.unwrap();
    arrow::compute::concat_batches(&table.schema(), &batches).unwrap()
}

/// A table without the columns that name where files are (they contain the output path).
pub fn without_paths(batch: &arrow::record_batch::RecordBatch) -> arrow::record_batch::RecordBatch {
    let keep: Vec<usize> =
        (0..batch.num_columns()).filter(|&i| batch.schema().field(i).name() != "uri").collect();
    batch.project(&keep).unwrap()
}

/// A table without what depends on how the run went rather than on the job
/// ([`dnd_store::results::run_independent`]).
pub fn results_only(batch: &arrow::record_batch::RecordBatch) -> arrow::record_batch::RecordBatch {
    dnd_store::results::run_independent(batch)
}

/// A child process, killed when dropped so a failing test leaves nothing running.
pub struct Proc(pub std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    pub fn pid(&self) -> i32 {
        self.0.id() as i32
    }

    /// Sends `signal` (as `kill` spells it: `-TERM`, `-KILL`).
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill").args([signal, &self.pid().to_string()]).status().unwrap();
        assert!(status.success());
    }

    /// Waits up to `limit` for the process to exit; its status, or None if it is still running.
    pub fn wait_for_exit(
        &mut self,
        limit: std::time::Duration,
    ) -> Option<std::process::ExitStatus> {
        let start = std::time::Instant::now();
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                return Some(status);
            }
            if start.elapsed() >= limit {
                return None;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}

/// An S3-compatible server on loopback (`moto_server`, installed by `.ci/run` from
/// `tests/requirements-services.txt`) with one bucket.
pub struct S3Server {
    _server: Proc,
    pub endpoint: String,
    pub bucket: String,
}

impl S3Server {
    pub const ACCESS_KEY: &str = "test";
    pub const SECRET_KEY: &str = "test";
    pub const REGION: &str = "us-east-1";

    pub fn start(bucket: &str) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("moto_server is not installed: run `pip install -r tests/requirements-services.txt` (.ci/run does)");
        let server = Proc(child);
        let endpoint = format!("http://127.0.0.1:{port}");
        let start = std::time::Instant::now();
        // The bucket, created once the server answers.
        loop {
            let created = Command::new("python3")
                .args(["-c", &format!(
                    "import boto3; boto3.client('s3', endpoint_url='{endpoint}', aws_access_key_id='{}', aws_secret_access_key='{}', region_name='{}').create_bucket(Bucket='{bucket}')",
                    Self::ACCESS_KEY, Self::SECRET_KEY, Self::REGION
                )])
                .stderr(std::process::Stdio::null())
                .status()
                .unwrap();
            if created.success() {
                break;
            }
            assert!(
                start.elapsed() < std::time::Duration::from_secs(60),
                "moto_server did not start"
            );
            std::thread::sleep(std::time::Duration::from_millis(300));
        }
        Self { _server: server, endpoint, bucket: bucket.to_string() }
    }

    /// The environment object_store reads to reach this server.
    pub fn env(&self) -> [(&'static str, String); 5] {
        [
            ("AWS_ENDPOINT", self.endpoint.clone()),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_ACCESS_KEY_ID", Self::ACCESS_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY", Self::SECRET_KEY.into()),
            ("AWS_REGION", Self::REGION.into()),
        ]
    }

    /// `prefix` in the bucket, opened with this server's settings (not the process's
    /// environment, which tests share between threads).
    pub fn location(&self, prefix: &str) -> dnd_store::Location {
        let s3 = object_store::aws::AmazonS3Builder::new()
            .with_endpoint(&self.endpoint)
            .with_allow_http(true)
            .with_bucket_name(&self.bucket)
            .with_access_key_id(Self::ACCESS_KEY)
            .with_secret_access_key(Self::SECRET_KEY)
            .with_region(Self::REGION)
            .build()
            .unwrap();
        dnd_store::Location::from_store(
            std::sync::Arc::new(s3),
            object_store::path::Path::from(prefix),
            format!("s3://{}/{prefix}", self.bucket),
        )
    }
}

/// `GET path` over plain HTTP/1.0 from `host:port`: the status code and the body, or None
/// when nothing answers.
pub fn http_get(host: &str, port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect((host, port)).ok()?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(10))).ok()?;
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes()).ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, body.to_string()))
}

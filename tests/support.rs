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
    let out = Command::new(dnd_binary()).args(args).current_dir(cwd).env("RUST_LOG", "warn").output().expect("dnd starts");
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
        let json = serde_json::from_slice(&std::fs::read(dir.join(format!("{name}.json"))).unwrap()).unwrap();
        let tensors = candle_core::safetensors::load(dir.join(format!("{name}.safetensors")), &Device::Cpu).unwrap();
        Self { json, tensors }
    }
}

/// The largest absolute difference between two tensors of one shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// pandas, DuckDB and Polars open the tables as they are (`tests/read_tables.py ARGS`).
/// Skipped when those packages are missing, except under CI, where `.ci/run` installs them.
pub fn python_readers(args: &[&std::ffi::OsStr]) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("read_tables.py");
    let status = std::process::Command::new("python3").arg(&script).args(args).output();
    let output = match status {
        Ok(o) => o,
        Err(e) if std::env::var_os("CI").is_none() => return eprintln!("skipping Python readers: {e}"),
        Err(e) => panic!("python3 is needed under CI: {e}"),
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    if output.status.code() == Some(3) && std::env::var_os("CI").is_none() {
        return eprintln!("skipping Python readers: {stderr}");
    }
    assert!(output.status.success(), "Python readers failed:\n{stdout}\n{stderr}");
    eprintln!("{stdout}");
}


/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ is in the repository").to_path_buf()
}

/// A job's `summary.json` under the store `out`.
pub fn summary(out: &Path, name: &str) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(out.join(format!("jobs/{name}/summary.json"))).unwrap()).unwrap()
}

/// A compacted results table of job `name` under the store `out`.
pub async fn table(out: &Path, name: &str, table: dnd_store::results::ResultTable) -> arrow::record_batch::RecordBatch {
    let job = dnd_store::Location::open(out.join(format!("jobs/{name}")).to_str().unwrap()).unwrap();
    let batches = dnd_store::read_parquet(&job, &format!("results/{}", table.file())).await.unwrap();
    arrow::compute::concat_batches(&table.schema(), &batches).unwrap()
}

/// A table without the columns that name where files are (they contain the output path).
pub fn without_paths(batch: &arrow::record_batch::RecordBatch) -> arrow::record_batch::RecordBatch {
    let keep: Vec<usize> = (0..batch.num_columns()).filter(|&i| batch.schema().field(i).name() != "uri").collect();
    batch.project(&keep).unwrap()
}

/// A table without what depends on how the run went rather than on the job: where files
/// are (`uri`) and whether a value came from the cache (`cached`, `*_cached`: two workers
/// may compute the same caption at once where one worker would reuse it).
pub fn results_only(batch: &arrow::record_batch::RecordBatch) -> arrow::record_batch::RecordBatch {
    let keep: Vec<usize> = (0..batch.num_columns())
        .filter(|&i| {
            let name = batch.schema().field(i).name().clone();
            name != "uri" && name != "cached" && !name.ends_with("_cached")
        })
        .collect();
    batch.project(&keep).unwrap()
}

//! `dnd dissect` end to end with the tiny fixture models and the offline summariser:
//! every results table against docs/schema.md, the caches, determinism, resuming, bad
//! input, and a neuron whose summariser keeps failing.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use arrow::datatypes::{DataType, Schema};
use async_trait::async_trait;

use dnd_embedded::Dissection;
use dnd_pipeline::{JobSpec, NoProgress};
use dnd_store::results::{DescriptionRow, NeuronErrorRow, ResultTable};
use dnd_store::{Location, batches_rows, read_parquet};
use dnd_summarize::{Exchange, Step, SummarizeError, Summarizer};
use dnd_tests::{dnd_in, python_readers, repo, summary, table, without_paths};

fn job_file() -> String {
    repo().join("tests/fixtures/tiny-job.toml").display().to_string()
}

/// Runs `dnd dissect` on the tiny job (or `--config` in `extra`) from the repository root,
/// where the job file's relative paths point.
fn dissect(out: &Path, name: &str, extra: &[&str]) -> dnd_tests::Run {
    let out = out.display().to_string();
    let job = job_file();
    let mut args = vec!["dissect", "--out", out.as_str(), "--name", name];
    if !extra.contains(&"--config") {
        args.extend(["--config", job.as_str()]);
    }
    args.extend(extra);
    dnd_in(&repo(), &args)
}

/// The tables of docs/schema.md's `results/<table>.parquet` sections: (column, type,
/// nullable) in order.
fn documented_schemas() -> BTreeMap<String, Vec<(String, DataType, bool)>> {
    let doc = std::fs::read_to_string(repo().join("docs/schema.md")).unwrap();
    let mut tables = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in doc.lines() {
        if let Some(rest) = line.strip_prefix("### `results/") {
            current = rest.strip_suffix(".parquet`").map(String::from);
            tables.insert(current.clone().unwrap(), Vec::new());
            continue;
        }
        if line.starts_with("### ") {
            current = None;
        }
        let Some(table) = &current else { continue };
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if cells.len() < 4 || !cells[1].starts_with('`') {
            continue;
        }
        let (ty, nullable) = match cells[2].strip_suffix('?') {
            Some(t) => (t, true),
            None => (cells[2], false),
        };
        let ty = match ty {
            "string" => DataType::Utf8,
            "int32" => DataType::Int32,
            "int64" => DataType::Int64,
            "float32" => DataType::Float32,
            "float64" => DataType::Float64,
            "bool" => DataType::Boolean,
            other => panic!("docs/schema.md: unknown type {other} in {table}"),
        };
        tables.get_mut(table).unwrap().push((cells[1].trim_matches('`').to_string(), ty, nullable));
    }
    tables
}

fn assert_documented(schema: &Schema, documented: &[(String, DataType, bool)], table: &str) {
    let actual: Vec<(String, DataType, bool)> = schema
        .fields()
        .iter()
        .map(|f| (f.name().clone(), f.data_type().clone(), f.is_nullable()))
        .collect();
    assert_eq!(actual, documented, "results/{table}.parquet differs from docs/schema.md");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dissection_writes_every_table_reuses_its_caches_and_is_deterministic() {
    let out = tempfile::tempdir().unwrap();
    let first = dissect(out.path(), "first", &[]);
    assert_eq!(first.code, 0, "{}\n{}", first.stdout, first.stderr);
    // The table at the end: every neuron, with its label and score.
    let header = first.stdout.lines().next().unwrap();
    assert!(
        header.starts_with("layer") && header.contains("label") && header.contains("score"),
        "{}",
        first.stdout
    );
    for neuron in
        ["layer4       0", "layer4       1", "layer4       2", "fc           0", "fc           1"]
    {
        assert!(first.stdout.contains(neuron), "{neuron} missing:\n{}", first.stdout);
    }
    assert!(first.stdout.contains("results: "), "{}", first.stdout);

    // Every results table has its documented schema, and real rows.
    let documented = documented_schemas();
    assert_eq!(documented.len(), ResultTable::ALL.len(), "{:?}", documented.keys());
    for t in ResultTable::ALL {
        let batch = table(out.path(), "first", t).await;
        assert_documented(&batch.schema(), &documented[t.name()], t.name());
        // No problems and no [evaluate] in this job: those two tables are there, empty
        // (tests/evaluate_cli.rs fills the evaluation).
        if t != ResultTable::Errors && t != ResultTable::Evaluation {
            assert!(batch.num_rows() > 0, "results/{} is empty", t.name());
        }
    }
    let descriptions: Vec<DescriptionRow> =
        batches_rows("d", &[table(out.path(), "first", ResultTable::Descriptions).await]).unwrap();
    assert_eq!(descriptions.len(), 5);
    for d in &descriptions {
        assert_eq!(d.status, "ok", "{d:?}");
        assert!(d.label.is_some() && d.score.is_some());
        // layer4: originals and crops re-ranked, cut to describe.top_images; fc: no crops,
        // so its probe.top_k originals.
        assert_eq!(d.top_images, if d.layer == "fc" { 3 } else { 4 }, "{d:?}");
        assert_eq!(d.images_total, 3 * d.candidates, "3 images per candidate");
    }
    let images = table(out.path(), "first", ResultTable::Images).await;
    let kinds = arrow::array::AsArray::as_string::<i32>(images.column_by_name("kind").unwrap());
    let kinds: Vec<&str> = kinds.iter().map(|k| k.unwrap()).collect();
    assert!(kinds.contains(&"original") && kinds.contains(&"crop") && kinds.contains(&"generated"));
    let s1 = summary(out.path(), "first");
    for kind in ["images", "captions", "replies"] {
        assert!(s1["cache"][kind]["misses"].as_u64().unwrap() > 0, "a cold run computes {kind}");
    }
    python_readers(&[OsStr::new("--results"), out.path().join("jobs/first").as_os_str()]);

    // The same job again under another name, same store: every caption, image and reply
    // comes from the caches (no model calls) and the labels are the same.
    let second = dissect(out.path(), "second", &[]);
    assert_eq!(second.code, 0, "{}", second.stderr);
    let s2 = summary(out.path(), "second");
    for kind in ["images", "captions", "replies"] {
        assert_eq!(s2["cache"][kind]["misses"], 0, "{kind}: a warm run makes no model calls: {s2}");
        assert!(s2["cache"][kind]["hits"].as_u64().unwrap() > 0);
    }
    let warm: Vec<DescriptionRow> =
        batches_rows("d", &[table(out.path(), "second", ResultTable::Descriptions).await]).unwrap();
    for (cold, warm) in descriptions.iter().zip(&warm) {
        assert_eq!(
            (&cold.label, cold.score, &cold.label_2, &cold.label_3),
            (&warm.label, warm.score, &warm.label_2, &warm.label_3)
        );
        assert_eq!(warm.captions_cached, warm.captions_total);
        assert_eq!(warm.replies_cached, warm.replies_total);
        assert_eq!(warm.images_cached, warm.images_total);
    }
    assert_eq!(
        table(out.path(), "first", ResultTable::Scores).await,
        table(out.path(), "second", ResultTable::Scores).await
    );

    // The same job in a fresh store (cold caches) gives identical results, table by table.
    let elsewhere = tempfile::tempdir().unwrap();
    let again = dissect(elsewhere.path(), "first", &[]);
    assert_eq!(again.code, 0, "{}", again.stderr);
    for t in ResultTable::ALL {
        let a = without_paths(&table(out.path(), "first", t).await);
        let b = without_paths(&table(elsewhere.path(), "first", t).await);
        assert_eq!(a, b, "results/{} differs between two runs of the same job", t.name());
    }

    // Re-running a finished job resumes it: nothing is redone.
    let resumed = dissect(out.path(), "first", &[]);
    assert_eq!(resumed.code, 0, "{}", resumed.stderr);
    assert!(resumed.stdout.contains("4 of 4 tasks resumed"), "{}", resumed.stdout);
    // ... and a different job under a taken name is refused before any work.
    let clash = dissect(out.path(), "first", &["--seed", "5"]);
    assert_eq!(clash.code, 2, "{}", clash.stderr);
    assert!(clash.stderr.contains("already there"), "{}", clash.stderr);
}

#[test]
fn bad_input_is_rejected_before_any_work_starts() {
    let empty = tempfile::tempdir().unwrap();
    let unreachable = tempfile::tempdir().unwrap();
    let job = std::fs::read_to_string(job_file()).unwrap().replace(
        "backend = \"consensus\"\nrounds = 3",
        "backend = \"openai\"\nrounds = 3\n[summarizer.openai]\nbase_url = \"http://127.0.0.1:9/v1\"\nmodel = \"m\"\napi_key_env = \"\"\nmax_retries = 0",
    );
    let unreachable_job = unreachable.path().join("job.toml");
    std::fs::write(&unreachable_job, job).unwrap();
    let empty_dir = empty.path().display().to_string();
    let legacy =
        repo().join("tests/fixtures/models/tiny_resnet_pth/legacy.pth").display().to_string();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--model", legacy.as_str()], "legacy.pth"),
        (vec!["--layers", "layer9"], "layer9"),
        (vec!["--neurons", "layer4=0..100000"], "neuron 99999"),
        (vec!["--neurons", "layer3=0"], "layer3"),
        (vec!["--images", empty_dir.as_str()], "no probe images"),
        (vec!["--generator", "/nonexistent/sd"], "/nonexistent/sd"),
        (vec!["--config", unreachable_job.to_str().unwrap()], "127.0.0.1:9"),
    ];
    for (extra, expected) in cases {
        let out = tempfile::tempdir().unwrap();
        let run = dissect(out.path(), "bad", &extra);
        assert_eq!(run.code, 2, "{extra:?} should be bad input:\n{}", run.stderr);
        assert!(
            run.stderr.contains(expected),
            "{extra:?}: the error should mention {expected}:\n{}",
            run.stderr
        );
        assert!(
            !out.path().join("jobs").exists(),
            "{extra:?}: nothing may be written before the checks pass"
        );
    }
}

/// The offline summariser, except that its very first call fails: the first neuron of the
/// first task cannot be summarised, every other neuron can.
struct FailsFirstCall {
    inner: Arc<dyn Summarizer>,
    calls: AtomicUsize,
}

impl FailsFirstCall {
    fn check(&self) -> Result<(), SummarizeError> {
        if self.calls.fetch_add(1, Ordering::SeqCst) == 0 {
            return Err(SummarizeError::Internal(
                "the language model keeps failing for this neuron".into(),
            ));
        }
        Ok(())
    }
}

#[async_trait]
impl Summarizer for FailsFirstCall {
    async fn simplify(&self, caption: &str) -> Result<Exchange, SummarizeError> {
        self.check()?;
        self.inner.simplify(caption).await
    }
    async fn summarize(&self, labels: &[String]) -> Result<Exchange, SummarizeError> {
        self.check()?;
        self.inner.summarize(labels).await
    }
    async fn merge(&self, labels: &[String]) -> Result<Exchange, SummarizeError> {
        self.check()?;
        self.inner.merge(labels).await
    }
    fn request(&self, step: Step, input: &[String]) -> Result<String, SummarizeError> {
        self.inner.request(step, input)
    }
    fn describe(&self) -> String {
        "fails-first-call".into()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_neuron_whose_summariser_fails_gets_an_error_row_and_the_job_completes() {
    let out = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(job_file()).unwrap();
    let mut spec = JobSpec::from_toml(&text, "tiny-job.toml").unwrap();
    spec.out = out.path().display().to_string();
    for model in [
        &mut spec.target.model,
        &mut spec.captioner.model,
        &mut spec.generator.model,
        &mut spec.embedder.model,
    ] {
        *model = repo().join(&*model).display().to_string();
    }
    spec.probe.images = repo().join(&spec.probe.images).display().to_string();
    let mut dissection = Dissection::prepare(&spec).await.unwrap();
    let summarizer = &mut dissection.bench.summarizer;
    summarizer.model =
        Arc::new(FailsFirstCall { inner: summarizer.model.clone(), calls: AtomicUsize::new(0) });
    summarizer.identity = "fails-first-call".into();
    let outcome = dissection.run(&NoProgress).await.unwrap();

    let failed: Vec<&DescriptionRow> =
        outcome.descriptions.iter().filter(|d| d.status == "failed").collect();
    assert_eq!(failed.len(), 1, "{:?}", outcome.descriptions);
    assert_eq!((failed[0].layer.as_str(), failed[0].neuron.index()), ("layer4", 0));
    assert!(failed[0].error.as_deref().unwrap().contains("keeps failing"));
    assert!(failed[0].label.is_none());
    assert_eq!(
        outcome.descriptions.iter().filter(|d| d.status == "ok").count(),
        4,
        "the other neurons are described"
    );
    assert_eq!(outcome.summary.neurons_failed, 1);

    let job =
        Location::open(out.path().join(format!("jobs/{}", outcome.summary.job)).to_str().unwrap())
            .unwrap();
    let errors: Vec<NeuronErrorRow> =
        batches_rows("errors", &read_parquet(&job, "results/errors.parquet").await.unwrap())
            .unwrap();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!((errors[0].stage.as_str(), errors[0].neuron.index()), ("summarize", 0));
}

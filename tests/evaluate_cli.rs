//! `dnd evaluate` end to end on the tiny fixture job: every label gets every metric, in
//! range and with intervals; a second run resumes and recomputes nothing; a job with
//! `[evaluate]` scores its labels inside its neuron tasks to the same rows; labels files
//! are scored beside the job's own, and bad ones exit 2 naming the problem.

use std::collections::BTreeSet;
use std::path::Path;

use dnd_store::results::{DescriptionRow, EvaluationRow, ResultTable};
use dnd_store::{Location, batches_rows, read_parquet};
use dnd_tests::{dnd_in, repo};

fn tiny_job() -> String {
    std::fs::read_to_string(repo().join("tests/fixtures/tiny-job.toml")).unwrap()
}

/// Runs `dnd dissect` on `job_toml` (written next to the store) from the repository root.
fn dissect(out: &Path, name: &str, job_toml: &str) {
    let file = out.join(format!("{name}.toml"));
    std::fs::write(&file, job_toml).unwrap();
    let (out_s, file_s) = (out.display().to_string(), file.display().to_string());
    let run = dnd_in(&repo(), &["dissect", "--out", &out_s, "--name", name, "--config", &file_s]);
    assert_eq!(run.code, 0, "dissect failed:\n{}\n{}", run.stdout, run.stderr);
}

async fn rows<T: serde::de::DeserializeOwned>(job: &Path, table: ResultTable) -> Vec<T> {
    let location = Location::open(job.to_str().unwrap()).unwrap();
    let batches = read_parquet(&location, &format!("results/{}", table.file())).await.unwrap();
    batches_rows(table.name(), &batches).unwrap()
}

fn evaluate(job: &Path, extra: &[&str]) -> dnd_tests::Run {
    let job = job.display().to_string();
    let mut args = vec!["evaluate", job.as_str()];
    args.extend(extra);
    dnd_in(&repo(), &args)
}

/// Every metric row is in its range, with an interval around it where one exists.
fn assert_sane(rows: &[EvaluationRow], probe_images: i32) {
    for r in rows {
        let v = r.value.unwrap_or_else(|| panic!("no value: {r:?}"));
        match r.metric.as_str() {
            "correlation" => assert!((-1.0..=1.0).contains(&v), "{r:?}"),
            "auprc" | "f1" | "iou" | "cosy_auc" => assert!((0.0..=1.0).contains(&v), "{r:?}"),
            "cosy_mad" => assert!(v.is_finite(), "{r:?}"),
            other => panic!("unknown metric {other}"),
        }
        assert_eq!(r.quantile.is_some(), ["auprc", "f1", "iou"].contains(&r.metric.as_str()));
        if let (Some(lo), Some(hi)) = (r.ci_low, r.ci_high) {
            assert!(lo <= hi, "{r:?}");
        }
        if !r.metric.starts_with("cosy") {
            assert_eq!(r.images, probe_images, "{r:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_label_gets_every_metric_and_a_rerun_resumes() {
    let out = tempfile::tempdir().unwrap();
    dissect(out.path(), "plain", &tiny_job());
    let job = out.path().join("jobs/plain");
    let descriptions: Vec<DescriptionRow> = rows(&job, ResultTable::Descriptions).await;
    let labelled: BTreeSet<(String, u32)> = descriptions
        .iter()
        .filter(|d| d.label.is_some())
        .map(|d| (d.layer.to_string(), d.neuron.to_u32()))
        .collect();
    assert!(!labelled.is_empty());
    let before: Vec<EvaluationRow> = rows(&job, ResultTable::Evaluation).await;
    assert!(before.is_empty(), "no [evaluate]: the table is there, empty");

    let first = evaluate(&job, &[]);
    assert_eq!(first.code, 0, "{}\n{}", first.stdout, first.stderr);
    assert!(first.stdout.contains("(dnd)"), "{}", first.stdout);
    let scored: Vec<EvaluationRow> = rows(&job, ResultTable::Evaluation).await;
    // correlation, 2 x (auprc, f1, iou), cosy_auc, cosy_mad: 9 rows per label.
    assert_eq!(scored.len(), 9 * labelled.len());
    let neurons: BTreeSet<(String, u32)> =
        scored.iter().map(|r| (r.layer.to_string(), r.neuron.to_u32())).collect();
    assert_eq!(neurons, labelled);
    assert_sane(&scored, 7);

    let second = evaluate(&job, &[]);
    assert_eq!(second.code, 0, "{}", second.stderr);
    assert!(second.stdout.contains("batches resumed"), "{}", second.stdout);
    let again: Vec<EvaluationRow> = rows(&job, ResultTable::Evaluation).await;
    assert_eq!(scored, again);

    // Another method's labels, scored beside the job's own.
    let csv = out.path().join("other-method.csv");
    std::fs::write(&csv, "layer,neuron,label\nlayer4,0,red circles\nfc,1,\"stripes, dots\"\n")
        .unwrap();
    let run = evaluate(&job, &["--labels", csv.to_str().unwrap(), "--bootstrap", "0"]);
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    let both: Vec<EvaluationRow> = rows(&job, ResultTable::Evaluation).await;
    let other: Vec<&EvaluationRow> = both.iter().filter(|r| r.source == "other-method").collect();
    assert_eq!(other.len(), 18);
    assert!(other.iter().all(|r| r.ci_low.is_none()), "--bootstrap 0: no intervals");
    assert!(other.iter().any(|r| r.label == "stripes, dots"));
    assert_eq!(both.iter().filter(|r| r.source == "dnd").count(), scored.len());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_with_evaluate_scores_its_labels_as_dnd_evaluate_does() {
    let out = tempfile::tempdir().unwrap();
    dissect(out.path(), "inline", &format!("{}\n[evaluate]\n", tiny_job()));
    dissect(out.path(), "after", &tiny_job());
    let after = out.path().join("jobs/after");
    let run = evaluate(&after, &[]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let inline: Vec<EvaluationRow> =
        rows(&out.path().join("jobs/inline"), ResultTable::Evaluation).await;
    let later: Vec<EvaluationRow> = rows(&after, ResultTable::Evaluation).await;
    assert!(!inline.is_empty());
    assert_eq!(inline, later, "same labels, models and seeds: the same rows");

    // Evaluating the inline job again recomputes nothing: every generated image and every
    // activation and embedding comes from the cache.
    let run = evaluate(&out.path().join("jobs/inline"), &[]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stdout.contains("model calls: 0 images generated, 0 activations and embeddings"),
        "{}",
        run.stdout
    );
}

#[test]
fn bad_labels_files_exit_2_and_say_what_is_wrong() {
    let out = tempfile::tempdir().unwrap();
    dissect(out.path(), "bad", &tiny_job());
    let job = out.path().join("jobs/bad");
    let cases = [
        ("layer,neuron,text\nlayer4,0,red\n", "no label column"),
        ("layer,neuron,label\nlayer4,9999,red\n", "neuron 9999"),
        ("layer,neuron,label\nlayer2,0,red\n", "layer `layer2`"),
    ];
    for (i, (text, expected)) in cases.into_iter().enumerate() {
        let file = out.path().join(format!("labels-{i}.csv"));
        std::fs::write(&file, text).unwrap();
        let run = evaluate(&job, &["--labels", file.to_str().unwrap()]);
        assert_eq!(run.code, 2, "{text}: {}", run.stderr);
        assert!(run.stderr.contains(expected), "{text}: {}", run.stderr);
    }
    let txt = out.path().join("labels.txt");
    std::fs::write(&txt, "x").unwrap();
    let run = evaluate(&job, &["--labels", txt.to_str().unwrap()]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(run.stderr.contains(".csv or .parquet"), "{}", run.stderr);
    let run = evaluate(&job, &["--quantiles", "5"]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(run.stderr.contains("top 5%"), "{}", run.stderr);
}

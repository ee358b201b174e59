//! dnd against a real S3-compatible server on loopback (`moto_server`, installed by
//! `.ci/run` with `pip install 'moto[server]'`): a dissection writes its job, its
//! create-only commit markers and its results to a bucket, and a re-run resumes from them.

use std::process::Command;

use dnd_store::results::DescriptionRow;
use dnd_store::{batches_rows, read_parquet};
use dnd_tests::{S3Server, dnd_binary, repo};

const BUCKET: &str = "dnd-test";

fn dissect(s3: &S3Server, out: &str) -> (i32, String, String) {
    let job = repo().join("tests/fixtures/tiny-job.toml");
    let mut cmd = Command::new(dnd_binary());
    cmd.args(["dissect", "--config", job.to_str().unwrap(), "--out", out, "--name", "s3"])
        .current_dir(repo())
        .env("RUST_LOG", "warn");
    cmd.envs(s3.env());
    let output = cmd.output().unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into(),
        String::from_utf8_lossy(&output.stderr).into(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dissection_runs_on_an_s3_bucket_and_resumes_from_it() {
    let s3 = S3Server::start(BUCKET);
    let out = format!("s3://{BUCKET}/runs");
    let (code, stdout, stderr) = dissect(&s3, &out);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(stdout.contains(&format!("results: {out}/jobs/s3/results/")), "{stdout}");

    // Read back through object_store's S3 client, as a user's analysis would.
    let job = s3.location("runs/jobs/s3");
    let rows: Vec<DescriptionRow> = batches_rows(
        "descriptions",
        &read_parquet(&job, "results/descriptions.parquet").await.unwrap(),
    )
    .unwrap();
    assert_eq!(rows.len(), 5);
    assert!(rows.iter().all(|r| r.status == "ok"), "{rows:?}");
    assert!(job.exists("tasks/fc-00000/_COMMITTED").await.unwrap());
    // Create-only puts hold on S3: a second commit of a task is refused.
    assert!(
        !job.put_if_absent("tasks/fc-00000/_COMMITTED", bytes::Bytes::from_static(b"zombie"))
            .await
            .unwrap()
    );

    let (code, stdout, stderr) = dissect(&s3, &out);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(stdout.contains("4 of 4 tasks resumed"), "{stdout}");
}

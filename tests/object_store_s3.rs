//! dnd against a real S3-compatible server on loopback (`moto_server`, installed by
//! `.ci/run` with `pip install 'moto[server]'`): a dissection writes its job, its
//! create-only commit markers and its results to a bucket, and a re-run resumes from them.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dnd_store::results::DescriptionRow;
use dnd_store::{Location, batches_rows, read_parquet};
use dnd_tests::{dnd_binary, repo};

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const BUCKET: &str = "dnd-test";

fn s3_env(endpoint: &str) -> [(&'static str, String); 5] {
    [
        ("AWS_ENDPOINT", endpoint.to_string()),
        ("AWS_ALLOW_HTTP", "true".into()),
        ("AWS_ACCESS_KEY_ID", "test".into()),
        ("AWS_SECRET_ACCESS_KEY", "test".into()),
        ("AWS_REGION", "us-east-1".into()),
    ]
}

fn start_moto() -> (Server, String) {
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = Command::new("moto_server")
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("moto_server is not installed: run `pip install 'moto[server]'` (.ci/run does)");
    let server = Server(child);
    let endpoint = format!("http://127.0.0.1:{port}");
    let start = Instant::now();
    // The bucket, created once the server answers.
    loop {
        let created = Command::new("python3")
            .args(["-c", &format!(
                "import boto3; boto3.client('s3', endpoint_url='{endpoint}', aws_access_key_id='test', aws_secret_access_key='test', region_name='us-east-1').create_bucket(Bucket='{BUCKET}')"
            )])
            .stderr(Stdio::null())
            .status()
            .unwrap();
        if created.success() {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "moto_server did not start");
        std::thread::sleep(Duration::from_millis(300));
    }
    (server, endpoint)
}

fn dissect(endpoint: &str, out: &str) -> (i32, String, String) {
    let job = repo().join("tests/fixtures/tiny-job.toml");
    let mut cmd = Command::new(dnd_binary());
    cmd.args(["dissect", "--config", job.to_str().unwrap(), "--out", out, "--name", "s3"]).current_dir(repo()).env("RUST_LOG", "warn");
    for (k, v) in s3_env(endpoint) {
        cmd.env(k, v);
    }
    let output = cmd.output().unwrap();
    (output.status.code().unwrap_or(-1), String::from_utf8_lossy(&output.stdout).into(), String::from_utf8_lossy(&output.stderr).into())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dissection_runs_on_an_s3_bucket_and_resumes_from_it() {
    let (_server, endpoint) = start_moto();
    let out = format!("s3://{BUCKET}/runs");
    let (code, stdout, stderr) = dissect(&endpoint, &out);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(stdout.contains(&format!("results: {out}/jobs/s3/results/")), "{stdout}");

    // Read back through object_store's S3 client, as a user's analysis would.
    for (k, v) in s3_env(&endpoint) {
        // SAFETY: this test file has one test; nothing else reads the environment concurrently.
        unsafe { std::env::set_var(k, v) };
    }
    let job = Location::open(&format!("{out}/jobs/s3")).unwrap();
    let rows: Vec<DescriptionRow> = batches_rows("descriptions", &read_parquet(&job, "results/descriptions.parquet").await.unwrap()).unwrap();
    assert_eq!(rows.len(), 5);
    assert!(rows.iter().all(|r| r.status == "ok"), "{rows:?}");
    assert!(job.exists("tasks/fc-00000/_COMMITTED").await.unwrap());
    // Create-only puts hold on S3: a second commit of a task is refused.
    assert!(!job.put_if_absent("tasks/fc-00000/_COMMITTED", bytes::Bytes::from_static(b"zombie")).await.unwrap());

    let (code, stdout, stderr) = dissect(&endpoint, &out);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(stdout.contains("4 of 4 tasks resumed"), "{stdout}");
}

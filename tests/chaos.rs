//! The short variant of `dnd bench chaos`: a 68-task job on a coordinator and two worker
//! processes, one of them SIGKILLed and restarted every 4 s (the coordinator first),
//! every store call failing at the bench's default rates. Nothing may be lost, duplicated
//! or different from a clean run. Bounded: the bench gives up after 8 minutes.

use std::process::Command;

use dnd_tests::{dnd_binary, repo};

#[test]
fn a_job_under_kills_and_store_faults_gives_the_clean_run_s_results() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("chaos.json");
    let out = Command::new(dnd_binary())
        .args(["bench", "chaos", "--neurons", "layer4=0..4", "--neurons", "fc=0..60"])
        .args(["--workers", "2", "--kill-every", "4", "--timeout-minutes", "8"])
        .arg("--out")
        .arg(dir.path())
        .arg("--json")
        .arg(&json)
        .current_dir(repo())
        .env("RUST_LOG", "warn")
        .env_remove("DND_STORE_FAULTS")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let verdict = &report["verdict"];
    assert_eq!(verdict["neurons"], 64, "{stdout}");
    for empty in ["lost", "duplicated", "differing_tables"] {
        assert_eq!(verdict[empty], serde_json::json!([]), "{empty}: {stdout}");
    }
    assert_eq!(report["unexpected_exits"], serde_json::json!([]), "{stdout}");
    // The failures did happen: the coordinator and a worker were killed mid-job, and
    // store calls failed and were retried.
    assert!(report["kills"]["coordinator"].as_u64() >= Some(1), "{stdout}");
    assert!(report["kills"]["worker"].as_u64() >= Some(1), "{stdout}");
    let store = &report["store"];
    assert!(store["retries"].as_u64() > Some(0), "{stdout}");
    let faults: u64 =
        store["faults"].as_object().unwrap().values().filter_map(|v| v.as_u64()).sum();
    assert!(faults > 0, "{stdout}");
}

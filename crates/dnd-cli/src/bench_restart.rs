//! `dnd bench restart`: what a restarted coordinator pays to find a job's committed tasks.
//! A job of N committed tasks (each an attempt directory with one file and a commit
//! marker) is written to a store; then the commits are read back as a restart reads them
//! (one listing of `tasks/`, [`dnd_store::TaskStore::committed_all`]) and, for
//! comparison, as it used to (one marker read per task).

use std::time::Instant;

use bytes::Bytes;
use clap::Args;
use futures::StreamExt;
use serde::Serialize;

use dnd_store::{Location, TaskStore};

#[derive(Args)]
pub struct RestartArgs {
    /// Committed tasks in the job.
    #[arg(long, default_value_t = 100_000)]
    tasks: usize,
    /// The store (a directory or an object store URL; default a temporary directory).
    #[arg(long)]
    store: Option<String>,
    /// Also time reading every marker one by one (the way before one listing).
    #[arg(long)]
    compare: bool,
    /// Also write the numbers as JSON.
    #[arg(long, value_name = "FILE")]
    json: Option<std::path::PathBuf>,
}

#[derive(Debug, Serialize)]
struct RestartReport {
    tasks: usize,
    store: String,
    write_seconds: f64,
    /// One listing (and the markers of tasks with several attempts).
    listing_seconds: f64,
    /// One marker read per task, when asked for.
    per_marker_seconds: Option<f64>,
}

pub async fn restart(args: RestartArgs) -> anyhow::Result<()> {
    let scratch = tempfile::tempdir()?;
    let spec = args.store.clone().unwrap_or_else(|| scratch.path().display().to_string());
    let job = Location::create(&spec)?.join(&format!("bench-restart-{}", std::process::id()));
    let store = TaskStore::new(job.clone());
    let names: Vec<String> = (0..args.tasks).map(|i| format!("layer4-{i:06}")).collect();

    let started = Instant::now();
    futures::stream::iter(names.iter())
        .map(|task| {
            let store = store.clone();
            async move {
                let dir = store.attempt_dir(task, "attempt-1")?;
                dir.put("stats.json", Bytes::from_static(b"{}")).await?;
                store.commit(task, "attempt-1").await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<Vec<()>>>()?;
    let write_seconds = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let committed = store.committed_all().await?;
    let listing_seconds = started.elapsed().as_secs_f64();
    anyhow::ensure!(committed.len() == args.tasks, "found {} commits", committed.len());

    let per_marker_seconds = if args.compare {
        let started = Instant::now();
        for task in &names {
            store.committed(task).await?;
        }
        Some(started.elapsed().as_secs_f64())
    } else {
        None
    };
    let report = RestartReport {
        tasks: args.tasks,
        store: job.to_string(),
        write_seconds,
        listing_seconds,
        per_marker_seconds,
    };
    println!(
        "{} committed tasks in {}: written in {:.1} s; found by one listing in {:.2} s{}",
        report.tasks,
        report.store,
        report.write_seconds,
        report.listing_seconds,
        report
            .per_marker_seconds
            .map_or(String::new(), |s| format!(", by reading each marker in {s:.2} s"))
    );
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
    }
    if args.store.is_some() {
        // Leave a user's store as it was.
        let _ = futures::stream::iter(job.list_all("").await?)
            .map(|p| {
                let job = job.clone();
                async move { job.delete(&p).await }
            })
            .buffer_unordered(64)
            .collect::<Vec<_>>()
            .await;
    }
    Ok(())
}

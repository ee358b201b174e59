//! `dnd bench units`: what a whole dictionary costs the coordinator. A synthetic SAE of N
//! latents on a layer of the target is planned as a real job is (`JobPlan::make`), the
//! plan is submitted to a coordinator whose simulated workers (gRPC clients on loopback,
//! as `dnd bench scheduler`'s) commit every task's marker, and then every task's results
//! tables are written with made-up rows of the method's default sizes and compacted as
//! `finish_job` does. Reports the plan's time and size, the coordinator's memory for the
//! job, the scheduling makespan, the compaction's time and the results' size.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;

use dnd_coordinator::{Coordinator, Settings};
use dnd_core::{Activation, NeuronId, UnitKind};
use dnd_models::ModelRef;
use dnd_models::dictionary::DictionaryInfo;
use dnd_models::target::TargetShape;
use dnd_pipeline::execute::write_task;
use dnd_pipeline::job::UnitSource;
use dnd_pipeline::plan::{JobPlan, NeuronBatch};
use dnd_pipeline::{JobSpec, ProbeImages, TaskTables};
use dnd_store::results::{
    CandidateRow, CaptionRow, DescriptionRow, DescriptionStatus, ExchangeRow, ImageRow, ScoreRow,
};
use dnd_store::{Location, TaskStore};

use crate::bench_scheduler::{Loopback, simulated_worker, wait_for_success};

#[derive(Args)]
pub struct UnitsArgs {
    /// Units of the synthetic dictionary.
    #[arg(long, default_value_t = 100_000)]
    units: usize,
    /// Units per neuron task (the job file's describe.neurons_per_task).
    #[arg(long, default_value_t = 8)]
    neurons_per_task: usize,
    /// The target model whose layer the dictionary reads.
    #[arg(long, default_value = "tests/fixtures/models/tiny_resnet")]
    model: String,
    #[arg(long, default_value = "layer4")]
    layer: String,
    /// Probe images listed for the plan (empty files in a temporary directory).
    #[arg(long, default_value_t = 1000)]
    images: usize,
    /// Simulated workers.
    #[arg(long, default_value_t = 16)]
    workers: usize,
    /// Share of units described in full; the rest are dead or dense (a description row
    /// each), as an SAE's are.
    #[arg(long, default_value_t = 0.7)]
    described: f64,
    /// The probe's encoder cost: latents of a random TopK(32) SAE run on a batch of
    /// `encode_batch` maps of `encode_channels` x 7 x 7 (ResNet-50's layer4), on the CPU.
    #[arg(long, default_value_t = 16_384)]
    encode_latents: usize,
    #[arg(long, default_value_t = 2048)]
    encode_channels: usize,
    #[arg(long, default_value_t = 16)]
    encode_batch: usize,
    /// Also write the numbers as JSON.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
struct UnitsReport {
    units: usize,
    neuron_tasks: usize,
    plan_seconds: f64,
    plan_json_bytes: usize,
    /// Resident memory a running coordinator gained from planning the job and taking it
    /// (the plan, the scheduler's task table, the job's run state; a copy of the task list
    /// the bench keeps for later is included, so this is an upper bound).
    coordinator_rss_mib: f64,
    /// Leasing, committing and completing every task on `workers` simulated workers.
    schedule_seconds: f64,
    rows_written: usize,
    /// Writing every task's tables (the workers' share, serial here).
    write_tasks_seconds: f64,
    /// `TaskStore::compact`: every task's tables into results/*.parquet.
    compact_seconds: f64,
    results_bytes: u64,
    results_bytes_per_unit: f64,
    /// One batch through the encoder (one matrix product of positions x channels by
    /// channels x latents, then the activation) and mean pooling, by activation.
    encode_ms_per_batch: BTreeMap<String, f64>,
}

/// Milliseconds per batch of the probe's unit maps and pooling, by activation (median of 5).
fn encoder_cost(args: &UnitsArgs) -> anyhow::Result<BTreeMap<String, f64>> {
    use candle_core::{D, Device, Tensor};
    let (c, l) = (args.encode_channels, args.encode_latents);
    let device = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (args.encode_batch, c, 7, 7), &device)?.relu()?;
    let w = Tensor::randn(0f32, 1.0 / (c as f32).sqrt(), (c, l), &device)?;
    let w = w.flatten_all()?.to_vec1::<f32>()?;
    let mut out = BTreeMap::new();
    for activation in [Activation::Relu, Activation::TopK { k: 32 }] {
        let encoder = dnd_core::Encoder::new(
            c,
            l,
            (w.clone(), vec![0.0; l], vec![0.1; c]),
            Vec::new(),
            activation,
        )?;
        let encoder = dnd_models::dictionary::DeviceEncoder::new(&encoder, &device)?;
        let mut times = Vec::new();
        for _ in 0..5 {
            let started = Instant::now();
            let pooled = encoder.maps(&x)?.flatten_from(2)?.mean(D::Minus1)?;
            pooled.to_vec2::<f32>()?;
            times.push(started.elapsed().as_secs_f64() * 1000.0);
        }
        times.sort_by(f64::total_cmp);
        out.insert(activation.to_string(), times[2]);
    }
    Ok(out)
}

/// Resident set size of this process in MiB (VmRSS), 0 where unknown.
fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
            line.split_whitespace().nth(1)?.parse::<f64>().ok()
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// A dictionary that exists only in the plan: its header facts, no file.
fn synthetic_dictionary(units: usize, d_in: usize) -> DictionaryInfo {
    DictionaryInfo {
        kind: UnitKind::Sae,
        weights: PathBuf::from("synthetic/sae_weights.safetensors"),
        config: None,
        d_in,
        units,
        activation: Activation::TopK { k: 32 },
        centre: true,
        identity: "blake3:5e5e5e5e5e5e5e5e".into(),
        names: Vec::new(),
    }
}

/// A well-mixed 64-bit value of `x` (SplitMix64's finaliser): made-up hashes and word
/// choices that compress as real ones do.
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

const WORDS: [&str; 48] = [
    "a", "photo", "of", "red", "blue", "green", "dog", "cat", "car", "tree", "house", "sky",
    "striped", "dotted", "round", "square", "small", "large", "on", "the", "grass", "road",
    "water", "building", "person", "holding", "yellow", "white", "black", "bird", "flower",
    "window", "wooden", "metal", "table", "with", "and", "near", "bright", "dark", "pattern",
    "texture", "fur", "leaves", "wheel", "face", "boat", "cloud",
];

/// `n` words chosen by `seed`.
fn words(seed: u64, n: usize) -> String {
    (0..n)
        .map(|i| WORDS[(mix(seed ^ (i as u64) << 40) % 48) as usize])
        .collect::<Vec<_>>()
        .join(" ")
}

/// Made-up rows for a task's units, of the default method's sizes: 10 top images (5
/// originals, 5 crops) captioned, 16 summariser exchanges, 5 candidates of 10 generated
/// images each; a skipped unit has its description row only.
fn task_tables(task: &NeuronBatch, described: f64, source: &str) -> TaskTables {
    let mut t = TaskTables::default();
    for &n in &task.neurons {
        let full = (n.index() % 1000) as f64 / 1000.0 < described;
        let unit = n.index() as u64;
        let real = |x: u64| (mix(unit << 24 ^ x) % 1_000_000) as f64 / 1e6;
        let label = |c: usize| words(unit << 8 | c as u64, 2);
        let (layer, neuron, unit_kind, unit_source) =
            (task.layer.clone(), n, UnitKind::Sae, Some(source.to_string()));
        t.descriptions.push(DescriptionRow {
            layer: layer.clone(),
            neuron,
            unit_kind,
            unit_source: unit_source.clone(),
            status: if full { DescriptionStatus::Ok } else { DescriptionStatus::Dead },
            label: full.then(|| label(0)),
            score: full.then(|| 5.0 + real(0)),
            label_2: full.then(|| label(1)),
            score_2: full.then(|| 4.0 + real(1)),
            label_3: full.then(|| label(2)),
            score_3: full.then(|| 3.0 + real(2)),
            candidates: if full { 5 } else { 0 },
            top_images: if full { 10 } else { 0 },
            captions_cached: 0,
            captions_total: if full { 10 } else { 0 },
            replies_cached: 0,
            replies_total: if full { 16 } else { 0 },
            images_cached: 0,
            images_total: if full { 50 } else { 0 },
            error: None,
            task: task.id.to_string(),
        });
        if full {
            evidence_rows(&mut t, task, n, source);
        }
    }
    t
}

/// The rows of a unit described in full, but its description.
fn evidence_rows(t: &mut TaskTables, task: &NeuronBatch, n: NeuronId, source: &str) {
    let unit = n.index() as u64;
    let real = |x: u64| (mix(unit << 24 ^ x) % 1_000_000) as f64 / 1e6;
    let label = |c: usize| words(unit << 8 | c as u64, 2);
    let (layer, neuron, unit_kind, unit_source) =
        (task.layer.clone(), n, UnitKind::Sae, Some(source.to_string()));
    let hash = |i: usize| {
        let x = unit << 16 | i as u64;
        format!("{:016x}{:016x}{:016x}{:016x}", mix(x), mix(x + 1), mix(x + 2), mix(x + 3))
    };
    for c in 0..5 {
        t.candidates.push(CandidateRow {
            layer: layer.clone(),
            neuron,
            unit_kind,
            unit_source: unit_source.clone(),
            candidate: c as i32,
            concept: label(c),
            prompt: format!("One realistic image of {}", label(c)),
            images: 10,
            final_rank: c as i32,
            selected: c < 3,
        });
        t.scores.push(ScoreRow {
            layer: layer.clone(),
            neuron,
            unit_kind,
            unit_source: unit_source.clone(),
            candidate: c as i32,
            concept: label(c),
            topk_sq_mean: Some(real(c as u64 * 8)),
            mean: Some(real(c as u64 * 8 + 1)),
            median: Some(real(c as u64 * 8 + 2)),
            sq_mean: Some(real(c as u64 * 8 + 3)),
            rank_score: "topk-sq-mean".into(),
            rank_order: c as i32,
            similarity: real(c as u64 * 8 + 4),
            final_score: 5.0 - c as f64 + real(c as u64 * 8 + 5),
            final_rank: c as i32,
        });
    }
    for i in 0..10 {
        t.captions.push(CaptionRow {
            layer: layer.clone(),
            neuron,
            unit_kind,
            unit_source: unit_source.clone(),
            image_rank: i as i32,
            image_hash: hash(i),
            caption: words(unit << 20 | i as u64, 9),
            simplified: Some(words(unit << 20 | i as u64, 2)),
            captioner: "blip#blake3:0123456789abcdef".into(),
            cached: false,
        });
    }
    for i in 0..60 {
        let generated = i >= 10;
        t.images.push(ImageRow {
            layer: layer.clone(),
            neuron,
            unit_kind,
            unit_source: unit_source.clone(),
            kind: if generated {
                "generated"
            } else if i < 5 {
                "original"
            } else {
                "crop"
            }
            .into(),
            rank: i as i32,
            activation: (mix(unit << 8 | i as u64) % 10_000) as f32 / 1000.0,
            top: i < 10,
            image_id: (!generated)
                .then(|| format!("images/{:07}.jpg", mix(unit << 8 | i as u64) % 1_000_000)),
            crop_index: (5..10).contains(&i).then_some(0),
            canvas_size: (5..10).contains(&i).then_some(375),
            x0: None,
            y0: None,
            x1: None,
            y1: None,
            candidate: generated.then(|| ((i - 10) / 10) as i32),
            concept: generated.then(|| label((i - 10) / 10)),
            seed: generated.then(|| ((i - 10) % 10) as i64),
            similarity: generated.then(|| real(1000 + i as u64) as f32),
            uri: format!("out/cache/images/{}/{}.png", &hash(i)[..2], hash(i)),
            image_hash: hash(i),
            cached: false,
        });
    }
    for seq in 0..16 {
        t.exchanges.push(ExchangeRow {
            layer: layer.clone(),
            neuron,
            unit_kind,
            unit_source: unit_source.clone(),
            seq,
            step: if seq < 10 { "simplify" } else { "summarize" }.into(),
            backend: "consensus".into(),
            model: "consensus".into(),
            prompt_version: "1".into(),
            request: format!("Simplify: {}", words(unit << 20 | seq as u64, 9)),
            reply: words(unit << 20 | seq as u64, 2),
            answer: Some(words(unit << 20 | seq as u64, 2)),
            error: None,
            cached: false,
        });
    }
}

fn rows(t: &TaskTables) -> usize {
    t.descriptions.len()
        + t.candidates.len()
        + t.scores.len()
        + t.captions.len()
        + t.images.len()
        + t.exchanges.len()
}

/// Plans the synthetic dictionary's job: the spec and the probe listing a real one has.
async fn plan(args: &UnitsArgs) -> anyhow::Result<(JobPlan, tempfile::TempDir)> {
    let reference: ModelRef = args.model.parse()?;
    let shape = TargetShape::read(&reference)?;
    let tap = shape.tap(&args.layer)?;
    let mut spec = JobSpec::default();
    spec.target.model = args.model.clone();
    spec.target.layers = vec![args.layer.clone()];
    spec.target
        .units
        .insert(args.layer.clone(), UnitSource { kind: UnitKind::Sae, source: "synthetic".into() });
    spec.describe.neurons_per_task = args.neurons_per_task;
    let probe = tempfile::tempdir()?;
    for i in 0..args.images {
        std::fs::write(probe.path().join(format!("{i:07}.jpg")), b"")?;
    }
    let images = ProbeImages::discover(&probe.path().display().to_string()).await?;
    let units = BTreeMap::from([(tap, synthetic_dictionary(args.units, shape.tap_width(tap)))]);
    Ok((JobPlan::make(&spec, &shape, &units, &images)?, probe))
}

pub async fn units(args: UnitsArgs) -> anyhow::Result<()> {
    let store = Location::create("memory:///")?;
    let settings = Settings {
        lease: Duration::from_secs(60),
        heartbeat: Duration::from_secs(20),
        max_attempts: 3,
        resume_unfinished: false,
    };
    let coordinator = Coordinator::open(store.clone(), settings).await?;
    // What the job adds to a running coordinator: its plan and its scheduling state.
    let before = rss_mib();
    let started = Instant::now();
    let (plan, _probe) = plan(&args).await?;
    let plan_seconds = started.elapsed().as_secs_f64();
    let plan_json_bytes = serde_json::to_vec(&plan)?.len();
    let neuron_tasks = plan.neuron_tasks.clone();
    let job = "bench-units";
    coordinator.submit_simulated_plan(job, plan)?;
    let coordinator_rss_mib = rss_mib() - before;

    let server = Loopback::serve(&coordinator).await?;
    let scheduling = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..args.workers {
        let channel = server.client.connect().await?;
        workers.push(tokio::spawn(simulated_worker(channel, store.clone(), Duration::ZERO)));
    }
    wait_for_success(&coordinator, job, Duration::from_millis(2)).await?;
    let schedule_seconds = scheduling.elapsed().as_secs_f64();
    for w in workers {
        w.await??;
    }
    server.stop();

    // Every task's tables, committed as a worker's attempt, then compacted.
    let tasks = TaskStore::new(store.join("jobs/bench-units-results"));
    let source = synthetic_dictionary(0, 0).identity;
    let writing = Instant::now();
    let mut rows_written = 0;
    for task in &neuron_tasks {
        let tables = task_tables(task, args.described, &source);
        rows_written += rows(&tables);
        let dir = tasks.attempt_dir(task.id.as_str(), "a1")?;
        write_task(&dir, &tables).await?;
        tasks.commit(task.id.as_str(), "a1").await?;
    }
    let write_tasks_seconds = writing.elapsed().as_secs_f64();
    let compacting = Instant::now();
    let ids: Vec<String> = neuron_tasks.iter().map(|t| t.id.to_string()).collect();
    let written = tasks.compact(&ids).await?;
    let compact_seconds = compacting.elapsed().as_secs_f64();
    let job_dir = store.join("jobs/bench-units-results");
    let mut results_bytes = 0;
    for relative in &written {
        results_bytes += job_dir.get(relative).await?.len() as u64;
    }
    let encode_ms_per_batch = encoder_cost(&args)?;
    let report = UnitsReport {
        units: args.units,
        neuron_tasks: neuron_tasks.len(),
        plan_seconds,
        plan_json_bytes,
        coordinator_rss_mib,
        schedule_seconds,
        rows_written,
        write_tasks_seconds,
        compact_seconds,
        results_bytes,
        results_bytes_per_unit: results_bytes as f64 / args.units.max(1) as f64,
        encode_ms_per_batch,
    };
    println!(
        "{} units in {} tasks: plan {:.2} s ({:.2} MB as plan.json); coordinator +{:.1} MiB resident; scheduled on {} workers in {:.1} s; {} rows written in {:.1} s, compacted in {:.1} s to {:.2} MB of results ({:.0} bytes per unit)",
        report.units,
        report.neuron_tasks,
        report.plan_seconds,
        report.plan_json_bytes as f64 / 1e6,
        report.coordinator_rss_mib,
        args.workers,
        report.schedule_seconds,
        report.rows_written,
        report.write_tasks_seconds,
        report.compact_seconds,
        report.results_bytes as f64 / 1e6,
        report.results_bytes_per_unit
    );
    println!(
        "probe encoder, {} maps of {} x 7 x 7 into {} latents, then pooled: {}",
        args.encode_batch,
        args.encode_channels,
        args.encode_latents,
        report
            .encode_ms_per_batch
            .iter()
            .map(|(a, ms)| format!("{a} {ms:.0} ms"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
    }
    Ok(())
}

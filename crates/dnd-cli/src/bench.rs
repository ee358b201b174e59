//! `dnd bench quality`: how well dnd's labels recover the planted concepts of the zoo,
//! beside two baselines and dnd without concept selection, and how fast it runs.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};

use dnd_core::UnitKind;
use dnd_embedded::run_dissect;
use dnd_pipeline::job::UnitSource;
use dnd_pipeline::{JobSpec, NeuronSpec};
use dnd_quality::latents::{
    LatentScore, LatentSelection, chosen_latents, latent_groups, score_latents, select_latents,
};
use dnd_quality::{
    GroupScore, NeuronScore, QualityInputs, QualityReport, Speed, group_scores, score_planted,
};
use dnd_store::results::{CandidateRow, DescriptionRow};
use dnd_store::{Location, batches_rows, read_parquet};
use dnd_synth::{PlantedNeuron, ProbeSetSpec};

use crate::progress::Bars;
use crate::zoo_bench::ZooBenchJob;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Planted-concept recovery and CoSy-style AUC of dnd's labels on the synthetic zoo,
    /// per layer and neuron kind, beside Network-Dissection-style and CLIP-Dissect-style
    /// baselines and dnd without stage 3 (its first candidate); plus seconds per neuron
    /// with cold and warm caches. Prints a table; --json writes everything.
    Quality(QualityArgs),
    /// The coordinator's scheduling overhead: simulated workers (each task sleeps a set
    /// time) lease, commit and complete tasks over gRPC on loopback. Reports tasks per
    /// second and the makespan against the ideal (total work / workers).
    Scheduler(crate::bench_scheduler::SchedulerArgs),
    /// The HTML report at scale: writes a synthetic job of thousands of neurons, renders
    /// its report and times its index's load in headless Chromium (bench/report_load.py).
    Report(crate::report::BenchReportArgs),
    /// NeuronEval's sanity checks of `dnd evaluate`'s metrics on the zoo: how often each
    /// scores a planted concept above a narrower, a broader and a random one, and above
    /// each method's labels; and what evaluation costs beside the dissection.
    Evaluate(crate::bench_evaluate::EvaluateBenchArgs),
    /// What a restarted coordinator pays to find a job's committed tasks: N committed
    /// tasks written to a store, then found with one listing (and, with --compare, one
    /// marker read per task, as before).
    Restart(crate::bench_restart::RestartArgs),
    /// A real job under continuous failure: a coordinator and N worker processes on
    /// loopback, one of them SIGKILLed and restarted every T seconds, every store call
    /// failing at set rates. Checks every neuron is described once and every results
    /// table equals a clean run's row for row; reports kills, faults, retries, wasted
    /// task time and the makespan against the clean run.
    Chaos(crate::bench_chaos::ChaosArgs),
    /// What a whole dictionary costs the coordinator: a synthetic SAE of N latents (default
    /// 100k) planned as a real job, scheduled on simulated workers, its tasks' tables
    /// written with made-up rows and compacted. Reports plan time and size, coordinator
    /// memory, compaction time and results size.
    Units(crate::bench_units::UnitsArgs),
}

#[derive(Args)]
pub struct QualityArgs {
    /// The zoo's dissection job.
    #[arg(long, value_name = "FILE", default_value = "crates/dnd-synth/zoo/dissect.toml")]
    config: PathBuf,
    /// Where the benchmark's dissections and caches go.
    #[arg(long, value_name = "DIR", default_value = "out/bench-quality")]
    out: PathBuf,
    /// Also write the results as JSON.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Images rendered from each label for its CoSy-style AUC.
    #[arg(long, default_value_t = 32)]
    label_images: usize,
    /// Control images of the world for the AUC.
    #[arg(long, default_value_t = 256)]
    control_images: usize,
    /// Probe images the baselines see (the first ones of the job's probe set).
    #[arg(long, default_value_t = 500)]
    baseline_images: usize,
    /// An SAE (SAELens layout) on the target: per planted concept, its most selective
    /// latents are dissected too, and the report says which concepts a latent's label names.
    #[arg(long, value_name = "DIR", default_value = "crates/dnd-synth/zoo/sae")]
    sae: PathBuf,
    /// The layer the SAE reads.
    #[arg(long, default_value = "layer4")]
    sae_layer: String,
    /// Latents described per planted concept (0: no latents).
    #[arg(long, default_value_t = 3)]
    latents_per_concept: usize,
}

pub async fn bench(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Quality(args) => quality(args).await,
        BenchCommand::Scheduler(args) => crate::bench_scheduler::scheduler(args).await,
        BenchCommand::Report(args) => crate::report::bench(args).await,
        BenchCommand::Evaluate(args) => crate::bench_evaluate::evaluate_bench(args).await,
        BenchCommand::Restart(args) => crate::bench_restart::restart(args).await,
        BenchCommand::Chaos(args) => crate::bench_chaos::chaos(args).await,
        BenchCommand::Units(args) => crate::bench_units::units(args).await,
    }
}

async fn results<T: serde::de::DeserializeOwned>(
    job: &Path,
    table: &str,
) -> anyhow::Result<Vec<T>> {
    let location = Location::open(job.to_str().context("a UTF-8 path")?)?;
    Ok(batches_rows(table, &read_parquet(&location, &format!("results/{table}.parquet")).await?)?)
}

async fn quality(args: QualityArgs) -> anyhow::Result<()> {
    // Two dissections: cold (a new cache) and warm (the same cache, another job name).
    let ZooBenchJob { mut spec, probe_set, planted, nonce } =
        ZooBenchJob::open(&args.config, &args.out, "quality-cold")?;
    let cold = run_dissect(&spec, &Bars::new()).await?;
    spec.name = Some(format!("quality-warm-{nonce}"));
    let warm = run_dissect(&spec, &Bars::new()).await?;
    let job = args.out.join(format!("jobs/{}", cold.summary.job));
    let descriptions: Vec<DescriptionRow> = results(&job, "descriptions").await?;
    let candidates: Vec<CandidateRow> = results(&job, "candidates").await?;

    let probe_dir = args.out.join("probe-sets").join(probe_set.dir_name());
    let scores = score_planted(&QualityInputs {
        spec: &spec,
        probe_set: &probe_set,
        probe_dir: &probe_dir,
        planted: &planted,
        descriptions: &descriptions,
        candidates: &candidates,
        label_images: args.label_images,
        control_images: args.control_images,
        baseline_images: args.baseline_images,
    })?;
    let groups = group_scores(&scores);
    let speed = Speed {
        neurons: cold.summary.neurons,
        cold_seconds_per_neuron: cold.summary.seconds_per_neuron,
        warm_seconds_per_neuron: warm.summary.seconds_per_neuron,
        cold_cache_hit_rate: cold.summary.cache_hit_rate,
        warm_cache_hit_rate: warm.summary.cache_hit_rate,
    };
    print_report(&scores, &groups, &speed);
    let latents = if args.latents_per_concept > 0 {
        Some(latent_quality(&args, &spec, &probe_set, &planted, nonce).await?)
    } else {
        None
    };
    if let Some(path) = &args.json {
        let report = QualityReport {
            job: cold.summary.job.clone(),
            neurons: scores,
            groups,
            speed,
            latents,
        };
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("\nwritten: {}", path.display());
    }
    Ok(())
}

/// The SAE's side of the benchmark: per planted concept the latents most selective for
/// it, dissected in a job of their own (the same cache as the channels'), then scored.
async fn latent_quality(
    args: &QualityArgs,
    spec: &JobSpec,
    probe_set: &ProbeSetSpec,
    planted: &[PlantedNeuron],
    nonce: u64,
) -> anyhow::Result<Vec<LatentScore>> {
    let sae = args.sae.to_str().context("the SAE's path is not UTF-8")?;
    let concepts = select_latents(
        &LatentSelection {
            target: &spec.target.model,
            sae: &args.sae,
            layer: &args.sae_layer,
            per_concept: args.latents_per_concept,
            concept_images: args.label_images,
            control_images: args.control_images,
            size: probe_set.size,
            device: &spec.device,
        },
        planted,
    )?;
    let ids: Vec<String> = chosen_latents(&concepts).iter().map(ToString::to_string).collect();
    let mut job = spec.clone();
    job.name = Some(format!("quality-latents-{nonce}"));
    job.target.layers = vec![args.sae_layer.clone()];
    job.target.neurons = NeuronSpec::Every(ids.join(","));
    job.target.units =
        [(args.sae_layer.clone(), UnitSource { kind: UnitKind::Sae, source: sae.to_string() })]
            .into();
    let dissection = run_dissect(&job, &Bars::new()).await?;
    let descriptions: Vec<DescriptionRow> =
        results(&args.out.join(format!("jobs/{}", dissection.summary.job)), "descriptions").await?;
    let scores = score_latents(&concepts, planted, &descriptions);
    print_latents(&scores, &args.sae);
    Ok(scores)
}

fn print_latents(scores: &[LatentScore], sae: &Path) {
    println!(
        "
the SAE {}: its latents most selective for each planted concept (AUC), as dnd labels them",
        sae.display()
    );
    for s in scores {
        let latents: Vec<String> = s
            .latents
            .iter()
            .map(|l| {
                let label = l.label.clone().unwrap_or_else(|| l.status.clone());
                format!(
                    "{}{} {label:?} ({:.2})",
                    if l.names_it { "+" } else { "" },
                    l.latent,
                    l.auc
                )
            })
            .collect();
        println!("{:<7} {:>6}  {:<44} {}", s.layer, s.neuron, s.truth, latents.join(", "));
    }
    let groups: Vec<String> =
        latent_groups(scores).iter().map(|(k, n, of)| format!("{k} {n} of {of}")).collect();
    println!("planted concepts a latent's label names: {}", groups.join(", "));
}

fn print_report(scores: &[NeuronScore], groups: &[GroupScore], speed: &Speed) {
    let pct = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{:.0}%", 100.0 * v));
    let num = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
    println!(
        "{:<7} {:>6}  {:<44} {:<26} {:<26} {:>5}",
        "layer", "neuron", "truth", "dnd label", "dnd first candidate", "auc"
    );
    for s in scores {
        let label = |m: &str| s.labels[m].clone().unwrap_or_else(|| "-".into());
        let mark = |m: &str| match s.recovered[m] {
            Some(true) => "+",
            Some(false) => " ",
            None => "",
        };
        println!(
            "{:<7} {:>6}  {:<44} {:<26} {:<26} {:>5}",
            s.layer,
            s.neuron,
            s.truth,
            format!("{}{}", mark("dnd"), label("dnd")),
            format!("{}{}", mark("dnd-first"), label("dnd-first")),
            num(s.auc["dnd"])
        );
    }
    println!("\n(+ = names the planted concept)\n");
    println!(
        "recovery (share of neurons whose label names the planted concept) and mean CoSy-style AUC"
    );
    println!(
        "{:<7} {:<8} {:>3}   {:>6} {:>9} {:>10} {:>12}   {:>6} {:>9} {:>10} {:>12} {:>6}",
        "layer",
        "kind",
        "n",
        "dnd",
        "dnd-first",
        "netdissect",
        "clip-dissect",
        "dnd",
        "dnd-first",
        "netdissect",
        "clip-dissect",
        "truth"
    );
    for g in groups {
        println!(
            "{:<7} {:<8} {:>3}   {:>6} {:>9} {:>10} {:>12}   {:>6} {:>9} {:>10} {:>12} {:>6}",
            g.layer,
            g.kind,
            g.neurons,
            pct(g.recovery["dnd"]),
            pct(g.recovery["dnd-first"]),
            pct(g.recovery["netdissect"]),
            pct(g.recovery["clip-dissect"]),
            num(g.mean_auc["dnd"]),
            num(g.mean_auc["dnd-first"]),
            num(g.mean_auc["netdissect"]),
            num(g.mean_auc["clip-dissect"]),
            num(g.mean_auc["truth"]),
        );
    }
    println!(
        "\nspeed: {} neurons, {:.3} s/neuron cold ({:.0}% from cache), {:.3} s/neuron warm ({:.0}% from cache)",
        speed.neurons,
        speed.cold_seconds_per_neuron,
        100.0 * speed.cold_cache_hit_rate,
        speed.warm_seconds_per_neuron,
        100.0 * speed.warm_cache_hit_rate
    );
}

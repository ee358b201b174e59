//! `dnd bench evaluate`: which of `dnd evaluate`'s metrics this implementation can trust,
//! by NeuronEval's sanity checks on the zoo, and what evaluation costs beside the
//! dissection. Every planted neuron's truth, a narrower, a broader and a random concept
//! (`dnd_quality::sanity`) and every method's label are scored by `dnd evaluate`; a metric
//! passes when the truth wins its comparisons.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use serde::Serialize;

use dnd_core::evaluation::EvaluationConfig;
use dnd_embedded::run_dissect;
use dnd_pipeline::{JobDir, LabelSource, NoProgress, evaluate_job};
use dnd_quality::sanity::{CONTROLS, MetricCheck, perturb, sanity_checks};
use dnd_quality::{QualityInputs, score_planted};
use dnd_store::Location;
use dnd_store::results::{CandidateRow, DescriptionRow, EvaluationRow, ResultTable};

use crate::progress::Bars;
use crate::zoo_bench::ZooBenchJob;

/// The methods whose labels are scored beside the truth and its controls.
const METHODS: [&str; 4] = ["dnd", "dnd-first", "netdissect", "clip-dissect"];

#[derive(Args)]
pub struct EvaluateBenchArgs {
    /// The zoo's dissection job.
    #[arg(long, value_name = "FILE", default_value = "crates/dnd-synth/zoo/dissect.toml")]
    config: PathBuf,
    /// Where the benchmark's dissection, labels files and caches go.
    #[arg(long, value_name = "DIR", default_value = "out/bench-evaluate")]
    out: PathBuf,
    /// Also write the results as JSON.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Probe images the Network-Dissection and CLIP-Dissect baselines see.
    #[arg(long, default_value_t = 500)]
    baseline_images: usize,
    /// Bootstrap resamples per interval (the checks use the values, not the intervals).
    #[arg(long, default_value_t = 0)]
    bootstrap: usize,
}

#[derive(Debug, Serialize)]
struct EvaluateBenchReport {
    job: String,
    planted_neurons: usize,
    dissect_seconds: f64,
    /// `dnd evaluate` of the job's own labels right after the cold dissection.
    evaluate_seconds: f64,
    checks: Vec<MetricCheck>,
}

pub async fn evaluate_bench(args: EvaluateBenchArgs) -> anyhow::Result<()> {
    let ZooBenchJob { mut spec, probe_set, planted, nonce } =
        ZooBenchJob::open(&args.config, &args.out, "evaluate")?;
    spec.evaluate = None;

    let started = Instant::now();
    let dissection = run_dissect(&spec, &Bars::new()).await?;
    let dissect_seconds = started.elapsed().as_secs_f64();
    let job = args.out.join(format!("jobs/{}", dissection.summary.job));
    let dir = JobDir::new(Location::open(job.to_str().context("a UTF-8 path")?)?);
    let config = EvaluationConfig { bootstrap: args.bootstrap, ..EvaluationConfig::default() };
    let started = Instant::now();
    evaluate_job(dir.clone(), &LabelSource::Job, &config, &Bars::new()).await?;
    let evaluate_seconds = started.elapsed().as_secs_f64();

    // The baselines' labels (and dnd-first's), as the quality benchmark makes them.
    let descriptions: Vec<DescriptionRow> = dir.results(ResultTable::Descriptions).await?;
    let candidates: Vec<CandidateRow> = dir.results(ResultTable::Candidates).await?;
    let probe_dir = args.out.join("probe-sets").join(probe_set.dir_name());
    let scores = score_planted(&QualityInputs {
        spec: &spec,
        probe_set: &probe_set,
        probe_dir: &probe_dir,
        planted: &planted,
        descriptions: &descriptions,
        candidates: &candidates,
        label_images: 1,
        control_images: 2,
        baseline_images: args.baseline_images,
    })?;
    let mut files: Vec<(&str, String)> = ["truth", "narrower", "broader", "random"]
        .into_iter()
        .chain(METHODS.into_iter().skip(1))
        .map(|m| (m, String::from("layer,neuron,label\n")))
        .collect();
    for s in &scores {
        let Some(p) = planted.iter().find(|p| p.layer == s.layer && p.neuron == s.neuron) else {
            continue;
        };
        let Some(controls) = perturb(p, s.neuron as u64) else { continue };
        for (method, csv) in &mut files {
            let label = match *method {
                "truth" => Some(p.description.clone()),
                "narrower" => Some(controls.narrower.clone()),
                "broader" => Some(controls.broader.clone()),
                "random" => Some(controls.random.clone()),
                other => s.labels.get(other).cloned().flatten(),
            };
            if let Some(label) = label {
                let _ =
                    writeln!(csv, "{},{},\"{}\"", s.layer, s.neuron, label.replace('"', "\"\""));
            }
        }
    }
    let labels_dir = args.out.join(format!("labels-{nonce}"));
    std::fs::create_dir_all(&labels_dir)
        .with_context(|| format!("creating {}", labels_dir.display()))?;
    for (method, csv) in &files {
        let path = labels_dir.join(format!("{method}.csv"));
        std::fs::write(&path, csv).with_context(|| format!("writing {}", path.display()))?;
        let source = LabelSource::File(path.display().to_string());
        evaluate_job(dir.clone(), &source, &config, &NoProgress).await?;
    }

    let rows: Vec<EvaluationRow> = dir.results(ResultTable::Evaluation).await?;
    let sources: Vec<&str> = ["truth"].into_iter().chain(CONTROLS).chain(METHODS).collect();
    let checks = sanity_checks(&rows, &sources);
    let report = EvaluateBenchReport {
        job: dissection.summary.job.clone(),
        planted_neurons: scores.len(),
        dissect_seconds,
        evaluate_seconds,
        checks,
    };
    print_report(&report);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("\nwritten: {}", path.display());
    }
    Ok(())
}

fn print_report(r: &EvaluateBenchReport) {
    println!(
        "{} planted neurons; share of them whose truth scores above each label (best label of each method)",
        r.planted_neurons
    );
    let columns: Vec<&str> = CONTROLS.into_iter().chain(METHODS).collect();
    let mut header = format!("{:<12} {:>6}", "metric", "q");
    for c in &columns {
        let _ = write!(header, " {c:>12}");
    }
    println!("{header}   passes");
    for check in &r.checks {
        let q = check.quantile.map_or("-".to_string(), |q| format!("{q}"));
        let mut line = format!("{:<12} {:>6}", check.metric, q);
        for c in &columns {
            let cell = check
                .truth_wins
                .get(*c)
                .filter(|(_, n)| *n > 0)
                .map_or("-".to_string(), |(share, _)| format!("{:.0}%", 100.0 * share));
            let _ = write!(line, " {cell:>12}");
        }
        println!("{line}   {}", if check.passes { "yes" } else { "no" });
    }
    println!("\nmean value per source");
    let sources: Vec<&str> = ["truth"].into_iter().chain(columns.iter().copied()).collect();
    let mut header = format!("{:<12} {:>6}", "metric", "q");
    for s in &sources {
        let _ = write!(header, " {s:>12}");
    }
    println!("{header}");
    for check in &r.checks {
        let q = check.quantile.map_or("-".to_string(), |q| format!("{q}"));
        let mut line = format!("{:<12} {:>6}", check.metric, q);
        for s in &sources {
            let cell = check.mean.get(*s).map_or("-".to_string(), |v| format!("{v:.3}"));
            let _ = write!(line, " {cell:>12}");
        }
        println!("{line}");
    }
    println!(
        "\ncost: dissection {:.1} s, dnd evaluate of its labels {:.1} s (+{:.0}%)",
        r.dissect_seconds,
        r.evaluate_seconds,
        100.0 * r.evaluate_seconds / r.dissect_seconds.max(1e-9)
    );
}

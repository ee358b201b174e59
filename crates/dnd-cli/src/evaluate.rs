//! `dnd evaluate`: scores a finished job's labels (or a labels file's) against the neurons
//! they describe, into `results/evaluation.parquet`.

use clap::Args;

use dnd_core::evaluation::EvaluationConfig;
use dnd_pipeline::{JobDir, LabelSource, evaluate_job};
use dnd_report::find_job;

use crate::progress::Bars;

#[derive(Args)]
pub struct EvaluateArgs {
    /// The job directory `dnd dissect` wrote (<out>/jobs/<name>), local or an object store
    /// URL; an --out holding a single job will do.
    #[arg(value_name = "JOB DIR|URL")]
    pub job: String,

    /// Score these labels instead of the job's own: a .csv or .parquet file with layer,
    /// neuron and label columns (a neuron's rows in file order are its labels 1, 2, 3).
    #[arg(long, value_name = "FILE")]
    pub labels: Option<String>,

    /// Top shares of the probe set that count as firing, for AUPRC, F1 and IoU
    /// (default: the job's [evaluate], else 0.005,0.05).
    #[arg(long, value_delimiter = ',', value_name = "Q,...")]
    pub quantiles: Option<Vec<f64>>,

    /// Images generated from each label for CoSy (0: no CoSy).
    #[arg(long, value_name = "N")]
    pub generated_images: Option<usize>,

    /// Random probe images the generated ones are compared with.
    #[arg(long, value_name = "N")]
    pub control_images: Option<usize>,

    /// Bootstrap resamples per confidence interval (0: none).
    #[arg(long, value_name = "N")]
    pub bootstrap: Option<usize>,

    /// Labels per neuron to score (1-3, best first).
    #[arg(long, value_name = "N")]
    pub labels_per_neuron: Option<usize>,
}

impl EvaluateArgs {
    /// The job's `[evaluate]` settings (or the defaults) with the flags applied.
    fn config(&self, from_job: Option<EvaluationConfig>) -> EvaluationConfig {
        let mut c = from_job.unwrap_or_default();
        if let Some(q) = &self.quantiles {
            c.quantiles = q.clone();
        }
        c.generated_images = self.generated_images.unwrap_or(c.generated_images);
        c.control_images = self.control_images.unwrap_or(c.control_images);
        c.bootstrap = self.bootstrap.unwrap_or(c.bootstrap);
        c.labels = self.labels_per_neuron.unwrap_or(c.labels);
        c
    }
}

pub async fn evaluate(args: EvaluateArgs) -> anyhow::Result<()> {
    let location = find_job(&args.job).await?;
    let dir = JobDir::new(location);
    let (_, spec) = dir.spec().await?;
    let config = args.config(spec.evaluate.clone());
    let source = match &args.labels {
        Some(file) => LabelSource::File(file.clone()),
        None => LabelSource::Job,
    };
    let bars = Bars::new();
    let outcome = evaluate_job(dir, &source, &config, &bars).await?;
    drop(bars);
    println!(
        "evaluated {} labels of {} neurons ({}): {} rows in {:.1}s{}",
        outcome.labels,
        outcome.neurons,
        outcome.source,
        outcome.rows,
        outcome.seconds,
        if outcome.batches_resumed > 0 {
            format!(", {} batches resumed", outcome.batches_resumed)
        } else {
            String::new()
        }
    );
    println!(
        "model calls: {} images generated, {} activations and embeddings computed (the rest from the cache)",
        outcome.images_generated, outcome.vectors_computed
    );
    println!("results: {}", outcome.table);
    Ok(())
}

//! `dnd dissect`: a whole dissection in this process (stages 0-3), from a job file and/or
//! flags, ending with a table of every neuron's label.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use dnd_embedded::run_dissect;
use dnd_pipeline::{JobSpec, NeuronSpec};
use dnd_summarize::Backend;

use crate::BadInput;
use crate::progress::Bars;

#[derive(Args)]
pub struct DissectArgs {
    /// The job file (TOML): every setting of the method, see docs/job.md. Flags below
    /// override its fields.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// The target model: a directory with model.safetensors, or hf:<org>/<name>[@rev].
    #[arg(long, value_name = "PATH|hf:REPO")]
    pub model: Option<String>,

    /// Layers to describe, comma-separated, e.g. layer4,fc.
    #[arg(long, value_delimiter = ',')]
    pub layers: Option<Vec<String>>,

    /// Neurons, e.g. 0..64,100 for every layer, or LAYER=IDS per layer (repeat the flag),
    /// e.g. --neurons layer4=0..8 --neurons fc=all. Ranges are end-exclusive.
    #[arg(long, value_name = "[LAYER=]IDS")]
    pub neurons: Vec<String>,

    /// Probe images: a directory, an object store URL prefix, or a .txt/.csv list.
    #[arg(long, value_name = "DIR|URL|LIST")]
    pub images: Option<String>,

    /// Where results go: a directory or an object store URL (jobs/<name>/ and cache/ inside).
    #[arg(long, value_name = "DIR|URL")]
    pub out: Option<String>,

    /// The job's name (default: derived from its settings; the same name resumes the job).
    #[arg(long)]
    pub name: Option<String>,

    /// The cache location (default <out>/cache).
    #[arg(long, value_name = "DIR|URL")]
    pub cache: Option<String>,

    /// The captioner (BLIP) checkpoint.
    #[arg(long, value_name = "PATH|hf:REPO")]
    pub captioner: Option<String>,

    /// The text-to-image (Stable Diffusion) checkpoint.
    #[arg(long, value_name = "PATH|hf:REPO")]
    pub generator: Option<String>,

    /// The image embedder (CLIP) checkpoint.
    #[arg(long, value_name = "PATH|hf:REPO")]
    pub embedder: Option<String>,

    /// The summariser: openai, local or consensus (offline, no language model).
    #[arg(long)]
    pub summarizer: Option<String>,

    /// Seeds the summary shuffles and the generated images.
    #[arg(long)]
    pub seed: Option<u64>,

    /// cpu, cuda or cuda:N.
    #[arg(long)]
    pub device: Option<String>,

    /// Compute threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,

    /// Also write the run summary to this local file (JSON).
    #[arg(long, value_name = "FILE")]
    pub summary_json: Option<PathBuf>,
}

pub(crate) fn neuron_spec(flags: &[String]) -> Result<NeuronSpec, BadInput> {
    if let [single] = flags
        && !single.contains('=')
    {
        return Ok(NeuronSpec::Every(single.clone()));
    }
    let mut per_layer = BTreeMap::new();
    for flag in flags {
        let (layer, ids) = flag.split_once('=').ok_or_else(|| {
            BadInput(format!("--neurons `{flag}`: with several --neurons flags, write each as LAYER=IDS, e.g. layer4=0..8"))
        })?;
        per_layer.insert(layer.trim().to_string(), ids.trim().to_string());
    }
    Ok(NeuronSpec::PerLayer(per_layer))
}

/// The job file with the flags applied.
pub fn job_spec(args: &DissectArgs) -> anyhow::Result<JobSpec> {
    let mut spec = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                BadInput(format!("cannot read the job file {}: {e}", path.display()))
            })?;
            JobSpec::from_toml(&text, &path.display().to_string())?
        }
        None => JobSpec::default(),
    };
    let set = |field: &mut String, value: &Option<String>| {
        if let Some(v) = value {
            *field = v.clone();
        }
    };
    set(&mut spec.target.model, &args.model);
    set(&mut spec.probe.images, &args.images);
    set(&mut spec.out, &args.out);
    set(&mut spec.captioner.model, &args.captioner);
    set(&mut spec.generator.model, &args.generator);
    set(&mut spec.embedder.model, &args.embedder);
    set(&mut spec.device, &args.device);
    if let Some(layers) = &args.layers {
        spec.target.layers = layers.clone();
    }
    if !args.neurons.is_empty() {
        spec.target.neurons = neuron_spec(&args.neurons)?;
    }
    if args.name.is_some() {
        spec.name = args.name.clone();
    }
    if args.cache.is_some() {
        spec.cache = args.cache.clone();
    }
    if let Some(seed) = args.seed {
        spec.seed = seed;
    }
    if let Some(backend) = &args.summarizer {
        spec.summarizer.backend =
            serde_json::from_value::<Backend>(serde_json::Value::String(backend.clone())).map_err(
                |_| BadInput(format!("--summarizer `{backend}`: use openai, local or consensus")),
            )?;
    }
    Ok(spec)
}

pub async fn dissect(args: DissectArgs) -> anyhow::Result<()> {
    let spec = job_spec(&args)?;
    let bars = Bars::new();
    let outcome = run_dissect(&spec, &bars).await?;
    drop(bars);
    let s = &outcome.summary;
    if let Some(path) = &args.summary_json {
        std::fs::write(path, serde_json::to_string_pretty(s)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }

    // A model that knows what its neurons mean (the synthetic zoo's planted.json) gets a
    // ground-truth column.
    let truth = crate::report::ground_truth(&spec);
    let rows: Vec<[String; 5]> = outcome
        .descriptions
        .iter()
        .map(|d| {
            let label = match (&d.label, &d.error) {
                (Some(l), _) => l.clone(),
                (None, Some(e)) => format!("(failed: {})", e.chars().take(60).collect::<String>()),
                (None, None) => format!("({})", d.status.as_str().replace('_', " ")),
            };
            let known = truth.get(&(d.layer.clone(), d.neuron)).cloned().unwrap_or_default();
            [
                d.layer.to_string(),
                d.neuron.to_string(),
                label,
                d.score.map_or("-".into(), |v| format!("{v:.3}")),
                known,
            ]
        })
        .collect();
    // The column only when some described neuron has a known meaning.
    let columns = if rows.iter().all(|r| r[4].is_empty()) { 4 } else { 5 };
    let header = ["layer", "neuron", "label", "score", "ground truth"];
    let width = |c: usize| {
        rows.iter().map(|r| r[c].chars().count()).chain([header[c].len()]).max().unwrap_or(0)
    };
    let widths: Vec<usize> = (0..5).map(width).collect();
    let line = |r: [&str; 5]| {
        let text = format!(
            "{:<w0$}  {:>w1$}  {:<w2$}  {:>w3$}  {}",
            r[0],
            r[1],
            r[2],
            r[3],
            if columns == 5 { r[4] } else { "" },
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2],
            w3 = widths[3]
        );
        text.trim_end().to_string()
    };
    println!("{}", line(header));
    for r in &rows {
        println!("{}", line([&r[0], &r[1], &r[2], &r[3], &r[4]]));
    }
    println!();
    println!(
        "{} neurons: {} labelled, {} without candidates, {} failed; {} of {} tasks resumed from an earlier run",
        s.neurons,
        s.neurons_ok,
        s.neurons_no_candidates,
        s.neurons_failed,
        s.tasks_resumed,
        s.tasks
    );
    let calls = |k: &str| s.cache.get(k).map_or((0, 0), |c| (c.hits, c.misses));
    let (ih, im) = calls("images");
    let (ch, cm) = calls("captions");
    let (rh, rm) = calls("replies");
    println!(
        "cache: {ih} images, {ch} captions, {rh} LLM replies reused; {im} images generated, {cm} captions and {rm} replies computed ({:.0}% reused)",
        100.0 * s.cache_hit_rate
    );
    println!(
        "time: {:.1}s total (load {:.1}s, probe {:.1}s, describe {:.1}s = {:.2}s per neuron), peak memory {:.0} MiB",
        s.total_seconds,
        s.load_seconds,
        s.probe_seconds,
        s.describe_seconds,
        s.seconds_per_neuron,
        s.peak_rss_mib
    );
    println!(
        "results: {}/results/ (descriptions, candidates, scores, captions, images, exchanges, errors, evaluation .parquet)",
        s.location
    );
    crate::report::after_dissect(&s.location).await;
    Ok(())
}

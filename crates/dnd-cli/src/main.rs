//! `dnd`: describe what each neuron of a vision network does.

// The argument structs' doc comments are clap's --help text, not Markdown: `hf:<org>/<name>`
// and `[openai]` are what a user types, not HTML tags or links.
#![allow(rustdoc::invalid_html_tags, rustdoc::broken_intra_doc_links)]

mod bench;
mod bench_chaos;
mod bench_evaluate;
mod bench_restart;
mod bench_scheduler;
mod bench_units;
mod chaos_check;
mod chaos_cluster;
mod cluster;
mod dissect;
mod evaluate;
mod progress;
mod report;
mod stages;
mod synth;
mod zoo_bench;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use dnd_core::{CropConfig, NeuronSet, Pooling};
use dnd_models::device::parse_device;
use dnd_models::{ModelRef, TargetModel};
use dnd_pipeline::{
    CropStageConfig, ImageLimits, PipelineError, ProbeConfig, ProbeImages, run_probe,
};
use dnd_store::Location;

/// Exit code for bad input: a path, a flag value, a model or a config the user can fix.
const EXIT_BAD_INPUT: u8 = 2;
/// Exit code for a failure inside dnd.
const EXIT_INTERNAL: u8 = 1;

#[derive(Parser)]
#[command(
    name = "dnd",
    version,
    about = "Describe-and-Dissect: explain in plain language what each neuron of a vision network does",
    long_about = "Describe-and-Dissect: explain in plain language what each neuron of a vision network does.\n\n\
        Exit codes: 0 success, 2 bad input (a path, flag, model or config to fix), 1 internal failure.\n\
        Logs go to stderr; set RUST_LOG=debug for more."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Stage 0 (and optionally 1): find each neuron's most activating probe images, and
    /// crop them to where the neuron fires.
    ///
    /// Writes under --out: topk/<layer>.parquet (per neuron, its top-K images),
    /// errors.parquet (skipped inputs and why), probe.json (what ran), and with --crops
    /// crops/<layer>.parquet, with --activations activations/<layer>/part-*.parquet.
    /// Schemas: docs/schema.md.
    Probe(ProbeArgs),

    /// Caption images with a BLIP checkpoint (stage 2's captioner), batched greedy decoding.
    ///
    /// Prints one line per image: its path, a tab, its caption.
    Caption(stages::CaptionArgs),

    /// Embed images and texts with a CLIP checkpoint (stage 3's similarity model).
    ///
    /// Prints one JSON object per line: {"kind": "image"|"text", "input": ..., "embedding": [...]}
    /// (L2-normalised), then, with both images and texts, their cosine similarities.
    Embed(stages::EmbedArgs),

    /// Generate images from a prompt with a Stable Diffusion checkpoint (stage 3's generator).
    ///
    /// Writes <out>/<slug>-<seed>.png for seeds seed..seed+count.
    Generate(stages::GenerateArgs),

    /// Turn captions into candidate concepts (stage 2's language step): each caption is
    /// simplified to a short label, then the labels are summarised over seeded shuffles.
    ///
    /// Prints the candidate concepts, one per line; --exchanges keeps every request and reply.
    Summarize(stages::SummarizeArgs),

    /// Describe neurons end to end (stages 0-3) in this process: probe, crop, caption,
    /// summarise, generate, score. Resumable: the same job name skips committed tasks.
    ///
    /// Writes under --out: jobs/<name>/results/{descriptions,candidates,scores,captions,
    /// images,exchanges,errors}.parquet (schemas: docs/schema.md), jobs/<name>/summary.json,
    /// and the shared cache/ of generated images, captions and LLM replies.
    Dissect(dissect::DissectArgs),

    /// Write a static HTML report of a dissection: an index of every neuron (sortable,
    /// filterable) and a page per neuron with its top images, crop boxes, captions,
    /// candidates and generated images. Opens from a local directory, no server needed.
    Report(report::ReportArgs),

    /// Score each label of a finished job against the neuron it describes: simulation
    /// correlation over the whole probe set, AUPRC, F1 and IoU at top shares, CoSy's AUC
    /// and MAD on images generated from the label, each with a bootstrap interval.
    ///
    /// Writes <job>/results/evaluation.parquet (docs/schema.md); --labels scores another
    /// method's labels. Resumable; every model call goes through the job's caches.
    Evaluate(evaluate::EvaluateArgs),

    /// Serve jobs to workers over gRPC (the distributed mode): plans submitted jobs into
    /// tasks, leases them, retries failures, merges and compacts results in --store, and
    /// resumes unfinished jobs found there on start. Prints the address it listens on.
    Coordinator(cluster::CoordinatorArgs),

    /// Run tasks for a coordinator: loads each job's models once, keeps them resident,
    /// and on SIGTERM finishes or hands back its current task.
    Worker(cluster::WorkerArgs),

    /// Submit a job file to a coordinator (resubmitting a job resumes it).
    Submit(cluster::SubmitArgs),

    /// Show a job's state and progress.
    Status(cluster::JobArgs),

    /// Follow a job until it ends: a progress bar per stage, its events as log lines.
    Watch(cluster::JobArgs),

    /// Cancel a job: queued tasks are dropped, running ones stop at their next heartbeat.
    Cancel(cluster::JobArgs),

    /// List the coordinator's jobs.
    List(cluster::ListArgs),

    /// The synthetic world: render probe sets, train the zoo.
    #[command(subcommand)]
    Synth(synth::SynthCommand),

    /// Benchmarks: `dnd bench quality` scores labels against the zoo's planted concepts.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

#[derive(Args)]
struct ProbeArgs {
    /// The target model: a directory with model.safetensors (a torchvision/timm ResNet,
    /// or a ViT: torchvision, timm, Hugging Face CLIP or DINOv2) and optionally
    /// config.json, a .safetensors file, or hf:<org>/<name>[@rev] from the Hugging Face
    /// hub cache (e.g. hf:timm/resnet50.tv_in1k).
    #[arg(long, value_name = "PATH|hf:REPO")]
    model: String,

    /// Probe images: a directory (flat or one folder per class), an object store URL
    /// prefix (s3://, gs://, az://, file://), or a .txt/.csv list of paths or URLs.
    /// JPEG, PNG and WebP are read; other files are ignored.
    #[arg(long, value_name = "DIR|URL|LIST")]
    images: String,

    /// Layers to record, comma-separated: stem, layer1, layer2, layer3, layer4, avgpool, fc
    /// (ResNet); blocks.N, blocks.N.mlp, norm, head (ViT).
    #[arg(long, value_delimiter = ',', default_value = "layer4")]
    layers: Vec<String>,

    /// Images kept per neuron.
    #[arg(long, default_value_t = 10)]
    top_k: usize,

    /// How a channel's spatial map becomes one number per image: mean or max, or cls
    /// (a ViT's class token instead of its patch grid).
    #[arg(long, default_value = "mean")]
    pooling: Pooling,

    /// Images per forward pass.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,

    /// Also cut attention crops of each neuron's top images (spatial layers only).
    #[arg(long)]
    crops: bool,

    /// Only crop for these neurons, e.g. 0..64,100 (ranges are end-exclusive).
    #[arg(long, value_name = "IDS", requires = "crops")]
    crop_neurons: Option<NeuronSet>,

    /// Also write every pooled activation (images x neurons floats per layer).
    #[arg(long)]
    activations: bool,

    /// Where results go: a directory (created if missing) or an object store URL.
    #[arg(long, value_name = "DIR|URL")]
    out: String,

    /// cpu, cuda or cuda:N (CUDA needs a build with --features cuda).
    #[arg(long, default_value = "cpu")]
    device: String,

    /// Compute threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,

    /// Skip image files with more pixels than this (decompression bombs).
    #[arg(long, default_value_t = ImageLimits::default().max_pixels)]
    max_pixels: u64,

    /// Also write the run summary (probe.json) to this local file.
    #[arg(long, value_name = "FILE")]
    summary_json: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { ExitCode::from(EXIT_BAD_INPUT) } else { ExitCode::SUCCESS };
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();

    let threads = match &cli.command {
        Command::Probe(a) => a.threads,
        Command::Caption(a) => a.common.threads,
        Command::Embed(a) => a.common.threads,
        Command::Generate(a) => a.common.threads,
        Command::Summarize(_) => None,
        Command::Dissect(a) => a.threads,
        Command::Worker(a) => a.threads,
        Command::Synth(_)
        | Command::Report(_)
        | Command::Evaluate(_)
        | Command::Bench(_)
        | Command::Coordinator(_)
        | Command::Submit(_)
        | Command::Status(_)
        | Command::Watch(_)
        | Command::Cancel(_)
        | Command::List(_) => None,
    };
    if let Err(e) = install_store_faults() {
        eprintln!("error: {e}");
        return ExitCode::from(EXIT_BAD_INPUT);
    }
    if let Command::Synth(synth::SynthCommand::Train(args)) = &cli.command {
        synth::prepare_training_process(args);
    }
    if let Some(n) = threads {
        // Before any thread pool exists: rayon and candle both read this variable.
        // SAFETY: no other thread runs yet.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", n.max(1).to_string()) };
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_INTERNAL);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Probe(args) => probe(args).await,
            Command::Caption(args) => stages::caption(args).await,
            Command::Embed(args) => stages::embed(args).await,
            Command::Generate(args) => stages::generate(args).await,
            Command::Summarize(args) => stages::summarize(args).await,
            Command::Dissect(args) => dissect::dissect(args).await,
            Command::Report(args) => report::report(args).await,
            Command::Evaluate(args) => evaluate::evaluate(args).await,
            Command::Coordinator(args) => cluster::coordinator(args).await,
            Command::Worker(args) => cluster::worker(args).await,
            Command::Submit(args) => cluster::submit(args).await,
            Command::Status(args) => cluster::status(args).await,
            Command::Watch(args) => cluster::watch_job(args).await,
            Command::Cancel(args) => cluster::cancel(args).await,
            Command::List(args) => cluster::list(args).await,
            Command::Synth(command) => tokio::task::block_in_place(|| synth::synth(command)),
            Command::Bench(command) => bench::bench(command).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            if is_user_error(&e) {
                ExitCode::from(EXIT_BAD_INPUT)
            } else {
                ExitCode::from(EXIT_INTERNAL)
            }
        }
    }
}

/// Chaos testing only (`dnd bench chaos` sets it for its coordinator and workers): with
/// `DND_STORE_FAULTS` set, every store this process opens fails a share of its calls.
fn install_store_faults() -> Result<(), String> {
    use dnd_store::faults::{FAULTS_ENV, FaultConfig, install};
    let Some(text) = std::env::var_os(FAULTS_ENV) else { return Ok(()) };
    let text = text.to_str().ok_or_else(|| format!("{FAULTS_ENV} is not UTF-8"))?;
    if !text.trim().is_empty() {
        install(text.parse::<FaultConfig>().map_err(|e| format!("{FAULTS_ENV}: {e}"))?);
    }
    Ok(())
}

/// A problem with something the user gave on the command line (a file, a value).
#[derive(Debug)]
pub struct BadInput(pub String);

impl std::fmt::Display for BadInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BadInput {}

fn is_user_error(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        if cause.downcast_ref::<BadInput>().is_some() {
            return true;
        }
        if let Some(p) = cause.downcast_ref::<PipelineError>() {
            return p.is_user_error();
        }
        if let Some(m) = cause.downcast_ref::<dnd_models::ModelError>() {
            return m.is_user_error();
        }
        if let Some(s) = cause.downcast_ref::<dnd_store::StoreError>() {
            return s.is_user_error();
        }
        if let Some(c) = cause.downcast_ref::<dnd_coordinator::CoordinatorError>() {
            return c.is_user_error();
        }
        if cause.downcast_ref::<dnd_proto::TransportError>().is_some()
            || cause.downcast_ref::<dnd_proto::TokenError>().is_some()
        {
            return true;
        }
        if let Some(r) = cause.downcast_ref::<dnd_report::ReportError>() {
            return r.is_user_error();
        }
        if let Some(s) = cause.downcast_ref::<dnd_summarize::SummarizeError>() {
            return s.is_user_error();
        }
        cause.downcast_ref::<dnd_core::CoreError>().is_some()
    })
}

async fn probe(args: ProbeArgs) -> anyhow::Result<()> {
    let config = ProbeConfig {
        layers: args.layers,
        top_k: args.top_k,
        pooling: args.pooling,
        batch_size: args.batch_size,
        write_activations: args.activations,
        crops: args
            .crops
            .then(|| CropStageConfig { crop: CropConfig::default(), neurons: args.crop_neurons }),
        limits: ImageLimits { max_pixels: args.max_pixels, ..ImageLimits::default() },
        liveness: Default::default(),
    };
    // Everything a user gave is checked before any work starts.
    let device = parse_device(&args.device)?;
    let model_ref: ModelRef = args.model.parse()?;
    let model = {
        let r = model_ref.clone();
        let d = device.clone();
        tokio::task::spawn_blocking(move || TargetModel::load(&r, &d))
            .await?
            .map_err(PipelineError::from)?
    };
    config.plan(&model.shape())?;
    let images = ProbeImages::discover(&args.images).await?;
    let out = Location::create(&args.out)?;
    tracing::info!(
        model = %model_ref,
        images = images.images.len(),
        ignored = images.ignored_files,
        layers = ?config.layers,
        "probing"
    );

    let bars = progress::Bars::new();
    let summary =
        run_probe(Arc::new(model), images, &out, &config, &Default::default(), None, &bars).await?;
    drop(bars);
    if let Some(path) = &args.summary_json {
        let json = serde_json::to_string_pretty(&summary)?;
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
    }
    println!(
        "probed {} images ({} skipped, {} other files ignored) in {:.1}s: {:.2} images/s, peak memory {:.0} MiB",
        summary.images_ok,
        summary.images_failed,
        summary.files_ignored,
        summary.probe_seconds,
        summary.images_per_second,
        summary.peak_rss_mib
    );
    if config.crops.is_some() {
        println!("cut {} attention crops in {:.1}s", summary.crops_written, summary.crop_seconds);
    }
    if summary.images_failed > 0 {
        println!("skipped inputs and why: {}", out.display_path("errors.parquet"));
    }
    println!("results in {}:", out);
    for o in &summary.outputs {
        println!("  {o}");
    }
    Ok(())
}

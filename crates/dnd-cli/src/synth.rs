//! `dnd synth`: the synthetic world's probe sets and the zoo's training.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};

use dnd_synth::{ProbeSetSpec, write_probe_set};
use dnd_zoo::captioner::{
    CaptionerReport, CaptionerSlice, CaptionerTraining, evaluate_captioner, first_to_train,
    plan_slices, publish_last,
};
use dnd_zoo::embedder::{EmbedderTraining, train_embedder};
use dnd_zoo::sae::{SaeTraining, train_sae};
use dnd_zoo::target::{TargetTraining, TrainingReport, train_target};

use crate::BadInput;

#[derive(Subcommand)]
pub enum SynthCommand {
    /// Render a probe set of the world: DIR/NNNNN.png and DIR/scenes.jsonl (the scene of
    /// every image, one JSON per line: the exact ground truth).
    Images(ImagesArgs),

    /// Train the zoo's models with dnd's own candle code, reproducibly from their seeds.
    ///
    /// Writes Hugging Face-layout checkpoint directories (config.json, model.safetensors,
    /// tokenizer and preprocessor files) with a train.json (settings, losses, held-out
    /// quality, time); the target also gets planted.json, what each planted channel and fc
    /// unit means. The default settings are those of the committed zoo
    /// (crates/dnd-synth/zoo), which this regenerates.
    Train(TrainArgs),
}

#[derive(Args)]
pub struct ImagesArgs {
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    #[arg(long, default_value_t = 1000)]
    count: usize,
    /// Side of the square images in pixels.
    #[arg(long, default_value_t = 96)]
    size: u32,
    /// Image i is the scene sampled from seed + i.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ZooModel {
    Target,
    Captioner,
    Embedder,
    /// A TopK sparse autoencoder on the target's layer4 (reads OUT/target).
    Sae,
    All,
}

impl ZooModel {
    fn name(self) -> &'static str {
        match self {
            ZooModel::Target => "target",
            ZooModel::Captioner => "captioner",
            ZooModel::Embedder => "embedder",
            ZooModel::Sae => "sae",
            ZooModel::All => "all",
        }
    }
}

#[derive(Args)]
pub struct TrainArgs {
    /// Which model to train; `all` trains each in turn, each in its own process.
    #[arg(long, value_enum, default_value = "all")]
    model: ZooModel,
    /// The zoo directory: models go to OUT/target, OUT/captioner, OUT/embedder, OUT/sae.
    #[arg(long, value_name = "DIR", default_value = "crates/dnd-synth/zoo")]
    out: PathBuf,
    /// Override the number of training steps (for experiments; the result is then not the zoo).
    #[arg(long)]
    steps: Option<usize>,
    /// Training settings as JSON, for experiments: fields left out keep the zoo's values
    /// (`train.json`'s `settings` or `config` shows them all). One model only. For the
    /// captioner, an array of such objects trains in slices (bench/captioner-slices.json):
    /// each slice's fields over the one before it, each starting from its weights, kept in
    /// OUT/captioner-slices/NN; a rerun resumes after the last slice already trained.
    #[arg(long, value_name = "FILE")]
    settings: Option<PathBuf>,
    /// Re-measure the trained captioner in OUT/captioner on its held-out pairs and update
    /// its train.json (after a change to the evaluation); the weights stay as they are.
    #[arg(long)]
    evaluate: bool,
}

/// Sets up this process for training `args.model`, before any thread exists: the thread
/// counts decide the float summation order, hence the weights, and the zoo's were trained so.
/// The target trains on one rayon thread while another renders the next batch; the
/// captioner and embedder run candle's kernels on one thread, with large glibc malloc
/// thresholds (every op allocates megabyte buffers, and handing them back to the OS only to
/// page-fault them in again cost a third of each step).
pub fn prepare_training_process(args: &TrainArgs) {
    let variable = match args.model {
        ZooModel::Target => "RAYON_NUM_THREADS",
        ZooModel::Captioner | ZooModel::Embedder => "CANDLE_NUM_THREADS",
        ZooModel::Sae | ZooModel::All => return,
    };
    if std::env::var_os(variable).is_none() {
        // SAFETY: called from main before the runtime or any other thread starts.
        unsafe { std::env::set_var(variable, "1") };
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if args.model != ZooModel::Target {
        unsafe extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        // SAFETY: mallopt only tunes glibc's allocator (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, M_TOP_PAD).
        unsafe {
            mallopt(-3, 32 << 20);
            mallopt(-1, 1 << 30);
            mallopt(-2, 64 << 20);
        }
    }
}

pub fn synth(command: SynthCommand) -> anyhow::Result<()> {
    match command {
        SynthCommand::Images(args) => {
            if args.count == 0 || args.size < 8 {
                return Err(
                    BadInput("--count must be at least 1 and --size at least 8".into()).into()
                );
            }
            let spec = ProbeSetSpec { count: args.count, size: args.size, seed: args.seed };
            write_probe_set(&args.out, &spec)
                .with_context(|| format!("writing the probe set to {}", args.out.display()))?;
            println!(
                "wrote {} images of {}x{} px and their scenes to {}",
                args.count,
                args.size,
                args.size,
                args.out.display()
            );
            Ok(())
        }
        SynthCommand::Train(args) => train(args),
    }
}

fn train(args: TrainArgs) -> anyhow::Result<()> {
    if args.model == ZooModel::All {
        if args.settings.is_some() || args.evaluate {
            return Err(BadInput("--settings and --evaluate apply to one model: add --model target|captioner|embedder".into()).into());
        }
        // Each model in its own process, set up for it by `prepare_training_process`.
        let exe = std::env::current_exe().context("finding the dnd executable")?;
        for model in [ZooModel::Target, ZooModel::Sae, ZooModel::Captioner, ZooModel::Embedder] {
            let mut child = std::process::Command::new(&exe);
            child.args(["synth", "train", "--model", model.name(), "--out"]).arg(&args.out);
            if let Some(steps) = args.steps {
                child.args(["--steps", &steps.to_string()]);
            }
            let status = child.status().context("starting dnd synth train")?;
            anyhow::ensure!(status.success(), "training the {} failed ({status})", model.name());
        }
        return Ok(());
    }
    if args.evaluate && args.model != ZooModel::Captioner {
        return Err(
            BadInput("--evaluate re-measures the captioner: add --model captioner".into()).into()
        );
    }
    let dir = args.out.join(args.model.name());
    match args.model {
        ZooModel::Target => {
            let mut config: TargetTraining = settings_or_default(args.settings.as_deref())?;
            config.steps = args.steps.unwrap_or(config.steps);
            let bar = steps_bar("target", config.steps);
            let report = train_target(&config, &dir, |log| {
                bar.set_position(log.step as u64 + 1);
                bar.set_message(format!(
                    "loss {:.3} (ce {:.3}, plant {:.3})",
                    log.loss, log.ce, log.plant
                ));
                if bar.is_hidden() && (log.step % 100 == 0 || log.step + 1 == log.steps) {
                    tracing::info!(
                        step = log.step + 1,
                        loss = log.loss,
                        ce = log.ce,
                        plant = log.plant,
                        "target"
                    );
                }
            })
            .context("training the target network")?;
            bar.finish_and_clear();
            print_target_report(&report, &dir);
        }
        ZooModel::Sae => {
            let mut settings: SaeTraining = settings_or_default(args.settings.as_deref())?;
            settings.steps = args.steps.unwrap_or(settings.steps);
            let bar = steps_bar("sae", settings.steps);
            let target = args.out.join(ZooModel::Target.name());
            let report =
                train_sae(&target, &dir, &settings, |step, loss| loss_step(&bar, step, loss))
                    .context("training the SAE")?;
            bar.finish_and_clear();
            println!(
                "sae: {} in {:.0} s, {} latents (top {}) over {} channels of {} from {} positions; fraction of variance unexplained {:.3}, {} latents never fired",
                dir.display(),
                report.seconds,
                settings.latents,
                settings.k,
                report.d_in,
                settings.layer,
                report.positions,
                report.fraction_variance_unexplained,
                report.dead_latents
            );
        }
        ZooModel::Captioner if args.evaluate => {
            let path = dir.join("train.json");
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            let mut report: CaptionerReport = serde_json::from_str(&text)
                .with_context(|| format!("reading {}", path.display()))?;
            let s = &report.settings;
            let started = std::time::Instant::now();
            report.heldout = evaluate_captioner(&dir, &s.sampling, s.eval_seed, s.eval_pairs, 24)
                .context("evaluating the captioner")?;
            report.eval_seconds = started.elapsed().as_secs_f64();
            std::fs::write(&path, serde_json::to_string_pretty(&report)? + "\n")
                .with_context(|| format!("writing {}", path.display()))?;
            println!("{}", serde_json::to_string_pretty(&report.heldout)?);
        }
        ZooModel::Captioner => train_captioner_model(&args, &dir)?,
        ZooModel::Embedder => {
            let mut settings: EmbedderTraining = settings_or_default(args.settings.as_deref())?;
            settings.steps = args.steps.unwrap_or(settings.steps);
            let bar = steps_bar("embedder", settings.steps);
            let report = train_embedder(&settings, &dir, |step, loss| loss_step(&bar, step, loss))
                .context("training the embedder")?;
            bar.finish_and_clear();
            let h = &report.heldout;
            println!(
                "embedder: {} in {:.0} s, {} parameters, final loss {:.3}, logit scale {:.2}; held-out retrieval among {}: image->text {:.3} (same content {:.3}), text->image {:.3} (same content {:.3})",
                dir.display(),
                report.train_seconds,
                report.parameters,
                report.final_loss,
                report.final_logit_scale,
                h.candidates,
                h.image_to_text.exact,
                h.image_to_text.same_content,
                h.text_to_image.exact,
                h.text_to_image.same_content
            );
        }
        ZooModel::All => unreachable!("handled above"),
    }
    Ok(())
}

/// `--model captioner`: one run, or a chain of slices when the settings file holds an
/// array (`dnd_zoo::captioner::plan_slices`), resuming after the last slice already trained
/// with the same settings.
fn train_captioner_model(args: &TrainArgs, dir: &Path) -> anyhow::Result<()> {
    let text = args.settings.as_deref().map(read_settings).transpose()?;
    let slices = match &text {
        Some((file, text)) if text.trim_start().starts_with('[') => {
            let bad = |e: String| BadInput(format!("{}: {e}", file.display()));
            if args.steps.is_some() {
                return Err(bad("--steps does not apply to a chain of slices: set each slice's `steps` in the file".into()).into());
            }
            let slices: Vec<serde_json::Value> =
                serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
            plan_slices(&slices, dir).map_err(|e| bad(e.to_string()))?
        }
        _ => {
            let mut settings: CaptionerTraining = match &text {
                Some((file, text)) => parse_settings(file, text)?,
                None => CaptionerTraining::default(),
            };
            settings.steps = args.steps.unwrap_or(settings.steps);
            vec![CaptionerSlice { settings, dir: dir.to_path_buf(), earlier: Vec::new() }]
        }
    };
    let count = slices.len();
    let first = if count > 1 { first_to_train(&slices) } else { 0 };
    for (index, slice) in slices.iter().enumerate() {
        let name = format!("slice {} of {count}", index + 1);
        if index < first {
            match slice.trained() {
                Some(_) => println!(
                    "{name}: {} holds it, trained with the same settings; kept",
                    slice.dir.display()
                ),
                None => println!(
                    "{name}: not needed, a later slice of the chain is trained ({})",
                    slices[first - 1].dir.display()
                ),
            }
            continue;
        }
        let bar = steps_bar("captioner", slice.settings.steps);
        let report = slice
            .train(|step, loss| loss_step(&bar, step, loss))
            .with_context(|| format!("training the captioner ({name})"))?;
        bar.finish_and_clear();
        print_captioner_report(&slice.dir, &report);
    }
    if count > 1 {
        publish_last(&slices, dir).context("copying the chain's last slice")?;
        println!("the chain's last slice is now {}", dir.display());
    }
    Ok(())
}

/// The line `dnd synth train` prints for a trained captioner.
fn print_captioner_report(dir: &Path, report: &CaptionerReport) {
    let h = &report.heldout;
    println!(
        "captioner: {} in {:.0} s, {} parameters, final loss {:.3}; held-out: exact {:.3} (scenes {:.3}, crops {:.3}), objects recall {:.3} precision {:.3}, background {:.3}; one-object colour {:.3} fill {:.3} shape {:.3}",
        dir.display(),
        report.train_seconds,
        report.parameters,
        report.final_loss,
        h.exact,
        h.exact_scenes,
        h.exact_crops,
        h.object_recall,
        h.object_precision,
        h.background_accuracy,
        h.single_object.colour,
        h.single_object.fill,
        h.single_object.shape
    );
    if let Some(p) = &report.vision_pretraining {
        println!(
            "vision pretraining: {:.0} s, final loss {:.3}; held-out views: shape {:.3} colour {:.3} fill {:.3}",
            p.seconds, p.final_loss, p.heldout.shape, p.heldout.colour, p.heldout.fill
        );
    }
}

/// A settings file's path and text.
fn read_settings(file: &Path) -> anyhow::Result<(&Path, String)> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| BadInput(format!("cannot read the settings file {}: {e}", file.display())))?;
    Ok((file, text))
}

/// Settings parsed from a file's text; fields left out keep the zoo's values.
fn parse_settings<T: serde::de::DeserializeOwned>(file: &Path, text: &str) -> anyhow::Result<T> {
    serde_json::from_str(text).map_err(|e| {
        BadInput(format!("{}: {e} (see the model's train.json for the fields)", file.display()))
            .into()
    })
}

/// Training settings from a JSON file (missing fields keep the zoo's), or the zoo's.
fn settings_or_default<T: Default + serde::de::DeserializeOwned>(
    file: Option<&Path>,
) -> anyhow::Result<T> {
    let Some(file) = file else { return Ok(T::default()) };
    let (file, text) = read_settings(file)?;
    parse_settings(file, &text)
}

fn steps_bar(model: &str, steps: usize) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(steps as u64);
    let style = indicatif::ProgressStyle::with_template(
        "{prefix} {bar:30} {pos}/{len} steps, {elapsed} (eta {eta}) {msg}",
    )
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_prefix(model.to_string());
    bar
}

/// One step of a captioner or embedder: the bar moves and shows the loss; without a
/// terminal (a log file, CI) a log line every 100 steps says the same.
fn loss_step(bar: &indicatif::ProgressBar, step: usize, loss: f32) {
    bar.set_position(step as u64 + 1);
    if step.is_multiple_of(50) {
        bar.set_message(format!("loss {loss:.3}"));
    }
    if bar.is_hidden() && (step.is_multiple_of(100) || step as u64 + 1 == bar.length().unwrap_or(0))
    {
        tracing::info!(step = step + 1, loss, "{}", bar.prefix());
    }
}

fn print_target_report(report: &TrainingReport, dir: &std::path::Path) {
    println!(
        "target: {} in {:.0} s (+{:.0} s export, {:.0} s eval); top-1 {:.3} (rendered at {} px), {:.3} (native {} px); export differs by {:.2e}; weights fnv1a64 {}",
        dir.display(),
        report.train_seconds,
        report.export_seconds,
        report.eval_seconds,
        report.accuracy,
        report.config.eval_render_size,
        report.accuracy_native,
        report.config.size,
        report.export_max_abs_diff,
        report.weights_fnv1a64
    );
    println!(
        "{:<8} {:>6} {:<8} {:<44} {:>6} {:>6} {:>6} {:>6}",
        "layer", "neuron", "kind", "description", "iou", "oracle", "pear", "auc"
    );
    for q in &report.planted {
        println!(
            "{:<8} {:>6} {:<8} {:<44} {:>6.3} {:>6.3} {:>6.3} {:>6.3}",
            q.layer,
            q.neuron,
            format!("{:?}", q.kind).to_lowercase(),
            q.description,
            q.iou,
            q.oracle_iou,
            q.pearson,
            q.auc
        );
    }
}

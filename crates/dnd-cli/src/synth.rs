//! `dnd synth`: the synthetic world's probe sets and the zoo's training.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};

use dnd_synth::train::captioner::{CaptionerTraining, train_captioner};
use dnd_synth::train::embedder::{EmbedderTraining, train_embedder};
use dnd_synth::train::target::{TargetTraining, train_target};
use dnd_synth::{ProbeSetSpec, write_probe_set};

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
    All,
}

#[derive(Args)]
pub struct TrainArgs {
    /// Which model to train.
    #[arg(long, value_enum, default_value = "all")]
    model: ZooModel,
    /// The zoo directory: models go to OUT/target, OUT/captioner, OUT/embedder.
    #[arg(long, value_name = "DIR", default_value = "crates/dnd-synth/zoo")]
    out: PathBuf,
    /// Override the number of training steps (for experiments; the result is then not the zoo).
    #[arg(long)]
    steps: Option<usize>,
}

pub fn synth(command: SynthCommand) -> anyhow::Result<()> {
    match command {
        SynthCommand::Images(args) => {
            if args.count == 0 || args.size < 8 {
                return Err(BadInput("--count must be at least 1 and --size at least 8".into()).into());
            }
            let spec = ProbeSetSpec { count: args.count, size: args.size, seed: args.seed };
            write_probe_set(&args.out, &spec).with_context(|| format!("writing the probe set to {}", args.out.display()))?;
            println!("wrote {} images of {}x{} px and their scenes to {}", args.count, args.size, args.size, args.out.display());
            Ok(())
        }
        SynthCommand::Train(args) => train(args),
    }
}

fn train(args: TrainArgs) -> anyhow::Result<()> {
    let wants = |m: ZooModel| args.model == m || args.model == ZooModel::All;
    if wants(ZooModel::Target) {
        let mut config = TargetTraining::default();
        if let Some(steps) = args.steps {
            config.steps = steps;
        }
        let dir = args.out.join("target");
        let report = train_target(&config, &dir, |log| {
            if log.step % 50 == 0 || log.step + 1 == log.steps {
                tracing::info!(step = log.step, loss = log.loss, ce = log.ce, plant = log.plant, "target");
            }
        })
        .context("training the target network")?;
        println!("target: {} in {:.0}s", dir.display(), report.wall_seconds);
    }
    if wants(ZooModel::Captioner) {
        let mut settings = CaptionerTraining::default();
        if let Some(steps) = args.steps {
            settings.steps = steps;
        }
        let dir = args.out.join("captioner");
        let report = train_captioner(&settings, &dir, |step, loss| {
            if step % 100 == 0 {
                tracing::info!(step, loss, "captioner");
            }
        })
        .context("training the captioner")?;
        println!("captioner: {} in {:.0}s (final loss {:.3})", dir.display(), report.train_seconds, report.final_loss);
    }
    if wants(ZooModel::Embedder) {
        let mut settings = EmbedderTraining::default();
        if let Some(steps) = args.steps {
            settings.steps = steps;
        }
        let dir = args.out.join("embedder");
        let report = train_embedder(&settings, &dir, |step, loss| {
            if step % 100 == 0 {
                tracing::info!(step, loss, "embedder");
            }
        })
        .context("training the embedder")?;
        println!("embedder: {} in {:.0}s (final loss {:.3})", dir.display(), report.train_seconds, report.final_loss);
    }
    Ok(())
}

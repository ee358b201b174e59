//! Trains the zoo's target network and writes its checkpoint directory.
//!
//! The committed model (crates/dnd-synth/zoo/target) is regenerated bit for bit by
//!
//!     cargo run --release -p dnd-synth --example train_target -- crates/dnd-synth/zoo/target
//!
//! Unless `RAYON_NUM_THREADS` says otherwise, one thread trains while another renders the
//! next batch, which is fastest on two cores; the weights do not depend on the thread count.
//!
//! Options override the defaults for experiments (the result is then not the zoo model):
//! `--steps N`, `--batch-size N`, `--lr X`, `--plant-weight X`, `--eval-images N`,
//! `--seed N`, `--widths A,B,C,D`.

use std::path::PathBuf;
use std::process::ExitCode;

use dnd_synth::train::target::{TargetTraining, train_target};

fn parse<T: std::str::FromStr>(flag: &str, value: Option<String>) -> Result<T, String> {
    let value = value.ok_or_else(|| format!("{flag} needs a value"))?;
    value.parse().map_err(|_| format!("{flag}: cannot read `{value}`"))
}

fn run() -> Result<(), String> {
    let mut config = TargetTraining::default();
    let mut out = PathBuf::from("crates/dnd-synth/zoo/target");
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--steps" => config.steps = parse(&arg, args.next())?,
            "--batch-size" => config.batch_size = parse(&arg, args.next())?,
            "--lr" => config.lr = parse(&arg, args.next())?,
            "--plant-weight" => config.plant_weight = parse(&arg, args.next())?,
            "--eval-images" => config.eval_images = parse(&arg, args.next())?,
            "--seed" => config.seed = parse(&arg, args.next())?,
            "--widths" => {
                let list: String = parse(&arg, args.next())?;
                let widths: Vec<usize> = list.split(',').map(|w| w.trim().parse().map_err(|_| format!("--widths: cannot read `{list}`"))).collect::<Result<_, _>>()?;
                config.widths = widths.try_into().map_err(|_| "--widths takes four numbers, e.g. 16,32,64,128".to_string())?;
            }
            "-h" | "--help" => {
                println!("usage: train_target [OUT_DIR] [--steps N] [--batch-size N] [--lr X] [--plant-weight X] [--eval-images N] [--seed N] [--widths A,B,C,D]");
                return Ok(());
            }
            flag if flag.starts_with('-') => return Err(format!("unknown option {flag}")),
            dir => out = PathBuf::from(dir),
        }
    }
    eprintln!("training the target network into {} ({} steps of {} images)", out.display(), config.steps, config.batch_size);
    let every = (config.steps / 40).max(1);
    let mut window = Vec::new();
    let report = train_target(&config, &out, |s| {
        window.push([s.loss, s.ce, s.plant]);
        if (s.step + 1) % every == 0 || s.step + 1 == s.steps {
            let n = window.len() as f32;
            let mean = |k: usize| window.iter().map(|r| r[k]).sum::<f32>() / n;
            eprintln!(
                "step {:>5}/{}  loss {:.4}  ce {:.4}  plant {:.4}  lr {:.2e}  {:.0}s",
                s.step + 1,
                s.steps,
                mean(0),
                mean(1),
                mean(2),
                s.lr,
                s.seconds
            );
            window.clear();
        }
    })
    .map_err(|e| e.to_string())?;
    eprintln!(
        "trained in {:.0}s (+{:.0}s export, {:.0}s eval); accuracy {:.3} (rendered at {} px), {:.3} (native {} px); export differs by {:.2e}",
        report.train_seconds,
        report.export_seconds,
        report.eval_seconds,
        report.accuracy,
        report.config.eval_render_size,
        report.accuracy_native,
        report.config.size,
        report.export_max_abs_diff
    );
    eprintln!(
        "per step: data wait {:.3}s, forward {:.3}s, backward {:.3}s, update {:.3}s ({} threads)",
        report.data_wait_seconds / report.config.steps as f64,
        report.forward_seconds / report.config.steps as f64,
        report.backward_seconds / report.config.steps as f64,
        report.update_seconds / report.config.steps as f64,
        report.threads
    );
    eprintln!("{:<8} {:>6} {:<8} {:<44} {:>6} {:>6} {:>6} {:>6} {:>6} {:>6}", "layer", "neuron", "kind", "description", "prev", "iou", "oracle", "pear", "spear", "auc");
    for q in &report.planted {
        eprintln!(
            "{:<8} {:>6} {:<8} {:<44} {:>6.3} {:>6.3} {:>6.3} {:>6.3} {:>6.3} {:>6.3}",
            q.layer,
            q.neuron,
            format!("{:?}", q.kind).to_lowercase(),
            q.description,
            q.prevalence,
            q.iou,
            q.oracle_iou,
            q.pearson,
            q.spearman,
            q.auc
        );
    }
    eprintln!("weights fnv1a64 {}", report.weights_fnv1a64);
    Ok(())
}

fn main() -> ExitCode {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        // SAFETY: no other thread runs yet.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", "1") };
    }
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

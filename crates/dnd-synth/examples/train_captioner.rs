//! Trains the zoo's captioner (a tiny BLIP) and writes it, with train.json, to
//! `crates/dnd-synth/zoo/captioner/` (or the directory given as the first argument).
//!
//! `cargo run --release -p dnd-synth --example train_captioner [OUT_DIR] [--steps N] [--settings JSON] [--evaluate]`
//!
//! The committed settings are `CaptionerTraining::default()`; same settings, same weights
//! (on the same machine: float summation order can depend on the CPU's SIMD width and
//! thread count).

use std::path::PathBuf;
use std::time::Instant;

use dnd_synth::train::captioner::{evaluate_captioner, train_captioner, CaptionerReport, CaptionerTraining};

#[cfg(all(target_os = "linux", target_env = "gnu"))]
unsafe extern "C" {
    fn mallopt(param: i32, value: i32) -> i32;
}

/// One candle thread: on a shared 2-core machine candle's spinning thread pool loses more
/// than it gains, and a fixed thread count keeps the float sums (hence the weights)
/// independent of the number of cores. Large glibc malloc thresholds: every op allocates megabyte
/// buffers, and returning them to the OS (then page-faulting them back) costs a third of
/// the step time.
fn tune_runtime() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // SAFETY: no other thread runs yet.
        unsafe { std::env::set_var("CANDLE_NUM_THREADS", "1") };
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only tunes glibc's allocator (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, M_TOP_PAD).
    unsafe {
        mallopt(-3, 32 << 20);
        mallopt(-1, 1 << 30);
        mallopt(-2, 64 << 20);
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    tune_runtime();
    let mut args = std::env::args().skip(1);
    let mut out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("zoo/captioner");
    let mut settings = CaptionerTraining::default();
    let mut evaluate_only = false;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            // Re-measure the trained model in OUT_DIR on its held-out pairs and update its
            // train.json (after a change to the evaluation; the weights stay as they are).
            "--evaluate" => evaluate_only = true,
            "--steps" => settings.steps = args.next().ok_or("--steps needs a number")?.parse()?,
            "--eval-pairs" => settings.eval_pairs = args.next().ok_or("--eval-pairs needs a number")?.parse()?,
            // Settings for experiments, as JSON (fields left out keep the committed values).
            "--settings" => settings = serde_json::from_str(&std::fs::read_to_string(args.next().ok_or("--settings needs a file")?)?)?,
            other => out = PathBuf::from(other),
        }
    }
    if evaluate_only {
        let path = out.join("train.json");
        let mut report: CaptionerReport = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
        let s = &report.settings;
        let started = Instant::now();
        report.heldout = evaluate_captioner(&out, &s.sampling, s.eval_seed, s.eval_pairs, 24)?;
        report.eval_seconds = started.elapsed().as_secs_f64();
        std::fs::write(&path, serde_json::to_string_pretty(&report)? + "\n")?;
        println!("{}", serde_json::to_string_pretty(&report.heldout)?);
        return Ok(());
    }
    let started = Instant::now();
    let mut window = 0f32;
    let report = train_captioner(&settings, &out, |step, loss| {
        window += loss;
        if (step + 1) % 50 == 0 {
            eprintln!("step {:>5}  loss {:.4}  {:>6.0} s", step + 1, window / 50.0, started.elapsed().as_secs_f64());
            window = 0.0;
        }
    })?;
    let h = &report.heldout;
    println!(
        "{} parameters, {} steps in {:.0} s; final loss {:.4}; held-out exact {:.3} (scenes {:.3}, crops {:.3}), object recall {:.3}, precision {:.3}, background {:.3}",
        report.parameters,
        settings.steps,
        report.train_seconds,
        report.final_loss,
        h.exact,
        h.exact_scenes,
        h.exact_crops,
        h.object_recall,
        h.object_precision,
        h.background_accuracy
    );
    for e in h.examples.iter().take(8) {
        println!("  {:?}: {:?} -> {:?}", e.kind, e.reference, e.generated);
    }
    println!("wrote {}", out.display());
    Ok(())
}

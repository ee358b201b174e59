//! Trains the zoo's embedder (a tiny CLIP) and writes it, with train.json, to
//! `crates/dnd-synth/zoo/embedder/` (or the directory given as the first argument).
//!
//! `cargo run --release -p dnd-synth --example train_embedder [OUT_DIR] [--steps N] [--settings JSON]`
//!
//! The committed settings are `EmbedderTraining::default()`; same settings, same weights
//! (on the same machine: float summation order can depend on the CPU's SIMD width and
//! thread count).

use std::path::PathBuf;
use std::time::Instant;

use dnd_synth::train::embedder::{train_embedder, EmbedderTraining};

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
    let mut out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("zoo/embedder");
    let mut settings = EmbedderTraining::default();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--steps" => settings.steps = args.next().ok_or("--steps needs a number")?.parse()?,
            "--eval-pairs" => settings.eval_pairs = args.next().ok_or("--eval-pairs needs a number")?.parse()?,
            // Settings for experiments, as JSON (fields left out keep the committed values).
            "--settings" => settings = serde_json::from_str(&std::fs::read_to_string(args.next().ok_or("--settings needs a file")?)?)?,
            other => out = PathBuf::from(other),
        }
    }
    let started = Instant::now();
    let mut window = 0f32;
    let report = train_embedder(&settings, &out, |step, loss| {
        window += loss;
        if (step + 1) % 50 == 0 {
            eprintln!("step {:>5}  loss {:.4}  {:>6.0} s", step + 1, window / 50.0, started.elapsed().as_secs_f64());
            window = 0.0;
        }
    })?;
    let h = &report.heldout;
    println!(
        "{} parameters, {} steps in {:.0} s; final loss {:.4}, logit scale {:.2}; held-out retrieval among {}: image->text {:.3} (same content {:.3}; scenes {:.3}, crops {:.3}), text->image {:.3} (same content {:.3})",
        report.parameters,
        settings.steps,
        report.train_seconds,
        report.final_loss,
        report.final_logit_scale,
        h.candidates,
        h.image_to_text.exact,
        h.image_to_text.same_content,
        h.image_to_text_scenes.exact,
        h.image_to_text_crops.exact,
        h.text_to_image.exact,
        h.text_to_image.same_content
    );
    println!("wrote {}", out.display());
    Ok(())
}

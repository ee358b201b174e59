//! `dnd report`: a static HTML report of a dissection (crate dnd-report), and the bench
//! that measures it on a synthetic job of thousands of neurons.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::Args;

use dnd_core::{LayerName, NeuronId};
use dnd_report::synthetic::{SyntheticSpec, write_job};
use dnd_report::{Job, ReportOptions, ReportOutcome, find_job, open_job, write_report};
use dnd_store::Location;
use dnd_synth::read_planted;

#[derive(Args)]
pub struct ReportArgs {
    /// The job directory `dnd dissect` wrote (<out>/jobs/<name>), local or an object store
    /// URL; an --out holding a single job will do.
    #[arg(value_name = "JOB DIR|URL")]
    pub job: String,

    /// Where the site goes: a directory or an object store URL (default <job>/report).
    #[arg(long, value_name = "DIR|URL")]
    pub out: Option<String>,

    /// Thumbnails fit in a square of this many pixels.
    #[arg(long, default_value_t = 128)]
    pub thumb_px: u32,

    /// Rows per page of the index table.
    #[arg(long, default_value_t = 100)]
    pub page_size: usize,
}

/// What each neuron of the job is known to mean, when the target model says (the
/// synthetic zoo's planted.json beside its weights); empty otherwise. The planted meanings
/// are channels': layers the job describes by a dictionary's units get none.
pub fn ground_truth(spec: &dnd_pipeline::JobSpec) -> BTreeMap<(LayerName, NeuronId), String> {
    read_planted(Path::new(&spec.target.model))
        .map(|rows| {
            rows.into_iter()
                .filter(|p| !spec.target.units.contains_key(&p.layer))
                .map(|p| ((LayerName::new(p.layer), NeuronId::new(p.neuron as u32)), p.description))
                .collect()
        })
        .unwrap_or_default()
}

/// Writes the report of `job` to `out` (default `<job>/report`).
pub async fn render(
    job: &Job,
    out: Option<&str>,
    mut options: ReportOptions,
) -> anyhow::Result<ReportOutcome> {
    let out = match out {
        Some(spec) => Location::create(spec)?,
        None => job.location.join("report"),
    };
    if options.ground_truth.is_empty() {
        options.ground_truth = ground_truth(&job.spec);
    }
    let outcome = write_report(job, &out, &options).await?;
    Ok(outcome)
}

fn print_outcome(o: &ReportOutcome) {
    println!(
        "report: {} neurons, {} images, {} files in {:.1}s; open {}/index.html",
        o.neurons, o.images, o.files, o.seconds, o.location
    );
    if !o.images_missing.is_empty() {
        println!(
            "{} images could not be read and show as placeholders, e.g. {}: {}",
            o.images_missing.len(),
            o.images_missing[0].0,
            o.images_missing[0].1
        );
    }
}

pub async fn report(args: ReportArgs) -> anyhow::Result<()> {
    let location = find_job(&args.job).await?;
    let job = open_job(&location).await?;
    let options = ReportOptions {
        thumb_px: args.thumb_px,
        page_size: args.page_size,
        ..ReportOptions::default()
    };
    let outcome = render(&job, args.out.as_deref(), options).await?;
    print_outcome(&outcome);
    Ok(())
}

/// The end of `dnd dissect`: the job's report in `<job>/report/`, its path printed. A
/// report that cannot be written is a warning: the results are there all the same.
pub async fn after_dissect(job_location: &str) {
    let written = async {
        let location = Location::open(job_location)?;
        let job = open_job(&location).await?;
        render(&job, None, ReportOptions::default()).await
    };
    match written.await {
        Ok(o) => print_outcome(&o),
        Err(e) => eprintln!("warning: the HTML report was not written: {e:#}"),
    }
}

#[derive(Args)]
pub struct BenchReportArgs {
    /// Neurons in the synthetic job.
    #[arg(long, default_value_t = 2000)]
    neurons: usize,
    /// Where the synthetic job and its report go.
    #[arg(long, value_name = "DIR", default_value = "out/bench-report")]
    out: PathBuf,
    /// Page loads to measure in headless Chromium (bench/report_load.py; 0: none).
    #[arg(long, default_value_t = 5)]
    loads: usize,
}

/// `dnd bench report`: writes a synthetic job of --neurons neurons, renders its report,
/// then times its index's load in headless Chromium.
pub async fn bench(args: BenchReportArgs) -> anyhow::Result<()> {
    let job_dir = args.out.join(format!("jobs/synthetic-{}", args.neurons));
    let job_loc = Location::create(&job_dir.display().to_string())?;
    let t = Instant::now();
    write_job(&job_loc, &SyntheticSpec { neurons: args.neurons, ..SyntheticSpec::default() })
        .await?;
    println!(
        "synthetic job of {} neurons written in {:.1}s: {}",
        args.neurons,
        t.elapsed().as_secs_f64(),
        job_dir.display()
    );
    let job = open_job(&job_loc).await?;
    let outcome = render(&job, None, ReportOptions::default()).await?;
    print_outcome(&outcome);
    if args.loads == 0 {
        return Ok(());
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bench/report_load.py");
    let index = std::path::absolute(job_dir.join("report/index.html"))?;
    let status = std::process::Command::new("python3")
        .arg(&script)
        .arg(&index)
        .arg(args.loads.to_string())
        .arg(args.neurons.to_string())
        .status()
        .with_context(|| format!("running {}", script.display()))?;
    anyhow::ensure!(
        status.success(),
        "{} failed (it needs `pip install -r tests/requirements-browser.txt` and /usr/bin/chromium)",
        script.display()
    );
    Ok(())
}

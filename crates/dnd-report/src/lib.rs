//! dnd-report: a static HTML report of a dissection.
//!
//! Reads a job directory's results (`results/*.parquet`, `summary.json`, `job.json`)
//! through [`JobDir`], typed, so the job can be a local directory or an object store URL,
//! and writes a self-contained site to another location:
//!
//! ```text
//! index.html            the job (models, counts, cache use, time) and a table of every neuron
//! neurons.js            the table's rows (a script, so the page works from file:// too)
//! index.js, style.css   the table's sorting, filtering and paging; the look of every page
//! neurons/<layer>-<neuron>.html   one page per neuron: its images, crops, captions, candidates
//! thumbs/<hash>.png     every image at a fixed small size (named by the content's BLAKE3)
//! images/<hash>.<ext>   every image as it was, linked from its thumbnail
//! ```
//!
//! No page loads anything from outside the site: no fonts, scripts or styles from a CDN.

mod data;
mod html;
mod images;
pub mod synthetic;

use std::collections::BTreeMap;
use std::time::Instant;

use bytes::Bytes;
use dnd_core::{LayerName, NeuronId};
use dnd_pipeline::finish::DissectSummary;
use dnd_pipeline::job_dir::{SPEC_FILE as JOB_FILE, SUMMARY_FILE};
use dnd_pipeline::{JobDir, JobSpec};
use dnd_store::{Location, StoreError};
use futures::StreamExt;

pub use data::{JobResults, NeuronData};

/// Errors of the report: most are about the job a user pointed at.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("{location} is not a dnd job directory: {reason}")]
    NotAJob { location: String, reason: String },

    #[error(
        "{location} has no results yet ({missing} is missing): the job has not finished; run `dnd dissect` (or `dnd watch <job>`) until it ends, then report"
    )]
    NoResults { location: String, missing: String },

    #[error("cannot read the results table {location}: {source}")]
    Table { location: String, source: StoreError },

    #[error("{location} is not valid: {reason}")]
    BadFile { location: String, reason: String },

    #[error(transparent)]
    Store(#[from] StoreError),

    #[error("internal error while writing the report: {0}")]
    Internal(String),
}

impl ReportError {
    /// True when the error is about something the user gave (a path, a job), not a
    /// failure inside dnd.
    pub fn is_user_error(&self) -> bool {
        match self {
            ReportError::NotAJob { .. }
            | ReportError::NoResults { .. }
            | ReportError::Table { .. }
            | ReportError::BadFile { .. } => true,
            ReportError::Store(e) => e.is_user_error(),
            ReportError::Internal(_) => false,
        }
    }
}

/// How the report is made.
#[derive(Debug, Clone)]
pub struct ReportOptions {
    /// Thumbnails fit in a square of this many pixels (larger images are scaled down).
    pub thumb_px: u32,
    /// Rows per page of the index table.
    pub page_size: usize,
    /// What each neuron is known to mean, when it is known (the synthetic zoo's planted
    /// neurons), by (layer, neuron).
    pub ground_truth: BTreeMap<(LayerName, NeuronId), String>,
    /// Images read and thumbnailed at once.
    pub parallel: usize,
}

impl Default for ReportOptions {
    fn default() -> Self {
        Self { thumb_px: 128, page_size: 100, ground_truth: BTreeMap::new(), parallel: 16 }
    }
}

/// A dissection job directory, checked to be one.
#[derive(Debug, Clone)]
pub struct Job {
    pub location: Location,
    pub name: String,
    /// The job spec as `job.json` holds it (see docs/job.md).
    pub spec: JobSpec,
    /// `summary.json`, when the job wrote one.
    pub summary: Option<DissectSummary>,
}

impl Job {
    /// The target model reference of the job (`target.model`).
    pub fn target_model(&self) -> Option<&str> {
        Some(self.spec.target.model.as_str())
    }
}

/// What [`write_report`] wrote.
#[derive(Debug, Clone)]
pub struct ReportOutcome {
    /// Where the report is: open `index.html` there.
    pub location: String,
    pub neurons: usize,
    /// Distinct images copied (each with its thumbnail).
    pub images: usize,
    /// Images that could not be read, with why: they show as a placeholder.
    pub images_missing: Vec<(String, String)>,
    pub files: usize,
    pub seconds: f64,
}

/// Opens `spec` (a path or URL) as a job directory. A store root (`--out` of `dnd
/// dissect`) holding exactly one job under `jobs/` is taken as that job.
pub async fn find_job(spec: &str) -> Result<Location, ReportError> {
    let location = Location::open(spec).map_err(|e| match e {
        StoreError::BadLocation { reason, .. } => {
            ReportError::NotAJob { location: spec.to_string(), reason }
        }
        other => ReportError::Store(other),
    })?;
    if location.exists(JOB_FILE).await? {
        return Ok(location);
    }
    let jobs = location.list_dirs("jobs").await?;
    match jobs.as_slice() {
        [one] => Ok(location.join(&format!("jobs/{one}"))),
        [] => Err(ReportError::NotAJob {
            location: spec.to_string(),
            reason: format!(
                "no {JOB_FILE} there (give the job directory `dnd dissect` wrote: <out>/jobs/<name>)"
            ),
        }),
        many => Err(ReportError::NotAJob {
            location: spec.to_string(),
            reason: format!(
                "it holds several jobs; give one of them: {}",
                many.iter()
                    .map(|j| location.display_path(&format!("jobs/{j}")))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }),
    }
}

/// Reads `job.json` and `summary.json` of a job directory.
pub async fn open_job(location: &Location) -> Result<Job, ReportError> {
    let not_a_job =
        |reason: String| ReportError::NotAJob { location: location.to_string(), reason };
    let dir = JobDir::new(location.clone());
    let spec = dir.spec_opt().await.map_err(|e| match e {
        dnd_pipeline::PipelineError::Store(e) => ReportError::Store(e),
        other => not_a_job(format!("{JOB_FILE} is not a dnd job spec ({other})")),
    })?;
    let Some((name, spec)) = spec else {
        return Err(not_a_job(format!(
            "no {JOB_FILE} there (give the job directory `dnd dissect` wrote: <out>/jobs/<name>)"
        )));
    };
    let summary = dir.summary().await.map_err(|e| ReportError::BadFile {
        location: location.display_path(SUMMARY_FILE),
        reason: format!("not a dnd summary ({e})"),
    })?;
    Ok(Job { location: location.clone(), name, spec, summary })
}

/// Writes the report of `job` to `out`.
pub async fn write_report(
    job: &Job,
    out: &Location,
    options: &ReportOptions,
) -> Result<ReportOutcome, ReportError> {
    let started = Instant::now();
    let results = data::read_results(job).await?;
    let resolver = images::Resolver::new(job.location.clone());
    let imgs = images::copy_images(&resolver, &results, out, options).await?;

    let mut files: Vec<(String, Bytes)> = vec![
        ("style.css".into(), Bytes::from_static(html::STYLE_CSS.as_bytes())),
        ("index.js".into(), Bytes::from_static(html::INDEX_JS.as_bytes())),
        ("neurons.js".into(), Bytes::from(html::neurons_js(&results, options))),
        (
            "index.html".into(),
            Bytes::from(html::index_html(job, &results, options, imgs.missing.len())),
        ),
    ];
    let all = &results.neurons;
    for (i, n) in all.iter().enumerate() {
        let prev = i.checked_sub(1).map(|p| &all[p].description);
        let next = all.get(i + 1).map(|n| &n.description);
        let page = html::neuron_html(job, n, prev, next, &imgs, options);
        files.push((
            format!("neurons/{}", html::neuron_file(&n.description.layer, n.description.neuron)),
            Bytes::from(page),
        ));
    }
    let count = files.len() + imgs.files;
    let mut writes = futures::stream::iter(
        files.into_iter().map(|(rel, bytes)| async move { out.put(&rel, bytes).await }),
    )
    .buffer_unordered(options.parallel.max(1));
    while let Some(r) = writes.next().await {
        r?;
    }
    Ok(ReportOutcome {
        location: out.display_path("index.html").trim_end_matches("/index.html").to_string(),
        neurons: results.neurons.len(),
        images: imgs.copied,
        images_missing: imgs.missing.iter().map(|(u, r)| (u.clone(), r.clone())).collect(),
        files: count,
        seconds: started.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn synthetic_job(neurons: usize) -> (tempfile::TempDir, Location) {
        let dir = tempfile::tempdir().unwrap();
        let loc = Location::create(dir.path().join("jobs/synthetic").to_str().unwrap()).unwrap();
        synthetic::write_job(&loc, &synthetic::SyntheticSpec { neurons, ..Default::default() })
            .await
            .unwrap();
        (dir, loc)
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_report_has_an_index_a_page_per_neuron_and_every_image_once() {
        let (dir, loc) = synthetic_job(12).await;
        let job = open_job(&loc).await.unwrap();
        let out = Location::create(dir.path().join("report").to_str().unwrap()).unwrap();
        let mut options = ReportOptions::default();
        options
            .ground_truth
            .insert((LayerName::new("layer4"), NeuronId::new(0)), "red circles".into());
        let outcome = write_report(&job, &out, &options).await.unwrap();
        assert_eq!(outcome.neurons, 12);
        assert!(outcome.images_missing.is_empty(), "{:?}", outcome.images_missing);
        let root = dir.path().join("report");
        let index = std::fs::read_to_string(root.join("index.html")).unwrap();
        assert!(index.contains("neurons.js") && index.contains("synthetic"), "{index}");
        assert!(
            !index.contains("http://") && !index.contains("https://"),
            "the index loads nothing from outside"
        );
        let js = std::fs::read_to_string(root.join("neurons.js")).unwrap();
        assert!(js.starts_with("window.DND_REPORT = "));
        let pages = std::fs::read_dir(root.join("neurons")).unwrap().count();
        assert_eq!(pages, 12);
        let page = std::fs::read_to_string(root.join("neurons/layer4-0.html")).unwrap();
        for part in [
            "id=\"top-images\"",
            "id=\"crops\"",
            "id=\"candidates\"",
            "class=\"box\"",
            "red circles",
            "../thumbs/",
            "../images/",
        ] {
            assert!(page.contains(part), "{part} missing from the neuron page");
        }
        // Thumbnails are small PNGs; every image is stored once, by content.
        let thumbs: Vec<_> =
            std::fs::read_dir(root.join("thumbs")).unwrap().map(|e| e.unwrap().path()).collect();
        assert_eq!(thumbs.len(), outcome.images);
        for t in &thumbs {
            let img = image::open(t).unwrap();
            assert!(img.width() <= 128 && img.height() <= 128);
        }
        assert_eq!(std::fs::read_dir(root.join("images")).unwrap().count(), outcome.images);
        // Writing it again gives the same files.
        let again = write_report(&job, &out, &options).await.unwrap();
        assert_eq!(again.files, outcome.files);
        assert_eq!(std::fs::read_to_string(root.join("neurons/layer4-0.html")).unwrap(), page);
    }

    #[tokio::test]
    async fn user_mistakes_get_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        let err = find_job(missing.to_str().unwrap()).await.unwrap_err();
        assert!(err.is_user_error() && err.to_string().contains("no such directory"), "{err}");

        let err = find_job(dir.path().to_str().unwrap()).await.unwrap_err();
        assert!(
            err.is_user_error() && err.to_string().contains("not a dnd job directory"),
            "{err}"
        );

        // A job without results: not finished.
        let job_dir = dir.path().join("jobs/j");
        std::fs::create_dir_all(&job_dir).unwrap();
        std::fs::write(
            job_dir.join("job.json"),
            r#"["j", {"target": {"model": "m", "layers": ["layer4"]}}]"#,
        )
        .unwrap();
        let loc = find_job(dir.path().to_str().unwrap()).await.unwrap();
        let job = open_job(&loc).await.unwrap();
        assert_eq!(job.name, "j");
        let out = Location::create(dir.path().join("r").to_str().unwrap()).unwrap();
        let err = write_report(&job, &out, &ReportOptions::default()).await.unwrap_err();
        assert!(matches!(err, ReportError::NoResults { .. }) && err.is_user_error(), "{err}");

        // An unreadable table names itself.
        std::fs::create_dir_all(job_dir.join("results")).unwrap();
        std::fs::write(job_dir.join("results/descriptions.parquet"), b"not parquet").unwrap();
        let err = write_report(&job, &out, &ReportOptions::default()).await.unwrap_err();
        assert!(err.is_user_error() && err.to_string().contains("descriptions.parquet"), "{err}");

        // job.json that is not a job spec.
        std::fs::write(job_dir.join("job.json"), b"{}").unwrap();
        let err = open_job(&loc).await.unwrap_err();
        assert!(err.is_user_error() && err.to_string().contains("job.json"), "{err}");
    }
}

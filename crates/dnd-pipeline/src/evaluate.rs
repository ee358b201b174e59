//! `dnd evaluate`: scores the labels of a finished job (its own, or a labels file from
//! another method) against the neurons they describe, into `results/evaluation.parquet`.
//!
//! Work goes in batches of the job's neuron tasks; each batch's rows are written to
//! `evaluation/<source>/<task>.parquet` as soon as they are done, so an interrupted run
//! resumes where it stopped. Every model call goes through the job's caches.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use arrow::record_batch::RecordBatch;
use serde::Deserialize;

use dnd_core::evaluation::EvaluationConfig;
use dnd_core::{LayerName, NeuronId};
use dnd_models::device::parse_device;
use dnd_models::{ModelRef, TargetModel};
use dnd_store::results::{EvaluationRow, ResultTable};
use dnd_store::{CacheKind, ContentCache, Location, batches_rows, read_parquet, write_parquet};

use crate::error::PipelineError;
use crate::execute::JobContext;
use crate::job_dir::JobDir;
use crate::progress::Progress;
use crate::stages::evaluate::{DND_LABELS, LabelToScore, evaluate_labels, reported_labels};
use crate::workbench::Workbench;

/// Whose labels to score.
#[derive(Debug, Clone, PartialEq)]
pub enum LabelSource {
    /// The job's own reported labels (`results/descriptions.parquet`).
    Job,
    /// A CSV or Parquet file with `layer`, `neuron` and `label` columns; a neuron's rows
    /// in file order are its labels 1, 2, 3.
    File(String),
}

/// What an evaluation run did.
#[derive(Debug, Clone, PartialEq)]
pub struct EvaluationOutcome {
    /// The `source` column of its rows.
    pub source: String,
    pub labels: usize,
    pub neurons: usize,
    pub rows: usize,
    /// Batches already written by an earlier, interrupted run.
    pub batches_resumed: usize,
    /// Images generated and vectors (activations, embeddings) computed: the cache misses.
    pub images_generated: u64,
    pub vectors_computed: u64,
    pub seconds: f64,
    /// Where the table is.
    pub table: String,
}

/// One row of a labels file.
#[derive(Debug, Deserialize)]
struct LabelFileRow {
    layer: String,
    neuron: i64,
    label: String,
}

/// Scores `source`'s labels for the job in `dir` with `config`.
pub async fn evaluate_job(
    dir: JobDir,
    source: &LabelSource,
    config: &EvaluationConfig,
    progress: &dyn Progress,
) -> Result<EvaluationOutcome, PipelineError> {
    let started = Instant::now();
    config.validate()?;
    let context = JobContext::open(dir.clone()).await?;
    let (source_name, labels) = match source {
        LabelSource::Job => (DND_LABELS.to_string(), job_labels(&dir, config.labels).await?),
        LabelSource::File(path) => {
            (label_file_source(path), file_labels(path, &context, config.labels).await?)
        }
    };
    let bench = load_bench(&context).await?;
    let batches = batches(&context, &labels);
    let neurons = batches.iter().map(|(_, _, l)| distinct_neurons(l)).sum();
    progress.begin("evaluate", neurons as u64);
    let parts = dir.location().join(&format!("evaluation/{source_name}"));
    let mut resumed = 0;
    let misses = |kind| bench.cache.counts(kind).misses;
    let before = (misses(CacheKind::Images), misses(CacheKind::Vectors));
    for (task, layer, labels) in &batches {
        let part = format!("{task}.parquet");
        if parts.exists(&part).await? {
            resumed += 1;
        } else {
            let readout = context.readout(&bench, layer.as_str())?;
            let probe = context.probe_measurements(&bench, layer).await?;
            let rows = evaluate_labels(
                &bench,
                &context.spec,
                config,
                layer,
                &readout,
                &probe,
                labels,
                &source_name,
            )
            .await?;
            write_parquet(&parts, &part, &ResultTable::Evaluation.batch(&rows)?).await?;
        }
        progress.advance(distinct_neurons(labels) as u64);
    }
    progress.end();
    let rows = merge_into_results(&dir, &parts, &source_name, &batches).await?;
    Ok(EvaluationOutcome {
        source: source_name,
        labels: labels.len(),
        neurons,
        rows,
        batches_resumed: resumed,
        images_generated: misses(CacheKind::Images) - before.0,
        vectors_computed: misses(CacheKind::Vectors) - before.1,
        seconds: started.elapsed().as_secs_f64(),
        table: dir.location().display_path(&JobDir::results_path(ResultTable::Evaluation)),
    })
}

fn distinct_neurons(labels: &[LabelToScore]) -> usize {
    labels.iter().map(|l| l.neuron).collect::<HashSet<_>>().len()
}

/// The `source` of a labels file's rows: its file name without extension.
fn label_file_source(path: &str) -> String {
    Path::new(path.trim_end_matches('/'))
        .file_stem()
        .map_or_else(|| "labels".to_string(), |s| s.to_string_lossy().into_owned())
}

/// The models the evaluation runs: the job's target, embedder and generator. The
/// summariser is never called, so the offline one stands in for it (a remote endpoint
/// would otherwise be contacted at load).
async fn load_bench(context: &JobContext) -> Result<Workbench, PipelineError> {
    let mut spec = context.spec.clone();
    spec.summarizer = dnd_summarize::SummarizerConfig {
        backend: dnd_summarize::Backend::Consensus,
        ..Default::default()
    };
    let store = Location::create(&spec.out)?;
    let cache = ContentCache::new(match &spec.cache {
        Some(c) => Location::create(c)?,
        None => store.join("cache"),
    });
    let device = parse_device(&spec.device)?;
    let reference: ModelRef = spec.target.model.parse()?;
    let target = Arc::new(
        tokio::task::spawn_blocking(move || TargetModel::load(&reference, &device)).await??,
    );
    Workbench::load(&spec, target, cache).await
}

/// The job's own labels, from its compacted descriptions.
async fn job_labels(
    dir: &JobDir,
    max: usize,
) -> Result<Vec<(LayerName, LabelToScore)>, PipelineError> {
    let path = JobDir::results_path(ResultTable::Descriptions);
    if !dir.location().exists(&path).await? {
        return Err(PipelineError::BadJob {
            origin: dir.location().to_string(),
            reason: format!(
                "it has no {path}: run the job to completion (`dnd dissect` with the same \
                 name resumes it) before evaluating its labels"
            ),
        });
    }
    Ok(dir.descriptions().await?.iter().flat_map(|d| tagged(d, max)).collect())
}

fn tagged(d: &dnd_store::results::DescriptionRow, max: usize) -> Vec<(LayerName, LabelToScore)> {
    reported_labels(d, max).into_iter().map(|l| (d.layer.clone(), l)).collect()
}

/// Reads a labels file and checks every row against the job's layers and neurons.
async fn file_labels(
    path: &str,
    context: &JobContext,
    max: usize,
) -> Result<Vec<(LayerName, LabelToScore)>, PipelineError> {
    let bad = |reason: String| PipelineError::BadLabels { origin: path.to_string(), reason };
    let (location, file) = split_file(path)?;
    let batches = if file.ends_with(".parquet") {
        read_parquet(&location, &file).await?
    } else if file.ends_with(".csv") {
        read_csv(&location.get(&file).await?).map_err(bad)?
    } else {
        return Err(
            bad("give a .csv or .parquet file with layer, neuron and label columns".into()),
        );
    };
    let found: Vec<String> = batches
        .first()
        .map(|b| b.schema().fields().iter().map(|f| f.name().clone()).collect())
        .unwrap_or_default();
    let missing: Vec<&str> = ["layer", "neuron", "label"]
        .into_iter()
        .filter(|c| !found.iter().any(|f| f == c))
        .collect();
    if !missing.is_empty() {
        return Err(bad(format!(
            "it has no {} column (found: {}); the file needs layer, neuron and label",
            missing.join(", "),
            if found.is_empty() { "no rows".to_string() } else { found.join(", ") }
        )));
    }
    let rows: Vec<LabelFileRow> =
        batches_rows("labels", &batches).map_err(|e| bad(e.to_string()))?;
    let widths: BTreeMap<&str, usize> =
        context.plan.layers.iter().map(|l| (l.name.as_str(), l.width)).collect();
    let mut ranks: BTreeMap<(String, i64), usize> = BTreeMap::new();
    let mut out = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        let line = i + 1;
        let Some(&width) = widths.get(row.layer.as_str()) else {
            let known: Vec<&str> = widths.keys().copied().collect();
            return Err(bad(format!(
                "row {line} names layer `{}`, which the job did not probe (its layers: {})",
                row.layer,
                known.join(", ")
            )));
        };
        if row.neuron < 0 || row.neuron as usize >= width {
            return Err(bad(format!(
                "row {line} names neuron {} of `{}`, which has neurons 0..{width}",
                row.neuron, row.layer
            )));
        }
        let rank = ranks.entry((row.layer.clone(), row.neuron)).or_insert(0);
        *rank += 1;
        if *rank > max || row.label.trim().is_empty() {
            continue;
        }
        out.push((
            LayerName::new(row.layer.as_str()),
            LabelToScore {
                neuron: NeuronId::new(row.neuron as u32),
                rank: *rank,
                label: row.label.trim().to_string(),
            },
        ));
    }
    Ok(out)
}

/// A file path or URL as its directory's location and the file's name.
fn split_file(path: &str) -> Result<(Location, String), PipelineError> {
    let (dir, file) = match path.rsplit_once('/') {
        Some((dir, file)) if !dir.is_empty() => (dir.to_string(), file.to_string()),
        Some((_, file)) => ("/".to_string(), file.to_string()),
        None => (".".to_string(), path.to_string()),
    };
    Ok((Location::create(&dir)?, file))
}

fn read_csv(bytes: &[u8]) -> Result<Vec<RecordBatch>, String> {
    use arrow::csv::ReaderBuilder;
    use arrow::csv::reader::Format;
    let format = Format::default().with_header(true);
    let (schema, _) = format
        .infer_schema(std::io::Cursor::new(bytes), Some(1000))
        .map_err(|e| format!("it is not a readable CSV file: {e}"))?;
    let reader = ReaderBuilder::new(Arc::new(schema))
        .with_format(format)
        .build(std::io::Cursor::new(bytes))
        .map_err(|e| format!("it is not a readable CSV file: {e}"))?;
    reader.collect::<Result<Vec<_>, _>>().map_err(|e| format!("it is not a readable CSV file: {e}"))
}

/// The labels grouped as the job's neuron tasks group their neurons: (task, layer, labels).
fn batches(
    context: &JobContext,
    labels: &[(LayerName, LabelToScore)],
) -> Vec<(String, LayerName, Vec<LabelToScore>)> {
    let mut out: Vec<(String, LayerName, Vec<LabelToScore>)> = context
        .plan
        .neuron_tasks
        .iter()
        .map(|t| (t.id.to_string(), t.layer.clone(), Vec::new()))
        .collect();
    let mut extra: BTreeMap<LayerName, Vec<LabelToScore>> = BTreeMap::new();
    for (layer, label) in labels {
        let task = context
            .plan
            .neuron_tasks
            .iter()
            .position(|t| t.layer == *layer && t.neurons.contains(&label.neuron));
        match task {
            Some(i) => out[i].2.push(label.clone()),
            // A labels file may name neurons the job did not describe: batched per layer.
            None => extra.entry(layer.clone()).or_default().push(label.clone()),
        }
    }
    for (layer, labels) in extra {
        for (i, chunk) in labels.chunks(16).enumerate() {
            out.push((format!("{layer}-extra-{i:05}"), layer.clone(), chunk.to_vec()));
        }
    }
    out.retain(|(_, _, l)| !l.is_empty());
    out
}

/// Replaces `source`'s rows of `results/evaluation.parquet` with its batches' parts,
/// keeping other sources' rows; the number of `source` rows.
async fn merge_into_results(
    dir: &JobDir,
    parts: &Location,
    source: &str,
    batches: &[(String, LayerName, Vec<LabelToScore>)],
) -> Result<usize, PipelineError> {
    let path = JobDir::results_path(ResultTable::Evaluation);
    let mut rows: Vec<EvaluationRow> = if dir.location().exists(&path).await? {
        dir.results::<EvaluationRow>(ResultTable::Evaluation).await?
    } else {
        Vec::new()
    };
    rows.retain(|r| r.source != source);
    let mut added = 0;
    for (task, _, _) in batches {
        let part: Vec<EvaluationRow> =
            batches_rows("evaluation", &read_parquet(parts, &format!("{task}.parquet")).await?)?;
        added += part.len();
        rows.extend(part);
    }
    write_parquet(dir.location(), &path, &ResultTable::Evaluation.batch(&rows)?).await?;
    Ok(added)
}

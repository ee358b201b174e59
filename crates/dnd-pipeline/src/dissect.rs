//! A whole dissection, embedded: stage 0 over the probe set, then stages 1-3 as neuron
//! tasks, each committed exactly once, then compaction into the results dataset.
//!
//! Layout under `<out>`:
//! ```text
//! jobs/<job>/job.json                      the spec (a re-run must match it)
//! jobs/<job>/probe/...                     stage 0 (topk/<layer>.parquet, errors, probe.json)
//! jobs/<job>/tasks/<task>/<attempt>/*.parquet, tasks/<task>/_COMMITTED
//! jobs/<job>/images/crops/..../<hash>.png  attention crops
//! jobs/<job>/results/<table>.parquet       the compacted results
//! jobs/<job>/summary.json                  what this run did
//! cache/{images,captions,replies}/...      content-addressed, shared by jobs
//! ```

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use serde::Serialize;

use dnd_core::Scored;
use dnd_models::device::parse_device;
use dnd_models::{ModelRef, TargetModel};
use dnd_store::results::{DescriptionRow, ResultTable};
use dnd_store::tables::TopKRow;
use dnd_store::{CacheCounts, CacheKind, ContentCache, Location, TaskStore, batches_rows, read_parquet, write_parquet};

use crate::describe::{DESCRIBE_STAGES, NeuronTask, TaskTables, run_neuron_task};
use crate::error::PipelineError;
use crate::images::ProbeImages;
use crate::job::JobSpec;
use crate::probe::{LayerPlan, ProbeConfig, peak_rss_mib, run_probe};
use crate::progress::Progress;
use crate::workbench::Workbench;

/// What a dissection run did, also written as `summary.json` in the job directory.
#[derive(Debug, Clone, Serialize)]
pub struct DissectSummary {
    pub dnd_version: String,
    pub job: String,
    /// The job directory.
    pub location: String,
    pub results: Vec<String>,
    pub models: BTreeMap<String, String>,
    pub tasks: usize,
    /// Tasks already committed by an earlier run of the job.
    pub tasks_resumed: usize,
    pub neurons: usize,
    pub neurons_ok: usize,
    pub neurons_no_candidates: usize,
    pub neurons_failed: usize,
    /// Cache hits and misses of this run, by kind. A miss is one model call.
    pub cache: BTreeMap<String, CacheCounts>,
    /// Share of cacheable model calls (captions, images, replies) the caches answered.
    pub cache_hit_rate: f64,
    pub load_seconds: f64,
    pub probe_seconds: f64,
    pub describe_seconds: f64,
    /// Seconds of stages 1-3 per neuron described in this run (resumed tasks excluded).
    pub seconds_per_neuron: f64,
    pub total_seconds: f64,
    pub peak_rss_mib: f64,
}

/// The run's summary and every neuron's description row.
pub struct DissectOutcome {
    pub summary: DissectSummary,
    pub descriptions: Vec<DescriptionRow>,
}

/// Splits each layer's neurons into tasks of `per_task`.
pub fn plan_tasks(spec: &JobSpec, layers: &[LayerPlan]) -> Result<Vec<NeuronTask>, PipelineError> {
    let mut tasks = Vec::new();
    for layer in layers {
        let neurons = spec.target.neurons.resolve(&layer.name, layer.width)?;
        for (i, chunk) in neurons.chunks(spec.describe.neurons_per_task).enumerate() {
            tasks.push(NeuronTask { id: format!("{}-{i:05}", layer.name), layer: layer.name.clone(), tap: layer.tap, neurons: chunk.to_vec() });
        }
    }
    Ok(tasks)
}

/// Where the probe images are: as given, or, for a synthetic probe set
/// (`synth:world?...`), the directory under `<out>/probe-sets/` it is rendered into
/// (once: a complete set, its scenes file written last, is reused).
async fn probe_images(spec: &JobSpec, out: &Location) -> Result<String, PipelineError> {
    let Some(parsed) = dnd_synth::ProbeSetSpec::parse(&spec.probe.images) else {
        return Ok(spec.probe.images.clone());
    };
    let set = parsed.map_err(|reason| dnd_core::CoreError::invalid("probe.images", reason))?;
    let dir = out.join(&format!("probe-sets/{}", set.dir_name()));
    if !dir.exists(dnd_synth::probe_set::SCENES_FILE).await? {
        let (images, scenes) = tokio::task::spawn_blocking(move || set.render_files()).await?;
        for (name, png) in images {
            dir.put(&name, Bytes::from(png)).await?;
        }
        dir.put(dnd_synth::probe_set::SCENES_FILE, Bytes::from(scenes)).await?;
    }
    Ok(dir.to_string())
}

/// Unique per attempt, so that no two attempts of a task ever write the same path.
fn attempt_name() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("attempt-{nanos:x}-{:x}", std::process::id())
}

async fn write_task(dir: &Location, tables: &TaskTables) -> Result<(), PipelineError> {
    for table in ResultTable::ALL {
        // Exhaustive: a new table cannot be forgotten here.
        let batch = match table {
            ResultTable::Descriptions => table.batch(&tables.descriptions)?,
            ResultTable::Candidates => table.batch(&tables.candidates)?,
            ResultTable::Scores => table.batch(&tables.scores)?,
            ResultTable::Captions => table.batch(&tables.captions)?,
            ResultTable::Images => table.batch(&tables.images)?,
            ResultTable::Exchanges => table.batch(&tables.exchanges)?,
            ResultTable::Errors => table.batch(&tables.errors)?,
        };
        write_parquet(dir, &table.file(), &batch).await?;
    }
    Ok(())
}

/// Each neuron's probe top-K, read back from stage 0's tables, as indices into the probe set.
async fn read_topk(probe: &Location, layer: &str, images: &ProbeImages) -> Result<HashMap<usize, Vec<Scored>>, PipelineError> {
    let index: HashMap<&str, u32> = images.images.iter().enumerate().map(|(i, r)| (r.id.as_str(), i as u32)).collect();
    let rows: Vec<TopKRow> = batches_rows("topk", &read_parquet(probe, &format!("topk/{layer}.parquet")).await?)?;
    let mut top: HashMap<usize, Vec<Scored>> = HashMap::new();
    for row in rows {
        // An id no longer in the probe set (the set changed under a resumed job) is skipped.
        if let Some(&image) = index.get(row.image_id.as_str()) {
            top.entry(row.neuron as usize).or_default().push(Scored { image, activation: row.activation });
        }
    }
    Ok(top)
}

/// A job with everything loaded and checked, ready to run. Tests and other front ends
/// may swap a model of [`Dissection::bench`] before running it.
pub struct Dissection {
    pub spec: JobSpec,
    pub name: String,
    /// The job directory, `<out>/jobs/<name>`.
    pub job: Location,
    pub bench: Workbench,
    pub layers: Vec<LayerPlan>,
    pub tasks: Vec<NeuronTask>,
    pub images: ProbeImages,
    probe_config: ProbeConfig,
    started: Instant,
}

/// Runs (or resumes) the job: [`Dissection::prepare`] then [`Dissection::run`].
pub async fn run_dissect(spec: &JobSpec, progress: &dyn Progress) -> Result<DissectOutcome, PipelineError> {
    Dissection::prepare(spec).await?.run(progress).await
}

impl Dissection {
    /// Checks everything a user can get wrong (the spec, the models, the layers and
    /// neurons, the probe set, the summariser's endpoint) and loads the models. Nothing is
    /// written yet.
    pub async fn prepare(spec: &JobSpec) -> Result<Self, PipelineError> {
        let started = Instant::now();
        spec.validate()?;
        let name = spec.job_name();
        let out = Location::create(&spec.out)?;
        let job = out.join(&format!("jobs/{name}"));
        let cache = ContentCache::new(match &spec.cache {
            Some(c) => Location::create(c)?,
            None => out.join("cache"),
        });
        let device = parse_device(&spec.device)?;
        let target = {
            let reference: ModelRef = spec.target.model.parse()?;
            Arc::new(tokio::task::spawn_blocking(move || TargetModel::load(&reference, &device)).await??)
        };
        let probe_config = ProbeConfig {
            layers: spec.target.layers.clone(),
            top_k: spec.probe.top_k,
            pooling: spec.probe.pooling,
            batch_size: spec.probe.batch_size,
            write_activations: false,
            crops: None,
            limits: spec.probe.limits.clone(),
        };
        let layers = probe_config.plan(&target)?;
        let tasks = plan_tasks(spec, &layers)?;
        let bench = Workbench::load(spec, target, cache).await?;
        // Last, because a synthetic probe set is rendered here: only once all else is checked.
        let images = ProbeImages::discover(&probe_images(spec, &out).await?).await?;
        Ok(Self { spec: spec.clone(), name, job, bench, layers, tasks, images, probe_config, started })
    }

    pub async fn run(self, progress: &dyn Progress) -> Result<DissectOutcome, PipelineError> {
        let Dissection { spec, name, job, bench, layers, tasks, images, probe_config, started } = self;
        let spec = &spec;
        let target = bench.target.clone();
        // The spec is the job's identity: a re-run resumes only the same job.
        let spec_json = serde_json::to_vec_pretty(&(&name, spec)).map_err(|e| PipelineError::Internal(e.to_string()))?;
        if !job.put_if_absent("job.json", Bytes::from(spec_json.clone())).await? && job.get("job.json").await? != spec_json {
            return Err(PipelineError::BadJob {
                origin: job.display_path("job.json"),
                reason: format!("a different job named `{name}` is already there; give this one another name (--name) or another --out"),
            });
        }
        let load_seconds = started.elapsed().as_secs_f64();

        // Stage 0.
        let probe_started = Instant::now();
        let probe_dir = job.join("probe");
        if !probe_dir.exists("_COMMITTED").await? {
            run_probe(target.clone(), images.clone(), &probe_dir, &probe_config, progress).await?;
            probe_dir.put_if_absent("_COMMITTED", Bytes::from_static(b"probe")).await?;
        }
        let mut top_by_layer = HashMap::new();
        for layer in &layers {
            top_by_layer.insert(layer.name.clone(), read_topk(&probe_dir, &layer.name, &images).await?);
        }
        let probe_seconds = probe_started.elapsed().as_secs_f64();

        // Stages 1-3, task by task.
        let describe_started = Instant::now();
        let store = TaskStore::new(job.clone());
        let total_neurons: usize = tasks.iter().map(|t| t.neurons.len()).sum();
        progress.begin_stages(&DESCRIBE_STAGES.map(|s| (s, total_neurons as u64)));
        let mut resumed = 0;
        let mut described_now = 0;
        for task in &tasks {
            if store.committed(&task.id).await?.is_some() {
                resumed += 1;
                for stage in DESCRIBE_STAGES {
                    progress.advance_stage(stage, task.neurons.len() as u64);
                }
                continue;
            }
            let empty = Vec::new();
            let top: Vec<Vec<Scored>> =
                task.neurons.iter().map(|n| top_by_layer[&task.layer].get(n).unwrap_or(&empty).clone()).collect();
            let tables = run_neuron_task(&bench, spec, task, &top, &images.images, &job, progress).await?;
            let attempt = attempt_name();
            write_task(&store.attempt_dir(&task.id, &attempt)?, &tables).await?;
            store.commit(&task.id, &attempt).await?;
            described_now += task.neurons.len();
        }
        progress.end_stages();
        let describe_seconds = describe_started.elapsed().as_secs_f64();

        let task_ids: Vec<String> = tasks.iter().map(|t| t.id.clone()).collect();
        let results = store.compact(&task_ids).await?;
        let descriptions: Vec<DescriptionRow> =
            batches_rows("descriptions", &read_parquet(&job, "results/descriptions.parquet").await?)?;

        let cache: BTreeMap<String, CacheCounts> = CacheKind::ALL.iter().map(|k| (k.name().to_string(), bench.cache.counts(*k))).collect();
        let (hits, lookups) = cache.values().fold((0, 0), |(h, t), c| (h + c.hits, t + c.hits + c.misses));
        let count = |status: &str| descriptions.iter().filter(|d| d.status == status).count();
        let summary = DissectSummary {
            dnd_version: env!("CARGO_PKG_VERSION").into(),
            job: name,
            location: job.to_string(),
            results: results.iter().map(|r| job.display_path(r)).collect(),
            models: [
                ("target", target.reference.clone()),
                ("captioner", bench.captioner.identity.clone()),
                ("generator", bench.generator.identity.clone()),
                ("embedder", bench.embedder.identity.clone()),
                ("summarizer", bench.summarizer.identity.clone()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
            tasks: tasks.len(),
            tasks_resumed: resumed,
            neurons: total_neurons,
            neurons_ok: count("ok"),
            neurons_no_candidates: count("no_candidates"),
            neurons_failed: count("failed"),
            cache,
            cache_hit_rate: if lookups == 0 { 0.0 } else { hits as f64 / lookups as f64 },
            load_seconds,
            probe_seconds,
            describe_seconds,
            seconds_per_neuron: if described_now == 0 { 0.0 } else { describe_seconds / described_now as f64 },
            total_seconds: started.elapsed().as_secs_f64(),
            peak_rss_mib: peak_rss_mib(),
        };
        let json = serde_json::to_vec_pretty(&summary).map_err(|e| PipelineError::Internal(e.to_string()))?;
        job.put("summary.json", Bytes::from(json)).await?;
        Ok(DissectOutcome { summary, descriptions })
    }
}

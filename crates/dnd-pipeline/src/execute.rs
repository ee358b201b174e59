//! Running one task of a job, as a worker does: the task it leased, a probe slice (stage 0
//! on part of the probe set) or a neuron batch (stages 1-3). Outputs go to the attempt's
//! own directory, with `stats.json` last; committing them is the caller's step.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use dnd_core::{LayerName, NeuronId, Scored, Stage, TaskDef, TaskWork, UnitStatus};
use dnd_store::results::{DescriptionRow, DescriptionStatus, ResultTable};
use dnd_store::tables::{TopKRow, UnitRow};
use dnd_store::{CacheCounts, CacheKind, Location, batches_rows, read_parquet, write_parquet};

use crate::error::PipelineError;
use crate::images::ProbeImages;
use crate::job::JobSpec;
use crate::job_dir::JobDir;
use crate::neuron_task::{NeuronTask, TaskTables, run_neuron_task};
use crate::plan::{JobPlan, probe_config};
use crate::probe::run_probe;
use crate::progress::Progress;
use crate::stages::evaluate::{
    DND_LABELS, LabelToScore, ProbeMeasurements, evaluate_labels, reported_labels,
};
use crate::units::Readout;
use crate::workbench::Workbench;

pub const STATS_FILE: &str = "stats.json";

/// Each neuron's merged probe top-K of a layer, as indices into the probe set.
type NeuronTopK = HashMap<NeuronId, Vec<Scored>>;

/// What one attempt of a task did, written as `stats.json` in its directory.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TaskStats {
    pub task: String,
    pub attempt: String,
    /// `probe` or `neurons`.
    pub kind: String,
    pub images: usize,
    pub neurons: usize,
    pub seconds: f64,
    /// Cache lookups of this attempt, by kind; a miss is one model call.
    pub cache: BTreeMap<String, CacheCounts>,
    /// Identities of the models the attempt ran.
    pub models: BTreeMap<String, String>,
}

fn cache_counts(bench: &Workbench) -> [CacheCounts; 4] {
    CacheKind::ALL.map(|k| bench.cache.counts(k))
}

/// A job as a worker sees it: its spec and plan, its probe images, and the top-K lists it
/// has read so far, shared by the job's tasks on this worker.
pub struct JobContext {
    pub name: String,
    pub spec: JobSpec,
    pub plan: JobPlan,
    pub dir: JobDir,
    pub images: ProbeImages,
    topk: Mutex<HashMap<LayerName, Arc<NeuronTopK>>>,
    /// Each dictionary layer's unit statuses from the merged probe (dead, dense).
    statuses: Mutex<HashMap<LayerName, Arc<HashMap<NeuronId, UnitStatus>>>>,
    probe_measurements: Mutex<HashMap<LayerName, Arc<ProbeMeasurements>>>,
}

impl JobContext {
    /// Reads a job's spec and plan from its directory and lists its probe images.
    pub async fn open(dir: JobDir) -> Result<Self, PipelineError> {
        let (name, spec) = dir.spec().await?;
        let plan = dir.plan().await?;
        let images = ProbeImages::discover(&plan.probe_images).await?;
        if images.images.len() != plan.images {
            return Err(PipelineError::BadJob {
                origin: plan.probe_images.clone(),
                reason: format!(
                    "the probe set changed since the job was planned ({} images then, {} now)",
                    plan.images,
                    images.images.len()
                ),
            });
        }
        Ok(Self {
            name,
            spec,
            plan,
            dir,
            images,
            topk: Mutex::new(HashMap::new()),
            statuses: Mutex::new(HashMap::new()),
            probe_measurements: Mutex::new(HashMap::new()),
        })
    }

    /// What the models measure on the whole probe set at `layer` (for evaluation), once
    /// per layer on this worker.
    pub async fn probe_measurements(
        &self,
        bench: &Workbench,
        layer: &LayerName,
    ) -> Result<Arc<ProbeMeasurements>, PipelineError> {
        let mut cached = self.probe_measurements.lock().await;
        if let Some(m) = cached.get(layer) {
            return Ok(m.clone());
        }
        let measured = Arc::new(
            ProbeMeasurements::measure(
                bench,
                &self.images.images,
                &self.spec.probe.limits,
                &self.readout(bench, layer.as_str())?,
                self.spec.probe.pooling,
                self.spec.describe.batch_size,
            )
            .await?,
        );
        cached.insert(layer.clone(), measured.clone());
        Ok(measured)
    }

    /// What `layer`'s neuron ids index on this worker, checked against the plan: a worker
    /// whose dictionary is not the one the job was planned with must not describe it.
    pub fn readout(&self, bench: &Workbench, layer: &str) -> Result<Readout, PipelineError> {
        let readout = bench.readout(layer)?;
        let planned = self.plan.layer(layer).and_then(|l| l.units.as_ref());
        let planned = planned.map(|u| u.source.as_str());
        if readout.source() != planned {
            return Err(PipelineError::BadJob {
                origin: self.dir.location().to_string(),
                reason: format!(
                    "layer {layer} was planned with dictionary {}, and this worker loaded {}: give it the job's [target.units]",
                    planned.unwrap_or("none (channels)"),
                    readout.source().unwrap_or("none (channels)"),
                ),
            });
        }
        Ok(readout)
    }

    /// The statuses of `layer`'s units from the merged probe (none for channels).
    async fn unit_statuses(
        &self,
        layer: &LayerName,
    ) -> Result<Arc<HashMap<NeuronId, UnitStatus>>, PipelineError> {
        let mut cached = self.statuses.lock().await;
        if let Some(s) = cached.get(layer) {
            return Ok(s.clone());
        }
        let mut statuses = HashMap::new();
        if self.plan.layer(layer.as_str()).is_some_and(|l| l.units.is_some()) {
            let rel = format!("probe/units/{layer}.parquet");
            let rows: Vec<UnitRow> =
                batches_rows("units", &read_parquet(self.dir.location(), &rel).await?)?;
            statuses.extend(rows.into_iter().map(|r| (r.neuron, r.status)));
        }
        let statuses = Arc::new(statuses);
        cached.insert(layer.clone(), statuses.clone());
        Ok(statuses)
    }

    /// Each neuron's merged probe top-K of `layer`, as indices into the probe set.
    async fn layer_topk(&self, layer: &LayerName) -> Result<Arc<NeuronTopK>, PipelineError> {
        let mut cached = self.topk.lock().await;
        if let Some(t) = cached.get(layer) {
            return Ok(t.clone());
        }
        let index: HashMap<&str, u32> =
            self.images.images.iter().enumerate().map(|(i, r)| (r.id.as_str(), i as u32)).collect();
        let rows: Vec<TopKRow> = batches_rows(
            "topk",
            &read_parquet(self.dir.location(), &format!("probe/topk/{layer}.parquet")).await?,
        )?;
        let mut top: HashMap<NeuronId, Vec<Scored>> = HashMap::new();
        for row in rows {
            if let Some(&image) = index.get(row.image_id.as_str()) {
                top.entry(row.neuron)
                    .or_default()
                    .push(Scored { image, activation: row.activation });
            }
        }
        let top = Arc::new(top);
        cached.insert(layer.clone(), top.clone());
        Ok(top)
    }

    /// Stages 1-3 (and `[evaluate]`) for a neuron batch of `layer`: its units that the
    /// probe found dead or dense, and `[units] skip` names, get their status only.
    async fn describe(
        &self,
        bench: &Workbench,
        task: &TaskDef,
        layer: &LayerName,
        neurons: &[NeuronId],
        progress: &dyn Progress,
    ) -> Result<TaskTables, PipelineError> {
        let readout = self.readout(bench, layer.as_str())?;
        let statuses = self.unit_statuses(layer).await?;
        let skipped = |n: &NeuronId| statuses.get(n).copied().filter(|s| self.spec.units.skips(*s));
        let described: Vec<NeuronId> =
            neurons.iter().filter(|n| skipped(n).is_none()).copied().collect();
        let neuron_task = NeuronTask {
            id: task.id.clone(),
            layer: layer.clone(),
            readout: readout.select(&described),
            neurons: described,
        };
        let mut tables = if neuron_task.neurons.is_empty() {
            TaskTables::default()
        } else {
            let top_by_neuron = self.layer_topk(layer).await?;
            let top: Vec<Vec<Scored>> = neuron_task
                .neurons
                .iter()
                .map(|n| top_by_neuron.get(n).cloned().unwrap_or_default())
                .collect();
            run_neuron_task(
                bench,
                &self.spec,
                &neuron_task,
                &top,
                &self.images.images,
                self.dir.location(),
                progress,
            )
            .await?
        };
        let skipped: Vec<(NeuronId, UnitStatus)> =
            neurons.iter().filter_map(|n| Some((*n, skipped(n)?))).collect();
        for stage in Stage::DESCRIBE {
            progress.advance_stage(stage, skipped.len() as u64);
        }
        tables
            .descriptions
            .extend(skipped.iter().map(|&(n, status)| skipped_row(&neuron_task, n, status)));
        tables.descriptions.sort_by_key(|d| d.neuron);
        if let Some(config) = &self.spec.evaluate {
            let labels: Vec<LabelToScore> = tables
                .descriptions
                .iter()
                .flat_map(|d| reported_labels(d, config.labels))
                .collect();
            let probe = self.probe_measurements(bench, layer).await?;
            tables.evaluation = evaluate_labels(
                bench,
                &self.spec,
                config,
                layer,
                &neuron_task.readout,
                &probe,
                &labels,
                DND_LABELS,
            )
            .await?;
        }
        Ok(tables)
    }

    /// Runs `task`, as leased, with `bench`, writing under the attempt's directory.
    pub async fn run_task(
        &self,
        bench: &Workbench,
        task: &TaskDef,
        attempt: &str,
        progress: &dyn Progress,
    ) -> Result<TaskStats, PipelineError> {
        let dir = self.dir.tasks().attempt_dir(task.id.as_str(), attempt)?;
        let started = Instant::now();
        let before = cache_counts(bench);
        let mut stats =
            TaskStats { task: task.id.to_string(), attempt: attempt.into(), ..Default::default() };
        match &task.work {
            TaskWork::Probe { start, end } => {
                let (start, end) = (*start, *end);
                if start > end || end > self.images.images.len() {
                    return Err(PipelineError::BadJob {
                        origin: self.dir.location().to_string(),
                        reason: format!(
                            "probe task {} asks for images {start}..{end} of a probe set of {}",
                            task.id,
                            self.images.images.len()
                        ),
                    });
                }
                let mut images = self.images.clone();
                images.images = images.images[start..end].to_vec();
                // Listing errors belong to the job once: to its first slice.
                if start > 0 {
                    images.errors.clear();
                }
                let config = probe_config(&self.spec);
                for layer in &self.plan.layers {
                    self.readout(bench, &layer.name)?;
                }
                run_probe(
                    bench.target.clone(),
                    images,
                    &dir,
                    &config,
                    &bench.units,
                    Some(bench.target_vectors()),
                    progress,
                )
                .await?;
                stats.kind = "probe".into();
                stats.images = end - start;
                stats.models.insert("target".into(), bench.target.reference.clone());
            }
            TaskWork::Neurons { layer, neurons } => {
                let tables = self.describe(bench, task, layer, neurons, progress).await?;
                write_task(&dir, &tables).await?;
                stats.kind = "neurons".into();
                stats.neurons = neurons.len();
                stats.models = bench.identities();
            }
        }
        stats.seconds = started.elapsed().as_secs_f64();
        let after = cache_counts(bench);
        for (i, kind) in CacheKind::ALL.iter().enumerate() {
            stats.cache.insert(
                kind.name().into(),
                CacheCounts {
                    hits: after[i].hits - before[i].hits,
                    misses: after[i].misses - before[i].misses,
                },
            );
        }
        let json = serde_json::to_vec_pretty(&stats)
            .map_err(|e| PipelineError::Internal(e.to_string()))?;
        dir.put(STATS_FILE, Bytes::from(json)).await?;
        Ok(stats)
    }
}

/// Writes every results table of a neuron task into `dir`.
pub async fn write_task(dir: &Location, tables: &TaskTables) -> Result<(), PipelineError> {
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
            ResultTable::Evaluation => table.batch(&tables.evaluation)?,
        };
        write_parquet(dir, &table.file(), &batch).await?;
    }
    Ok(())
}

/// The description of a unit stages 1-3 skipped for its status: no label, the status says
/// why.
fn skipped_row(task: &NeuronTask, neuron: NeuronId, status: UnitStatus) -> DescriptionRow {
    DescriptionRow::unlabelled(
        task.layer.clone(),
        neuron,
        task.readout.kind(),
        task.readout.source().map(String::from),
        match status {
            UnitStatus::Dense => DescriptionStatus::Dense,
            _ => DescriptionStatus::Dead,
        },
        task.id.to_string(),
    )
}

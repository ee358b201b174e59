//! The coordinator's share of a job's data work: merging the probe slices' top-K lists,
//! recording a task that failed for good, and, at the end, compacting the committed tasks
//! into the results dataset with a summary. The layout is [`JobDir`]'s.

use std::collections::{BTreeMap, HashMap};

use dnd_core::{Firing, Liveness, NeuronId, TaskId};
use dnd_store::results::{DescriptionRow, DescriptionStatus, NeuronErrorRow, ResultTable};
use dnd_store::tables::{self, ErrorRow, TopKRow, UnitRow};
use dnd_store::tasks::READS_IN_FLIGHT;
use dnd_store::{CacheCounts, batches_rows, read_parquet, write_parquet};
use futures::StreamExt;

use crate::error::PipelineError;
use crate::execute::{STATS_FILE, TaskStats};
use crate::job_dir::JobDir;
use crate::plan::{JobPlan, PlannedLayer};
use crate::probe::{peak_rss_mib, unit_status};
pub use crate::summary::DissectSummary;

/// Attempt names the coordinator gives a task's failure record.
pub const FAILED_ATTEMPT_PREFIX: &str = "failed-";

/// Merges the committed probe slices into each layer's top-K (the `top_k` most activating
/// images per neuron; ties go to the earlier image id, as within a slice), the firing
/// counts of each dictionary's units (their statuses by `liveness`) and the probe errors,
/// then marks stage 0 done.
pub async fn merge_probe(
    dir: &JobDir,
    plan: &JobPlan,
    top_k: usize,
    liveness: &Liveness,
) -> Result<(), PipelineError> {
    let job = dir.location();
    let store = dir.tasks();
    let mut slices = Vec::new();
    for slice in &plan.probe_tasks {
        let attempt = store.committed(slice.id.as_str()).await?.ok_or_else(|| {
            PipelineError::Internal(format!("probe task {} is not committed", slice.id))
        })?;
        slices.push(store.attempt_dir(slice.id.as_str(), &attempt)?);
    }
    for layer in &plan.layers {
        let mut by_neuron: BTreeMap<NeuronId, Vec<TopKRow>> = BTreeMap::new();
        for dir in &slices {
            let rows: Vec<TopKRow> = batches_rows(
                "topk",
                &read_parquet(dir, &format!("topk/{}.parquet", layer.name)).await?,
            )?;
            for row in rows {
                by_neuron.entry(row.neuron).or_default().push(row);
            }
        }
        let mut merged = Vec::new();
        for (_, mut rows) in by_neuron {
            rows.sort_by(|a, b| {
                b.activation.total_cmp(&a.activation).then_with(|| a.image_id.cmp(&b.image_id))
            });
            rows.truncate(top_k);
            for (rank, mut row) in rows.into_iter().enumerate() {
                row.rank = rank as i32;
                merged.push(row);
            }
        }
        write_parquet(
            job,
            &format!("probe/topk/{}.parquet", layer.name),
            &tables::topk_batch(&merged)?,
        )
        .await?;
        if layer.units.is_some() {
            let units = merge_units(layer, &slices, liveness).await?;
            let rel = format!("probe/units/{}.parquet", layer.name);
            write_parquet(job, &rel, &tables::units_batch(&units)?).await?;
        }
    }
    let mut errors: Vec<ErrorRow> = Vec::new();
    for dir in &slices {
        errors.extend(batches_rows::<ErrorRow>(
            "errors",
            &read_parquet(dir, "errors.parquet").await?,
        )?);
    }
    write_parquet(job, "probe/errors.parquet", &tables::errors_batch(&errors)?).await?;
    dir.mark_probe_merged().await
}

/// The units table of a layer summed over the probe slices, statuses by `liveness`.
async fn merge_units(
    layer: &PlannedLayer,
    slices: &[dnd_store::Location],
    liveness: &Liveness,
) -> Result<Vec<UnitRow>, PipelineError> {
    let mut rows: Vec<Option<UnitRow>> = vec![None; layer.width];
    let mut firing = Firing::new(layer.width);
    for dir in slices {
        let slice: Vec<UnitRow> = batches_rows(
            "units",
            &read_parquet(dir, &format!("units/{}.parquet", layer.name)).await?,
        )?;
        let mut counts = Firing::new(layer.width);
        for row in slice {
            let u = row.neuron.index();
            if u >= layer.width {
                return Err(PipelineError::Internal(format!(
                    "unit {u} of {} is beyond its {} units",
                    layer.name, layer.width
                )));
            }
            counts.images = row.images as u64;
            counts.fired_images[u] = row.fired_images as u64;
            counts.position_share[u] = row.position_share;
            rows[u].get_or_insert(row);
        }
        firing.merge(&counts);
    }
    Ok(rows
        .into_iter()
        .enumerate()
        .filter_map(|(u, row)| {
            let mut row = row?;
            row.images = firing.images as i64;
            row.fired_images = firing.fired_images[u] as i64;
            row.position_share = firing.position_share[u];
            row.firing_rate = firing.rate(u);
            row.status = unit_status(row.unit_kind, &firing, u, liveness);
            Some(row)
        })
        .collect())
}

/// Records that a neuron task failed for good: every neuron of it gets a `failed`
/// description and an error row with the task's last error, committed as the task's
/// output so that the job's results still hold every neuron exactly once.
pub async fn commit_failed_task(
    job: &JobDir,
    plan: &JobPlan,
    task: &str,
    attempts: u32,
    error: &str,
) -> Result<(), PipelineError> {
    let Some(batch) = plan.neuron_tasks.iter().find(|t| t.id == task) else {
        return Err(PipelineError::Internal(format!("no neuron task `{task}` in the plan")));
    };
    let unit = plan.layer(batch.layer.as_str()).cloned().unwrap_or_else(|| PlannedLayer {
        name: batch.layer.to_string(),
        width: 0,
        spatial: false,
        units: None,
    });
    let store = job.tasks();
    let attempt = format!("{FAILED_ATTEMPT_PREFIX}{attempts}");
    let dir = store.attempt_dir(task, &attempt)?;
    let message = format!("the task failed {attempts} times; last error: {error}");
    let descriptions: Vec<DescriptionRow> = batch
        .neurons
        .iter()
        .map(|&n| DescriptionRow {
            error: Some(message.clone()),
            ..DescriptionRow::unlabelled(
                batch.layer.clone(),
                n,
                unit.unit_kind(),
                unit.unit_source(),
                DescriptionStatus::Failed,
                task.into(),
            )
        })
        .collect();
    let errors: Vec<NeuronErrorRow> = batch
        .neurons
        .iter()
        .map(|&n| NeuronErrorRow {
            layer: batch.layer.clone(),
            neuron: n,
            unit_kind: unit.unit_kind(),
            unit_source: unit.unit_source(),
            stage: "task".into(),
            image_id: None,
            reason: "task_failed".into(),
            message: message.clone(),
            task: task.into(),
        })
        .collect();
    for table in ResultTable::ALL {
        let batch = match table {
            ResultTable::Descriptions => table.batch(&descriptions)?,
            ResultTable::Errors => table.batch(&errors)?,
            other => other.batch::<DescriptionRow>(&[])?,
        };
        write_parquet(&dir, &table.file(), &batch).await?;
    }
    store.commit(task, &attempt).await?;
    Ok(())
}

/// How a job's run went, as the coordinator saw it.
#[derive(Debug, Clone, Default)]
pub struct RunFacts {
    pub tasks_resumed: usize,
    pub total_seconds: f64,
    pub load_seconds: f64,
}

/// Compacts the committed neuron tasks into `results/*.parquet`, then writes
/// `summary.json` from the attempts' `stats.json`.
pub async fn finish_job(
    dir: &JobDir,
    plan: &JobPlan,
    facts: &RunFacts,
) -> Result<DissectSummary, PipelineError> {
    let job = dir.location();
    let store = dir.tasks();
    let task_ids: Vec<String> = plan.neuron_tasks.iter().map(|t| t.id.to_string()).collect();
    let results = store.compact(&task_ids).await?;
    let descriptions: Vec<DescriptionRow> = dir.descriptions().await?;

    let mut cache: BTreeMap<String, CacheCounts> = BTreeMap::new();
    let mut models = BTreeMap::new();
    let (mut probe_seconds, mut describe_seconds, mut described, mut tasks_failed) =
        (0.0, 0.0, 0usize, 0usize);
    // Each task's marker and stats, read several at a time (as compaction reads).
    let tasks: Vec<TaskId> = plan.task_ids().cloned().collect();
    let store = &store;
    let mut reads = futures::stream::iter(tasks)
        .map(move |task| async move {
            let Some(attempt) = store.committed(task.as_str()).await? else {
                return Ok::<_, PipelineError>(None);
            };
            if attempt.starts_with(FAILED_ATTEMPT_PREFIX) {
                return Ok(Some((task, attempt, None)));
            }
            let bytes = store.attempt_dir(task.as_str(), &attempt)?.get_opt(STATS_FILE).await?;
            Ok(Some((task, attempt, bytes)))
        })
        .buffered(READS_IN_FLIGHT);
    while let Some(read) = reads.next().await {
        let Some((task, attempt, bytes)) = read? else { continue };
        if attempt.starts_with(FAILED_ATTEMPT_PREFIX) {
            tasks_failed += 1;
            continue;
        }
        let Some(bytes) = bytes else {
            continue;
        };
        let stats: TaskStats = serde_json::from_slice(&bytes)
            .map_err(|e| PipelineError::Internal(format!("{task}/{attempt}/{STATS_FILE}: {e}")))?;
        for (kind, c) in &stats.cache {
            let entry = cache.entry(kind.clone()).or_default();
            entry.hits += c.hits;
            entry.misses += c.misses;
        }
        if stats.kind == "probe" {
            probe_seconds += stats.seconds;
        } else {
            describe_seconds += stats.seconds;
            described += stats.neurons;
        }
        models.extend(stats.models);
    }
    let (hits, lookups) =
        cache.values().fold((0, 0), |(h, t), c| (h + c.hits, t + c.hits + c.misses));
    let count = |status| descriptions.iter().filter(|d| d.status == status).count();
    let summary = DissectSummary {
        dnd_version: env!("CARGO_PKG_VERSION").into(),
        job: plan.job.to_string(),
        location: job.to_string(),
        results: results.iter().map(|r| job.display_path(r)).collect(),
        models,
        tasks: plan.neuron_tasks.len() + plan.probe_tasks.len(),
        tasks_resumed: facts.tasks_resumed,
        tasks_failed,
        neurons: plan.neurons(),
        neurons_ok: count(DescriptionStatus::Ok),
        neurons_no_candidates: count(DescriptionStatus::NoCandidates),
        neurons_failed: count(DescriptionStatus::Failed),
        neurons_dead: count(DescriptionStatus::Dead),
        neurons_dense: count(DescriptionStatus::Dense),
        cache,
        cache_hit_rate: if lookups == 0 { 0.0 } else { hits as f64 / lookups as f64 },
        load_seconds: facts.load_seconds,
        probe_seconds,
        describe_seconds,
        seconds_per_neuron: if described == 0 { 0.0 } else { describe_seconds / described as f64 },
        total_seconds: facts.total_seconds,
        peak_rss_mib: peak_rss_mib(),
    };
    dir.write_summary(&summary).await?;
    Ok(summary)
}

/// Which tasks of the plan are committed, and which of those are failure records.
pub async fn committed_tasks(
    job: &JobDir,
    plan: &JobPlan,
) -> Result<HashMap<String, bool>, PipelineError> {
    let mut committed = job.tasks().committed_all().await?;
    let mut done = HashMap::new();
    for task in plan.task_ids() {
        if let Some(attempt) = committed.remove(task.as_str()) {
            done.insert(task.to_string(), attempt.starts_with(FAILED_ATTEMPT_PREFIX));
        }
    }
    Ok(done)
}

//! A whole dissection in one process, through the same scheduler and task protocol as a
//! cluster: an in-process coordinator serving gRPC on a loopback port, and one worker
//! that holds the models loaded (and checked) before any work starts.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use dnd_coordinator::{Coordinator, CoordinatorError, Phase, Settings};
use dnd_core::Stage;
use dnd_models::device::parse_device;
use dnd_models::{ModelRef, TargetModel};
use dnd_pipeline::finish::DissectSummary;
use dnd_pipeline::plan::{layer_plans, resolve_probe_images};
use dnd_pipeline::{JobDir, JobSpec, PipelineError, ProbeImages, Progress, Workbench};
use dnd_store::results::DescriptionRow;
use dnd_store::{ContentCache, Location};
use dnd_worker::{Worker, WorkerConfig};

/// The run's summary and every neuron's description row.
pub struct DissectOutcome {
    pub summary: DissectSummary,
    pub descriptions: Vec<DescriptionRow>,
}

/// A job with everything loaded and checked, ready to run. Tests and other front ends
/// may swap a model of [`Dissection::bench`] before running it.
pub struct Dissection {
    pub spec: JobSpec,
    pub name: String,
    pub store: Location,
    pub bench: Workbench,
    load_seconds: f64,
}

/// Runs (or resumes) the job: [`Dissection::prepare`] then [`Dissection::run`].
pub async fn run_dissect(
    spec: &JobSpec,
    progress: &dyn Progress,
) -> Result<DissectOutcome, PipelineError> {
    Dissection::prepare(spec).await?.run(progress).await
}

fn pipeline_error(e: CoordinatorError) -> PipelineError {
    match e {
        CoordinatorError::Pipeline(e) => e,
        CoordinatorError::Store(e) => e.into(),
        other => PipelineError::Internal(other.to_string()),
    }
}

impl Dissection {
    /// Checks everything a user can get wrong (the spec, the models, the layers and
    /// neurons, the probe set, the summariser's endpoint) and loads the models. Nothing is
    /// written yet, except a synthetic probe set, rendered once all else is checked.
    pub async fn prepare(spec: &JobSpec) -> Result<Self, PipelineError> {
        let started = Instant::now();
        spec.validate()?;
        let name = spec.job_name();
        let store = Location::create(&spec.out)?;
        let mut spec = spec.clone();
        spec.out = store.to_string();
        let cache = ContentCache::new(match &spec.cache {
            Some(c) => Location::create(c)?,
            None => store.join("cache"),
        });
        let device = parse_device(&spec.device)?;
        let target = {
            let reference: ModelRef = spec.target.model.parse()?;
            Arc::new(
                tokio::task::spawn_blocking(move || TargetModel::load(&reference, &device))
                    .await??,
            )
        };
        let units = dnd_pipeline::units::inspect_units(&spec, &target.shape())?;
        for layer in layer_plans(&spec, &target.shape())? {
            let width = units.get(&layer.tap).map_or(layer.width, |u| u.units);
            spec.target.neurons.resolve(&layer.name, width)?;
        }
        let bench = Workbench::load(&spec, target, cache).await?;
        ProbeImages::discover(&resolve_probe_images(&spec, &store).await?).await?;
        Ok(Self { spec, name, store, bench, load_seconds: started.elapsed().as_secs_f64() })
    }

    pub async fn run(self, progress: &dyn Progress) -> Result<DissectOutcome, PipelineError> {
        let Dissection { spec, name, store, bench, load_seconds } = self;
        let settings = Settings { resume_unfinished: false, ..Settings::default() };
        let coordinator =
            Coordinator::open(store.clone(), settings).await.map_err(pipeline_error)?;
        coordinator.provide_target(&spec.target.model, bench.target.shape()).await;

        let (stop, stopped) = watch::channel(false);
        let mut server_stop = stopped.clone();
        let (served, client) = dnd_coordinator::serve_loopback(coordinator.clone(), async move {
            let _ = server_stop.wait_for(|s| *s).await;
        })
        .await
        .map_err(|e| PipelineError::Internal(e.to_string()))?;

        let worker = Arc::new(Worker::new(WorkerConfig {
            client,
            name: "embedded".into(),
            device: None,
            grace: Duration::ZERO,
            lease_wait: Duration::from_secs(5),
        }));
        worker.provide_store(&store.to_string(), store.clone());
        worker.provide_bench(&spec, Arc::new(bench)).await;
        let running = {
            let worker = worker.clone();
            let stopped = stopped.clone();
            tokio::spawn(worker.run(stopped))
        };

        let outcome = async {
            let submitted =
                coordinator.submit(spec.clone(), load_seconds).await.map_err(pipeline_error)?;
            tracing::info!(
                job = submitted.job,
                tasks = submitted.tasks_total,
                resumed = submitted.tasks_resumed,
                "submitted"
            );
            follow(&coordinator, &name, progress).await?;
            let job = JobDir::under(&store, &name)?;
            let summary = job.summary().await?.ok_or_else(|| {
                PipelineError::Internal(format!("job {name} ended without a summary"))
            })?;
            let descriptions = job.descriptions().await?;
            Ok(DissectOutcome { summary, descriptions })
        }
        .await;
        let _ = stop.send(true);
        let _ = running.await;
        let _ = served.task.await;
        outcome
    }
}

/// Mirrors the job's progress onto `progress` until it ends.
async fn follow(
    coordinator: &Coordinator,
    job: &str,
    progress: &dyn Progress,
) -> Result<(), PipelineError> {
    let mut shown: std::collections::BTreeMap<Stage, u64> = Default::default();
    let mut probe_open = false;
    let mut describe_open = false;
    loop {
        let Some(view) = coordinator.view(job) else {
            return Err(PipelineError::Internal(format!("job {job} vanished")));
        };
        for &(stage, done, total) in &view.stages {
            let before = shown.get(&stage).copied();
            if stage == Stage::Probe {
                if before.is_none() {
                    progress.begin("probe", total);
                    probe_open = true;
                }
                progress.advance(done.saturating_sub(before.unwrap_or(0)));
            } else {
                if !describe_open {
                    if probe_open && view.phase != Phase::Probing {
                        progress.end();
                        probe_open = false;
                    }
                    if view.phase == Phase::Probing || view.phase == Phase::Merging {
                        break;
                    }
                    let totals: Vec<(Stage, u64)> = Stage::DESCRIBE
                        .into_iter()
                        .map(|s| {
                            let total = view.stages.iter().find(|(n, _, _)| *n == s);
                            (s, total.map_or(0, |(_, _, t)| *t))
                        })
                        .collect();
                    progress.begin_stages(&totals);
                    describe_open = true;
                }
                progress.advance_stage(stage, done.saturating_sub(before.unwrap_or(0)));
            }
            // A retried task's progress starts over; bars never go back.
            shown.insert(stage, done.max(before.unwrap_or(0)));
        }
        match view.phase {
            Phase::Succeeded => break,
            Phase::Failed => {
                return Err(PipelineError::Internal(format!("the job failed: {}", view.error)));
            }
            Phase::Cancelled => {
                return Err(PipelineError::Internal("the job was cancelled".into()));
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    if probe_open {
        progress.end();
    }
    if describe_open {
        progress.end_stages();
    }
    Ok(())
}

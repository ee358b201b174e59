//! A job's plan: its probe tasks (slices of the probe set) and neuron tasks (small
//! batches of one layer's neurons), fixed once and kept as `plan.json` in the job
//! directory, so that every worker, a restarted coordinator and a resubmission all see the
//! same tasks.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use dnd_core::{JobName, LayerName, NeuronId, TaskDef, TaskId, TaskWork, UnitKind};

use dnd_models::Tap;
use dnd_models::dictionary::DictionaryInfo;
use dnd_models::target::TargetShape;
use dnd_store::Location;

use crate::error::PipelineError;
use crate::images::ProbeImages;
use crate::job::JobSpec;
use crate::probe::{LayerPlan, ProbeConfig};

/// A slice `[start, end)` of the sorted probe set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeSlice {
    pub id: TaskId,
    pub start: usize,
    pub end: usize,
}

/// A batch of neurons of one layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NeuronBatch {
    pub id: TaskId,
    pub layer: LayerName,
    pub neurons: Vec<NeuronId>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedLayer {
    pub name: String,
    /// Units described: the channels, or the dictionary's units.
    pub width: usize,
    pub spatial: bool,
    /// The dictionary the layer's units come from; none for channels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub units: Option<PlannedUnits>,
}

/// A layer's dictionary as planned: workers check that theirs is the same.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedUnits {
    pub kind: UnitKind,
    /// The dictionary's identity, `blake3:...`.
    pub source: String,
    /// The channels it reads.
    pub channels: usize,
}

impl PlannedLayer {
    pub fn unit_kind(&self) -> UnitKind {
        self.units.as_ref().map_or(UnitKind::Channel, |u| u.kind)
    }

    pub fn unit_source(&self) -> Option<String> {
        self.units.as_ref().map(|u| u.source.clone())
    }
}

/// Everything a worker needs besides the spec to run any task of the job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobPlan {
    pub job: JobName,
    /// The probe set as workers read it: for a synthetic set, the directory it was
    /// rendered into.
    pub probe_images: String,
    pub images: usize,
    pub layers: Vec<PlannedLayer>,
    pub probe_tasks: Vec<ProbeSlice>,
    pub neuron_tasks: Vec<NeuronBatch>,
}

impl JobPlan {
    /// Plans `spec` for a target model's shape, its dictionaries (checked by
    /// [`crate::units::inspect_units`]) and a listed probe set. Fails on layers the model
    /// lacks and neuron ids beyond a layer's width (its units' count for a dictionary).
    pub fn make(
        spec: &JobSpec,
        target: &TargetShape,
        units: &BTreeMap<Tap, DictionaryInfo>,
        images: &ProbeImages,
    ) -> Result<Self, PipelineError> {
        let mut layers = probe_config(spec).plan(target)?;
        for layer in &mut layers {
            if let Some(info) = units.get(&layer.tap) {
                layer.width = info.units;
            }
        }
        let per_slice = spec.probe.images_per_task.max(1);
        let probe_tasks = (0..images.images.len().div_ceil(per_slice))
            .map(|i| ProbeSlice {
                id: TaskId::new(format!("probe-{i:05}")),
                start: i * per_slice,
                end: ((i + 1) * per_slice).min(images.images.len()),
            })
            .collect();
        let mut neuron_tasks = Vec::new();
        for layer in &layers {
            // The selection is keyed by the layer as the job spells it: `encoder.layers.11`
            // and `blocks.11` are one tap, planned under the second name.
            let key = spec
                .target
                .layers
                .iter()
                .find(|n| target.tap(n).is_ok_and(|t| t == layer.tap))
                .map_or(layer.name.as_str(), String::as_str);
            let neurons = spec.target.neurons.resolve(key, layer.width)?;
            for (i, chunk) in neurons.chunks(spec.describe.neurons_per_task).enumerate() {
                neuron_tasks.push(NeuronBatch {
                    id: TaskId::new(format!("{}-{i:05}", layer.name)),
                    layer: LayerName::new(layer.name.clone()),
                    neurons: chunk.to_vec(),
                });
            }
        }
        Ok(Self {
            job: JobName::new(spec.job_name()),
            probe_images: images.source.clone(),
            images: images.images.len(),
            layers: layers
                .iter()
                .map(|l| PlannedLayer {
                    name: l.name.clone(),
                    width: l.width,
                    spatial: l.tap.is_spatial(),
                    units: units.get(&l.tap).map(|info| PlannedUnits {
                        kind: info.kind,
                        source: info.identity.clone(),
                        channels: info.d_in,
                    }),
                })
                .collect(),
            probe_tasks,
            neuron_tasks,
        })
    }

    pub fn task_ids(&self) -> impl Iterator<Item = &TaskId> {
        self.probe_tasks.iter().map(|t| &t.id).chain(self.neuron_tasks.iter().map(|t| &t.id))
    }

    /// Every task of the plan with its work: probe slices first, then neuron batches.
    pub fn tasks(&self) -> Vec<TaskDef> {
        let probes = self.probe_tasks.iter().map(|t| TaskDef {
            id: t.id.clone(),
            work: TaskWork::Probe { start: t.start, end: t.end },
        });
        let neurons = self.neuron_tasks.iter().map(|t| TaskDef {
            id: t.id.clone(),
            work: TaskWork::Neurons { layer: t.layer.clone(), neurons: t.neurons.clone() },
        });
        probes.chain(neurons).collect()
    }

    pub fn neurons(&self) -> usize {
        self.neuron_tasks.iter().map(|t| t.neurons.len()).sum()
    }

    /// The planned layer named `name`.
    pub fn layer(&self, name: &str) -> Option<&PlannedLayer> {
        self.layers.iter().find(|l| l.name == name)
    }
}

/// The probe stage's settings for a job.
pub fn probe_config(spec: &JobSpec) -> ProbeConfig {
    ProbeConfig {
        layers: spec.target.layers.clone(),
        top_k: spec.probe.top_k,
        pooling: spec.probe.pooling,
        batch_size: spec.probe.batch_size,
        write_activations: false,
        crops: None,
        limits: spec.probe.limits.clone(),
        liveness: spec.units.clone(),
    }
}

/// The layer plans of a job, checked against the model.
pub fn layer_plans(spec: &JobSpec, target: &TargetShape) -> Result<Vec<LayerPlan>, PipelineError> {
    probe_config(spec).plan(target)
}

/// Where the probe images are: as given, or, for a synthetic probe set
/// (`synth:world?...`), the directory under `<out>/probe-sets/` it is rendered into
/// (once: a complete set, its scenes file written last, is reused).
pub async fn resolve_probe_images(spec: &JobSpec, out: &Location) -> Result<String, PipelineError> {
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

//! Stage 4 (optional): each label scored against the neuron it describes
//! ([`dnd_core::evaluation`]). The label's text embedding against every probe image's
//! embedding predicts the neuron's activation over the whole probe set (simulation
//! correlation, AUPRC, F1, IoU); images generated from the label against random probe
//! images give CoSy's AUC and MAD. Every model call goes through the caches: the probe
//! set's activations were cached by the probe stage, and a label that was a candidate
//! has its generated images in the image cache already.

use std::sync::Arc;

use candle_core::Device;
use image::RgbImage;

use dnd_core::evaluation::{EvaluationConfig, LabelEvidence, evaluate_label, sample_indices};
use dnd_core::scoring::mean_cosine;
use dnd_core::{LayerName, NeuronId, Pooling, unit_seed};
use dnd_store::results::{DescriptionRow, EvaluationRow};

use crate::activations::pooled_activations_cached;
use crate::error::PipelineError;
use crate::images::{ImageLimits, ImageRef, load_batch};
use crate::job::JobSpec;
use crate::stages::generate::{ImageRequests, uniform_counts};
use crate::stages::score::embed;
use crate::stages::summarize::Labelling;
use crate::units::Readout;
use crate::workbench::{Workbench, image_hash};

/// Probe images read per round: bounds memory whatever the probe set's size.
const PROBE_CHUNK: usize = 64;

/// What the models measure on the whole probe set for one layer: every readable image's
/// pooled activations and its embedding. Computed once per layer and job on a worker.
#[derive(Debug, Clone)]
pub struct ProbeMeasurements {
    /// Per readable probe image (probe order), the pooled activation of every unit.
    pub activations: Vec<Vec<f32>>,
    /// Embeddings of the same images, row-major, `dim` wide.
    pub embeddings: Vec<f32>,
    pub dim: usize,
}

impl ProbeMeasurements {
    /// Measures `images` at `readout`, through the vector cache. Unreadable images are left
    /// out (the probe stage recorded them).
    pub async fn measure(
        bench: &Workbench,
        images: &[ImageRef],
        limits: &ImageLimits,
        readout: &Readout,
        pooling: Pooling,
        batch_size: usize,
    ) -> Result<Self, PipelineError> {
        let mut out = Self { activations: Vec::new(), embeddings: Vec::new(), dim: 0 };
        for chunk in images.chunks(PROBE_CHUNK) {
            let decoded: Vec<Arc<RgbImage>> = load_batch(chunk, 0, limits, "evaluate")
                .await
                .into_iter()
                .filter_map(|(_, r)| r.ok().map(Arc::new))
                .collect();
            let hashes: Vec<String> = decoded.iter().map(|i| image_hash(i)).collect();
            let activations = pooled_activations_cached(
                bench.target_vectors(),
                &bench.target,
                (&decoded, &hashes),
                readout,
                pooling,
                batch_size,
            )
            .await?;
            let embeddings = embed(bench, (&decoded, &hashes)).await?;
            out.activations.extend(activations);
            for row in embeddings {
                out.dim = row.len();
                out.embeddings.extend(row);
            }
        }
        Ok(out)
    }

    fn images(&self) -> usize {
        self.activations.len()
    }

    /// The neuron's activation on every image.
    fn neuron(&self, neuron: NeuronId) -> Vec<f64> {
        self.activations.iter().map(|a| f64::from(a[neuron.index()])).collect()
    }

    /// The cosine of `text` with every image's embedding: the label's predicted activation.
    fn predicted(&self, text: &[f32]) -> Vec<f64> {
        self.embeddings
            .chunks(self.dim.max(1))
            .map(|image| f64::from(mean_cosine(text, image, self.dim)[0]))
            .collect()
    }
}

/// The `source` of the rows that score a job's own labels.
pub const DND_LABELS: &str = "dnd";

/// A neuron's reported labels, best first, at most `max` of them.
pub fn reported_labels(d: &DescriptionRow, max: usize) -> Vec<LabelToScore> {
    [&d.label, &d.label_2, &d.label_3]
        .into_iter()
        .take(max)
        .enumerate()
        .filter_map(|(i, l)| {
            Some(LabelToScore { neuron: d.neuron, rank: i + 1, label: l.clone()? })
        })
        .collect()
}

/// A label to score: the neuron it describes and its rank among the neuron's labels.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelToScore {
    pub neuron: NeuronId,
    /// 1 for the best label.
    pub rank: usize,
    pub label: String,
}

/// Scores `labels` (neurons of `layer`) with every metric; `source` names whose labels
/// they are in the rows.
#[allow(clippy::too_many_arguments)]
pub async fn evaluate_labels(
    bench: &Workbench,
    spec: &JobSpec,
    config: &EvaluationConfig,
    layer: &LayerName,
    readout: &Readout,
    probe: &ProbeMeasurements,
    labels: &[LabelToScore],
    source: &str,
) -> Result<Vec<EvaluationRow>, PipelineError> {
    if labels.is_empty() {
        return Ok(Vec::new());
    }
    let texts = embed_texts(bench, labels).await?;
    let generated = cosy_activations(bench, spec, config, readout, labels).await?;
    let controls = sample_indices(probe.images(), config.control_images, spec.seed);
    let mut rows = Vec::new();
    for (k, l) in labels.iter().enumerate() {
        let activations = probe.neuron(l.neuron);
        let predicted = probe.predicted(&texts[k]);
        let on_generated: Vec<f64> =
            generated[k].iter().map(|a| f64::from(a[readout.column(l.neuron)])).collect();
        let evidence = LabelEvidence {
            activations: &activations,
            predicted: &predicted,
            generated: &on_generated,
            controls: &controls,
        };
        for v in evaluate_label(&evidence, config, unit_seed(spec.seed, layer, l.neuron)) {
            let finite = |x: f64| x.is_finite().then_some(x);
            rows.push(EvaluationRow {
                layer: layer.clone(),
                neuron: l.neuron,
                unit_kind: readout.kind(),
                unit_source: readout.source().map(String::from),
                source: source.to_string(),
                label_rank: l.rank as i32,
                label: l.label.clone(),
                metric: v.metric.name().to_string(),
                quantile: v.quantile,
                value: finite(v.value),
                ci_low: v.interval.and_then(|(lo, _)| finite(lo)),
                ci_high: v.interval.and_then(|(_, hi)| finite(hi)),
                images: v.images as i32,
            });
        }
    }
    Ok(rows)
}

/// Each label's text embedding (one model call per distinct label).
async fn embed_texts(
    bench: &Workbench,
    labels: &[LabelToScore],
) -> Result<Vec<Vec<f32>>, PipelineError> {
    let embedder = bench.embedder.model.clone();
    let texts: Vec<String> = labels.iter().map(|l| l.label.clone()).collect();
    tokio::task::spawn_blocking(move || -> Result<Vec<Vec<f32>>, PipelineError> {
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let e = embedder.embed_texts(&refs)?;
        Ok(e.to_device(&Device::Cpu)?.to_vec2::<f32>()?)
    })
    .await?
}

/// Per label, the target's pooled activations on the images generated from it: the
/// method's prompt and seeds, so a label that was a candidate is served from the caches.
async fn cosy_activations(
    bench: &Workbench,
    spec: &JobSpec,
    config: &EvaluationConfig,
    readout: &Readout,
    labels: &[LabelToScore],
) -> Result<Vec<Vec<Vec<f32>>>, PipelineError> {
    if config.generated_images == 0 {
        return Ok(vec![Vec::new(); labels.len()]);
    }
    let labelling: Vec<Labelling> = labels
        .iter()
        .map(|l| Labelling { candidates: vec![l.label.clone()], ..Default::default() })
        .collect();
    let counts = uniform_counts(&labelling, config.generated_images);
    let sampling = &spec.generator.sampling;
    let requests = ImageRequests::new(&labelling, &counts, sampling, spec.seed);
    let entries = bench.generated(&requests.requests, spec.generator.batch_size).await?;
    let images: Vec<Arc<RgbImage>> = entries.iter().map(|e| e.image.clone()).collect();
    let hashes: Vec<String> = images.iter().map(|i| image_hash(i)).collect();
    let activations = pooled_activations_cached(
        bench.target_vectors(),
        &bench.target,
        (&images, &hashes),
        readout,
        spec.probe.pooling,
        spec.describe.batch_size,
    )
    .await?;
    Ok(requests
        .per_candidate(&labelling, &counts, sampling)
        .iter()
        .map(|lists| lists[0].iter().map(|&r| activations[r].clone()).collect())
        .collect())
}

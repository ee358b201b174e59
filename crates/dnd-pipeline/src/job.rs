//! A dissection job as users write it (`job.toml`): what to describe, with which models,
//! and every number of the method. Defaults are the method's (`docs/dnd-method.md`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use dnd_core::evaluation::EvaluationConfig;
use dnd_core::{
    CoreError, CropConfig, Liveness, NeuronId, NeuronSet, Pooling, ScoringConfig, Screening,
    UnitKind,
};
use dnd_models::{CaptionConfig, GenerationConfig, ModelRef};
use dnd_summarize::SummarizerConfig;

use crate::error::PipelineError;
use crate::images::ImageLimits;

/// The generator reference of the synthetic world's text-conditioned renderer.
pub const SYNTHETIC_GENERATOR: &str = "synth:world";

/// The whole job. Unknown fields are rejected, so a typo cannot silently fall back to a
/// default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JobSpec {
    /// The job's name: its directory under `<out>/jobs/`. Re-running a job with the same
    /// name resumes it (committed tasks are not redone). Default: `dissect-<hash of the spec>`.
    pub name: Option<String>,
    /// Where results go: a local directory or an object store URL.
    pub out: String,
    /// The content-addressed cache; default `<out>/cache`, shared by every job there.
    pub cache: Option<String>,
    /// Seeds the summary shuffles and the generated images.
    pub seed: u64,
    /// `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    pub target: TargetSection,
    pub probe: ProbeSection,
    pub crops: CropConfig,
    pub describe: DescribeSection,
    pub captioner: CaptionerSection,
    pub summarizer: SummarizerConfig,
    pub generator: GeneratorSection,
    pub embedder: EmbedderSection,
    pub scoring: ScoringConfig,
    /// `[units]`: which dead and dense SAE latents stages 1-3 skip. Left out of the
    /// serialised spec while default, so that jobs named before it keep their names.
    #[serde(skip_serializing_if = "Liveness::is_default")]
    pub units: Liveness,
    /// Scores each reported label against its neuron after stage 3 (`[evaluate]`); off
    /// when absent. Not part of the job's name: it adds a table, it changes no label.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub evaluate: Option<EvaluationConfig>,
}

impl Default for JobSpec {
    fn default() -> Self {
        Self {
            name: None,
            out: "out".into(),
            cache: None,
            seed: 0,
            device: "cpu".into(),
            target: TargetSection::default(),
            probe: ProbeSection::default(),
            crops: CropConfig::default(),
            describe: DescribeSection::default(),
            captioner: CaptionerSection::default(),
            summarizer: SummarizerConfig::default(),
            generator: GeneratorSection::default(),
            embedder: EmbedderSection::default(),
            scoring: ScoringConfig::default(),
            units: Liveness::default(),
            evaluate: None,
        }
    }
}

/// The network being dissected.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TargetSection {
    /// A local directory or `hf:org/name[@rev]`.
    pub model: String,
    /// Taps, e.g. `layer4`, `fc`.
    pub layers: Vec<String>,
    /// Which neurons: one set for every layer (`"0..64,100"`, `"all"`), or one per layer
    /// (`{ layer4 = "0..8", fc = "all" }`; layers not named get all their neurons). For a
    /// layer described by a dictionary, the ids are its units'.
    pub neurons: NeuronSpec,
    /// `[target.units.<layer>]`: the layers described by a dictionary's units (SAE latents,
    /// directions) instead of their channels. Left out of the serialised spec while empty.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub units: BTreeMap<String, UnitSource>,
}

impl Default for TargetSection {
    fn default() -> Self {
        Self {
            model: String::new(),
            layers: vec!["layer4".into()],
            neurons: NeuronSpec::default(),
            units: BTreeMap::new(),
        }
    }
}

/// What a layer's units are: `kind = "sae"` with an SAE (SAELens' directory, or a weights
/// file beside its `cfg.json`), `kind = "direction"` with a `directions.safetensors`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnitSource {
    pub kind: UnitKind,
    /// A local directory or file (docs/job.md lists the layouts).
    #[serde(default)]
    pub source: String,
}

impl TargetSection {
    fn check_units(&self) -> Result<(), CoreError> {
        for (layer, entry) in &self.units {
            let field = format!("target.units.{layer}");
            if !self.layers.contains(layer) {
                return Err(CoreError::invalid(
                    field,
                    format!(
                        "names a layer that is not in target.layers ({})",
                        self.layers.join(", ")
                    ),
                ));
            }
            match (entry.kind, entry.source.is_empty()) {
                (UnitKind::Channel, false) => {
                    return Err(CoreError::invalid(
                        field,
                        "channels need no source; leave it out, or say kind = \"sae\" or \"direction\"",
                    ));
                }
                (UnitKind::Direction | UnitKind::Sae, true) => {
                    return Err(CoreError::invalid(
                        field,
                        format!(
                            "{} units need a source: the dictionary's directory or file",
                            entry.kind
                        ),
                    ));
                }
                _ => {}
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum NeuronSpec {
    Every(String),
    PerLayer(BTreeMap<String, String>),
}

impl Default for NeuronSpec {
    fn default() -> Self {
        NeuronSpec::Every("all".into())
    }
}

impl NeuronSpec {
    /// The neurons of `layer` (width `width`), checked: the one place a neuron selection
    /// is parsed.
    pub fn resolve(&self, layer: &str, width: usize) -> Result<Vec<NeuronId>, CoreError> {
        let spec = match self {
            NeuronSpec::Every(s) => s.as_str(),
            NeuronSpec::PerLayer(map) => map.get(layer).map_or("all", String::as_str),
        };
        let ids: Vec<usize> = if spec.trim() == "all" {
            (0..width).collect()
        } else {
            let set: NeuronSet = spec.parse()?;
            set.check_within(layer, width)?;
            set.ids().to_vec()
        };
        Ok(ids.into_iter().map(|i| NeuronId::new(i as u32)).collect())
    }

    fn check_layers(&self, layers: &[String]) -> Result<(), CoreError> {
        if let NeuronSpec::PerLayer(map) = self
            && let Some(unknown) = map.keys().find(|k| !layers.contains(k))
        {
            return Err(CoreError::invalid(
                "target.neurons",
                format!(
                    "names layer `{unknown}`, which is not in target.layers ({})",
                    layers.join(", ")
                ),
            ));
        }
        Ok(())
    }
}

/// Stage 0.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProbeSection {
    /// A directory, an object store prefix, or a `.txt`/`.csv` list of images; or
    /// `synth:world?count=N&size=S&seed=K`, a probe set of the synthetic world rendered
    /// once into `<out>/probe-sets/` (with its scenes, the ground truth).
    pub images: String,
    /// Top images kept per neuron.
    pub top_k: usize,
    pub pooling: Pooling,
    pub batch_size: usize,
    /// Probe images per probe task: the unit of stage-0 work spread over workers.
    pub images_per_task: usize,
    pub limits: ImageLimits,
}

impl Default for ProbeSection {
    fn default() -> Self {
        Self {
            images: String::new(),
            top_k: 10,
            pooling: Pooling::Mean,
            batch_size: 16,
            images_per_task: 4096,
            limits: ImageLimits::default(),
        }
    }
}

/// How neurons are described and grouped into tasks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DescribeSection {
    /// Originals and crops kept (and captioned) per neuron after re-ranking.
    pub top_images: usize,
    /// Neurons per task: the unit of work (and of retries).
    pub neurons_per_task: usize,
    /// Images per forward pass of the target model in stages 1 and 3.
    pub batch_size: usize,
}

impl Default for DescribeSection {
    fn default() -> Self {
        Self { top_images: 10, neurons_per_task: 8, batch_size: 16 }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CaptionerSection {
    /// A BLIP checkpoint directory or `hf:Salesforce/blip-image-captioning-base`.
    pub model: String,
    pub batch_size: usize,
    pub decoding: CaptionConfig,
}

impl Default for CaptionerSection {
    fn default() -> Self {
        Self { model: String::new(), batch_size: 8, decoding: CaptionConfig::default() }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GeneratorSection {
    /// A diffusers Stable Diffusion directory, `hf:org/name`, or `synth:world` (the
    /// synthetic world's text-conditioned renderer).
    pub model: String,
    /// Images per candidate concept (the method's Q).
    pub images_per_concept: usize,
    pub batch_size: usize,
    pub sampling: GenerationConfig,
    /// `[generator.screening]`: opt-in successive halving over the candidates. Left out
    /// of the serialised spec while off, so that jobs named before it keep their names.
    #[serde(skip_serializing_if = "Screening::is_off")]
    pub screening: Screening,
}

impl Default for GeneratorSection {
    fn default() -> Self {
        Self {
            model: String::new(),
            images_per_concept: 10,
            batch_size: 4,
            sampling: GenerationConfig::default(),
            screening: Screening::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct EmbedderSection {
    /// A CLIP checkpoint directory or `hf:openai/clip-vit-base-patch16`.
    pub model: String,
}

impl JobSpec {
    /// Reads a job file; errors name the file and the field.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, PipelineError> {
        toml::from_str(text)
            .map_err(|e| PipelineError::BadJob { origin: origin.into(), reason: e.to_string() })
    }

    /// Every check that needs no model or store: run before any work starts.
    pub fn validate(&self) -> Result<(), PipelineError> {
        let invalid = |field: &str, reason: &str| -> PipelineError {
            CoreError::invalid(field, reason).into()
        };
        if let Some(name) = &self.name {
            dnd_store::tasks::check_name("job", name)?;
        }
        if self.out.is_empty() {
            return Err(invalid("out", "say where results go, e.g. out/ or s3://bucket/dnd"));
        }
        for (field, model) in [
            ("target.model", &self.target.model),
            ("captioner.model", &self.captioner.model),
            ("generator.model", &self.generator.model),
            ("embedder.model", &self.embedder.model),
        ] {
            if model.is_empty() {
                return Err(invalid(field, "name a model: a local directory or hf:org/name"));
            }
            if field == "generator.model" && model == SYNTHETIC_GENERATOR {
                continue;
            }
            model.parse::<ModelRef>()?;
        }
        if self.target.layers.is_empty() {
            return Err(invalid(
                "target.layers",
                "name at least one layer, e.g. [\"layer4\", \"fc\"]",
            ));
        }
        self.target.neurons.check_layers(&self.target.layers)?;
        self.target.check_units()?;
        self.units.validate()?;
        if self.probe.images.is_empty() {
            return Err(invalid(
                "probe.images",
                "name the probe images: a directory, a URL prefix or a .txt list",
            ));
        }
        if let Some(Err(reason)) = dnd_synth::ProbeSetSpec::parse(&self.probe.images) {
            return Err(invalid("probe.images", &reason));
        }
        for (field, value) in [
            ("probe.top_k", self.probe.top_k),
            ("probe.batch_size", self.probe.batch_size),
            ("probe.images_per_task", self.probe.images_per_task),
            ("describe.top_images", self.describe.top_images),
            ("describe.neurons_per_task", self.describe.neurons_per_task),
            ("describe.batch_size", self.describe.batch_size),
            ("captioner.batch_size", self.captioner.batch_size),
            ("generator.images_per_concept", self.generator.images_per_concept),
            ("generator.batch_size", self.generator.batch_size),
            ("generator.sampling.steps", self.generator.sampling.steps),
        ] {
            if value == 0 {
                return Err(invalid(field, "must be at least 1"));
            }
        }
        if !self.generator.sampling.prompt_template.contains("{concept}") {
            return Err(invalid(
                "generator.sampling.prompt_template",
                "must contain {concept}, e.g. \"One realistic image of {concept}\"",
            ));
        }
        self.generator.screening.validate(self.generator.images_per_concept)?;
        self.crops.validate()?;
        self.scoring.validate()?;
        if let Some(evaluate) = &self.evaluate {
            evaluate.validate()?;
        }
        self.summarizer.validate()?;
        Ok(())
    }

    /// The job's name, given or derived from everything that shapes its results.
    pub fn job_name(&self) -> String {
        if let Some(name) = &self.name {
            return name.clone();
        }
        let shaping = (
            &self.target,
            &self.probe,
            &self.crops,
            &self.describe,
            &self.captioner,
            &self.summarizer,
            &self.generator,
            &self.embedder,
            &self.scoring,
            self.seed,
        );
        // `[units]` only when set, so that jobs named before it keep their names.
        let json = if self.units.is_default() {
            serde_json::to_vec(&shaping)
        } else {
            serde_json::to_vec(&(shaping, &self.units))
        }
        .expect("a job spec serialises");
        format!("dissect-{}", &blake3::hash(&json).to_hex()[..12])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const JOB: &str = r#"
        out = "out/demo"
        seed = 7
        [target]
        model = "models/resnet18"
        layers = ["layer4", "fc"]
        neurons = { layer4 = "0..4,9", fc = "all" }
        [probe]
        images = "images/"
        [captioner]
        model = "blip"
        [generator]
        model = "sd"
        images_per_concept = 3
        [generator.sampling]
        steps = 2
        [embedder]
        model = "clip"
        [summarizer]
        backend = "consensus"
        [scoring]
        rank_score = "mean"
    "#;

    #[test]
    fn parses_a_job_with_defaults_for_everything_not_written() {
        let job = JobSpec::from_toml(JOB, "job.toml").unwrap();
        job.validate().unwrap();
        assert_eq!(job.probe.top_k, 10);
        assert_eq!(job.describe.top_images, 10);
        assert_eq!(job.generator.sampling.steps, 2);
        assert_eq!(job.generator.sampling.guidance_scale, 7.5);
        assert_eq!(job.crops.canvas_size, 375);
        assert_eq!(job.scoring.beta, 5);
        let ids = |layer: &str, width: usize| -> Vec<usize> {
            job.target.neurons.resolve(layer, width).unwrap().iter().map(|n| n.index()).collect()
        };
        assert_eq!(ids("layer4", 512), [0, 1, 2, 3, 9]);
        assert_eq!(ids("fc", 3), [0, 1, 2]);
        assert!(job.job_name().starts_with("dissect-"));
        let mut other = job.clone();
        other.seed = 8;
        assert_ne!(
            job.job_name(),
            other.job_name(),
            "the seed shapes the results, so it names the job"
        );
    }

    #[test]
    fn the_documented_example_is_every_default() {
        let doc = include_str!("../../../docs/job.md");
        let toml = doc.split("```toml\n").nth(1).and_then(|rest| rest.split("```").next()).unwrap();
        let job = JobSpec::from_toml(toml, "docs/job.md").unwrap();
        job.validate().unwrap();
        let models_only = JobSpec {
            target: TargetSection { model: job.target.model.clone(), ..Default::default() },
            probe: ProbeSection { images: job.probe.images.clone(), ..Default::default() },
            captioner: CaptionerSection {
                model: job.captioner.model.clone(),
                ..Default::default()
            },
            generator: GeneratorSection {
                model: job.generator.model.clone(),
                ..Default::default()
            },
            embedder: EmbedderSection { model: job.embedder.model.clone() },
            ..Default::default()
        };
        assert_eq!(job, models_only, "docs/job.md must show the defaults");
    }

    #[test]
    fn the_presets_parse_and_validate() {
        let presets = [
            (
                "resnet50-imagenet.toml",
                include_str!("../../../docs/presets/resnet50-imagenet.toml"),
            ),
            (
                "resnet18-places365.toml",
                include_str!("../../../docs/presets/resnet18-places365.toml"),
            ),
            ("vit-b16-imagenet.toml", include_str!("../../../docs/presets/vit-b16-imagenet.toml")),
        ];
        for (name, toml) in presets {
            let job = JobSpec::from_toml(toml, name).unwrap_or_else(|e| panic!("{name}: {e}"));
            job.validate().unwrap_or_else(|e| panic!("{name}: {e}"));
            for model in
                [&job.target.model, &job.captioner.model, &job.generator.model, &job.embedder.model]
            {
                let pinned = model.rsplit_once('@').is_some_and(|(_, rev)| rev.len() == 40)
                    || !model.starts_with("hf:");
                assert!(pinned, "{name}: {model} is not pinned to a commit");
            }
        }
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/presets");
        let on_disk = std::fs::read_dir(dir).unwrap().count();
        assert_eq!(on_disk, presets.len(), "every file in docs/presets is checked here");
        let docs = include_str!("../../../docs/job.md");
        for (name, _) in presets {
            assert!(docs.contains(name), "docs/job.md does not describe {name}");
        }
    }

    #[test]
    fn errors_name_the_field() {
        let typo =
            JobSpec::from_toml(&JOB.replace("images_per_concept", "images_per_concpt"), "job.toml")
                .unwrap_err();
        assert!(
            typo.to_string().contains("images_per_concpt") && typo.to_string().contains("job.toml"),
            "{typo}"
        );
        let check = |edit: &dyn Fn(&mut JobSpec), field: &str| {
            let mut job = JobSpec::from_toml(JOB, "job.toml").unwrap();
            edit(&mut job);
            let err = job.validate().unwrap_err();
            assert!(err.is_user_error() && err.to_string().contains(field), "{field}: {err}");
        };
        check(&|j| j.target.layers.clear(), "target.layers");
        check(
            &|j| j.target.neurons = NeuronSpec::PerLayer([("layer3".into(), "0".into())].into()),
            "layer3",
        );
        check(&|j| j.generator.images_per_concept = 0, "generator.images_per_concept");
        check(&|j| j.generator.sampling.prompt_template = "a photo".into(), "prompt_template");
        check(&|j| j.generator.screening.first_images = 10, "generator.screening.first_images");
        check(&|j| j.captioner.model.clear(), "captioner.model");
        check(&|j| j.name = Some("../escape".into()), "../escape");
        check(&|j| j.scoring.beta = 0, "scoring.beta");
        let job = JobSpec::from_toml(JOB, "job.toml").unwrap();
        let err = job.target.neurons.resolve("layer4", 5).unwrap_err();
        assert!(err.to_string().contains("neuron 9"), "{err}");
    }
}

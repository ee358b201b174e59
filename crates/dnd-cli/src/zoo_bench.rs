//! The job a zoo benchmark (`dnd bench quality`, `dnd bench evaluate`) dissects.

use std::path::Path;

use anyhow::Context;

use dnd_pipeline::JobSpec;
use dnd_synth::{PlantedNeuron, ProbeSetSpec, read_planted};

use crate::BadInput;

/// A zoo benchmark's job: the job file read, its synthetic probe set and the target's
/// planted neurons required, and its output, cache and name made this run's own.
pub(crate) struct ZooBenchJob {
    pub spec: JobSpec,
    pub probe_set: ProbeSetSpec,
    pub planted: Vec<PlantedNeuron>,
    /// Seconds since the epoch: names this run's cache and jobs.
    pub nonce: u64,
}

impl ZooBenchJob {
    /// Reads `config` for a run writing under `out`, its job named `{name}-{nonce}`.
    pub fn open(config: &Path, out: &Path, name: &str) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(config)
            .map_err(|e| BadInput(format!("cannot read the job file {}: {e}", config.display())))?;
        let mut spec = JobSpec::from_toml(&text, &config.display().to_string())?;
        let Some(Ok(probe_set)) = ProbeSetSpec::parse(&spec.probe.images) else {
            return Err(BadInput(format!(
                "{}: the benchmark needs the zoo's synthetic probe set (probe.images = \"synth:world?...\")",
                config.display()
            ))
            .into());
        };
        let planted = read_planted(Path::new(&spec.target.model)).with_context(|| {
            format!("the target model {} has no readable planted.json", spec.target.model)
        })?;
        let nonce = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        spec.out = out.display().to_string();
        spec.cache = Some(out.join(format!("cache-{nonce}")).display().to_string());
        spec.name = Some(format!("{name}-{nonce}"));
        Ok(Self { spec, probe_set, planted, nonce })
    }
}

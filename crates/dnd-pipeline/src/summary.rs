//! `summary.json`: what a finished dissection did.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use dnd_store::CacheCounts;

/// What a dissection did, written as `summary.json` in the job directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DissectSummary {
    pub dnd_version: String,
    pub job: String,
    /// The job directory.
    pub location: String,
    pub results: Vec<String>,
    pub models: BTreeMap<String, String>,
    pub tasks: usize,
    /// Tasks already committed when the job was (re)submitted.
    pub tasks_resumed: usize,
    /// Tasks that failed for good (their neurons have `status = failed`).
    pub tasks_failed: usize,
    pub neurons: usize,
    pub neurons_ok: usize,
    pub neurons_no_candidates: usize,
    pub neurons_failed: usize,
    /// SAE latents skipped as `dead` and `dense` (`[units] skip`).
    #[serde(default)]
    pub neurons_dead: usize,
    #[serde(default)]
    pub neurons_dense: usize,
    /// Cache hits and misses over the committed attempts, by kind. A miss is one model call.
    pub cache: BTreeMap<String, CacheCounts>,
    /// Share of cacheable model calls (captions, images, replies) the caches answered.
    pub cache_hit_rate: f64,
    /// Model loading before the first task (embedded runs; 0 when workers loaded them).
    pub load_seconds: f64,
    /// Worker seconds in probe tasks and in neuron tasks, summed over committed attempts.
    pub probe_seconds: f64,
    pub describe_seconds: f64,
    /// Worker seconds of stages 1-3 per neuron described.
    pub seconds_per_neuron: f64,
    /// Wall time from submission to the end.
    pub total_seconds: f64,
    pub peak_rss_mib: f64,
}

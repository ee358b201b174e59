//! A job's directory in the store, and the one owner of its layout: the pipeline, the
//! coordinator and the report all read and write a job through [`JobDir`].
//!
//! ```text
//! job.json, plan.json                      the spec (a resubmission must match it) and its tasks
//! tasks/<task>/<attempt>/...               one attempt's outputs (+ stats.json), then
//! tasks/<task>/_COMMITTED                  naming the attempt that counts
//! probe/topk/<layer>.parquet, probe/errors.parquet, probe/_COMMITTED   merged stage 0
//! images/crops/..../<hash>.png             attention crops
//! results/<table>.parquet                  the compacted results
//! events/*.jsonl                           the job's event log
//! _CANCELLED                               present while the job is cancelled
//! summary.json                             written last: the job is done
//! ```

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

use dnd_store::results::{DescriptionRow, ResultTable};
use dnd_store::tasks::check_name;
use dnd_store::{Location, TaskStore, batches_rows, read_parquet};

use crate::error::PipelineError;
use crate::job::JobSpec;
use crate::plan::JobPlan;
use crate::summary::DissectSummary;

pub const SPEC_FILE: &str = "job.json";
pub const PLAN_FILE: &str = "plan.json";
pub const SUMMARY_FILE: &str = "summary.json";
pub const RESULTS_DIR: &str = "results";
const PROBE_MARKER: &str = "probe/_COMMITTED";
const CANCELLED_MARKER: &str = "_CANCELLED";
const EVENTS_DIR: &str = "events";

/// A job directory: `<store>/jobs/<name>`.
#[derive(Debug, Clone)]
pub struct JobDir {
    location: Location,
}

impl JobDir {
    /// The job directory at `location`.
    pub fn new(location: Location) -> Self {
        Self { location }
    }

    /// The directory of job `name` under the store root `store`; the name is checked.
    pub fn under(store: &Location, name: &str) -> Result<Self, PipelineError> {
        check_name("job", name)?;
        Ok(Self::new(store.join(&format!("jobs/{name}"))))
    }

    pub fn location(&self) -> &Location {
        &self.location
    }

    /// The job's task attempts and commit markers.
    pub fn tasks(&self) -> TaskStore {
        TaskStore::new(self.location.clone())
    }

    fn bad(&self, file: &str, reason: impl ToString) -> PipelineError {
        PipelineError::BadJob {
            origin: self.location.display_path(file),
            reason: reason.to_string(),
        }
    }

    async fn read_json<T: DeserializeOwned>(&self, file: &str) -> Result<T, PipelineError> {
        let bytes = self.location.get(file).await?;
        serde_json::from_slice(&bytes).map_err(|e| self.bad(file, e))
    }

    fn to_json(value: &impl Serialize) -> Result<Bytes, PipelineError> {
        serde_json::to_vec_pretty(value)
            .map(Bytes::from)
            .map_err(|e| PipelineError::Internal(e.to_string()))
    }

    // -- the spec ------------------------------------------------------------------------

    /// Stores the spec as `job.json`, the job's identity. A job directory holds one job
    /// only; `Ok(false)` when the same job was already there.
    pub async fn claim(&self, name: &str, spec: &JobSpec) -> Result<bool, PipelineError> {
        let spec_json = Self::to_json(&(name, spec))?;
        if self.location.put_if_absent(SPEC_FILE, spec_json.clone()).await? {
            return Ok(true);
        }
        if self.location.get(SPEC_FILE).await? != spec_json {
            return Err(self.bad(
                SPEC_FILE,
                format!(
                    "a different job named `{name}` is already there; give this one another name (--name) or another --out"
                ),
            ));
        }
        Ok(false)
    }

    /// The name and spec the directory was claimed with.
    pub async fn spec(&self) -> Result<(String, JobSpec), PipelineError> {
        self.read_json(SPEC_FILE).await
    }

    /// The spec, or `None` when the directory has no `job.json`.
    pub async fn spec_opt(&self) -> Result<Option<(String, JobSpec)>, PipelineError> {
        if !self.location.exists(SPEC_FILE).await? {
            return Ok(None);
        }
        self.spec().await.map(Some)
    }

    // -- the plan ------------------------------------------------------------------------

    /// Stores the plan unless one is there; returns the stored one (a resubmitted job
    /// keeps its first plan).
    pub async fn store_plan(&self, plan: &JobPlan) -> Result<JobPlan, PipelineError> {
        if self.location.put_if_absent(PLAN_FILE, Self::to_json(plan)?).await? {
            return Ok(plan.clone());
        }
        self.plan().await
    }

    pub async fn plan(&self) -> Result<JobPlan, PipelineError> {
        self.read_json(PLAN_FILE).await
    }

    pub async fn has_plan(&self) -> Result<bool, PipelineError> {
        Ok(self.location.exists(PLAN_FILE).await?)
    }

    // -- stage 0 -------------------------------------------------------------------------

    /// Whether the probe slices were merged (stage 0 is done).
    pub async fn probe_merged(&self) -> Result<bool, PipelineError> {
        Ok(self.location.exists(PROBE_MARKER).await?)
    }

    pub async fn mark_probe_merged(&self) -> Result<(), PipelineError> {
        self.location.put_if_absent(PROBE_MARKER, Bytes::from_static(b"merged")).await?;
        Ok(())
    }

    // -- cancellation --------------------------------------------------------------------

    pub async fn cancelled(&self) -> Result<bool, PipelineError> {
        Ok(self.location.exists(CANCELLED_MARKER).await?)
    }

    pub async fn set_cancelled(&self, cancelled: bool) -> Result<(), PipelineError> {
        if cancelled {
            self.location.put(CANCELLED_MARKER, Bytes::from_static(b"cancelled")).await?;
        } else {
            self.location.delete(CANCELLED_MARKER).await?;
        }
        Ok(())
    }

    // -- the summary and the results ---------------------------------------------------------

    /// `summary.json`, when the job finished.
    pub async fn summary(&self) -> Result<Option<DissectSummary>, PipelineError> {
        match self.location.get_opt(SUMMARY_FILE).await? {
            Some(bytes) => {
                serde_json::from_slice(&bytes).map(Some).map_err(|e| self.bad(SUMMARY_FILE, e))
            }
            None => Ok(None),
        }
    }

    pub async fn write_summary(&self, summary: &DissectSummary) -> Result<(), PipelineError> {
        self.location.put(SUMMARY_FILE, Self::to_json(summary)?).await?;
        Ok(())
    }

    /// Where a results table is, relative to the job directory.
    pub fn results_path(table: ResultTable) -> String {
        format!("{RESULTS_DIR}/{}", table.file())
    }

    /// Every row of a compacted results table.
    pub async fn results<T: DeserializeOwned>(
        &self,
        table: ResultTable,
    ) -> Result<Vec<T>, PipelineError> {
        let batches = read_parquet(&self.location, &Self::results_path(table)).await?;
        Ok(batches_rows(table.name(), &batches)?)
    }

    pub async fn descriptions(&self) -> Result<Vec<DescriptionRow>, PipelineError> {
        self.results(ResultTable::Descriptions).await
    }

    // -- the event log -----------------------------------------------------------------------

    /// Appends events as one new object (`events/<first seq>.jsonl`), so nothing is rewritten.
    pub async fn append_events<E: Serialize>(
        &self,
        first_seq: u64,
        events: &[E],
    ) -> Result<(), PipelineError> {
        let lines: String =
            events.iter().filter_map(|e| serde_json::to_string(e).ok()).map(|l| l + "\n").collect();
        let file = format!("{EVENTS_DIR}/{first_seq:020}.jsonl");
        self.location.put(&file, Bytes::from(lines)).await?;
        Ok(())
    }

    /// Every event persisted so far, file by file (lines that do not parse are skipped).
    pub async fn events<E: DeserializeOwned>(&self) -> Result<Vec<E>, PipelineError> {
        let mut events = Vec::new();
        for file in self.location.list_files(EVENTS_DIR).await? {
            let bytes = self.location.get(&format!("{EVENTS_DIR}/{file}")).await?;
            for line in String::from_utf8_lossy(&bytes).lines() {
                if let Ok(event) = serde_json::from_str::<E>(line) {
                    events.push(event);
                }
            }
        }
        Ok(events)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> JobSpec {
        JobSpec { name: Some("j".into()), ..Default::default() }
    }

    #[tokio::test]
    async fn a_directory_holds_one_job_and_reads_back_what_was_written() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Location::create(tmp.path().to_str().unwrap()).unwrap();
        let dir = JobDir::under(&store, "j").unwrap();
        assert!(JobDir::under(&store, "../j").is_err());
        assert!(dir.spec_opt().await.unwrap().is_none());
        assert!(dir.claim("j", &spec()).await.unwrap());
        assert!(!dir.claim("j", &spec()).await.unwrap(), "the same job again");
        let other = JobSpec { seed: 9, ..spec() };
        let err = dir.claim("j", &other).await.unwrap_err();
        assert!(err.is_user_error() && err.to_string().contains("job.json"), "{err}");
        assert_eq!(dir.spec().await.unwrap(), ("j".to_string(), spec()));

        assert!(dir.summary().await.unwrap().is_none());
        assert!(!dir.cancelled().await.unwrap());
        dir.set_cancelled(true).await.unwrap();
        assert!(dir.cancelled().await.unwrap());
        dir.set_cancelled(false).await.unwrap();
        assert!(!dir.cancelled().await.unwrap());

        dir.append_events(3, &[serde_json::json!({"seq": 3}), serde_json::json!({"seq": 4})])
            .await
            .unwrap();
        dir.append_events(5, &[serde_json::json!({"seq": 5})]).await.unwrap();
        let events: Vec<serde_json::Value> = dir.events().await.unwrap();
        assert_eq!(events.len(), 3);
        assert_eq!(JobDir::results_path(ResultTable::Scores), "results/scores.parquet");
    }
}

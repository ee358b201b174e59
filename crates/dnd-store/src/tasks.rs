//! Exactly-once task outputs from at-least-once execution.
//!
//! An attempt writes its tables under `tasks/<task>/<attempt>/`, a path no other attempt
//! shares, then commits by creating `tasks/<task>/_COMMITTED` (naming the attempt) with a
//! create-only put. Only the first commit wins: a late duplicate attempt finds the marker
//! taken and its files are never read. Compaction reads committed attempts only.

use std::collections::{BTreeSet, HashMap};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt, stream};

use crate::error::StoreError;
use crate::location::Location;
use crate::parquet_sink::ParquetSink;
use crate::results::ResultTable;
use crate::rows::read_parquet;

const COMMIT_MARKER: &str = "_COMMITTED";

/// Store reads in flight at once when a job reads every task's outputs (compaction, the
/// summary). One after another, a store's latency (and, under failure, its timeouts and
/// retries' backoff) adds up over thousands of tasks: a compaction a restarted
/// coordinator cannot finish between two failures never finishes.
pub const READS_IN_FLIGHT: usize = 32;

/// Task and attempt names become object paths, so they are restricted to a safe alphabet.
pub fn check_name(what: &str, name: &str) -> Result<(), StoreError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '='));
    if ok {
        Ok(())
    } else {
        Err(StoreError::BadLocation {
            location: name.to_string(),
            reason: format!(
                "not a valid {what} name: use 1-128 letters, digits, `-`, `_`, `.` or `=`, not starting with `.`"
            ),
        })
    }
}

/// The tasks of one job in the store.
#[derive(Debug, Clone)]
pub struct TaskStore {
    job: Location,
}

impl TaskStore {
    pub fn new(job: Location) -> Self {
        Self { job }
    }

    pub fn job(&self) -> &Location {
        &self.job
    }

    /// The directory an attempt writes to.
    pub fn attempt_dir(&self, task: &str, attempt: &str) -> Result<Location, StoreError> {
        check_name("task", task)?;
        check_name("attempt", attempt)?;
        Ok(self.job.join(&format!("tasks/{task}/{attempt}")))
    }

    /// Commits `attempt` as the task's output; `Ok(false)` when another attempt already
    /// committed (this one's files are then ignored).
    pub async fn commit(&self, task: &str, attempt: &str) -> Result<bool, StoreError> {
        check_name("task", task)?;
        self.job
            .put_if_absent(
                &format!("tasks/{task}/{COMMIT_MARKER}"),
                Bytes::from(attempt.to_string()),
            )
            .await
    }

    /// The committed attempt of every committed task, read with one listing of `tasks/`:
    /// a task whose directory holds a single attempt committed that one (an attempt
    /// writes its files before it commits); only tasks with several attempts have their
    /// marker read. What a restarted coordinator needs, at any number of tasks.
    pub async fn committed_all(&self) -> Result<HashMap<String, String>, StoreError> {
        let mut attempts: HashMap<&str, BTreeSet<&str>> = HashMap::new();
        let mut marked = Vec::new();
        let listing = self.job.list_all("tasks").await?;
        for path in &listing {
            let mut parts = path.splitn(3, '/');
            let (Some(task), Some(second)) = (parts.next(), parts.next()) else { continue };
            match parts.next() {
                None if second == COMMIT_MARKER => marked.push(task),
                Some(_) => {
                    attempts.entry(task).or_default().insert(second);
                }
                None => {}
            }
        }
        let mut committed = HashMap::with_capacity(marked.len());
        for task in marked {
            let attempt = match attempts.get(task).map(|a| a.iter().collect::<Vec<_>>()) {
                Some(only) if only.len() == 1 => only[0].to_string(),
                _ => match self.committed(task).await? {
                    Some(attempt) => attempt,
                    None => continue,
                },
            };
            committed.insert(task.to_string(), attempt);
        }
        Ok(committed)
    }

    /// The committed attempt of a task, if any.
    pub async fn committed(&self, task: &str) -> Result<Option<String>, StoreError> {
        check_name("task", task)?;
        let marker = self.job.get_opt(&format!("tasks/{task}/{COMMIT_MARKER}")).await?;
        Ok(marker.map(|b| String::from_utf8_lossy(&b).trim().to_string()))
    }

    /// Concatenates the committed outputs of `tasks`, in that order, into
    /// `results/<table>.parquet` for every table. Fails if a task is not committed.
    /// Reads go [`READS_IN_FLIGHT`] at a time; rows are written in task order.
    pub async fn compact(&self, tasks: &[String]) -> Result<Vec<String>, StoreError> {
        // Owned items: futures over borrowed ones are not `Send` for every lifetime, which
        // a caller that spawns them needs.
        let attempts: Vec<Location> = stream::iter(tasks.to_vec())
            .map(|task| async move {
                let attempt = self.committed(&task).await?.ok_or_else(|| StoreError::BadLocation {
                    location: self.job.display_path(&format!("tasks/{task}")),
                    reason:
                        "the task has no committed output; run the job to completion before compacting"
                            .into(),
                })?;
                self.attempt_dir(&task, &attempt)
            })
            .buffered(READS_IN_FLIGHT)
            .try_collect()
            .await?;
        let mut written = Vec::new();
        for table in ResultTable::ALL {
            let relative = format!("results/{}", table.file());
            let mut sink = ParquetSink::create(&self.job, &relative, table.schema())?;
            let file = table.file();
            let mut reads = stream::iter(attempts.clone())
                .map(|dir| {
                    let file = file.clone();
                    async move {
                        // Attempts committed before the evaluation table existed have none.
                        if table == ResultTable::Evaluation && !dir.exists(&file).await? {
                            return Ok(Vec::new());
                        }
                        read_parquet(&dir, &file).await
                    }
                })
                .buffered(READS_IN_FLIGHT);
            while let Some(batches) = reads.next().await {
                for batch in batches? {
                    sink.write(&batch).await?;
                }
            }
            sink.close().await?;
            written.push(relative);
        }
        Ok(written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::results::NeuronErrorRow;
    use crate::write_parquet;

    fn error_row(neuron: u32, task: &str) -> NeuronErrorRow {
        NeuronErrorRow {
            layer: "fc".into(),
            neuron: dnd_core::NeuronId::new(neuron),
            unit_kind: dnd_core::UnitKind::Channel,
            unit_source: None,
            stage: "caption".into(),
            image_id: None,
            reason: "test".into(),
            message: "test".into(),
            task: task.into(),
        }
    }

    async fn write_attempt(store: &TaskStore, task: &str, attempt: &str, neuron: u32) {
        let dir = store.attempt_dir(task, attempt).unwrap();
        for table in ResultTable::ALL {
            let batch = if table == ResultTable::Errors {
                table.batch(&[error_row(neuron, task)]).unwrap()
            } else {
                arrow::record_batch::RecordBatch::new_empty(table.schema())
            };
            write_parquet(&dir, &table.file(), &batch).await.unwrap();
        }
    }

    #[tokio::test]
    async fn only_the_first_commit_counts_and_compaction_reads_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = TaskStore::new(Location::create(dir.path().to_str().unwrap()).unwrap());
        write_attempt(&store, "t0", "a1", 0).await;
        write_attempt(&store, "t0", "a2", 99).await;
        write_attempt(&store, "t1", "a1", 1).await;
        assert!(store.commit("t0", "a1").await.unwrap());
        assert!(!store.commit("t0", "a2").await.unwrap(), "a zombie attempt cannot commit");
        assert_eq!(store.committed("t0").await.unwrap().as_deref(), Some("a1"));

        let missing = store.compact(&["t0".into(), "t1".into()]).await.unwrap_err();
        assert!(missing.to_string().contains("t1"), "{missing}");
        store.commit("t1", "a1").await.unwrap();
        store.compact(&["t0".into(), "t1".into()]).await.unwrap();
        let batches = read_parquet(store.job(), "results/errors.parquet").await.unwrap();
        let neurons: Vec<i32> = batches
            .iter()
            .flat_map(|b| {
                use arrow::array::AsArray;
                b.column(1).as_primitive::<arrow::datatypes::Int32Type>().values().to_vec()
            })
            .collect();
        assert_eq!(neurons, [0, 1], "the uncommitted attempt's rows are not in the results");
        assert!(dir.path().join("results/descriptions.parquet").is_file());
    }

    #[tokio::test]
    async fn one_listing_finds_every_commit_as_reading_each_marker_does() {
        let dir = tempfile::tempdir().unwrap();
        let store = TaskStore::new(Location::create(dir.path().to_str().unwrap()).unwrap());
        assert!(store.committed_all().await.unwrap().is_empty(), "no tasks/ yet");
        // One attempt, committed; two attempts, the second committed (its marker is read);
        // a failure record beside a failed attempt; an attempt never committed.
        write_attempt(&store, "single", "attempt-1", 0).await;
        store.commit("single", "attempt-1").await.unwrap();
        write_attempt(&store, "retried", "attempt-1", 1).await;
        write_attempt(&store, "retried", "attempt-2", 1).await;
        store.commit("retried", "attempt-2").await.unwrap();
        write_attempt(&store, "gave-up", "attempt-1", 2).await;
        write_attempt(&store, "gave-up", "failed-1", 2).await;
        store.commit("gave-up", "failed-1").await.unwrap();
        write_attempt(&store, "running", "attempt-1", 3).await;
        let all = store.committed_all().await.unwrap();
        for task in ["single", "retried", "gave-up", "running"] {
            assert_eq!(all.get(task).cloned(), store.committed(task).await.unwrap(), "{task}");
        }
        assert_eq!(all.len(), 3);
    }

    #[test]
    fn names_that_could_escape_the_job_directory_are_rejected() {
        for bad in ["", "..", "../x", "a/b", ".hidden", "a b"] {
            assert!(check_name("task", bad).is_err(), "{bad}");
        }
        check_name("task", "layer4-00012").unwrap();
    }
}

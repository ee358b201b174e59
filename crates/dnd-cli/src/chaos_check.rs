//! What `dnd bench chaos` checks and counts after its run: the results against a clean
//! run's, row for row; every neuron exactly once; the attempts left behind uncommitted;
//! the faults and retries the processes logged; the task time the failures wasted.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use anyhow::Context;
use serde::Serialize;

use dnd_coordinator::Event;
use dnd_store::results::{DescriptionRow, ResultTable, run_independent};
use dnd_store::{Location, batches_rows, read_parquet};

/// The results of a chaos run beside a clean run's.
#[derive(Debug, Default, Serialize)]
pub struct Verdict {
    /// Neurons in the clean run.
    pub neurons: usize,
    /// Neurons of the clean run missing from the chaos run (`layer/neuron`).
    pub lost: Vec<String>,
    /// Neurons described more than once in the chaos run.
    pub duplicated: Vec<String>,
    /// Result tables that differ (after leaving out where files are and what came from
    /// the cache), with their row counts.
    pub differing_tables: Vec<String>,
    /// Rows compared over every table.
    pub rows_compared: usize,
    /// Attempt directories in the chaos store that never committed: work of killed or
    /// superseded attempts, none of which may reach the results.
    pub orphaned_attempts: usize,
}

impl Verdict {
    pub fn passed(&self) -> bool {
        self.lost.is_empty() && self.duplicated.is_empty() && self.differing_tables.is_empty()
    }
}

async fn table(
    job: &Location,
    table: ResultTable,
) -> anyhow::Result<arrow::record_batch::RecordBatch> {
    let batches = read_parquet(job, &format!("results/{}", table.file())).await?;
    let whole = arrow::compute::concat_batches(&table.schema(), &batches)
        .with_context(|| format!("reading {}", job.display_path(&table.file())))?;
    Ok(run_independent(&whole))
}

/// Compares the compacted results of two runs of one job.
pub async fn verify(clean: &Location, chaos: &Location) -> anyhow::Result<Verdict> {
    let mut verdict = Verdict::default();
    for t in ResultTable::ALL {
        let (a, b) = (table(clean, t).await?, table(chaos, t).await?);
        verdict.rows_compared += a.num_rows();
        if a != b {
            verdict.differing_tables.push(format!(
                "{} ({} rows clean, {} under chaos)",
                t.name(),
                a.num_rows(),
                b.num_rows()
            ));
        }
    }
    let key = |r: &DescriptionRow| format!("{}/{}", r.layer, r.neuron);
    let rows = |job: &Location| {
        let job = job.clone();
        async move {
            let batches = read_parquet(&job, "results/descriptions.parquet").await?;
            anyhow::Ok(batches_rows::<DescriptionRow>("descriptions", &batches)?)
        }
    };
    let expected: BTreeSet<String> = rows(clean).await?.iter().map(key).collect();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for r in rows(chaos).await? {
        *seen.entry(key(&r)).or_default() += 1;
    }
    verdict.neurons = expected.len();
    verdict.lost = expected.iter().filter(|k| !seen.contains_key(*k)).cloned().collect();
    verdict.duplicated = seen.iter().filter(|(_, n)| **n > 1).map(|(k, _)| k.clone()).collect();
    verdict.orphaned_attempts = orphaned_attempts(chaos).await?;
    Ok(verdict)
}

/// Attempt directories under `tasks/` that are not their task's committed attempt.
async fn orphaned_attempts(job: &Location) -> anyhow::Result<usize> {
    let committed = dnd_store::TaskStore::new(job.clone()).committed_all().await?;
    let mut attempts: BTreeSet<(String, String)> = BTreeSet::new();
    for path in job.list_all("tasks").await? {
        let mut parts = path.splitn(3, '/');
        if let (Some(task), Some(attempt), Some(_)) = (parts.next(), parts.next(), parts.next()) {
            attempts.insert((task.to_string(), attempt.to_string()));
        }
    }
    Ok(attempts.iter().filter(|(task, attempt)| committed.get(task) != Some(attempt)).count())
}

/// What the processes' logs say about the store.
#[derive(Debug, Default, Serialize)]
pub struct LogCounts {
    /// Faults injected, by kind.
    pub faults: BTreeMap<String, u64>,
    /// Of those, faults on the create-only put of a commit marker.
    pub commit_faults: u64,
    /// Store calls retried (one per retry).
    pub retries: u64,
    /// Store calls that failed on every attempt.
    pub gave_up: u64,
    /// Create-only puts found, on retry, to have been applied before their reply was lost.
    pub settled: u64,
}

impl LogCounts {
    pub fn faults_total(&self) -> u64 {
        self.faults.values().sum()
    }
}

/// `line` without terminal colour codes.
fn plain(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // ESC [ ... final byte (a letter)
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The value of `field=` in a log line, unquoted.
fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let start = line.find(&format!(" {name}="))? + name.len() + 2;
    let rest = &line[start..];
    let value = rest.split_whitespace().next()?;
    Some(value.trim_matches('"'))
}

/// Counts the store's log lines in one process's log.
pub fn count_log(text: &str, counts: &mut LogCounts) {
    use dnd_store::faults::FAULT_LOG;
    use dnd_store::retry::{GAVE_UP_LOG, RETRY_LOG, SETTLED_LOG};
    for line in text.lines() {
        let line = plain(line);
        if line.contains(FAULT_LOG) {
            let kind = field(&line, "kind").unwrap_or("unknown").to_string();
            *counts.faults.entry(kind).or_default() += 1;
            if field(&line, "op") == Some("put") && line.contains("_COMMITTED") {
                counts.commit_faults += 1;
            }
        } else if line.contains(RETRY_LOG) {
            counts.retries += 1;
        } else if line.contains(GAVE_UP_LOG) {
            counts.gave_up += 1;
        } else if line.contains(SETTLED_LOG) {
            counts.settled += 1;
        }
    }
}

/// Counts the store's log lines over every log in `dir`.
pub fn count_logs(dir: &Path) -> anyhow::Result<LogCounts> {
    let mut counts = LogCounts::default();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        count_log(&String::from_utf8_lossy(&bytes), &mut counts);
    }
    Ok(counts)
}

/// Task time lost to failures, in seconds: from its lease to its end, for every attempt
/// that did not end in its own commit (its worker was killed and the lease expired, it
/// failed, it was superseded by another attempt after a coordinator restart, or another
/// attempt committed first). `events` in log order.
pub fn wasted_task_seconds(events: &[Event]) -> f64 {
    let mut open: HashMap<&str, (u32, i64)> = HashMap::new();
    let mut wasted_ms = 0i64;
    for e in events.iter().filter(|e| !e.task.is_empty()) {
        match e.kind.as_str() {
            "leased" => {
                if let Some((_, since)) = open.insert(&e.task, (e.attempt, e.unix_ms)) {
                    wasted_ms += e.unix_ms - since;
                }
            }
            "committed" => {
                if let Some((attempt, since)) = open.remove(e.task.as_str())
                    && attempt != e.attempt
                {
                    wasted_ms += e.unix_ms - since;
                }
            }
            "failed" | "lease_expired" | "handed_back" | "task_failed" => {
                if let Some((_, since)) = open.remove(e.task.as_str()) {
                    wasted_ms += e.unix_ms - since;
                }
            }
            _ => {}
        }
    }
    wasted_ms.max(0) as f64 / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(seq: u64, unix_ms: i64, kind: &str, task: &str, attempt: u32) -> Event {
        Event {
            seq,
            unix_ms,
            kind: kind.into(),
            task: task.into(),
            attempt,
            worker: String::new(),
            message: String::new(),
        }
    }

    #[test]
    fn only_attempts_that_did_not_commit_waste_time() {
        let events = [
            event(1, 0, "leased", "a", 1),
            event(2, 1_000, "leased", "b", 1),
            event(3, 3_000, "committed", "a", 1),     // useful
            event(4, 7_000, "lease_expired", "b", 1), // 6 s wasted (worker killed)
            event(5, 7_000, "leased", "b", 2),
            event(6, 8_000, "leased", "b", 3), // a restarted coordinator: 1 s wasted
            event(7, 9_000, "committed", "b", 2), // attempt 3 lost the race: 1 s wasted
            event(8, 9_000, "succeeded", "", 0),
        ];
        assert_eq!(wasted_task_seconds(&events), 8.0);
        assert_eq!(wasted_task_seconds(&events[..3]), 0.0);
    }

    #[test]
    fn log_lines_are_counted_with_or_without_colours() {
        let text = "\
2026-12-04T10:00:00Z  INFO dnd_store::faults: injected store fault kind=\"after_apply\" op=\"put\" path=jobs/j/tasks/t/_COMMITTED
2026-12-04T10:00:00Z  INFO dnd_store::faults: injected store fault \u{1b}[3mkind\u{1b}[0m\u{1b}[2m=\u{1b}[0m\"throttle\" op=\"get\" path=x
2026-12-04T10:00:00Z  WARN dnd_store::retry: store call failed; retrying op=\"put\" path=x attempt=1
2026-12-04T10:00:00Z  INFO dnd_store::retry: a create-only write whose response was lost had been applied: the object is ours path=x
2026-12-04T10:00:00Z  INFO dnd_worker: leased job=\"j\"";
        let mut counts = LogCounts::default();
        count_log(text, &mut counts);
        assert_eq!(counts.faults.get("after_apply"), Some(&1));
        assert_eq!(counts.faults.get("throttle"), Some(&1));
        assert_eq!((counts.commit_faults, counts.retries, counts.settled), (1, 1, 1));
    }
}

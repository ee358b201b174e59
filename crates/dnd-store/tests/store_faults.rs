//! The error path of every store call: each `Location`, `TaskStore`, `ContentCache` and
//! Parquet call meets each kind of injected fault and must come through by retrying; a
//! call that keeps failing gives up after the policy's attempts; permanent errors and lost
//! create-only races are never retried; a commit whose response was lost is found, on
//! retry, to be ours, and one that finds another attempt's marker has lost.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use dnd_store::faults::{FaultConfig, FaultInjector, FaultKind, FaultStore};
use dnd_store::results::ResultTable;
use dnd_store::{
    CacheKey, CacheKind, ContentCache, Location, RetryPolicy, RetryStore, TaskStore, read_parquet,
    write_parquet,
};

const FAST: RetryPolicy =
    RetryPolicy { max_attempts: 4, base: Duration::from_millis(1), max: Duration::from_millis(4) };

fn scripted(fates: &[Option<FaultKind>]) -> Arc<FaultInjector> {
    FaultInjector::scripted(fates.iter().copied(), Duration::from_millis(1))
}

/// A location over `inner` whose calls meet `injector`'s faults, retried under FAST.
fn faulty(inner: Arc<dyn ObjectStore>, injector: &Arc<FaultInjector>) -> Location {
    let store = Arc::new(FaultStore::new(inner, injector.clone()));
    Location::from_store_with_policy(store, Path::from("root"), "test://root", FAST)
}

/// A location over a new in-memory store, and the same store without faults (to set up
/// and check what is there).
fn memory(injector: &Arc<FaultInjector>) -> (Location, Location) {
    let inner: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let clean = Location::from_store_with_policy(inner.clone(), Path::from("root"), "clean", FAST);
    (faulty(inner, injector), clean)
}

fn error_rows(task: &str) -> arrow::record_batch::RecordBatch {
    ResultTable::Errors
        .batch(&[dnd_store::results::NeuronErrorRow {
            layer: "fc".into(),
            neuron: dnd_core::NeuronId::new(1),
            unit_kind: dnd_core::UnitKind::Channel,
            unit_source: None,
            stage: "caption".into(),
            image_id: None,
            reason: "test".into(),
            message: "test".into(),
            task: task.into(),
        }])
        .unwrap()
}

/// Writes every result table of an attempt.
async fn write_attempt(store: &TaskStore, task: &str, attempt: &str) {
    let dir = store.attempt_dir(task, attempt).unwrap();
    for table in ResultTable::ALL {
        let batch = if table == ResultTable::Errors {
            error_rows(task)
        } else {
            arrow::record_batch::RecordBatch::new_empty(table.schema())
        };
        write_parquet(&dir, &table.file(), &batch).await.unwrap();
    }
}

/// One call of each kind, each run against a store whose next calls fail.
async fn every_call(loc: &Location, clean: &Location) {
    clean.put("seed/a.txt", Bytes::from_static(b"a")).await.unwrap();
    clean.put("seed/sub/b.txt", Bytes::from_static(b"b")).await.unwrap();

    loc.put("put.txt", Bytes::from_static(b"p")).await.unwrap();
    assert_eq!(clean.get("put.txt").await.unwrap(), Bytes::from_static(b"p"));
    assert!(loc.put_if_absent("once.txt", Bytes::from_static(b"1")).await.unwrap());
    assert!(!loc.put_if_absent("seed/a.txt", Bytes::from_static(b"x")).await.unwrap());
    assert_eq!(loc.get("seed/a.txt").await.unwrap(), Bytes::from_static(b"a"));
    assert_eq!(loc.get_opt("seed/a.txt").await.unwrap(), Some(Bytes::from_static(b"a")));
    assert_eq!(loc.get_opt("missing").await.unwrap(), None);
    assert!(loc.exists("seed/a.txt").await.unwrap());
    assert!(!loc.exists("missing").await.unwrap());
    assert_eq!(loc.get_path(&loc.path("seed/a.txt")).await.unwrap(), Bytes::from_static(b"a"));
    assert_eq!(loc.list_dirs("seed").await.unwrap(), ["sub"]);
    assert_eq!(loc.list_files("seed").await.unwrap(), ["a.txt"]);
    assert_eq!(loc.list_all("seed").await.unwrap(), ["a.txt", "sub/b.txt"]);
    let listed: Vec<_> = loc.join("seed").list().collect().await;
    assert_eq!(listed.len(), 2, "{listed:?}");
    loc.delete("put.txt").await.unwrap();
    assert!(!clean.exists("put.txt").await.unwrap());
    loc.delete("missing").await.unwrap();

    write_parquet(loc, "t/errors.parquet", &error_rows("t")).await.unwrap();
    let back = read_parquet(loc, "t/errors.parquet").await.unwrap();
    assert_eq!(back.iter().map(|b| b.num_rows()).sum::<usize>(), 1);

    let cache = ContentCache::new(loc.join("cache"));
    let key = CacheKey::of(CacheKind::Captions, &"an image");
    assert_eq!(cache.get(&key).await.unwrap(), None);
    cache.put(&key, Bytes::from_static(b"a caption")).await.unwrap();
    cache.put(&key, Bytes::from_static(b"a caption")).await.unwrap();
    assert_eq!(cache.get(&key).await.unwrap(), Some(Bytes::from_static(b"a caption")));

    let tasks = TaskStore::new(loc.join("jobs/j"));
    write_attempt(&tasks, "t0", "attempt-1").await;
    assert!(tasks.commit("t0", "attempt-1").await.unwrap());
    assert!(!tasks.commit("t0", "attempt-2").await.unwrap());
    assert_eq!(tasks.committed("t0").await.unwrap().as_deref(), Some("attempt-1"));
    assert_eq!(tasks.committed_all().await.unwrap().len(), 1);
    tasks.compact(&["t0".into()]).await.unwrap();
    let rows = read_parquet(&loc.join("jobs/j"), "results/errors.parquet").await.unwrap();
    assert_eq!(rows.iter().map(|b| b.num_rows()).sum::<usize>(), 1);
}

#[tokio::test]
async fn every_call_comes_through_each_kind_of_fault_by_retrying() {
    for kind in FaultKind::ALL {
        // Half the calls fail, two in a row: a retried create-only put needs two calls
        // (the put, the read-back), so within the policy's four attempts every call
        // comes through.
        let fates: Vec<_> = (0..4000).map(|i| if i % 4 < 2 { Some(kind) } else { None }).collect();
        let injector = scripted(&fates);
        let (loc, clean) = memory(&injector);
        every_call(&loc, &clean).await;
        let injected = injector.counts().total();
        assert!(injected > 20, "{kind:?}: only {injected} faults met");
    }
}

#[tokio::test]
async fn random_faults_on_a_local_directory_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let local: Arc<dyn ObjectStore> =
        Arc::new(LocalFileSystem::new_with_prefix(dir.path()).unwrap());
    let config = FaultConfig {
        error: 0.1,
        timeout: 0.05,
        throttle: 0.1,
        after_apply: 0.1,
        seed: 11,
        timeout_after: Duration::from_millis(1),
    };
    let injector = FaultInjector::new(config);
    let policy = RetryPolicy { max_attempts: 12, ..FAST };
    let store = Arc::new(FaultStore::new(local.clone(), injector.clone()));
    let loc = Location::from_store_with_policy(store, Path::default(), "faulty", policy);
    let clean = Location::from_store_with_policy(local, Path::default(), "clean", FAST);
    every_call(&loc, &clean).await;
    let counts = injector.counts();
    assert!(counts.error > 0 && counts.after_apply > 0 && counts.throttle > 0, "{counts:?}");
}

#[tokio::test]
async fn a_call_that_keeps_failing_gives_up_after_the_policy_s_attempts() {
    // Exactly as many faults as attempts: the call fails, and the next call meets none.
    let injector = scripted(&[Some(FaultKind::Throttle); 4]);
    let (loc, clean) = memory(&injector);
    clean.put("x", Bytes::from_static(b"x")).await.unwrap();
    let err = loc.get("x").await.unwrap_err().to_string();
    assert!(err.contains("SlowDown") && err.contains("test://root/x"), "{err}");
    assert_eq!(injector.counts().throttle, 4, "one call per attempt");
    assert_eq!(loc.get("x").await.unwrap(), Bytes::from_static(b"x"));
}

#[tokio::test]
async fn permanent_errors_and_lost_races_are_not_retried() {
    // The first call goes through; a retry would be the second call and meet the fault.
    for call in ["get", "create"] {
        let injector = scripted(&[None, Some(FaultKind::Error)]);
        let (loc, clean) = memory(&injector);
        clean.put("taken", Bytes::from_static(b"theirs")).await.unwrap();
        match call {
            "get" => {
                let err = loc.get("missing").await.unwrap_err();
                assert!(err.is_user_error(), "a missing object is reported as such: {err}");
            }
            _ => assert!(!loc.put_if_absent("taken", Bytes::from_static(b"mine")).await.unwrap()),
        }
        assert_eq!(injector.counts().total(), 0, "{call}: no second call was made");
    }
}

#[tokio::test]
async fn a_commit_whose_response_was_lost_is_ours_and_one_that_finds_another_s_lost() {
    let dir = tempfile::tempdir().unwrap();
    let local: Arc<dyn ObjectStore> =
        Arc::new(LocalFileSystem::new_with_prefix(dir.path()).unwrap());
    for inner in [local, Arc::new(InMemory::new()) as Arc<dyn ObjectStore>] {
        // The marker is written, the reply lost; the retry meets AlreadyExists, reads the
        // marker back and finds its own attempt.
        let injector = scripted(&[Some(FaultKind::AfterApply)]);
        let tasks = TaskStore::new(faulty(inner.clone(), &injector).join("jobs/j"));
        assert!(tasks.commit("t0", "attempt-1").await.unwrap(), "{inner}");
        assert_eq!(injector.counts().after_apply, 1);
        assert_eq!(tasks.committed("t0").await.unwrap().as_deref(), Some("attempt-1"));

        // A later attempt fails before reaching the store, retries, and finds the first
        // attempt's marker: it lost, and says so without retrying further.
        let injector = scripted(&[Some(FaultKind::Timeout)]);
        let tasks = TaskStore::new(faulty(inner.clone(), &injector).join("jobs/j"));
        assert!(!tasks.commit("t0", "attempt-2").await.unwrap(), "{inner}");
        assert_eq!(injector.counts().timeout, 1);
        assert_eq!(tasks.committed("t0").await.unwrap().as_deref(), Some("attempt-1"));

        // The reply lost, and then the read-back failing too: the read-back is retried
        // with the put, and the marker is still found to be ours.
        let injector = scripted(&[Some(FaultKind::AfterApply), None, Some(FaultKind::Error)]);
        let tasks = TaskStore::new(faulty(inner, &injector).join("jobs/j"));
        assert!(tasks.commit("t1", "attempt-3").await.unwrap());
        assert_eq!(injector.counts().total(), 2);
        assert_eq!(tasks.committed("t1").await.unwrap().as_deref(), Some("attempt-3"));
    }
}

#[tokio::test]
async fn a_listing_that_fails_part_way_returns_each_object_once() {
    let injector = scripted(&[Some(FaultKind::Error), Some(FaultKind::AfterApply)]);
    let (loc, clean) = memory(&injector);
    for i in 0..6 {
        clean.put(&format!("d/{i}"), Bytes::from_static(b"x")).await.unwrap();
    }
    // Each failing listing returns one object, then its error.
    assert_eq!(loc.list_all("d").await.unwrap(), ["0", "1", "2", "3", "4", "5"]);
    assert_eq!(injector.counts().total(), 2);
}

#[tokio::test]
async fn uploads_copies_and_deletes_are_retried_at_the_object_store_level() {
    let inner: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let injector = scripted(&[
        Some(FaultKind::Throttle),   // starting the multipart upload
        None,                        // ... again (parts and completion meet no faults)
        Some(FaultKind::AfterApply), // the create-only copy: applied, reply lost
        None,                        // the copy's retry: AlreadyExists
        None,                        // reading the source
        None,                        // reading the copy back: the same bytes, ours
        Some(FaultKind::AfterApply), // the delete: applied, reply lost
    ]);
    let store = RetryStore::new(Arc::new(FaultStore::new(inner.clone(), injector.clone())), FAST);
    let path = Path::from("big");
    let mut upload = store.put_multipart(&path).await.unwrap();
    upload.put_part(PutPayload::from_static(b"part")).await.unwrap();
    upload.complete().await.unwrap();
    assert_eq!(inner.get(&path).await.unwrap().bytes().await.unwrap(), Bytes::from_static(b"part"));
    store.copy_if_not_exists(&path, &Path::from("copy")).await.unwrap();
    store.delete(&path).await.unwrap();
    assert!(inner.head(&path).await.is_err());
    assert_eq!(injector.counts().total(), 3);
}

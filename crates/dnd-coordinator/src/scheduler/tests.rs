use super::*;

#[test]
fn phase_names_are_their_json_spelling() {
    for phase in Phase::ALL {
        assert_eq!(serde_json::to_string(&phase).unwrap(), format!("\"{}\"", phase.name()));
    }
}

const LEASE: i64 = 1000;

use dnd_core::NeuronId;

fn job_tasks() -> Vec<TaskDef> {
    vec![
        TaskDef { id: "probe-00000".into(), work: TaskWork::Probe { start: 0, end: 10 } },
        TaskDef { id: "probe-00001".into(), work: TaskWork::Probe { start: 10, end: 15 } },
        TaskDef {
            id: "fc-00000".into(),
            work: TaskWork::Neurons {
                layer: "fc".into(),
                neurons: vec![NeuronId::new(0), NeuronId::new(1)],
            },
        },
        TaskDef {
            id: "fc-00001".into(),
            work: TaskWork::Neurons { layer: "fc".into(), neurons: vec![NeuronId::new(2)] },
        },
    ]
}

fn scheduler_with_job(max_attempts: u32) -> Scheduler {
    let mut s = Scheduler::new(max_attempts, 100);
    assert_eq!(s.add_job("j", job_tasks(), &HashMap::new(), false, Vec::new(), 0), Next::Nothing);
    s
}

fn kinds(s: &Scheduler) -> Vec<String> {
    s.events("j").iter().map(|e| format!("{}:{}:{}", e.kind, e.task, e.attempt)).collect()
}

#[test]
fn a_job_runs_probe_tasks_then_neuron_tasks_then_compacts() {
    let mut s = scheduler_with_job(3);
    let a = s.lease("w1", 0, LEASE).unwrap();
    let b = s.lease("w2", 0, LEASE).unwrap();
    assert_eq!((a.task.id.as_str(), b.task.id.as_str()), ("probe-00000", "probe-00001"));
    assert!(s.lease("w3", 0, LEASE).is_none(), "neuron tasks wait for the probe merge");
    assert_ne!(a.lease.token, b.lease.token);
    assert_eq!(s.committed("j", &a.task.id, a.lease.token, 1).unwrap(), Next::Nothing);
    assert_eq!(s.committed("j", &b.task.id, b.lease.token, 1).unwrap(), Next::MergeProbe);
    assert!(s.lease("w3", 1, LEASE).is_none(), "not before the merge is done");
    assert_eq!(s.probe_merged("j", 2), Next::Nothing);
    let c = s.lease("w1", 2, LEASE).unwrap();
    let d = s.lease("w2", 2, LEASE).unwrap();
    s.heartbeat("j", &c.task.id, c.lease.token, &[(Stage::Caption, 1)], 3, LEASE).unwrap();
    let view = s.view("j").unwrap();
    assert_eq!(view.phase, Phase::Describing);
    assert_eq!(view.stages[0], (Stage::Probe, 15, 15));
    assert!(view.stages.contains(&(Stage::Caption, 1, 3)), "{:?}", view.stages);
    assert_eq!(s.committed("j", &c.task.id, c.lease.token, 4).unwrap(), Next::Nothing);
    assert_eq!(s.committed("j", &d.task.id, d.lease.token, 4).unwrap(), Next::Compact);
    s.finish("j", 5);
    let view = s.view("j").unwrap();
    assert_eq!((view.phase, view.counts.committed, view.counts.total), (Phase::Succeeded, 4, 4));
    assert!(view.stages.iter().all(|(_, done, total)| done == total), "{:?}", view.stages);
    assert_eq!(kinds(&s).last().unwrap(), "succeeded::0");
}

#[test]
fn an_expired_lease_is_retried_under_a_new_token_and_the_old_token_is_refused() {
    let mut s = scheduler_with_job(3);
    let first = s.lease("w1", 0, LEASE).unwrap();
    // Heartbeats keep it alive past the first deadline ...
    s.heartbeat("j", &first.task.id, first.lease.token, &[], 900, LEASE).unwrap();
    assert!(s.reap(1500).is_empty());
    // ... until they stop.
    assert!(s.reap(2000).is_empty());
    let retry = s.lease("w2", 2000, LEASE).unwrap();
    assert_eq!(
        (retry.task.id.as_str(), retry.lease.attempt),
        ("probe-00000", 2),
        "retries go first"
    );
    assert!(retry.lease.token > first.lease.token);
    assert_eq!(
        s.heartbeat("j", &first.task.id, first.lease.token, &[], 2001, LEASE),
        Err(Refused::LeaseLost("probe-00000".into()))
    );
    assert!(s.failed("j", &first.task.id, first.lease.token, "late", false, 2001).is_err());
    let log = kinds(&s);
    assert!(
        log.contains(&"lease_expired:probe-00000:1".to_string())
            && log.contains(&"retried:probe-00000:2".to_string()),
        "{log:?}"
    );
    assert_eq!(s.view("j").unwrap().counts.retried, 1);
}

#[test]
fn a_task_that_keeps_failing_is_recorded_and_the_job_goes_on() {
    let mut s = Scheduler::new(2, 1);
    let tasks = job_tasks();
    let done: HashMap<String, bool> =
        [("probe-00000".to_string(), false), ("probe-00001".to_string(), false)].into();
    assert_eq!(s.add_job("j", tasks, &done, true, Vec::new(), 0), Next::Nothing);
    let mut outcome = (true, Next::Nothing);
    for _ in 0..2 {
        let l = s.lease("w", 0, LEASE).unwrap();
        assert_eq!(l.task.id, "fc-00000");
        outcome = s.failed("j", &l.task.id, l.lease.token, "boom", false, 1).unwrap();
    }
    assert_eq!(
        outcome,
        (false, Next::RecordFailure { task: "fc-00000".into(), attempts: 2, error: "boom".into() })
    );
    let other = s.lease("w", 2, LEASE).unwrap();
    assert_eq!(other.task.id, "fc-00001");
    assert_eq!(s.failure_recorded("j"), Next::Nothing);
    assert_eq!(s.committed("j", "fc-00001", other.lease.token, 3).unwrap(), Next::Compact);
    assert_eq!(s.view("j").unwrap().counts.failed, 1);
}

#[test]
fn a_handed_back_task_keeps_its_attempts_and_a_failed_probe_fails_the_job() {
    let mut s = scheduler_with_job(1);
    let l = s.lease("w", 0, LEASE).unwrap();
    assert_eq!(
        s.failed("j", &l.task.id, l.lease.token, "shutting down", true, 1).unwrap(),
        (true, Next::Nothing)
    );
    let again = s.lease("w2", 1, LEASE).unwrap();
    assert_eq!((again.task.id.as_str(), again.lease.attempt), (l.task.id.as_str(), 1));
    let (retried, _) =
        s.failed("j", &again.task.id, again.lease.token, "corrupt", false, 2).unwrap();
    assert!(!retried);
    let view = s.view("j").unwrap();
    assert_eq!(view.phase, Phase::Failed);
    assert!(view.error.contains("corrupt"), "{}", view.error);
    assert!(s.lease("w", 3, LEASE).is_none(), "a failed job leases nothing");
}

#[test]
fn a_commit_by_a_zombie_attempt_counts_once() {
    let mut s = scheduler_with_job(3);
    let old = s.lease("w1", 0, LEASE).unwrap();
    s.reap(LEASE + 1);
    let new = s.lease("w2", LEASE + 1, LEASE).unwrap();
    assert_eq!(new.task.id, old.task.id);
    // The old attempt committed first (the marker is in the store): it counts.
    s.committed("j", &old.task.id, old.lease.token, LEASE + 2).unwrap();
    assert!(
        s.heartbeat("j", &new.task.id, new.lease.token, &[], LEASE + 3, LEASE).is_err(),
        "the new attempt is told to stop"
    );
    assert_eq!(s.committed("j", &new.task.id, new.lease.token, LEASE + 4).unwrap(), Next::Nothing);
    assert_eq!(s.events("j").iter().filter(|e| e.kind == "committed").count(), 1);
}

#[test]
fn a_resumed_job_skips_committed_tasks_and_continues_its_log() {
    let mut s = Scheduler::new(3, 1);
    let done: HashMap<String, bool> =
        ["probe-00000", "probe-00001", "fc-00000"].iter().map(|t| (t.to_string(), false)).collect();
    let earlier = vec![Event {
        seq: 0,
        unix_ms: 0,
        kind: "submitted".into(),
        task: String::new(),
        attempt: 0,
        worker: String::new(),
        message: String::new(),
    }];
    s.add_job("j", job_tasks(), &done, true, earlier, 10);
    assert_eq!(s.events("j")[1].seq, 1);
    let only = s.lease("w", 10, LEASE).unwrap();
    assert_eq!(only.task.id, "fc-00001");
    assert!(s.lease("w", 10, LEASE).is_none());
    assert_eq!(s.committed("j", "fc-00001", only.lease.token, 11).unwrap(), Next::Compact);
}

#[test]
fn cancel_stops_leasing_and_heartbeats() {
    let mut s = scheduler_with_job(3);
    let l = s.lease("w", 0, LEASE).unwrap();
    s.cancel("j", 1).unwrap();
    assert!(s.lease("w", 1, LEASE).is_none());
    assert!(s.heartbeat("j", &l.task.id, l.lease.token, &[], 2, LEASE).is_err());
    assert_eq!(s.view("j").unwrap().phase, Phase::Cancelled);
}

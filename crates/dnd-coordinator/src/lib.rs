//! dnd-coordinator: shards a dissection into probe tasks and neuron tasks and leases them
//! to workers over gRPC (`proto/dnd.proto`). Leases carry fencing tokens and expire
//! without heartbeats; failed tasks are retried, then recorded as failed while the rest of
//! the job completes. The store is the truth (the job spec, its plan and the tasks' commit
//! markers), so a restarted coordinator resumes every unfinished job.

pub mod coordinator;
pub mod scheduler;
pub mod service;

pub use coordinator::{Coordinator, CoordinatorError, Settings, Submitted, read_events};
pub use scheduler::{Event, JobView, Phase};
pub use service::{Served, serve, serve_loopback, status_to_pb};

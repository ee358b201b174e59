//! Progress reporting for long stages, without tying the pipeline to a terminal.

use dnd_core::Stage;

/// Receives progress of the stages; the CLI draws bars, services export metrics.
pub trait Progress: Send + Sync {
    /// A stage starts with `total` units of work.
    fn begin(&self, stage: &str, total: u64);
    fn advance(&self, done: u64);
    fn end(&self);

    /// Several stages that advance side by side, one bar each, declared up front with
    /// their totals (the describe stages of a dissection, counted in neurons).
    fn begin_stages(&self, stages: &[(Stage, u64)]) {
        let _ = stages;
    }
    fn advance_stage(&self, stage: Stage, done: u64) {
        let _ = (stage, done);
    }
    fn end_stages(&self) {}
}

/// Reports nothing.
pub struct NoProgress;

impl Progress for NoProgress {
    fn begin(&self, _: &str, _: u64) {}
    fn advance(&self, _: u64) {}
    fn end(&self) {}
}

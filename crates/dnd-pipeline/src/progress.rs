//! Progress reporting for long stages, without tying the pipeline to a terminal.

/// Receives progress of the stages; the CLI draws bars, services export metrics.
pub trait Progress: Send + Sync {
    /// A stage starts with `total` units of work.
    fn begin(&self, stage: &str, total: u64);
    fn advance(&self, done: u64);
    fn end(&self);
}

/// Reports nothing.
pub struct NoProgress;

impl Progress for NoProgress {
    fn begin(&self, _: &str, _: u64) {}
    fn advance(&self, _: u64) {}
    fn end(&self) {}
}

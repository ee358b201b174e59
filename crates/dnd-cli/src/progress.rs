//! Progress bars on stderr (hidden when stderr is not a terminal).

use std::sync::Mutex;

use indicatif::{ProgressBar, ProgressStyle};

use dnd_pipeline::Progress;

/// One bar per stage, replaced when the next stage begins.
pub struct Bars {
    current: Mutex<Option<ProgressBar>>,
}

impl Bars {
    pub fn new() -> Self {
        Self { current: Mutex::new(None) }
    }
}

impl Progress for Bars {
    fn begin(&self, stage: &str, total: u64) {
        let bar = ProgressBar::new(total);
        bar.set_style(
            ProgressStyle::with_template("{prefix:>8} [{bar:40}] {pos}/{len} {per_sec} eta {eta}")
                .expect("the template is valid")
                .progress_chars("=> "),
        );
        bar.set_prefix(stage.to_string());
        if let Some(old) = self.current.lock().expect("no panics while holding the lock").replace(bar) {
            old.finish();
        }
    }

    fn advance(&self, done: u64) {
        if let Some(bar) = &*self.current.lock().expect("no panics while holding the lock") {
            bar.inc(done);
        }
    }

    fn end(&self) {
        if let Some(bar) = self.current.lock().expect("no panics while holding the lock").take() {
            bar.finish();
        }
    }
}

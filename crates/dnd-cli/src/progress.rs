//! Progress bars on stderr (hidden when stderr is not a terminal).

use std::collections::HashMap;
use std::sync::Mutex;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use dnd_core::Stage;
use dnd_pipeline::Progress;

fn bar(multi: &MultiProgress, stage: &str, total: u64) -> ProgressBar {
    let bar = multi.add(ProgressBar::new(total));
    bar.set_style(
        ProgressStyle::with_template("{prefix:>9} [{bar:40}] {pos}/{len} {per_sec} eta {eta}")
            .expect("the template is valid")
            .progress_chars("=> "),
    );
    bar.set_prefix(stage.to_string());
    bar
}

/// One bar per sequential stage (replaced when the next begins), and one bar per
/// side-by-side stage.
pub struct Bars {
    multi: MultiProgress,
    current: Mutex<Option<ProgressBar>>,
    stages: Mutex<HashMap<Stage, ProgressBar>>,
}

impl Bars {
    pub fn new() -> Self {
        Self {
            multi: MultiProgress::new(),
            current: Mutex::new(None),
            stages: Mutex::new(HashMap::new()),
        }
    }
}

impl Progress for Bars {
    fn begin(&self, stage: &str, total: u64) {
        let bar = bar(&self.multi, stage, total);
        if let Some(old) =
            self.current.lock().expect("no panics while holding the lock").replace(bar)
        {
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

    fn begin_stages(&self, stages: &[(Stage, u64)]) {
        let mut bars = self.stages.lock().expect("no panics while holding the lock");
        for (stage, total) in stages {
            bars.insert(*stage, bar(&self.multi, stage.name(), *total));
        }
    }

    fn advance_stage(&self, stage: Stage, done: u64) {
        if let Some(bar) = self.stages.lock().expect("no panics while holding the lock").get(&stage)
        {
            bar.inc(done);
        }
    }

    fn end_stages(&self) {
        for (_, bar) in self.stages.lock().expect("no panics while holding the lock").drain() {
            bar.finish();
        }
    }
}

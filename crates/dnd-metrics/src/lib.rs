//! dnd-metrics: a small Prometheus registry (counters, gauges, histograms with fixed
//! buckets) rendered in the text exposition format, and an HTTP server for `/metrics` and
//! `/healthz`. Metric names are documented in `docs/metrics.md`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

/// Upper bounds (seconds) of the duration histograms: from a cached stage to a slow model.
pub const SECONDS_BUCKETS: [f64; 12] =
    [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

#[derive(Debug, Clone, Default)]
struct Histogram {
    buckets: Vec<u64>,
    count: u64,
    sum: f64,
}

#[derive(Debug)]
struct Family {
    kind: Kind,
    help: &'static str,
    values: BTreeMap<String, f64>,
    histograms: BTreeMap<String, Histogram>,
}

/// A registry shared by a process's components.
#[derive(Debug, Default, Clone)]
pub struct Metrics {
    families: Arc<Mutex<BTreeMap<&'static str, Family>>>,
}

fn labels_text(labels: &[(&str, &str)]) -> String {
    if labels.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = labels
        .iter()
        .map(|(k, v)| {
            format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n"))
        })
        .collect();
    format!("{{{}}}", parts.join(","))
}

impl Metrics {
    pub fn new() -> Self {
        Self::default()
    }

    fn with<R>(&self, name: &'static str, f: impl FnOnce(&mut Family) -> R) -> Option<R> {
        let mut families = self.families.lock().unwrap_or_else(|e| e.into_inner());
        families.get_mut(name).map(f)
    }

    /// Declares a metric; a metric must be declared before it is updated (updates to an
    /// undeclared name are ignored, so a typo cannot invent a metric).
    pub fn describe(&self, name: &'static str, kind: Kind, help: &'static str) {
        let mut families = self.families.lock().unwrap_or_else(|e| e.into_inner());
        families.entry(name).or_insert(Family {
            kind,
            help,
            values: BTreeMap::new(),
            histograms: BTreeMap::new(),
        });
    }

    pub fn inc(&self, name: &'static str, labels: &[(&str, &str)], by: f64) {
        let key = labels_text(labels);
        self.with(name, |f| *f.values.entry(key).or_insert(0.0) += by);
    }

    pub fn set(&self, name: &'static str, labels: &[(&str, &str)], value: f64) {
        let key = labels_text(labels);
        self.with(name, |f| {
            f.values.insert(key, value);
        });
    }

    pub fn observe(&self, name: &'static str, labels: &[(&str, &str)], value: f64) {
        let key = labels_text(labels);
        self.with(name, |f| {
            let h = f.histograms.entry(key).or_insert_with(|| Histogram {
                buckets: vec![0; SECONDS_BUCKETS.len()],
                count: 0,
                sum: 0.0,
            });
            for (i, bound) in SECONDS_BUCKETS.iter().enumerate() {
                if value <= *bound {
                    h.buckets[i] += 1;
                }
            }
            h.count += 1;
            h.sum += value;
        });
    }

    /// The text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let families = self.families.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = String::new();
        for (name, f) in families.iter() {
            let kind = match f.kind {
                Kind::Counter => "counter",
                Kind::Gauge => "gauge",
                Kind::Histogram => "histogram",
            };
            let _ = writeln!(out, "# HELP {name} {}", f.help);
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (labels, v) in &f.values {
                let _ = writeln!(out, "{name}{labels} {v}");
            }
            for (labels, h) in &f.histograms {
                let inner = labels.trim_start_matches('{').trim_end_matches('}');
                let sep = if inner.is_empty() { "" } else { "," };
                for (i, bound) in SECONDS_BUCKETS.iter().enumerate() {
                    let _ = writeln!(
                        out,
                        "{name}_bucket{{{inner}{sep}le=\"{bound}\"}} {}",
                        h.buckets[i]
                    );
                }
                let _ = writeln!(out, "{name}_bucket{{{inner}{sep}le=\"+Inf\"}} {}", h.count);
                let _ = writeln!(out, "{name}_sum{labels} {}", h.sum);
                let _ = writeln!(out, "{name}_count{labels} {}", h.count);
            }
        }
        out
    }
}

/// Serves `/metrics` (after `refresh` updates the gauges computed on demand) and
/// `/healthz` on `addr`; the bound address.
pub async fn serve(
    metrics: Metrics,
    addr: &str,
    refresh: impl Fn() + Send + Sync + 'static,
) -> std::io::Result<SocketAddr> {
    use axum::routing::get;
    let refresh = Arc::new(refresh);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let metrics = metrics.clone();
                let refresh = refresh.clone();
                async move {
                    refresh();
                    ([("content-type", "text/plain; version=0.0.4")], metrics.render())
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }));
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the metrics server stopped");
        }
    });
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_gauges_and_histograms_in_the_exposition_format() {
        let m = Metrics::new();
        m.describe("dnd_tasks_committed_total", Kind::Counter, "Tasks committed.");
        m.describe("dnd_tasks_queued", Kind::Gauge, "Tasks waiting.");
        m.describe("dnd_stage_seconds", Kind::Histogram, "Stage durations.");
        m.inc("dnd_tasks_committed_total", &[], 1.0);
        m.inc("dnd_tasks_committed_total", &[], 2.0);
        m.set("dnd_tasks_queued", &[("job", "a\"b")], 4.0);
        m.observe("dnd_stage_seconds", &[("stage", "caption")], 0.3);
        m.inc("dnd_not_declared_total", &[], 1.0);
        let text = m.render();
        assert!(
            text.contains(
                "# TYPE dnd_tasks_committed_total counter\ndnd_tasks_committed_total 3\n"
            ),
            "{text}"
        );
        assert!(text.contains("dnd_tasks_queued{job=\"a\\\"b\"} 4"), "{text}");
        assert!(
            text.contains("dnd_stage_seconds_bucket{stage=\"caption\",le=\"0.25\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("dnd_stage_seconds_bucket{stage=\"caption\",le=\"0.5\"} 1"),
            "{text}"
        );
        assert!(text.contains("dnd_stage_seconds_count{stage=\"caption\"} 1"), "{text}");
        assert!(!text.contains("dnd_not_declared_total"));
    }
}

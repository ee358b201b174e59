//! The evaluation of a neuron's labels (`results/evaluation.parquet`): the numbers the
//! index sorts and filters on, and the neuron page's table.

use std::fmt::Write;

use dnd_store::results::EvaluationRow;

use super::{esc, num};

/// The `source` of the job's own labels.
const OWN: &str = "dnd";

/// The value of `metric` for the neuron's best label.
pub fn best_label(rows: &[EvaluationRow], metric: &str) -> Option<f64> {
    rows.iter()
        .find(|r| r.source == OWN && r.label_rank == 1 && r.metric == metric)
        .and_then(|r| r.value)
}

/// The neuron page's section: every metric of every label, with its interval.
pub fn section(rows: &[EvaluationRow]) -> String {
    let mut b = String::new();
    if rows.is_empty() {
        return b;
    }
    b.push_str(
        "<section id=\"evaluation\" aria-labelledby=\"eval-h\"><h2 id=\"eval-h\">Evaluation</h2>",
    );
    b.push_str("<p class=\"note\">Each label scored against the neuron (docs/schema.md): simulation correlation of its predicted with the actual activation over the probe set; AUPRC, F1 and IoU at finding the top share of probe images; CoSy's AUC and MAD on images generated from it against random probe images. Intervals: 95% bootstrap over images.</p>");
    b.push_str("<table class=\"evaluation\"><thead><tr><th scope=\"col\">Source</th><th scope=\"col\">Label</th><th scope=\"col\">Metric</th><th scope=\"col\">Top share</th><th scope=\"col\">Value</th><th scope=\"col\">95% interval</th><th scope=\"col\">Images</th></tr></thead><tbody>");
    for r in rows {
        let interval = match (r.ci_low, r.ci_high) {
            (Some(lo), Some(hi)) => format!("{} – {}", num(Some(lo), 3), num(Some(hi), 3)),
            _ => "–".into(),
        };
        let _ = write!(
            b,
            "<tr><td>{}</td><td>{}. {}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&r.source),
            r.label_rank,
            esc(&r.label),
            esc(&r.metric),
            r.quantile.map_or("–".to_string(), |q| format!("{q}")),
            num(r.value, 3),
            interval,
            r.images
        );
    }
    b.push_str("</tbody></table></section>\n");
    b
}

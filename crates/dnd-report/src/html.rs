//! The pages: plain HTML with one stylesheet; only the index has a script (sorting,
//! filtering and paging its table).

use std::collections::HashMap;
use std::fmt::Write;

use serde_json::{Value, json};

use dnd_core::{NeuronId, UnitKind};
use dnd_pipeline::NeuronSpec;

use dnd_store::results::{CaptionRow, DescriptionRow, ImageRow, ScoreRow};

use crate::data::{JobResults, NeuronData};
use crate::images::Images;
use crate::{Job, ReportOptions};

mod evaluation;

pub const STYLE_CSS: &str = include_str!("../assets/style.css");
pub const INDEX_JS: &str = include_str!("../assets/index.js");

/// HTML-escapes text for element content and quoted attributes.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A file name part: letters, digits, `_`, `.` and `-` kept, anything else `_`.
fn slug(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') { c } else { '_' })
        .collect()
}

/// The page of a neuron, relative to `neurons/`.
pub fn neuron_file(layer: &str, neuron: NeuronId) -> String {
    format!("{}-{neuron}.html", slug(layer))
}

pub(crate) fn num(v: Option<f64>, digits: usize) -> String {
    match v {
        Some(x) if x.is_finite() => format!("{x:.digits$}"),
        Some(x) => x.to_string(),
        None => "–".into(),
    }
}

fn page(title: &str, css: &str, body: &str) -> String {
    format!(
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{}</title>\n<link rel=\"stylesheet\" href=\"{css}\">\n</head>\n<body>\n{body}\n</body>\n</html>\n",
        esc(title)
    )
}

/// The neuron selection as the job file writes it: `all`, or `layer: ids; ...`.
fn neurons_text(neurons: &NeuronSpec) -> String {
    match neurons {
        NeuronSpec::Every(ids) => ids.clone(),
        NeuronSpec::PerLayer(map) => {
            map.iter().map(|(layer, ids)| format!("{layer}: {ids}")).collect::<Vec<_>>().join("; ")
        }
    }
}

/// A value's name as the job file and summary write it (serde's spelling).
fn serde_name(value: &impl serde::Serialize) -> String {
    match serde_json::to_value(value) {
        Ok(Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(_) => "–".into(),
    }
}

/// What a neuron of this kind is called on its page.
fn unit_word(kind: UnitKind) -> &'static str {
    match kind {
        UnitKind::Channel => "neuron",
        UnitKind::Direction => "direction",
        UnitKind::Sae => "SAE latent",
    }
}

/// The index's data: one row per neuron, as a script (pages opened from file:// cannot
/// fetch JSON).
pub fn neurons_js(results: &JobResults, options: &ReportOptions) -> String {
    let rows: Vec<Value> = results
        .neurons
        .iter()
        .map(|n| {
            let d = &n.description;
            let others: Vec<&str> =
                [&d.label_2, &d.label_3].into_iter().flatten().map(String::as_str).collect();
            let truth = options.ground_truth.get(&(d.layer.clone(), d.neuron));
            json!([
                d.layer,
                d.neuron,
                d.label,
                d.score,
                d.status,
                neuron_file(&d.layer, d.neuron),
                others.join("; "),
                truth,
                evaluation::best_label(&n.evaluation, "correlation"),
                evaluation::best_label(&n.evaluation, "cosy_auc"),
                d.unit_kind,
            ])
        })
        .collect();
    let data = json!({
        "layers": results.layers,
        "truth": !options.ground_truth.is_empty(),
        "evaluated": results.neurons.iter().any(|n| !n.evaluation.is_empty()),
        "pageSize": options.page_size.max(1),
        "rows": rows,
    });
    format!("window.DND_REPORT = {data};\n")
}

pub fn index_html(
    job: &Job,
    results: &JobResults,
    options: &ReportOptions,
    images_missing: usize,
) -> String {
    let spec = &job.spec;
    let mut b = String::new();
    let _ = write!(b, "<header><h1>Dissection <code>{}</code></h1>", esc(&job.name));
    let _ = write!(
        b,
        "<p class=\"where\">Job directory: <code>{}</code></p></header>\n<main>\n",
        esc(&job.location.to_string())
    );

    b.push_str("<section aria-labelledby=\"job-h\"><h2 id=\"job-h\">The job</h2><div class=\"facts\">\n<dl>");
    let fact = |b: &mut String, k: &str, v: String| {
        let _ = write!(b, "<dt>{}</dt><dd>{}</dd>", esc(k), esc(&v));
    };
    fact(&mut b, "Model", spec.target.model.clone());
    fact(&mut b, "Layers", spec.target.layers.join(", "));
    fact(&mut b, "Neurons", neurons_text(&spec.target.neurons));
    fact(&mut b, "Probe set", spec.probe.images.clone());
    fact(&mut b, "Top images per neuron", spec.describe.top_images.to_string());
    fact(&mut b, "Summariser", serde_name(&spec.summarizer.backend));
    fact(&mut b, "Images per concept", spec.generator.images_per_concept.to_string());
    fact(&mut b, "Seed", spec.seed.to_string());
    b.push_str("</dl>\n");

    let summary = job.summary.as_ref();
    b.push_str("<dl>");
    match summary {
        Some(s) => {
            let neurons = results.neurons.len();
            fact(&mut b, "Neurons described", neurons.to_string());
            fact(
                &mut b,
                "Outcome",
                format!(
                    "{} labelled, {} without candidates, {} failed{}",
                    s.neurons_ok,
                    s.neurons_no_candidates,
                    s.neurons_failed,
                    if s.neurons_dead + s.neurons_dense > 0 {
                        format!(
                            ", {} dead and {} dense SAE latents skipped",
                            s.neurons_dead, s.neurons_dense
                        )
                    } else {
                        String::new()
                    }
                ),
            );
            fact(
                &mut b,
                "Tasks",
                format!("{} ({} resumed, {} failed)", s.tasks, s.tasks_resumed, s.tasks_failed),
            );
            fact(&mut b, "Problems recorded", format!("{} rows in results/errors", results.errors));
            fact(
                &mut b,
                "Time",
                format!(
                    "{} s total (load {} s, probe {} s, describe {} s; {} s per neuron)",
                    num(Some(s.total_seconds), 1),
                    num(Some(s.load_seconds), 1),
                    num(Some(s.probe_seconds), 1),
                    num(Some(s.describe_seconds), 1),
                    num(Some(s.seconds_per_neuron), 2)
                ),
            );
            fact(&mut b, "Peak memory", format!("{} MiB", num(Some(s.peak_rss_mib), 0)));
            fact(&mut b, "dnd version", s.dnd_version.clone());
        }
        None => {
            fact(&mut b, "Summary", "summary.json is missing: the job may not have finished".into())
        }
    }
    if images_missing > 0 {
        fact(
            &mut b,
            "Images missing from this report",
            format!("{images_missing} (could not be read when it was written)"),
        );
    }
    b.push_str("</dl></div>\n");

    if let Some(models) = summary.map(|s| &s.models) {
        b.push_str("<h3>Models</h3><table class=\"models\"><thead><tr><th scope=\"col\">role</th><th scope=\"col\">identity (reference and pinned weights)</th></tr></thead><tbody>");
        for (role, id) in models {
            let _ = write!(
                b,
                "<tr><th scope=\"row\">{}</th><td><code>{}</code></td></tr>",
                esc(role),
                esc(id)
            );
        }
        b.push_str("</tbody></table>\n");
    }
    if let Some(s) = summary {
        let cache = &s.cache;
        b.push_str("<h3>Cache</h3><table class=\"cache\"><thead><tr><th scope=\"col\">kind</th><th scope=\"col\">reused</th><th scope=\"col\">computed</th><th scope=\"col\">hit rate</th></tr></thead><tbody>");
        for (kind, c) in cache {
            let (hits, misses) = (c.hits, c.misses);
            let rate = if hits + misses == 0 {
                "–".to_string()
            } else {
                format!("{:.0}%", 100.0 * hits as f64 / (hits + misses) as f64)
            };
            let _ = write!(
                b,
                "<tr><th scope=\"row\">{}</th><td>{hits}</td><td>{misses}</td><td>{rate}</td></tr>",
                esc(kind)
            );
        }
        let _ = writeln!(
            b,
            "</tbody></table><p>All model calls: {:.0}% answered by the cache.</p>",
            100.0 * s.cache_hit_rate
        );
    }
    b.push_str("</section>\n");

    let truth = !options.ground_truth.is_empty();
    b.push_str("<section aria-labelledby=\"neurons-h\"><h2 id=\"neurons-h\">Neurons</h2>\n<form id=\"filters\" class=\"filters\" role=\"search\" onsubmit=\"return false\">\n");
    b.push_str("<label for=\"f-layer\">Layer</label> <select id=\"f-layer\" name=\"layer\"><option value=\"\">all layers</option>");
    for l in &results.layers {
        let _ = write!(b, "<option value=\"{0}\">{0}</option>", esc(l));
    }
    b.push_str("</select>\n<label for=\"f-text\">Label contains</label> <input id=\"f-text\" name=\"text\" type=\"search\" placeholder=\"e.g. red\" autocomplete=\"off\">\n");
    b.push_str("<label for=\"f-min\">Score at least</label> <input id=\"f-min\" name=\"min\" type=\"number\" step=\"any\" inputmode=\"decimal\">\n");
    b.push_str("<label for=\"f-max\">at most</label> <input id=\"f-max\" name=\"max\" type=\"number\" step=\"any\" inputmode=\"decimal\">\n");
    let evaluated = results.neurons.iter().any(|n| !n.evaluation.is_empty());
    if evaluated {
        b.push_str("<label for=\"f-rmax\">Simulation r at most</label> <input id=\"f-rmax\" name=\"rmax\" type=\"number\" step=\"any\" inputmode=\"decimal\">\n");
    }
    b.push_str("<button type=\"reset\" id=\"f-reset\">Clear</button>\n</form>\n");
    b.push_str("<p id=\"count\" role=\"status\" aria-live=\"polite\"></p>\n");
    b.push_str("<table id=\"neurons\" class=\"neurons\"><thead><tr>");
    let mut cols = vec![
        ("layer", "Layer"),
        ("neuron", "Neuron"),
        ("label", "Top label"),
        ("score", "Score"),
        ("status", "Status"),
    ];
    if truth {
        cols.push(("truth", "Ground truth"));
    }
    if evaluated {
        cols.push(("correlation", "Simulation r"));
        cols.push(("cosy", "CoSy AUC"));
    }
    for (key, name) in cols {
        let _ = write!(
            b,
            "<th scope=\"col\" data-key=\"{key}\" aria-sort=\"none\"><button type=\"button\" data-sort=\"{key}\">{name}</button></th>"
        );
    }
    b.push_str("<th scope=\"col\">Other labels</th></tr></thead><tbody></tbody></table>\n");
    b.push_str("<nav class=\"pager\" aria-label=\"Pages of the table\"><button type=\"button\" id=\"prev\">← Previous</button> <span id=\"page\"></span> <button type=\"button\" id=\"next\">Next →</button></nav>\n");
    let _ = writeln!(
        b,
        "<noscript><p>The table needs JavaScript. Every neuron also has its own page: <code>neurons/&lt;layer&gt;-&lt;neuron&gt;.html</code>, e.g. <a href=\"neurons/{}\">the first one</a>.</p></noscript>",
        results
            .neurons
            .first()
            .map(|n| neuron_file(&n.description.layer, n.description.neuron))
            .unwrap_or_default()
    );
    b.push_str("</section>\n</main>\n<script src=\"neurons.js\"></script>\n<script src=\"index.js\"></script>");
    page(&format!("dnd: {}", job.name), "style.css", &b)
}

fn figure(
    b: &mut String,
    img: &ImageRow,
    images: &Images,
    options: &ReportOptions,
    boxes: &[&ImageRow],
    caption_html: &str,
) {
    b.push_str("<figure class=\"img\">");
    match images.by_uri.get(&img.uri) {
        Some(c) => {
            let w = options.thumb_px;
            let h =
                ((w as f64) * c.thumb_height as f64 / c.thumb_width.max(1) as f64).round() as u32;
            let alt = match img.kind.as_str() {
                "generated" => format!(
                    "generated for “{}”, seed {}",
                    img.concept.as_deref().unwrap_or(""),
                    img.seed.unwrap_or(0)
                ),
                "crop" => format!(
                    "attention crop {} of {}",
                    img.crop_index.unwrap_or(0),
                    img.image_id.as_deref().unwrap_or("")
                ),
                _ => format!("probe image {}", img.image_id.as_deref().unwrap_or("")),
            };
            let _ = write!(
                b,
                "<a class=\"frame\" href=\"../{}\" title=\"full size ({}×{})\"><img src=\"../{}\" width=\"{w}\" height=\"{h}\" alt=\"{}\" loading=\"lazy\">",
                esc(&c.full),
                c.width,
                c.height,
                esc(&c.thumb),
                esc(&alt)
            );
            for bx in boxes {
                let (Some(cs), Some(x0), Some(y0), Some(x1), Some(y1)) =
                    (bx.canvas_size, bx.x0, bx.y0, bx.x1, bx.y1)
                else {
                    continue;
                };
                let cs = cs.max(1) as f64;
                let pct = |v: i32| 100.0 * v as f64 / cs;
                let _ = write!(
                    b,
                    "<span class=\"box\" style=\"left:{:.2}%;top:{:.2}%;width:{:.2}%;height:{:.2}%\" title=\"crop {}: activation {:.3}\"></span>",
                    pct(x0),
                    pct(y0),
                    pct(x1 - x0),
                    pct(y1 - y0),
                    bx.crop_index.unwrap_or(0),
                    bx.activation
                );
            }
            b.push_str("</a>");
        }
        None => {
            let _ =
                write!(b, "<div class=\"missing\" title=\"{}\">image missing</div>", esc(&img.uri));
        }
    }
    let _ = write!(b, "<figcaption>{caption_html}</figcaption></figure>");
}

fn caption_text(c: Option<&&CaptionRow>) -> String {
    match c {
        Some(c) => {
            let mut s = format!("<q class=\"caption\">{}</q>", esc(&c.caption));
            if let Some(l) = &c.simplified {
                let _ = write!(s, "<br><span class=\"simplified\">→ {}</span>", esc(l));
            }
            s
        }
        None => String::new(),
    }
}

fn rank_value(s: &ScoreRow) -> Option<f64> {
    match s.rank_score.as_str() {
        "topk_sq_mean" => s.topk_sq_mean,
        "mean" => s.mean,
        "median" => s.median,
        "sq_mean" => s.sq_mean,
        _ => s.topk_sq_mean,
    }
}

pub fn neuron_html(
    job: &Job,
    n: &NeuronData,
    prev: Option<&DescriptionRow>,
    next: Option<&DescriptionRow>,
    images: &Images,
    options: &ReportOptions,
) -> String {
    let d = &n.description;
    let mut b = String::new();
    b.push_str(
        "<nav class=\"top\" aria-label=\"Neurons\"><a href=\"../index.html\">↑ All neurons</a>",
    );
    if let Some(p) = prev {
        let _ = write!(
            b,
            " <a href=\"{}\" rel=\"prev\">← {} {}</a>",
            esc(&neuron_file(&p.layer, p.neuron)),
            esc(&p.layer),
            p.neuron
        );
    }
    if let Some(x) = next {
        let _ = write!(
            b,
            " <a href=\"{}\" rel=\"next\">{} {} →</a>",
            esc(&neuron_file(&x.layer, x.neuron)),
            esc(&x.layer),
            x.neuron
        );
    }
    b.push_str("</nav>\n");
    let _ = write!(
        b,
        "<header><h1>{} · {} {}</h1><p>Job <code>{}</code>{} · status <span class=\"status status-{}\">{}</span> · task <code>{}</code></p></header>\n<main>\n",
        esc(&d.layer),
        unit_word(d.unit_kind),
        d.neuron,
        esc(&job.name),
        d.unit_source
            .as_deref()
            .map(|s| format!(" · dictionary <code>{}</code>", esc(s)))
            .unwrap_or_default(),
        esc(d.status.as_str()),
        esc(&d.status.as_str().replace('_', " ")),
        esc(&d.task)
    );

    b.push_str(
        "<section id=\"labels\" aria-labelledby=\"labels-h\"><h2 id=\"labels-h\">Labels</h2>",
    );
    let labels: Vec<(&String, Option<f64>)> =
        [(&d.label, d.score), (&d.label_2, d.score_2), (&d.label_3, d.score_3)]
            .into_iter()
            .filter_map(|(l, s)| l.as_ref().map(|l| (l, s)))
            .collect();
    if labels.is_empty() {
        let _ = write!(b, "<p>No label ({}).</p>", esc(&d.status.as_str().replace('_', " ")));
    } else {
        b.push_str("<ol class=\"labels\">");
        for (l, s) in labels {
            let _ = write!(
                b,
                "<li><strong>{}</strong> <span class=\"score\">score {}</span></li>",
                esc(l),
                num(s, 3)
            );
        }
        b.push_str("</ol>");
    }
    if let Some(t) = options.ground_truth.get(&(d.layer.clone(), d.neuron)) {
        let _ =
            write!(b, "<p class=\"truth\">Ground truth (planted): <strong>{}</strong></p>", esc(t));
    }
    if let Some(e) = &d.error {
        let _ = write!(b, "<p class=\"error\">Error: {}</p>", esc(e));
    }
    let _ = writeln!(
        b,
        "<p class=\"counts\">{} candidates · {} top images captioned · captions {}/{} from cache · replies {}/{} · generated images {}/{}</p></section>",
        d.candidates,
        d.top_images,
        d.captions_cached,
        d.captions_total,
        d.replies_cached,
        d.replies_total,
        d.images_cached,
        d.images_total
    );

    let captions: HashMap<i32, &CaptionRow> =
        n.captions.iter().map(|c| (c.image_rank, c)).collect();
    let originals: Vec<&ImageRow> = n.images.iter().filter(|i| i.kind == "original").collect();
    let crops: Vec<&ImageRow> = n.images.iter().filter(|i| i.kind == "crop").collect();
    let generated: Vec<&ImageRow> = n.images.iter().filter(|i| i.kind == "generated").collect();

    b.push_str(&evaluation::section(&n.evaluation));
    b.push_str("<section id=\"top-images\" aria-labelledby=\"top-h\"><h2 id=\"top-h\">Top images</h2><p class=\"note\">The probe images that excite the neuron most, by activation; boxes are its attention crops. Marked ★: captioned.</p><div class=\"grid\">");
    for img in &originals {
        let boxes: Vec<&ImageRow> =
            crops.iter().copied().filter(|c| c.image_id == img.image_id).collect();
        let cap = format!(
            "{}rank {} · activation <b>{:.3}</b><br><span class=\"id\">{}</span><br>{}",
            if img.top { "★ " } else { "" },
            img.rank,
            img.activation,
            esc(img.image_id.as_deref().unwrap_or("")),
            caption_text(captions.get(&img.rank))
        );
        figure(&mut b, img, images, options, &boxes, &cap);
    }
    if originals.is_empty() {
        b.push_str("<p>None.</p>");
    }
    b.push_str("</div></section>\n");

    b.push_str("<section id=\"crops\" aria-labelledby=\"crops-h\"><h2 id=\"crops-h\">Attention crops</h2><div class=\"grid\">");
    for img in &crops {
        let cap = format!(
            "{}rank {} · activation <b>{:.3}</b><br><span class=\"id\">crop {} of {}</span><br>{}",
            if img.top { "★ " } else { "" },
            img.rank,
            img.activation,
            img.crop_index.unwrap_or(0),
            esc(img.image_id.as_deref().unwrap_or("")),
            caption_text(captions.get(&img.rank))
        );
        figure(&mut b, img, images, options, &[], &cap);
    }
    if crops.is_empty() {
        b.push_str("<p>None (crops are cut for spatial layers only).</p>");
    }
    b.push_str("</div></section>\n");

    b.push_str("<section id=\"captions\" aria-labelledby=\"captions-h\"><h2 id=\"captions-h\">Captions</h2>");
    if n.captions.is_empty() {
        b.push_str("<p>None.</p>");
    } else {
        b.push_str("<table><thead><tr><th scope=\"col\">rank</th><th scope=\"col\">caption</th><th scope=\"col\">simplified</th><th scope=\"col\">cached</th></tr></thead><tbody>");
        for c in &n.captions {
            let _ = write!(
                b,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                c.image_rank,
                esc(&c.caption),
                esc(c.simplified.as_deref().unwrap_or("–")),
                if c.cached { "yes" } else { "no" }
            );
        }
        b.push_str("</tbody></table>");
    }
    b.push_str("</section>\n");

    b.push_str("<section id=\"candidates\" aria-labelledby=\"cand-h\"><h2 id=\"cand-h\">Candidate concepts</h2>");
    let scores: HashMap<i32, &ScoreRow> = n.scores.iter().map(|s| (s.candidate, s)).collect();
    if n.candidates.is_empty() {
        b.push_str("<p>None.</p>");
    } else {
        let rank_name = n.scores.first().map(|s| s.rank_score.as_str()).unwrap_or("rank score");
        let _ = write!(
            b,
            "<table class=\"scores\"><thead><tr><th scope=\"col\">final rank</th><th scope=\"col\">concept</th><th scope=\"col\">rank score ({})</th><th scope=\"col\">rank order</th><th scope=\"col\">similarity</th><th scope=\"col\">final score</th><th scope=\"col\">images</th></tr></thead><tbody>",
            esc(rank_name)
        );
        for c in &n.candidates {
            let s = scores.get(&c.candidate);
            let _ = write!(
                b,
                "<tr{}><td>{}</td><td><a href=\"#cand-{}\">{}</a>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                if c.selected { " class=\"selected\"" } else { "" },
                c.final_rank,
                c.candidate,
                esc(&c.concept),
                if c.selected { " <span class=\"chosen\">(label)</span>" } else { "" },
                num(s.and_then(|s| rank_value(s)), 2),
                s.map_or("–".into(), |s| s.rank_order.to_string()),
                num(s.map(|s| s.similarity), 3),
                num(s.map(|s| s.final_score), 3),
                c.images
            );
        }
        b.push_str("</tbody></table>\n");
        for c in &n.candidates {
            let s = scores.get(&c.candidate);
            let _ = write!(
                b,
                "<section class=\"candidate\" id=\"cand-{}\" aria-labelledby=\"cand-{}-h\"><h3 id=\"cand-{}-h\">{}. {}{}</h3><p class=\"prompt\">Prompt: <q>{}</q></p>",
                c.candidate,
                c.candidate,
                c.candidate,
                c.final_rank + 1,
                esc(&c.concept),
                if c.selected { " <span class=\"chosen\">(label)</span>" } else { "" },
                esc(&c.prompt)
            );
            if let Some(s) = s {
                let _ = write!(
                    b,
                    "<p class=\"numbers\">positions: top-k squared mean {} · mean {} · median {} · squared mean {} · rank order {} · similarity {} · final score {}</p>",
                    num(s.topk_sq_mean, 2),
                    num(s.mean, 2),
                    num(s.median, 2),
                    num(s.sq_mean, 2),
                    s.rank_order,
                    num(Some(s.similarity), 3),
                    num(Some(s.final_score), 3)
                );
            }
            b.push_str("<div class=\"grid\">");
            let mut mine: Vec<&&ImageRow> =
                generated.iter().filter(|g| g.candidate == Some(c.candidate)).collect();
            mine.sort_by_key(|g| (g.seed, g.rank));
            for g in &mine {
                let cap = format!(
                    "{}position {} · activation <b>{:.3}</b><br>seed {} · similarity {}",
                    if g.top { "★ " } else { "" },
                    g.rank,
                    g.activation,
                    g.seed.unwrap_or(0),
                    num(g.similarity.map(f64::from), 3)
                );
                figure(&mut b, g, images, options, &[], &cap);
            }
            if mine.is_empty() {
                b.push_str("<p>No images.</p>");
            }
            b.push_str("</div></section>\n");
        }
    }
    b.push_str("</section>\n");

    if !n.exchanges.is_empty() {
        b.push_str("<section id=\"exchanges\" aria-labelledby=\"ex-h\"><h2 id=\"ex-h\">Summariser exchanges</h2><details><summary>");
        let _ = write!(
            b,
            "{} exchanges (requests and replies, verbatim)</summary><table><thead><tr><th scope=\"col\">#</th><th scope=\"col\">step</th><th scope=\"col\">model</th><th scope=\"col\">answer</th><th scope=\"col\">request and reply</th></tr></thead><tbody>",
            n.exchanges.len()
        );
        for e in &n.exchanges {
            let answer = match (&e.answer, &e.error) {
                (Some(a), _) => esc(a),
                (None, Some(err)) => format!("<span class=\"error\">{}</span>", esc(err)),
                (None, None) => "–".into(),
            };
            let cut = |s: &str| {
                if s.chars().count() > 4000 {
                    format!("{}…", s.chars().take(4000).collect::<String>())
                } else {
                    s.to_string()
                }
            };
            let _ = write!(
                b,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td><details><summary>show</summary><pre>{}</pre><pre>{}</pre></details></td></tr>",
                e.seq,
                esc(&e.step),
                esc(&format!("{}:{}", e.backend, e.model)),
                answer,
                esc(&cut(&e.request)),
                esc(&cut(&e.reply))
            );
        }
        b.push_str("</tbody></table></details></section>\n");
    }
    if !n.errors.is_empty() {
        b.push_str(
            "<section id=\"errors\" aria-labelledby=\"err-h\"><h2 id=\"err-h\">Problems</h2><ul>",
        );
        for e in &n.errors {
            let _ = write!(
                b,
                "<li><b>{}</b> ({}){}: {}</li>",
                esc(&e.stage),
                esc(&e.reason),
                e.image_id.as_deref().map(|i| format!(" {}", esc(i))).unwrap_or_default(),
                esc(&e.message)
            );
        }
        b.push_str("</ul></section>\n");
    }
    b.push_str("</main>");
    page(&format!("{} {} · dnd: {}", d.layer, d.neuron, job.name), "../style.css", &b)
}

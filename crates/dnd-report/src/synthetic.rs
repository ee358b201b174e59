//! A synthetic job directory: the results of a dissection of many neurons, made up, with
//! real image files. For the report's tests and its benchmark (`dnd bench report`).

use dnd_core::{LayerName, NeuronId};
use std::io::Cursor;

use bytes::Bytes;
use image::{Rgb, RgbImage};
use serde_json::json;

use dnd_pipeline::{DissectSummary, JobDir};
use dnd_store::results::{
    CandidateRow, CaptionRow, DescriptionRow, DescriptionStatus, EvaluationRow, ExchangeRow,
    ImageRow, NeuronErrorRow, ResultTable, ScoreRow,
};
use dnd_store::{CacheCounts, Location, write_parquet};

use crate::ReportError;

/// What to make up.
#[derive(Debug, Clone)]
pub struct SyntheticSpec {
    pub name: String,
    pub neurons: usize,
    /// Neurons are spread over these layers in turn.
    pub layers: Vec<String>,
    pub originals: usize,
    /// Crops per original.
    pub crops: usize,
    pub candidates: usize,
    pub images_per_concept: usize,
    /// Distinct image files the rows point at (shared between neurons, as concepts and
    /// probe images are in a real job).
    pub distinct_images: usize,
    pub seed: u64,
}

impl Default for SyntheticSpec {
    fn default() -> Self {
        Self {
            name: "synthetic".into(),
            neurons: 100,
            layers: vec!["layer3".into(), "layer4".into(), "fc".into()],
            originals: 5,
            crops: 1,
            candidates: 3,
            images_per_concept: 3,
            distinct_images: 48,
            seed: 1,
        }
    }
}

const COLOURS: [(&str, [u8; 3]); 6] = [
    ("red", [220, 40, 40]),
    ("green", [40, 170, 60]),
    ("blue", [40, 80, 220]),
    ("yellow", [230, 200, 30]),
    ("purple", [140, 50, 170]),
    ("orange", [240, 130, 20]),
];
const SHAPES: [&str; 4] = ["circle", "square", "stripes", "dots"];

struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn unit(&mut self) -> f64 {
        (self.next() % 1_000_000) as f64 / 1_000_000.0
    }
}

fn picture(i: usize) -> Vec<u8> {
    let (_, fg) = COLOURS[i % COLOURS.len()];
    let shape = SHAPES[(i / COLOURS.len()) % SHAPES.len()];
    let shade = 200 + (i * 7 % 50) as u8;
    let img = RgbImage::from_fn(96, 96, |x, y| {
        let (dx, dy) = (x as i32 - 48, y as i32 - 48);
        let inside = match shape {
            "circle" => dx * dx + dy * dy < 30 * 30,
            "square" => dx.abs() < 26 && dy.abs() < 26,
            "stripes" => (x / 8) % 2 == 0,
            _ => (x % 16 < 6) && (y % 16 < 6),
        };
        if inside { Rgb(fg) } else { Rgb([shade, shade, shade]) }
    });
    let mut png = Vec::new();
    // Encoding an in-memory RGB image to PNG cannot fail.
    let _ = img.write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png);
    png
}

fn concept(i: usize) -> String {
    format!("{} {}", COLOURS[i % COLOURS.len()].0, SHAPES[(i / COLOURS.len()) % SHAPES.len()])
}

/// Writes a finished job at `job`: job.json, summary.json, every results table, and the
/// image files its rows point at (under `job/synthetic-images/`).
pub async fn write_job(job: &Location, spec: &SyntheticSpec) -> Result<(), ReportError> {
    let pool = spec.distinct_images.max(1);
    for i in 0..pool {
        job.put(&format!("synthetic-images/{i:04}.png"), Bytes::from(picture(i))).await?;
    }
    let uri = |i: usize| job.display_path(&format!("synthetic-images/{:04}.png", i % pool));
    let hash =
        |i: usize| blake3::hash(format!("image {}", i % pool).as_bytes()).to_hex().to_string();
    let mut rng = Lcg(spec.seed ^ 0x9e37_79b9_7f4a_7c15);

    let (mut descriptions, mut candidates, mut scores, mut captions, mut images, mut exchanges) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let errors: Vec<NeuronErrorRow> = Vec::new();
    for k in 0..spec.neurons {
        let layer = LayerName::new(spec.layers[k % spec.layers.len()].as_str());
        let neuron = NeuronId::new((k / spec.layers.len()) as u32);
        let task = format!("{layer}-{:05}", neuron.index() / 8);
        let concepts: Vec<usize> =
            (0..spec.candidates).map(|_| rng.below(COLOURS.len() * SHAPES.len())).collect();
        let finals: Vec<f64> =
            (0..spec.candidates).map(|c| (spec.candidates - c) as f64 * rng.unit()).collect();
        let mut order: Vec<usize> = (0..spec.candidates).collect();
        order.sort_by(|&a, &b| finals[b].total_cmp(&finals[a]));
        let final_rank = |c: usize| order.iter().position(|&o| o == c).unwrap_or(0) as i32;
        let label = |r: usize| order.get(r).map(|&c| concept(concepts[c]));
        let score = |r: usize| order.get(r).map(|&c| finals[c]);
        descriptions.push(DescriptionRow {
            layer: layer.clone(),
            neuron,
            unit_kind: dnd_core::UnitKind::Channel,
            unit_source: None,
            status: DescriptionStatus::Ok,
            label: label(0),
            score: score(0),
            label_2: label(1),
            score_2: score(1),
            label_3: label(2),
            score_3: score(2),
            candidates: spec.candidates as i32,
            top_images: (spec.originals * (1 + spec.crops)) as i32,
            captions_cached: 0,
            captions_total: (spec.originals * (1 + spec.crops)) as i32,
            replies_cached: 0,
            replies_total: 1,
            images_cached: 0,
            images_total: (spec.candidates * spec.images_per_concept) as i32,
            error: None,
            task: task.clone(),
        });
        let base = ImageRow {
            layer: layer.clone(),
            neuron,
            unit_kind: dnd_core::UnitKind::Channel,
            unit_source: None,
            kind: String::new(),
            rank: 0,
            activation: 0.0,
            top: true,
            image_id: None,
            crop_index: None,
            canvas_size: None,
            x0: None,
            y0: None,
            x1: None,
            y1: None,
            candidate: None,
            concept: None,
            seed: None,
            similarity: None,
            uri: String::new(),
            image_hash: String::new(),
            cached: false,
        };
        let mut rank = 0;
        for o in 0..spec.originals {
            let p = rng.below(pool);
            let act = 1.0 - 0.1 * o as f32;
            let id = format!("{p:04}.png");
            images.push(ImageRow {
                kind: "original".into(),
                rank,
                activation: act,
                image_id: Some(id.clone()),
                uri: uri(p),
                image_hash: hash(p),
                ..base.clone()
            });
            captions.push(CaptionRow {
                layer: layer.clone(),
                neuron,
                unit_kind: dnd_core::UnitKind::Channel,
                unit_source: None,
                image_rank: rank,
                image_hash: hash(p),
                caption: format!("a picture of a {}", concept(p)),
                simplified: Some(concept(p)),
                captioner: "synthetic".into(),
                cached: false,
            });
            rank += 1;
            for c in 0..spec.crops {
                let q = rng.below(pool);
                let x0 = 20 + rng.below(100) as i32;
                let y0 = 20 + rng.below(100) as i32;
                images.push(ImageRow {
                    kind: "crop".into(),
                    rank,
                    activation: act - 0.05,
                    image_id: Some(id.clone()),
                    crop_index: Some(c as i32),
                    canvas_size: Some(375),
                    x0: Some(x0),
                    y0: Some(y0),
                    x1: Some(x0 + 150 + rng.below(80) as i32),
                    y1: Some(y0 + 150 + rng.below(80) as i32),
                    uri: uri(q),
                    image_hash: hash(q),
                    ..base.clone()
                });
                captions.push(CaptionRow {
                    layer: layer.clone(),
                    neuron,
                    unit_kind: dnd_core::UnitKind::Channel,
                    unit_source: None,
                    image_rank: rank,
                    image_hash: hash(q),
                    caption: format!("a close-up of a {}", concept(q)),
                    simplified: Some(concept(q)),
                    captioner: "synthetic".into(),
                    cached: false,
                });
                rank += 1;
            }
        }
        for c in 0..spec.candidates {
            let name = concept(concepts[c]);
            candidates.push(CandidateRow {
                layer: layer.clone(),
                neuron,
                unit_kind: dnd_core::UnitKind::Channel,
                unit_source: None,
                candidate: c as i32,
                concept: name.clone(),
                prompt: format!("a photo of a {name}"),
                images: spec.images_per_concept as i32,
                final_rank: final_rank(c),
                selected: final_rank(c) < 3,
            });
            scores.push(ScoreRow {
                layer: layer.clone(),
                neuron,
                unit_kind: dnd_core::UnitKind::Channel,
                unit_source: None,
                candidate: c as i32,
                concept: name.clone(),
                topk_sq_mean: Some(10.0 * rng.unit()),
                mean: Some(5.0 * rng.unit()),
                median: Some(5.0 * rng.unit()),
                sq_mean: Some(30.0 * rng.unit()),
                rank_score: "topk_sq_mean".into(),
                rank_order: c as i32,
                similarity: rng.unit(),
                final_score: finals[c],
                final_rank: final_rank(c),
            });
            for s in 0..spec.images_per_concept {
                let g = (concepts[c] + s * 24) % pool;
                images.push(ImageRow {
                    kind: "generated".into(),
                    rank: (c * spec.images_per_concept + s) as i32,
                    activation: rng.unit() as f32,
                    top: s == 0,
                    candidate: Some(c as i32),
                    concept: Some(name.clone()),
                    seed: Some(s as i64),
                    similarity: Some(rng.unit() as f32),
                    uri: uri(g),
                    image_hash: hash(g),
                    cached: true,
                    ..base.clone()
                });
            }
        }
        exchanges.push(ExchangeRow {
            layer: layer.clone(),
            neuron,
            unit_kind: dnd_core::UnitKind::Channel,
            unit_source: None,
            seq: 0,
            step: "summarize".into(),
            backend: "consensus".into(),
            model: "synthetic".into(),
            prompt_version: String::new(),
            request: "captions".into(),
            reply: label(0).unwrap_or_default(),
            answer: label(0),
            error: None,
            cached: false,
        });
    }
    // The best label's evaluation, as `dnd evaluate` writes it (two of its metrics).
    let evaluation: Vec<EvaluationRow> = descriptions
        .iter()
        .filter_map(|d| Some((d, d.label.clone()?)))
        .flat_map(|(d, label)| {
            [("correlation", rng.unit() * 2.0 - 1.0, 1000), ("cosy_auc", rng.unit(), 110)].map(
                |(metric, value, images)| EvaluationRow {
                    layer: d.layer.clone(),
                    neuron: d.neuron,
                    unit_kind: dnd_core::UnitKind::Channel,
                    unit_source: None,
                    source: "dnd".into(),
                    label_rank: 1,
                    label: label.clone(),
                    metric: metric.into(),
                    quantile: None,
                    value: Some(value),
                    ci_low: Some(value - 0.05),
                    ci_high: Some(value + 0.05),
                    images,
                },
            )
        })
        .collect();
    let put = |table: ResultTable| format!("results/{}", table.file());
    write_parquet(
        job,
        &put(ResultTable::Descriptions),
        &ResultTable::Descriptions.batch(&descriptions)?,
    )
    .await?;
    write_parquet(job, &put(ResultTable::Candidates), &ResultTable::Candidates.batch(&candidates)?)
        .await?;
    write_parquet(job, &put(ResultTable::Scores), &ResultTable::Scores.batch(&scores)?).await?;
    write_parquet(job, &put(ResultTable::Captions), &ResultTable::Captions.batch(&captions)?)
        .await?;
    write_parquet(job, &put(ResultTable::Images), &ResultTable::Images.batch(&images)?).await?;
    write_parquet(job, &put(ResultTable::Exchanges), &ResultTable::Exchanges.batch(&exchanges)?)
        .await?;
    write_parquet(job, &put(ResultTable::Errors), &ResultTable::Errors.batch(&errors)?).await?;
    write_parquet(job, &put(ResultTable::Evaluation), &ResultTable::Evaluation.batch(&evaluation)?)
        .await?;

    let job_json = json!([spec.name, {
        "name": spec.name,
        "target": { "model": "synthetic", "layers": spec.layers, "neurons": "all" },
        "probe": { "images": "synthetic", "top_k": spec.originals },
        "describe": { "top_images": spec.originals * (1 + spec.crops) },
        "summarizer": { "backend": "consensus" },
        "generator": { "images_per_concept": spec.images_per_concept },
        "seed": spec.seed,
    }]);
    job.put("job.json", Bytes::from(job_json.to_string())).await?;
    let counts =
        |hits: usize, misses: usize| CacheCounts { hits: hits as u64, misses: misses as u64 };
    let summary = DissectSummary {
        dnd_version: "synthetic".into(),
        job: spec.name.clone(),
        location: job.to_string(),
        results: ResultTable::ALL.iter().map(|t| job.display_path(&put(*t))).collect(),
        models: [
            ("target", "synthetic"),
            ("captioner", "synthetic#blake3:0"),
            ("embedder", "synthetic#blake3:0"),
            ("generator", "synthetic"),
            ("summarizer", "consensus"),
        ]
        .into_iter()
        .map(|(role, id)| (role.to_string(), id.to_string()))
        .collect(),
        tasks: spec.neurons.div_ceil(8),
        tasks_resumed: 0,
        tasks_failed: 0,
        neurons: spec.neurons,
        neurons_ok: spec.neurons,
        neurons_no_candidates: 0,
        neurons_failed: 0,
        neurons_dead: 0,
        neurons_dense: 0,
        cache: [
            ("captions".to_string(), counts(0, spec.neurons)),
            ("images".to_string(), counts(spec.neurons, 0)),
            ("replies".to_string(), counts(0, spec.neurons)),
        ]
        .into(),
        cache_hit_rate: 0.333,
        load_seconds: 0.0,
        probe_seconds: 0.0,
        describe_seconds: 0.0,
        seconds_per_neuron: 0.0,
        total_seconds: 0.0,
        peak_rss_mib: 0.0,
    };
    JobDir::new(job.clone())
        .write_summary(&summary)
        .await
        .map_err(|e| ReportError::Internal(e.to_string()))?;
    Ok(())
}

//! `dnd bench quality`: how well dnd's labels recover the planted concepts of the zoo,
//! beside two baselines and dnd without concept selection, and how fast it runs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use candle_core::{Device, Tensor};
use clap::{Args, Subcommand};
use image::RgbImage;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use dnd_core::Map2;
use dnd_embedded::run_dissect;
use dnd_models::{ClipEmbedder, Embedder, ModelRef, Tap, TargetModel};
use dnd_pipeline::JobSpec;
use dnd_pipeline::describe::pooled_activations;
use dnd_store::results::{CandidateRow, DescriptionRow};
use dnd_store::{Location, batches_rows, read_parquet};
use dnd_synth::quality::{IouCounts, auc, best, pearson, recovered, top_quantile};
use dnd_synth::train::target::{PlantedKind, PlantedNeuron, read_planted};
use dnd_synth::{Concept, ProbeSetSpec, Scene, TextRenderer, all_concepts, read_scenes, render};

use crate::BadInput;
use crate::progress::Bars;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Planted-concept recovery and CoSy-style AUC of dnd's labels on the synthetic zoo,
    /// per layer and neuron kind, beside Network-Dissection-style and CLIP-Dissect-style
    /// baselines and dnd without stage 3 (its first candidate); plus seconds per neuron
    /// with cold and warm caches. Prints a table; --json writes everything.
    Quality(QualityArgs),
    /// The coordinator's scheduling overhead: simulated workers (each task sleeps a set
    /// time) lease, commit and complete tasks over gRPC on loopback. Reports tasks per
    /// second and the makespan against the ideal (total work / workers).
    Scheduler(crate::bench_scheduler::SchedulerArgs),
    /// The HTML report at scale: writes a synthetic job of thousands of neurons, renders
    /// its report and times its index's load in headless Chromium (bench/report_load.py).
    Report(crate::report::BenchReportArgs),
}

#[derive(Args)]
pub struct QualityArgs {
    /// The zoo's dissection job.
    #[arg(long, value_name = "FILE", default_value = "crates/dnd-synth/zoo/dissect.toml")]
    config: PathBuf,
    /// Where the benchmark's dissections and caches go.
    #[arg(long, value_name = "DIR", default_value = "out/bench-quality")]
    out: PathBuf,
    /// Also write the results as JSON.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Images rendered from each label for its CoSy-style AUC.
    #[arg(long, default_value_t = 32)]
    label_images: usize,
    /// Control images of the world for the AUC.
    #[arg(long, default_value_t = 256)]
    control_images: usize,
    /// Probe images the baselines see (the first ones of the job's probe set).
    #[arg(long, default_value_t = 500)]
    baseline_images: usize,
}

/// Methods compared, in table order.
const METHODS: [&str; 5] = ["dnd", "dnd-first", "netdissect", "clip-dissect", "truth"];

#[derive(Debug, Clone, Serialize)]
struct NeuronScore {
    layer: String,
    neuron: usize,
    kind: PlantedKind,
    truth: String,
    /// Per method: its label (None where the method does not apply).
    labels: BTreeMap<String, Option<String>>,
    recovered: BTreeMap<String, Option<bool>>,
    auc: BTreeMap<String, Option<f64>>,
}

#[derive(Debug, Clone, Serialize)]
struct GroupScore {
    layer: String,
    kind: String,
    neurons: usize,
    /// Share of neurons whose label names the planted concept, per method.
    recovery: BTreeMap<String, Option<f64>>,
    mean_auc: BTreeMap<String, Option<f64>>,
}

#[derive(Debug, Clone, Serialize)]
struct Speed {
    neurons: usize,
    cold_seconds_per_neuron: f64,
    warm_seconds_per_neuron: f64,
    cold_cache_hit_rate: f64,
    warm_cache_hit_rate: f64,
}

#[derive(Debug, Clone, Serialize)]
struct QualityReport {
    job: String,
    neurons: Vec<NeuronScore>,
    groups: Vec<GroupScore>,
    speed: Speed,
}

pub async fn bench(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Quality(args) => quality(args).await,
        BenchCommand::Scheduler(args) => crate::bench_scheduler::scheduler(args).await,
        BenchCommand::Report(args) => crate::report::bench(args).await,
    }
}

async fn results<T: serde::de::DeserializeOwned>(
    job: &Path,
    table: &str,
) -> anyhow::Result<Vec<T>> {
    let location = Location::open(job.to_str().context("a UTF-8 path")?)?;
    Ok(batches_rows(table, &read_parquet(&location, &format!("results/{table}.parquet")).await?)?)
}

/// The neuron's pooled activations on `images`, for every neuron of the tap: `(images, C)`.
fn activations(
    model: &TargetModel,
    images: Vec<RgbImage>,
    tap: Tap,
) -> anyhow::Result<Vec<Vec<f32>>> {
    let images: Vec<Arc<RgbImage>> = images.into_iter().map(Arc::new).collect();
    Ok(pooled_activations(model, &images, tap, dnd_core::Pooling::Mean, 32)?)
}

async fn quality(args: QualityArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.config).map_err(|e| {
        BadInput(format!("cannot read the job file {}: {e}", args.config.display()))
    })?;
    let mut spec = JobSpec::from_toml(&text, &args.config.display().to_string())?;
    let Some(Ok(probe_set)) = ProbeSetSpec::parse(&spec.probe.images) else {
        return Err(BadInput(format!("{}: the quality benchmark needs a synthetic probe set (probe.images = \"synth:world?...\")", args.config.display())).into());
    };
    let planted = read_planted(Path::new(&spec.target.model)).with_context(|| {
        format!("the target model {} has no readable planted.json", spec.target.model)
    })?;

    // Two dissections: cold (a new cache) and warm (the same cache, another job name).
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    spec.out = args.out.display().to_string();
    spec.cache = Some(args.out.join(format!("cache-{nonce}")).display().to_string());
    spec.name = Some(format!("quality-cold-{nonce}"));
    let cold = run_dissect(&spec, &Bars::new()).await?;
    spec.name = Some(format!("quality-warm-{nonce}"));
    let warm = run_dissect(&spec, &Bars::new()).await?;
    let job = args.out.join(format!("jobs/{}", cold.summary.job));
    let descriptions: Vec<DescriptionRow> = results(&job, "descriptions").await?;
    let candidates: Vec<CandidateRow> = results(&job, "candidates").await?;

    let device = dnd_models::device::parse_device(&spec.device)?;
    let model = TargetModel::load(&spec.target.model.parse::<ModelRef>()?, &device)?;
    let embedder = ClipEmbedder::load(&spec.embedder.model.parse::<ModelRef>()?, &device)?;
    let size = probe_set.size;
    let renderer = TextRenderer::new(size, size)?;

    // The probe images the baselines see, with their scenes (the ground truth masks).
    let probe_dir = args.out.join("probe-sets").join(probe_set.dir_name());
    let scenes: Vec<Scene> =
        read_scenes(&probe_dir)?.into_iter().take(args.baseline_images).map(|(_, s)| s).collect();
    let probe_renders: Vec<_> = scenes.iter().map(|s| render(s, size, size)).collect();
    let concepts = all_concepts();
    const GRID: usize = 32;
    // masks[image][concept]: the concept's mask sampled on a GRID x GRID lattice.
    let masks: Vec<Vec<Vec<bool>>> = scenes
        .iter()
        .zip(&probe_renders)
        .map(|(scene, rendered)| {
            concepts
                .iter()
                .map(|c| {
                    let mask = c.mask(scene, rendered).expect("the scene was rendered");
                    (0..GRID * GRID)
                        .map(|i| {
                            let (gy, gx) = (i / GRID, i % GRID);
                            let y = ((gy as f32 + 0.5) * size as f32 / GRID as f32) as u32;
                            let x = ((gx as f32 + 0.5) * size as f32 / GRID as f32) as u32;
                            mask.get(x.min(size - 1), y.min(size - 1))
                        })
                        .collect()
                })
                .collect()
        })
        .collect();
    // CLIP-Dissect: similarity of every probe image to every concept phrase.
    let phrases: Vec<String> = concepts.iter().map(Concept::phrase).collect();
    let image_embeddings = {
        let mut rows = Vec::new();
        for chunk in probe_renders.chunks(64) {
            let imgs: Vec<RgbImage> = chunk.iter().map(|r| r.image.clone()).collect();
            rows.push(embedder.embed_images(&imgs)?);
        }
        Tensor::cat(&rows, 0)?
    };
    let text_embeddings =
        embedder.embed_texts(&phrases.iter().map(String::as_str).collect::<Vec<_>>())?;
    let similarity: Vec<Vec<f32>> =
        image_embeddings.matmul(&text_embeddings.t()?)?.to_device(&Device::Cpu)?.to_vec2()?;

    // Controls for the AUC: plain scenes of the world, never seen by the dissection.
    let controls: Vec<RgbImage> = (0..args.control_images)
        .map(|i| {
            render(&Scene::sample(&mut ChaCha8Rng::seed_from_u64(2_000_000 + i as u64)), size, size)
                .image
        })
        .collect();

    let mut scores = Vec::new();
    let mut by_layer: BTreeMap<String, Vec<&PlantedNeuron>> = BTreeMap::new();
    for p in &planted {
        if descriptions.iter().any(|d| d.layer == p.layer && d.neuron as usize == p.neuron) {
            by_layer.entry(p.layer.clone()).or_default().push(p);
        }
    }
    if by_layer.is_empty() {
        bail!(
            "the job described none of the neurons in planted.json: list planted neurons in target.neurons"
        );
    }
    for (layer, neurons) in &by_layer {
        let tap = model.tap(layer)?;
        let control_acts = activations(&model, controls.clone(), tap)?;
        let probe_acts =
            activations(&model, probe_renders.iter().map(|r| r.image.clone()).collect(), tap)?;
        // Network Dissection needs the maps: spatial layers only.
        let maps: Option<Vec<Tensor>> = if tap.is_spatial() {
            let mut out = Vec::new();
            for chunk in probe_renders.chunks(32) {
                let imgs: Vec<RgbImage> = chunk.iter().map(|r| r.image.clone()).collect();
                let x = model.preprocess.batch(&imgs, &model.device)?;
                let t = model.forward_taps(&x, &[tap])?.remove(0).to_device(&Device::Cpu)?;
                out.push(t);
            }
            Some(vec![Tensor::cat(&out, 0)?])
        } else {
            None
        };
        for p in neurons {
            let truth_concepts = p.parsed_concepts();
            let description =
                descriptions.iter().find(|d| d.layer == p.layer && d.neuron as usize == p.neuron);
            let mut labels: BTreeMap<String, Option<String>> = BTreeMap::new();
            labels.insert("dnd".into(), description.and_then(|d| d.label.clone()));
            labels.insert(
                "dnd-first".into(),
                candidates
                    .iter()
                    .find(|c| {
                        c.layer == p.layer && c.neuron as usize == p.neuron && c.candidate == 0
                    })
                    .map(|c| c.concept.clone()),
            );
            labels.insert("truth".into(), Some(p.description.clone()));
            // CLIP-Dissect-style: the concept whose similarity correlates best with the activations.
            let acts: Vec<f32> = probe_acts.iter().map(|row| row[p.neuron]).collect();
            let correlations: Vec<f64> = (0..concepts.len())
                .map(|c| pearson(&acts, &similarity.iter().map(|row| row[c]).collect::<Vec<_>>()))
                .collect();
            labels.insert("clip-dissect".into(), best(&correlations).map(|c| phrases[c].clone()));
            // Network-Dissection-style: best IoU of the top-0.5% thresholded, upsampled maps.
            labels.insert(
                "netdissect".into(),
                maps.as_ref()
                    .map(|maps| -> anyhow::Result<String> {
                        let neuron_maps = maps[0].narrow(1, p.neuron, 1)?.squeeze(1)?; // (N, h, w)
                        let (_, h, w) = neuron_maps.dims3()?;
                        let values: Vec<f32> = neuron_maps.flatten_all()?.to_vec1()?;
                        let threshold = top_quantile(&values, 0.005);
                        let mut counts = vec![IouCounts::default(); concepts.len()];
                        for (i, image_masks) in masks.iter().enumerate() {
                            let map = Map2 {
                                width: w,
                                height: h,
                                data: values[i * h * w..(i + 1) * h * w].to_vec(),
                            };
                            let active: Vec<bool> = map
                                .resize_bilinear(GRID, GRID)
                                .data
                                .into_iter()
                                .map(|v| v > threshold)
                                .collect();
                            for (c, mask) in image_masks.iter().enumerate() {
                                counts[c].add(&active, mask);
                            }
                        }
                        let ious: Vec<f64> = counts.iter().map(IouCounts::iou).collect();
                        Ok(phrases[best(&ious).unwrap_or(0)].clone())
                    })
                    .transpose()?,
            );
            let mut recovered_by = BTreeMap::new();
            let mut auc_by = BTreeMap::new();
            let negatives: Vec<f32> = control_acts.iter().map(|row| row[p.neuron]).collect();
            for method in METHODS {
                let label = labels.get(method).cloned().flatten();
                recovered_by.insert(
                    method.to_string(),
                    label.as_ref().map(|l| recovered(l, p.kind, &truth_concepts)),
                );
                let value = match &label {
                    Some(l) => {
                        let images: Vec<RgbImage> = (0..args.label_images)
                            .map(|i| renderer.render(l, 1_000_000 + i as u64).1.image)
                            .collect();
                        let positives: Vec<f32> = activations(&model, images, tap)?
                            .iter()
                            .map(|row| row[p.neuron])
                            .collect();
                        Some(auc(&positives, &negatives))
                    }
                    None => None,
                };
                auc_by.insert(method.to_string(), value);
            }
            scores.push(NeuronScore {
                layer: p.layer.clone(),
                neuron: p.neuron,
                kind: p.kind,
                truth: p.description.clone(),
                labels,
                recovered: recovered_by,
                auc: auc_by,
            });
        }
    }

    let groups = group_scores(&scores);
    let speed = Speed {
        neurons: cold.summary.neurons,
        cold_seconds_per_neuron: cold.summary.seconds_per_neuron,
        warm_seconds_per_neuron: warm.summary.seconds_per_neuron,
        cold_cache_hit_rate: cold.summary.cache_hit_rate,
        warm_cache_hit_rate: warm.summary.cache_hit_rate,
    };
    print_report(&scores, &groups, &speed);
    if let Some(path) = &args.json {
        let report =
            QualityReport { job: cold.summary.job.clone(), neurons: scores, groups, speed };
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("\nwritten: {}", path.display());
    }
    Ok(())
}

/// `single`, `or`, `and`, `and_not`, `class`: as planted.json writes it.
fn kind_name(kind: PlantedKind) -> String {
    serde_json::to_value(kind).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default()
}

fn mean(values: impl Iterator<Item = f64>) -> Option<f64> {
    let v: Vec<f64> = values.filter(|x| !x.is_nan()).collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

fn group_scores(scores: &[NeuronScore]) -> Vec<GroupScore> {
    let mut keys: Vec<(String, String)> =
        scores.iter().map(|s| (s.layer.clone(), kind_name(s.kind))).collect();
    keys.sort();
    keys.dedup();
    // Then each kind over all layers (the targets are per kind), then everything.
    let mut kinds: Vec<String> = keys.iter().map(|(_, kind)| kind.clone()).collect();
    kinds.sort();
    kinds.dedup();
    keys.extend(kinds.into_iter().chain(["all".to_string()]).map(|kind| ("all".to_string(), kind)));
    keys.into_iter()
        .map(|(layer, kind)| {
            let in_layer = |s: &NeuronScore| layer == "all" || s.layer == layer;
            let of_kind = |s: &NeuronScore| kind == "all" || kind_name(s.kind) == kind;
            let members: Vec<&NeuronScore> =
                scores.iter().filter(|s| in_layer(s) && of_kind(s)).collect();
            let per =
                |f: &dyn Fn(&NeuronScore) -> Option<f64>| mean(members.iter().filter_map(|s| f(s)));
            GroupScore {
                neurons: members.len(),
                recovery: METHODS
                    .iter()
                    .map(|m| {
                        (m.to_string(), per(&|s| s.recovered[*m].map(|r| f64::from(u8::from(r)))))
                    })
                    .collect(),
                mean_auc: METHODS.iter().map(|m| (m.to_string(), per(&|s| s.auc[*m]))).collect(),
                layer,
                kind,
            }
        })
        .collect()
}

fn print_report(scores: &[NeuronScore], groups: &[GroupScore], speed: &Speed) {
    let pct = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{:.0}%", 100.0 * v));
    let num = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
    println!(
        "{:<7} {:>6}  {:<44} {:<26} {:<26} {:>5}",
        "layer", "neuron", "truth", "dnd label", "dnd first candidate", "auc"
    );
    for s in scores {
        let label = |m: &str| s.labels[m].clone().unwrap_or_else(|| "-".into());
        let mark = |m: &str| match s.recovered[m] {
            Some(true) => "+",
            Some(false) => " ",
            None => "",
        };
        println!(
            "{:<7} {:>6}  {:<44} {:<26} {:<26} {:>5}",
            s.layer,
            s.neuron,
            s.truth,
            format!("{}{}", mark("dnd"), label("dnd")),
            format!("{}{}", mark("dnd-first"), label("dnd-first")),
            num(s.auc["dnd"])
        );
    }
    println!("\n(+ = names the planted concept)\n");
    println!(
        "recovery (share of neurons whose label names the planted concept) and mean CoSy-style AUC"
    );
    println!(
        "{:<7} {:<8} {:>3}   {:>6} {:>9} {:>10} {:>12}   {:>6} {:>9} {:>10} {:>12} {:>6}",
        "layer",
        "kind",
        "n",
        "dnd",
        "dnd-first",
        "netdissect",
        "clip-dissect",
        "dnd",
        "dnd-first",
        "netdissect",
        "clip-dissect",
        "truth"
    );
    for g in groups {
        println!(
            "{:<7} {:<8} {:>3}   {:>6} {:>9} {:>10} {:>12}   {:>6} {:>9} {:>10} {:>12} {:>6}",
            g.layer,
            g.kind,
            g.neurons,
            pct(g.recovery["dnd"]),
            pct(g.recovery["dnd-first"]),
            pct(g.recovery["netdissect"]),
            pct(g.recovery["clip-dissect"]),
            num(g.mean_auc["dnd"]),
            num(g.mean_auc["dnd-first"]),
            num(g.mean_auc["netdissect"]),
            num(g.mean_auc["clip-dissect"]),
            num(g.mean_auc["truth"]),
        );
    }
    println!(
        "\nspeed: {} neurons, {:.3} s/neuron cold ({:.0}% from cache), {:.3} s/neuron warm ({:.0}% from cache)",
        speed.neurons,
        speed.cold_seconds_per_neuron,
        100.0 * speed.cold_cache_hit_rate,
        speed.warm_seconds_per_neuron,
        100.0 * speed.warm_cache_hit_rate
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn score(layer: &str, kind: PlantedKind, recovered: bool, auc: f64) -> NeuronScore {
        NeuronScore {
            layer: layer.into(),
            neuron: 0,
            kind,
            truth: String::new(),
            labels: BTreeMap::new(),
            recovered: METHODS.iter().map(|m| (m.to_string(), Some(recovered))).collect(),
            auc: METHODS.iter().map(|m| (m.to_string(), Some(auc))).collect(),
        }
    }

    #[test]
    fn groups_are_per_layer_and_kind_then_per_kind_then_all() {
        let scores = [
            score("layer3", PlantedKind::Single, true, 0.8),
            score("layer4", PlantedKind::Single, false, 1.0),
            score("layer4", PlantedKind::Or, true, 0.6),
        ];
        let groups = group_scores(&scores);
        let row = |layer: &str, kind: &str| {
            groups.iter().find(|g| g.layer == layer && g.kind == kind).unwrap()
        };
        let keys: Vec<(&str, &str)> =
            groups.iter().map(|g| (g.layer.as_str(), g.kind.as_str())).collect();
        assert_eq!(
            keys,
            [
                ("layer3", "single"),
                ("layer4", "or"),
                ("layer4", "single"),
                ("all", "or"),
                ("all", "single"),
                ("all", "all")
            ]
        );
        let singles = row("all", "single");
        assert_eq!((singles.neurons, singles.recovery["dnd"]), (2, Some(0.5)));
        assert!((singles.mean_auc["dnd"].unwrap() - 0.9).abs() < 1e-12);
        assert_eq!(row("all", "all").neurons, 3);
    }
}

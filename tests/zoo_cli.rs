//! The synthetic zoo end to end: a small, deterministic dissection of planted neurons
//! whose labels must name their planted concepts.

use std::path::{Path, PathBuf};

use dnd_store::results::{CandidateRow, DescriptionRow, EvaluationRow};
use dnd_store::{Location, batches_rows, read_parquet};
use dnd_synth::quality::recovered;
use dnd_synth::read_planted;
use dnd_tests::dnd_in;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the repository")
        .to_path_buf()
}

/// Single-concept planted channels (crates/dnd-synth/zoo/target/planted.json) that are
/// planted well (held-out AUC >= 0.98, target/train.json) and whose concepts the zoo's
/// captioner names reliably (colours, colour+shape, background textures): red, blue
/// squares, green objects in layer4; white objects and noisy backgrounds in layer3. The
/// other planted neurons are scored, not asserted, by `dnd bench quality`.
const PLANTED: [&str; 2] = ["layer3=2,32", "layer4=3,39,48"];

#[tokio::test(flavor = "multi_thread")]
async fn planted_neurons_get_labels_that_name_their_concepts() {
    let out = tempfile::tempdir().unwrap();
    let out_dir = out.path().display().to_string();
    let args = [
        "dissect",
        "--config",
        "crates/dnd-synth/zoo/dissect.toml",
        "--out",
        out_dir.as_str(),
        "--name",
        "planted",
        "--layers",
        "layer3,layer4",
        "--neurons",
        PLANTED[0],
        "--neurons",
        PLANTED[1],
    ];
    let run = dnd_in(&repo(), &args);
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    assert!(
        run.stdout.contains("ground truth"),
        "the zoo's table shows the ground truth:\n{}",
        run.stdout
    );

    let job = Location::open(out.path().join("jobs/planted").to_str().unwrap()).unwrap();
    let descriptions: Vec<DescriptionRow> = batches_rows(
        "descriptions",
        &read_parquet(&job, "results/descriptions.parquet").await.unwrap(),
    )
    .unwrap();
    let planted = read_planted(&repo().join("crates/dnd-synth/zoo/target")).unwrap();
    assert_eq!(descriptions.len(), 5);
    let mut missed = Vec::new();
    for d in &descriptions {
        let truth = planted
            .iter()
            .find(|p| p.layer == d.layer.as_str() && p.neuron == d.neuron.index())
            .expect("a planted neuron");
        let label = d.label.clone().unwrap_or_default();
        if !recovered(&label, truth.kind, &truth.parsed_concepts()) {
            missed.push(format!(
                "{} {}: planted {:?}, labelled {label:?}",
                d.layer, d.neuron, truth.description
            ));
        }
    }
    assert!(
        missed.is_empty(),
        "labels that miss their planted concept:\n{}\n\n{}",
        missed.join("\n"),
        run.stdout
    );

    // `dnd evaluate` on the zoo: the planted truth against a random concept and dnd's own
    // labels, by CoSy's AUC (the metric that passes `dnd bench evaluate`'s checks here).
    let labels = out.path().join("truth-and-random.csv");
    let mut csv = String::from("layer,neuron,label\n");
    for d in &descriptions {
        let p = planted
            .iter()
            .find(|p| p.layer == d.layer.as_str() && p.neuron == d.neuron.index())
            .unwrap();
        let random = dnd_quality::sanity::perturb(p, 7).unwrap().random;
        csv.push_str(&format!(
            "{},{},{}\n{},{},{}\n",
            p.layer, p.neuron, p.description, p.layer, p.neuron, random
        ));
    }
    std::fs::write(&labels, csv).unwrap();
    let job_dir = out.path().join("jobs/planted").display().to_string();
    for extra in [&[][..], &["--labels", labels.to_str().unwrap(), "--labels-per-neuron", "2"][..]]
    {
        let run = dnd_in(
            &repo(),
            &[&["evaluate", job_dir.as_str(), "--bootstrap", "20"][..], extra].concat(),
        );
        assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    }
    let rows: Vec<EvaluationRow> = batches_rows(
        "evaluation",
        &read_parquet(&job, "results/evaluation.parquet").await.unwrap(),
    )
    .unwrap();
    let auc = |source: &str, rank: i32, d: &DescriptionRow| {
        rows.iter()
            .find(|r| {
                r.source == source
                    && r.label_rank == rank
                    && r.metric == "cosy_auc"
                    && (r.layer.as_str(), r.neuron) == (d.layer.as_str(), d.neuron)
            })
            .and_then(|r| r.value)
            .unwrap_or_else(|| {
                panic!("no cosy_auc of {source} {rank} for {} {}", d.layer, d.neuron)
            })
    };
    for d in &descriptions {
        let (truth, random, dnd) =
            (auc("truth-and-random", 1, d), auc("truth-and-random", 2, d), auc("dnd", 1, d));
        assert!(truth > random, "{} {}: truth {truth} <= random {random}", d.layer, d.neuron);
        assert!(dnd > 0.8, "{} {}: dnd's label scores only {dnd}", d.layer, d.neuron);
    }

    // Deterministic: the same job again (from the cache) gives the same labels.
    let again = dnd_in(&repo(), &[&args[..6], &["again"], &args[7..]].concat());
    assert_eq!(again.code, 0, "{}", again.stderr);
    let job = Location::open(out.path().join("jobs/again").to_str().unwrap()).unwrap();
    let second: Vec<DescriptionRow> = batches_rows(
        "descriptions",
        &read_parquet(&job, "results/descriptions.parquet").await.unwrap(),
    )
    .unwrap();
    let labels = |rows: &[DescriptionRow]| rows.iter().map(|d| d.label.clone()).collect::<Vec<_>>();
    assert_eq!(labels(&descriptions), labels(&second));

    // Screened, one label per neuron: every candidate gets 3 images, the better half the
    // other 7; the label comes from a survivor, which still names the planted concept.
    let config = out.path().join("screened.toml");
    let zoo = std::fs::read_to_string(repo().join(args[2])).unwrap();
    std::fs::write(
        &config,
        format!("{zoo}\n[generator.screening]\nfirst_images = 3\n[scoring]\nlabels = 1\n"),
    )
    .unwrap();
    let screened_args = [&["dissect", "--config", config.to_str().unwrap()], &args[3..]].concat();
    let screened_args = [&screened_args[..6], &["screened"], &screened_args[7..]].concat();
    let run = dnd_in(&repo(), &screened_args);
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    let job = Location::open(out.path().join("jobs/screened").to_str().unwrap()).unwrap();
    let candidates: Vec<CandidateRow> = batches_rows(
        "candidates",
        &read_parquet(&job, "results/candidates.parquet").await.unwrap(),
    )
    .unwrap();
    let screened_out: Vec<&CandidateRow> = candidates.iter().filter(|c| c.images == 3).collect();
    assert!(!screened_out.is_empty(), "some candidate was screened out: {candidates:#?}");
    for c in &candidates {
        assert!(c.images == 3 || c.images == 10, "{c:?}");
        if c.selected {
            assert_eq!(c.images, 10, "labels come from candidates with all their images: {c:?}");
        }
    }
    for dropped in &screened_out {
        let survivors = candidates
            .iter()
            .filter(|c| (&c.layer, c.neuron) == (&dropped.layer, dropped.neuron) && c.images == 10);
        for s in survivors {
            assert!(s.final_rank < dropped.final_rank, "survivors rank first: {s:?} {dropped:?}");
        }
    }
    let screened: Vec<DescriptionRow> = batches_rows(
        "descriptions",
        &read_parquet(&job, "results/descriptions.parquet").await.unwrap(),
    )
    .unwrap();
    for d in &screened {
        let truth = planted
            .iter()
            .find(|p| p.layer == d.layer.as_str() && p.neuron == d.neuron.index())
            .expect("a planted neuron");
        let label = d.label.clone().unwrap_or_default();
        assert!(
            recovered(&label, truth.kind, &truth.parsed_concepts()),
            "screened: {} {} planted {:?}, labelled {label:?}",
            d.layer,
            d.neuron,
            truth.description
        );
    }
}

/// The zoo's dissection job with `target` in place of its `[target]` section (up to
/// `[probe]`), written into `dir`.
fn zoo_job_with_target(dir: &Path, name: &str, target: &str) -> PathBuf {
    let zoo = std::fs::read_to_string(repo().join("crates/dnd-synth/zoo/dissect.toml")).unwrap();
    let (head, rest) = zoo.split_once("[target]").expect("the zoo job has a [target]");
    let probe = rest.find("[probe]").expect("the zoo job has a [probe]");
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, format!("{head}[target]\n{target}\n{}", &rest[probe..])).unwrap();
    path
}

fn dissect_zoo(out: &Path, name: &str, config: &Path) -> Vec<DescriptionRow> {
    let (out_s, config_s) = (out.display().to_string(), config.display().to_string());
    let run = dnd_in(&repo(), &["dissect", "--config", &config_s, "--out", &out_s, "--name", name]);
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    assert!(!run.stdout.contains("ground truth"), "channels' truth is no unit's:\n{}", run.stdout);
    let job = out.join(format!("jobs/{name}/results/descriptions.parquet"));
    let file = std::fs::File::open(job).unwrap();
    let reader =
        parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file).unwrap();
    let batches: Vec<_> = reader.build().unwrap().map(|b| b.unwrap()).collect();
    batches_rows("descriptions", &batches).unwrap()
}

/// Directions along planted layer4 channels are those channels: their labels name the
/// channels' planted concepts. And the zoo's SAE (`dnd synth train --model sae`) runs end
/// to end: its latents that write most to those channels get labels.
#[tokio::test(flavor = "multi_thread")]
async fn directions_and_sae_latents_of_the_zoo_are_described() {
    use candle_core::{Device, Tensor};
    const CHANNELS: [usize; 3] = [3, 39, 48];
    let out = tempfile::tempdir().unwrap();
    let planted = read_planted(&repo().join("crates/dnd-synth/zoo/target")).unwrap();

    // One-hot directions: unit i reads channel CHANNELS[i].
    let mut rows = vec![0.0f32; CHANNELS.len() * 192];
    for (i, &c) in CHANNELS.iter().enumerate() {
        rows[i * 192 + c] = 1.0;
    }
    let directions = out.path().join("directions.safetensors");
    let tensor = Tensor::from_vec(rows, (CHANNELS.len(), 192), &Device::Cpu).unwrap();
    candle_core::safetensors::save(&[("directions", tensor)].into_iter().collect(), &directions)
        .unwrap();
    let target = format!(
        "model = \"crates/dnd-synth/zoo/target\"\nlayers = [\"layer4\"]\nneurons = \"all\"\n\
         [target.units.layer4]\nkind = \"direction\"\nsource = \"{}\"\n",
        directions.display()
    );
    let config = zoo_job_with_target(out.path(), "directions", &target);
    let described = dissect_zoo(out.path(), "directions", &config);
    assert_eq!(described.len(), CHANNELS.len());
    for d in &described {
        let channel = CHANNELS[d.neuron.index()];
        let truth = planted.iter().find(|p| p.layer == "layer4" && p.neuron == channel).unwrap();
        let label = d.label.clone().unwrap_or_default();
        assert!(
            recovered(&label, truth.kind, &truth.parsed_concepts()),
            "direction along channel {channel} ({}) labelled {label:?}",
            truth.description
        );
    }

    // The SAE: per planted channel, the 4 latents whose decoder rows write most to it
    // (some are dead: a dead latent's decoder row is still its random start).
    let sae = repo().join("crates/dnd-synth/zoo/sae");
    let weights =
        candle_core::safetensors::load(sae.join("sae_weights.safetensors"), &Device::Cpu).unwrap();
    let w_dec = weights["W_dec"].to_vec2::<f32>().unwrap();
    let mut latents: Vec<(usize, usize)> = Vec::new();
    for &c in &CHANNELS {
        let mut order: Vec<usize> = (0..w_dec.len()).collect();
        order.sort_by(|&a, &b| w_dec[b][c].total_cmp(&w_dec[a][c]));
        latents.extend(order[..4].iter().map(|&l| (l, c)));
    }
    let mut ids: Vec<usize> = latents.iter().map(|&(l, _)| l).collect();
    ids.sort_unstable();
    ids.dedup();
    let ids: Vec<String> = ids.iter().map(usize::to_string).collect();
    let target = format!(
        "model = \"crates/dnd-synth/zoo/target\"\nlayers = [\"layer4\"]\nneurons = \"{}\"\n\
         [target.units.layer4]\nkind = \"sae\"\nsource = \"crates/dnd-synth/zoo/sae\"\n",
        ids.join(",")
    );
    let config = zoo_job_with_target(out.path(), "sae", &target);
    let described = dissect_zoo(out.path(), "sae", &config);
    assert_eq!(described.len(), ids.len());
    let mut named = Vec::new();
    for d in &described {
        assert_eq!(d.unit_kind, dnd_core::UnitKind::Sae);
        match d.status.as_str() {
            "ok" => assert!(d.label.is_some(), "{d:?}"),
            "dead" | "dense" => continue,
            other => panic!("latent {}: {other}: {d:?}", d.neuron),
        }
        let label = d.label.clone().unwrap_or_default();
        for &(latent, channel) in latents.iter().filter(|(l, _)| *l == d.neuron.index()) {
            let truth =
                planted.iter().find(|p| p.layer == "layer4" && p.neuron == channel).unwrap();
            if recovered(&label, truth.kind, &truth.parsed_concepts()) {
                named.push(format!("latent {latent}: {label:?} names {}", truth.description));
            }
        }
    }
    eprintln!("{}", named.join("\n"));
    assert!(!named.is_empty(), "no latent's label names its channel's concept: {described:#?}");
}

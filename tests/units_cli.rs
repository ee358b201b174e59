//! `dnd dissect` over SAE latents and directions on the tiny fixture model: the units'
//! maps feed every stage, every table says what its neurons are, dead and dense latents
//! are recorded and skipped, and dictionaries that do not fit the layer exit 2 before any
//! work.

use std::path::Path;

use dnd_core::{UnitKind, UnitStatus};
use dnd_store::results::{DescriptionRow, DescriptionStatus, EvaluationRow, ImageRow, ResultTable};
use dnd_store::tables::{TopKRow, UnitRow};
use dnd_store::{Location, batches_rows, read_parquet};
use dnd_tests::{dnd_in, repo};

/// The tiny job with `target` in place of its `[target]` keys.
fn job_with_target(target: &str) -> String {
    let job = std::fs::read_to_string(repo().join("tests/fixtures/tiny-job.toml")).unwrap();
    let keys = "layers = [\"layer4\", \"fc\"]\nneurons = { layer4 = \"0..3\", fc = \"0..2\" }\n";
    assert!(job.contains(keys), "tests/fixtures/tiny-job.toml changed its [target]");
    job.replace(keys, target)
}

/// Runs `dnd dissect` on `job_toml` (written next to the store) from the repository root.
fn dissect(out: &Path, name: &str, job_toml: &str) -> dnd_tests::Run {
    let file = out.join(format!("{name}.toml"));
    std::fs::write(&file, job_toml).unwrap();
    let (out_s, file_s) = (out.display().to_string(), file.display().to_string());
    dnd_in(&repo(), &["dissect", "--out", &out_s, "--name", name, "--config", &file_s])
}

async fn rows<T: serde::de::DeserializeOwned>(job: &Path, relative: &str) -> Vec<T> {
    let location = Location::open(job.to_str().unwrap()).unwrap();
    batches_rows("rows", &read_parquet(&location, relative).await.unwrap()).unwrap()
}

async fn results<T: serde::de::DeserializeOwned>(job: &Path, table: ResultTable) -> Vec<T> {
    rows(job, &format!("results/{}", table.file())).await
}

#[tokio::test(flavor = "multi_thread")]
async fn sae_latents_are_described_and_dead_and_dense_ones_skipped() {
    let out = tempfile::tempdir().unwrap();
    let target = "layers = [\"layer4\", \"fc\"]\nneurons = { layer4 = \"0..4\", fc = \"0..1\" }\n\
                  [target.units.layer4]\nkind = \"sae\"\nsource = \"tests/fixtures/units/sae_relu\"\n";
    let job =
        format!("{}\n[evaluate]\ngenerated_images = 3\nbootstrap = 0\n", job_with_target(target));
    let run = dissect(out.path(), "sae", &job);
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    let dir = out.path().join("jobs/sae");

    // The probe's units table: every latent of the dictionary, with the planted statuses.
    let units: Vec<UnitRow> = rows(&dir, "probe/units/layer4.parquet").await;
    assert_eq!(units.len(), 64, "every latent of the SAE");
    let source = units[0].unit_source.clone().expect("a dictionary has an identity");
    assert!(source.starts_with("blake3:"), "{source}");
    assert!(units.iter().all(|u| u.unit_kind == UnitKind::Sae && u.images == 7));
    assert_eq!(units[1].status, UnitStatus::Dead, "{:?}", units[1]);
    assert_eq!(units[2].status, UnitStatus::Dense, "{:?}", units[2]);
    assert!((units[2].firing_rate - 1.0).abs() < 1e-9);
    assert!(units.iter().filter(|u| u.status == UnitStatus::Active).count() > 30);

    // The top-K lists are the latents', not the channels': the dense latent's b_enc is 1e4.
    let topk: Vec<TopKRow> = rows(&dir, "probe/topk/layer4.parquet").await;
    let dense_top = topk.iter().find(|r| r.neuron.index() == 2 && r.rank == 0).unwrap();
    assert!(dense_top.activation > 9e3, "{dense_top:?}");

    // Descriptions: labels for the active latents, statuses for the others, channels for fc.
    let descriptions: Vec<DescriptionRow> = results(&dir, ResultTable::Descriptions).await;
    let layer4: Vec<&DescriptionRow> =
        descriptions.iter().filter(|d| d.layer == "layer4").collect();
    assert_eq!(layer4.len(), 4);
    for d in &layer4 {
        assert_eq!((d.unit_kind, d.unit_source.as_deref()), (UnitKind::Sae, Some(source.as_str())));
        match d.neuron.index() {
            1 => assert_eq!(d.status, DescriptionStatus::Dead, "{d:?}"),
            2 => assert_eq!(d.status, DescriptionStatus::Dense, "{d:?}"),
            _ => assert!(d.status == DescriptionStatus::Ok && d.label.is_some(), "{d:?}"),
        }
    }
    let fc = descriptions.iter().find(|d| d.layer == "fc").unwrap();
    assert_eq!((fc.unit_kind, fc.unit_source.as_deref()), (UnitKind::Channel, None));

    // The evidence of an active latent: originals, crops cut from its map, generated
    // images scored by it; skipped latents have none.
    let images: Vec<ImageRow> = results(&dir, ResultTable::Images).await;
    for kind in ["original", "crop", "generated"] {
        assert!(
            images.iter().any(|i| i.layer == "layer4" && i.neuron.index() == 0 && i.kind == kind),
            "no {kind} image of latent 0"
        );
    }
    assert!(!images.iter().any(|i| i.layer == "layer4" && [1, 2].contains(&i.neuron.index())));
    assert!(images.iter().all(|i| i.unit_kind == if i.layer == "fc" { UnitKind::Channel } else { UnitKind::Sae }));

    // [evaluate] scored the latents' labels against their maps.
    let evaluation: Vec<EvaluationRow> = results(&dir, ResultTable::Evaluation).await;
    assert!(evaluation.iter().any(|e| e.layer == "layer4" && e.neuron.index() == 3));
    assert!(
        evaluation.iter().filter(|e| e.layer == "layer4").all(|e| e.unit_kind == UnitKind::Sae)
    );

    // The report shows what the neurons are.
    let page = |name: &str| std::fs::read_to_string(dir.join("report/neurons").join(name)).unwrap();
    let latent = page("layer4-0.html");
    assert!(latent.contains("SAE latent 0") && latent.contains(&source), "{latent}");
    assert!(page("layer4-1.html").contains("status-dead"));
    assert!(page("fc-0.html").contains("neuron 0"));
    let index = std::fs::read_to_string(dir.join("report/neurons.js")).unwrap();
    assert!(index.contains("\"sae\"") && index.contains("\"channel\""), "{index}");

    dnd_tests::python_readers(&[std::ffi::OsStr::new("--results"), dir.as_os_str()]);

    let summary = dnd_tests::summary(out.path(), "sae");
    assert_eq!(
        (summary["neurons_dead"].as_u64(), summary["neurons_dense"].as_u64()),
        (Some(1), Some(1))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn directions_are_described_with_their_names() {
    let out = tempfile::tempdir().unwrap();
    let target = "layers = [\"layer4\"]\nneurons = \"all\"\n\
                  [target.units.layer4]\nkind = \"direction\"\nsource = \"tests/fixtures/units/directions.safetensors\"\n";
    let run = dissect(out.path(), "dirs", &job_with_target(target));
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    let dir = out.path().join("jobs/dirs");
    let units: Vec<UnitRow> = rows(&dir, "probe/units/layer4.parquet").await;
    let names: Vec<&str> = units.iter().filter_map(|u| u.name.as_deref()).collect();
    assert_eq!(names, ["red things", "stripes", "circles", "sky"]);
    assert!(units.iter().all(|u| u.status == UnitStatus::Active), "directions are not classified");
    let descriptions: Vec<DescriptionRow> = results(&dir, ResultTable::Descriptions).await;
    assert_eq!(descriptions.len(), 4, "`all` is the dictionary's 4 directions");
    for d in &descriptions {
        assert_eq!(d.unit_kind, UnitKind::Direction);
        assert_eq!(d.status, DescriptionStatus::Ok, "{d:?}");
    }
}

#[test]
fn dictionaries_that_do_not_fit_exit_2_before_any_work() {
    let out = tempfile::tempdir().unwrap();
    let on = |layer: &str, kind: &str, source: &str| {
        format!(
            "layers = [\"{layer}\"]\nneurons = \"0..2\"\n[target.units.{layer}]\nkind = \"{kind}\"\nsource = \"{source}\"\n"
        )
    };
    let refused = |name: &str, job: String, says: &[&str]| {
        let run = dissect(out.path(), name, &job);
        assert_eq!(run.code, 2, "{name}: {}\n{}", run.stdout, run.stderr);
        for s in says {
            assert!(run.stderr.contains(s), "{name}: no `{s}` in\n{}", run.stderr);
        }
        assert!(!out.path().join(format!("jobs/{name}")).exists(), "{name}: work started");
    };
    // layer4's SAE (256 channels) on layer3 (128).
    refused(
        "width",
        job_with_target(&on("layer3", "sae", "tests/fixtures/units/sae_relu")),
        &["sae_weights.safetensors", "256", "layer3", "128"],
    );
    // An activation dnd does not compute.
    let odd = tempfile::tempdir().unwrap();
    let relu = repo().join("tests/fixtures/units/sae_relu");
    std::fs::copy(relu.join("sae_weights.safetensors"), odd.path().join("sae_weights.safetensors"))
        .unwrap();
    let cfg = std::fs::read_to_string(relu.join("cfg.json")).unwrap();
    let cfg = cfg.replace("\"architecture\": \"standard\"", "\"activation_fn_str\": \"tanh-relu\"");
    std::fs::write(odd.path().join("cfg.json"), cfg).unwrap();
    refused(
        "activation",
        job_with_target(&on("layer4", "sae", odd.path().to_str().unwrap())),
        &["cfg.json", "tanh-relu"],
    );
    refused(
        "no-source",
        job_with_target(&on("layer4", "sae", "")),
        &["target.units.layer4", "source"],
    );
    refused(
        "beyond",
        job_with_target(
            &on("layer4", "sae", "tests/fixtures/units/sae_relu").replace("0..2", "60..70"),
        ),
        &["neuron 69", "64"],
    );
}

//! `dnd probe` and `dnd dissect` end to end on the tiny timm ViT fixture: patch-grid
//! taps with attention crops, the MLP's hidden units, the head, class-token pooling, and
//! ViT checkpoints that are refused with exit code 2.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;

use arrow::array::{AsArray, RecordBatch};
use arrow::datatypes::{Float32Type, Int32Type};
use candle_core::{D, Device, IndexOp, Tensor};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use dnd_models::Checkpoint;
use dnd_store::results::{DescriptionRow, ResultTable};
use dnd_store::{batches_rows, tables};
use dnd_tests::{Reference, dnd, dnd_in, fixtures, repo, table};

const MODEL: &str = "tests/fixtures/models/tiny_vit_timm";
/// The probe images whose preprocessing has no JPEG decoder in it; the reference holds
/// the first two.
const IMAGES: [&str; 4] = ["scene_0.png", "scene_1.png", "scene_2.png", "gray.png"];

fn read_parquet(path: &Path) -> RecordBatch {
    let file = File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).unwrap();
    let schema = builder.schema().clone();
    let batches: Vec<RecordBatch> = builder.build().unwrap().map(|b| b.unwrap()).collect();
    arrow::compute::concat_batches(&schema, &batches).unwrap()
}

fn column<'a>(batch: &'a RecordBatch, name: &str) -> &'a arrow::array::ArrayRef {
    batch.column_by_name(name).unwrap_or_else(|| panic!("no column {name}"))
}

fn probe_images() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for name in IMAGES {
        std::fs::copy(fixtures().join("images").join(name), dir.path().join(name)).unwrap();
    }
    dir
}

/// `(image, neuron) -> activation` of a topk table.
fn topk_values(path: &Path) -> HashMap<(String, usize), f32> {
    let batch = read_parquet(path);
    let ids = column(&batch, "image_id").as_string::<i32>();
    let neurons = column(&batch, "neuron").as_primitive::<Int32Type>();
    let acts = column(&batch, "activation").as_primitive::<Float32Type>();
    (0..batch.num_rows())
        .map(|i| ((ids.value(i).to_string(), neurons.value(i) as usize), acts.value(i)))
        .collect()
}

/// Every top-K value of an image the reference holds against PyTorch's pooled value.
fn compare_with_pytorch(values: &HashMap<(String, usize), f32>, pooled: &Tensor, what: &str) {
    let reference = Reference::load(&fixtures().join("reference"), "vit_timm");
    let order: Vec<&str> =
        reference.json["images"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    let mut compared = 0;
    for ((image, neuron), ours) in values {
        let Some(i) = order.iter().position(|o| o == image) else { continue };
        let theirs: f32 = pooled.i((i, *neuron)).unwrap().to_scalar().unwrap();
        // dnd's resize rounds differently from Pillow's by a level or two in some pixels
        // (tests/vit_parity.rs), which moves these activations by a few 1e-3; a wrong tap
        // or pooling would be off by O(1).
        assert!(
            (ours - theirs).abs() < 1e-2,
            "{what} {image} neuron {neuron}: {ours} vs PyTorch {theirs}"
        );
        compared += 1;
    }
    assert!(compared > 0, "{what}: no top image is in the reference");
}

#[test]
fn probe_records_patch_grids_mlp_units_and_the_head_with_crops() {
    let images = probe_images();
    let out = tempfile::tempdir().unwrap();
    let model = repo().join(MODEL);
    let run = dnd(&[
        "probe",
        "--model",
        model.to_str().unwrap(),
        "--images",
        images.path().to_str().unwrap(),
        "--layers",
        "blocks.1,encoder.layers.0.mlp,head",
        "--top-k",
        "3",
        "--batch-size",
        "3",
        "--crops",
        "--crop-neurons",
        "0..3",
        "--out",
        out.path().to_str().unwrap(),
    ]);
    assert_eq!(run.code, 0, "stdout:\n{}\nstderr:\n{}", run.stdout, run.stderr);
    assert!(run.stdout.contains("probed 4 images"), "{}", run.stdout);

    let reference = Reference::load(&fixtures().join("reference"), "vit_timm");
    for (layer, width) in [("blocks.1", 16), ("blocks.0.mlp", 32), ("head", 10)] {
        let path = out.path().join(format!("topk/{layer}.parquet"));
        let batch = read_parquet(&path);
        assert_eq!(batch.num_rows(), width * 3, "{layer}");
        let pooled = match layer {
            "head" => reference.tensors["head.vector"].clone(),
            _ => reference.tensors[&format!("{layer}.map")]
                .flatten_from(2)
                .unwrap()
                .mean(D::Minus1)
                .unwrap(),
        };
        compare_with_pytorch(&topk_values(&path), &pooled, layer);
    }

    // Crops of both token layers (the alias is recorded under its canonical name), none
    // of the head; boxes inside the canvas.
    for layer in ["blocks.1", "blocks.0.mlp"] {
        let crops = read_parquet(&out.path().join(format!("crops/{layer}.parquet")));
        assert_eq!(crops.schema().fields().len(), tables::crops_schema().fields().len());
        assert!(crops.num_rows() > 0, "{layer}: three neurons x three images give some crops");
        let neurons = column(&crops, "neuron").as_primitive::<Int32Type>();
        assert!(neurons.values().iter().all(|n| (0..3).contains(n)));
        let x1 = column(&crops, "x1").as_primitive::<Int32Type>();
        assert!(x1.values().iter().all(|&x| x <= 375));
    }
    assert!(!out.path().join("crops/head.parquet").exists(), "the head is not cropped");
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("probe.json")).unwrap()).unwrap();
    let layers = summary["layers"].as_array().unwrap();
    let spatial: Vec<(&str, bool)> = layers
        .iter()
        .map(|l| (l["name"].as_str().unwrap(), l["spatial"].as_bool().unwrap()))
        .collect();
    assert_eq!(spatial, [("blocks.1", true), ("blocks.0.mlp", true), ("head", false)]);
}

#[test]
fn class_token_pooling_ranks_by_the_class_token() {
    let images = probe_images();
    let out = tempfile::tempdir().unwrap();
    let model = repo().join(MODEL);
    let run = dnd(&[
        "probe",
        "--model",
        model.to_str().unwrap(),
        "--images",
        images.path().to_str().unwrap(),
        "--layers",
        "norm",
        "--pooling",
        "cls",
        "--top-k",
        "4",
        "--out",
        out.path().to_str().unwrap(),
    ]);
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    let reference = Reference::load(&fixtures().join("reference"), "vit_timm");
    let values = topk_values(&out.path().join("topk/norm.parquet"));
    assert_eq!(values.len(), 16 * 4);
    compare_with_pytorch(&values, &reference.tensors["norm.cls"], "norm cls");
}

#[test]
fn bad_vit_input_exits_2_with_a_useful_message() {
    let images = probe_images();
    let img = images.path().to_str().unwrap();
    let model = repo().join(MODEL);
    let model = model.to_str().unwrap();
    let resnet = fixtures().join("models/tiny_resnet");
    // A ViT checkpoint with a tensor missing, and one of no known architecture.
    let broken = tempfile::tempdir().unwrap();
    let mut tensors = Checkpoint::open(&repo().join(MODEL).join("model.safetensors"))
        .unwrap()
        .load(&Device::Cpu)
        .unwrap();
    tensors.remove("blocks.0.norm2.bias");
    // Beside the model's config.json, which gives what the tensors cannot (the heads).
    std::fs::copy(repo().join(MODEL).join("config.json"), broken.path().join("config.json"))
        .unwrap();
    let missing = broken.path().join("missing.safetensors");
    candle_core::safetensors::save(&tensors, &missing).unwrap();
    let renamed: HashMap<String, Tensor> =
        tensors.into_iter().map(|(k, v)| (format!("model.{k}"), v)).collect();
    let unknown = broken.path().join("unknown.safetensors");
    candle_core::safetensors::save(&renamed, &unknown).unwrap();
    let out = tempfile::tempdir().unwrap();
    let o = out.path().join("never");
    let cases: Vec<(Vec<&str>, &[&str])> = vec![
        (vec!["--model", model, "--layers", "blocks.2"], &["blocks.2", "blocks.0 .. blocks.1"]),
        (vec!["--model", model, "--layers", "layer4"], &["layer4", "blocks.0"]),
        (
            vec!["--model", resnet.to_str().unwrap(), "--pooling", "cls"],
            &["cls", "class token", "mean or max"],
        ),
        (
            vec!["--model", missing.to_str().unwrap()],
            &["missing.safetensors", "`blocks.0.norm2.bias`", "expected:", "help:"],
        ),
        (
            vec!["--model", unknown.to_str().unwrap()],
            &["unknown.safetensors", "no architecture dnd knows", "vision transformer", "help:"],
        ),
    ];
    for (args, needles) in cases {
        let mut full = vec!["probe", "--images", img, "--out", o.to_str().unwrap()];
        full.extend(&args);
        let run = dnd(&full);
        assert_eq!(run.code, 2, "{args:?}: {}", run.stderr);
        for needle in needles {
            assert!(
                run.stderr.contains(needle),
                "{args:?}: `{needle}` missing from: {}",
                run.stderr
            );
        }
        assert!(!o.exists(), "{args:?}: nothing is written before the checks pass");
    }
}

/// The whole method on the ViT: the tiny job of dissect_cli.rs with the timm fixture as
/// its target, a block (crops included) and the head.
#[tokio::test(flavor = "multi_thread")]
async fn a_vit_dissection_runs_every_stage() {
    let out = tempfile::tempdir().unwrap();
    let job = repo().join("tests/fixtures/tiny-job.toml");
    let run = dnd_in(
        &repo(),
        &[
            "dissect",
            "--config",
            job.to_str().unwrap(),
            "--out",
            out.path().to_str().unwrap(),
            "--name",
            "vit",
            "--model",
            MODEL,
            "--layers",
            "encoder.layers.1,head",
            "--neurons",
            "encoder.layers.1=0..3",
            "--neurons",
            "head=0..2",
        ],
    );
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    let descriptions: Vec<DescriptionRow> =
        batches_rows("d", &[table(out.path(), "vit", ResultTable::Descriptions).await]).unwrap();
    let mut described: Vec<(String, u32)> =
        descriptions.iter().map(|d| (d.layer.to_string(), d.neuron.to_u32())).collect();
    described.sort();
    let want: Vec<(String, u32)> =
        [("blocks.1", 0), ("blocks.1", 1), ("blocks.1", 2), ("head", 0), ("head", 1)]
            .iter()
            .map(|(l, n)| (l.to_string(), *n))
            .collect();
    assert_eq!(described, want);
    for d in &descriptions {
        assert_eq!(d.status, "ok", "{d:?}");
        assert!(d.label.is_some() && d.score.is_some(), "{d:?}");
    }
    let images = table(out.path(), "vit", ResultTable::Images).await;
    let kinds = column(&images, "kind").as_string::<i32>();
    let kinds: Vec<&str> = kinds.iter().map(|k| k.unwrap()).collect();
    assert!(kinds.contains(&"crop"), "the block's neurons get attention crops: {kinds:?}");
}

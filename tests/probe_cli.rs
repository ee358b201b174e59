//! `dnd probe` end to end: the fixture ResNet-18 on the fixture images, bad inputs,
//! and the Parquet tables read back against their documented schemas.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;

use arrow::array::{AsArray, RecordBatch};
use arrow::datatypes::{DataType, Float32Type, Int32Type};
use candle_core::{Device, IndexOp, Tensor};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use dnd_store::tables;
use dnd_tests::{dnd, fixtures, python_readers};

fn read_parquet(path: &Path) -> RecordBatch {
    let file = File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).unwrap();
    let schema = builder.schema().clone();
    let batches: Vec<RecordBatch> = builder.build().unwrap().map(|b| b.unwrap()).collect();
    arrow::compute::concat_batches(&schema, &batches).unwrap()
}

/// Column names and types, as `docs/schema.md` documents them through `dnd_store::tables`.
fn assert_schema(batch: &RecordBatch, expected: &arrow::datatypes::Schema) {
    let got: Vec<(String, DataType)> =
        batch.schema().fields().iter().map(|f| (f.name().clone(), f.data_type().clone())).collect();
    let want: Vec<(String, DataType)> =
        expected.fields().iter().map(|f| (f.name().clone(), f.data_type().clone())).collect();
    assert_eq!(got, want);
}

fn strings(batch: &RecordBatch, column: &str) -> Vec<String> {
    batch
        .column_by_name(column)
        .unwrap()
        .as_string::<i32>()
        .iter()
        .map(|s| s.unwrap().to_string())
        .collect()
}

fn ints(batch: &RecordBatch, column: &str) -> Vec<i32> {
    batch.column_by_name(column).unwrap().as_primitive::<Int32Type>().values().to_vec()
}

fn floats(batch: &RecordBatch, column: &str) -> Vec<f32> {
    batch.column_by_name(column).unwrap().as_primitive::<Float32Type>().values().to_vec()
}

/// The fixture images whose preprocessing is exact (PNG, no resampling, no 16-bit).
const EXACT_IMAGES: [&str; 5] =
    ["gray.png", "rgba.png", "scene_0.png", "scene_1.png", "scene_2.png"];

fn copy_images(names: &[&str], to: &Path) {
    for name in names {
        std::fs::copy(fixtures().join("images").join(name), to.join(name)).unwrap();
    }
}

/// Per neuron, the reference top-K (image, activation) over `images` from the PyTorch
/// pooled activations `tensor` (N x C) of the fixture image list.
fn reference_topk(tensor: &str, images: &[&str], k: usize) -> Vec<Vec<(String, f32)>> {
    let dir = fixtures().join("reference");
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("resnet18.json")).unwrap()).unwrap();
    let order: Vec<&str> =
        json["images"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    let refs =
        candle_core::safetensors::load(dir.join("resnet18.safetensors"), &Device::Cpu).unwrap();
    let t: &Tensor = &refs[tensor];
    let rows: Vec<(String, Vec<f32>)> = images
        .iter()
        .map(|name| {
            let i = order.iter().position(|o| o == name).unwrap();
            (name.to_string(), t.i(i).unwrap().to_vec1::<f32>().unwrap())
        })
        .collect();
    let width = rows[0].1.len();
    (0..width)
        .map(|n| {
            let mut v: Vec<(String, f32)> = rows.iter().map(|(id, a)| (id.clone(), a[n])).collect();
            v.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            v.truncate(k);
            v
        })
        .collect()
}

#[test]
fn probe_matches_pytorch_and_writes_documented_tables() {
    let images = tempfile::tempdir().unwrap();
    copy_images(&EXACT_IMAGES, images.path());
    let out = tempfile::tempdir().unwrap();
    let model = fixtures().join("models/resnet18");
    let run = dnd(&[
        "probe",
        "--model",
        model.to_str().unwrap(),
        "--images",
        images.path().to_str().unwrap(),
        "--layers",
        "layer4,fc",
        "--top-k",
        "3",
        "--batch-size",
        "2",
        "--activations",
        "--crops",
        "--crop-neurons",
        "0..3",
        "--out",
        out.path().to_str().unwrap(),
    ]);
    assert_eq!(run.code, 0, "stdout:\n{}\nstderr:\n{}", run.stdout, run.stderr);
    assert!(run.stdout.contains("probed 5 images"), "{}", run.stdout);

    for (layer, tensor, width) in [("layer4", "layer4.mean", 512), ("fc", "fc.vector", 1000)] {
        let batch = read_parquet(&out.path().join(format!("topk/{layer}.parquet")));
        assert_schema(&batch, &tables::topk_schema());
        assert_eq!(batch.num_rows(), width * 3);
        let expected = reference_topk(tensor, &EXACT_IMAGES, 3);
        let (ids, neurons, ranks, acts) = (
            strings(&batch, "image_id"),
            ints(&batch, "neuron"),
            ints(&batch, "rank"),
            floats(&batch, "activation"),
        );
        assert!(strings(&batch, "layer").iter().all(|l| l == layer));
        let mut worst = 0f32;
        for row in 0..batch.num_rows() {
            let (n, r) = (neurons[row] as usize, ranks[row] as usize);
            let (want_id, want_act) = &expected[n][r];
            let d = (acts[row] - want_act).abs();
            worst = worst.max(d);
            assert!(d <= 1e-4, "{layer} neuron {n} rank {r}: {} vs PyTorch {want_act}", acts[row]);
            // Near-ties may legitimately swap order; only a clear winner must match.
            let clear =
                expected[n].iter().filter(|(_, a)| (a - want_act).abs() < 1e-4).count() == 1;
            if clear {
                assert_eq!(&ids[row], want_id, "{layer} neuron {n} rank {r}");
            }
        }
        eprintln!("{layer}: top-K activations within {worst:.2e} of PyTorch");
    }

    // Full activations: one row per image, a 512-wide vector.
    let acts = read_parquet(&out.path().join("activations/layer4/part-00000.parquet"));
    assert_schema(&acts, &tables::activations_schema(512));
    assert_eq!(acts.num_rows(), 5);

    // Crops: valid PNGs of the canvas size, boxes inside the canvas, only neurons 0..3.
    let crops = read_parquet(&out.path().join("crops/layer4.parquet"));
    assert_schema(&crops, &tables::crops_schema());
    assert!(crops.num_rows() > 0, "three neurons x three images give some crops");
    assert!(ints(&crops, "neuron").iter().all(|n| (0..3).contains(n)));
    let (x0, x1, y0, y1) =
        (ints(&crops, "x0"), ints(&crops, "x1"), ints(&crops, "y0"), ints(&crops, "y1"));
    for i in 0..crops.num_rows() {
        assert!(
            0 <= x0[i]
                && x0[i] < x1[i]
                && x1[i] <= 375
                && 0 <= y0[i]
                && y0[i] < y1[i]
                && y1[i] <= 375
        );
    }
    let png = crops.column_by_name("png").unwrap().as_binary::<i32>().value(0).to_vec();
    let img = image::load_from_memory(&png).unwrap();
    assert_eq!((img.width(), img.height()), (375, 375));
    assert!(!out.path().join("crops/fc.parquet").exists(), "fc layers are not cropped");

    let errors = read_parquet(&out.path().join("errors.parquet"));
    assert_schema(&errors, &tables::errors_schema());
    assert_eq!(errors.num_rows(), 0);

    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("probe.json")).unwrap()).unwrap();
    assert_eq!(summary["images_ok"], 5);
    assert_eq!(summary["layers"][0]["neurons"], 512);

    python_readers(&[out.path().as_os_str()]);
}

#[test]
fn bad_images_are_skipped_and_recorded() {
    let images = tempfile::tempdir().unwrap();
    let dir = images.path();
    copy_images(&["scene_0.png"], dir);
    // A JPEG whose frame header is damaged (its SOF0 segment claims zero components),
    // and one cut off in the middle of its image data.
    let jpeg = std::fs::read(fixtures().join("images/wide.jpg")).unwrap();
    let sof = jpeg.windows(2).position(|w| w == [0xFF, 0xC0]).expect("a baseline JPEG has SOF0");
    let mut corrupt = jpeg.clone();
    corrupt[sof + 9] = 0; // length(2) precision(1) height(2) width(2) -> number of components
    std::fs::write(dir.join("corrupt.jpg"), &corrupt).unwrap();
    std::fs::write(dir.join("truncated.jpg"), &jpeg[..jpeg.len() / 2]).unwrap();
    std::fs::write(dir.join("empty.png"), b"").unwrap();
    std::fs::write(dir.join("notes.png"), b"These are my notes, not a picture.\n").unwrap();
    std::fs::write(dir.join("labels.csv"), b"not,an,image\n").unwrap();

    let out = tempfile::tempdir().unwrap();
    let model = fixtures().join("models/tiny_resnet");
    let run = dnd(&[
        "probe",
        "--model",
        model.to_str().unwrap(),
        "--images",
        dir.to_str().unwrap(),
        "--layers",
        "layer2",
        "--out",
        out.path().to_str().unwrap(),
    ]);
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    assert!(
        run.stdout.contains("probed 1 images (4 skipped, 1 other files ignored)"),
        "{}",
        run.stdout
    );
    let errors = read_parquet(&out.path().join("errors.parquet"));
    let reasons: HashMap<String, String> =
        strings(&errors, "image_id").into_iter().zip(strings(&errors, "reason")).collect();
    assert_eq!(reasons.len(), 4, "{reasons:?}");
    assert_eq!(reasons["empty.png"], "empty");
    assert_eq!(reasons["notes.png"], "not_an_image");
    assert_eq!(reasons["corrupt.jpg"], "corrupt");
    assert_eq!(reasons["truncated.jpg"], "truncated");
    assert!(strings(&errors, "message").iter().all(|m| !m.is_empty()));
    let topk = read_parquet(&out.path().join("topk/layer2.parquet"));
    assert!(strings(&topk, "image_id").iter().all(|id| id == "scene_0.png"));
}

#[test]
fn list_files_and_urls_are_probe_sets() {
    let dir = tempfile::tempdir().unwrap();
    copy_images(&["scene_1.png", "gray.png"], dir.path());
    std::fs::write(dir.path().join("probe.csv"), "path,label\nscene_1.png,a\ngray.png,b\n")
        .unwrap();
    let out = tempfile::tempdir().unwrap();
    let model = fixtures().join("models/tiny_resnet");
    let list = dir.path().join("probe.csv");
    let run = dnd(&[
        "probe",
        "--model",
        model.to_str().unwrap(),
        "--images",
        list.to_str().unwrap(),
        "--out",
        out.path().to_str().unwrap(),
    ]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let ids = strings(&read_parquet(&out.path().join("topk/layer4.parquet")), "image_id");
    assert!(ids.iter().all(|i| i == "gray.png" || i == "scene_1.png"));

    let url = format!("file://{}", dir.path().display());
    let out_url = format!("file://{}", out.path().join("via-url").display());
    let run =
        dnd(&["probe", "--model", model.to_str().unwrap(), "--images", &url, "--out", &out_url]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(out.path().join("via-url/topk/layer4.parquet").is_file());
}

#[test]
fn bad_input_fails_early_with_exit_code_2_and_a_useful_message() {
    let images = tempfile::tempdir().unwrap();
    copy_images(&["scene_0.png"], images.path());
    let img = images.path().to_str().unwrap();
    let model = fixtures().join("models/tiny_resnet");
    let model = model.to_str().unwrap();
    let out = tempfile::tempdir().unwrap();
    let out_dir = out.path().join("never");
    let o = out_dir.to_str().unwrap();
    let empty = tempfile::tempdir().unwrap();
    // Checkpoints dnd cannot use: each message names the file, what it is and what to do.
    let legacy = fixtures().join("models/tiny_resnet_pth/legacy.pth");
    let legacy = legacy.to_str().unwrap();
    let bad_models = tempfile::tempdir().unwrap();
    let vgg = bad_models.path().join("vgg16.safetensors");
    let zeros = candle_core::Tensor::zeros(
        (4, 3, 3, 3),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let tensors = std::collections::HashMap::from([("features.0.weight".to_string(), zeros)]);
    candle_core::safetensors::save(&tensors, &vgg).unwrap();
    let vgg = vgg.to_str().unwrap();
    let html = bad_models.path().join("resnet18.pth");
    std::fs::write(&html, "<html>404 Not Found</html>").unwrap();
    let html = html.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &[&str])> = vec![
        (vec!["--model", "/no/such/model", "--images", img], &["/no/such/model", "help:"]),
        (vec!["--model", legacy, "--images", img], &["legacy.pth", "legacy", "torch.save"]),
        (
            vec!["--model", vgg, "--images", img],
            &["vgg16.safetensors", "`features.0.weight`", "expected:", "help:"],
        ),
        (vec!["--model", html, "--images", img], &["resnet18.pth", "<html>", "help:"]),
        (
            vec!["--model", "hf:nobody/nothing", "--images", img],
            &["hf:nobody/nothing", "huggingface-cli download"],
        ),
        (vec!["--model", model, "--images", img, "--layers", "layer9"], &["layer9", "layer4"]),
        (vec!["--model", model, "--images", img, "--top-k", "0"], &["top_k"]),
        (
            vec!["--model", model, "--images", img, "--crops", "--crop-neurons", "0..999"],
            &["neuron 998", "layer4"],
        ),
        (
            vec!["--model", model, "--images", "/no/such/images"],
            &["/no/such/images", "no such directory"],
        ),
        (vec!["--model", model, "--images", empty.path().to_str().unwrap()], &["no probe images"]),
        (vec!["--model", model, "--images", img, "--pooling", "median"], &["median"]),
    ];
    for (args, needles) in cases {
        let mut full = vec!["probe", "--out", o];
        full.extend(&args);
        let run = std::process::Command::new(dnd_tests::dnd_binary())
            .args(&full)
            .env("HF_HUB_OFFLINE", "1")
            .env("HF_HOME", empty.path())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert_eq!(run.status.code(), Some(2), "{args:?}: {stderr}");
        for needle in needles {
            assert!(stderr.contains(needle), "{args:?}: `{needle}` missing from: {stderr}");
        }
        assert!(!out_dir.join("topk").exists(), "{args:?}: no work may start on bad input");
    }
}

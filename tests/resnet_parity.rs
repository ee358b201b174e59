//! Parity with PyTorch: our ResNet taps, preprocessing and attention crops against the
//! references that `tests/fixtures/make_resnet_fixtures.py` computed with torchvision,
//! PIL and OpenCV on random-weight models; the same weights saved by PyTorch itself
//! (`tests/fixtures/make_pth_fixtures.py`) give the same taps.

use std::collections::HashMap;

use candle_core::{D, Device, IndexOp, Tensor};

use dnd_core::{CropConfig, Map2, plan_crops};
use dnd_models::preprocess::resize_rgb;
use dnd_models::target::TargetShape;
use dnd_models::{Checkpoint, ModelRef, ResNet, Tap, TargetModel};
use dnd_pipeline::ImageLimits;
use dnd_pipeline::images::decode_rgb;
use dnd_tests::{Reference, fixtures, max_abs_diff};

/// f32 through 18+ layers of random weights: PyTorch and candle sum in different orders,
/// so bit equality is not expected; 1e-4 absolute is the bar.
const TAP_TOLERANCE: f32 = 1e-4;

fn reference(name: &str) -> Reference {
    Reference::load(&fixtures().join("reference"), name)
}

fn load(model: &str) -> TargetModel {
    let r: ModelRef = fixtures().join("models").join(model).to_str().unwrap().parse().unwrap();
    TargetModel::load(&r, &Device::Cpu).unwrap()
}

fn check_taps(model_name: &str) {
    check_model_taps(&load(model_name), model_name, model_name);
}

/// `model`'s taps against the reference `reference_name`; `model_name` for messages.
fn check_model_taps(model: &TargetModel, reference_name: &str, model_name: &str) {
    let r = reference(reference_name);
    let input = &r.tensors["input"];
    let outs = model.forward_taps(input, &Tap::RESNET).unwrap();
    let mut report = Vec::new();
    for (tap, out) in Tap::RESNET.iter().zip(&outs) {
        let name = tap.to_string();
        let diffs: Vec<(&str, f32)> = if tap.is_spatial() {
            let channel = r.json["map_channel"][&name].as_u64().unwrap() as usize;
            let flat = out.flatten_from(2).unwrap();
            vec![
                (
                    "mean",
                    max_abs_diff(
                        &flat.mean(D::Minus1).unwrap(),
                        &r.tensors[&format!("{name}.mean")],
                    ),
                ),
                (
                    "max",
                    max_abs_diff(&flat.max(D::Minus1).unwrap(), &r.tensors[&format!("{name}.max")]),
                ),
                (
                    "map",
                    max_abs_diff(
                        &out.i((.., channel)).unwrap(),
                        &r.tensors[&format!("{name}.map")],
                    ),
                ),
            ]
        } else {
            vec![("vector", max_abs_diff(out, &r.tensors[&format!("{name}.vector")]))]
        };
        for (what, d) in diffs {
            report.push(format!("{name}.{what}: {d:.2e}"));
            assert!(
                d <= TAP_TOLERANCE,
                "{model_name} {name}.{what}: max |diff| {d} > {TAP_TOLERANCE}"
            );
        }
    }
    eprintln!("{model_name}: {}", report.join(", "));
}

#[test]
fn resnet18_taps_match_torchvision() {
    check_taps("resnet18");
}

/// The vector cache keeps one value per (model, image): an image's activations must not
/// depend on the other images of its batch, at any tap.
#[test]
fn every_tap_is_batch_invariant() {
    for name in ["resnet18", "tiny_resnet"] {
        let model = load(name);
        let input = &reference(name).tensors["input"];
        let batched = model.forward_taps(input, &Tap::RESNET).unwrap();
        for i in 0..input.dim(0).unwrap() {
            let alone = model.forward_taps(&input.narrow(0, i, 1).unwrap(), &Tap::RESNET).unwrap();
            for ((tap, b), a) in Tap::RESNET.iter().zip(&batched).zip(&alone) {
                let b = b.narrow(0, i, 1).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let same = a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(same, "{name} {tap}: image {i} alone differs from image {i} in its batch");
            }
        }
    }
}

#[test]
fn custom_bottleneck_resnet_taps_match_pytorch() {
    check_taps("tiny_resnet");
}

/// tiny_resnet's weights as `torch.save(state_dict)` and in the Places365 layout
/// (`{"state_dict": {"module.conv1.weight": ...}}`, a .pth.tar) load, shape read off the
/// pickle, to the taps of PyTorch's reference and, bit for bit, of the safetensors file.
#[test]
fn pytorch_checkpoints_give_the_taps_of_the_safetensors_file() {
    let safetensors = load("tiny_resnet");
    let x = &reference("tiny_resnet").tensors["input"];
    let expected = safetensors.forward_taps(x, &Tap::RESNET).unwrap();
    for file in ["plain.pth", "places365_layout.pth.tar"] {
        let name = format!("tiny_resnet_pth/{file}");
        let model = load(&name);
        assert_eq!(
            model.resnet().unwrap().config(),
            safetensors.resnet().unwrap().config(),
            "{file}"
        );
        check_model_taps(&model, "tiny_resnet", &name);
        let outs = model.forward_taps(x, &Tap::RESNET).unwrap();
        for ((tap, ours), theirs) in Tap::RESNET.iter().zip(&outs).zip(&expected) {
            assert_eq!(max_abs_diff(ours, theirs), 0.0, "{file} {tap}");
        }
        // Planning reads the taps' widths off the pickle without its weights.
        let r: ModelRef = fixtures().join("models").join(&name).to_str().unwrap().parse().unwrap();
        let shape = TargetShape::read(&r).unwrap();
        for tap in Tap::RESNET {
            assert_eq!(shape.tap_width(tap), model.tap_width(tap), "{file} {tap}");
        }
    }
}

/// A float16 checkpoint (`{"model": state_dict.half()}`, a .pt) is upcast to f32: its taps
/// are those of the safetensors weights rounded through f16, bit for bit.
#[test]
fn float16_pytorch_checkpoint_is_upcast() {
    let weights = fixtures().join("models/tiny_resnet/model.safetensors");
    let rounded: HashMap<String, Tensor> = Checkpoint::open(&weights)
        .unwrap()
        .load(&Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(name, t)| {
            let t = t.to_dtype(candle_core::DType::F16).unwrap();
            (name, t.to_dtype(candle_core::DType::F32).unwrap())
        })
        .collect();
    let config = load("tiny_resnet").resnet().unwrap().config().clone();
    let expected = ResNet::from_tensors(&rounded, config, &weights, &Device::Cpu).unwrap();
    let half = load("tiny_resnet_pth/half_model.pt");
    let x = &reference("tiny_resnet").tensors["input"];
    let outs = half.forward_taps(x, &Tap::RESNET).unwrap();
    let theirs = expected.forward_taps(x, &Tap::RESNET).unwrap();
    for ((tap, ours), theirs) in Tap::RESNET.iter().zip(&outs).zip(&theirs) {
        assert_eq!(max_abs_diff(ours, theirs), 0.0, "{tap}");
    }
}

/// Our decode + Resize(256) + CenterCrop(224) + Normalize against torchvision's on PIL.
#[test]
fn preprocessing_matches_torchvision() {
    let model = load("resnet18");
    let r = reference("resnet18");
    let images: Vec<String> = r.json["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    for (i, name) in images.iter().enumerate() {
        let bytes = std::fs::read(fixtures().join("images").join(name)).unwrap();
        let rgb = decode_rgb(&bytes, &ImageLimits::default()).unwrap();
        let ours =
            Tensor::from_vec(model.preprocess.apply(&rgb), (3, 224, 224), &Device::Cpu).unwrap();
        let theirs = r.tensors["input"].i(i).unwrap();
        let d = max_abs_diff(&ours, &theirs);
        let mean_d = (&ours - &theirs)
            .unwrap()
            .abs()
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        match name.as_str() {
            // PIL saturates 16-bit grayscale at 255 (65% of this image turns white); we
            // scale 16 bits to 8 instead, so this image is expected to differ.
            "deep16.png" => {
                assert!(d > 0.5, "deep16 should differ from PIL's saturating conversion")
            }
            // Different JPEG decoders (zune-jpeg vs libjpeg-turbo) may round chroma
            // upsampling differently: a level or two per pixel, never more.
            "wide.jpg" => {
                assert!(d <= 4.0 / 255.0 / 0.224 + 1e-5, "{name}: max |diff| {d}");
                assert!(mean_d < 0.01, "{name}: mean |diff| {mean_d}");
            }
            // PNG decoding is exact, and 256x256 needs no resampling (wide.jpg above
            // covers the resize; its pixels are what PIL resampled, see below).
            _ => assert!(d <= 1e-6, "{name}: max |diff| {d}"),
        }
    }
}

/// The resize itself, isolated from JPEG decoding: PIL's decoded RGB of wide.jpg
/// through our bilinear resize against PIL's resize to 375x375.
#[test]
fn bilinear_resize_matches_pillow() {
    let r = reference("resnet18");
    let rgb = &r.tensors["pil_rgb.wide"];
    let (h, w, _) = rgb.dims3().unwrap();
    let raw: Vec<u8> = rgb.flatten_all().unwrap().to_vec1::<u8>().unwrap();
    let img = image::RgbImage::from_raw(w as u32, h as u32, raw).unwrap();
    let ours = resize_rgb(&img, 375, 375);
    let idx = r.json["images"].as_array().unwrap().iter().position(|v| v == "wide.jpg").unwrap();
    let theirs: Vec<u8> = r.tensors["crop375.resized_u8"]
        .i(idx)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<u8>()
        .unwrap();
    let max = ours.as_raw().iter().zip(&theirs).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
    assert!(max <= 1, "Pillow-compatible bilinear resize differs by {max} levels");
}

/// Stage 1 on the reference maps: Otsu level and kept boxes as OpenCV computes them.
#[test]
fn attention_crops_match_opencv() {
    let r = reference("resnet18");
    let config = CropConfig::default();
    let mut compared = 0;
    for layer in ["layer3", "layer4"] {
        let maps = &r.tensors[&format!("crop375.{layer}.map")];
        let per_image = r.json["crop375"]["taps"][layer]["per_image"].as_array().unwrap();
        for (i, expected) in per_image.iter().enumerate() {
            let m = maps.i(i).unwrap();
            let (h, w) = m.dims2().unwrap();
            let map = Map2::new(w, h, m.flatten_all().unwrap().to_vec1::<f32>().unwrap()).unwrap();
            let plan = plan_crops(&map, &config);
            let image = expected["image"].as_str().unwrap();
            if expected["flat"].as_bool().unwrap() {
                assert!(plan.crops.is_empty(), "{layer} {image}: a flat map gives no crops");
                continue;
            }
            let otsu = expected["otsu_threshold"].as_f64().unwrap() as i64;
            let ours = i64::from(plan.threshold.unwrap());
            // Interpolation rounding can move a heat value across a level: allow one.
            assert!((ours - otsu).abs() <= 1, "{layer} {image}: Otsu {ours} vs OpenCV {otsu}");
            let boxes: Vec<[u32; 4]> = expected["boxes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| {
                    let v: Vec<u32> =
                        b.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
                    [v[0], v[1], v[2], v[3]]
                })
                .collect();
            assert_eq!(
                plan.crops.len(),
                boxes.len(),
                "{layer} {image}: {:?} vs {boxes:?}",
                plan.crops
            );
            for (b, e) in plan.crops.iter().zip(&boxes) {
                let got = [b.x0, b.y0, b.x1, b.y1];
                let off = got.iter().zip(e).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
                assert!(off <= 2, "{layer} {image}: box {got:?} vs OpenCV {e:?}");
            }
            compared += 1;
        }
    }
    assert!(compared >= 10, "too few maps compared: {compared}");
}

//! Parity with PyTorch for the ViT targets: every tap of a tiny random-weight model of
//! each checkpoint layout (torchvision, timm with and without registers, transformers'
//! CLIP image tower and DINOv2 with and without registers) against the references that
//! `tests/fixtures/make_vit_fixtures.py` computed with torchvision, timm and
//! transformers; their preprocessing; planning without weights; and the errors for
//! checkpoints that are not what they should be.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, IndexOp, Tensor};

use dnd_models::preprocess::Filter;
use dnd_models::target::{Architecture, TargetShape};
use dnd_models::vit::VitLayout;
use dnd_models::{Checkpoint, ModelError, ModelRef, Tap, TargetModel};
use dnd_pipeline::ImageLimits;
use dnd_pipeline::images::decode_rgb;
use dnd_tests::{Reference, fixtures, max_abs_diff};

/// The bar: max |diff| within 1e-4 of the activation scale (the tap's largest
/// magnitude, at least 1).
const RELATIVE_TOLERANCE: f32 = 1e-4;

/// (model directory, reference name, layout).
const MODELS: [(&str, &str, VitLayout); 6] = [
    ("tiny_vit_tv", "tv", VitLayout::Torchvision),
    ("tiny_vit_timm", "timm", VitLayout::Timm),
    ("tiny_vit_timm_reg", "timm_reg", VitLayout::Timm),
    ("tiny_clip_vision", "clip", VitLayout::HfClip),
    ("tiny_dinov2", "dinov2", VitLayout::HfDinov2),
    ("tiny_dinov2_reg", "dinov2_reg", VitLayout::HfDinov2),
];

fn reference(name: &str) -> Reference {
    Reference::load(&fixtures().join("reference"), &format!("vit_{name}"))
}

fn model_ref(path: &Path) -> ModelRef {
    path.to_str().unwrap().parse().unwrap()
}

fn load(dir: &str) -> TargetModel {
    TargetModel::load(&model_ref(&fixtures().join("models").join(dir)), &Device::Cpu).unwrap()
}

fn scale(t: &Tensor) -> f32 {
    let m: f32 = t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap();
    m.max(1.0)
}

/// `ours` against PyTorch's `theirs`, within the relative tolerance; the relative
/// difference, for the report.
fn check(what: &str, ours: &Tensor, theirs: &Tensor) -> f32 {
    let d = max_abs_diff(ours, theirs) / scale(theirs);
    assert!(d <= RELATIVE_TOLERANCE, "{what}: max |diff| / scale = {d:.2e}");
    d
}

/// Every tap of the model (`tag` selects the references of the second input size) through
/// the fast CPU path and the portable one: the patch grid, the class token, the head.
fn check_all_taps(model: &TargetModel, r: &Reference, name: &str, tag: &str) -> Vec<String> {
    let x = &r.tensors[&format!("{tag}input")];
    let vit = model.vit().unwrap();
    let shape = model.shape();
    let mut taps = shape.architecture.taps();
    if !tag.is_empty() {
        // The second size only has the last block's and the head's references.
        taps.retain(|t| r.tensors.keys().any(|k| k.starts_with(&format!("{tag}{t}."))));
        assert!(!taps.is_empty(), "{name}: no {tag} references");
    }
    let grids = model.forward_taps(x, &taps).unwrap();
    let portable = vit.forward_taps_portable(x, &taps).unwrap();
    let has_class = shape.has_class_token();
    let classes = has_class.then(|| model.forward_class_tokens(x, &taps).unwrap());
    let mut report = Vec::new();
    for (i, tap) in taps.iter().enumerate() {
        let key = |what: &str| format!("{tag}{tap}.{what}");
        let mut worst = 0f32;
        if *tap == Tap::Head {
            let theirs = &r.tensors[&key("vector")];
            worst = worst.max(check(&format!("{name} {tag}head"), &grids[i], theirs));
            worst = worst.max(check(&format!("{name} {tag}head portable"), &portable[i], theirs));
        } else {
            let map =
                r.tensors.get(&key("map")).unwrap_or_else(|| panic!("{name}: no {}", key("map")));
            worst = worst.max(check(&format!("{name} {tag}{tap} map"), &grids[i], map));
            worst = worst.max(check(&format!("{name} {tag}{tap} portable"), &portable[i], map));
            if let Some(classes) = &classes {
                let cls = &r.tensors[&key("cls")];
                worst = worst.max(check(&format!("{name} {tag}{tap} cls"), &classes[i], cls));
            }
        }
        report.push(format!("{tag}{tap} {worst:.1e}"));
    }
    report
}

#[test]
fn every_tap_of_every_layout_matches_pytorch() {
    for (dir, name, layout) in MODELS {
        let model = load(dir);
        let config = model.vit().unwrap().config();
        assert_eq!(config.layout, layout, "{dir}");
        let r = reference(name);
        // Every tap the model has is in the reference, and nothing else.
        let expected: usize = r
            .tensors
            .keys()
            .filter(|k| !k.starts_with("big.") && (k.ends_with(".map") || k.ends_with(".vector")))
            .count();
        assert_eq!(config.taps().len(), expected, "{dir}: {:?}", config.taps());
        let mut report = check_all_taps(&model, &r, name, "");
        if r.tensors.contains_key("big.input") {
            report.extend(check_all_taps(&model, &r, name, "big."));
        }
        eprintln!("{dir} ({layout}): {}", report.join(", "));
    }
}

/// What each layout's shape came out as: the parts no test of activations would miss
/// silently are checked there; these are the ones that decide the tap list and pooling.
#[test]
fn shapes_are_read_off_the_checkpoints() {
    let cases = [
        ("tiny_vit_tv", 1, 0, true),
        ("tiny_vit_timm", 1, 0, true),
        ("tiny_vit_timm_reg", 3, 2, false),
        ("tiny_clip_vision", 1, 0, true),
        ("tiny_dinov2", 1, 0, true),
        ("tiny_dinov2_reg", 3, 2, true),
    ];
    for (dir, prefix, registers, norm) in cases {
        let path = fixtures().join("models").join(dir);
        let model = load(dir);
        let config = model.vit().unwrap().config();
        assert_eq!(
            (config.hidden_size, config.num_layers, config.num_heads, config.mlp_size),
            (16, 2, 2, 32),
            "{dir}"
        );
        assert_eq!(
            (config.prefix_tokens(), config.register_tokens, config.final_norm),
            (prefix, registers, norm),
            "{dir}"
        );
        // Planning reads the same shape without the weights.
        let shape = TargetShape::read(&model_ref(&path)).unwrap();
        assert_eq!(shape, model.shape(), "{dir}");
        for name in ["blocks.1", "encoder.layers.1", "blocks.0.mlp", "encoder.layer.0.mlp"] {
            let tap = shape.tap(name).unwrap();
            let width = if name.ends_with("mlp") { 32 } else { 16 };
            assert_eq!(shape.tap_width(tap), width, "{dir} {name}");
        }
        let err = shape.tap("blocks.2").unwrap_err().to_string();
        assert!(err.contains("blocks.2") && err.contains("blocks.0 .. blocks.1"), "{err}");
        assert!(shape.tap("layer4").is_err(), "{dir}: a ViT has no layer4");
    }
    // The OpenAI-style quick GELU and DINOv2's positions for a 24x24 image.
    let timm_reg = load("tiny_vit_timm_reg");
    let c = timm_reg.vit().unwrap().config();
    assert_eq!((c.positioned_prefix, c.layer_scale, c.grid), (0, true, (4, 4)));
    let dinov2 = load("tiny_dinov2");
    assert_eq!(dinov2.vit().unwrap().config().grid, (6, 6));
    // A ResNet has no class token to pool.
    let resnet = TargetShape::read(&model_ref(&fixtures().join("models/tiny_resnet"))).unwrap();
    assert!(matches!(resnet.architecture, Architecture::ResNet(_)) && !resnet.has_class_token());
}

/// Each layout's preprocessing from its own config (timm's `pretrained_cfg`, dnd's for
/// torchvision, transformers' `preprocessor_config.json`) against the library's on the
/// PNG images (JPEG decoders differ; resnet_parity.rs covers that).
#[test]
fn preprocessing_follows_each_checkpoint_config() {
    for (dir, name, layout) in MODELS {
        let model = load(dir);
        let r = reference(name);
        let images: Vec<String> = r.json["images"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().into())
            .collect();
        for (i, image) in images.iter().enumerate().filter(|(_, n)| n.ends_with(".png")) {
            let bytes = std::fs::read(fixtures().join("images").join(image)).unwrap();
            let rgb = decode_rgb(&bytes, &ImageLimits::default()).unwrap();
            let ours =
                Tensor::from_vec(model.preprocess.apply(&rgb), (3, 16, 16), &Device::Cpu).unwrap();
            let theirs = r.tensors["input"].i(i).unwrap();
            // In 8-bit levels (over the smallest std): the resizes (Pillow's fixed-point
            // one for torchvision and timm, torchvision's uint8 kernel for transformers)
            // round differently from dnd's: by up to two levels from Pillow's, three from
            // torchvision's, at these 14-16x downscales.
            let std = model.preprocess.std.iter().copied().fold(f32::INFINITY, f32::min);
            let levels = |t: &Tensor| max_abs_diff(t, &theirs) * 255.0 * std;
            let d = levels(&ours);
            let bound =
                if matches!(layout, VitLayout::HfClip | VitLayout::HfDinov2) { 3.0 } else { 2.0 };
            assert!(d <= bound + 1e-3, "{dir} {image}: max |diff| {d} levels");
            // The other filter is told apart: the check sees which one the config names.
            let mut other = model.preprocess.clone();
            other.filter = match other.filter {
                Filter::Bilinear => Filter::Bicubic,
                Filter::Bicubic => Filter::Bilinear,
            };
            let wrong = Tensor::from_vec(other.apply(&rgb), (3, 16, 16), &Device::Cpu).unwrap();
            assert!(levels(&wrong) > 4.0, "{dir} {image}: the filter makes no difference");
            eprintln!("{dir} {image}: {d:.1} levels ({:.1} with the other filter)", levels(&wrong));
        }
    }
}

/// torchvision publishes its ViT weights as pickled state_dicts with the MLP names of
/// torchvision before 0.13 (`mlp.linear_1`); that file gives the safetensors one's taps,
/// bit for bit.
#[test]
fn a_torchvision_pickle_with_old_mlp_names_gives_the_same_taps() {
    let safetensors = load("tiny_vit_tv");
    let pickle = load("tiny_vit_tv_pth");
    assert_eq!(pickle.shape().architecture, safetensors.shape().architecture);
    let x = &reference("tv").tensors["input"];
    let taps = safetensors.shape().architecture.taps();
    let ours = pickle.forward_taps(x, &taps).unwrap();
    let theirs = safetensors.forward_taps(x, &taps).unwrap();
    for ((tap, a), b) in taps.iter().zip(&ours).zip(&theirs) {
        assert_eq!(max_abs_diff(a, b), 0.0, "{tap}");
    }
}

/// The multimodal fixture's whole `CLIPModel` (text tower included) is a target too: its
/// head is CLIP's image features, its final norm's class token the pooled output.
#[test]
fn a_whole_clip_model_is_a_target() {
    let model =
        TargetModel::load(&model_ref(&fixtures().join("multimodal/clip")), &Device::Cpu).unwrap();
    let r = Reference::load(&fixtures().join("multimodal/reference"), "clip");
    let x = &r.tensors["pixel_values"];
    let head = model.forward_taps(x, &[Tap::Head]).unwrap().remove(0);
    check("CLIPModel head", &head, &r.tensors["image_features"]);
    let pooled = model.forward_class_tokens(x, &[Tap::Norm]).unwrap().remove(0);
    check("CLIPModel norm cls", &pooled, &r.tensors["vision.pooler_output"]);
}

fn write_safetensors(
    tensors: &HashMap<String, Tensor>,
    dir: &Path,
    config_from: Option<&Path>,
) -> std::path::PathBuf {
    let path = dir.join("model.safetensors");
    candle_core::safetensors::save(tensors, &path).unwrap();
    if let Some(config) = config_from {
        std::fs::copy(config, dir.join("config.json")).unwrap();
    }
    path
}

fn fixture_tensors(dir: &str) -> HashMap<String, Tensor> {
    Checkpoint::open(&fixtures().join("models").join(dir).join("model.safetensors"))
        .unwrap()
        .load(&Device::Cpu)
        .unwrap()
}

/// A change made to a fixture's tensors.
type Edit = dyn Fn(&mut HashMap<String, Tensor>);

/// A broken checkpoint is refused with what it is, what was expected and what to do,
/// naming the file: a tensor missing, a tensor of the wrong shape, a variant this build
/// does not compute, and tensors of no known architecture.
#[test]
fn bad_checkpoints_say_what_is_wrong() {
    let config = fixtures().join("models/tiny_vit_timm/config.json");
    let cases: Vec<(&str, Box<Edit>, Vec<&str>)> = vec![
        (
            "missing",
            Box::new(|t| {
                t.remove("blocks.1.mlp.fc2.weight");
            }),
            vec!["without the tensor `blocks.1.mlp.fc2.weight`", "timm", "re-save"],
        ),
        (
            "shape",
            Box::new(|t| {
                t.insert(
                    "blocks.0.attn.proj.weight".into(),
                    Tensor::zeros((16, 8), candle_core::DType::F32, &Device::Cpu).unwrap(),
                );
            }),
            vec!["`blocks.0.attn.proj.weight` has shape [16, 8]", "[16, 16]", "help:"],
        ),
        (
            "variant",
            Box::new(|t| {
                t.insert(
                    "blocks.0.attn.q_norm.weight".into(),
                    Tensor::ones(8, candle_core::DType::F32, &Device::Cpu).unwrap(),
                );
            }),
            vec!["qk_norm", "not supported"],
        ),
        (
            "unknown",
            Box::new(|t| {
                let keys: Vec<String> = t.keys().cloned().collect();
                for k in keys {
                    let v = t.remove(&k).unwrap();
                    t.insert(format!("backbone.{k}"), v);
                }
            }),
            vec![
                "no architecture dnd knows",
                "`backbone.",
                "ResNet",
                "vision transformer",
                "re-save the state_dict without it",
            ],
        ),
    ];
    for (what, edit, needles) in cases {
        let dir = tempfile::tempdir().unwrap();
        let mut tensors = fixture_tensors("tiny_vit_timm");
        edit(&mut tensors);
        let path = write_safetensors(&tensors, dir.path(), Some(&config));
        let err = TargetModel::load(&model_ref(dir.path()), &Device::Cpu).unwrap_err();
        let msg = err.to_string();
        assert!(
            err.is_user_error() && matches!(err, ModelError::BadCheckpoint { .. }),
            "{what}: {msg}"
        );
        for needle in needles.iter().chain(&[path.to_str().unwrap(), "expected:", "help:"]) {
            assert!(msg.contains(needle), "{what}: `{needle}` missing from: {msg}");
        }
    }
    // A torchvision state_dict of a non-standard width without config.json: the head
    // count cannot be read off the shapes, and the message says what to add.
    let dir = tempfile::tempdir().unwrap();
    write_safetensors(&fixture_tensors("tiny_vit_tv"), dir.path(), None);
    let msg = TargetModel::load(&model_ref(dir.path()), &Device::Cpu).unwrap_err().to_string();
    assert!(msg.contains("num_heads") && msg.contains("config.json"), "{msg}");
}

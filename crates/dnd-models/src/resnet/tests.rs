//! Unit tests of the ResNet: shapes inferred, taps, errors that name what is wrong.

use super::*;

fn random_tensors(config: &ResNetConfig) -> HashMap<String, Tensor> {
    // Build a state_dict with the expected names by loading from zeros-shaped specs.
    let dev = Device::Cpu;
    let mut t = HashMap::new();
    let mut add_conv_bn = |conv: &str, bn: &str, shape: [usize; 4]| {
        t.insert(format!("{conv}.weight"), Tensor::randn(0f32, 0.1, &shape, &dev).unwrap());
        t.insert(format!("{bn}.weight"), Tensor::ones(shape[0], DType::F32, &dev).unwrap());
        t.insert(format!("{bn}.bias"), Tensor::zeros(shape[0], DType::F32, &dev).unwrap());
        t.insert(format!("{bn}.running_mean"), Tensor::zeros(shape[0], DType::F32, &dev).unwrap());
        t.insert(format!("{bn}.running_var"), Tensor::ones(shape[0], DType::F32, &dev).unwrap());
    };
    add_conv_bn("conv1", "bn1", [config.stem_channels, 3, 7, 7]);
    let mut in_ch = config.stem_channels;
    for s in 0..4 {
        let out = config.stage_channels(s);
        for b in 0..config.layers[s] {
            let p = format!("layer{}.{b}", s + 1);
            let stride = if s > 0 && b == 0 { 2 } else { 1 };
            match config.block {
                BlockKind::Basic => {
                    add_conv_bn(&format!("{p}.conv1"), &format!("{p}.bn1"), [out, in_ch, 3, 3]);
                    add_conv_bn(&format!("{p}.conv2"), &format!("{p}.bn2"), [out, out, 3, 3]);
                }
                BlockKind::Bottleneck => {
                    let inner = config.bottleneck_inner(s);
                    add_conv_bn(&format!("{p}.conv1"), &format!("{p}.bn1"), [inner, in_ch, 1, 1]);
                    add_conv_bn(&format!("{p}.conv2"), &format!("{p}.bn2"), [inner, inner, 3, 3]);
                    add_conv_bn(&format!("{p}.conv3"), &format!("{p}.bn3"), [out, inner, 1, 1]);
                }
            }
            if stride != 1 || in_ch != out {
                add_conv_bn(
                    &format!("{p}.downsample.0"),
                    &format!("{p}.downsample.1"),
                    [out, in_ch, 1, 1],
                );
            }
            in_ch = out;
        }
    }
    t.insert(
        "fc.weight".into(),
        Tensor::randn(0f32, 0.1, (config.num_classes, in_ch), &dev).unwrap(),
    );
    t.insert("fc.bias".into(), Tensor::zeros(config.num_classes, DType::F32, &dev).unwrap());
    t
}

fn tiny(block: BlockKind) -> ResNetConfig {
    ResNetConfig {
        block,
        layers: [1, 2, 1, 1],
        widths: [4, 8, 8, 16],
        stem_channels: 4,
        groups: 1,
        width_per_group: 64,
        num_classes: 5,
    }
}

#[test]
fn infers_the_shape_of_a_state_dict() {
    for block in [BlockKind::Basic, BlockKind::Bottleneck] {
        let config = tiny(block);
        assert_eq!(ResNetConfig::infer(&random_tensors(&config)).unwrap(), config);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        candle_core::safetensors::save(&random_tensors(&config), &path).unwrap();
        let checkpoint = Checkpoint::open(&path).unwrap();
        assert_eq!(ResNetConfig::from_checkpoint(&checkpoint).unwrap(), config);
    }
    let r50 = ResNetConfig::standard("resnet50").unwrap();
    assert_eq!(r50.stage_channels(3), 2048);
}

#[test]
fn taps_have_the_expected_shapes() {
    let config = tiny(BlockKind::Bottleneck);
    let model =
        ResNet::from_tensors(&random_tensors(&config), config, Path::new("mem"), &Device::Cpu)
            .unwrap();
    let x = Tensor::randn(0f32, 1.0, (2, 3, 64, 64), &Device::Cpu).unwrap();
    let outs = model.forward_taps(&x, &Tap::RESNET).unwrap();
    let shapes: Vec<Vec<usize>> = outs.iter().map(|t| t.dims().to_vec()).collect();
    assert_eq!(
        shapes,
        vec![
            vec![2, 4, 16, 16],
            vec![2, 16, 16, 16],
            vec![2, 32, 8, 8],
            vec![2, 32, 4, 4],
            vec![2, 64, 2, 2],
            vec![2, 64],
            vec![2, 5]
        ]
    );
    for tap in Tap::RESNET {
        let w = model.tap_width(tap);
        let out = model.forward_taps(&x, &[tap]).unwrap();
        assert_eq!(out[0].dims()[1], w, "{tap}");
    }
}

#[test]
fn wrong_shapes_and_missing_tensors_are_named() {
    let config = tiny(BlockKind::Basic);
    let mut t = random_tensors(&config);
    t.remove("layer2.0.downsample.1.running_var");
    let err = ResNet::from_tensors(&t, config.clone(), Path::new("x.safetensors"), &Device::Cpu)
        .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("no tensor `layer2.0.downsample.1.running_var`"), "{msg}");
    assert!(msg.contains("x.safetensors") && msg.contains("expected:"), "{msg}");
    let mut other = config.clone();
    other.num_classes = 7;
    let err = ResNet::from_tensors(&random_tensors(&config), other, Path::new("x"), &Device::Cpu)
        .unwrap_err();
    assert!(err.to_string().contains("fc.weight") && err.to_string().contains("[5, 16]"), "{err}");
}

#[test]
fn a_checkpoint_of_another_layout_says_what_it_has_and_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vgg.safetensors");
    let t = HashMap::from([
        (
            "features.0.weight".to_string(),
            Tensor::zeros((4, 3, 3, 3), DType::F32, &Device::Cpu).unwrap(),
        ),
        (
            "classifier.0.weight".to_string(),
            Tensor::zeros((2, 4), DType::F32, &Device::Cpu).unwrap(),
        ),
    ]);
    candle_core::safetensors::save(&t, &path).unwrap();
    for err in [
        ResNet::load(&path, None, &Device::Cpu).unwrap_err(),
        ResNetConfig::from_checkpoint(&Checkpoint::open(&path).unwrap()).unwrap_err(),
    ] {
        let msg = err.to_string();
        assert!(matches!(err, ModelError::BadCheckpoint { .. }) && err.is_user_error(), "{msg}");
        for needle in [
            path.to_str().unwrap(),
            "2 tensors",
            "`classifier.0.weight`",
            "layer1.0.conv1.weight",
            "expected: a torchvision/timm ResNet",
            "help:",
        ] {
            assert!(msg.contains(needle), "`{needle}` missing from: {msg}");
        }
    }
    // With a config.json the shape is known, and the first missing tensor is named.
    let err = ResNet::load(&path, Some(tiny(BlockKind::Basic)), &Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("no tensor `conv1.weight`"), "{err}");
}

#[test]
fn tap_names_round_trip() {
    for tap in Tap::RESNET {
        assert_eq!(tap.to_string().parse::<Tap>().unwrap(), tap);
    }
    let err = "layer5".parse::<Tap>().unwrap_err().to_string();
    assert!(err.contains("layer5") && err.contains("layer4"), "{err}");
}

//! Unit tests of the ViT: tap names, position resampling against PyTorch's numbers, and
//! the CPU path against the portable one on random models of every variant.

use super::params::{BlockParams, HeadParams, Norm};
use super::*;

#[test]
fn tap_names_and_their_aliases() {
    for (name, tap) in [
        ("blocks.3", Tap::Block(3)),
        ("blocks.11.mlp", Tap::BlockMlp(11)),
        ("encoder.layers.3", Tap::Block(3)),
        ("encoder.layer.3.mlp", Tap::BlockMlp(3)),
        ("encoder.layers.encoder_layer_7", Tap::Block(7)),
        ("encoder.layers.encoder_layer_7.mlp", Tap::BlockMlp(7)),
        ("norm", Tap::Norm),
        ("encoder.ln", Tap::Norm),
        ("head", Tap::Head),
        ("heads.head", Tap::Head),
        ("layer4", Tap::Layer(4)),
    ] {
        assert_eq!(name.parse::<Tap>().unwrap(), tap, "{name}");
    }
    for tap in [Tap::Block(0), Tap::BlockMlp(5), Tap::Norm, Tap::Head] {
        assert_eq!(tap.to_string().parse::<Tap>().unwrap(), tap);
    }
    for bad in ["blocks.", "blocks.01", "blocks.+1", "blocks.1.attn", "blocks.x", "block.1"] {
        let err = bad.parse::<Tap>().unwrap_err().to_string();
        assert!(err.contains(bad) && err.contains("blocks.N"), "{err}");
    }
    assert!(Tap::Block(2).is_spatial() && Tap::Norm.is_spatial() && !Tap::Head.is_spatial());
}

/// xorshift64*: uniform floats, fast enough in a debug build to fill a ViT-B.
struct Rng(u64);

impl Rng {
    fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let bits = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40;
        lo + (hi - lo) * bits as f32 / (1u64 << 24) as f32
    }
}

fn random(rng: &mut Rng, shape: &[usize], scale: f32) -> HostTensor {
    let n = shape.iter().product();
    HostTensor::new((0..n).map(|_| rng.uniform(-1.0, 1.0) * scale).collect(), shape)
}

fn norm(rng: &mut Rng, c: usize) -> Norm<HostTensor> {
    let weight = HostTensor::new((0..c).map(|_| rng.uniform(0.5, 1.5)).collect(), &[c]);
    Norm { weight, bias: random(rng, &[c], 0.2) }
}

/// A random model of `config`'s shape.
fn random_vit(config: &VitConfig, seed: u64) -> Vit {
    let rng = &mut Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let (c, m, p) = (config.hidden_size, config.mlp_size, config.patch_size);
    let s = |fan_in: usize| 1.7 / (fan_in as f32).sqrt();
    let blocks = (0..config.num_layers)
        .map(|_| BlockParams {
            ln1: norm(rng, c),
            qkv_weight: random(rng, &[3 * c, c], s(c)),
            qkv_bias: random(rng, &[3 * c], 0.2),
            proj_weight: random(rng, &[c, c], s(c)),
            proj_bias: random(rng, &[c], 0.2),
            ln2: norm(rng, c),
            fc1_weight: random(rng, &[m, c], s(c)),
            fc1_bias: random(rng, &[m], 0.2),
            fc2_weight: random(rng, &[c, m], s(m)),
            fc2_bias: random(rng, &[c], 0.2),
        })
        .collect();
    let head = config.head.as_ref().map(|h| {
        let fan_in = if h.input == HeadInput::ClassTokenAndPatchMean { 2 * c } else { c };
        HeadParams {
            norm: h.norm.then(|| norm(rng, c)),
            weight: random(rng, &[h.outputs, fan_in], s(fan_in)),
            bias: random(rng, &[h.outputs], 0.2),
        }
    });
    let params = Params {
        patch_weight: random(rng, &[c, 3, p, p], s(3 * p * p)),
        patch_bias: random(rng, &[c], 0.2),
        class_token: config.class_token.then(|| random(rng, &[c], 0.5)),
        registers: (config.register_tokens > 0)
            .then(|| random(rng, &[config.register_tokens, c], 0.5)),
        pos_prefix: (config.positioned_prefix > 0)
            .then(|| random(rng, &[config.positioned_prefix, c], 0.5)),
        pos_grid: random(rng, &[config.grid.0 * config.grid.1, c], 0.5),
        pre_norm: config.pre_norm.then(|| norm(rng, c)),
        blocks,
        norm: config.final_norm.then(|| norm(rng, c)),
        head,
    };
    Vit::from_params(config.clone(), params, &Device::Cpu).unwrap()
}

fn config(layout: VitLayout) -> VitConfig {
    VitConfig {
        layout,
        prefix: String::new(),
        hidden_size: 20,
        num_layers: 3,
        num_heads: 4,
        mlp_size: 36,
        patch_size: 4,
        grid: (3, 3),
        class_token: true,
        register_tokens: 0,
        positioned_prefix: 1,
        antialias_positions: false,
        pre_norm: false,
        final_norm: true,
        layer_scale: false,
        activation: Activation::Gelu,
        layer_norm_eps: 1e-6,
        head: Some(HeadConfig { outputs: 7, input: HeadInput::ClassToken, norm: false }),
    }
}

/// Every variant the layouts produce: registers with and without positions, no class
/// token, pre-norm, each activation and head input, and inputs of another size (resampled
/// positions), through the fast CPU path and candle's ops alike.
fn variants() -> Vec<VitConfig> {
    let base = config(VitLayout::Torchvision);
    vec![
        base.clone(),
        VitConfig {
            register_tokens: 2,
            positioned_prefix: 0,
            activation: Activation::QuickGelu,
            head: Some(HeadConfig { outputs: 5, input: HeadInput::PatchMean, norm: true }),
            final_norm: false,
            ..config(VitLayout::Timm)
        },
        VitConfig {
            register_tokens: 3,
            positioned_prefix: 1,
            antialias_positions: true,
            pre_norm: true,
            activation: Activation::GeluTanh,
            head: Some(HeadConfig {
                outputs: 4,
                input: HeadInput::ClassTokenAndPatchMean,
                norm: false,
            }),
            ..config(VitLayout::HfDinov2)
        },
        VitConfig {
            class_token: false,
            positioned_prefix: 0,
            head: None,
            ..config(VitLayout::Timm)
        },
    ]
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
}

#[test]
fn the_cpu_path_matches_candle_ops_on_every_variant() {
    for (n, config) in variants().into_iter().enumerate() {
        let vit = random_vit(&config, n as u64);
        let taps = config.taps();
        // 12x12 is the checkpoint's grid; 18x14 resamples the positions (and drops the
        // last two columns of pixels, as a strided convolution does).
        for (h, w) in [(12, 12), (18, 14)] {
            let x = Tensor::randn(0f32, 1.0, (3, 3, h, w), &Device::Cpu).unwrap();
            let fast = vit.forward_taps(&x, &taps).unwrap();
            let portable = vit.forward_taps_portable(&x, &taps).unwrap();
            for ((tap, a), b) in taps.iter().zip(&fast).zip(&portable) {
                let d = max_diff(a, b);
                assert!(d < 1e-4, "variant {n} {h}x{w} {tap}: {d}");
            }
            if config.class_token {
                let classes = vit.forward_class_tokens(&x, &taps).unwrap();
                for (tap, cls) in taps.iter().zip(&classes) {
                    let want = vit.forward_taps(&x, &[*tap]).unwrap().remove(0);
                    assert_eq!(cls.dim(0).unwrap(), 3, "{tap}");
                    if *tap == Tap::Head {
                        assert_eq!(max_diff(cls, &want), 0.0);
                    }
                }
            } else {
                assert!(vit.forward_class_tokens(&x, &taps).is_err());
            }
        }
    }
}

/// The vector cache keeps one value per (model, image): an image's outputs must be the
/// same bits alone and in any batch, whichever way the work is split over threads.
#[test]
fn every_tap_is_batch_invariant() {
    let config = &variants()[2];
    let vit = random_vit(config, 7);
    let taps = config.taps();
    let x = Tensor::randn(0f32, 1.0, (5, 3, 12, 12), &Device::Cpu).unwrap();
    let batched = vit.forward_taps(&x, &taps).unwrap();
    for i in [0, 3] {
        let alone = vit.forward_taps(&x.narrow(0, i, 1).unwrap(), &taps).unwrap();
        for ((tap, b), a) in taps.iter().zip(&batched).zip(&alone) {
            let b: Vec<f32> = b.narrow(0, i, 1).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
            assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "{tap} image {i}");
        }
    }
}

#[test]
fn taps_are_checked_and_listed() {
    let config = config(VitLayout::Timm);
    assert_eq!(config.taps().len(), 2 * 3 + 2);
    assert_eq!(config.tap_width(Tap::BlockMlp(1)), 36);
    assert_eq!(config.tap_width(Tap::Head), 7);
    let vit = random_vit(&config, 1);
    let x = Tensor::zeros((1, 3, 12, 12), DType::F32, &Device::Cpu).unwrap();
    let err = vit.forward_taps(&x, &[Tap::Block(3)]).unwrap_err().to_string();
    assert!(err.contains("blocks.3") && err.contains("blocks.0 .. blocks.2"), "{err}");
    assert!(vit.forward_taps(&x, &[Tap::Layer(4)]).is_err());
    let small = Tensor::zeros((1, 3, 3, 3), DType::F32, &Device::Cpu).unwrap();
    assert!(vit.forward_taps(&small, &[Tap::Block(0)]).is_err());
}

/// Throughput of a full-size ViT-B/16 (random weights) up to its last block, for
/// comparing with PyTorch by hand (docs/benchmarks.md has the end-to-end comparison):
/// `cargo test -p dnd-models --lib vit_b16_throughput -- --ignored --nocapture`.
#[test]
#[ignore = "a timing, not a test"]
fn vit_b16_throughput() {
    let config = VitConfig {
        hidden_size: 768,
        num_layers: 12,
        num_heads: 12,
        mlp_size: 3072,
        patch_size: 16,
        grid: (14, 14),
        head: Some(HeadConfig { outputs: 1000, input: HeadInput::ClassToken, norm: false }),
        ..config(VitLayout::Torchvision)
    };
    let vit = random_vit(&config, 0);
    let batch: usize = std::env::var("VIT_BATCH").ok().and_then(|b| b.parse().ok()).unwrap_or(8);
    let x = Tensor::randn(0f32, 1.0, (batch, 3, 224, 224), &Device::Cpu).unwrap();
    vit.forward_taps(&x, &[Tap::Block(11)]).unwrap();
    let start = std::time::Instant::now();
    let rounds = 3;
    for _ in 0..rounds {
        vit.forward_taps(&x, &[Tap::Block(11)]).unwrap();
    }
    let seconds = start.elapsed().as_secs_f64();
    eprintln!(
        "ViT-B/16 to blocks.11, batch {batch}, {} threads: {:.2} images/s",
        rayon::current_num_threads(),
        (rounds * batch) as f64 / seconds
    );
}

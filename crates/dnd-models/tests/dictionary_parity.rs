//! SAE encoders and directions against PyTorch: the dictionaries of
//! `tests/fixtures/units/` (written by `make_unit_fixtures.py` in SAELens' layout) read by
//! [`dictionary::inspect`] and [`dictionary::load`], run by the reference encoder and by
//! the device encoder, against the latents PyTorch computed (and NumPy checked).

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use dnd_core::{Activation, UnitKind};
use dnd_models::ModelError;
use dnd_models::dictionary::{self, DeviceEncoder};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/units")
}

fn reference(name: &str) -> (usize, Vec<f32>) {
    let tensors =
        candle_core::safetensors::load(fixtures().join("reference.safetensors"), &Device::Cpu)
            .unwrap();
    let t = &tensors[name];
    (t.dims()[0], t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
}

/// Relative to max(1, |want|): the planted dense latent sits near 1e4.
fn assert_close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    let worst =
        got.iter().zip(want).map(|(g, w)| (g - w).abs() / w.abs().max(1.0)).fold(0.0f32, f32::max);
    assert!(worst < 1e-5, "{what}: max relative difference {worst}");
}

#[test]
fn sae_latents_match_pytorch_for_relu_topk_and_jumprelu() {
    let (rows, x) = reference("input");
    for (name, activation) in [
        ("sae_relu", Activation::Relu),
        ("sae_topk", Activation::TopK { k: 8 }),
        ("sae_jumprelu", Activation::JumpRelu),
    ] {
        let info = dictionary::inspect(UnitKind::Sae, &fixtures().join(name)).unwrap();
        assert_eq!((info.d_in, info.units, info.activation), (256, 64, activation), "{name}");
        assert!(info.identity.starts_with("blake3:"), "{}", info.identity);
        let encoder = dictionary::load(&info).unwrap();
        let (_, want) = reference(&format!("{name}.latents"));
        assert_close(&encoder.encode(&x), &want, &format!("{name}, reference encoder"));
        let device = DeviceEncoder::new(&encoder, &Device::Cpu).unwrap();
        let got =
            device.encode(&Tensor::from_slice(&x, (rows, 256), &Device::Cpu).unwrap()).unwrap();
        assert_close(
            &got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            &want,
            &format!("{name}, device encoder"),
        );
    }
}

#[test]
fn directions_match_pytorch_and_carry_their_names() {
    let (_, x) = reference("input");
    let info = dictionary::inspect(UnitKind::Direction, &fixtures().join("directions.safetensors"))
        .unwrap();
    assert_eq!((info.d_in, info.units), (256, 4));
    assert_eq!(info.names, ["red things", "stripes", "circles", "sky"]);
    let encoder = dictionary::load(&info).unwrap();
    let (_, want) = reference("directions.latents");
    assert_close(&encoder.encode(&x), &want, "directions");
}

/// A copy of `sae_relu` with its cfg.json edited.
fn edited(edit: impl Fn(&mut serde_json::Value)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let source = fixtures().join("sae_relu");
    std::fs::copy(
        source.join("sae_weights.safetensors"),
        dir.path().join("sae_weights.safetensors"),
    )
    .unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(source.join("cfg.json")).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(dir.path().join("cfg.json"), cfg.to_string()).unwrap();
    dir
}

fn refusal(kind: UnitKind, path: &Path) -> String {
    match dictionary::inspect(kind, path) {
        Err(e) => {
            assert!(e.is_user_error(), "{e}");
            e.to_string()
        }
        Ok(info) => panic!("{} was accepted: {info:?}", path.display()),
    }
}

#[test]
fn dictionaries_dnd_cannot_compute_are_refused_by_name() {
    let unknown = edited(|c| c["activation_fn_str"] = "tanh-relu".into());
    let err = refusal(UnitKind::Sae, unknown.path());
    assert!(err.contains("cfg.json") && err.contains("tanh-relu"), "{err}");
    let gated = edited(|c| c["architecture"] = "gated".into());
    assert!(refusal(UnitKind::Sae, gated.path()).contains("gated"));
    let wrong = edited(|c| c["d_in"] = 128.into());
    let err = refusal(UnitKind::Sae, wrong.path());
    assert!(err.contains("W_enc") && err.contains("128"), "{err}");
    let no_config = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixtures().join("sae_relu/sae_weights.safetensors"),
        no_config.path().join("sae_weights.safetensors"),
    )
    .unwrap();
    assert!(refusal(UnitKind::Sae, no_config.path()).contains("cfg.json"));
    assert!(refusal(UnitKind::Sae, &fixtures().join("missing")).contains("no file"));

    // The layer check: 256 channels read, a layer of 128.
    let info = dictionary::inspect(UnitKind::Sae, &fixtures().join("sae_relu")).unwrap();
    let err = dictionary::check_width(&info, "layer3", 128).unwrap_err();
    assert!(matches!(err, ModelError::Dictionary { .. }));
    let err = err.to_string();
    assert!(
        err.contains("sae_weights.safetensors") && err.contains("256") && err.contains("layer3"),
        "{err}"
    );
    assert!(dictionary::check_width(&info, "layer4", 256).is_ok());
}

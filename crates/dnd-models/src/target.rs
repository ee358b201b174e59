//! The target model: the network being dissected, with its preprocessing, and the taps
//! where its activations are read. ResNets ([`crate::resnet`]) and vision transformers
//! ([`crate::vit`]) are the architectures; the pipeline only sees [`TargetModel`] and
//! [`Tap`].

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use serde::Deserialize;

use crate::checkpoint::ModelRef;
use crate::error::ModelError;
use crate::hf_files::read_json;
use crate::preprocess::{Filter, Preprocess, Resize};
use crate::resnet::{ResNet, ResNetConfig};
pub use crate::tap::Tap;
use crate::vit::{Vit, VitConfig};
use crate::weights::Checkpoint;

/// The architecture of a target model, without its weights.
#[derive(Debug, Clone, PartialEq)]
pub enum Architecture {
    ResNet(ResNetConfig),
    Vit(VitConfig),
}

impl Architecture {
    /// Reads the architecture of the model at `files`: a ViT when its tensors are in a
    /// layout [`crate::vit`] knows, else a ResNet (from config.json, else the tensors).
    fn read(weights: &Path, config: Option<&Path>) -> Result<Self, ModelError> {
        let checkpoint = Checkpoint::open(weights)?;
        let shapes = checkpoint.shapes()?;
        if let Some(vit) = VitConfig::from_shapes(&shapes, config, weights)? {
            return Ok(Architecture::Vit(vit));
        }
        if !looks_like_a_resnet(&shapes) {
            return Err(unknown_architecture(weights, &shapes));
        }
        Ok(Architecture::ResNet(match config {
            Some(path) => ResNetConfig::from_json_file(path)?,
            None => ResNetConfig::from_checkpoint(&checkpoint)?,
        }))
    }

    /// Every tap the model has, in network order.
    pub fn taps(&self) -> Vec<Tap> {
        match self {
            Architecture::ResNet(_) => Tap::RESNET.to_vec(),
            Architecture::Vit(c) => c.taps(),
        }
    }

    /// Number of neurons (channels or units) at a tap the model has.
    pub fn tap_width(&self, tap: Tap) -> usize {
        match self {
            Architecture::ResNet(c) => c.tap_width(tap),
            Architecture::Vit(c) => c.tap_width(tap),
        }
    }

    /// Whether the model has a class token whose value can stand for a whole map
    /// (pooling `cls`).
    pub fn has_class_token(&self) -> bool {
        matches!(self, Architecture::Vit(c) if c.class_token)
    }

    /// Parses a tap name and checks that the model has it.
    pub fn tap(&self, name: &str) -> Result<Tap, ModelError> {
        let taps = self.taps();
        match name.parse::<Tap>() {
            Ok(tap) if taps.contains(&tap) => Ok(tap),
            _ => Err(ModelError::UnknownTap { name: name.into(), available: self.tap_list() }),
        }
    }

    /// The taps, as a message lists them (ranges of blocks shortened).
    fn tap_list(&self) -> String {
        match self {
            Architecture::ResNet(_) => {
                Tap::RESNET.iter().map(Tap::to_string).collect::<Vec<_>>().join(", ")
            }
            Architecture::Vit(c) => c.tap_list(),
        }
    }
}

/// Whether a checkpoint's tensors look like a ResNet at all (a broken one gets the
/// ResNet loader's own message about what it lacks).
fn looks_like_a_resnet(shapes: &HashMap<String, Vec<usize>>) -> bool {
    shapes.keys().any(|k| k == "conv1.weight" || k == "fc.weight" || k.starts_with("layer1."))
}

/// The error for a checkpoint of no architecture dnd knows.
fn unknown_architecture(path: &Path, shapes: &HashMap<String, Vec<usize>>) -> ModelError {
    let mut names: Vec<&String> = shapes.keys().collect();
    names.sort();
    let sample: Vec<String> = names.iter().take(4).map(|n| format!("`{n}`")).collect();
    let found = match names.len() {
        0 => "a checkpoint with no tensors".to_string(),
        n => format!(
            "a checkpoint of {n} tensors ({}, ...) of no architecture dnd knows",
            sample.join(", ")
        ),
    };
    ModelError::BadCheckpoint {
        path: path.into(),
        found,
        expected: format!(
            "a torchvision/timm ResNet ({}) or a vision transformer ({})",
            crate::resnet::EXPECTED_NAMES,
            crate::vit::EXPECTED_LAYOUTS
        ),
        help: "pass a ResNet or ViT checkpoint in one of those layouts; if every name carries a prefix such as `backbone.` or `model.`, re-save the state_dict without it".into(),
    }
}

/// The parts of timm's `pretrained_cfg` that decide preprocessing.
#[derive(Deserialize)]
struct PretrainedCfg {
    input_size: Option<[u32; 3]>,
    crop_pct: Option<f64>,
    crop_mode: Option<String>,
    interpolation: Option<String>,
    mean: Option<[f32; 3]>,
    std: Option<[f32; 3]>,
}

#[derive(Deserialize)]
struct ConfigWithPreprocess {
    pretrained_cfg: Option<PretrainedCfg>,
}

/// The preprocessing a config.json gives in timm's `pretrained_cfg` (timm checkpoints,
/// and dnd's own config.json for torchvision ones), or `None` when it has none.
fn preprocess_from_config(path: &Path) -> Result<Option<Preprocess>, ModelError> {
    let bad = |reason: String| ModelError::Config { path: path.into(), reason };
    let raw: ConfigWithPreprocess = read_json(path)?;
    let Some(cfg) = raw.pretrained_cfg else { return Ok(None) };
    let mut p = Preprocess::imagenet();
    if let Some([_, height, width]) = cfg.input_size {
        if height != width {
            return Err(bad(format!(
                "`pretrained_cfg.input_size` {height}x{width}: only square inputs are supported"
            )));
        }
        p.crop = Some(width);
        // timm: scale_size = floor(img_size / crop_pct)
        let scale = (f64::from(width) / cfg.crop_pct.unwrap_or(0.875)).floor() as u32;
        p.resize = match cfg.crop_mode.as_deref().unwrap_or("center") {
            "center" => Resize::ShorterSide(scale),
            "squash" => Resize::Exact { width: scale, height: scale },
            other => {
                return Err(bad(format!(
                    "`pretrained_cfg.crop_mode` `{other}` is not supported (center, squash)"
                )));
            }
        };
    }
    p.filter = match cfg.interpolation.as_deref() {
        None | Some("bilinear") => Filter::Bilinear,
        Some("bicubic") => Filter::Bicubic,
        Some(other) => {
            return Err(bad(format!(
                "`pretrained_cfg.interpolation` `{other}` is not supported (bilinear, bicubic)"
            )));
        }
    };
    p.mean = cfg.mean.unwrap_or(p.mean);
    p.std = cfg.std.unwrap_or(p.std);
    Ok(Some(p))
}

/// A target model's shape without its weights: its taps and their widths, read from
/// `config.json` or else the checkpoint's tensor shapes. What planning a job needs.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetShape {
    /// The reference it was read from, as given.
    pub reference: String,
    pub architecture: Architecture,
}

impl TargetShape {
    pub fn read(reference: &ModelRef) -> Result<Self, ModelError> {
        let files = reference.resolve("model.safetensors")?;
        let architecture = Architecture::read(&files.weights, files.config.as_deref())?;
        Ok(Self { reference: reference.to_string(), architecture })
    }

    /// Parses a tap name and checks that this model has it.
    pub fn tap(&self, name: &str) -> Result<Tap, ModelError> {
        self.architecture.tap(name)
    }

    pub fn tap_width(&self, tap: Tap) -> usize {
        self.architecture.tap_width(tap)
    }

    /// Whether pooling `cls` is possible (a ViT with a class token).
    pub fn has_class_token(&self) -> bool {
        self.architecture.has_class_token()
    }
}

/// The network of a target model, loaded.
#[derive(Debug, Clone)]
pub enum Network {
    ResNet(ResNet),
    Vit(Vit),
}

/// A loaded target model.
#[derive(Debug, Clone)]
pub struct TargetModel {
    /// The reference it was loaded from, as given (recorded with results).
    pub reference: String,
    pub network: Network,
    pub preprocess: Preprocess,
    pub device: Device,
}

impl TargetModel {
    /// The shape of the loaded model.
    pub fn shape(&self) -> TargetShape {
        TargetShape { reference: self.reference.clone(), architecture: self.architecture() }
    }

    fn architecture(&self) -> Architecture {
        match &self.network {
            Network::ResNet(r) => Architecture::ResNet(r.config().clone()),
            Network::Vit(v) => Architecture::Vit(v.config().clone()),
        }
    }

    /// The ResNet, when the target is one.
    pub fn resnet(&self) -> Option<&ResNet> {
        match &self.network {
            Network::ResNet(r) => Some(r),
            Network::Vit(_) => None,
        }
    }

    /// The vision transformer, when the target is one.
    pub fn vit(&self) -> Option<&Vit> {
        match &self.network {
            Network::Vit(v) => Some(v),
            Network::ResNet(_) => None,
        }
    }

    pub fn load(reference: &ModelRef, device: &Device) -> Result<Self, ModelError> {
        let files = reference.resolve("model.safetensors")?;
        let config = files.config.as_deref();
        let from_config = config.map(preprocess_from_config).transpose()?.flatten();
        let (network, preprocess) = match Architecture::read(&files.weights, config)? {
            Architecture::ResNet(c) => (
                Network::ResNet(ResNet::load(&files.weights, Some(c), device)?),
                from_config.unwrap_or_else(Preprocess::imagenet),
            ),
            Architecture::Vit(c) => {
                let preprocess = match from_config {
                    Some(p) => p,
                    None => c.default_preprocess(&files.weights)?,
                };
                (Network::Vit(Vit::load(&files.weights, c, device)?), preprocess)
            }
        };
        tracing::debug!(model = %reference, architecture = ?network_kind(&network), ?preprocess, "loaded target model");
        Ok(Self { reference: reference.to_string(), network, preprocess, device: device.clone() })
    }

    /// Parses a tap name and checks that this model has it.
    pub fn tap(&self, name: &str) -> Result<Tap, ModelError> {
        self.architecture().tap(name)
    }

    pub fn tap_width(&self, tap: Tap) -> usize {
        match &self.network {
            Network::ResNet(r) => r.tap_width(tap),
            Network::Vit(v) => v.config().tap_width(tap),
        }
    }

    /// Runs a batch `(B, 3, H, W)` and returns each tap's output, in the order asked:
    /// `(B, C, h, w)` maps for spatial taps (a ViT's patch-token grid), `(B, C)` vectors
    /// for the others.
    pub fn forward_taps(&self, batch: &Tensor, taps: &[Tap]) -> Result<Vec<Tensor>, ModelError> {
        match &self.network {
            Network::ResNet(r) => r.forward_taps(batch, taps),
            Network::Vit(v) => v.forward_taps(batch, taps),
        }
    }

    /// Like [`Self::forward_taps`], but every spatial tap gives the class token's value
    /// `(B, C)` instead of the patch grid (pooling `cls`). Only a ViT with a class token
    /// has one.
    pub fn forward_class_tokens(
        &self,
        batch: &Tensor,
        taps: &[Tap],
    ) -> Result<Vec<Tensor>, ModelError> {
        match &self.network {
            Network::Vit(v) if v.config().class_token => v.forward_class_tokens(batch, taps),
            _ => Err(ModelError::NoClassToken { model: self.reference.clone() }),
        }
    }
}

fn network_kind(network: &Network) -> &'static str {
    match network {
        Network::ResNet(_) => "resnet",
        Network::Vit(_) => "vit",
    }
}

//! The target model: the network being dissected, with its preprocessing.

use std::path::Path;

use candle_core::{Device, Tensor};
use serde::Deserialize;

use crate::checkpoint::ModelRef;
use crate::error::ModelError;
use crate::hf_files::read_json;
use crate::preprocess::{Preprocess, Resize};
use crate::resnet::{ResNet, ResNetConfig, Tap};
use crate::weights::Checkpoint;

/// A loaded target model. Only the ResNet family for now; the taps API is what the
/// pipeline relies on, so more architectures slot in here.
#[derive(Debug, Clone)]
pub struct TargetModel {
    /// The reference it was loaded from, as given (recorded with results).
    pub reference: String,
    pub resnet: ResNet,
    pub preprocess: Preprocess,
    pub device: Device,
}

/// The parts of timm's `pretrained_cfg` that decide preprocessing.
#[derive(Deserialize)]
struct PretrainedCfg {
    input_size: Option<[u32; 3]>,
    crop_pct: Option<f64>,
    mean: Option<[f32; 3]>,
    std: Option<[f32; 3]>,
}

#[derive(Deserialize)]
struct ConfigWithPreprocess {
    pretrained_cfg: Option<PretrainedCfg>,
}

fn preprocess_from_config(path: &Path) -> Result<Preprocess, ModelError> {
    let raw: ConfigWithPreprocess = read_json(path)?;
    let mut p = Preprocess::imagenet();
    if let Some(cfg) = raw.pretrained_cfg {
        if let Some([_, _, side]) = cfg.input_size {
            p.crop = Some(side);
            // timm: scale_size = floor(img_size / crop_pct)
            p.resize = Resize::ShorterSide(
                (f64::from(side) / cfg.crop_pct.unwrap_or(0.875)).floor() as u32,
            );
        }
        p.mean = cfg.mean.unwrap_or(p.mean);
        p.std = cfg.std.unwrap_or(p.std);
    }
    Ok(p)
}

/// A target model's shape without its weights: its taps and their widths, read from
/// `config.json` or else the checkpoint's tensor shapes. What planning a job needs.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetShape {
    /// The reference it was read from, as given.
    pub reference: String,
    config: ResNetConfig,
}

impl TargetShape {
    pub fn read(reference: &ModelRef) -> Result<Self, ModelError> {
        let files = reference.resolve("model.safetensors")?;
        let config = match &files.config {
            Some(path) => ResNetConfig::from_json_file(path)?,
            None => ResNetConfig::from_checkpoint(&Checkpoint::open(&files.weights)?)?,
        };
        Ok(Self { reference: reference.to_string(), config })
    }

    /// Parses and checks a tap name against this model.
    pub fn tap(&self, name: &str) -> Result<Tap, ModelError> {
        name.parse()
    }

    pub fn tap_width(&self, tap: Tap) -> usize {
        self.config.tap_width(tap)
    }
}

impl TargetModel {
    /// The shape of the loaded model.
    pub fn shape(&self) -> TargetShape {
        TargetShape { reference: self.reference.clone(), config: self.resnet.config().clone() }
    }

    pub fn load(reference: &ModelRef, device: &Device) -> Result<Self, ModelError> {
        let files = reference.resolve("model.safetensors")?;
        let (config, preprocess) = match &files.config {
            Some(path) => {
                (Some(ResNetConfig::from_json_file(path)?), preprocess_from_config(path)?)
            }
            None => (None, Preprocess::imagenet()),
        };
        let resnet = ResNet::load(&files.weights, config, device)?;
        tracing::debug!(model = %reference, config = ?resnet.config(), "loaded target model");
        Ok(Self { reference: reference.to_string(), resnet, preprocess, device: device.clone() })
    }

    /// Parses and checks a tap name against this model.
    pub fn tap(&self, name: &str) -> Result<Tap, ModelError> {
        name.parse()
    }

    pub fn tap_width(&self, tap: Tap) -> usize {
        self.resnet.tap_width(tap)
    }

    pub fn forward_taps(&self, batch: &Tensor, taps: &[Tap]) -> Result<Vec<Tensor>, ModelError> {
        self.resnet.forward_taps(batch, taps)
    }
}

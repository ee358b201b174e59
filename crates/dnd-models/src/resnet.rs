//! ResNet (He et al. 2016) with activation taps, in torchvision's layout.
//!
//! Tensor names are torchvision's `state_dict` names (`conv1.weight`, `bn1.running_mean`,
//! `layer1.0.conv1.weight`, `layer2.0.downsample.0.weight`, `fc.weight`, ...), which timm's
//! classic ResNets (`timm/resnet50.tv_in1k`) share. candle-transformers' ResNet returns an
//! opaque function; dissection needs the intermediate layers, hence this file.
//!
//! BatchNorm runs in eval mode only, so it is folded into the preceding convolution at
//! load time: one fewer pass over every activation map.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{D, DType, Device, Module, Tensor};
use serde::{Deserialize, Serialize};

use crate::conv::{ConvGeometry, conv2d_fused};
use crate::error::ModelError;
use crate::hf_files::read_json;
pub use crate::tap::Tap;
use crate::weights::Checkpoint;
use crate::winograd::{self, WinogradKernel};

/// A ResNet's tensor names, for messages.
pub const EXPECTED_NAMES: &str = "`conv1.weight`, `bn1.*`, `layer1.0.conv1.weight` ... `fc.weight`";

/// torchvision's BatchNorm2d default.
const BN_EPS: f64 = 1e-5;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BlockKind {
    /// Two 3x3 convolutions (ResNet-18/34).
    Basic,
    /// 1x1, 3x3, 1x1 with 4x expansion (ResNet-50/101/152).
    Bottleneck,
}

impl BlockKind {
    pub fn expansion(self) -> usize {
        match self {
            BlockKind::Basic => 1,
            BlockKind::Bottleneck => 4,
        }
    }
}

/// A ResNet's shape, mirroring the `config.json` beside a checkpoint. Either a timm-style
/// file naming a standard `architecture` (`resnet18` .. `resnet152`), or a custom shape:
/// `{"architecture": "resnet", "block": "bottleneck", "layers": [1,2,1,1],
///   "widths": [8,16,32,64], "stem_channels": 8, "num_classes": 10}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResNetConfig {
    pub block: BlockKind,
    /// Blocks per stage (`layer1`..`layer4`).
    pub layers: [usize; 4],
    /// torchvision's `planes` per stage; a stage outputs `widths[i] * expansion` channels.
    pub widths: [usize; 4],
    /// Output channels of the stem convolution.
    pub stem_channels: usize,
    /// Grouped 3x3 convolutions (ResNeXt); 1 for plain ResNets.
    pub groups: usize,
    /// Bottleneck inner width per group at 64 planes (torchvision's `width_per_group`).
    pub width_per_group: usize,
    pub num_classes: usize,
}

impl ResNetConfig {
    /// The torchvision architectures by name.
    pub fn standard(name: &str) -> Option<Self> {
        let (block, layers) = match name {
            "resnet18" => (BlockKind::Basic, [2, 2, 2, 2]),
            "resnet34" => (BlockKind::Basic, [3, 4, 6, 3]),
            "resnet50" => (BlockKind::Bottleneck, [3, 4, 6, 3]),
            "resnet101" => (BlockKind::Bottleneck, [3, 4, 23, 3]),
            "resnet152" => (BlockKind::Bottleneck, [3, 8, 36, 3]),
            _ => return None,
        };
        Some(Self {
            block,
            layers,
            widths: [64, 128, 256, 512],
            stem_channels: 64,
            groups: 1,
            width_per_group: 64,
            num_classes: 1000,
        })
    }

    /// Reads a `config.json`: a standard `architecture`, optionally with `num_classes`, or a
    /// custom shape (`architecture: "resnet"` with `block`, `layers`, ...).
    pub fn from_json_file(path: &Path) -> Result<Self, ModelError> {
        let bad = |reason: String| ModelError::Config { path: path.into(), reason };
        let raw: RawConfig = read_json(path)?;
        let arch = raw.architecture.as_deref().unwrap_or("resnet");
        let mut config = match Self::standard(arch) {
            Some(c) => c,
            None if arch == "resnet" => {
                let missing = |field: &str| {
                    bad(format!("a custom ResNet (`architecture: \"resnet\"`) needs `{field}`"))
                };
                Self {
                    block: raw.block.ok_or_else(|| missing("block"))?,
                    layers: raw.layers.ok_or_else(|| missing("layers"))?,
                    widths: raw.widths.unwrap_or([64, 128, 256, 512]),
                    stem_channels: raw.stem_channels.unwrap_or(64),
                    groups: 1,
                    width_per_group: 64,
                    num_classes: 1000,
                }
            }
            None => {
                return Err(bad(format!(
                    "architecture `{arch}` is not a ResNet this build knows (resnet18, resnet34, resnet50, resnet101, resnet152, or `resnet` with an explicit shape)"
                )));
            }
        };
        if let Some(n) = raw.num_classes {
            config.num_classes = n;
        }
        if let Some(g) = raw.groups {
            config.groups = g;
        }
        if let Some(w) = raw.width_per_group {
            config.width_per_group = w;
        }
        config.validate().map_err(bad)?;
        Ok(config)
    }

    /// Reads the shape off a torchvision `state_dict`: what a user has after
    /// `safetensors.torch.save_file(model.state_dict(), ...)` without any config file.
    pub fn infer(tensors: &HashMap<String, Tensor>) -> Result<Self, String> {
        let shapes: HashMap<String, Vec<usize>> =
            tensors.iter().map(|(name, t)| (name.clone(), t.dims().to_vec())).collect();
        Self::infer_from_shapes(&shapes)
    }

    /// Reads the shape off a checkpoint's tensor shapes, without reading the weights.
    pub fn from_checkpoint(checkpoint: &Checkpoint) -> Result<Self, ModelError> {
        let shapes = checkpoint.shapes()?;
        Self::infer_from_shapes(&shapes)
            .map_err(|reason| not_a_resnet(checkpoint.path(), &reason, shapes.keys()))
    }

    /// [`Self::infer`] from tensor names and shapes.
    pub fn infer_from_shapes(tensors: &HashMap<String, Vec<usize>>) -> Result<Self, String> {
        let dims = |name: &str| -> Result<Vec<usize>, String> {
            tensors.get(name).cloned().ok_or_else(|| {
                format!("it has no tensor `{name}`; is it a torchvision/timm ResNet state_dict?")
            })
        };
        let block = if tensors.contains_key("layer1.0.conv3.weight") {
            BlockKind::Bottleneck
        } else {
            BlockKind::Basic
        };
        let mut layers = [0; 4];
        let mut widths = [0; 4];
        let mut inner = 0;
        let mut groups = 1;
        for stage in 0..4 {
            while tensors.contains_key(&format!(
                "layer{}.{}.conv1.weight",
                stage + 1,
                layers[stage]
            )) {
                layers[stage] += 1;
            }
            if layers[stage] == 0 {
                return Err(format!("it has no `layer{}.0.conv1.weight`", stage + 1));
            }
            let prefix = format!("layer{}.0", stage + 1);
            widths[stage] = match block {
                BlockKind::Basic => dims(&format!("{prefix}.conv2.weight"))?[0],
                BlockKind::Bottleneck => dims(&format!("{prefix}.conv3.weight"))?[0] / 4,
            };
            if stage == 0 && block == BlockKind::Bottleneck {
                inner = dims(&format!("{prefix}.conv1.weight"))?[0];
                groups = inner / dims(&format!("{prefix}.conv2.weight"))?[1];
            }
        }
        let width_per_group =
            if block == BlockKind::Bottleneck { inner * 64 / (widths[0] * groups) } else { 64 };
        let config = Self {
            block,
            layers,
            widths,
            stem_channels: dims("conv1.weight")?[0],
            groups,
            width_per_group,
            num_classes: dims("fc.weight")?[0],
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), String> {
        if self.layers.contains(&0) || self.widths.contains(&0) || self.stem_channels == 0 {
            return Err("layers, widths and stem_channels must be positive".into());
        }
        if self.num_classes == 0 || self.groups == 0 || self.width_per_group == 0 {
            return Err("num_classes, groups and width_per_group must be positive".into());
        }
        if self.block == BlockKind::Basic && (self.groups != 1 || self.width_per_group != 64) {
            return Err("basic blocks support only groups = 1 and width_per_group = 64".into());
        }
        Ok(())
    }

    /// Output channels of a stage (0-based).
    pub fn stage_channels(&self, stage: usize) -> usize {
        self.widths[stage] * self.block.expansion()
    }

    /// Number of neurons (channels or units) at a tap.
    pub fn tap_width(&self, tap: Tap) -> usize {
        match tap {
            Tap::Stem => self.stem_channels,
            Tap::Layer(i) => self.stage_channels(i as usize - 1),
            Tap::AvgPool => self.stage_channels(3),
            Tap::Fc => self.num_classes,
            // Not a ResNet tap: `TargetShape::tap` never lets one through.
            Tap::Block(_) | Tap::BlockMlp(_) | Tap::Norm | Tap::Head => 0,
        }
    }

    fn bottleneck_inner(&self, stage: usize) -> usize {
        self.widths[stage] * self.width_per_group / 64 * self.groups
    }
}

#[derive(Deserialize)]
struct RawConfig {
    architecture: Option<String>,
    block: Option<BlockKind>,
    layers: Option<[usize; 4]>,
    widths: Option<[usize; 4]>,
    stem_channels: Option<usize>,
    groups: Option<usize>,
    width_per_group: Option<usize>,
    num_classes: Option<usize>,
}

/// A convolution with its BatchNorm folded in: `conv(x, w * s) + (beta - mean * s)`,
/// `s = gamma / sqrt(var + eps)`.
#[derive(Debug, Clone)]
struct ConvBn {
    weight: Tensor,
    bias: Tensor,
    stride: usize,
    padding: usize,
    groups: usize,
    /// The Winograd form of the kernel, for 3x3/1 convolutions on the CPU in f32.
    winograd: Option<Arc<WinogradKernel>>,
}

/// Fewest input and output channels for which a 3x3/1 convolution uses Winograd
/// F(2x2, 3x3). Measured with `dnd probe` on ResNet-18 (200 images, 2 threads): from 64
/// channels (all 3x3/1 convolutions) the probe ran 12% faster than direct; from 128 (not
/// layer1) no faster than direct.
const WINOGRAD_MIN_CHANNELS: usize = 64;

impl ConvBn {
    /// `conv(x) + bias [+ residual]`, then ReLU when `relu`.
    fn forward(
        &self,
        x: &Tensor,
        residual: Option<&Tensor>,
        relu: bool,
    ) -> candle_core::Result<Tensor> {
        let g = ConvGeometry {
            stride: self.stride,
            padding: self.padding,
            groups: self.groups,
            upsample: false,
        };
        match &self.winograd {
            Some(kernel) => winograd::conv3x3(x, kernel, &self.bias, residual, false, relu),
            None => conv2d_fused(x, &self.weight, &self.bias, residual, relu, g),
        }
    }
}

#[derive(Debug, Clone)]
struct Block {
    convs: Vec<ConvBn>,
    downsample: Option<ConvBn>,
}

impl Block {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let shortcut = match &self.downsample {
            Some(d) => d.forward(x, None, false)?,
            None => x.clone(),
        };
        let (last, inner) = self.convs.split_last().expect("a block has convolutions");
        let mut y = x.clone();
        for conv in inner {
            y = conv.forward(&y, None, true)?;
        }
        // The residual and the block's ReLU ride along with the last convolution.
        last.forward(&y, Some(&shortcut), true)
    }
}

/// A loaded ResNet, ready for inference with taps.
#[derive(Debug, Clone)]
pub struct ResNet {
    config: ResNetConfig,
    stem: ConvBn,
    stages: [Vec<Block>; 4],
    fc_weight: Tensor,
    fc_bias: Tensor,
}

/// The error for tensors that are not a torchvision/timm ResNet's: what the file has
/// (a few of its names), what dnd expected, what to do.
fn not_a_resnet<'a>(
    path: &Path,
    reason: &str,
    names: impl Iterator<Item = &'a String>,
) -> ModelError {
    let mut names: Vec<&String> = names.collect();
    names.sort();
    let count = names.len();
    let sample: Vec<String> = names.iter().take(4).map(|n| format!("`{n}`")).collect();
    let found = match count {
        0 => "a checkpoint with no tensors".to_string(),
        _ => format!("a checkpoint of {count} tensors ({}, ...): {reason}", sample.join(", ")),
    };
    ModelError::BadCheckpoint {
        path: path.into(),
        found,
        expected: format!("a torchvision/timm ResNet state_dict: {EXPECTED_NAMES}"),
        help: "pass a ResNet checkpoint with torchvision's tensor names (Hugging Face `microsoft/resnet-*` checkpoints use another layout); if every name carries a prefix such as `backbone.`, re-save the state_dict without it".into(),
    }
}

/// Builds the model from named tensors, checking every shape.
struct Loader<'a> {
    tensors: &'a HashMap<String, Tensor>,
    path: &'a Path,
    device: &'a Device,
}

impl Loader<'_> {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor, ModelError> {
        let t = self.tensors.get(name).ok_or_else(|| {
            not_a_resnet(self.path, &format!("it has no tensor `{name}`"), self.tensors.keys())
        })?;
        if t.dims() != shape {
            return Err(ModelError::BadCheckpoint {
                path: self.path.into(),
                found: format!("a checkpoint whose tensor `{name}` has shape {:?}", t.dims()),
                expected: format!("{shape:?} for `{name}` in the architecture config.json names"),
                help: "make config.json match the weights, or remove it: without one the shape is read off the weights".into(),
            });
        }
        Ok(t.to_dtype(DType::F32)?.to_device(self.device)?)
    }

    fn conv_bn(
        &self,
        conv: &str,
        bn: &str,
        shape: [usize; 4],
        stride: usize,
        padding: usize,
        groups: usize,
    ) -> Result<ConvBn, ModelError> {
        let out = shape[0];
        let weight = self.get(&format!("{conv}.weight"), &shape)?;
        let gamma = self.get(&format!("{bn}.weight"), &[out])?;
        let beta = self.get(&format!("{bn}.bias"), &[out])?;
        let mean = self.get(&format!("{bn}.running_mean"), &[out])?;
        let var = self.get(&format!("{bn}.running_var"), &[out])?;
        // Fold in f64 so the folded weights carry no more rounding than PyTorch's own BN.
        let scale =
            (gamma.to_dtype(DType::F64)? / (var.to_dtype(DType::F64)? + BN_EPS)?.sqrt()?)?;
        let weight = weight
            .to_dtype(DType::F64)?
            .broadcast_mul(&scale.reshape((out, 1, 1, 1))?)?
            .to_dtype(DType::F32)?;
        let bias = (beta.to_dtype(DType::F64)? - (mean.to_dtype(DType::F64)? * &scale)?)?
            .to_dtype(DType::F32)?;
        let winograd = if (shape[2], shape[3], stride, padding, groups) == (3, 3, 1, 1, 1)
            && shape[0].min(shape[1]) >= WINOGRAD_MIN_CHANNELS
            && matches!(weight.device(), Device::Cpu)
        {
            Some(Arc::new(WinogradKernel::new(&weight)?))
        } else {
            None
        };
        Ok(ConvBn { weight, bias, stride, padding, groups, winograd })
    }
}

impl ResNet {
    /// Loads a torchvision/timm ResNet from any checkpoint [`Checkpoint`] reads. The shape
    /// comes from `config` when given (config.json), else it is read off the tensor shapes.
    pub fn load(
        weights: &Path,
        config: Option<ResNetConfig>,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let tensors = Checkpoint::open(weights)?.load(&Device::Cpu)?;
        let config = match config {
            Some(c) => c,
            None => ResNetConfig::infer(&tensors)
                .map_err(|reason| not_a_resnet(weights, &reason, tensors.keys()))?,
        };
        Self::from_tensors(&tensors, config, weights, device)
    }

    pub fn from_tensors(
        tensors: &HashMap<String, Tensor>,
        config: ResNetConfig,
        path: &Path,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let l = Loader { tensors, path, device };
        let stem = l.conv_bn("conv1", "bn1", [config.stem_channels, 3, 7, 7], 2, 3, 1)?;
        let mut in_ch = config.stem_channels;
        let mut stages: [Vec<Block>; 4] = Default::default();
        for (s, stage) in stages.iter_mut().enumerate() {
            let out_ch = config.stage_channels(s);
            for b in 0..config.layers[s] {
                let stride = if s > 0 && b == 0 { 2 } else { 1 };
                let p = format!("layer{}.{b}", s + 1);
                let conv =
                    |i: usize, shape: [usize; 4], stride: usize, padding: usize, groups: usize| {
                        l.conv_bn(
                            &format!("{p}.conv{i}"),
                            &format!("{p}.bn{i}"),
                            shape,
                            stride,
                            padding,
                            groups,
                        )
                    };
                let convs = match config.block {
                    BlockKind::Basic => vec![
                        conv(1, [out_ch, in_ch, 3, 3], stride, 1, 1)?,
                        conv(2, [out_ch, out_ch, 3, 3], 1, 1, 1)?,
                    ],
                    BlockKind::Bottleneck => {
                        let inner = config.bottleneck_inner(s);
                        let g = config.groups;
                        vec![
                            conv(1, [inner, in_ch, 1, 1], 1, 0, 1)?,
                            // torchvision v1.5: the stride sits on the 3x3 convolution.
                            conv(2, [inner, inner / g, 3, 3], stride, 1, g)?,
                            conv(3, [out_ch, inner, 1, 1], 1, 0, 1)?,
                        ]
                    }
                };
                let downsample = if stride != 1 || in_ch != out_ch {
                    Some(l.conv_bn(
                        &format!("{p}.downsample.0"),
                        &format!("{p}.downsample.1"),
                        [out_ch, in_ch, 1, 1],
                        stride,
                        0,
                        1,
                    )?)
                } else {
                    None
                };
                stage.push(Block { convs, downsample });
                in_ch = out_ch;
            }
        }
        let fc_weight = l.get("fc.weight", &[config.num_classes, in_ch])?;
        let fc_bias = l.get("fc.bias", &[config.num_classes])?;
        Ok(Self { config, stem, stages, fc_weight, fc_bias })
    }

    pub fn config(&self) -> &ResNetConfig {
        &self.config
    }

    /// Number of neurons (channels or units) at a tap.
    pub fn tap_width(&self, tap: Tap) -> usize {
        self.config.tap_width(tap)
    }

    /// Runs a batch `(B, 3, H, W)` and returns the output of each requested tap, in the
    /// order asked: `(B, C, h, w)` for spatial taps, `(B, C)` for `avgpool` and `fc`.
    /// Stops after the deepest tap asked for.
    pub fn forward_taps(&self, x: &Tensor, taps: &[Tap]) -> Result<Vec<Tensor>, ModelError> {
        let available = || Tap::RESNET.iter().map(Tap::to_string).collect::<Vec<_>>().join(", ");
        if let Some(bad) = taps.iter().find(|t| !Tap::RESNET.contains(t)) {
            return Err(ModelError::UnknownTap { name: bad.to_string(), available: available() });
        }
        let deepest = taps.iter().copied().max().ok_or_else(|| ModelError::UnknownTap {
            name: String::new(),
            available: available(),
        })?;
        let mut seen: HashMap<Tap, Tensor> = HashMap::new();
        let mut keep = |tap: Tap, t: &Tensor| {
            if taps.contains(&tap) {
                seen.insert(tap, t.clone());
            }
        };
        let mut h = self.stem.forward(x, None, true)?;
        // 3x3/2 max-pool with padding 1; zero padding equals -inf padding after a ReLU.
        h = h
            .pad_with_zeros(D::Minus1, 1, 1)?
            .pad_with_zeros(D::Minus2, 1, 1)?
            .max_pool2d_with_stride(3, 2)?;
        keep(Tap::Stem, &h);
        for (s, stage) in self.stages.iter().enumerate() {
            let tap = Tap::Layer(s as u8 + 1);
            if deepest < tap {
                break;
            }
            for block in stage {
                h = block.forward(&h)?;
            }
            keep(tap, &h);
        }
        if deepest >= Tap::AvgPool {
            let pooled = h.mean(D::Minus1)?.mean(D::Minus1)?;
            keep(Tap::AvgPool, &pooled);
            if deepest == Tap::Fc {
                // Image by image: a batched GEMM sums in an order that depends on the batch
                // size, and an image's logits must not depend on its batch (caches).
                let w = self.fc_weight.t()?;
                let rows = (0..pooled.dim(0)?)
                    .map(|i| pooled.narrow(0, i, 1)?.matmul(&w))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                let logits = Tensor::cat(&rows, 0)?.broadcast_add(&self.fc_bias)?;
                keep(Tap::Fc, &logits);
            }
        }
        Ok(taps.iter().map(|t| seen[t].clone()).collect())
    }
}

impl Module for ResNet {
    /// Plain classification: logits.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_taps(x, &[Tap::Fc])
            .map(|mut v| v.remove(0))
            .map_err(|e| candle_core::Error::Msg(e.to_string()))
    }
}

#[cfg(test)]
mod tests;

//! Vision transformers (Dosovitskiy et al. 2021) as targets, in the checkpoint layouts
//! people have: torchvision (`vit_b_16`, `vit_l_16`, ...), timm (`vit_*_patch16_*`, its
//! CLIP towers and DINOv2 ports, register tokens), the Hugging Face CLIP image tower
//! (`CLIPModel`, `CLIPVisionModel[WithProjection]`, OpenCLIP models in that format) and
//! Hugging Face DINOv2 (with or without registers). `layout` maps each layout's tensor
//! names onto one pre-norm transformer; the architecture is read off the tensor shapes,
//! with config.json for what shapes cannot say (heads, activation).
//!
//! Taps: `blocks.N` (the residual stream after block N), `blocks.N.mlp` (the MLP's hidden
//! layer after its activation), `norm` (the final norm over every token) and `head`. A
//! token tap's map is its patch tokens as a `(C, H/p, W/p)` grid, the class and register
//! tokens left out, so pooling and attention crops treat it like a convolution's map;
//! [`Vit::forward_class_tokens`] reads the class token instead (pooling `cls`).
//!
//! Images of another size than the checkpoint's get their position table resampled to
//! the new grid, bicubically, as transformers' `interpolate_pos_encoding` does.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::ModelError;
use crate::preprocess::Preprocess;
use crate::tap::Tap;
use crate::transformer::Activation;
use crate::weights::Checkpoint;

mod cpu;
mod layout;
mod params;
mod portable;
mod positions;
mod shape;
#[cfg(test)]
mod tests;

pub use layout::{EXPECTED_LAYOUTS, VitLayout};
use params::{CpuParams, HostTensor, Params};

/// What the classifier head reads from the final tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HeadInput {
    /// The class token (torchvision, timm `global_pool="token"`, CLIP).
    ClassToken,
    /// The mean of the patch tokens (timm `global_pool="avg"`).
    PatchMean,
    /// Both, concatenated (transformers' `Dinov2ForImageClassification`).
    ClassTokenAndPatchMean,
}

/// The classifier or projection head.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeadConfig {
    pub outputs: usize,
    pub input: HeadInput,
    /// A norm between the pooling and the linear layer (timm's `fc_norm`).
    pub norm: bool,
}

/// A ViT's shape, whatever the layout: what config.json and the tensor shapes say.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VitConfig {
    pub layout: VitLayout,
    /// A prefix every tensor name carries (`dinov2.` in `Dinov2ForImageClassification`).
    pub prefix: String,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub mlp_size: usize,
    pub patch_size: usize,
    /// The patch grid (rows, columns) the position table is for.
    pub grid: (usize, usize),
    pub class_token: bool,
    pub register_tokens: usize,
    /// How many of the leading (class, register) tokens have a row in the position table.
    pub positioned_prefix: usize,
    /// Whether the position table is resampled with antialiasing for another input size
    /// (timm's `resample_abs_pos_embed` and transformers' DINOv2 with registers do; its
    /// CLIP and plain DINOv2 do not).
    pub antialias_positions: bool,
    /// A norm before the first block (CLIP's `pre_layrnorm`, timm's `norm_pre`).
    pub pre_norm: bool,
    /// A norm over every token after the last block.
    pub final_norm: bool,
    pub layer_scale: bool,
    pub activation: Activation,
    pub layer_norm_eps: f64,
    pub head: Option<HeadConfig>,
}

impl VitConfig {
    /// Reads a ViT's shape off a checkpoint's tensor shapes (and config.json, when
    /// given); `None` when the tensors are in no ViT layout.
    pub fn from_shapes(
        shapes: &std::collections::HashMap<String, Vec<usize>>,
        config: Option<&Path>,
        weights: &Path,
    ) -> Result<Option<Self>, ModelError> {
        shape::infer(shapes, config, weights)
    }

    /// Tokens before the patches: the class token, then the registers.
    pub fn prefix_tokens(&self) -> usize {
        usize::from(self.class_token) + self.register_tokens
    }

    /// Every tap, in network order.
    pub fn taps(&self) -> Vec<Tap> {
        let mut taps = Vec::with_capacity(2 * self.num_layers + 2);
        for i in 0..self.num_layers as u16 {
            taps.push(Tap::Block(i));
            taps.push(Tap::BlockMlp(i));
        }
        if self.final_norm {
            taps.push(Tap::Norm);
        }
        if self.head.is_some() {
            taps.push(Tap::Head);
        }
        taps
    }

    /// The taps as a message lists them.
    pub fn tap_list(&self) -> String {
        let last = self.num_layers.saturating_sub(1);
        let mut list = format!(
            "blocks.0 .. blocks.{last}, blocks.0.mlp .. blocks.{last}.mlp (also spelled encoder.layers.N)"
        );
        if self.final_norm {
            list.push_str(", norm");
        }
        if self.head.is_some() {
            list.push_str(", head");
        }
        list
    }

    /// Neurons at a tap this model has.
    pub fn tap_width(&self, tap: Tap) -> usize {
        match tap {
            Tap::BlockMlp(_) => self.mlp_size,
            Tap::Head => self.head.as_ref().map_or(0, |h| h.outputs),
            _ => self.hidden_size,
        }
    }

    /// Blocks to run for `taps`: up to the deepest block asked for, all of them for
    /// `norm` and `head`.
    fn depth(&self, taps: &[Tap]) -> usize {
        taps.iter()
            .map(|t| match t {
                Tap::Block(i) | Tap::BlockMlp(i) => *i as usize + 1,
                _ => self.num_layers,
            })
            .max()
            .unwrap_or(0)
    }

    /// The preprocessing of a checkpoint whose config.json has no timm `pretrained_cfg`:
    /// a `preprocessor_config.json` beside the weights, else the layout's usual one.
    pub fn default_preprocess(&self, weights: &Path) -> Result<Preprocess, ModelError> {
        let hf = weights.parent().map(|d| d.join("preprocessor_config.json"));
        if let Some(path) = hf.filter(|p| p.is_file()) {
            return Preprocess::from_hf_config(&path);
        }
        let p = shape::usual_preprocess(self);
        tracing::warn!(
            weights = %weights.display(),
            ?p,
            "no preprocessing config beside the ViT checkpoint (config.json `pretrained_cfg` or preprocessor_config.json); using the {} default",
            self.layout
        );
        Ok(p)
    }
}

/// Where a token tap's value is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Readout {
    /// The patch tokens as a `(C, rows, cols)` grid.
    Grid,
    /// The class token, `(C)`.
    ClassToken,
}

/// The weights, where they live: on the host for the CPU path, else as device tensors.
#[derive(Clone)]
enum Weights {
    Host(Arc<CpuParams>),
    Device(Arc<Params<Tensor>>),
}

/// A loaded vision transformer, ready for inference with taps.
#[derive(Clone)]
pub struct Vit {
    config: VitConfig,
    weights: Weights,
    /// The patch rows of the position table, kept on the host for resampling.
    positions: Arc<HostTensor>,
    device: Device,
}

impl fmt::Debug for Vit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vit").field("config", &self.config).field("device", &self.device).finish()
    }
}

impl Vit {
    /// Loads a ViT of shape `config` (see [`VitConfig::from_shapes`]) from any
    /// checkpoint [`Checkpoint`] reads, checking every tensor's shape.
    pub fn load(weights: &Path, config: VitConfig, device: &Device) -> Result<Self, ModelError> {
        let tensors = Checkpoint::open(weights)?.load(&Device::Cpu)?;
        let host = layout::load(&tensors, &config, weights)?;
        Self::from_params(config, host, device)
    }

    fn from_params(
        config: VitConfig,
        host: Params<HostTensor>,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let positions = Arc::new(host.pos_grid.clone());
        let weights = match device {
            Device::Cpu => Weights::Host(Arc::new(CpuParams::new(host))),
            _ => Weights::Device(Arc::new(host.to_tensors(device)?)),
        };
        Ok(Self { config, weights, positions, device: device.clone() })
    }

    pub fn config(&self) -> &VitConfig {
        &self.config
    }

    /// Runs a batch `(B, 3, H, W)` and returns each tap's output, in the order asked:
    /// `(B, C, H/p, W/p)` patch grids for token taps, `(B, K)` for `head`. Stops after
    /// the deepest block needed.
    pub fn forward_taps(&self, x: &Tensor, taps: &[Tap]) -> Result<Vec<Tensor>, ModelError> {
        self.forward(x, taps, Readout::Grid)
    }

    /// Like [`Self::forward_taps`], with each token tap's class token `(B, C)` instead of
    /// its patch grid.
    pub fn forward_class_tokens(
        &self,
        x: &Tensor,
        taps: &[Tap],
    ) -> Result<Vec<Tensor>, ModelError> {
        if !self.config.class_token {
            return Err(ModelError::NoClassToken {
                model: format!("this {} ViT", self.config.layout),
            });
        }
        self.forward(x, taps, Readout::ClassToken)
    }

    fn forward(
        &self,
        x: &Tensor,
        taps: &[Tap],
        readout: Readout,
    ) -> Result<Vec<Tensor>, ModelError> {
        self.check(x, taps)?;
        match &self.weights {
            Weights::Host(host) if x.dtype() == DType::F32 && matches!(x.device(), Device::Cpu) => {
                let (_, _, h, w) = x.dims4()?;
                let positions =
                    self.grid_positions(h / self.config.patch_size, w / self.config.patch_size);
                cpu::forward(&self.config, host, &positions, x, taps, readout)
            }
            Weights::Host(host) => {
                portable::forward(self, &host.to_tensors(x.device())?, x, taps, readout)
            }
            Weights::Device(params) => portable::forward(self, params, x, taps, readout),
        }
    }

    /// The device-generic forward pass (candle's ops; what CUDA runs), on whatever device
    /// `x` is. Public so that tests can hold it to PyTorch on the CPU too.
    pub fn forward_taps_portable(
        &self,
        x: &Tensor,
        taps: &[Tap],
    ) -> Result<Vec<Tensor>, ModelError> {
        self.check(x, taps)?;
        match &self.weights {
            Weights::Host(host) => {
                portable::forward(self, &host.to_tensors(x.device())?, x, taps, Readout::Grid)
            }
            Weights::Device(params) => portable::forward(self, params, x, taps, Readout::Grid),
        }
    }

    fn check(&self, x: &Tensor, taps: &[Tap]) -> Result<(), ModelError> {
        let have = self.config.taps();
        if let Some(bad) = taps.iter().find(|t| !have.contains(t)) {
            return Err(ModelError::UnknownTap {
                name: bad.to_string(),
                available: self.config.tap_list(),
            });
        }
        if taps.is_empty() {
            return Err(ModelError::UnknownTap {
                name: String::new(),
                available: self.config.tap_list(),
            });
        }
        let (_, c, h, w) = x.dims4()?;
        let p = self.config.patch_size;
        if c != 3 || h < p || w < p {
            return Err(candle_core::Error::Msg(format!(
                "a ViT with {p}x{p} patches needs (B, 3, H, W) images of at least {p}x{p} pixels, got {:?}",
                x.dims()
            ))
            .into());
        }
        Ok(())
    }

    /// The patch rows of the position table for a `rows x cols` grid `(rows*cols, C)`:
    /// the checkpoint's own, or resampled.
    pub(crate) fn grid_positions(&self, rows: usize, cols: usize) -> Vec<f32> {
        let (r0, c0) = self.config.grid;
        if (rows, cols) == (r0, c0) {
            return self.positions.data.clone();
        }
        positions::resample(
            &self.positions.data,
            self.config.hidden_size,
            (r0, c0),
            (rows, cols),
            self.config.antialias_positions,
        )
    }
}

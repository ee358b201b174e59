//! The checkpoint layouts of vision transformers: how each names its tensors, and how
//! its weights become [`Params`] (its shape is read in [`super::shape`]).

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use super::params::{BlockParams, HeadParams, HostTensor, Norm, Params};
use super::{HeadInput, VitConfig};
use crate::error::ModelError;

/// The layouts, for messages.
pub const EXPECTED_LAYOUTS: &str = "torchvision `conv_proj.weight`, `encoder.layers.encoder_layer_N.*`; timm `patch_embed.proj.weight`, `blocks.N.*`; Hugging Face CLIP `vision_model.embeddings.*`, `vision_model.encoder.layers.N.*`; Hugging Face DINOv2 `embeddings.patch_embeddings.*`, `encoder.layer.N.*`";

/// Whose tensor names a checkpoint uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VitLayout {
    /// `torchvision.models.VisionTransformer` (`vit_b_16`, `vit_l_16`, ...).
    Torchvision,
    /// `timm.models.VisionTransformer` (`vit_*`, its CLIP and DINOv2 ports).
    Timm,
    /// transformers' CLIP image tower (`CLIPModel`, `CLIPVisionModel[WithProjection]`).
    HfClip,
    /// transformers' `Dinov2Model` / `Dinov2WithRegistersModel` (and their classifiers).
    HfDinov2,
}

impl fmt::Display for VitLayout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            VitLayout::Torchvision => "torchvision",
            VitLayout::Timm => "timm",
            VitLayout::HfClip => "Hugging Face CLIP",
            VitLayout::HfDinov2 => "Hugging Face DINOv2",
        })
    }
}

/// One block's tensor names (without `.weight`/`.bias`).
pub(super) struct BlockNames {
    pub(super) ln1: String,
    pub(super) ln2: String,
    /// One fused `(3C, C)` projection, or the query, key and value ones.
    pub(super) qkv: Qkv,
    pub(super) proj: String,
    pub(super) fc1: String,
    pub(super) fc2: String,
    /// Layer scale vectors (their full names).
    pub(super) ls: Option<(String, String)>,
}

pub(super) enum Qkv {
    /// `(weight, bias)` full names.
    Fused(String, String),
    Split([String; 3]),
}

/// The names of a checkpoint in `layout`, whose every tensor name starts with `prefix`.
pub(super) struct Names {
    pub(super) layout: VitLayout,
    pub(super) prefix: String,
    /// torchvision's MLP names before 0.13 (`mlp.linear_1`), which its published
    /// `vit_*.pth` files still use; later versions rename them on loading.
    pub(super) legacy_mlp: bool,
}

impl Names {
    fn n(&self, s: &str) -> String {
        format!("{}{s}", self.prefix)
    }

    /// The patch embedding convolution (a module: `.weight`, `.bias`).
    pub(super) fn patch(&self) -> String {
        self.n(match self.layout {
            VitLayout::Torchvision => "conv_proj",
            VitLayout::Timm => "patch_embed.proj",
            VitLayout::HfClip => "vision_model.embeddings.patch_embedding",
            VitLayout::HfDinov2 => "embeddings.patch_embeddings.projection",
        })
    }

    pub(super) fn class_token(&self) -> String {
        self.n(match self.layout {
            VitLayout::Torchvision => "class_token",
            VitLayout::Timm => "cls_token",
            VitLayout::HfClip => "vision_model.embeddings.class_embedding",
            VitLayout::HfDinov2 => "embeddings.cls_token",
        })
    }

    pub(super) fn registers(&self) -> Option<String> {
        match self.layout {
            VitLayout::Timm => Some(self.n("reg_token")),
            VitLayout::HfDinov2 => Some(self.n("embeddings.register_tokens")),
            _ => None,
        }
    }

    pub(super) fn positions(&self) -> String {
        self.n(match self.layout {
            VitLayout::Torchvision => "encoder.pos_embedding",
            VitLayout::Timm => "pos_embed",
            VitLayout::HfClip => "vision_model.embeddings.position_embedding.weight",
            VitLayout::HfDinov2 => "embeddings.position_embeddings",
        })
    }

    pub(super) fn pre_norm(&self) -> Option<String> {
        match self.layout {
            VitLayout::Timm => Some(self.n("norm_pre")),
            VitLayout::HfClip => Some(self.n("vision_model.pre_layrnorm")),
            _ => None,
        }
    }

    pub(super) fn norm(&self) -> String {
        self.n(match self.layout {
            VitLayout::Torchvision => "encoder.ln",
            VitLayout::Timm => "norm",
            VitLayout::HfClip => "vision_model.post_layernorm",
            VitLayout::HfDinov2 => "layernorm",
        })
    }

    /// The head's linear layer; outside the prefix for transformers' task heads.
    pub(super) fn head(&self) -> String {
        match self.layout {
            VitLayout::Torchvision => "heads.head".into(),
            VitLayout::Timm => "head".into(),
            VitLayout::HfClip => "visual_projection".into(),
            VitLayout::HfDinov2 => "classifier".into(),
        }
    }

    pub(super) fn block(&self, i: usize) -> BlockNames {
        let p = |s: &str| self.n(s);
        match self.layout {
            VitLayout::Torchvision => {
                let b = p(&format!("encoder.layers.encoder_layer_{i}"));
                let (fc1, fc2) =
                    if self.legacy_mlp { ("linear_1", "linear_2") } else { ("0", "3") };
                BlockNames {
                    ln1: format!("{b}.ln_1"),
                    ln2: format!("{b}.ln_2"),
                    qkv: Qkv::Fused(
                        format!("{b}.self_attention.in_proj_weight"),
                        format!("{b}.self_attention.in_proj_bias"),
                    ),
                    proj: format!("{b}.self_attention.out_proj"),
                    fc1: format!("{b}.mlp.{fc1}"),
                    fc2: format!("{b}.mlp.{fc2}"),
                    ls: None,
                }
            }
            VitLayout::Timm => {
                let b = p(&format!("blocks.{i}"));
                BlockNames {
                    ln1: format!("{b}.norm1"),
                    ln2: format!("{b}.norm2"),
                    qkv: Qkv::Fused(format!("{b}.attn.qkv.weight"), format!("{b}.attn.qkv.bias")),
                    proj: format!("{b}.attn.proj"),
                    fc1: format!("{b}.mlp.fc1"),
                    fc2: format!("{b}.mlp.fc2"),
                    ls: Some((format!("{b}.ls1.gamma"), format!("{b}.ls2.gamma"))),
                }
            }
            VitLayout::HfClip => {
                let b = p(&format!("vision_model.encoder.layers.{i}"));
                BlockNames {
                    ln1: format!("{b}.layer_norm1"),
                    ln2: format!("{b}.layer_norm2"),
                    qkv: Qkv::Split(
                        ["q_proj", "k_proj", "v_proj"].map(|n| format!("{b}.self_attn.{n}")),
                    ),
                    proj: format!("{b}.self_attn.out_proj"),
                    fc1: format!("{b}.mlp.fc1"),
                    fc2: format!("{b}.mlp.fc2"),
                    ls: None,
                }
            }
            VitLayout::HfDinov2 => {
                let b = p(&format!("encoder.layer.{i}"));
                BlockNames {
                    ln1: format!("{b}.norm1"),
                    ln2: format!("{b}.norm2"),
                    qkv: Qkv::Split(
                        ["query", "key", "value"].map(|n| format!("{b}.attention.attention.{n}")),
                    ),
                    proj: format!("{b}.attention.output.dense"),
                    fc1: format!("{b}.mlp.fc1"),
                    fc2: format!("{b}.mlp.fc2"),
                    ls: Some((
                        format!("{b}.layer_scale1.lambda1"),
                        format!("{b}.layer_scale2.lambda1"),
                    )),
                }
            }
        }
    }
}

/// The layout and name prefix of a checkpoint, from the names only.
pub(super) fn detect(shapes: &HashMap<String, Vec<usize>>) -> Option<Names> {
    let has = |k: &str| shapes.contains_key(k);
    let layout = if has("conv_proj.weight") && has("encoder.pos_embedding") {
        VitLayout::Torchvision
    } else if has("patch_embed.proj.weight") {
        VitLayout::Timm
    } else if has("vision_model.embeddings.patch_embedding.weight") {
        VitLayout::HfClip
    } else {
        // transformers' task models nest the backbone under its name (`dinov2.`).
        const PATCH: &str = "embeddings.patch_embeddings.projection.weight";
        let prefix = shapes.keys().find_map(|k| k.strip_suffix(PATCH))?;
        let dinov2 = has(&format!("{prefix}encoder.layer.0.norm1.weight"))
            && has(&format!("{prefix}encoder.layer.0.attention.attention.query.weight"));
        return dinov2.then(|| Names {
            layout: VitLayout::HfDinov2,
            prefix: prefix.into(),
            legacy_mlp: false,
        });
    };
    let legacy_mlp = has("encoder.layers.encoder_layer_0.mlp.linear_1.weight");
    Some(Names { layout, prefix: String::new(), legacy_mlp })
}

/// Everything about a checkpoint that the inference and the loader share.
pub(super) struct Reader<'a> {
    pub(super) shapes: &'a HashMap<String, Vec<usize>>,
    pub(super) names: Names,
    pub(super) weights: &'a Path,
}

impl Reader<'_> {
    pub(super) fn has(&self, name: &str) -> bool {
        self.shapes.contains_key(name)
    }

    pub(super) fn dims(&self, name: &str) -> Result<&[usize], ModelError> {
        self.shapes.get(name).map(Vec::as_slice).ok_or_else(|| self.missing(name))
    }

    pub(super) fn missing(&self, name: &str) -> ModelError {
        ModelError::BadCheckpoint {
            path: self.weights.into(),
            found: format!("a {} ViT checkpoint without the tensor `{name}`", self.names.layout),
            expected: format!("every tensor of a {} ViT ({EXPECTED_LAYOUTS})", self.names.layout),
            help: "the file is incomplete or holds another variant; re-save the model's whole state_dict (`torch.save(model.state_dict(), ...)` or `safetensors.torch.save_file(...)`)".into(),
        }
    }

    pub(super) fn unsupported(&self, what: &str) -> ModelError {
        ModelError::BadCheckpoint {
            path: self.weights.into(),
            found: format!("a {} ViT with {what}", self.names.layout),
            expected: "a plain pre-norm ViT: LayerNorm, multi-head attention, a two-layer MLP, optional layer scale and register tokens".into(),
            help: "this variant is not supported; dissect a plain ViT checkpoint, or a ResNet".into(),
        }
    }

    pub(super) fn bad_config(&self, config: Option<&Path>, reason: String) -> ModelError {
        match config {
            Some(path) => ModelError::Config { path: path.into(), reason },
            None => ModelError::BadCheckpoint {
                path: self.weights.into(),
                found: format!("a {} ViT checkpoint without a config.json", self.names.layout),
                expected: reason,
                help: "put the model's config.json beside the weights (for torchvision checkpoints dnd reads {\"architecture\": \"vit_b_16\"} or {\"architecture\": \"vit\", \"num_heads\": N})".into(),
            },
        }
    }
}

/// Reads the weights into the common layout, checking each shape against `config`.
pub(super) fn load(
    tensors: &HashMap<String, Tensor>,
    config: &VitConfig,
    weights: &Path,
) -> Result<Params<HostTensor>, ModelError> {
    let shapes: HashMap<String, Vec<usize>> =
        tensors.iter().map(|(k, t)| (k.clone(), t.dims().to_vec())).collect();
    let mut names = detect(&shapes).ok_or_else(|| ModelError::BadCheckpoint {
        path: weights.into(),
        found: "a checkpoint whose tensors are in no ViT layout".into(),
        expected: EXPECTED_LAYOUTS.into(),
        help: "pass the checkpoint whose shape was read (the file changed since?)".into(),
    })?;
    names.layout = config.layout;
    names.prefix = config.prefix.clone();
    let r = Reader { shapes: &shapes, names, weights };
    let (c, m) = (config.hidden_size, config.mlp_size);
    let get = |name: &str, shape: &[usize]| -> Result<HostTensor, ModelError> {
        let t = tensors.get(name).ok_or_else(|| r.missing(name))?;
        if t.elem_count() != shape.iter().product::<usize>() {
            return Err(ModelError::BadCheckpoint {
                path: weights.into(),
                found: format!("a checkpoint whose tensor `{name}` has shape {:?}", t.dims()),
                expected: format!("{shape:?} for `{name}` in a width-{c} ViT with an MLP of {m} and {} blocks, as its other tensors say", config.num_layers),
                help: "the checkpoint mixes tensors of different models, or config.json does not match it: re-save the state_dict, or fix or remove config.json".into(),
            });
        }
        let data = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        Ok(HostTensor::new(data, shape))
    };
    let optional = |name: &str, shape: &[usize]| -> Result<HostTensor, ModelError> {
        if tensors.contains_key(name) { get(name, shape) } else { Ok(HostTensor::zeros(shape)) }
    };
    let norm = |name: &str| -> Result<Norm<HostTensor>, ModelError> {
        Ok(Norm {
            weight: get(&format!("{name}.weight"), &[c])?,
            bias: get(&format!("{name}.bias"), &[c])?,
        })
    };
    let p = config.patch_size;
    let patch = r.names.patch();
    let positions =
        get(&r.names.positions(), &[config.positioned_prefix + config.grid.0 * config.grid.1, c])?;
    let (pos_prefix, pos_grid) = positions.data.split_at(config.positioned_prefix * c);
    let blocks = (0..config.num_layers)
        .map(|i| load_block(&r.names.block(i), config, &get, &optional, &norm))
        .collect::<Result<Vec<_>, _>>()?;
    let head = match &config.head {
        Some(h) => {
            let fan_in = if h.input == HeadInput::ClassTokenAndPatchMean { 2 * c } else { c };
            let name = r.names.head();
            Some(HeadParams {
                norm: if h.norm { Some(norm("fc_norm")?) } else { None },
                weight: get(&format!("{name}.weight"), &[h.outputs, fan_in])?,
                bias: optional(&format!("{name}.bias"), &[h.outputs])?,
            })
        }
        None => None,
    };
    Ok(Params {
        patch_weight: get(&format!("{patch}.weight"), &[c, 3, p, p])?,
        patch_bias: optional(&format!("{patch}.bias"), &[c])?,
        class_token: if config.class_token {
            Some(get(&r.names.class_token(), &[c])?)
        } else {
            None
        },
        registers: match (config.register_tokens, r.names.registers()) {
            (0, _) | (_, None) => None,
            (n, Some(name)) => Some(get(&name, &[n, c])?),
        },
        pos_prefix: (config.positioned_prefix > 0)
            .then(|| HostTensor::new(pos_prefix.to_vec(), &[config.positioned_prefix, c])),
        pos_grid: HostTensor::new(pos_grid.to_vec(), &[config.grid.0 * config.grid.1, c]),
        pre_norm: match r.names.pre_norm() {
            Some(name) if config.pre_norm => Some(norm(&name)?),
            _ => None,
        },
        blocks,
        norm: if config.final_norm { Some(norm(&r.names.norm())?) } else { None },
        head,
    })
}

type Getter<'a> = dyn Fn(&str, &[usize]) -> Result<HostTensor, ModelError> + 'a;

/// One block's weights, q/k/v fused and layer scales folded in.
fn load_block(
    b: &BlockNames,
    config: &VitConfig,
    get: &Getter<'_>,
    optional: &Getter<'_>,
    norm: &dyn Fn(&str) -> Result<Norm<HostTensor>, ModelError>,
) -> Result<BlockParams<HostTensor>, ModelError> {
    let (c, m) = (config.hidden_size, config.mlp_size);
    let (qkv_weight, qkv_bias) = match &b.qkv {
        Qkv::Fused(w, bias) => (get(w, &[3 * c, c])?, optional(bias, &[3 * c])?),
        Qkv::Split(parts) => {
            let (mut w, mut bias) = (Vec::with_capacity(3 * c * c), Vec::with_capacity(3 * c));
            for part in parts {
                w.extend(get(&format!("{part}.weight"), &[c, c])?.data);
                bias.extend(optional(&format!("{part}.bias"), &[c])?.data);
            }
            (HostTensor::new(w, &[3 * c, c]), HostTensor::new(bias, &[3 * c]))
        }
    };
    let mut proj_weight = get(&format!("{}.weight", b.proj), &[c, c])?;
    let mut proj_bias = optional(&format!("{}.bias", b.proj), &[c])?;
    let mut fc2_weight = get(&format!("{}.weight", b.fc2), &[c, m])?;
    let mut fc2_bias = optional(&format!("{}.bias", b.fc2), &[c])?;
    if config.layer_scale {
        let (ls1, ls2) = b.ls.as_ref().expect("a layout with layer scale names it");
        // gamma * (W x + b) = (diag(gamma) W) x + gamma * b: one pass less per block.
        scale_rows(&mut proj_weight, &mut proj_bias, &get(ls1, &[c])?.data);
        scale_rows(&mut fc2_weight, &mut fc2_bias, &get(ls2, &[c])?.data);
    }
    Ok(BlockParams {
        ln1: norm(&b.ln1)?,
        qkv_weight,
        qkv_bias,
        proj_weight,
        proj_bias,
        ln2: norm(&b.ln2)?,
        fc1_weight: get(&format!("{}.weight", b.fc1), &[m, c])?,
        fc1_bias: optional(&format!("{}.bias", b.fc1), &[m])?,
        fc2_weight,
        fc2_bias,
    })
}

/// `W = diag(gamma) W`, `b = gamma * b` for a `(rows, cols)` weight.
fn scale_rows(weight: &mut HostTensor, bias: &mut HostTensor, gamma: &[f32]) {
    let cols = weight.shape[1];
    for (row, &g) in weight.data.chunks_exact_mut(cols).zip(gamma) {
        row.iter_mut().for_each(|v| *v *= g);
    }
    bias.data.iter_mut().zip(gamma).for_each(|(v, &g)| *v *= g);
}

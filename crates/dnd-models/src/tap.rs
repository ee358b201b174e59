//! Where a target model's activations are read: one [`Tap`] type for every architecture,
//! named as the checkpoints name their layers.

use std::fmt;
use std::str::FromStr;

use crate::error::ModelError;

/// A place in the network whose output can be observed. One type for every architecture,
/// so that the pipeline needs to know none; each model says which taps it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Tap {
    /// ResNet: output of the stem (conv1, bn1, relu, maxpool): the input of `layer1`.
    Stem,
    /// ResNet: output of stage 1..=4 (`layer1`..`layer4`), after its last block's ReLU.
    Layer(u8),
    /// ResNet: the global average pool, flattened: a vector per image.
    AvgPool,
    /// ResNet: the classifier logits.
    Fc,
    /// ViT: the residual stream after block N (0-based), `blocks.N`.
    Block(u16),
    /// ViT: the hidden layer of block N's MLP after its activation, `blocks.N.mlp`.
    BlockMlp(u16),
    /// ViT: the final norm, applied to every token, `norm`.
    Norm,
    /// ViT: the classifier or projection head, a vector per image, `head`.
    Head,
}

/// Other spellings of the ViT block taps, as the checkpoints name their blocks
/// (torchvision, Hugging Face CLIP, Hugging Face DINOv2, OpenCLIP). The torchvision one
/// comes before its own prefix `encoder.layers.`.
const BLOCK_PREFIXES: [&str; 5] = [
    "blocks.",
    "encoder.layers.encoder_layer_",
    "encoder.layers.",
    "encoder.layer.",
    "transformer.resblocks.",
];
const NORM_NAMES: [&str; 5] = ["norm", "encoder.ln", "layernorm", "post_layernorm", "ln_post"];
const HEAD_NAMES: [&str; 5] = ["head", "heads.head", "heads", "classifier", "visual_projection"];

impl Tap {
    /// Every tap of a ResNet, in network order.
    pub const RESNET: [Tap; 7] = [
        Tap::Stem,
        Tap::Layer(1),
        Tap::Layer(2),
        Tap::Layer(3),
        Tap::Layer(4),
        Tap::AvgPool,
        Tap::Fc,
    ];

    /// Spatial taps give `(C, H, W)` maps (a ViT's patch-token grid); the others one value
    /// per channel.
    pub fn is_spatial(self) -> bool {
        !matches!(self, Tap::AvgPool | Tap::Fc | Tap::Head)
    }

    /// The forms tap names take, for messages about a name that is none of them.
    pub fn forms() -> &'static str {
        "ResNet: stem, layer1..layer4, avgpool, fc; ViT: blocks.N, blocks.N.mlp, norm, head (also encoder.layers.N, encoder.layer.N, encoder.layers.encoder_layer_N)"
    }

    fn parse_block(s: &str) -> Option<Tap> {
        let rest = BLOCK_PREFIXES.iter().find_map(|p| s.strip_prefix(p))?;
        let (index, mlp) = match rest.strip_suffix(".mlp") {
            Some(index) => (index, true),
            None => (rest, false),
        };
        // Plain digits only: `+1` or `01` would name the same block twice.
        if index.is_empty()
            || !index.bytes().all(|b| b.is_ascii_digit())
            || index.len() > 1 && index.starts_with('0')
        {
            return None;
        }
        let n: u16 = index.parse().ok()?;
        Some(if mlp { Tap::BlockMlp(n) } else { Tap::Block(n) })
    }
}

impl fmt::Display for Tap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tap::Stem => f.write_str("stem"),
            Tap::Layer(i) => write!(f, "layer{i}"),
            Tap::AvgPool => f.write_str("avgpool"),
            Tap::Fc => f.write_str("fc"),
            Tap::Block(i) => write!(f, "blocks.{i}"),
            Tap::BlockMlp(i) => write!(f, "blocks.{i}.mlp"),
            Tap::Norm => f.write_str("norm"),
            Tap::Head => f.write_str("head"),
        }
    }
}

impl FromStr for Tap {
    type Err = ModelError;
    /// Any architecture's tap names and their aliases; whether a model has the tap is
    /// checked by [`crate::target::TargetShape::tap`].
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let unknown = || ModelError::UnknownTap { name: s.into(), available: Tap::forms().into() };
        if let Some(t) = Tap::RESNET.into_iter().find(|t| t.to_string() == s) {
            return Ok(t);
        }
        if NORM_NAMES.contains(&s) {
            return Ok(Tap::Norm);
        }
        if HEAD_NAMES.contains(&s) {
            return Ok(Tap::Head);
        }
        Tap::parse_block(s).ok_or_else(unknown)
    }
}

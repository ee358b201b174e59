//! Dictionaries of units over a target layer's channels: sparse autoencoders (SAEs) and
//! sets of directions, read in the layouts their tools save, and their encoders run on a
//! device.
//!
//! * **SAELens** (`SAE.save_model`): a directory with `cfg.json` ([`SaeConfig`]: `d_in`,
//!   `d_sae`, `architecture` or `activation_fn_str`, `activation_fn_kwargs.k` / `k`,
//!   `apply_b_dec_to_input`, `normalize_activations`) and `sae_weights.safetensors`
//!   (`W_enc` `(d_in, d_sae)`, `b_enc` `(d_sae)`, `W_dec` `(d_sae, d_in)`, `b_dec`
//!   `(d_in)`, `threshold` `(d_sae)` for JumpReLU). Prisma's checkpoints (a SAELens fork:
//!   `config.json` with the same fields, the same tensor names) read the same way.
//! * **Plain tensors** (saev and others): any checkpoint file [`Checkpoint`] reads
//!   (safetensors, a `torch.save`d state_dict) with tensors named as SAELens names them,
//!   next to a `cfg.json` (or `config.json`) written in SAELens' fields (saev's `d_vit` is
//!   `d_in`); docs/job.md shows the mapping.
//! * **Directions**: `directions.safetensors` with one 2-D tensor `directions`
//!   `(units, d_in)`, one direction a row; optional names in the header's metadata as
//!   `"names": "[\"dog\", ...]"` (a JSON list).
//!
//! Everything else (gated SAEs, normalised inputs, unknown activations) is refused by
//! [`inspect`] with the file and the mismatch, before any work starts.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;
use serde::Deserialize;

use dnd_core::{Activation, Encoder, UnitKind};

use crate::checkpoint::hash_files;
use crate::error::ModelError;
use crate::weights::Checkpoint;

/// SAELens' config file name, and its weights'.
pub const SAELENS_CONFIG: &str = "cfg.json";
pub const SAELENS_WEIGHTS: &str = "sae_weights.safetensors";
/// The directions file a directory of directions holds.
pub const DIRECTIONS_FILE: &str = "directions.safetensors";

/// SAELens' `cfg.json`: the fields that shape the encoder (the rest is ignored).
#[derive(Debug, Clone, Deserialize)]
pub struct SaeConfig {
    pub d_in: usize,
    pub d_sae: usize,
    /// `standard`, `topk`, `jumprelu` (SAELens 6); older versions write `standard`,
    /// `jumprelu` or `gated` and say TopK in `activation_fn_str`.
    #[serde(default)]
    pub architecture: Option<String>,
    #[serde(default)]
    pub activation_fn_str: Option<String>,
    /// What some versions and forks call `activation_fn_str`.
    #[serde(default)]
    pub activation_fn: Option<String>,
    /// `{"k": 32}` for TopK before SAELens 6.
    #[serde(default)]
    pub activation_fn_kwargs: Option<serde_json::Value>,
    /// TopK's k in SAELens 6 (a float for BatchTopK).
    #[serde(default)]
    pub k: Option<f64>,
    #[serde(default = "yes")]
    pub apply_b_dec_to_input: bool,
    #[serde(default)]
    pub normalize_activations: Option<String>,
}

fn yes() -> bool {
    true
}

impl SaeConfig {
    /// The encoder's nonlinearity, or why dnd cannot compute it.
    pub fn activation(&self) -> Result<Activation, String> {
        let k = || -> Result<usize, String> {
            let from_kwargs = self
                .activation_fn_kwargs
                .as_ref()
                .and_then(|kw| kw.get("k"))
                .and_then(serde_json::Value::as_f64);
            match self.k.or(from_kwargs) {
                Some(k) if k >= 1.0 && k.fract() == 0.0 => Ok(k as usize),
                Some(k) => Err(format!("TopK's k is {k}, not a whole number of latents")),
                None => Err("a TopK SAE without k (`k` or `activation_fn_kwargs.k`)".into()),
            }
        };
        match self.normalize_activations.as_deref() {
            None | Some("none") => {}
            Some(other) => {
                return Err(format!(
                    "normalize_activations is `{other}`: dnd feeds the layer's activations as they are, so it reads SAEs trained on unnormalised inputs (`none`)"
                ));
            }
        }
        let function = self.activation_fn_str.as_deref().or(self.activation_fn.as_deref());
        match self.architecture.as_deref().unwrap_or("standard") {
            "jumprelu" => Ok(Activation::JumpRelu),
            "topk" => Ok(Activation::TopK { k: k()? }),
            "standard" => match function.unwrap_or("relu") {
                "relu" => Ok(Activation::Relu),
                "topk" => Ok(Activation::TopK { k: k()? }),
                other => Err(format!(
                    "activation `{other}` is unknown to dnd; it computes relu, topk and jumprelu"
                )),
            },
            other => Err(format!(
                "architecture `{other}` is not one dnd computes; it reads standard (relu), topk and jumprelu SAEs"
            )),
        }
    }
}

/// What a dictionary is, read from its config and tensor headers without its weights:
/// what planning a job and checking it against the layer need.
#[derive(Debug, Clone, PartialEq)]
pub struct DictionaryInfo {
    pub kind: UnitKind,
    /// The weights file.
    pub weights: PathBuf,
    pub config: Option<PathBuf>,
    /// Channels it reads (the layer's width must equal it).
    pub d_in: usize,
    /// Units it has.
    pub units: usize,
    pub activation: Activation,
    /// Whether `b_dec` is subtracted from the input first.
    pub centre: bool,
    /// `blake3:<16 hex>` of its config and weights: its identity in tables and caches.
    pub identity: String,
    /// Names of the units, where the file gives them (directions).
    pub names: Vec<String>,
}

fn bad(path: &Path, reason: impl Into<String>) -> ModelError {
    ModelError::Dictionary { path: path.to_path_buf(), reason: reason.into() }
}

/// Finds a dictionary's weights and config: `source` is a directory (SAELens' or one
/// holding `directions.safetensors` or one checkpoint file) or a weights file.
fn locate(kind: UnitKind, source: &Path) -> Result<(PathBuf, Option<PathBuf>), ModelError> {
    let config_in = |dir: &Path| {
        [SAELENS_CONFIG, "config.json"].iter().map(|n| dir.join(n)).find(|p| p.is_file())
    };
    if source.is_file() {
        let config = source.parent().and_then(config_in);
        return Ok((source.to_path_buf(), config));
    }
    if !source.is_dir() {
        return Err(bad(source, "there is no file or directory there"));
    }
    let wanted = match kind {
        UnitKind::Direction => DIRECTIONS_FILE,
        _ => SAELENS_WEIGHTS,
    };
    let weights = crate::checkpoint::find_weights(source, wanted).map_err(|e| {
        bad(source, format!("{e}; for {kind} units dnd looks for {wanted} or one checkpoint file"))
    })?;
    Ok((weights, config_in(source)))
}

/// The safetensors header's `__metadata__`, where the file is one (else empty).
fn safetensors_metadata(path: &Path) -> HashMap<String, String> {
    let read = || -> Option<HashMap<String, String>> {
        let mut file = std::fs::File::open(path).ok()?;
        let mut len = [0u8; 8];
        file.read_exact(&mut len).ok()?;
        let len = u64::from_le_bytes(len);
        if len > 100 << 20 {
            return None;
        }
        let mut header = vec![0u8; len as usize];
        file.read_exact(&mut header).ok()?;
        let mut raw: HashMap<String, serde_json::Value> = serde_json::from_slice(&header).ok()?;
        serde_json::from_value(raw.remove("__metadata__")?).ok()
    };
    read().unwrap_or_default()
}

/// Checks a shape against what the layout says, naming the tensor.
fn expect_shape(
    path: &Path,
    shapes: &HashMap<String, Vec<usize>>,
    name: &str,
    want: &[usize],
    meaning: &str,
) -> Result<(), ModelError> {
    match shapes.get(name) {
        Some(s) if s == want => Ok(()),
        Some(s) => Err(bad(
            path,
            format!("tensor `{name}` is {s:?}, but the config says {meaning} = {want:?}"),
        )),
        None => Err(bad(path, format!("it has no tensor `{name}` ({meaning})"))),
    }
}

/// Reads a dictionary's config and tensor headers (not its weights) and checks them
/// against each other. `d_in` is checked against the layer by the caller.
pub fn inspect(kind: UnitKind, source: &Path) -> Result<DictionaryInfo, ModelError> {
    let (weights, config) = locate(kind, source)?;
    let shapes = Checkpoint::open(&weights)?.shapes()?;
    let (d_in, units, activation, centre, names) = match kind {
        UnitKind::Channel => {
            return Err(bad(source, "channels need no dictionary: leave out `source`"));
        }
        UnitKind::Direction => {
            let shape = match shapes.get("directions") {
                Some(s) => s.clone(),
                None if shapes.len() == 1 => shapes.values().next().cloned().unwrap_or_default(),
                None => {
                    let mut names: Vec<&String> = shapes.keys().collect();
                    names.sort();
                    return Err(bad(
                        &weights,
                        format!("it has no tensor `directions` (units x channels), only {names:?}"),
                    ));
                }
            };
            let [units, d_in] = shape[..] else {
                return Err(bad(
                    &weights,
                    format!("the directions are {shape:?}, not a matrix of units x channels"),
                ));
            };
            let names = match safetensors_metadata(&weights).get("names") {
                None => Vec::new(),
                Some(json) => {
                    let names: Vec<String> = serde_json::from_str(json).map_err(|e| {
                        bad(
                            &weights,
                            format!("metadata `names` is not a JSON list of strings: {e}"),
                        )
                    })?;
                    if names.len() != units {
                        return Err(bad(
                            &weights,
                            format!(
                                "metadata `names` has {} names for {units} directions",
                                names.len()
                            ),
                        ));
                    }
                    names
                }
            };
            (d_in, units, Activation::Linear, false, names)
        }
        UnitKind::Sae => {
            let Some(config_path) = &config else {
                return Err(bad(
                    source,
                    format!(
                        "there is no {SAELENS_CONFIG} (or config.json) beside {}: dnd reads SAELens' layout; for other SAEs write one with d_in, d_sae and architecture (docs/job.md)",
                        weights.display()
                    ),
                ));
            };
            let text = std::fs::read_to_string(config_path)
                .map_err(|e| ModelError::Io { path: config_path.clone(), source: e })?;
            let cfg: SaeConfig = crate::json::from_config_str(&text)
                .map_err(|e| bad(config_path, format!("it is not an SAE config: {e}")))?;
            let activation = cfg.activation().map_err(|reason| bad(config_path, reason))?;
            let (d_in, d_sae) = (cfg.d_in, cfg.d_sae);
            if let Some(s) = shapes.get("W_enc")
                && s[..] == [d_sae, d_in]
                && d_in != d_sae
            {
                return Err(bad(
                    &weights,
                    format!(
                        "`W_enc` is {s:?}, d_sae x d_in: dnd reads SAELens' d_in x d_sae; transpose it"
                    ),
                ));
            }
            expect_shape(&weights, &shapes, "W_enc", &[d_in, d_sae], "d_in x d_sae")?;
            expect_shape(&weights, &shapes, "b_enc", &[d_sae], "d_sae")?;
            if cfg.apply_b_dec_to_input || shapes.contains_key("b_dec") {
                expect_shape(&weights, &shapes, "b_dec", &[d_in], "d_in")?;
            }
            if activation == Activation::JumpRelu {
                expect_shape(&weights, &shapes, "threshold", &[d_sae], "d_sae")?;
            }
            if let Activation::TopK { k } = activation
                && k > d_sae
            {
                return Err(bad(config_path, format!("TopK's k ({k}) exceeds d_sae ({d_sae})")));
            }
            (d_in, d_sae, activation, cfg.apply_b_dec_to_input, Vec::new())
        }
    };
    let dir = weights.parent().unwrap_or(Path::new(".")).to_path_buf();
    let mut files: Vec<PathBuf> = Checkpoint::open(&weights)?.files();
    files.extend(config.clone());
    let identity = hash_files(&dir, &mut files)?;
    Ok(DictionaryInfo { kind, weights, config, d_in, units, activation, centre, identity, names })
}

/// Checks that a dictionary reads `width` channels, the width of the layer it is for.
pub fn check_width(info: &DictionaryInfo, layer: &str, width: usize) -> Result<(), ModelError> {
    if info.d_in == width {
        return Ok(());
    }
    Err(bad(
        &info.weights,
        format!(
            "it reads {} channels (d_in), but layer `{layer}` has {width}: it was trained on another layer or model",
            info.d_in
        ),
    ))
}

/// Loads the dictionary's encoder on the host.
pub fn load(info: &DictionaryInfo) -> Result<Encoder, ModelError> {
    let tensors = Checkpoint::open(&info.weights)?.load(&Device::Cpu)?;
    let flat = |name: &str| -> Result<Vec<f32>, ModelError> {
        let t =
            tensors.get(name).ok_or_else(|| bad(&info.weights, format!("no tensor `{name}`")))?;
        Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
    };
    let shape = |e: dnd_core::CoreError| bad(&info.weights, e.to_string());
    match info.kind {
        UnitKind::Direction => {
            let name = if tensors.contains_key("directions") {
                "directions".to_string()
            } else {
                tensors.keys().next().cloned().unwrap_or_default()
            };
            Encoder::directions(&flat(&name)?, info.units, info.d_in).map_err(shape)
        }
        _ => {
            let b_dec = if info.centre { flat("b_dec")? } else { vec![0.0; info.d_in] };
            let threshold = if info.activation == Activation::JumpRelu {
                flat("threshold")?
            } else {
                Vec::new()
            };
            Encoder::new(
                info.d_in,
                info.units,
                (flat("W_enc")?, flat("b_enc")?, b_dec),
                threshold,
                info.activation,
            )
            .map_err(shape)
        }
    }
}

/// An encoder on a device: the units of every position of a batch in one matrix product.
#[derive(Debug, Clone)]
pub struct DeviceEncoder {
    /// `(d_in, units)`.
    w_enc: Tensor,
    b_enc: Tensor,
    b_dec: Option<Tensor>,
    threshold: Option<Tensor>,
    activation: Activation,
    units: usize,
}

impl DeviceEncoder {
    pub fn new(encoder: &Encoder, device: &Device) -> Result<Self, ModelError> {
        let vector = |v: &[f32]| Tensor::from_slice(v, v.len(), device);
        let centred = encoder.b_dec.iter().any(|&b| b != 0.0);
        Ok(Self {
            w_enc: Tensor::from_slice(&encoder.w_enc, (encoder.d_in, encoder.units), device)?,
            b_enc: vector(&encoder.b_enc)?,
            b_dec: centred.then(|| vector(&encoder.b_dec)).transpose()?,
            threshold: (!encoder.threshold.is_empty())
                .then(|| vector(&encoder.threshold))
                .transpose()?,
            activation: encoder.activation,
            units: encoder.units,
        })
    }

    pub fn units(&self) -> usize {
        self.units
    }

    /// The units at `n` positions: `x` is `(n, d_in)`, the result `(n, units)`.
    pub fn encode(&self, x: &Tensor) -> Result<Tensor, ModelError> {
        let x = match &self.b_dec {
            Some(b) => x.broadcast_sub(b)?,
            None => x.clone(),
        };
        let pre = x.matmul(&self.w_enc)?.broadcast_add(&self.b_enc)?;
        Ok(match self.activation {
            Activation::Linear => pre,
            Activation::Relu => pre.relu()?,
            Activation::JumpRelu => {
                let threshold = self.threshold.as_ref().ok_or_else(|| {
                    ModelError::Candle(candle_core::Error::Msg(
                        "JumpReLU without thresholds".into(),
                    ))
                })?;
                let on = pre.broadcast_gt(threshold)?.to_dtype(DType::F32)?;
                (pre.relu()? * on)?
            }
            Activation::TopK { k } if k >= self.units => pre.relu()?,
            Activation::TopK { k } => {
                // The k-th largest value of each row, found on the host (candle has no top-k,
                // and its device sorts are limited in width): then one mask on the device.
                let rows = pre.to_device(&Device::Cpu)?.to_vec2::<f32>()?;
                let kth: Vec<f32> = rows
                    .into_par_iter()
                    .map(|mut row| {
                        let (_, v, _) = row.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
                        *v
                    })
                    .collect();
                let n = kth.len();
                let kth = Tensor::from_vec(kth, (n, 1), pre.device())?;
                let on = pre.broadcast_ge(&kth)?.to_dtype(DType::F32)?;
                (pre.relu()? * on)?
            }
        })
    }

    /// The unit maps of a tap's output: `(B, C, h, w)` maps become `(B, units, h, w)`,
    /// `(B, C)` vectors `(B, units)`.
    pub fn maps(&self, output: &Tensor) -> Result<Tensor, ModelError> {
        match output.rank() {
            2 => self.encode(output),
            4 => {
                let (b, c, h, w) = output.dims4()?;
                let positions = output.permute((0, 2, 3, 1))?.reshape((b * h * w, c))?;
                let units = self.encode(&positions)?;
                Ok(units.reshape((b, h, w, self.units))?.permute((0, 3, 1, 2))?.contiguous()?)
            }
            r => Err(ModelError::Candle(candle_core::Error::Msg(format!(
                "a tap's output of rank {r} has no unit maps"
            )))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoder(activation: Activation) -> Encoder {
        // 3 channels, 5 units, made-up weights with distinct values.
        let w: Vec<f32> = (0..15).map(|i| ((i * 7 % 11) as f32 - 5.0) / 4.0).collect();
        let threshold = if activation == Activation::JumpRelu { vec![0.5; 5] } else { Vec::new() };
        Encoder::new(
            3,
            5,
            (w, vec![0.1, -0.2, 0.3, 0.0, -0.1], vec![0.5, -0.5, 0.25]),
            threshold,
            activation,
        )
        .unwrap()
    }

    #[test]
    fn the_device_encoder_matches_the_reference() {
        let x: Vec<f32> = (0..24).map(|i| ((i * 5 % 13) as f32 - 6.0) / 3.0).collect();
        for activation in [
            Activation::Linear,
            Activation::Relu,
            Activation::TopK { k: 2 },
            Activation::TopK { k: 9 },
            Activation::JumpRelu,
        ] {
            let e = encoder(activation);
            let want = e.encode(&x);
            let device = DeviceEncoder::new(&e, &Device::Cpu).unwrap();
            let got =
                device.encode(&Tensor::from_slice(&x, (8, 3), &Device::Cpu).unwrap()).unwrap();
            let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() < 1e-5, "{activation}: {got:?} vs {want:?}");
            }
        }
    }

    #[test]
    fn maps_keep_the_grid() {
        // (B=2, C=3, h=2, w=2): unit u's map at (b, y, x) is the encoder at that position.
        let e = encoder(Activation::Relu);
        let data: Vec<f32> = (0..24).map(|i| (i as f32 - 11.0) / 5.0).collect();
        let t = Tensor::from_slice(&data, (2, 3, 2, 2), &Device::Cpu).unwrap();
        let all = DeviceEncoder::new(&e, &Device::Cpu).unwrap().maps(&t).unwrap();
        assert_eq!(all.dims(), &[2, 5, 2, 2]);
        let (b, y, x) = (1, 0, 1);
        let position: Vec<f32> = (0..3).map(|c| data[((b * 3 + c) * 2 + y) * 2 + x]).collect();
        let want = e.encode(&position);
        for (u, w) in want.iter().enumerate() {
            let got = all.get(b).unwrap().get(u).unwrap().get(y).unwrap().get(x).unwrap();
            assert!((got.to_scalar::<f32>().unwrap() - w).abs() < 1e-5);
        }
    }

    fn config(json: &str) -> SaeConfig {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn saelens_configs_map_to_activations() {
        let base = r#""d_in": 4, "d_sae": 8"#;
        let act = |extra: &str| config(&format!("{{{base}{extra}}}")).activation();
        assert_eq!(act(""), Ok(Activation::Relu));
        assert_eq!(act(r#", "architecture": "jumprelu""#), Ok(Activation::JumpRelu));
        assert_eq!(act(r#", "architecture": "topk", "k": 3"#), Ok(Activation::TopK { k: 3 }));
        assert_eq!(
            act(r#", "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 5}"#),
            Ok(Activation::TopK { k: 5 })
        );
        assert!(act(r#", "architecture": "gated""#).unwrap_err().contains("gated"));
        assert!(act(r#", "activation_fn_str": "tanh-relu""#).unwrap_err().contains("tanh-relu"));
        assert!(act(r#", "architecture": "topk""#).unwrap_err().contains("without k"));
        assert!(
            act(r#", "normalize_activations": "expected_average_only_in""#)
                .unwrap_err()
                .contains("normalize_activations")
        );
        assert!(config(&format!("{{{base}}}")).apply_b_dec_to_input, "SAELens' default");
    }
}

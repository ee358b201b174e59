//! The ResNet being trained: its parameters under torchvision names, the training and
//! eval forward passes, BatchNorm's running statistics, export, and the planting loss.

use std::collections::{BTreeMap, HashMap};

use candle_core::{D, DType, Device, Tensor, Var};
use candle_nn::VarMap;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use dnd_synth::planted::class_of;

use super::TrainError;
use super::config::TargetTraining;
use super::data::{Batch, PlantGroup};
use super::ops::{self, BN_EPS};

/// Batch statistics of one BatchNorm in a training forward pass (outside the graph).
pub(crate) struct BnStat {
    pub(crate) name: String,
    pub(crate) mean: Tensor,
    /// Biased variance (what normalised the batch).
    pub(crate) var: Tensor,
    /// Elements per channel that the statistics cover.
    pub(crate) count: usize,
}

/// The result of a forward pass.
pub(crate) struct Pass {
    pub(crate) logits: Tensor,
    /// Per stage (0-based), the last block's output before its ReLU.
    pub(crate) pre: Vec<Tensor>,
    /// Per stage, the output after the ReLU (dnd's `layer{i}` taps).
    pub(crate) taps: Vec<Tensor>,
    pub(crate) stats: Vec<BnStat>,
}

/// One BasicBlock's place in the network.
pub(crate) struct BlockInfo {
    pub(crate) prefix: String,
    pub(crate) in_ch: usize,
    pub(crate) out_ch: usize,
    pub(crate) stride: usize,
    pub(crate) downsample: bool,
}

/// The ResNet being trained: trainable tensors in a [`VarMap`] under torchvision names,
/// BatchNorm running statistics beside them.
pub(crate) struct TrainNet {
    pub(crate) stem: usize,
    pub(crate) widths: [usize; 4],
    pub(crate) layers: [usize; 4],
    pub(crate) num_classes: usize,
    pub(crate) varmap: VarMap,
    /// The same variables as the VarMap, in name order.
    pub(crate) params: BTreeMap<String, Var>,
    /// BatchNorm name -> (running mean, running var).
    pub(crate) running: BTreeMap<String, (Tensor, Tensor)>,
    pub(crate) batches_tracked: i64,
    pub(crate) device: Device,
}

impl TrainNet {
    pub(crate) fn new(
        config: &TargetTraining,
        num_classes: usize,
        rng: &mut ChaCha8Rng,
        device: &Device,
    ) -> Result<Self, TrainError> {
        let mut net = Self {
            stem: config.stem_channels,
            widths: config.widths,
            layers: config.layers,
            num_classes,
            varmap: VarMap::new(),
            params: BTreeMap::new(),
            running: BTreeMap::new(),
            batches_tracked: 0,
            device: device.clone(),
        };
        net.add_conv_bn("conv1", "bn1", [net.stem, 3, 7, 7], rng)?;
        for b in net.blocks() {
            let p = &b.prefix;
            net.add_conv_bn(
                &format!("{p}.conv1"),
                &format!("{p}.bn1"),
                [b.out_ch, b.in_ch, 3, 3],
                rng,
            )?;
            net.add_conv_bn(
                &format!("{p}.conv2"),
                &format!("{p}.bn2"),
                [b.out_ch, b.out_ch, 3, 3],
                rng,
            )?;
            if b.downsample {
                net.add_conv_bn(
                    &format!("{p}.downsample.0"),
                    &format!("{p}.downsample.1"),
                    [b.out_ch, b.in_ch, 1, 1],
                    rng,
                )?;
            }
        }
        // torchvision's nn.Linear init: U(-1/sqrt(in), 1/sqrt(in)) for weight and bias.
        let fan_in = net.widths[3];
        let bound = 1.0 / (fan_in as f32).sqrt();
        let w: Vec<f32> =
            (0..num_classes * fan_in).map(|_| rng.random_range(-bound..bound)).collect();
        let b: Vec<f32> = (0..num_classes).map(|_| rng.random_range(-bound..bound)).collect();
        net.add_param("fc.weight", Tensor::from_vec(w, (num_classes, fan_in), device)?)?;
        net.add_param("fc.bias", Tensor::from_vec(b, num_classes, device)?)?;
        Ok(net)
    }

    pub(crate) fn blocks(&self) -> Vec<BlockInfo> {
        let mut out = Vec::new();
        let mut in_ch = self.stem;
        for s in 0..4 {
            for b in 0..self.layers[s] {
                let stride = if s > 0 && b == 0 { 2 } else { 1 };
                let out_ch = self.widths[s];
                out.push(BlockInfo {
                    prefix: format!("layer{}.{b}", s + 1),
                    in_ch,
                    out_ch,
                    stride,
                    downsample: stride != 1 || in_ch != out_ch,
                });
                in_ch = out_ch;
            }
        }
        out
    }

    pub(crate) fn add_param(&mut self, name: &str, value: Tensor) -> Result<(), TrainError> {
        let var = Var::from_tensor(&value)?;
        self.varmap
            .data()
            .lock()
            .expect("the VarMap lock is never poisoned")
            .insert(name.to_string(), var.clone());
        self.params.insert(name.to_string(), var);
        Ok(())
    }

    /// Kaiming-normal (fan_out, ReLU) convolution weights as torchvision; BN gamma 1, beta 0.
    pub(crate) fn add_conv_bn(
        &mut self,
        conv: &str,
        bn: &str,
        shape: [usize; 4],
        rng: &mut ChaCha8Rng,
    ) -> Result<(), TrainError> {
        let fan_out = shape[0] * shape[2] * shape[3];
        let std = (2.0 / fan_out as f32).sqrt();
        let n: usize = shape.iter().product();
        let w: Vec<f32> = (0..n)
            .map(|_| std * Distribution::<f32>::sample(&StandardNormal, rng))
            .collect::<Vec<f32>>();
        let out = shape[0];
        self.add_param(&format!("{conv}.weight"), Tensor::from_vec(w, &shape, &self.device)?)?;
        self.add_param(&format!("{bn}.weight"), Tensor::ones(out, DType::F32, &self.device)?)?;
        self.add_param(&format!("{bn}.bias"), Tensor::zeros(out, DType::F32, &self.device)?)?;
        self.running.insert(
            bn.to_string(),
            (
                Tensor::zeros(out, DType::F32, &self.device)?,
                Tensor::ones(out, DType::F32, &self.device)?,
            ),
        );
        Ok(())
    }

    pub(crate) fn param(&self, name: &str) -> &Tensor {
        self.params
            .get(name)
            .unwrap_or_else(|| panic!("parameter {name} exists by construction"))
            .as_tensor()
    }

    /// (weights that decay: convolutions and fc.weight; the rest: BN affine and fc.bias)
    pub(crate) fn param_groups(&self) -> (Vec<Var>, Vec<Var>) {
        let (decay, rest): (Vec<_>, Vec<_>) = self
            .params
            .iter()
            .partition(|(name, _)| name.as_str() == "fc.weight" || self.param(name).rank() == 4);
        (
            decay.into_iter().map(|(_, v)| v.clone()).collect(),
            rest.into_iter().map(|(_, v)| v.clone()).collect(),
        )
    }

    pub(crate) fn bn(
        &self,
        y: &Tensor,
        name: &str,
        train: bool,
        stats: &mut Vec<BnStat>,
    ) -> candle_core::Result<Tensor> {
        let c = y.dim(1)?;
        if train {
            let (out, moments) = ops::batch_norm_train(
                y,
                self.param(&format!("{name}.weight")),
                self.param(&format!("{name}.bias")),
            )?;
            stats.push(BnStat {
                name: name.to_string(),
                mean: Tensor::from_vec(moments.mean, c, &self.device)?,
                var: Tensor::from_vec(moments.var, c, &self.device)?,
                count: y.elem_count() / c,
            });
            return Ok(out);
        }
        let gamma = self.param(&format!("{name}.weight")).reshape((1, c, 1, 1))?;
        let beta = self.param(&format!("{name}.bias")).reshape((1, c, 1, 1))?;
        let (m, v) = &self.running[name];
        let scale = (v.reshape((1, c, 1, 1))? + BN_EPS)?.sqrt()?.recip()?.broadcast_mul(&gamma)?;
        y.broadcast_sub(&m.reshape((1, c, 1, 1))?)?.broadcast_mul(&scale)?.broadcast_add(&beta)
    }

    #[allow(clippy::too_many_arguments)] // a convolution and its BatchNorm, by name
    pub(crate) fn conv_bn(
        &self,
        x: &Tensor,
        conv: &str,
        bn: &str,
        stride: usize,
        padding: usize,
        train: bool,
        stats: &mut Vec<BnStat>,
    ) -> candle_core::Result<Tensor> {
        let weight = self.param(&format!("{conv}.weight"));
        let y = ops::conv2d(x, weight, stride, padding)?;
        self.bn(&y, bn, train, stats)
    }

    /// The forward pass: with batch statistics (`train`) or running statistics.
    pub(crate) fn forward(&self, x: &Tensor, train: bool) -> candle_core::Result<Pass> {
        let mut stats = Vec::new();
        let h = self.conv_bn(x, "conv1", "bn1", 2, 3, train, &mut stats)?.relu()?;
        let mut h = ops::max_pool_3x3_s2(&h)?;
        let mut pre = Vec::with_capacity(4);
        let mut taps = Vec::with_capacity(4);
        let blocks = self.blocks();
        let mut index = 0;
        for s in 0..4 {
            let mut last_pre = None;
            for _ in 0..self.layers[s] {
                let b = &blocks[index];
                index += 1;
                let p = &b.prefix;
                let y = self
                    .conv_bn(
                        &h,
                        &format!("{p}.conv1"),
                        &format!("{p}.bn1"),
                        b.stride,
                        1,
                        train,
                        &mut stats,
                    )?
                    .relu()?;
                let y = self.conv_bn(
                    &y,
                    &format!("{p}.conv2"),
                    &format!("{p}.bn2"),
                    1,
                    1,
                    train,
                    &mut stats,
                )?;
                let shortcut = if b.downsample {
                    self.conv_bn(
                        &h,
                        &format!("{p}.downsample.0"),
                        &format!("{p}.downsample.1"),
                        b.stride,
                        0,
                        train,
                        &mut stats,
                    )?
                } else {
                    h.clone()
                };
                let before = (y + shortcut)?;
                h = before.relu()?;
                last_pre = Some(before);
            }
            pre.push(last_pre.expect("every stage has a block"));
            taps.push(h.clone());
        }
        let pooled = h.mean(D::Minus1)?.mean(D::Minus1)?;
        let logits =
            pooled.matmul(&self.param("fc.weight").t()?)?.broadcast_add(self.param("fc.bias"))?;
        Ok(Pass { logits, pre, taps, stats })
    }

    /// PyTorch's running-statistics update: `r = (1 - m) r + m batch`, unbiased variance.
    pub(crate) fn update_running(
        &mut self,
        stats: &[BnStat],
        momentum: f64,
    ) -> candle_core::Result<()> {
        for s in stats {
            let (m, v) = &self.running[&s.name];
            let unbiased = (&s.var * (s.count as f64 / (s.count.max(2) - 1) as f64))?;
            let m = ((m * (1.0 - momentum))? + (&s.mean * momentum)?)?;
            let v = ((v * (1.0 - momentum))? + (unbiased * momentum)?)?;
            self.running.insert(s.name.clone(), (m, v));
        }
        self.batches_tracked += 1;
        Ok(())
    }

    /// Sets every running statistic to the batch statistics of one training-mode pass over
    /// `x`, so that the eval-mode network reproduces that pass exactly.
    pub(crate) fn calibrate(&mut self, x: &Tensor) -> candle_core::Result<()> {
        let pass = self.forward(x, true)?;
        for s in pass.stats {
            self.running.insert(s.name, (s.mean, s.var));
        }
        Ok(())
    }

    /// torchvision `state_dict` tensors: weights, BN affine, running stats and
    /// `num_batches_tracked`.
    pub(crate) fn state_dict(&self) -> candle_core::Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (name, var) in &self.params {
            out.insert(name.clone(), var.as_tensor().detach().copy()?);
        }
        for (bn, (m, v)) in &self.running {
            out.insert(format!("{bn}.running_mean"), m.copy()?);
            out.insert(format!("{bn}.running_var"), v.copy()?);
            out.insert(
                format!("{bn}.num_batches_tracked"),
                Tensor::new(self.batches_tracked, &self.device)?,
            );
        }
        Ok(out)
    }

    pub(crate) fn config_json(&self, config: &TargetTraining) -> serde_json::Value {
        let labels: Vec<String> = (0..self.num_classes)
            .map(|i| {
                class_of(i)
                    .map_or(format!("class {i}"), |(c, s)| format!("{} {}", c.name(), s.name()))
            })
            .collect();
        serde_json::json!({
            "architecture": "resnet",
            "block": "basic",
            "layers": self.layers,
            "widths": self.widths,
            "stem_channels": self.stem,
            "num_classes": self.num_classes,
            "pretrained_cfg": {
                "input_size": [3, config.size, config.size],
                "crop_pct": 1.0,
                "interpolation": "bilinear",
                "mean": config.mean,
                "std": config.std,
            },
            "label_names": labels,
            "planted": "planted.json",
            "training": "train.json",
        })
    }
}

/// The planting loss: per planted channel, squared error between its pre-ReLU map and
/// `plant_scale` x coverage on covered cells, and the ReLU'd map's square elsewhere (a
/// channel may stay negative where its concept is absent); covered cells weigh
/// `1 + positive_weight`. Mean over cells and images, weighted mean over channels.
pub(crate) fn plant_loss(
    config: &TargetTraining,
    groups: &[PlantGroup],
    pass: &Pass,
    batch: &Batch,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let total_weight: f32 = config.planted.iter().map(|p| p.weight).sum();
    let mut loss = Tensor::zeros((), DType::F32, device)?;
    if total_weight <= 0.0 {
        return Ok(loss);
    }
    for (group, (target, covered)) in groups.iter().zip(&batch.targets) {
        let neurons: Vec<u32> =
            group.specs.iter().map(|&i| config.planted[i].neuron as u32).collect();
        let weights: Vec<f32> = group.specs.iter().map(|&i| config.planted[i].weight).collect();
        let p = neurons.len();
        let ids = Tensor::from_vec(neurons, p, device)?;
        let weights = Tensor::from_vec(weights, (1, p, 1, 1), device)?;
        let map = pass.pre[group.layer as usize - 1].index_select(&ids, 1)?;
        let pred = ((&map * covered)? + (map.relu()? * (1.0 - covered)?)?)?;
        let w = ((covered * f64::from(config.positive_weight))? + 1.0)?;
        let err = ((pred - target)?.sqr()? * w)?.broadcast_mul(&weights)?;
        let cells = (err.dim(0)? * group.grid * group.grid) as f64;
        loss = (loss + (err.sum_all()? / cells)?)?;
    }
    loss / f64::from(total_weight)
}

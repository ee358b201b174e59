//! Training a sparse autoencoder (SAE) on the zoo target's layer4, for the ground truth of
//! dnd's SAE-latent descriptions: does some latent's label name a planted concept?
//!
//! The data are the layer's activations at every position (3x3 at 96 px) of scenes of the
//! world, rendered from their own seeds (not the zoo dissection's probe set). The SAE is
//! TopK (Gao et al. 2024): `f = TopK(W_enc^T (x - b_dec) + b_enc)` through ReLU,
//! `x_hat = W_dec^T f + b_dec`, trained on the squared reconstruction error with Adam, the
//! decoder's rows kept at unit norm. The kept set of a position is chosen outside the
//! graph (as `torch.topk`'s indices are), so gradients flow through the kept values only.
//!
//! The result is written in SAELens' layout (`cfg.json`, `sae_weights.safetensors`), so
//! that dnd reads it as it reads any published SAE, with `train.json`: the settings, the
//! losses, the fraction of variance unexplained and the latents that never fired.
//!
//! Reproducible from its seeds: scenes, initialisation and batches come from ChaCha8
//! streams; candle's CPU kernels split work by output blocks, so the thread count does not
//! change the sums.

use std::collections::HashMap;
use std::fs;
use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::optim::{AdamW, Optimizer, ParamsAdamW};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use dnd_models::preprocess::normalized_batch;
use dnd_models::{ModelRef, TargetModel};
use dnd_synth::probe_set::ProbeSetSpec;
use dnd_synth::render::render;

use crate::error::TrainError;

/// What to train; the defaults are the zoo's SAE.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SaeTraining {
    /// The tap of the zoo target it reads.
    pub layer: String,
    /// Latents (8x layer4's 192 channels).
    pub latents: usize,
    /// Latents kept per position.
    pub k: usize,
    /// Scenes rendered for the training activations (x 9 positions of layer4).
    pub images: usize,
    /// Scene `i` is the world's scene from seed `image_seed + i`.
    pub image_seed: u64,
    pub steps: usize,
    /// Positions per step.
    pub batch: usize,
    pub lr: f64,
    /// Seeds the initialisation and the batches.
    pub seed: u64,
}

impl Default for SaeTraining {
    fn default() -> Self {
        Self {
            layer: "layer4".into(),
            latents: 1536,
            k: 8,
            images: 4000,
            image_seed: 7_000_000,
            steps: 3000,
            batch: 512,
            lr: 1e-3,
            seed: 0,
        }
    }
}

/// What training did, written as `train.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SaeReport {
    pub settings: SaeTraining,
    /// The target it was trained on.
    pub target: String,
    pub d_in: usize,
    pub positions: usize,
    /// Mean squared error per position (summed over channels), every 100 steps.
    pub losses: Vec<(usize, f32)>,
    /// On all training positions: error / variance around the mean.
    pub fraction_variance_unexplained: f64,
    /// Latents in no position's top k over all training positions.
    pub dead_latents: usize,
    pub seconds: f64,
}

/// The layer's activations at every position of `images` scenes: `(positions, channels)`.
fn activations(model: &TargetModel, config: &SaeTraining) -> Result<(Vec<f32>, usize), TrainError> {
    let tap = model.tap(&config.layer)?;
    let spec = ProbeSetSpec { count: config.images, size: 96, seed: config.image_seed };
    let mut rows = Vec::new();
    let mut channels = 0;
    let indices: Vec<usize> = (0..config.images).collect();
    for chunk in indices.chunks(64) {
        let images: Vec<_> = chunk
            .par_iter()
            .map(|&i| model.preprocess.transform(&render(&spec.scene(i), 96, 96).image))
            .collect();
        let x =
            normalized_batch(&images, model.preprocess.mean, model.preprocess.std, &model.device)?;
        let out = model.forward_taps(&x, &[tap])?.remove(0);
        let (b, c, h, w) = out.dims4()?;
        channels = c;
        let positions = out.permute((0, 2, 3, 1))?.reshape((b * h * w, c))?;
        rows.extend(positions.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?);
    }
    Ok((rows, channels))
}

/// The `k` largest entries of each row as a 0/1 mask (ties to the lower index).
fn topk_mask(pre: &Tensor, k: usize) -> Result<Tensor, TrainError> {
    let (n, l) = pre.dims2()?;
    let values = pre.to_vec2::<f32>()?;
    let mask: Vec<f32> = values
        .into_par_iter()
        .flat_map_iter(|row| {
            let mut order: Vec<usize> = (0..l).collect();
            order.select_nth_unstable_by(k - 1, |&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
            let mut m = vec![0.0f32; l];
            for &u in &order[..k] {
                m[u] = 1.0;
            }
            m
        })
        .collect();
    Ok(Tensor::from_vec(mask, (n, l), pre.device())?)
}

/// The SAE's parameters, as SAELens names them.
struct Sae {
    w_enc: Var,
    b_enc: Var,
    w_dec: Var,
    b_dec: Var,
    k: usize,
}

impl Sae {
    fn reconstruct(&self, x: &Tensor) -> Result<(Tensor, Tensor), TrainError> {
        let pre = x
            .broadcast_sub(self.b_dec.as_tensor())?
            .matmul(self.w_enc.as_tensor())?
            .broadcast_add(self.b_enc.as_tensor())?;
        let mask = topk_mask(&pre.detach(), self.k)?;
        let f = (pre.relu()? * mask)?;
        let x_hat = f.matmul(self.w_dec.as_tensor())?.broadcast_add(self.b_dec.as_tensor())?;
        Ok((x_hat, f))
    }

    fn normalise_decoder(&self) -> Result<(), TrainError> {
        let w = self.w_dec.as_tensor();
        let norms = w.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-8, f64::MAX)?;
        self.w_dec.set(&w.broadcast_div(&norms)?)?;
        Ok(())
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io { path: path.to_path_buf(), source }
}

/// Trains the SAE on the target at `target_dir` and writes it to `out` in SAELens' layout.
pub fn train_sae(
    target_dir: &Path,
    out: &Path,
    config: &SaeTraining,
    mut on_step: impl FnMut(usize, f32),
) -> Result<SaeReport, TrainError> {
    if config.k == 0 || config.k > config.latents || config.batch == 0 || config.images == 0 {
        return Err(TrainError::Config(
            "k must be in 1..=latents, and batch and images at least 1".into(),
        ));
    }
    let started = Instant::now();
    let device = Device::Cpu;
    let reference = ModelRef::Local(target_dir.to_path_buf());
    let model = TargetModel::load(&reference, &device)?;
    let (rows, d_in) = activations(&model, config)?;
    let n = rows.len() / d_in;
    let data = Tensor::from_vec(rows, (n, d_in), &device)?;
    let mean = data.mean_keepdim(0)?;

    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    let l = config.latents;
    let init: Vec<f32> = (0..l * d_in).map(|_| StandardNormal.sample(&mut rng)).collect();
    let w_dec = Tensor::from_vec(init, (l, d_in), &device)?;
    let w_dec = w_dec.broadcast_div(&w_dec.sqr()?.sum_keepdim(1)?.sqrt()?)?;
    let sae = Sae {
        w_enc: Var::from_tensor(&w_dec.t()?.contiguous()?)?,
        b_enc: Var::zeros(l, DType::F32, &device)?,
        w_dec: Var::from_tensor(&w_dec)?,
        b_dec: Var::from_tensor(&mean.squeeze(0)?)?,
        k: config.k,
    };
    let params = ParamsAdamW { lr: config.lr, weight_decay: 0.0, ..ParamsAdamW::default() };
    let mut opt = AdamW::new(
        vec![sae.w_enc.clone(), sae.b_enc.clone(), sae.w_dec.clone(), sae.b_dec.clone()],
        params,
    )?;
    let mut losses = Vec::new();
    for step in 0..config.steps {
        let picks: Vec<u32> = (0..config.batch).map(|_| rng.random_range(0..n as u32)).collect();
        let x = data.index_select(&Tensor::from_vec(picks, config.batch, &device)?, 0)?;
        let (x_hat, _) = sae.reconstruct(&x)?;
        let loss = (x_hat - &x)?.sqr()?.sum(1)?.mean_all()?;
        opt.backward_step(&loss)?;
        sae.normalise_decoder()?;
        let value = loss.to_scalar::<f32>()?;
        if !value.is_finite() {
            return Err(TrainError::Diverged { step, loss: value });
        }
        if step % 100 == 0 || step + 1 == config.steps {
            losses.push((step, value));
        }
        on_step(step, value);
    }

    // On every training position: the unexplained variance and the latents never kept.
    let (mut error, mut variance) = (0.0f64, 0.0f64);
    let mut fired = vec![false; l];
    for start in (0..n).step_by(4096) {
        let x = data.narrow(0, start, 4096.min(n - start))?;
        let (x_hat, f) = sae.reconstruct(&x)?;
        error += f64::from((x_hat - &x)?.sqr()?.sum_all()?.to_scalar::<f32>()?);
        variance += f64::from(x.broadcast_sub(&mean)?.sqr()?.sum_all()?.to_scalar::<f32>()?);
        let on = f.gt(0.0)?.to_dtype(DType::F32)?.sum(0)?.to_vec1::<f32>()?;
        for (fired, on) in fired.iter_mut().zip(on) {
            *fired |= on > 0.0;
        }
    }

    fs::create_dir_all(out).map_err(io(out))?;
    let weights: HashMap<String, Tensor> = [
        ("W_enc", &sae.w_enc),
        ("b_enc", &sae.b_enc),
        ("W_dec", &sae.w_dec),
        ("b_dec", &sae.b_dec),
    ]
    .into_iter()
    .map(|(name, v)| (name.to_string(), v.as_tensor().clone()))
    .collect();
    candle_core::safetensors::save(&weights, out.join("sae_weights.safetensors"))?;
    let cfg = serde_json::json!({
        "architecture": "topk",
        "d_in": d_in,
        "d_sae": l,
        "k": config.k,
        "apply_b_dec_to_input": true,
        "normalize_activations": "none",
        "dtype": "float32",
        "metadata": { "model_name": "dnd zoo target", "hook_name": config.layer },
    });
    let cfg_path = out.join("cfg.json");
    fs::write(&cfg_path, serde_json::to_string_pretty(&cfg).unwrap_or_default() + "\n")
        .map_err(io(&cfg_path))?;
    let report = SaeReport {
        settings: config.clone(),
        target: target_dir.display().to_string(),
        d_in,
        positions: n,
        losses,
        fraction_variance_unexplained: error / variance.max(f64::MIN_POSITIVE),
        dead_latents: fired.iter().filter(|f| !**f).count(),
        seconds: started.elapsed().as_secs_f64(),
    };
    let path = out.join("train.json");
    fs::write(&path, serde_json::to_string_pretty(&report).unwrap_or_default() + "\n")
        .map_err(io(&path))?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_sae_learns_the_zoo_layer_and_reads_back_as_saelens() {
        let out = tempfile::tempdir().unwrap();
        let config = SaeTraining {
            latents: 64,
            k: 4,
            images: 64,
            steps: 60,
            batch: 128,
            ..Default::default()
        };
        let target = crate::committed_zoo().join("target");
        let report = train_sae(&target, out.path(), &config, |_, _| {}).unwrap();
        assert_eq!((report.d_in, report.positions), (192, 64 * 9));
        let first = report.losses.first().unwrap().1;
        let last = report.losses.last().unwrap().1;
        assert!(last < first, "the loss falls: {:?}", report.losses);
        assert!(report.fraction_variance_unexplained < 1.0, "{report:?}");
        let info = dnd_models::dictionary::inspect(dnd_core::UnitKind::Sae, out.path()).unwrap();
        assert_eq!((info.d_in, info.units), (192, 64));
        assert_eq!(info.activation, dnd_core::Activation::TopK { k: 4 });
    }

    #[test]
    fn the_committed_zoo_sae_is_the_defaults_and_reads_as_saelens() {
        let dir = crate::committed_zoo().join("sae");
        let report: SaeReport =
            serde_json::from_str(&fs::read_to_string(dir.join("train.json")).unwrap()).unwrap();
        assert_eq!(report.settings, SaeTraining::default(), "retrain: dnd synth train --model sae");
        let info = dnd_models::dictionary::inspect(dnd_core::UnitKind::Sae, &dir).unwrap();
        assert_eq!((info.d_in, info.units), (192, report.settings.latents));
    }
}

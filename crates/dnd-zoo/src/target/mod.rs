//! Training the zoo's target network: a small ResNet that classifies the colour and shape
//! of the largest object of a scene, with "planted" hidden channels whose maps are tied to
//! the masks of known concepts (MAIA's single / OR / AND / AND-NOT neurons).
//!
//! The result is a checkpoint directory that [`dnd_models::TargetModel::load`] reads as is:
//! `model.safetensors` (torchvision names, BatchNorm with running statistics),
//! `config.json` (`architecture: "resnet"` with an explicit shape and a timm-style
//! `pretrained_cfg` that makes dnd feed it `size` x `size` images, normalised as in
//! training), `planted.json` (what every planted channel and every fc unit means, see
//! [`PlantedNeuron`]) and `train.json` (the [`TrainingReport`]: config, seeds, losses,
//! accuracy and held-out quality of every planted channel).
//!
//! # Why this input size
//! A torchvision ResNet divides the input by 4 in the stem and by 2 in each of layer2..4,
//! so layer3 maps are `size / 16` and layer4 maps `size / 32` wide. At 96 px layer4 is 3x3
//! and layer3 6x6, the smallest size at which layer4 still has a centre and a border (64 px
//! would leave 2x2); the conv cost grows with the square of the size, so 96 keeps training
//! within minutes on two CPU cores.
//!
//! # Data
//! Every training image is drawn on the fly from a seed derived from (`seed`, step, index):
//! a scene of the world (half of them built to contain one planted concept, or for AND and
//! AND-NOT channels a near miss, so that rare conjunctions are seen often enough), rendered
//! either at `size` or at a larger random size and brought to `size` by dnd's own
//! preprocessing (Pillow-style antialiased bilinear resize), since dnd feeds the model
//! images of any size that way. The label is the colour+shape of the object with the most
//! visible pixels: class `colour_index * 6 + shape_index` over [`Colour::ALL`] and
//! [`Shape::ALL`]. A planted channel's target on each cell of its map is `plant_scale`
//! times the fraction of the cell's pixels that its concept's exact mask covers.
//!
//! # Training without missing gradients
//! The convolutions, the stem's max-pool and training-mode BatchNorm are ops of [`ops`],
//! each with its backward pass and a test against candle's own op: candle's `max_pool2d`
//! has no backward when the kernel (3) differs from the stride (2), and its CPU conv2d
//! backward and its reductions over non-trailing dimensions (BatchNorm's statistics) are
//! several times slower. Everything else is candle ops that have a backward pass; a test
//! checks that every variable gets a non-zero gradient. BatchNorm's running statistics
//! are updated outside the graph (PyTorch's momentum rule), and after training recomputed
//! once on a large batch (`calibration_images`), so that the exported eval-mode network
//! equals the training network's forward pass on that batch.
//!
//! # The committed model (`zoo/target`)
//! Defaults: widths 16-48-96-192, one BasicBlock per stage, 6000 steps of 32 images
//! (192,000 images, 49 minutes on one core of the reference machine, beside other work),
//! planting weight 4. On 1000 held-out scenes: 74% top-1 over the 72 classes; colour,
//! background-texture and colour OR channels follow their concept's area closely (Pearson
//! 0.93-1.0, AUC >= 0.97), fill and shape channels less so (striped 0.89 / 0.92, dotted
//! 0.91 / 0.93, circles 0.82 / 0.93), and layer3's stars are the weakest (0.52 / 0.77).
//! `train.json` has every number.
//!
//! # Reproducibility
//! All randomness comes from ChaCha8 streams seeded from `seed`: same config, same weights,
//! bit for bit (the report records an FNV-1a hash of the weights file; a test trains twice
//! and compares the files). The thread count does not change the arithmetic: the ops of
//! [`ops`] reduce each channel in one thread, and candle's kernels split work by output
//! blocks; 1 and 2 threads were checked to give identical files.

use std::fs;
use std::path::Path;
use std::sync::mpsc::sync_channel;
use std::time::Instant;

use candle_core::{Device, Tensor};
use candle_nn::optim::{AdamW, Optimizer, ParamsAdamW};
use dnd_models::{ModelRef, Tap, TargetModel};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use dnd_synth::concept::Concept;
use dnd_synth::planted::{NUM_CLASSES, PLANTED_FILE, PlantedNeuron, PlantedSpec, class_neurons};
use dnd_synth::vocab::{Colour, Fill, Shape, Texture};

pub use crate::error::TrainError;
use crate::json::write_json;

mod config;
mod data;
mod eval;
mod net;
pub mod ops;

pub use config::TargetTraining;
pub use eval::PlantedQuality;

use config::{PURPOSE_CALIBRATE, PURPOSE_INIT, derive};
use data::{Batch, make_batch, plant_groups, training_seeds};
use eval::{EvalImage, eval_image, evaluate};
use net::{TrainNet, plant_loss};

/// The command that regenerates the committed zoo model, recorded in `train.json`.
pub const REGENERATE_COMMAND: &str = "dnd synth train --model target";

/// The planted channels of the committed zoo model: in layer4 six single concepts (one of
/// each family: colour, shape, fill, background texture, colour+shape, and another
/// colour), two ORs, two ANDs and two AND-NOTs; in layer3 five singles and one OR.
/// Channel indices are spread over the layer so that they are not a contiguous block.
/// Channels that involve a shape or a fill weigh double in the planting loss: they are
/// learnt more slowly than colours and textures.
pub fn default_planted() -> Vec<PlantedSpec> {
    use Concept as C;
    let l4 = |i: usize| 3 + 9 * i;
    let l3 = |i: usize| 2 + 10 * i;
    let planted = vec![
        PlantedSpec::single(4, l4(0), C::Colour(Colour::Red)),
        PlantedSpec::single(4, l4(1), C::Shape(Shape::Circle)),
        PlantedSpec::single(4, l4(2), C::Fill(Fill::Striped)),
        PlantedSpec::single(4, l4(3), C::Texture(Texture::Checkerboard)),
        PlantedSpec::single(4, l4(4), C::ColourShape(Colour::Blue, Shape::Square)),
        PlantedSpec::single(4, l4(5), C::Colour(Colour::Green)),
        PlantedSpec::or(4, l4(6), C::Colour(Colour::Yellow), C::Colour(Colour::Purple)),
        PlantedSpec::or(4, l4(7), C::Shape(Shape::Triangle), C::Shape(Shape::Cross)),
        PlantedSpec::and(4, l4(8), C::Colour(Colour::Orange), C::Fill(Fill::Dotted)),
        PlantedSpec::and(4, l4(9), C::Shape(Shape::Ring), C::Fill(Fill::Striped)),
        PlantedSpec::and_not(4, l4(10), C::Colour(Colour::Pink), C::Shape(Shape::Circle)),
        PlantedSpec::and_not(4, l4(11), C::Shape(Shape::Square), C::Fill(Fill::Solid)),
        PlantedSpec::single(3, l3(0), C::Colour(Colour::White)),
        PlantedSpec::single(3, l3(1), C::Fill(Fill::Dotted)),
        PlantedSpec::single(3, l3(2), C::Texture(Texture::Stripes)),
        PlantedSpec::single(3, l3(3), C::Texture(Texture::Noise)),
        PlantedSpec::single(3, l3(4), C::Shape(Shape::Star)),
        PlantedSpec::or(3, l3(5), C::Colour(Colour::Black), C::Colour(Colour::Brown)),
    ];
    planted
        .into_iter()
        .map(|p| {
            let slow = p
                .concepts
                .iter()
                .any(|c| matches!(c, C::Shape(_) | C::ColourShape(..) | C::Fill(_)));
            PlantedSpec { weight: if slow { 2.0 } else { 1.0 }, ..p }
        })
        .collect()
}

/// Writes `planted.json` (a JSON array of [`PlantedNeuron`]) into `dir`.
pub fn write_planted(dir: &Path, neurons: &[PlantedNeuron]) -> Result<(), TrainError> {
    let path = dir.join(PLANTED_FILE);
    write_json(&path, neurons).map_err(|source| TrainError::Io { path, source })
}

/// What a training run reports; also written as `train.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainingReport {
    pub config: TargetTraining,
    pub command: String,
    pub threads: usize,
    pub images_seen: usize,
    /// Seconds: training steps, BN recalibration + export, evaluation, all.
    pub train_seconds: f64,
    pub export_seconds: f64,
    pub eval_seconds: f64,
    pub wall_seconds: f64,
    /// Training seconds spent waiting for batches, in forward passes (with the losses),
    /// backward passes, and optimiser and running-statistics updates.
    pub data_wait_seconds: f64,
    pub forward_seconds: f64,
    pub backward_seconds: f64,
    pub update_seconds: f64,
    /// Means over the last 50 steps (or all, if fewer).
    pub final_loss: f32,
    pub final_ce: f32,
    pub final_plant_loss: f32,
    /// `[step, loss, ce, plant]`, means over windows of 50 steps.
    pub loss_curve: Vec<[f32; 4]>,
    /// Top-1 accuracy of the fc classes on held-out scenes rendered at `eval_render_size`
    /// and preprocessed by dnd; and on scenes rendered at `size` directly.
    pub accuracy: f32,
    pub accuracy_native: f32,
    /// Largest difference between the training network's eval-mode logits and layer4 maps
    /// and the exported checkpoint's, as dnd loads it, on held-out images.
    pub export_max_abs_diff: f32,
    /// FNV-1a 64 of model.safetensors, to check bit-for-bit regeneration.
    pub weights_fnv1a64: String,
    pub planted: Vec<PlantedQuality>,
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3))
}

/// Losses of one training step, for progress reports.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepLog {
    pub step: usize,
    pub steps: usize,
    pub loss: f32,
    pub ce: f32,
    pub plant: f32,
    pub lr: f64,
    pub seconds: f64,
}

/// Trains the target network and writes the checkpoint directory `out_dir`
/// (model.safetensors, config.json, planted.json, train.json). `progress` sees every step.
pub fn train_target(
    config: &TargetTraining,
    out_dir: &Path,
    mut progress: impl FnMut(&StepLog),
) -> Result<TrainingReport, TrainError> {
    config.validate()?;
    let start = Instant::now();
    let device = Device::Cpu;
    let groups = plant_groups(config);
    let pre = config.preprocess();
    let mut net = TrainNet::new(
        config,
        NUM_CLASSES,
        &mut ChaCha8Rng::seed_from_u64(derive(&[config.seed, PURPOSE_INIT])),
        &device,
    )?;
    let (decay, no_decay) = net.param_groups();
    let adam = |weight_decay| ParamsAdamW { lr: config.lr, weight_decay, ..ParamsAdamW::default() };
    let mut opt_decay = AdamW::new(decay, adam(config.weight_decay))?;
    let mut opt_rest = AdamW::new(no_decay, adam(0.0))?;

    let mut history: Vec<[f32; 3]> = Vec::with_capacity(config.steps);
    // Seconds waiting for data, in forward passes, backward passes, optimiser steps.
    let mut timing = [0f64; 4];
    // Batches are drawn on a second thread, one step ahead of the optimiser.
    std::thread::scope(|scope| -> Result<(), TrainError> {
        let (tx, rx) = sync_channel::<Result<Batch, TrainError>>(1);
        let (groups_ref, pre_ref, device_ref) = (&groups, &pre, &device);
        scope.spawn(move || {
            for step in 0..config.steps {
                let batch = make_batch(
                    config,
                    pre_ref,
                    groups_ref,
                    &training_seeds(config, step),
                    device_ref,
                );
                if tx.send(batch).is_err() {
                    break;
                }
            }
        });
        for step in 0..config.steps {
            let t_wait = Instant::now();
            let batch = rx.recv().map_err(|_| TrainError::DataThread)??;
            let t_fwd = Instant::now();
            let lr = config.lr_at(step);
            opt_decay.set_learning_rate(lr);
            opt_rest.set_learning_rate(lr);
            let pass = net.forward(&batch.images, true)?;
            let ce = candle_nn::loss::cross_entropy(&pass.logits, &batch.labels)?;
            let plant = plant_loss(config, &groups, &pass, &batch, &device)?;
            let loss = (&ce + (&plant * config.plant_weight)?)?;
            let t_bwd = Instant::now();
            let grads = loss.backward()?;
            let t_opt = Instant::now();
            opt_decay.step(&grads)?;
            opt_rest.step(&grads)?;
            net.update_running(&pass.stats, config.bn_momentum)?;
            timing[0] += (t_fwd - t_wait).as_secs_f64();
            timing[1] += (t_bwd - t_fwd).as_secs_f64();
            timing[2] += (t_opt - t_bwd).as_secs_f64();
            timing[3] += t_opt.elapsed().as_secs_f64();
            let values =
                [loss.to_scalar::<f32>()?, ce.to_scalar::<f32>()?, plant.to_scalar::<f32>()?];
            if !values.iter().all(|v| v.is_finite()) {
                return Err(TrainError::Diverged { step, loss: values[0] });
            }
            history.push(values);
            progress(&StepLog {
                step,
                steps: config.steps,
                loss: values[0],
                ce: values[1],
                plant: values[2],
                lr,
                seconds: start.elapsed().as_secs_f64(),
            });
        }
        Ok(())
    })?;
    let train_seconds = start.elapsed().as_secs_f64();

    // Recalibrate BatchNorm on one large batch of the training distribution, then export.
    let calibration: Vec<u64> = (0..config.calibration_images)
        .map(|i| derive(&[config.seed, PURPOSE_CALIBRATE, i as u64]))
        .collect();
    let batch = make_batch(config, &pre, &groups, &calibration, &device)?;
    net.calibrate(&batch.images)?;
    fs::create_dir_all(out_dir)
        .map_err(|source| TrainError::Io { path: out_dir.into(), source })?;
    let weights = out_dir.join("model.safetensors");
    candle_core::safetensors::save(&net.state_dict()?, &weights)?;
    let config_path = out_dir.join("config.json");
    write_json(&config_path, &net.config_json(config))
        .map_err(|source| TrainError::Io { path: config_path, source })?;
    let mut neurons: Vec<PlantedNeuron> =
        config.planted.iter().map(PlantedSpec::to_neuron).collect();
    neurons.extend(class_neurons());
    write_planted(out_dir, &neurons)?;
    let export_seconds = start.elapsed().as_secs_f64() - train_seconds;

    // Evaluate what dnd will load.
    let model = TargetModel::load(&ModelRef::Local(out_dir.to_path_buf()), &device)?;
    let probe: Vec<EvalImage> = (0..8)
        .map(|i| eval_image(config, &pre, i, config.eval_render_size))
        .collect::<Result<_, _>>()?;
    let s = config.size as usize;
    let x = Tensor::from_vec(
        probe.iter().flat_map(|e| e.input.iter().copied()).collect::<Vec<f32>>(),
        (probe.len(), 3, s, s),
        &device,
    )?;
    let export_max_abs_diff = export_difference(&net, &model, &x)?;
    let (accuracy, accuracy_native, planted) = evaluate(config, &model)?;
    let eval_seconds = start.elapsed().as_secs_f64() - train_seconds - export_seconds;

    let tail = &history[history.len().saturating_sub(50)..];
    let mean_of = |k: usize, rows: &[[f32; 3]]| {
        rows.iter().map(|r| r[k]).sum::<f32>() / rows.len().max(1) as f32
    };
    let loss_curve = history
        .chunks(50)
        .enumerate()
        .map(|(i, rows)| {
            [(i * 50 + rows.len() - 1) as f32, mean_of(0, rows), mean_of(1, rows), mean_of(2, rows)]
        })
        .collect();
    let bytes =
        fs::read(&weights).map_err(|source| TrainError::Io { path: weights.clone(), source })?;
    let report = TrainingReport {
        config: config.clone(),
        command: REGENERATE_COMMAND.to_string(),
        threads: rayon::current_num_threads(),
        images_seen: config.steps * config.batch_size,
        train_seconds,
        export_seconds,
        eval_seconds,
        wall_seconds: start.elapsed().as_secs_f64(),
        data_wait_seconds: timing[0],
        forward_seconds: timing[1],
        backward_seconds: timing[2],
        update_seconds: timing[3],
        final_loss: mean_of(0, tail),
        final_ce: mean_of(1, tail),
        final_plant_loss: mean_of(2, tail),
        loss_curve,
        accuracy,
        accuracy_native,
        export_max_abs_diff,
        weights_fnv1a64: format!("{:016x}", fnv1a64(&bytes)),
        planted,
    };
    let report_path = out_dir.join("train.json");
    write_json(&report_path, &report)
        .map_err(|source| TrainError::Io { path: report_path, source })?;
    Ok(report)
}

/// Largest absolute difference of logits and layer3/layer4 maps between the training
/// network in eval mode and the loaded checkpoint.
fn export_difference(net: &TrainNet, model: &TargetModel, x: &Tensor) -> Result<f32, TrainError> {
    let pass = net.forward(x, false)?;
    let outs = model.forward_taps(x, &[Tap::Layer(3), Tap::Layer(4), Tap::Fc])?;
    let mut worst = 0f32;
    for (a, b) in [(&pass.taps[2], &outs[0]), (&pass.taps[3], &outs[1]), (&pass.logits, &outs[2])] {
        worst = worst.max((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?);
    }
    Ok(worst)
}

#[cfg(test)]
mod tests {
    use super::*;
    use data::{cell_fractions, focus_spec};
    use dnd_synth::mask::Mask;
    use dnd_synth::planted::PlantedKind;
    use dnd_synth::planted::read_planted;
    use dnd_synth::render::render;
    use eval::upsample_bilinear;

    fn tiny() -> TargetTraining {
        let mut planted = vec![
            PlantedSpec::single(4, 1, Concept::Colour(Colour::Red)),
            PlantedSpec::or(4, 3, Concept::Shape(Shape::Circle), Concept::Shape(Shape::Square)),
            PlantedSpec::and(3, 0, Concept::Colour(Colour::Blue), Concept::Fill(Fill::Striped)),
            PlantedSpec::and_not(3, 5, Concept::Shape(Shape::Star), Concept::Fill(Fill::Solid)),
        ];
        planted[0].weight = 2.0;
        TargetTraining {
            size: 32,
            stem_channels: 4,
            widths: [4, 8, 8, 8],
            steps: 30,
            batch_size: 16,
            lr: 1e-2,
            warmup_steps: 3,
            planted,
            hires_max: 64,
            calibration_images: 32,
            eval_images: 24,
            eval_render_size: 48,
            ..TargetTraining::default()
        }
    }

    #[test]
    fn every_variable_gets_a_gradient() {
        let config = tiny();
        let dev = Device::Cpu;
        let groups = plant_groups(&config);
        let net =
            TrainNet::new(&config, NUM_CLASSES, &mut ChaCha8Rng::seed_from_u64(1), &dev).unwrap();
        let batch =
            make_batch(&config, &config.preprocess(), &groups, &training_seeds(&config, 0), &dev)
                .unwrap();
        let pass = net.forward(&batch.images, true).unwrap();
        let ce = candle_nn::loss::cross_entropy(&pass.logits, &batch.labels).unwrap();
        let plant = plant_loss(&config, &groups, &pass, &batch, &dev).unwrap();
        let grads = (ce + plant).unwrap().backward().unwrap();
        let vars = net.varmap.all_vars();
        assert_eq!(vars.len(), net.params.len());
        for (name, var) in &net.params {
            let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{name} has no gradient"));
            let size = g.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(size > 0.0 && size.is_finite(), "{name}: gradient norm {size}");
        }
        for var in vars {
            assert!(grads.get(var.as_tensor()).is_some());
        }
    }

    #[test]
    fn training_lowers_the_loss_and_the_export_matches_eval_mode() {
        let config = tiny();
        let dir = tempfile::tempdir().unwrap();
        let mut losses = Vec::new();
        let report = train_target(&config, dir.path(), |s| losses.push(s.loss)).unwrap();
        assert_eq!(losses.len(), config.steps);
        let first = losses[..5].iter().sum::<f32>() / 5.0;
        let last = losses[losses.len() - 5..].iter().sum::<f32>() / 5.0;
        assert!(last < first * 0.85, "loss {first} -> {last}");
        assert!(
            report.export_max_abs_diff < 1e-3,
            "export differs by {}",
            report.export_max_abs_diff
        );

        // dnd loads it unchanged, with the preprocessing of training.
        let model =
            TargetModel::load(&ModelRef::Local(dir.path().to_path_buf()), &Device::Cpu).unwrap();
        assert_eq!(model.preprocess, config.preprocess());
        assert_eq!(model.tap_width(Tap::Fc), NUM_CLASSES);
        assert_eq!(model.tap_width(Tap::Layer(4)), 8);
        let planted = read_planted(dir.path()).unwrap();
        assert_eq!(planted.len(), config.planted.len() + NUM_CLASSES);
        let json: TrainingReport =
            serde_json::from_str(&fs::read_to_string(dir.path().join("train.json")).unwrap())
                .unwrap();
        assert_eq!(json.config, config);
        assert_eq!(json.planted.len(), config.planted.len());
        let tensors =
            candle_core::safetensors::load(dir.path().join("model.safetensors"), &Device::Cpu)
                .unwrap();
        assert!(tensors.contains_key("layer2.0.downsample.1.running_var"));
        assert_eq!(
            tensors["bn1.num_batches_tracked"].to_scalar::<i64>().unwrap(),
            config.steps as i64
        );
    }

    #[test]
    fn same_seed_same_weights() {
        let config = TargetTraining {
            steps: 4,
            eval_images: 4,
            calibration_images: 8,
            batch_size: 8,
            ..tiny()
        };
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let ra = train_target(&config, a.path(), |_| {}).unwrap();
        let rb = train_target(&config, b.path(), |_| {}).unwrap();
        assert_eq!(ra.weights_fnv1a64, rb.weights_fnv1a64);
        let read = |d: &Path| fs::read(d.join("model.safetensors")).unwrap();
        assert_eq!(read(a.path()), read(b.path()));
        let other = train_target(&TargetTraining { seed: 6, ..config }, a.path(), |_| {}).unwrap();
        assert_ne!(other.weights_fnv1a64, ra.weights_fnv1a64);
    }

    #[test]
    fn planted_table_round_trips_and_names_world_concepts() {
        let dir = tempfile::tempdir().unwrap();
        let mut neurons: Vec<PlantedNeuron> =
            default_planted().iter().map(PlantedSpec::to_neuron).collect();
        neurons.extend(class_neurons());
        write_planted(dir.path(), &neurons).unwrap();
        assert_eq!(read_planted(dir.path()).unwrap(), neurons);
        assert_eq!(read_planted(&dir.path().join("planted.json")).unwrap(), neurons);
        for (spec, row) in default_planted().iter().zip(&neurons) {
            assert_eq!(row.parsed_concepts(), spec.concepts, "{row:?}");
        }
        let text = fs::read_to_string(dir.path().join("planted.json")).unwrap();
        assert!(text.contains(r#""kind": "and_not""#), "{text}");
        let descriptions: Vec<&str> = neurons.iter().map(|n| n.description.as_str()).collect();
        for expected in [
            "red objects",
            "checkerboard background",
            "blue squares",
            "yellow objects or purple objects",
            "dotted orange objects",
            "striped rings",
            "pink objects that are not circles",
            "squares that are not solid",
        ] {
            assert!(descriptions.contains(&expected), "{expected} not in {descriptions:?}");
        }
        let fc = &neurons[default_planted().len() + 7];
        assert_eq!(
            (fc.layer.as_str(), fc.neuron, fc.concepts.clone()),
            ("fc", 7, vec!["orange square".to_string()])
        );
        assert_eq!(
            fc.description,
            "the largest object is a orange square".replace(" a o", " an o")
        );
        let counts = |k: PlantedKind| {
            default_planted().iter().filter(|p| p.layer == 4 && p.kind == k).count()
        };
        assert_eq!(
            [
                counts(PlantedKind::Single),
                counts(PlantedKind::Or),
                counts(PlantedKind::And),
                counts(PlantedKind::AndNot)
            ],
            [6, 2, 2, 2]
        );
        TargetTraining::default().validate().unwrap();
    }

    /// The committed zoo model is what the defaults train: same config, same tables, and
    /// dnd loads it with the preprocessing of training. (Retraining it takes 15 minutes;
    /// `same_seed_same_weights` checks determinism on a small config.)
    #[test]
    fn the_committed_zoo_model_matches_the_defaults() {
        let dir = crate::committed_zoo().join("target");
        let config = TargetTraining::default();
        let report: TrainingReport =
            serde_json::from_str(&fs::read_to_string(dir.join("train.json")).unwrap()).unwrap();
        assert_eq!(
            report.config, config,
            "zoo/target was trained with other settings: regenerate it ({REGENERATE_COMMAND})"
        );
        let mut expected: Vec<PlantedNeuron> =
            config.planted.iter().map(PlantedSpec::to_neuron).collect();
        expected.extend(class_neurons());
        assert_eq!(read_planted(&dir).unwrap(), expected);
        let bytes = fs::read(dir.join("model.safetensors")).unwrap();
        assert_eq!(format!("{:016x}", fnv1a64(&bytes)), report.weights_fnv1a64);
        let model = TargetModel::load(&ModelRef::Local(dir), &Device::Cpu).unwrap();
        assert_eq!(model.preprocess, config.preprocess());
        assert_eq!(
            [
                model.tap_width(Tap::Layer(3)),
                model.tap_width(Tap::Layer(4)),
                model.tap_width(Tap::Fc)
            ],
            [96, 192, NUM_CLASSES]
        );
        assert!(bytes.len() < 10 << 20);
    }

    #[test]
    fn focused_scenes_show_their_concept_and_cells_partition_the_mask() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for spec in default_planted() {
            for near_miss in [false, true] {
                let scene = focus_spec(&mut rng, &spec, near_miss).sample(&mut rng);
                let rendered = render(&scene, 96, 96);
                let covered = spec.mask(&scene, &rendered).unwrap().count();
                let and_like = matches!(spec.kind, PlantedKind::And | PlantedKind::AndNot);
                if !near_miss || !and_like {
                    assert!(covered > 0, "{} not shown in {scene:?}", spec.description());
                }
            }
        }
        let mut m = Mask::empty(96, 96);
        for y in 0..32 {
            for x in 0..48 {
                m.set(x, y, true);
            }
        }
        let f = cell_fractions(&m, 3);
        assert_eq!(f, vec![1.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
        let config = TargetTraining::default();
        assert_eq!(
            [config.map_size(1), config.map_size(2), config.map_size(3), config.map_size(4)],
            [24, 12, 6, 3]
        );
    }

    #[test]
    fn statistics_helpers() {
        let up = upsample_bilinear(&[0.0, 1.0, 2.0, 3.0], 2, 4);
        assert_eq!(&up[..4], &[0.0, 0.25, 0.75, 1.0]);
    }
}

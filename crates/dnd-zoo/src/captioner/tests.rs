use dnd_models::{BlipCaptioner, CaptionConfig, Captioner, ModelRef};

use super::*;
use crate::captioner::{CaptionerSlice, first_to_train, plan_slices, publish_last, slice_dir};
use crate::pairs::sample_pairs;

#[test]
fn every_variable_gets_a_gradient() {
    let settings = CaptionerTraining::tiny();
    let model = TrainingCaptioner::new(&settings).unwrap();
    let pairs = sample_pairs(1, 0, 4, &settings.sampling).unwrap();
    let loss = model.loss(&pairs).unwrap();
    model.check_gradients(&loss).unwrap();
    // Initial loss is about ln(vocab): nothing learnt yet.
    let l = loss.to_scalar::<f32>().unwrap();
    assert!((l - (model.tokenizer.vocab_size() as f32).ln()).abs() < 1.0, "{l}");
}

#[test]
fn shape_words_weigh_as_set_and_nothing_else_does() {
    let settings = CaptionerTraining::tiny();
    let model = TrainingCaptioner::new(&settings).unwrap();
    let word = |w: &str| model.tokenizer.id(w).unwrap();
    for w in ["circle", "squares", "donut", "cross", "plus"] {
        assert!(model.shape_words.contains(&word(w)), "{w}");
    }
    for id in [CLS_ID, SEP_ID, PAD_ID, word("red"), word("striped")] {
        assert!(!model.shape_words.contains(&id), "{id}");
    }
    let pairs = sample_pairs(1, 0, 4, &settings.sampling).unwrap();
    let plain = model.loss(&pairs).unwrap().to_scalar::<f32>().unwrap();
    let heavy = TrainingCaptioner {
        settings: CaptionerTraining { shape_word_weight: 4.0, ..settings.clone() },
        ..model
    };
    assert_ne!(plain, heavy.loss(&pairs).unwrap().to_scalar::<f32>().unwrap());
}

#[test]
fn a_short_run_lowers_the_loss_and_the_saved_model_loads_in_dnd_with_the_same_outputs() {
    let settings = CaptionerTraining { steps: 40, ..CaptionerTraining::tiny() };
    let mut model = TrainingCaptioner::new(&settings).unwrap();
    let losses = model.train(|_, _| {}).unwrap();
    let mean = |s: &[f32]| s.iter().sum::<f32>() / s.len() as f32;
    let (first, last) = (mean(&losses[..5]), mean(&losses[losses.len() - 5..]));
    assert!(last < 0.75 * first, "loss {first} -> {last}: {losses:?}");

    let dir = tempfile::tempdir().unwrap();
    model.save(dir.path()).unwrap();
    let loaded = BlipCaptioner::load(
        &ModelRef::Local(dir.path().into()),
        &Device::Cpu,
        CaptionConfig::default(),
    )
    .unwrap();
    assert_eq!(loaded.preprocess, settings.sampling.preprocess());
    let pairs = sample_pairs(99, 0, 3, &settings.sampling).unwrap();
    let images: Vec<_> = pairs.iter().map(|p| p.source.clone()).collect();
    let pixels = loaded.preprocess.batch(&images, &Device::Cpu).unwrap();
    let ours = pairs::pixels(&pairs, &settings.sampling).unwrap();
    let diff = |a: &Tensor, b: &Tensor| {
        (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
    };
    assert_eq!(diff(&pixels, &ours), 0.0, "training sees what dnd feeds");

    let ids = Tensor::new(
        &[
            [CLS_ID, 5, 9, 17, 30, 40, 51],
            [CLS_ID, 8, 7, 6, 44, 3, 0],
            [CLS_ID, 60, 20, 11, 12, 13, 14],
        ],
        &Device::Cpu,
    )
    .unwrap();
    let theirs_image = loaded.encode_images(&pixels).unwrap();
    let ours_image = model.encode_images(&pixels).unwrap();
    assert!(
        diff(&theirs_image, &ours_image) < 1e-4,
        "vision features differ by {}",
        diff(&theirs_image, &ours_image)
    );
    let theirs = loaded.decoder_logits(&theirs_image, &ids).unwrap();
    let ours = model.decoder_logits(&ours_image, &ids).unwrap();
    assert_eq!(theirs.dims(), ours.dims());
    assert!(diff(&theirs, &ours) < 1e-4, "logits differ by {}", diff(&theirs, &ours));
    // Greedy decoding through dnd gives text in the world's vocabulary.
    let captions = loaded.caption(&images).unwrap();
    assert!(captions.iter().all(|c| !c.text.contains("[UNK]")), "{captions:?}");
}

/// The committed zoo model loads in dnd and still scores what its train.json says.
#[test]
fn the_committed_zoo_captioner_scores_what_its_train_json_records() {
    let dir = crate::committed_zoo().join("captioner");
    let report: CaptionerReport =
        serde_json::from_str(&std::fs::read_to_string(dir.join("train.json")).unwrap()).unwrap();
    let s = &report.settings;
    let eval = evaluate_captioner(&dir, &s.sampling, s.eval_seed, s.eval_pairs, 0).unwrap();
    let recorded = &report.heldout;
    for (name, now, then) in [
        ("exact", eval.exact, recorded.exact),
        ("object recall", eval.object_recall, recorded.object_recall),
        ("background", eval.background_accuracy, recorded.background_accuracy),
    ] {
        assert!((now - then).abs() <= 0.02, "{name}: {now} now, {then} in train.json");
    }
    assert!(eval.background_accuracy > 0.9 && eval.single_object.colour > 0.8, "{eval:?}");
}

/// `dnd synth train --model captioner --settings bench/captioner-slices.json` makes the
/// committed model.
#[test]
fn the_committed_zoo_captioner_is_the_last_slice_of_the_benchmarked_chain() {
    // The zoo's captioner is the chain of bench/captioner-slices.json: its train.json
    // holds the settings of every slice, which must be the file's.
    let zoo = crate::committed_zoo();
    let chain = zoo.join("../../../bench/captioner-slices.json");
    let slices: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(chain).unwrap()).unwrap();
    let planned = plan_slices(&slices, &zoo.join("captioner")).unwrap();
    let last = CaptionerSlice { dir: zoo.join("captioner"), ..planned.last().unwrap().clone() };
    assert!(
        last.trained().is_some(),
        "retrain: dnd synth train --model captioner --out crates/dnd-synth/zoo --settings bench/captioner-slices.json"
    );
}

#[test]
fn a_run_resumes_from_saved_weights_and_refuses_another_architecture() {
    let settings = CaptionerTraining { steps: 20, ..CaptionerTraining::tiny() };
    let mut trained = TrainingCaptioner::new(&settings).unwrap();
    trained.train(|_, _| {}).unwrap();
    let dir = tempfile::tempdir().unwrap();
    trained.save(dir.path()).unwrap();
    let pairs = sample_pairs(7, 0, 4, &settings.sampling).unwrap();
    let loss = |m: &TrainingCaptioner| m.loss(&pairs).unwrap().to_scalar::<f32>().unwrap();

    // Another seed's fresh weights, then the saved ones: the trained model's loss exactly.
    let resumed = TrainingCaptioner::new(&CaptionerTraining { seed: 5, ..settings.clone() });
    let resumed = resumed.unwrap();
    assert_ne!(loss(&resumed), loss(&trained));
    super::init::load_initial_weights(&resumed, dir.path()).unwrap();
    assert_eq!(loss(&resumed), loss(&trained));

    let mut wider = settings.clone();
    wider.vision.intermediate *= 2;
    let wider = TrainingCaptioner::new(&wider).unwrap();
    let error = super::init::load_initial_weights(&wider, dir.path()).unwrap_err();
    assert!(error.to_string().contains("intermediate") || error.to_string().contains("mlp"));
    assert!(error.to_string().contains("the settings make it"), "{error}");

    let missing = CaptionerTraining { init_from: Some(dir.path().join("nothing")), ..settings };
    let error = train_captioner(&missing, dir.path(), |_, _| {}).unwrap_err();
    assert!(error.to_string().contains("no model.safetensors"), "{error}");
}

#[test]
fn a_run_at_a_larger_image_size_starts_from_the_smaller_ones_weights() {
    let settings = CaptionerTraining::tiny();
    let small = TrainingCaptioner::new(&settings).unwrap();
    let dir = tempfile::tempdir().unwrap();
    small.save(dir.path()).unwrap();
    let mut larger = settings.clone();
    larger.sampling.image_size = 48;
    let large = TrainingCaptioner::new(&CaptionerTraining { seed: 5, ..larger }).unwrap();
    super::init::load_initial_weights(&large, dir.path()).unwrap();
    let weights = |m: &TrainingCaptioner| named_tensors(&m.params.varmap);
    let (before, after) = (weights(&small), weights(&large));
    let positions = "vision_model.embeddings.position_embedding";
    for (name, value) in &before {
        let loaded = &after[name];
        if name == positions {
            // A 4x4 patch grid resized to 6x6; the class token's embedding as it was.
            assert_eq!(loaded.dims(), &[1, 37, 32]);
            let class = |t: &Tensor| t.narrow(1, 0, 1).unwrap().flatten_all().unwrap();
            assert_eq!(
                class(loaded).to_vec1::<f32>().unwrap(),
                class(value).to_vec1::<f32>().unwrap()
            );
        } else {
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(flat(loaded), flat(value), "{name}");
        }
    }
    // It captions at the new size.
    let pairs = sample_pairs(7, 0, 2, &large.settings.sampling).unwrap();
    assert!(large.loss(&pairs).unwrap().to_scalar::<f32>().unwrap().is_finite());
}

#[test]
fn a_chain_of_slices_starts_each_from_the_last_and_keeps_what_is_trained() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("captioner");
    let tiny = CaptionerTraining { steps: 3, eval_pairs: 4, ..CaptionerTraining::tiny() };
    let first = serde_json::to_value(&tiny).unwrap();
    let slices = vec![first.clone(), serde_json::json!({"seed": 7, "steps": 2})];
    let planned = plan_slices(&slices, &out).unwrap();
    assert_eq!(planned[0].dir, slice_dir(&out, 0));
    assert_eq!(planned[0].settings, tiny);
    assert_eq!(planned[1].dir, slice_dir(&out, 1));
    // A later slice keeps what it does not change and starts from the slice before it.
    assert_eq!((planned[1].settings.seed, planned[1].settings.steps), (7, 2));
    assert_eq!(planned[1].settings.vision, tiny.vision);
    assert_eq!(planned[1].settings.init_from.as_deref(), Some(planned[0].dir.as_path()));
    assert_eq!(planned[1].earlier, vec![tiny.clone()]);
    for slice in &planned {
        assert!(slice.trained().is_none());
        slice.train(|_, _| {}).unwrap();
    }
    let report = planned[1].trained().expect("the last slice's train.json");
    assert_eq!(report.earlier_slices, vec![tiny.clone()]);
    publish_last(&planned, &out).unwrap();
    for file in ["train.json", "model.safetensors", "config.json", "tokenizer.json"] {
        let (a, b) = (std::fs::read(out.join(file)), std::fs::read(planned[1].dir.join(file)));
        assert_eq!(a.unwrap(), b.unwrap(), "{file} of the last slice is the chain's model");
    }
    // A slice appended later starts from the last one, which is kept.
    let appended = vec![first.clone(), slices[1].clone(), serde_json::json!({"seed": 9})];
    let extended = plan_slices(&appended, &out).unwrap();
    assert!(extended[0].trained().is_some() && extended[1].trained().is_some());
    assert!(extended[2].trained().is_none());
    // The chain copied elsewhere (another --out) is still trained there.
    let moved = dir.path().join("copy").join("captioner");
    for (index, slice) in planned.iter().enumerate() {
        let to = slice_dir(&moved, index);
        std::fs::create_dir_all(&to).unwrap();
        for entry in std::fs::read_dir(&slice.dir).unwrap() {
            let from = entry.unwrap().path();
            std::fs::copy(&from, to.join(from.file_name().unwrap())).unwrap();
        }
    }
    let copied = plan_slices(&slices, &moved).unwrap();
    assert!(copied.iter().all(|s| s.trained().is_some()), "a moved chain retrains");
    assert_eq!(first_to_train(&copied), 2);
    // Kept as its last slice alone, the chain resumes after it, not from the start.
    std::fs::remove_dir_all(slice_dir(&moved, 0)).unwrap();
    let pruned = plan_slices(&appended, &moved).unwrap();
    assert!(pruned[0].trained().is_none());
    assert_eq!(first_to_train(&pruned), 2);
    assert_eq!(first_to_train(&plan_slices(std::slice::from_ref(&first), &moved).unwrap()), 0);
    // Run again with the last slice changed: the first is kept, the last is not.
    let changed = vec![first.clone(), serde_json::json!({"seed": 8, "steps": 2})];
    let replanned = plan_slices(&changed, &out).unwrap();
    assert!(replanned[0].trained().is_some());
    assert!(replanned[1].trained().is_none());

    // Refused before any training: another architecture, an unknown field, no slices.
    let wider = vec![first.clone(), serde_json::json!({"patch_size": 4})];
    let err = plan_slices(&wider, &out).unwrap_err().to_string();
    assert!(err.contains("slice 1 changes the architecture"), "{err}");
    let other_words =
        vec![first.clone(), serde_json::json!({"sampling": {"min_shape_fraction": 0.95}})];
    let err = plan_slices(&other_words, &out).unwrap_err().to_string();
    assert!(err.contains("slice 1 changes the architecture"), "{err}");
    let typo = vec![serde_json::json!({"sead": 1})];
    let err = plan_slices(&typo, &out).unwrap_err().to_string();
    assert!(err.contains("slice 0") && err.contains("sead"), "{err}");
    assert!(plan_slices(&[], &out).is_err());
    assert!(plan_slices(&[serde_json::json!(3)], &out).is_err());
}

//! Parity of the multimodal models with transformers, on the tiny random-weight
//! checkpoints of `tests/fixtures/multimodal/` (made by `make_multimodal_fixtures.py`).

use candle_core::{Device, IndexOp, Tensor};

use dnd_models::{Captioner, ClipEmbedder, Embedder, ModelRef};
use dnd_pipeline::ImageLimits;
use dnd_pipeline::images::decode_rgb;
use dnd_tests::{Reference, fixtures, max_abs_diff, test_device};

/// f32 through a few random-weight layers; transformers and candle sum in other orders.
const TOLERANCE: f32 = 1e-4;

/// The generator runs in f16 on a GPU (`DND_TEST_DEVICE=cuda:0`), three decimal digits:
/// its tolerances there are this many times the f32 ones.
fn f16_factor(device: &Device) -> f32 {
    if device.is_cuda() { 200.0 } else { 1.0 }
}

fn reference(name: &str) -> Reference {
    Reference::load(&fixtures().join("multimodal/reference"), name)
}

fn model_ref(name: &str) -> ModelRef {
    fixtures().join("multimodal").join(name).to_str().unwrap().parse().unwrap()
}

fn input_images(r: &Reference) -> Vec<image::RgbImage> {
    r.json["inputs"]["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            let bytes = std::fs::read(fixtures().join("images").join(n.as_str().unwrap())).unwrap();
            decode_rgb(&bytes, &ImageLimits::default()).unwrap()
        })
        .collect()
}

fn ids_of(t: &Tensor) -> Vec<Vec<u32>> {
    t.to_dtype(candle_core::DType::U32).unwrap().to_vec2::<u32>().unwrap()
}

#[test]
fn clip_matches_transformers() {
    let r = reference("clip");
    let clip = ClipEmbedder::load(&model_ref("clip"), &Device::Cpu).unwrap();

    // Towers on the reference inputs.
    let image_features = clip.image_features(&r.tensors["pixel_values"]).unwrap();
    let d = max_abs_diff(&image_features, &r.tensors["image_features"]);
    assert!(d <= TOLERANCE, "image features: {d}");

    let texts: Vec<&str> =
        r.json["inputs"]["texts"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    let (ids, mask) = clip.tokenize(&texts).unwrap();
    assert_eq!(ids, ids_of(&r.tensors["input_ids"]), "token ids");
    assert_eq!(mask, ids_of(&r.tensors["attention_mask"]), "attention mask");
    let text_features = clip.text_features(&ids, &mask).unwrap();
    let d = max_abs_diff(&text_features, &r.tensors["text_features"]);
    assert!(d <= TOLERANCE, "text features (pooled at the first end-of-text token): {d}");

    // End to end, from files: normalised embeddings.
    let embeds = clip.embed_texts(&texts).unwrap();
    assert!(max_abs_diff(&embeds, &r.tensors["text_embeds"]) <= TOLERANCE);
    let images = input_images(&r);
    let embeds = clip.embed_images(&images).unwrap();
    // Our resize is Pillow's bicubic in float; transformers' is torch's fixed-point uint8
    // kernel: a level here and there on the non-square image.
    let d = max_abs_diff(&embeds, &r.tensors["image_embeds"]);
    assert!(d <= 2e-2, "image embeddings from files: {d}");
    let pixels = clip.preprocess.batch(&images, &Device::Cpu).unwrap();
    for i in 0..3 {
        let d = max_abs_diff(&pixels.i(i).unwrap(), &r.tensors["pixel_values"].i(i).unwrap());
        // fast_image_resize's Catmull-Rom and torch's fixed-point bicubic round differently.
        assert!(d <= 2.0 / 255.0 / 0.26 + 1e-5, "square image {i}: pixels differ by {d}");
    }
}

#[test]
fn blip_matches_transformers() {
    let r = reference("blip");
    let config = dnd_models::CaptionConfig { min_new_tokens: 5, max_new_tokens: 12 };
    let blip = dnd_models::BlipCaptioner::load(&model_ref("blip"), &Device::Cpu, config).unwrap();
    let pixels = &r.tensors["pixel_values"];

    let image = blip.encode_images(pixels).unwrap();
    let d = max_abs_diff(&image, &r.tensors["vision.last_hidden_state"]);
    assert!(d <= TOLERANCE, "vision states: {d}");

    let prefix = r.tensors["decoder.prefix_ids"].to_dtype(candle_core::DType::U32).unwrap();
    let logits = blip.decoder_logits(&image.narrow(0, 0, 2).unwrap(), &prefix).unwrap();
    let d = max_abs_diff(&logits, &r.tensors["decoder.prefix_logits"]);
    assert!(d <= TOLERANCE, "decoder logits (tied lm head): {d}");

    // Batched greedy decoding of all four images at once.
    let generated = blip.generate(pixels).unwrap();
    let expected: Vec<Vec<u32>> = ids_of(&r.tensors["generate.ids"])
        .into_iter()
        .map(|row| row.into_iter().skip(1).collect::<Vec<_>>()) // HF keeps the start token
        .collect();
    for (i, (got, want)) in generated.iter().zip(&expected).enumerate() {
        // HF pads finished rows to the batch's length; we stop at the end token.
        let want: Vec<u32> = want.iter().copied().take(got.len()).collect();
        assert_eq!(got, &want, "image {i}");
        let captions = r.json["generation"]["decoded_skip_special_tokens"].as_array().unwrap();
        assert_eq!(blip.decode(got).unwrap(), captions[i].as_str().unwrap(), "caption {i}");
    }

    // Batch-invariant: each image alone decodes to what it decoded to among the four, so a
    // cached caption does not depend on which crops a worker happened to batch it with.
    for (i, want) in generated.iter().enumerate() {
        let alone = blip.generate(&pixels.narrow(0, i, 1).unwrap()).unwrap();
        assert_eq!(&alone[0], want, "image {i} alone");
    }

    // From files: the same captions (the square images need no resampling at 4x).
    let images = input_images(&r);
    let captions = blip.caption(&images[..3]).unwrap();
    for (i, c) in captions.iter().enumerate() {
        assert_eq!(c.token_ids, generated[i], "image {i} from file");
    }
}

fn load_sd(r: &Reference) -> (dnd_models::DiffusionGenerator, String) {
    let config = dnd_models::GenerationConfig {
        steps: 3,
        guidance_scale: 7.5,
        width: 32,
        height: 32,
        ..Default::default()
    };
    let sd =
        dnd_models::DiffusionGenerator::load(&model_ref("sd"), &test_device(), config).unwrap();
    (sd, r.json["inputs"]["prompt"].as_str().unwrap().to_string())
}

#[test]
fn stable_diffusion_text_encoder_and_vae_match_diffusers() {
    let r = reference("sd");
    let (sd, prompt) = load_sd(&r);
    let prompt = prompt.as_str();
    assert_eq!(sd.tokenize(prompt).unwrap(), ids_of(&r.tensors["text.cond_input_ids"])[0]);
    assert_eq!(sd.tokenize("").unwrap(), ids_of(&r.tensors["text.uncond_input_ids"])[0]);
    let tolerance = TOLERANCE * f16_factor(&test_device());
    let cond = sd.encode_prompts(&[prompt]).unwrap();
    assert!(max_abs_diff(&cond, &r.tensors["text.cond_last_hidden_state"]) <= tolerance);
    let uncond = sd.encode_prompts(&[""]).unwrap();
    assert!(max_abs_diff(&uncond, &r.tensors["text.uncond_last_hidden_state"]) <= tolerance);

    let decoded = sd.decode_latents(&r.tensors["vae.latents"]).unwrap();
    let d = max_abs_diff(&decoded, &r.tensors["vae.decoded"]);
    assert!(d <= tolerance, "VAE decode: {d}");
}

/// Batch invariance, by construction: every layer computes image by image, so an image
/// generated alone is, bit for bit, the image generated among other prompts and seeds
/// (the cache keys of generated images rely on it).
#[test]
fn stable_diffusion_images_do_not_depend_on_their_batch() {
    use dnd_models::{Generator, ImageRequest};
    let r = reference("sd");
    let (sd, _) = load_sd(&r);
    let a = ImageRequest { prompt: "a red circle".into(), seed: 7 };
    let others = [
        ImageRequest { prompt: "dots".into(), seed: 8 },
        ImageRequest { prompt: "a blue striped square on a noisy background".into(), seed: 0 },
    ];
    let alone = sd.generate(std::slice::from_ref(&a)).unwrap();
    let batched = sd.generate(&[others[0].clone(), a.clone(), others[1].clone()]).unwrap();
    assert_eq!(alone[0].dimensions(), (32, 32));
    assert_eq!(alone[0].as_raw(), batched[1].as_raw(), "an image must not depend on its batch");
    // The same holds for the latents, to the bit.
    let noise = |reqs: &[&ImageRequest]| {
        let n: Vec<Tensor> = reqs.iter().map(|q| sd.initial_noise(q.seed).unwrap()).collect();
        Tensor::cat(&n, 0).unwrap()
    };
    let solo = sd.denoise(&[a.prompt.as_str()], noise(&[&a])).unwrap();
    let prompts = [others[0].prompt.as_str(), a.prompt.as_str(), others[1].prompt.as_str()];
    let group = sd.denoise(&prompts, noise(&[&others[0], &a, &others[1]])).unwrap();
    let bits = |t: &Tensor| -> Vec<u32> {
        let t = t.to_device(&Device::Cpu).unwrap().to_dtype(candle_core::DType::F32).unwrap();
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect()
    };
    assert_eq!(bits(&solo), bits(&group.get(1).unwrap().unsqueeze(0).unwrap()));
    let other =
        alone[0].as_raw().iter().zip(batched[0].as_raw()).map(|(x, y)| x.abs_diff(*y)).max();
    assert!(other.unwrap() > 1, "another prompt and seed give another image");
}

/// The UNet, alone and in the guidance batch, and the whole 3-step DDIM pipeline.
#[test]
fn stable_diffusion_unet_matches_diffusers() {
    let r = reference("sd");
    let (sd, prompt) = load_sd(&r);
    let prompt = prompt.as_str();
    let f16 = f16_factor(&test_device());
    let cond = sd.encode_prompts(&[prompt]).unwrap();
    let uncond = sd.encode_prompts(&[""]).unwrap();
    let noise = sd.predict_noise(&r.tensors["unet.latents"], 500.0, &cond).unwrap();
    let d = max_abs_diff(&noise, &r.tensors["unet.noise_pred"]);
    assert!(d <= TOLERANCE * f16, "UNet noise prediction: {d}");
    // Guidance batch [uncond, cond].
    let latents2 =
        Tensor::cat(&[&r.tensors["unet.latents"], &r.tensors["unet.latents"]], 0).unwrap();
    let text2 = Tensor::cat(&[&uncond, &cond], 0).unwrap();
    let d = max_abs_diff(
        &sd.predict_noise(&latents2, 500.0, &text2).unwrap(),
        &r.tensors["unet.cfg_noise_pred"],
    );
    assert!(d <= TOLERANCE * f16, "UNet guidance batch: {d}");

    // The whole 3-step DDIM loop from the pipeline's starting latents.
    let latents = sd.denoise(&[prompt], r.tensors["pipeline.initial_latents"].clone()).unwrap();
    let d = max_abs_diff(&latents, &r.tensors["pipeline.final_latents"]);
    assert!(d <= 1e-3 * f16, "final latents after 3 guided DDIM steps: {d}");
    let image = sd.to_rgb(&sd.decode_latents(&latents).unwrap()).unwrap();
    let want: Vec<u8> =
        r.tensors["pipeline.image_u8"].flatten_all().unwrap().to_vec1::<u8>().unwrap();
    let worst = image[0].as_raw().iter().zip(&want).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
    assert!(worst <= if f16 > 1.0 { 4 } else { 1 }, "pipeline image differs by {worst} levels");
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let target = to.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_dir(&path, &target);
        } else {
            std::fs::copy(&path, &target).unwrap();
        }
    }
}

/// A pipeline whose scheduler was saved as DPMSolverMultistepScheduler: diffusers writes
/// Python's `-Infinity` and `NaN` into scheduler_config.json. It loads, and samples as the
/// DDIM-scheduled fixture does (dnd samples with DDIM from the same noise schedule).
#[test]
fn stable_diffusion_loads_a_scheduler_config_with_python_infinities() {
    use dnd_models::{Generator, ImageRequest};
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixtures().join("multimodal/sd"), dir.path());
    std::fs::write(
        dir.path().join("scheduler/scheduler_config.json"),
        r#"{
  "_class_name": "DPMSolverMultistepScheduler",
  "_diffusers_version": "0.31.0",
  "algorithm_type": "dpmsolver++",
  "beta_end": 0.012,
  "beta_schedule": "scaled_linear",
  "beta_start": 0.00085,
  "dynamic_thresholding_ratio": 0.995,
  "euler_at_final": false,
  "final_sigmas_type": "zero",
  "lambda_min_clipped": -Infinity,
  "lower_order_final": true,
  "num_train_timesteps": 1000,
  "prediction_type": "epsilon",
  "sample_max_value": NaN,
  "solver_order": 2,
  "solver_type": "midpoint",
  "steps_offset": 1,
  "thresholding": false,
  "timestep_spacing": "leading",
  "trained_betas": null,
  "use_karras_sigmas": false,
  "variance_type": null
}"#,
    )
    .unwrap();
    let config = dnd_models::GenerationConfig {
        steps: 3,
        guidance_scale: 7.5,
        width: 32,
        height: 32,
        ..Default::default()
    };
    let model: ModelRef = dir.path().to_str().unwrap().parse().unwrap();
    let dpm = dnd_models::DiffusionGenerator::load(&model, &test_device(), config).unwrap();
    let (ddim, _) = load_sd(&reference("sd"));
    let request = [ImageRequest { prompt: "a red circle".into(), seed: 7 }];
    let ours = dpm.generate(&request).unwrap();
    let theirs = ddim.generate(&request).unwrap();
    assert_eq!(ours[0].as_raw(), theirs[0].as_raw());
}

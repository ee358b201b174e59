//! Text-to-image generation (stage 3) with a Stable Diffusion checkpoint in the diffusers
//! layout (`unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`): v1.5, v2.1,
//! SD-Turbo, or any config of that family.
//!
//! The UNet and the VAE are ours (`diffusion/`), as is the denoising loop. It batches
//! classifier-free guidance as `[uncond x B, cond x B]` and draws each image's starting
//! noise from its own seed. Every layer computes image by image (see
//! `diffusion/layers.rs`), so an image is the same bits whatever else shares its batch: it
//! depends on (model, prompt, seed, steps, size, guidance, scheduler) only, and images of
//! many prompts can be generated together.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};
use candle_transformers::models::stable_diffusion::ddim::DDIMSchedulerConfig;
use candle_transformers::models::stable_diffusion::schedulers::{
    BetaSchedule, PredictionType, Scheduler, SchedulerConfig, TimestepSpacing,
};
use image::RgbImage;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::checkpoint::ModelRef;
use crate::checkpoint::find_weights;
use crate::clip::{ClipText, ClipTextConfig};
use crate::diffusion::{UNet, UNetConfig, VaeConfig, VaeDecoder};
use crate::error::ModelError;
use crate::hf_files::{load_tokenizer, read_json, var_builder_as};

/// How images are generated; defaults are the method's (50 DDIM steps, guidance 7.5).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GenerationConfig {
    /// `{concept}` is replaced by the concept.
    pub prompt_template: String,
    pub steps: usize,
    /// 1 disables classifier-free guidance (few-step Turbo models).
    pub guidance_scale: f64,
    pub width: usize,
    pub height: usize,
    /// Timestep spacing of the DDIM schedule: `leading` (SD 1.x/2.x), `trailing` (Turbo).
    pub timestep_spacing: Spacing,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Spacing {
    Leading,
    Trailing,
    Linspace,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            prompt_template: "One realistic image of {concept}".into(),
            steps: 50,
            guidance_scale: 7.5,
            width: 512,
            height: 512,
            timestep_spacing: Spacing::Leading,
        }
    }
}

impl GenerationConfig {
    pub fn prompt(&self, concept: &str) -> String {
        self.prompt_template.replace("{concept}", concept)
    }
}

/// One image to generate: what, and from which seed.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageRequest {
    pub prompt: String,
    pub seed: u64,
}

/// Generates images from text.
pub trait Generator: Send + Sync {
    fn generate(&self, requests: &[ImageRequest]) -> Result<Vec<RgbImage>, ModelError>;
}

/// `scheduler/scheduler_config.json`: the noise schedule dnd samples with (DDIM, eta 0),
/// whatever sampler class the checkpoint was saved with.
#[derive(Deserialize)]
struct DiffusersScheduler {
    #[serde(rename = "_class_name")]
    class_name: String,
    beta_start: f64,
    beta_end: f64,
    beta_schedule: String,
    #[serde(default)]
    steps_offset: usize,
    #[serde(default = "epsilon")]
    prediction_type: String,
    #[serde(default = "thousand")]
    num_train_timesteps: usize,
}

fn epsilon() -> String {
    "epsilon".into()
}
fn thousand() -> usize {
    1000
}

/// Text-encoder states of this many prompts are kept (a generation batch rarely holds
/// more distinct ones); the cache is emptied when it is full.
const TEXT_CACHE_PROMPTS: usize = 256;

/// A loaded Stable Diffusion pipeline.
pub struct DiffusionGenerator {
    pub reference: String,
    text: ClipText,
    tokenizer: Tokenizer,
    max_tokens: usize,
    eos_id: u32,
    unet: UNet,
    vae: VaeDecoder,
    latent_channels: usize,
    /// The VAE's spatial downscaling (8 for real SD checkpoints).
    vae_scale: usize,
    scheduler: DDIMSchedulerConfig,
    pub config: GenerationConfig,
    device: Device,
    /// f16 on CUDA, f32 on the CPU (text encoder and UNet).
    dtype: DType,
    vae_dtype: DType,
    /// Text-encoder states `(1, T, D)` by prompt: a prompt is encoded once, alone.
    text_states: Mutex<HashMap<String, Tensor>>,
}

fn part(dir: &Path, sub: &str, file: &str, reference: &ModelRef) -> Result<PathBuf, ModelError> {
    let p = dir.join(sub).join(file);
    if p.is_file() {
        return Ok(p);
    }
    Err(ModelError::NotFound {
        what: format!("{reference} has no {sub}/{file} (looked in {})", dir.display()),
        help: "a diffusers Stable Diffusion directory holds unet/, vae/, text_encoder/, tokenizer/ and scheduler/; download the whole repository".into(),
    })
}

fn checkpoint_error(path: &Path) -> impl Fn(candle_core::Error) -> ModelError + '_ {
    move |e| ModelError::Checkpoint { path: path.to_path_buf(), reason: e.to_string() }
}

impl DiffusionGenerator {
    pub fn load(
        reference: &ModelRef,
        device: &Device,
        config: GenerationConfig,
    ) -> Result<Self, ModelError> {
        let files = reference.resolve("model_index.json")?;
        let dtype = if device.is_cuda() { DType::F16 } else { DType::F32 };
        let dir = files.weights.parent().map(Path::to_path_buf).unwrap_or_default();
        let bad = |path: &Path, reason: String| ModelError::Config { path: path.into(), reason };
        let weights = |sub: &str, file: &str| part(&dir, sub, file, reference);

        let unet_cfg_path = weights("unet", "config.json")?;
        let unet_config: UNetConfig = read_json(&unet_cfg_path)?;
        unet_config.validate().map_err(|reason| bad(&unet_cfg_path, reason))?;
        // Weights in any format Checkpoint reads (diffusers also saves `.bin` and shards).
        let part_weights = |sub: &str, file: &str| find_weights(&dir.join(sub), file);
        let unet_w = part_weights("unet", "diffusion_pytorch_model.safetensors")?;
        let unet = UNet::load(&var_builder_as(&unet_w, dtype, device)?, unet_config)
            .map_err(checkpoint_error(&unet_w))?;

        let vae_cfg_path = weights("vae", "config.json")?;
        let vae_config: VaeConfig = read_json(&vae_cfg_path)?;
        vae_config.validate().map_err(|reason| bad(&vae_cfg_path, reason))?;
        let vae_dtype = if vae_config.force_upcast { DType::F32 } else { dtype };
        let (latent_channels, vae_scale) = (vae_config.latent_channels, vae_config.downscale());
        let vae_w = part_weights("vae", "diffusion_pytorch_model.safetensors")?;
        let vae = VaeDecoder::load(&var_builder_as(&vae_w, vae_dtype, device)?, vae_config)
            .map_err(checkpoint_error(&vae_w))?;

        let t: ClipTextConfig = read_json(&weights("text_encoder", "config.json")?)?;
        let text_w = part_weights("text_encoder", "model.safetensors")?;
        let text_vb = var_builder_as(&text_w, dtype, device)?;
        // `CLIPTextModel` checkpoints name tensors `text_model.*`; transformers 5 saves them bare.
        let text_vb = if text_vb.contains_tensor("text_model.embeddings.token_embedding.weight") {
            text_vb.pp("text_model")
        } else {
            text_vb
        };
        let text = ClipText::load_tower(&t, text_vb).map_err(checkpoint_error(&text_w))?;
        let tokenizer_dir = dir.join("tokenizer");
        if !tokenizer_dir.join("tokenizer.json").is_file()
            && tokenizer_dir.join("vocab.json").is_file()
        {
            // Older checkpoints (e.g. the original v1.5) ship only the slow tokenizer's files.
            return Err(ModelError::NotFound {
                what: format!(
                    "{reference} has tokenizer/vocab.json and merges.txt but no tokenizer/tokenizer.json"
                ),
                help: format!(
                    "write the fast tokenizer once: python -c \"from transformers import CLIPTokenizerFast as T; T.from_pretrained('{0}').save_pretrained('{0}')\"",
                    tokenizer_dir.display()
                ),
            });
        }
        let tokenizer = load_tokenizer(&weights("tokenizer", "tokenizer.json")?)?;

        let sched_path = weights("scheduler", "scheduler_config.json")?;
        let s: DiffusersScheduler = read_json(&sched_path)?;
        let beta_schedule = match s.beta_schedule.as_str() {
            "scaled_linear" => BetaSchedule::ScaledLinear,
            "linear" => BetaSchedule::Linear,
            "squaredcos_cap_v2" => BetaSchedule::SquaredcosCapV2,
            other => {
                return Err(bad(&sched_path, format!("beta_schedule `{other}` is not supported")));
            }
        };
        let prediction_type = match s.prediction_type.as_str() {
            "epsilon" => PredictionType::Epsilon,
            "v_prediction" => PredictionType::VPrediction,
            "sample" => PredictionType::Sample,
            other => {
                return Err(bad(
                    &sched_path,
                    format!("prediction_type `{other}` is not supported"),
                ));
            }
        };
        tracing::debug!(
            scheduler = s.class_name,
            "dnd samples with DDIM (eta 0) from the checkpoint's noise schedule"
        );
        let scheduler = DDIMSchedulerConfig {
            beta_start: s.beta_start,
            beta_end: s.beta_end,
            beta_schedule,
            eta: 0.0,
            steps_offset: s.steps_offset,
            prediction_type,
            train_timesteps: s.num_train_timesteps,
            timestep_spacing: match config.timestep_spacing {
                Spacing::Leading => TimestepSpacing::Leading,
                Spacing::Trailing => TimestepSpacing::Trailing,
                Spacing::Linspace => TimestepSpacing::Linspace,
            },
        };
        if config.steps == 0
            || !config.width.is_multiple_of(vae_scale)
            || !config.height.is_multiple_of(vae_scale)
        {
            return Err(ModelError::BadReference {
                reference: reference.to_string(),
                reason: format!(
                    "generation needs steps >= 1 and a width and height divisible by {vae_scale}"
                ),
            });
        }
        // Pad with the tokenizer's own end-of-text token: real v1.5 text-encoder configs
        // still carry the legacy eos_token_id 2, which is not the token diffusers pads with.
        let eos_id = tokenizer.token_to_id("<|endoftext|>").unwrap_or(t.eos_token_id);
        Ok(Self {
            reference: reference.to_string(),
            max_tokens: t.max_position_embeddings,
            text,
            tokenizer,
            eos_id,
            unet,
            vae,
            latent_channels,
            vae_scale,
            scheduler,
            config,
            device: device.clone(),
            dtype,
            vae_dtype,
            text_states: Mutex::new(HashMap::new()),
        })
    }

    /// Token ids padded with end-of-text to the encoder's full context, as the diffusers
    /// pipeline does (`padding="max_length"`).
    pub fn tokenize(&self, prompt: &str) -> Result<Vec<u32>, ModelError> {
        let enc = self.tokenizer.encode(prompt, true).map_err(|e| ModelError::Config {
            path: "tokenizer.json".into(),
            reason: format!("cannot tokenize {prompt:?}: {e}"),
        })?;
        let mut ids = enc.get_ids().to_vec();
        if ids.len() > self.max_tokens {
            let last = ids[ids.len() - 1];
            ids.truncate(self.max_tokens);
            ids[self.max_tokens - 1] = last;
        }
        ids.resize(self.max_tokens, self.eos_id);
        Ok(ids)
    }

    /// Text-encoder states `(B, T, D)` for prompts (no attention mask, as diffusers). Each
    /// distinct prompt is encoded once, on its own, and kept for later batches.
    pub fn encode_prompts(&self, prompts: &[&str]) -> Result<Tensor, ModelError> {
        let mut states = Vec::with_capacity(prompts.len());
        for prompt in prompts {
            let known = self.text_states.lock().expect("not poisoned").get(*prompt).cloned();
            let state = match known {
                Some(state) => state,
                None => {
                    let ids = Tensor::from_vec(
                        self.tokenize(prompt)?,
                        (1, self.max_tokens),
                        &self.device,
                    )?;
                    let ones = Tensor::ones(ids.dims(), DType::U32, &self.device)?;
                    let state = self.text.hidden_states(&ids, &ones)?;
                    let mut cache = self.text_states.lock().expect("not poisoned");
                    if cache.len() >= TEXT_CACHE_PROMPTS {
                        cache.clear();
                    }
                    cache.insert(prompt.to_string(), state.clone());
                    state
                }
            };
            states.push(state);
        }
        Ok(Tensor::cat(&states, 0)?)
    }

    /// One UNet noise prediction for `latents` `(B, C, h, w)` and text states `(B, T, D)`.
    pub fn predict_noise(
        &self,
        latents: &Tensor,
        timestep: f64,
        text: &Tensor,
    ) -> Result<Tensor, ModelError> {
        let text = text.to_device(&self.device)?.to_dtype(self.dtype)?;
        let context = self.unet.context(&text)?;
        let latents = latents.to_device(&self.device)?.to_dtype(self.dtype)?;
        Ok(self.unet.forward(&latents, timestep, &context)?)
    }

    /// Latents `(B, C, h, w)` to images in `[-1, 1]`, `(B, 3, H, W)`.
    pub fn decode_latents(&self, latents: &Tensor) -> Result<Tensor, ModelError> {
        Ok(self.vae.decode(&latents.to_device(&self.device)?.to_dtype(self.vae_dtype)?)?)
    }

    /// Starting noise of one image, from its own seed (ChaCha8, standard normal).
    pub fn initial_noise(&self, seed: u64) -> Result<Tensor, ModelError> {
        let (h, w) = (self.config.height / self.vae_scale, self.config.width / self.vae_scale);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n = self.latent_channels * h * w;
        let noise: Vec<f32> = (0..n).map(|_| StandardNormal.sample(&mut rng)).collect();
        Ok(Tensor::from_vec(noise, (1, self.latent_channels, h, w), &self.device)?
            .to_dtype(self.dtype)?)
    }

    /// The denoising loop over a batch: `latents` are the starting noise `(B, C, h, w)`.
    /// Returns the final latents.
    ///
    /// On the CPU every layer computes image by image, so a batch gives each image the
    /// bits it gets alone. candle's GPU kernels pick their algorithms by the shape of the
    /// whole batch, so there each image (with its guidance pair) is denoised on its own,
    /// which keeps that guarantee at the cost of GPU batching.
    pub fn denoise(&self, prompts: &[&str], latents: Tensor) -> Result<Tensor, ModelError> {
        let latents = latents.to_device(&self.device)?;
        if !self.device.is_cpu() && prompts.len() > 1 {
            let each = prompts
                .iter()
                .enumerate()
                .map(|(i, p)| self.denoise(&[p], latents.narrow(0, i, 1)?))
                .collect::<Result<Vec<_>, _>>()?;
            return Ok(Tensor::cat(&each, 0)?);
        }
        let b = prompts.len();
        let guided = self.config.guidance_scale > 1.0;
        let text = if guided {
            // [uncond x B, cond x B], the order the guidance split below expects.
            let uncond = self.encode_prompts(&vec![""; b])?;
            Tensor::cat(&[&uncond, &self.encode_prompts(prompts)?], 0)?
        } else {
            self.encode_prompts(prompts)?
        };
        // What the text decides (every cross-attention's keys and values), once.
        let context = self.unet.context(&text)?;
        let mut scheduler: Box<dyn Scheduler> = self.scheduler.build(self.config.steps)?;
        let mut latents = (latents.to_dtype(self.dtype)? * scheduler.init_noise_sigma())?;
        let timesteps = scheduler.timesteps().to_vec();
        for t in timesteps {
            let input =
                if guided { Tensor::cat(&[&latents, &latents], 0)? } else { latents.clone() };
            let input = scheduler.scale_model_input(input, t)?;
            let noise = self.unet.forward(&input, t as f64, &context)?;
            let noise = if guided {
                let parts = noise.chunk(2, 0)?;
                let (uncond, cond) = (&parts[0], &parts[1]);
                (uncond + ((cond - uncond)? * self.config.guidance_scale)?)?
            } else {
                noise
            };
            latents = scheduler.step(&noise, t, &latents)?;
        }
        Ok(latents)
    }

    /// `[-1, 1]` images to 8-bit RGB: `round(clamp(x / 2 + 0.5, 0, 1) * 255)`.
    pub fn to_rgb(&self, images: &Tensor) -> Result<Vec<RgbImage>, ModelError> {
        let (b, _, h, w) = images.dims4()?;
        let px = ((images.to_dtype(DType::F32)? / 2.0)? + 0.5)?
            .clamp(0f32, 1f32)?
            .affine(255.0, 0.0)?
            .round()?;
        let px = px
            .permute((0, 2, 3, 1))?
            .to_dtype(DType::U8)?
            .to_device(&Device::Cpu)?
            .flatten_all()?
            .to_vec1::<u8>()?;
        Ok(px
            .chunks_exact(h * w * 3)
            .take(b)
            .map(|c| RgbImage::from_raw(w as u32, h as u32, c.to_vec()).expect("h*w*3 bytes"))
            .collect())
    }
}

impl Generator for DiffusionGenerator {
    fn generate(&self, requests: &[ImageRequest]) -> Result<Vec<RgbImage>, ModelError> {
        if requests.is_empty() {
            return Ok(Vec::new());
        }
        let noise =
            requests.iter().map(|r| self.initial_noise(r.seed)).collect::<Result<Vec<_>, _>>()?;
        let prompts: Vec<&str> = requests.iter().map(|r| r.prompt.as_str()).collect();
        let latents = self.denoise(&prompts, Tensor::cat(&noise, 0)?)?;
        self.to_rgb(&self.decode_latents(&latents)?)
    }
}

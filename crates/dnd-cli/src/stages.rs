//! One entry point per multimodal stage, for trying a model on one's own files.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use serde_json::json;

use dnd_models::device::parse_device;
use dnd_models::generator::Spacing;
use dnd_models::{
    BlipCaptioner, CaptionConfig, Captioner, ClipEmbedder, DiffusionGenerator, Embedder,
    GenerationConfig, ImageRequest, ModelRef,
};
use dnd_pipeline::ImageLimits;
use dnd_pipeline::images::decode_rgb;
use dnd_pipeline::probe::peak_rss_mib;

use crate::BadInput;

/// Flags every stage command shares.
#[derive(Args)]
pub struct CommonArgs {
    /// The model: a Hugging Face model directory, or hf:<org>/<name>[@rev] from the hub cache.
    #[arg(long, value_name = "PATH|hf:REPO")]
    pub model: String,

    /// cpu, cuda or cuda:N (CUDA needs a build with --features cuda).
    #[arg(long, default_value = "cpu")]
    pub device: String,

    /// Compute threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,

    /// Also write timings and counts to this local JSON file.
    #[arg(long, value_name = "FILE")]
    pub summary_json: Option<PathBuf>,
}

#[derive(Args)]
pub struct CaptionArgs {
    #[command(flatten)]
    pub common: CommonArgs,

    /// Images captioned in one batch.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,

    #[arg(long, default_value_t = CaptionConfig::default().min_new_tokens)]
    pub min_new_tokens: usize,

    #[arg(long, default_value_t = CaptionConfig::default().max_new_tokens)]
    pub max_new_tokens: usize,

    /// Image files (JPEG, PNG, WebP).
    #[arg(required = true, value_name = "IMAGE")]
    pub images: Vec<PathBuf>,
}

#[derive(Args)]
pub struct EmbedArgs {
    #[command(flatten)]
    pub common: CommonArgs,

    /// Image files to embed.
    #[arg(long = "image", value_name = "FILE")]
    pub images: Vec<PathBuf>,

    /// Texts to embed.
    #[arg(long = "text", value_name = "TEXT")]
    pub texts: Vec<String>,
}

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub common: CommonArgs,

    /// The prompt as it is; or use --concept to fill the method's template.
    #[arg(long, conflicts_with = "concept", required_unless_present = "concept")]
    pub prompt: Option<String>,

    /// A concept, put into --template.
    #[arg(long)]
    pub concept: Option<String>,

    #[arg(long, default_value_t = GenerationConfig::default().prompt_template)]
    pub template: String,

    /// Images to generate, seeds seed..seed+count.
    #[arg(long, default_value_t = 1)]
    pub count: u64,

    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    #[arg(long, default_value_t = GenerationConfig::default().steps)]
    pub steps: usize,

    /// Classifier-free guidance scale; 1 disables guidance (Turbo models).
    #[arg(long, default_value_t = GenerationConfig::default().guidance_scale)]
    pub guidance: f64,

    #[arg(long, default_value_t = GenerationConfig::default().width)]
    pub width: usize,

    #[arg(long, default_value_t = GenerationConfig::default().height)]
    pub height: usize,

    /// DDIM timestep spacing: leading (SD 1.x/2.x) or trailing (SD-Turbo).
    #[arg(long, default_value = "leading", value_parser = parse_spacing)]
    pub spacing: Spacing,

    /// Images generated in one batch.
    #[arg(long, default_value_t = 1)]
    pub batch_size: usize,

    /// Output directory (created if missing).
    #[arg(long)]
    pub out: PathBuf,
}

fn parse_spacing(s: &str) -> Result<Spacing, String> {
    match s {
        "leading" => Ok(Spacing::Leading),
        "trailing" => Ok(Spacing::Trailing),
        "linspace" => Ok(Spacing::Linspace),
        other => Err(format!("`{other}` is not one of: leading, trailing, linspace")),
    }
}

fn read_image(path: &PathBuf) -> anyhow::Result<image::RgbImage> {
    let bytes = std::fs::read(path)
        .map_err(|e| BadInput(format!("cannot read image {}: {e}", path.display())))?;
    decode_rgb(&bytes, &ImageLimits::default()).map_err(|s| {
        BadInput(format!("{} is not a usable image ({}): {}", path.display(), s.reason, s.message))
            .into()
    })
}

fn write_summary(path: &Option<PathBuf>, value: serde_json::Value) -> anyhow::Result<()> {
    if let Some(p) = path {
        std::fs::write(p, serde_json::to_string_pretty(&value)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

/// Loads a model on a blocking thread (it reads and converts large files).
async fn load<T: Send + 'static>(
    common: &CommonArgs,
    f: impl FnOnce(&ModelRef, &candle_core::Device) -> Result<T, dnd_models::ModelError>
    + Send
    + 'static,
) -> anyhow::Result<T> {
    let device = parse_device(&common.device)?;
    let reference: ModelRef = common.model.parse()?;
    Ok(tokio::task::spawn_blocking(move || f(&reference, &device)).await??)
}

pub async fn caption(args: CaptionArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.batch_size > 0, BadInput("--batch-size must be at least 1".into()));
    let config =
        CaptionConfig { min_new_tokens: args.min_new_tokens, max_new_tokens: args.max_new_tokens };
    let images = args.images.iter().map(read_image).collect::<anyhow::Result<Vec<_>>>()?;
    let captioner = load(&args.common, move |r, d| BlipCaptioner::load(r, d, config)).await?;
    let started = Instant::now();
    let batch = args.batch_size;
    let captions = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<_>> {
        let mut out = Vec::new();
        for chunk in images.chunks(batch) {
            out.extend(captioner.caption(chunk)?);
        }
        Ok(out)
    })
    .await??;
    let seconds = started.elapsed().as_secs_f64();
    for (path, c) in args.images.iter().zip(&captions) {
        println!("{}\t{}", path.display(), c.text);
    }
    eprintln!(
        "captioned {} images in {seconds:.2}s ({:.2} captions/s)",
        captions.len(),
        captions.len() as f64 / seconds
    );
    write_summary(
        &args.common.summary_json,
        json!({
            "images": captions.len(),
            "seconds": seconds,
            "captions_per_second": captions.len() as f64 / seconds,
            "peak_rss_mib": peak_rss_mib(),
        }),
    )
}

pub async fn embed(args: EmbedArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        !args.images.is_empty() || !args.texts.is_empty(),
        BadInput("give at least one --image FILE or --text TEXT".into())
    );
    let images = args.images.iter().map(read_image).collect::<anyhow::Result<Vec<_>>>()?;
    let embedder = load(&args.common, ClipEmbedder::load).await?;
    let texts = args.texts.clone();
    let started = Instant::now();
    let (image_emb, text_emb) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
        let i = if images.is_empty() { None } else { Some(embedder.embed_images(&images)?) };
        let t = if texts.is_empty() { None } else { Some(embedder.embed_texts(&texts)?) };
        Ok((i, t))
    })
    .await??;
    let seconds = started.elapsed().as_secs_f64();
    let rows = |t: &Option<candle_core::Tensor>| -> anyhow::Result<Vec<Vec<f32>>> {
        Ok(match t {
            Some(t) => t.to_vec2::<f32>()?,
            None => Vec::new(),
        })
    };
    let (img_rows, txt_rows) = (rows(&image_emb)?, rows(&text_emb)?);
    for (path, e) in args.images.iter().zip(&img_rows) {
        println!(
            "{}",
            json!({"kind": "image", "input": path.display().to_string(), "embedding": e})
        );
    }
    for (text, e) in args.texts.iter().zip(&txt_rows) {
        println!("{}", json!({"kind": "text", "input": text, "embedding": e}));
    }
    for (path, i) in args.images.iter().zip(&img_rows) {
        for (text, t) in args.texts.iter().zip(&txt_rows) {
            let cos: f32 = i.iter().zip(t).map(|(a, b)| a * b).sum();
            println!(
                "{}",
                json!({"kind": "similarity", "image": path.display().to_string(), "text": text, "cosine": cos})
            );
        }
    }
    write_summary(
        &args.common.summary_json,
        json!({"images": img_rows.len(), "texts": txt_rows.len(), "seconds": seconds, "peak_rss_mib": peak_rss_mib()}),
    )
}

/// A file-name-safe form of a prompt.
fn slug(text: &str) -> String {
    let s: String = text
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' })
        .collect();
    let s = s.split('-').filter(|p| !p.is_empty()).collect::<Vec<_>>().join("-");
    s.chars().take(60).collect()
}

pub async fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.count > 0 && args.batch_size > 0,
        BadInput("--count and --batch-size must be at least 1".into())
    );
    let config = GenerationConfig {
        prompt_template: args.template.clone(),
        steps: args.steps,
        guidance_scale: args.guidance,
        width: args.width,
        height: args.height,
        timestep_spacing: args.spacing,
    };
    let prompt = match (&args.prompt, &args.concept) {
        (Some(p), _) => p.clone(),
        (None, Some(c)) => config.prompt(c),
        (None, None) => unreachable!("clap requires --prompt or --concept"),
    };
    std::fs::create_dir_all(&args.out)
        .map_err(|e| BadInput(format!("cannot create {}: {e}", args.out.display())))?;
    let generator = load(&args.common, move |r, d| DiffusionGenerator::load(r, d, config)).await?;
    let requests: Vec<ImageRequest> = (args.seed..args.seed + args.count)
        .map(|seed| ImageRequest { prompt: prompt.clone(), seed })
        .collect();
    let started = Instant::now();
    let batch = args.batch_size;
    // The generator's pieces, so that denoising is timed apart from text encoding and decoding.
    let (images, requests, denoise_seconds) =
        tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let mut out = Vec::new();
            let mut denoise_seconds = 0.0;
            for chunk in requests.chunks(batch) {
                let noise = chunk
                    .iter()
                    .map(|r| generator.initial_noise(r.seed))
                    .collect::<Result<Vec<_>, _>>()?;
                let prompts: Vec<&str> = chunk.iter().map(|r| r.prompt.as_str()).collect();
                let t = Instant::now();
                let latents = generator.denoise(&prompts, candle_core::Tensor::cat(&noise, 0)?)?;
                denoise_seconds += t.elapsed().as_secs_f64();
                out.extend(generator.to_rgb(&generator.decode_latents(&latents)?)?);
            }
            Ok((out, requests, denoise_seconds))
        })
        .await??;
    let seconds = started.elapsed().as_secs_f64();
    for (img, r) in images.iter().zip(&requests) {
        let path = args.out.join(format!("{}-{}.png", slug(&r.prompt), r.seed));
        img.save(&path).with_context(|| format!("writing {}", path.display()))?;
        println!("{}", path.display());
    }
    let batches = requests.len().div_ceil(batch);
    let steps = args.steps * batches;
    eprintln!(
        "generated {} images in {seconds:.2}s ({:.2}s per denoising step)",
        images.len(),
        denoise_seconds / steps as f64
    );
    write_summary(
        &args.common.summary_json,
        json!({
            "images": images.len(),
            "steps": steps,
            "seconds": seconds,
            "denoise_seconds": denoise_seconds,
            "seconds_per_step": denoise_seconds / steps as f64,
            "peak_rss_mib": peak_rss_mib(),
        }),
    )
}

#[derive(Args)]
pub struct SummarizeArgs {
    /// A text file of captions, one per line.
    #[arg(long, value_name = "FILE")]
    pub captions: PathBuf,

    /// The summariser settings (TOML: backend, rounds, [openai], [local], [prompts]);
    /// see crates/dnd-summarize. Without it: the offline consensus rule.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Overrides the config's backend: openai, local or consensus.
    #[arg(long)]
    pub backend: Option<String>,

    /// Overrides the backend's model: for `local`, a GGUF file (qwen2 or llama, e.g. a
    /// Q4_K_M from llama.cpp or Ollama), a Qwen2 checkpoint directory or hf:<org>/<name>;
    /// for `openai`, the model name the server knows.
    #[arg(long, value_name = "MODEL")]
    pub model: Option<String>,

    /// Seed of the label shuffles between summary rounds.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// Write every request and reply, as JSON lines, to this file.
    #[arg(long, value_name = "FILE")]
    pub exchanges: Option<PathBuf>,
}

pub async fn summarize(args: SummarizeArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.captions)
        .map_err(|e| BadInput(format!("cannot read captions {}: {e}", args.captions.display())))?;
    let captions: Vec<String> =
        text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect();
    anyhow::ensure!(
        !captions.is_empty(),
        BadInput(format!("{} holds no caption", args.captions.display()))
    );
    let mut config: dnd_summarize::SummarizerConfig = match &args.config {
        Some(path) => {
            let raw = std::fs::read_to_string(path)
                .map_err(|e| BadInput(format!("cannot read {}: {e}", path.display())))?;
            toml::from_str(&raw).map_err(|e| {
                BadInput(format!("invalid summariser config {}: {e}", path.display()))
            })?
        }
        None => dnd_summarize::SummarizerConfig {
            backend: dnd_summarize::Backend::Consensus,
            ..Default::default()
        },
    };
    if let Some(b) = &args.backend {
        config.backend =
            serde_json::from_value(serde_json::Value::String(b.clone())).map_err(|_| {
                BadInput(format!("--backend `{b}` is not one of: openai, local, consensus"))
            })?;
    }
    if let Some(model) = &args.model {
        match config.backend {
            dnd_summarize::Backend::Local => config.local.model = model.clone(),
            dnd_summarize::Backend::OpenAi => config.openai.model = model.clone(),
            dnd_summarize::Backend::Consensus => {
                return Err(BadInput(
                    "--model names the language model of the local or openai backend; add --backend local (or openai)".into(),
                )
                .into());
            }
        }
    }
    let summarizer = tokio::task::spawn_blocking(move || {
        dnd_summarize::build(&config).map(|s| (s, config.rounds))
    })
    .await??;
    let (summarizer, rounds) = summarizer;
    summarizer.check().await?;
    let simplified = dnd_summarize::simplify_captions(summarizer.as_ref(), &captions).await?;
    anyhow::ensure!(
        !simplified.labels.is_empty(),
        "no caption gave a usable label; see --exchanges for the replies"
    );
    let summary =
        dnd_summarize::summarize_rounds(summarizer.as_ref(), &simplified.labels, args.seed, rounds)
            .await?;
    for label in &summary.labels {
        println!("{label}");
    }
    if let Some(path) = &args.exchanges {
        let mut out = String::new();
        for e in simplified.exchanges.iter().chain(&summary.exchanges) {
            out.push_str(&serde_json::to_string(e)?);
            out.push('\n');
        }
        std::fs::write(path, out).with_context(|| format!("writing {}", path.display()))?;
    }
    eprintln!(
        "{} captions, {} labels, {} candidates from {}",
        captions.len(),
        simplified.labels.len(),
        summary.labels.len(),
        summarizer.describe()
    );
    Ok(())
}

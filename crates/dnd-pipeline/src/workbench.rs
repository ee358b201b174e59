//! The models of a dissection, loaded once and kept resident, behind the caches.
//!
//! Every expensive call (a caption, a generated image, an LLM reply) goes through
//! [`ContentCache`] first, keyed by what the result depends on: the model's identity
//! (reference plus the commit or weight hash that pins it), its settings, and the input.
//! A cache miss is exactly one model call, so the cache counters also count model work.

use std::io::Cursor;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use image::RgbImage;
use serde::{Deserialize, Serialize};

use dnd_models::checkpoint::fingerprint;
use dnd_models::device::parse_device;
use dnd_models::{
    BlipCaptioner, Captioner, ClipEmbedder, DiffusionGenerator, Embedder, Generator, ImageRequest,
    ModelRef, TargetModel,
};
use dnd_store::{CacheKey, CacheKind, ContentCache};
use dnd_summarize::{Exchange, Step, SummarizeError, Summarizer};

use crate::error::PipelineError;
use crate::job::{JobSpec, SYNTHETIC_GENERATOR};

/// BLAKE3 of an image's size and RGB pixels: equal pictures, equal hashes, whatever file
/// format they came in.
pub fn image_hash(image: &RgbImage) -> String {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&image.width().to_le_bytes());
    hasher.update(&image.height().to_le_bytes());
    hasher.update(image.as_raw());
    hasher.finalize().to_hex().to_string()
}

pub fn encode_png(image: &RgbImage) -> Bytes {
    let mut png = Vec::new();
    image::DynamicImage::ImageRgb8(image.clone())
        .write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png)
        .expect("encoding PNG to memory cannot fail");
    Bytes::from(png)
}

/// A model and what identifies it in cache keys.
pub struct Loaded<M: ?Sized> {
    pub model: Arc<M>,
    /// Reference plus commit or weight hash, e.g. `models/blip#blake3:0123...`.
    pub identity: String,
    /// Settings that change its outputs (decoding limits, sampler steps, size ...).
    pub settings: serde_json::Value,
}

/// Every model of a job, resident, and the cache in front of them.
pub struct Workbench {
    pub target: Arc<TargetModel>,
    pub captioner: Loaded<dyn Captioner>,
    pub generator: Loaded<dyn Generator>,
    pub embedder: Loaded<dyn Embedder>,
    pub summarizer: Loaded<dyn Summarizer>,
    pub cache: ContentCache,
}

fn identity(reference: &ModelRef, anchor: &str) -> Result<String, PipelineError> {
    Ok(fingerprint(reference, &reference.resolve(anchor)?)?)
}

/// How [`Workbench::through_cache`] groups what it computes.
enum Batching {
    /// The misses, in input order, so many at a time.
    Misses(usize),
    /// These batches of input indices, each computed whole.
    Fixed(Vec<Vec<usize>>),
}

/// A generated image, whether the cache had it, and its cache key.
#[derive(Debug, Clone)]
pub struct GeneratedEntry {
    pub image: Arc<RgbImage>,
    pub cached: bool,
    pub key: CacheKey,
}

/// Loads a model on a blocking thread (loading reads and converts gigabytes).
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, PipelineError> + Send + 'static,
) -> Result<T, PipelineError> {
    tokio::task::spawn_blocking(f).await?
}

impl Workbench {
    /// Each model's identity (hub revision or content hash), by role.
    pub fn identities(&self) -> std::collections::BTreeMap<String, String> {
        [
            ("target", self.target.reference.clone()),
            ("captioner", self.captioner.identity.clone()),
            ("generator", self.generator.identity.clone()),
            ("embedder", self.embedder.identity.clone()),
            ("summarizer", self.summarizer.identity.clone()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// Loads the captioner, generator, embedder and summariser of `spec` next to an
    /// already loaded target model, and checks that the summariser can be reached.
    pub async fn load(
        spec: &JobSpec,
        target: Arc<TargetModel>,
        cache: ContentCache,
    ) -> Result<Self, PipelineError> {
        let device = parse_device(&spec.device)?;
        let captioner = {
            let (reference, device, decoding) = (
                spec.captioner.model.parse::<ModelRef>()?,
                device.clone(),
                spec.captioner.decoding.clone(),
            );
            blocking(move || {
                let model = BlipCaptioner::load(&reference, &device, decoding.clone())?;
                Ok(Loaded {
                    model: Arc::new(model) as Arc<dyn Captioner>,
                    identity: identity(&reference, "model.safetensors")?,
                    settings: serde_json::to_value(&decoding).expect("serialises"),
                })
            })
            .await?
        };
        let generator = if spec.generator.model == SYNTHETIC_GENERATOR {
            // The synthetic world's renderer: text in, a scene of the world out, no weights.
            let sampling = &spec.generator.sampling;
            let renderer =
                dnd_synth::TextRenderer::new(sampling.width as u32, sampling.height as u32)
                    .map_err(|e| {
                        dnd_core::CoreError::invalid("generator.sampling", e.to_string())
                    })?;
            Loaded {
                model: Arc::new(renderer) as Arc<dyn Generator>,
                identity: format!("{SYNTHETIC_GENERATOR}@{}", dnd_synth::WORLD_VERSION),
                settings: serde_json::json!({ "width": sampling.width, "height": sampling.height }),
            }
        } else {
            let (reference, device, sampling) = (
                spec.generator.model.parse::<ModelRef>()?,
                device.clone(),
                spec.generator.sampling.clone(),
            );
            blocking(move || {
                let model = DiffusionGenerator::load(&reference, &device, sampling.clone())?;
                // The prompt template is not a setting of an image: the rendered prompt is in the key.
                let settings = serde_json::json!({
                    "scheduler": "ddim",
                    "steps": sampling.steps,
                    "guidance_scale": sampling.guidance_scale,
                    "width": sampling.width,
                    "height": sampling.height,
                    "timestep_spacing": sampling.timestep_spacing,
                });
                Ok(Loaded {
                    model: Arc::new(model) as Arc<dyn Generator>,
                    identity: identity(&reference, "model_index.json")?,
                    settings,
                })
            })
            .await?
        };
        let embedder = {
            let (reference, device) = (spec.embedder.model.parse::<ModelRef>()?, device.clone());
            blocking(move || {
                let model = ClipEmbedder::load(&reference, &device)?;
                Ok(Loaded {
                    model: Arc::new(model) as Arc<dyn Embedder>,
                    identity: identity(&reference, "model.safetensors")?,
                    settings: serde_json::Value::Null,
                })
            })
            .await?
        };
        let summarizer = {
            let config = spec.summarizer.clone();
            let model: Arc<dyn Summarizer> =
                blocking(move || Ok(Arc::from(dnd_summarize::build(&config)?))).await?;
            model.check().await?;
            Loaded { identity: model.describe(), model, settings: serde_json::Value::Null }
        };
        Ok(Self { target, captioner, generator, embedder, summarizer, cache })
    }

    /// Answers each input from the cache where possible and computes the rest on a
    /// blocking thread (one model call per batch), storing what it computed. Returns each
    /// output and whether the cache answered it, in input order.
    ///
    /// With [`Batching::Fixed`], a batch is computed whole whenever one of its members
    /// misses, so that a value never depends on which other inputs happened to miss: a
    /// model's batched numerics differ in the last bits with the batch's make-up, and a
    /// cache must hold one value per key, whoever computes it first.
    async fn through_cache<I, O>(
        &self,
        inputs: &[I],
        batching: Batching,
        key: impl Fn(usize) -> CacheKey,
        decode: impl Fn(&[u8]) -> Result<O, String>,
        encode: impl Fn(&O) -> Bytes,
        compute: impl Fn(Vec<I>) -> Result<Vec<O>, PipelineError> + Clone + Send + 'static,
    ) -> Result<Vec<(O, bool)>, PipelineError>
    where
        I: Clone + Send + 'static,
        O: Clone + Send + 'static,
    {
        let mut out: Vec<Option<(O, bool)>> = vec![None; inputs.len()];
        let mut misses = Vec::new();
        for (i, slot) in out.iter_mut().enumerate() {
            let key = key(i);
            match self.cache.get(&key).await? {
                Some(bytes) => {
                    let value = decode(&bytes).map_err(|e| {
                        PipelineError::Internal(format!(
                            "corrupt {} cache entry {}: {e}",
                            key.kind,
                            self.cache.display_path(&key)
                        ))
                    })?;
                    *slot = Some((value, true));
                }
                None => misses.push(i),
            }
        }
        let batches: Vec<Vec<usize>> = match batching {
            Batching::Misses(size) => misses.chunks(size.max(1)).map(<[usize]>::to_vec).collect(),
            Batching::Fixed(batches) => {
                batches.into_iter().filter(|b| b.iter().any(|i| out[*i].is_none())).collect()
            }
        };
        for chunk in batches {
            let batch: Vec<I> = chunk.iter().map(|&i| inputs[i].clone()).collect();
            let compute = compute.clone();
            let values = blocking(move || compute(batch)).await?;
            for (&i, value) in chunk.iter().zip(values) {
                if out[i].is_none() {
                    self.cache.put(&key(i), encode(&value)).await?;
                    out[i] = Some((value, false));
                }
            }
        }
        Ok(out.into_iter().map(|o| o.expect("every input is answered")).collect())
    }

    /// Captions of `images` (with their [`image_hash`]es), served from the cache where
    /// possible; misses are captioned together in batches of `batch_size`. Returns the
    /// caption and whether it came from the cache, in input order.
    pub async fn captions(
        &self,
        images: &[(String, Arc<RgbImage>)],
        batch_size: usize,
    ) -> Result<Vec<(String, bool)>, PipelineError> {
        #[derive(Serialize)]
        struct Inputs<'a> {
            captioner: &'a str,
            settings: &'a serde_json::Value,
            image: &'a str,
        }
        #[derive(Clone, Serialize, Deserialize)]
        struct Entry {
            caption: String,
            token_ids: Vec<u32>,
        }
        let model = self.captioner.model.clone();
        let entries = self
            .through_cache(
                images,
                Batching::Misses(batch_size),
                |i| {
                    let image = images[i].0.as_str();
                    CacheKey::of(
                        CacheKind::Captions,
                        &Inputs {
                            captioner: &self.captioner.identity,
                            settings: &self.captioner.settings,
                            image,
                        },
                    )
                },
                |bytes| serde_json::from_slice::<Entry>(bytes).map_err(|e| e.to_string()),
                |entry| Bytes::from(serde_json::to_vec(entry).expect("serialises")),
                move |batch: Vec<(String, Arc<RgbImage>)>| {
                    let pictures: Vec<RgbImage> =
                        batch.iter().map(|(_, image)| (**image).clone()).collect();
                    Ok(model
                        .caption(&pictures)?
                        .into_iter()
                        .map(|c| Entry { caption: c.text, token_ids: c.token_ids })
                        .collect())
                },
            )
            .await?;
        Ok(entries.into_iter().map(|(entry, cached)| (entry.caption, cached)).collect())
    }

    /// Generated images for `requests`, from the cache where possible. Images are
    /// generated in fixed batches: one prompt's requested seeds, in order, `batch_size` at
    /// a time; an image's cache key names its batch (see `through_cache`). Returns
    /// each image, whether it came from the cache, and its key, in request order.
    pub async fn generated(
        &self,
        requests: &[ImageRequest],
        batch_size: usize,
    ) -> Result<Vec<GeneratedEntry>, PipelineError> {
        #[derive(Serialize)]
        struct Inputs<'a> {
            generator: &'a str,
            settings: &'a serde_json::Value,
            prompt: &'a str,
            seed: u64,
            /// The seeds generated together with this one.
            batch: &'a [u64],
        }
        let mut by_prompt: Vec<(&str, Vec<usize>)> = Vec::new();
        for (i, r) in requests.iter().enumerate() {
            match by_prompt.iter_mut().find(|(p, _)| *p == r.prompt) {
                Some((_, list)) => list.push(i),
                None => by_prompt.push((&r.prompt, vec![i])),
            }
        }
        let mut batches = Vec::new();
        for (_, mut list) in by_prompt {
            list.sort_by_key(|&i| requests[i].seed);
            list.dedup_by_key(|i| requests[*i].seed);
            batches.extend(list.chunks(batch_size.max(1)).map(<[usize]>::to_vec));
        }
        let mut batch_seeds: Vec<Vec<u64>> = vec![Vec::new(); requests.len()];
        for batch in &batches {
            let seeds: Vec<u64> = batch.iter().map(|&i| requests[i].seed).collect();
            for &i in batch {
                batch_seeds[i] = seeds.clone();
            }
        }
        // A duplicate request shares its twin's batch.
        for i in 0..requests.len() {
            if batch_seeds[i].is_empty() {
                let twin = (0..requests.len())
                    .find(|&j| !batch_seeds[j].is_empty() && requests[j] == requests[i])
                    .expect("a twin exists");
                batch_seeds[i] = batch_seeds[twin].clone();
            }
        }
        let keys: Vec<CacheKey> = requests
            .iter()
            .zip(&batch_seeds)
            .map(|(r, batch)| {
                let inputs = Inputs {
                    generator: &self.generator.identity,
                    settings: &self.generator.settings,
                    prompt: &r.prompt,
                    seed: r.seed,
                    batch,
                };
                CacheKey::of(CacheKind::Images, &inputs)
            })
            .collect();
        let model = self.generator.model.clone();
        let images = self
            .through_cache(
                requests,
                Batching::Fixed(batches),
                |i| keys[i].clone(),
                |png| {
                    image::load_from_memory_with_format(png, image::ImageFormat::Png)
                        .map(|image| Arc::new(image.to_rgb8()))
                        .map_err(|e| e.to_string())
                },
                |image| encode_png(image),
                move |batch: Vec<ImageRequest>| {
                    Ok(model.generate(&batch)?.into_iter().map(Arc::new).collect())
                },
            )
            .await?;
        Ok(images
            .into_iter()
            .zip(keys)
            .map(|((image, cached), key)| GeneratedEntry { image, cached, key })
            .collect())
    }

    /// The summariser behind the reply cache.
    pub fn cached_summarizer(&self) -> CachedSummarizer<'_> {
        CachedSummarizer {
            inner: self.summarizer.model.as_ref(),
            identity: &self.summarizer.identity,
            cache: &self.cache,
        }
    }
}

/// A [`Summarizer`] that answers from the reply cache when it has seen the exact request
/// before (keyed by the summariser's identity and the full request), and otherwise asks
/// the inner one and stores the exchange. Failed calls (unreachable server) are not cached.
pub struct CachedSummarizer<'a> {
    inner: &'a dyn Summarizer,
    identity: &'a str,
    cache: &'a ContentCache,
}

impl CachedSummarizer<'_> {
    async fn ask(&self, step: Step, input: &[String]) -> Result<Exchange, SummarizeError> {
        #[derive(Serialize)]
        struct Inputs<'a> {
            summarizer: &'a str,
            request: &'a str,
        }
        let request = self.inner.request(step, input)?;
        let key = CacheKey::of(
            CacheKind::Replies,
            &Inputs { summarizer: self.identity, request: &request },
        );
        let cache_error =
            |e: dnd_store::StoreError| SummarizeError::Internal(format!("reply cache: {e}"));
        if let Some(bytes) = self.cache.get(&key).await.map_err(cache_error)? {
            let mut exchange: Exchange = serde_json::from_slice(&bytes).map_err(|e| {
                SummarizeError::Internal(format!("corrupt reply cache entry {}: {e}", key.path()))
            })?;
            exchange.cached = true;
            return Ok(exchange);
        }
        let exchange = match step {
            Step::Simplify => {
                self.inner.simplify(input.first().map(String::as_str).unwrap_or_default()).await?
            }
            Step::Summarize => self.inner.summarize(input).await?,
            Step::Merge => self.inner.merge(input).await?,
        };
        let json =
            serde_json::to_vec(&exchange).map_err(|e| SummarizeError::Internal(e.to_string()))?;
        self.cache.put(&key, Bytes::from(json)).await.map_err(cache_error)?;
        Ok(exchange)
    }
}

#[async_trait]
impl Summarizer for CachedSummarizer<'_> {
    async fn simplify(&self, caption: &str) -> Result<Exchange, SummarizeError> {
        self.ask(Step::Simplify, &[caption.to_string()]).await
    }

    async fn summarize(&self, labels: &[String]) -> Result<Exchange, SummarizeError> {
        self.ask(Step::Summarize, labels).await
    }

    async fn merge(&self, labels: &[String]) -> Result<Exchange, SummarizeError> {
        self.ask(Step::Merge, labels).await
    }

    fn request(&self, step: Step, input: &[String]) -> Result<String, SummarizeError> {
        self.inner.request(step, input)
    }

    async fn check(&self) -> Result<(), SummarizeError> {
        self.inner.check().await
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}

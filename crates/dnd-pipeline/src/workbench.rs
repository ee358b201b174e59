//! The models of a dissection, loaded once and kept resident, behind the caches.
//!
//! Every expensive call (a caption, a generated image, an LLM reply) goes through
//! [`ContentCache`] first, keyed by what the result depends on: the model's identity
//! (reference plus the commit or weight hash that pins it), its settings, and the input.
//! A cache miss is exactly one model call, so the cache counters also count model work.

use std::collections::HashMap;
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
use crate::units::{Readout, UnitLayers, load_units};
use crate::vector_cache::VectorCache;

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
    /// The job's dictionaries (`[target.units]`), on the target's device.
    pub units: UnitLayers,
    pub captioner: Loaded<dyn Captioner>,
    pub generator: Loaded<dyn Generator>,
    pub embedder: Loaded<dyn Embedder>,
    pub summarizer: Loaded<dyn Summarizer>,
    pub cache: ContentCache,
    /// The target's identity in cache keys: reference plus weight hash or commit.
    pub target_identity: String,
    /// `cpu` or `cuda`: where the models run, for the vector cache's keys.
    pub device_kind: &'static str,
}

fn identity(reference: &ModelRef, anchor: &str) -> Result<String, PipelineError> {
    Ok(fingerprint(reference, &reference.resolve(anchor)?)?)
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
        let units = {
            let (spec, target) = (spec.clone(), target.clone());
            blocking(move || load_units(&spec, &target)).await?
        };
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
        let target_identity = {
            let reference = spec.target.model.parse::<ModelRef>()?;
            blocking(move || identity(&reference, "model.safetensors")).await?
        };
        let device_kind = if device.is_cpu() { "cpu" } else { "cuda" };
        Ok(Self {
            target,
            units,
            captioner,
            generator,
            embedder,
            summarizer,
            cache,
            target_identity,
            device_kind,
        })
    }

    /// What stages read at `layer`: its channels, or the units of its dictionary.
    pub fn readout(&self, layer: &str) -> Result<Readout, PipelineError> {
        Ok(Readout::of(self.target.tap(layer)?, &self.units))
    }

    /// The target model's vectors (pooled activations, channel maps) in the cache.
    pub fn target_vectors(&self) -> VectorCache<'_> {
        VectorCache { cache: &self.cache, model: &self.target_identity, device: self.device_kind }
    }

    /// The embedder's image embeddings in the cache.
    pub fn embedder_vectors(&self) -> VectorCache<'_> {
        VectorCache { cache: &self.cache, model: &self.embedder.identity, device: self.device_kind }
    }

    /// Answers each input from the cache where possible and computes the misses on a
    /// blocking thread, `batch_size` distinct keys per model call, storing what it
    /// computed. Returns each output and whether the cache answered it, in input order.
    ///
    /// A value must not depend on which other inputs happen to miss with it (a cache holds
    /// one value per key, whoever computes it first): `compute` must be batch-invariant,
    /// as the captioner and the generator are (each image's numerics are its own).
    async fn through_cache<I, O>(
        &self,
        inputs: &[I],
        batch_size: usize,
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
        // Inputs with the same key as an earlier miss: computed once, answered after.
        let mut twins: Vec<(usize, usize)> = Vec::new();
        let mut first_miss: HashMap<String, usize> = HashMap::new();
        for (i, slot) in out.iter_mut().enumerate() {
            let key = key(i);
            if let Some(&first) = first_miss.get(&key.hash) {
                twins.push((i, first));
                continue;
            }
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
                None => {
                    first_miss.insert(key.hash, i);
                    misses.push(i);
                }
            }
        }
        for chunk in misses.chunks(batch_size.max(1)) {
            let batch: Vec<I> = chunk.iter().map(|&i| inputs[i].clone()).collect();
            let compute = compute.clone();
            let values = blocking(move || compute(batch)).await?;
            for (&i, value) in chunk.iter().zip(values) {
                self.cache.put(&key(i), encode(&value)).await?;
                out[i] = Some((value, false));
            }
        }
        for (i, first) in twins {
            out[i] = out[first].clone();
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
                batch_size,
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

    /// Generated images for `requests`, from the cache where possible; the misses,
    /// whatever their prompts, go through the generator `batch_size` at a time (its
    /// images do not depend on their batch, so a key is the prompt and the seed). Returns
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
        }
        let keys: Vec<CacheKey> = requests
            .iter()
            .map(|r| {
                let inputs = Inputs {
                    generator: &self.generator.identity,
                    settings: &self.generator.settings,
                    prompt: &r.prompt,
                    seed: r.seed,
                };
                CacheKey::of(CacheKind::Images, &inputs)
            })
            .collect();
        let model = self.generator.model.clone();
        let images = self
            .through_cache(
                requests,
                batch_size,
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

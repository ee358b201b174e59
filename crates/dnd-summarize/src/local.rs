//! A local Qwen2-class instruct model (Qwen2, Qwen2.5) run with candle: no server, no
//! network once the files are there.
//!
//! The files are those of a Hugging Face checkpoint: `model.safetensors` (or its shards, or
//! `pytorch_model.bin`: whatever [`Checkpoint`] reads), `config.json`,
//! `tokenizer.json`, the chat template (`chat_template.jinja` or `tokenizer_config.json`'s
//! `chat_template`) and optionally `generation_config.json` (its EOS ids end a reply).
//! Decoding is greedy with a KV cache, so a reply depends only on the prompt.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Activation, Linear, VarBuilder};
use candle_transformers::models::qwen2;
use dnd_models::device::parse_device;
use dnd_models::hf_files::read_json;
use dnd_models::{Checkpoint, ModelError, ModelRef};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokenizers::Tokenizer;

use crate::chat::{ChatBackend, Completion};
use crate::chat_template::ChatTemplate;
use crate::error::SummarizeError;
use crate::prompts::ChatMessage;

/// Which local model, where it runs, how long a reply may be. Missing fields take the defaults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LocalConfig {
    /// A directory with the checkpoint's files (or its `.safetensors` file), or
    /// `hf:<org>/<name>[@revision]` from the Hugging Face hub cache, e.g.
    /// `hf:Qwen/Qwen2.5-1.5B-Instruct`. Sharded checkpoints are not supported.
    pub model: String,
    /// `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// A label is at most 5 words; 24 tokens leave room for some wrapping around it.
    pub max_new_tokens: usize,
}

impl Default for LocalConfig {
    fn default() -> Self {
        LocalConfig { model: String::new(), device: "cpu".into(), max_new_tokens: 24 }
    }
}

impl LocalConfig {
    pub fn validate(&self) -> Result<(), SummarizeError> {
        if self.model.trim().is_empty() {
            return Err(SummarizeError::invalid(
                "local.model",
                "name a Qwen2-class instruct model: a local directory or hf:<org>/<name>, e.g. hf:Qwen/Qwen2.5-1.5B-Instruct",
            ));
        }
        if self.max_new_tokens == 0 {
            return Err(SummarizeError::invalid(
                "local.max_new_tokens",
                "allow at least one token",
            ));
        }
        Ok(())
    }
}

/// The parts of a Qwen2 `config.json` the model needs, with transformers' defaults.
#[derive(Deserialize)]
struct Qwen2Json {
    model_type: String,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    max_position_embeddings: usize,
    sliding_window: Option<usize>,
    #[serde(default)]
    use_sliding_window: bool,
    max_window_layers: Option<usize>,
    #[serde(default)]
    tie_word_embeddings: bool,
    /// transformers < 5 writes the RoPE base here ...
    rope_theta: Option<f64>,
    /// ... transformers 5 here, with the RoPE type.
    rope_parameters: Option<RopeParameters>,
    /// Older configs' RoPE scaling; only its absence (or type "default") is supported.
    rope_scaling: Option<RopeParameters>,
    #[serde(default = "default_rms_norm_eps")]
    rms_norm_eps: f64,
    #[serde(default = "default_hidden_act")]
    hidden_act: Activation,
    eos_token_id: Option<TokenIds>,
}

#[derive(Deserialize)]
struct RopeParameters {
    rope_theta: Option<f64>,
    #[serde(alias = "type")]
    rope_type: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    fn ids(&self) -> &[u32] {
        match self {
            TokenIds::One(id) => std::slice::from_ref(id),
            TokenIds::Many(ids) => ids,
        }
    }
}

#[derive(Deserialize)]
struct GenerationJson {
    eos_token_id: Option<TokenIds>,
}

fn default_rms_norm_eps() -> f64 {
    1e-6
}

fn default_hidden_act() -> Activation {
    Activation::Silu
}

/// transformers' default RoPE base for Qwen2.
const DEFAULT_ROPE_THETA: f64 = 10_000.0;

impl Qwen2Json {
    fn to_candle(&self, path: &Path) -> Result<qwen2::Config, ModelError> {
        let bad = |reason: String| ModelError::Config { path: path.into(), reason };
        if self.model_type != "qwen2" {
            return Err(bad(format!(
                "model_type is `{}`; the local backend runs qwen2 models (Qwen2, Qwen2.5 instruct)",
                self.model_type
            )));
        }
        for rope in [&self.rope_parameters, &self.rope_scaling].into_iter().flatten() {
            if let Some(kind) = rope.rope_type.as_deref().filter(|k| *k != "default") {
                return Err(bad(format!("RoPE type `{kind}` is not supported, only the default")));
            }
        }
        let num_key_value_heads = self.num_key_value_heads.unwrap_or(self.num_attention_heads);
        if self.num_attention_heads == 0
            || num_key_value_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
            || !self.num_attention_heads.is_multiple_of(num_key_value_heads)
        {
            return Err(bad(format!(
                "{} attention heads, {num_key_value_heads} key/value heads and hidden size {} do not fit together",
                self.num_attention_heads, self.hidden_size
            )));
        }
        let rope_theta = self
            .rope_parameters
            .as_ref()
            .and_then(|r| r.rope_theta)
            .or(self.rope_theta)
            .unwrap_or(DEFAULT_ROPE_THETA);
        Ok(qwen2::Config {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            num_key_value_heads,
            max_position_embeddings: self.max_position_embeddings,
            // candle masks beyond `sliding_window` positions in every layer; without
            // sliding-window attention, the whole context is the window.
            sliding_window: match (self.use_sliding_window, self.sliding_window) {
                (true, Some(window)) => window,
                _ => self.max_position_embeddings,
            },
            max_window_layers: self.max_window_layers.unwrap_or(self.num_hidden_layers),
            tie_word_embeddings: self.tie_word_embeddings,
            rope_theta,
            rms_norm_eps: self.rms_norm_eps,
            use_sliding_window: self.use_sliding_window,
            hidden_act: self.hidden_act,
        })
    }
}

/// A loaded Qwen2 chat model: tokenizer, chat template, weights.
pub struct Qwen2Chat {
    name: String,
    /// The KV cache lives in the model, so one generation runs at a time.
    model: Mutex<qwen2::Model>,
    lm_head: Linear,
    tokenizer: Tokenizer,
    tokenizer_path: PathBuf,
    template: ChatTemplate,
    eos_ids: Vec<u32>,
    device: Device,
    max_positions: usize,
}

impl Qwen2Chat {
    /// Finds and loads the model's files; weights are converted to f32.
    pub fn load(config: &LocalConfig) -> Result<Self, SummarizeError> {
        config.validate()?;
        let reference: ModelRef = config.model.parse()?;
        let files = reference.resolve("model.safetensors")?;
        let dir = files.weights.parent().map(Path::to_path_buf).unwrap_or_default();
        let missing = |file: &str| ModelError::NotFound {
            what: format!("{reference} has no {file} next to {}", files.weights.display()),
            help: match &reference {
                ModelRef::Hub { repo, .. } => {
                    format!("download the whole repository: `huggingface-cli download {repo}`")
                }
                ModelRef::Local(_) => {
                    format!("copy the checkpoint's {file} into {}", dir.display())
                }
            },
        };
        let config_path = files.config.clone().ok_or_else(|| missing("config.json"))?;
        let tokenizer_path = dir.join("tokenizer.json");
        if !tokenizer_path.is_file() {
            return Err(missing("tokenizer.json").into());
        }

        let qwen2_json: Qwen2Json = read_json(&config_path)?;
        let candle_config = qwen2_json.to_candle(&config_path)?;
        let tokenizer_config: Value =
            read_optional_json(&dir.join("tokenizer_config.json"))?.unwrap_or(Value::Null);
        let generation: Option<GenerationJson> =
            read_optional_json(&dir.join("generation_config.json"))?;

        let tokenizer_text = std::fs::read_to_string(&tokenizer_path)
            .map_err(|source| ModelError::Io { path: tokenizer_path.clone(), source })?;
        let tokenizer_text = dnd_models::json::python_tokens_to_json(&tokenizer_text);
        let tokenizer = Tokenizer::from_bytes(tokenizer_text.as_bytes()).map_err(|e| {
            SummarizeError::Tokenizer { path: tokenizer_path.clone(), reason: e.to_string() }
        })?;
        let name = reference.to_string();
        let template_source = chat_template_source(&dir, &tokenizer_config)?.ok_or_else(|| SummarizeError::ChatTemplate {
            model: name.clone(),
            reason: "it has none (no chat_template.jinja, no chat_template in tokenizer_config.json): use an instruct model, e.g. Qwen/Qwen2.5-1.5B-Instruct".into(),
        })?;
        let eos_token = special_token(&tokenizer_config, "eos_token");
        let template = ChatTemplate::new(
            template_source,
            special_token(&tokenizer_config, "bos_token"),
            eos_token.clone(),
        )
        .map_err(|reason| SummarizeError::ChatTemplate { model: name.clone(), reason })?;

        let eos_ids = eos_ids(
            &[generation.and_then(|g| g.eos_token_id), qwen2_json.eos_token_id],
            eos_token,
            &tokenizer,
        );
        if eos_ids.is_empty() {
            tracing::warn!(
                model = name,
                "no EOS token id found; every reply runs to local.max_new_tokens"
            );
        }

        let device = parse_device(&config.device)?;
        let (model, lm_head) = load_weights(&files.weights, &candle_config, &device)?;
        tracing::info!(model = name, eos = ?eos_ids, "loaded the local language model");
        Ok(Qwen2Chat {
            name,
            model: Mutex::new(model),
            lm_head,
            tokenizer,
            tokenizer_path,
            template,
            eos_ids,
            device,
            max_positions: candle_config.max_position_embeddings,
        })
    }

    /// The prompt for `messages` per the model's chat template, assistant turn opened.
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String, SummarizeError> {
        self.template
            .render(messages)
            .map_err(|reason| SummarizeError::ChatTemplate { model: self.name.clone(), reason })
    }

    /// Token ids of a rendered prompt. The template already wrote the special tokens, so
    /// the tokenizer adds none (as transformers' `apply_chat_template` does).
    pub fn encode(&self, prompt: &str) -> Result<Vec<u32>, SummarizeError> {
        let encoding = self.tokenizer.encode(prompt, false).map_err(|e| self.tokenizer_error(e))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Text of generated ids, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String, SummarizeError> {
        self.tokenizer.decode(ids, true).map_err(|e| self.tokenizer_error(e))
    }

    /// Logits at every position of `ids`, shape (1, len, vocab).
    pub fn logits(&self, ids: &[u32]) -> Result<Tensor, SummarizeError> {
        let input = self.input(ids)?;
        let mut model = self.lock()?;
        model.clear_kv_cache();
        let hidden = model.forward(&input, 0, None);
        model.clear_kv_cache();
        Ok(self.lm_head.forward(&hidden?)?)
    }

    /// Greedy continuation of `ids`: at most `max_new_tokens` new ids, ending before the
    /// first EOS id or at the model's context length.
    pub fn generate(&self, ids: &[u32], max_new_tokens: usize) -> Result<Vec<u32>, SummarizeError> {
        let input = self.input(ids)?;
        let budget = max_new_tokens.min(self.max_positions - ids.len());
        let mut model = self.lock()?;
        model.clear_kv_cache();
        let generated = self.greedy(&mut model, input, ids.len(), budget);
        model.clear_kv_cache();
        generated
    }

    fn greedy(
        &self,
        model: &mut qwen2::Model,
        input: Tensor,
        prompt_len: usize,
        budget: usize,
    ) -> Result<Vec<u32>, SummarizeError> {
        let mut new_ids = Vec::with_capacity(budget);
        let mut hidden = model.forward(&input, 0, None)?;
        while new_ids.len() < budget {
            let last = hidden.narrow(1, hidden.dim(1)? - 1, 1)?;
            let next = self.lm_head.forward(&last)?.flatten_all()?.argmax(0)?.to_scalar::<u32>()?;
            if self.eos_ids.contains(&next) {
                break;
            }
            new_ids.push(next);
            if new_ids.len() < budget {
                let step = Tensor::new(&[next], &self.device)?.unsqueeze(0)?;
                hidden = model.forward(&step, prompt_len + new_ids.len() - 1, None)?;
            }
        }
        Ok(new_ids)
    }

    fn input(&self, ids: &[u32]) -> Result<Tensor, SummarizeError> {
        if ids.is_empty() || ids.len() >= self.max_positions {
            return Err(SummarizeError::invalid(
                "prompt",
                format!(
                    "it has {} tokens; {} takes 1 to {}",
                    ids.len(),
                    self.name,
                    self.max_positions - 1
                ),
            ));
        }
        Ok(Tensor::new(ids, &self.device)?.unsqueeze(0)?)
    }

    fn lock(&self) -> Result<MutexGuard<'_, qwen2::Model>, SummarizeError> {
        self.model
            .lock()
            .map_err(|_| SummarizeError::Internal("an earlier generation panicked".into()))
    }

    fn tokenizer_error(&self, e: tokenizers::Error) -> SummarizeError {
        SummarizeError::Tokenizer { path: self.tokenizer_path.clone(), reason: e.to_string() }
    }
}

/// The Qwen2 model and its output projection, in f32 on `device`.
fn load_weights(
    weights: &Path,
    config: &qwen2::Config,
    device: &Device,
) -> Result<(qwen2::Model, Linear), SummarizeError> {
    let checkpoint_error = |reason: String| ModelError::Checkpoint { path: weights.into(), reason };
    // The one checkpoint reader of dnd-models: safetensors, shards, PyTorch's .bin.
    let tensors: HashMap<String, Tensor> = Checkpoint::open(weights)?
        .load(device)?
        .into_iter()
        .map(|(name, tensor)| Ok((name, tensor.to_dtype(DType::F32)?)))
        .collect::<Result<_, candle_core::Error>>()?;
    // Checkpoints of tied models omit lm_head.weight: it is the embedding matrix (shared,
    // not copied: the VarBuilder hands out the same tensor).
    let head_weight = match tensors.get("lm_head.weight") {
        Some(weight) => weight.clone(),
        None if config.tie_word_embeddings => tensors
            .get("model.embed_tokens.weight")
            .cloned()
            .ok_or_else(|| checkpoint_error("it has no model.embed_tokens.weight".into()))?,
        None => {
            let reason =
                "it has no lm_head.weight and config.json does not tie it to the embeddings";
            return Err(checkpoint_error(reason.into()).into());
        }
    };
    let model = qwen2::Model::new(config, VarBuilder::from_tensors(tensors, DType::F32, device))
        .map_err(|e| checkpoint_error(format!("it does not fit config.json ({e})")))?;
    Ok((model, Linear::new(head_weight, None)))
}

/// Generation stops at any EOS id the checkpoint names, wherever it names them:
/// generation_config.json, config.json, the tokenizer config's eos_token.
fn eos_ids(
    named: &[Option<TokenIds>],
    eos_token: Option<String>,
    tokenizer: &Tokenizer,
) -> Vec<u32> {
    let from_token = eos_token.and_then(|t| tokenizer.token_to_id(&t));
    let mut ids: Vec<u32> = Vec::new();
    for id in named.iter().flatten().flat_map(|ids| ids.ids().iter().copied()).chain(from_token) {
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    ids
}

/// `chat_template.jinja` (what newer transformers saves) wins over the tokenizer config's
/// entry, which is a string or a list of named templates.
fn chat_template_source(
    dir: &Path,
    tokenizer_config: &Value,
) -> Result<Option<String>, SummarizeError> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        let source = std::fs::read_to_string(&jinja)
            .map_err(|source| ModelError::Io { path: jinja, source })?;
        return Ok(Some(source));
    }
    let source = match tokenizer_config.get("chat_template") {
        Some(Value::String(source)) => Some(source.clone()),
        Some(Value::Array(named)) => {
            let template =
                |t: &Value| t.get("template").and_then(Value::as_str).map(str::to_string);
            let default =
                named.iter().find(|t| t.get("name").and_then(Value::as_str) == Some("default"));
            default.or(named.first()).and_then(template)
        }
        _ => None,
    };
    Ok(source)
}

/// A special token of the tokenizer config: a string, or an added-token object.
fn special_token(tokenizer_config: &Value, key: &str) -> Option<String> {
    let token = tokenizer_config.get(key)?;
    token.as_str().or_else(|| token.get("content")?.as_str()).map(str::to_string)
}

fn read_optional_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, ModelError> {
    if !path.is_file() {
        return Ok(None);
    }
    read_json(path).map(Some)
}

/// The local model as a chat backend; generation runs on a blocking thread.
pub(crate) struct LocalChat {
    chat: Arc<Qwen2Chat>,
    device: String,
    max_new_tokens: usize,
}

impl LocalChat {
    pub(crate) fn load(config: &LocalConfig) -> Result<Self, SummarizeError> {
        let chat = Arc::new(Qwen2Chat::load(config)?);
        Ok(LocalChat { chat, device: config.device.clone(), max_new_tokens: config.max_new_tokens })
    }
}

#[async_trait]
impl ChatBackend for LocalChat {
    fn backend(&self) -> &'static str {
        "local"
    }

    fn model(&self) -> String {
        self.chat.name.clone()
    }

    fn describe(&self) -> String {
        format!("local:{}@{}", self.chat.name, self.device)
    }

    /// Loading already checked everything a local model needs.
    async fn check(&self) -> Result<(), SummarizeError> {
        Ok(())
    }

    fn render(&self, messages: &[ChatMessage]) -> Result<String, SummarizeError> {
        self.chat.render(messages)
    }

    async fn complete(&self, messages: Vec<ChatMessage>) -> Result<Completion, SummarizeError> {
        let chat = Arc::clone(&self.chat);
        let max_new_tokens = self.max_new_tokens;
        tokio::task::spawn_blocking(move || {
            let request = chat.render(&messages)?;
            let ids = chat.encode(&request)?;
            let reply = chat.decode(&chat.generate(&ids, max_new_tokens)?)?;
            Ok(Completion { request, reply })
        })
        .await?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> Result<qwen2::Config, ModelError> {
        serde_json::from_str::<Qwen2Json>(json).unwrap().to_candle(Path::new("config.json"))
    }

    const BASE: &str = r#""model_type": "qwen2", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
        "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 64"#;

    #[test]
    fn reads_rope_theta_from_either_transformers_layout() {
        let v5 = config(&format!(
            r#"{{{BASE}, "rope_parameters": {{"rope_theta": 1000000.0, "rope_type": "default"}}}}"#
        ))
        .unwrap();
        assert_eq!(v5.rope_theta, 1e6);
        let v4 =
            config(&format!(r#"{{{BASE}, "rope_theta": 500.0, "rope_scaling": null}}"#)).unwrap();
        assert_eq!(v4.rope_theta, 500.0);
        let neither = config(&format!("{{{BASE}}}")).unwrap();
        assert_eq!(
            (neither.rope_theta, neither.num_key_value_heads, neither.sliding_window),
            (DEFAULT_ROPE_THETA, 2, 64)
        );
    }

    #[test]
    fn rejects_what_the_model_code_cannot_run() {
        let yarn =
            config(&format!(r#"{{{BASE}, "rope_scaling": {{"type": "yarn", "factor": 4.0}}}}"#))
                .unwrap_err();
        assert!(yarn.to_string().contains("yarn"), "{yarn}");
        let llama = config(&format!("{{{}}}", BASE.replace("qwen2", "llama"))).unwrap_err();
        assert!(llama.to_string().contains("`llama`"), "{llama}");
        let heads = config(&format!(r#"{{{BASE}, "num_key_value_heads": 3}}"#)).unwrap_err();
        assert!(heads.to_string().contains("do not fit"), "{heads}");
    }

    #[test]
    fn finds_the_chat_template_and_special_tokens() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let listed = serde_json::json!({
            "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}],
            "eos_token": {"content": "<|im_end|>", "special": true},
            "bos_token": null,
        });
        assert_eq!(chat_template_source(dir, &listed).unwrap().as_deref(), Some("D"));
        assert_eq!(special_token(&listed, "eos_token").as_deref(), Some("<|im_end|>"));
        assert_eq!(special_token(&listed, "bos_token"), None);
        assert_eq!(chat_template_source(dir, &Value::Null).unwrap(), None);
        std::fs::write(dir.join("chat_template.jinja"), "J").unwrap();
        assert_eq!(chat_template_source(dir, &listed).unwrap().as_deref(), Some("J"));
    }
}

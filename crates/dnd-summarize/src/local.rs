//! A local instruct model run with candle: no server, no network once the files are there.
//!
//! Two kinds of model files (see docs/job.md, `[summarizer.local]`):
//! * a Hugging Face Qwen2-class checkpoint directory (Qwen2, Qwen2.5 instruct), single or
//!   sharded safetensors, run in f32 (module `hf`);
//! * a GGUF file as llama.cpp, Ollama and LM Studio use (architectures `qwen2` and `llama`:
//!   Qwen2.5, Llama 3 instruct; Q4_K_M, Q8_0 and the other quantizations candle reads), run
//!   with candle's quantized models, tokenizer and chat template from the file's metadata
//!   (module `gguf`).
//!
//! Decoding is greedy with a KV cache, so a reply depends only on the prompt.

mod gguf;
mod gguf_tokenizer;
mod hf;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use candle_core::{Device, Module, Tensor};
use candle_nn::Linear;
use candle_transformers::models::{quantized_llama, quantized_qwen2, qwen2};
use dnd_models::ModelRef;
use dnd_models::device::parse_device;
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::chat::{ChatBackend, Completion};
use crate::chat_template::ChatTemplate;
use crate::error::SummarizeError;
use crate::prompts::ChatMessage;

/// Which local model, where it runs, how long a reply may be. Missing fields take the defaults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LocalConfig {
    /// A GGUF file (or a directory holding exactly one), a Hugging Face checkpoint directory
    /// (or its `.safetensors` file or shard index), or `hf:<org>/<name>[@revision]` from the
    /// Hugging Face hub cache, e.g. `hf:Qwen/Qwen2.5-1.5B-Instruct`.
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
                "name an instruct model: a GGUF file (qwen2 or llama), a Qwen2 checkpoint directory or hf:<org>/<name>, e.g. hf:Qwen/Qwen2.5-1.5B-Instruct",
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

/// The network: f32 Qwen2 from a checkpoint directory, or a quantized GGUF model.
enum Decoder {
    Qwen2 { model: qwen2::Model, lm_head: Linear },
    QuantizedQwen2(quantized_qwen2::ModelWeights),
    QuantizedLlama(quantized_llama::ModelWeights),
}

impl Decoder {
    fn clear_kv_cache(&mut self) {
        match self {
            Decoder::Qwen2 { model, .. } => model.clear_kv_cache(),
            Decoder::QuantizedQwen2(model) => model.clear_kv_cache(),
            Decoder::QuantizedLlama(model) => model.clear_kv_cache(),
        }
    }

    /// Logits after the last token of `input` (shape (1, n)), with `offset` positions
    /// already in the KV cache; shape (vocab,).
    fn next_logits(&mut self, input: &Tensor, offset: usize) -> candle_core::Result<Tensor> {
        match self {
            Decoder::Qwen2 { model, lm_head } => {
                let hidden = model.forward(input, offset, None)?;
                let last = hidden.narrow(1, hidden.dim(1)? - 1, 1)?;
                lm_head.forward(&last)?.flatten_all()
            }
            Decoder::QuantizedQwen2(model) => model.forward(input, offset)?.flatten_all(),
            Decoder::QuantizedLlama(model) => model.forward(input, offset)?.flatten_all(),
        }
    }

    /// Logits at every position of `input` (shape (1, n)) from an empty cache; (1, n, vocab).
    fn all_logits(&mut self, input: &Tensor) -> candle_core::Result<Tensor> {
        if let Decoder::Qwen2 { model, lm_head } = self {
            return lm_head.forward(&model.forward(input, 0, None)?);
        }
        // candle's quantized models return the last position only: one token at a time
        // through the KV cache gives every position the same attention as one pass.
        let mut rows = Vec::with_capacity(input.dim(1)?);
        for position in 0..input.dim(1)? {
            rows.push(self.next_logits(&input.narrow(1, position, 1)?, position)?);
        }
        Tensor::stack(&rows, 0)?.unsqueeze(0)
    }
}

/// What a loader of model files hands over.
struct Parts {
    decoder: Decoder,
    tokenizer: Tokenizer,
    /// The file the tokenizer came from (a tokenizer.json or the GGUF), for messages.
    tokenizer_path: PathBuf,
    template: ChatTemplate,
    eos_ids: Vec<u32>,
    max_positions: usize,
}

/// A loaded chat model: tokenizer, chat template, weights.
pub struct LocalModel {
    name: String,
    /// The KV cache lives in the model, so one generation runs at a time.
    decoder: Mutex<Decoder>,
    tokenizer: Tokenizer,
    tokenizer_path: PathBuf,
    template: ChatTemplate,
    eos_ids: Vec<u32>,
    device: Device,
    max_positions: usize,
}

impl LocalModel {
    /// Finds and loads the model's files: a GGUF file stays quantized, a checkpoint
    /// directory's weights are converted to f32.
    pub fn load(config: &LocalConfig) -> Result<Self, SummarizeError> {
        config.validate()?;
        let reference: ModelRef = config.model.parse()?;
        let name = reference.to_string();
        let device = parse_device(&config.device)?;
        let parts = match gguf::find(&reference)? {
            Some(file) => gguf::load(&file, &name, &device)?,
            None => hf::load(&reference, &name, &device)?,
        };
        if parts.eos_ids.is_empty() {
            tracing::warn!(
                model = name,
                "no EOS token id found; every reply runs to local.max_new_tokens"
            );
        }
        tracing::info!(model = name, eos = ?parts.eos_ids, "loaded the local language model");
        Ok(LocalModel {
            name,
            decoder: Mutex::new(parts.decoder),
            tokenizer: parts.tokenizer,
            tokenizer_path: parts.tokenizer_path,
            template: parts.template,
            eos_ids: parts.eos_ids,
            device,
            max_positions: parts.max_positions,
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

    /// The ids that end a reply.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// How many positions (prompt and reply) the model takes.
    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// Logits at every position of `ids`, shape (1, len, vocab).
    pub fn logits(&self, ids: &[u32]) -> Result<Tensor, SummarizeError> {
        let input = self.input(ids)?;
        let mut decoder = self.lock()?;
        decoder.clear_kv_cache();
        let logits = decoder.all_logits(&input);
        decoder.clear_kv_cache();
        Ok(logits?)
    }

    /// Greedy continuation of `ids`: at most `max_new_tokens` new ids, ending before the
    /// first EOS id or at the model's context length.
    pub fn generate(&self, ids: &[u32], max_new_tokens: usize) -> Result<Vec<u32>, SummarizeError> {
        let input = self.input(ids)?;
        let budget = max_new_tokens.min(self.max_positions - ids.len());
        let mut decoder = self.lock()?;
        decoder.clear_kv_cache();
        let generated = self.greedy(&mut decoder, input, ids.len(), budget);
        decoder.clear_kv_cache();
        generated
    }

    fn greedy(
        &self,
        decoder: &mut Decoder,
        input: Tensor,
        prompt_len: usize,
        budget: usize,
    ) -> Result<Vec<u32>, SummarizeError> {
        let mut new_ids = Vec::with_capacity(budget);
        let mut logits = decoder.next_logits(&input, 0)?;
        while new_ids.len() < budget {
            let next = logits.argmax(0)?.to_scalar::<u32>()?;
            if self.eos_ids.contains(&next) {
                break;
            }
            new_ids.push(next);
            if new_ids.len() < budget {
                let step = Tensor::new(&[next], &self.device)?.unsqueeze(0)?;
                logits = decoder.next_logits(&step, prompt_len + new_ids.len() - 1)?;
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

    fn lock(&self) -> Result<MutexGuard<'_, Decoder>, SummarizeError> {
        self.decoder
            .lock()
            .map_err(|_| SummarizeError::Internal("an earlier generation panicked".into()))
    }

    fn tokenizer_error(&self, e: tokenizers::Error) -> SummarizeError {
        SummarizeError::Tokenizer { path: self.tokenizer_path.clone(), reason: e.to_string() }
    }
}

/// The local model as a chat backend; generation runs on a blocking thread.
pub(crate) struct LocalChat {
    chat: Arc<LocalModel>,
    device: String,
    max_new_tokens: usize,
}

impl LocalChat {
    pub(crate) fn load(config: &LocalConfig) -> Result<Self, SummarizeError> {
        let chat = Arc::new(LocalModel::load(config)?);
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

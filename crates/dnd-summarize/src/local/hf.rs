//! A Hugging Face Qwen2-class checkpoint directory: `model.safetensors` (or its shards listed
//! by `model.safetensors.index.json`, or `pytorch_model.bin`: whatever [`Checkpoint`] reads),
//! `config.json`, `tokenizer.json`, the chat template (`chat_template.jinja` or
//! `tokenizer_config.json`'s `chat_template`) and optionally `generation_config.json` (its EOS
//! ids end a reply). The weights run in f32.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{Activation, Linear, VarBuilder};
use candle_transformers::models::qwen2;
use dnd_models::hf_files::read_json;
use dnd_models::{Checkpoint, ModelError, ModelRef};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokenizers::Tokenizer;

use super::{Decoder, Parts};
use crate::chat_template::ChatTemplate;
use crate::error::SummarizeError;

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
                "model_type is `{}`; a checkpoint directory must hold a qwen2 model (Qwen2, Qwen2.5 instruct); other architectures (llama) run from a GGUF file",
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

/// Finds and loads the checkpoint's files; weights are converted to f32.
pub(super) fn load(
    reference: &ModelRef,
    name: &str,
    device: &Device,
) -> Result<Parts, SummarizeError> {
    let files = reference.resolve("model.safetensors")?;
    let dir = files.weights.parent().map(Path::to_path_buf).unwrap_or_default();
    let missing = |file: &str| ModelError::NotFound {
        what: format!("{reference} has no {file} next to {}", files.weights.display()),
        help: match reference {
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
    let tokenizer = read_tokenizer(&tokenizer_path)?;
    let template_source = chat_template_source(&dir, &tokenizer_config)?.ok_or_else(|| SummarizeError::ChatTemplate {
        model: name.into(),
        reason: "it has none (no chat_template.jinja, no chat_template in tokenizer_config.json): use an instruct model, e.g. Qwen/Qwen2.5-1.5B-Instruct".into(),
    })?;
    let eos_token = special_token(&tokenizer_config, "eos_token");
    let template = ChatTemplate::new(
        template_source,
        special_token(&tokenizer_config, "bos_token"),
        eos_token.clone(),
    )
    .map_err(|reason| SummarizeError::ChatTemplate { model: name.into(), reason })?;
    let named = [generation.and_then(|g| g.eos_token_id), qwen2_json.eos_token_id];
    let from_token = eos_token.and_then(|t| tokenizer.token_to_id(&t));
    let eos_ids =
        unique(named.iter().flatten().flat_map(|ids| ids.ids().iter().copied()).chain(from_token));

    let (model, lm_head) = load_weights(&files.weights, &candle_config, device)?;
    Ok(Parts {
        decoder: Decoder::Qwen2 { model, lm_head },
        tokenizer,
        tokenizer_path,
        template,
        eos_ids,
        max_positions: candle_config.max_position_embeddings,
    })
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

/// Generation stops at any EOS id the checkpoint names; each once, in the order named.
pub(super) fn unique(ids: impl IntoIterator<Item = u32>) -> Vec<u32> {
    let mut unique: Vec<u32> = Vec::new();
    for id in ids {
        if !unique.contains(&id) {
            unique.push(id);
        }
    }
    unique
}

/// A `tokenizer.json`, accepting the NaN/Infinity Python writes in some of them.
pub(super) fn read_tokenizer(path: &Path) -> Result<Tokenizer, SummarizeError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| ModelError::Io { path: path.into(), source })?;
    let text = dnd_models::json::python_tokens_to_json(&text);
    Tokenizer::from_bytes(text.as_bytes())
        .map_err(|e| SummarizeError::Tokenizer { path: path.into(), reason: e.to_string() })
}

/// `chat_template.jinja` (what newer transformers saves) wins over the tokenizer config's
/// entry, which is a string or a list of named templates.
pub(super) fn chat_template_source(
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
pub(super) fn special_token(tokenizer_config: &Value, key: &str) -> Option<String> {
    let token = tokenizer_config.get(key)?;
    token.as_str().or_else(|| token.get("content")?.as_str()).map(str::to_string)
}

pub(super) fn read_optional_json<T: DeserializeOwned>(
    path: &Path,
) -> Result<Option<T>, ModelError> {
    if !path.is_file() {
        return Ok(None);
    }
    read_json(path).map(Some)
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
        assert!(llama.to_string().contains("GGUF"), "{llama}");
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

    #[test]
    fn keeps_each_eos_id_once_in_order() {
        assert_eq!(unique([5, 3, 5, 7, 3]), vec![5, 3, 7]);
    }
}

//! GGUF files, as llama.cpp, Ollama and LM Studio use them: one file with the quantized
//! weights, the hyper-parameters, the tokenizer and usually the chat template.
//!
//! Architectures `qwen2` (Qwen2, Qwen2.5) and `llama` (Llama 3, 3.1, 3.2) run with candle's
//! `quantized_qwen2` / `quantized_llama`, on any quantization candle reads (Q4_K_M, Q5_K_M,
//! Q6_K, Q8_0, Q4_0, F16, ...; not the IQ* ones). Files next to the GGUF override its metadata:
//! a `tokenizer.json`, a `chat_template.jinja` or a `tokenizer_config.json` with a
//! `chat_template`, for files whose own are missing or wrong.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use candle_core::Device;
use candle_core::quantized::gguf_file::{Content, Value};
use candle_transformers::models::{quantized_llama, quantized_qwen2};
use dnd_models::{ModelError, ModelRef};
use serde_json::Value as Json;

use super::gguf_tokenizer::{self, integer};
use super::hf::{chat_template_source, read_optional_json, read_tokenizer, special_token, unique};
use super::{Decoder, Parts};
use crate::chat_template::ChatTemplate;
use crate::error::SummarizeError;

const MAGIC: &[u8; 4] = b"GGUF";

/// What dnd reads, for the "expected" line of a refusal.
const EXPECTED: &str = "a GGUF file (llama.cpp, Ollama, LM Studio) of a qwen2 (Qwen2, Qwen2.5) or llama (Llama 3, 3.1, 3.2) instruct model, in a quantization candle reads (Q4_K_M, Q5_K_M, Q6_K, Q8_0, F16, ...)";

/// Names `tokenizer.ggml.*` does not mark as EOS but that end a turn in the chat formats of
/// the supported families; llama.cpp stops on them the same way.
const END_OF_TURN: [&str; 5] =
    ["<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"];

/// candle's quantized llama precomputes RoPE for this many positions whatever the file says.
const LLAMA_MAX_POSITIONS: usize = quantized_llama::MAX_SEQ_LEN;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arch {
    Qwen2,
    Llama,
}

impl Arch {
    fn key(self) -> &'static str {
        match self {
            Arch::Qwen2 => "qwen2",
            Arch::Llama => "llama",
        }
    }
}

/// The GGUF file `reference` names, if it names one: a file that starts with the GGUF magic
/// (Ollama's blobs have no extension) or is called `*.gguf`, or a directory without Hugging
/// Face weights that holds exactly one `.gguf` file.
pub(super) fn find(reference: &ModelRef) -> Result<Option<PathBuf>, SummarizeError> {
    let ModelRef::Local(path) = reference else { return Ok(None) };
    if path.is_file() {
        let named_gguf = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
        return Ok((named_gguf || starts_with_magic(path)?).then(|| path.clone()));
    }
    if !path.is_dir() {
        return Ok(None);
    }
    let has_hf_weights = ["model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"]
        .iter()
        .any(|name| path.join(name).is_file());
    if has_hf_weights {
        return Ok(None);
    }
    let entries =
        std::fs::read_dir(path).map_err(|source| ModelError::Io { path: path.clone(), source })?;
    let mut ggufs: Vec<PathBuf> = entries
        .filter_map(|e| Some(e.ok()?.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")))
        .collect();
    ggufs.sort();
    match ggufs.len() {
        0 => Ok(None),
        1 => Ok(ggufs.pop()),
        _ => {
            let names: Vec<String> = ggufs
                .iter()
                .filter_map(|p| Some(p.file_name()?.to_string_lossy().into_owned()))
                .collect();
            Err(ModelError::NotFound {
                what: format!("{} holds several GGUF files ({})", path.display(), names.join(", ")),
                help: "set local.model (or --model) to the one file to use".into(),
            }
            .into())
        }
    }
}

fn starts_with_magic(path: &Path) -> Result<bool, SummarizeError> {
    let mut head = [0u8; 4];
    let mut file =
        File::open(path).map_err(|source| ModelError::Io { path: path.into(), source })?;
    let mut read = 0;
    while read < head.len() {
        match file.read(&mut head[read..]) {
            Ok(0) => break,
            Ok(n) => read += n,
            Err(source) => return Err(ModelError::Io { path: path.into(), source }.into()),
        }
    }
    Ok(read == head.len() && &head == MAGIC)
}

fn bad(path: &Path, found: impl Into<String>, help: impl Into<String>) -> SummarizeError {
    ModelError::BadCheckpoint {
        path: path.into(),
        found: found.into(),
        expected: EXPECTED.into(),
        help: help.into(),
    }
    .into()
}

/// Reads the GGUF at `path`: checks what candle's models need, builds the tokenizer and the
/// chat template, then reads the weights, which stay quantized.
pub(super) fn load(path: &Path, name: &str, device: &Device) -> Result<Parts, SummarizeError> {
    let file = File::open(path).map_err(|source| ModelError::Io { path: path.into(), source })?;
    let mut reader = BufReader::new(file);
    if !starts_with_magic(path)? {
        return Err(bad(
            path,
            "not a GGUF file (it does not start with `GGUF`)",
            "pass the .gguf file itself; a Hugging Face checkpoint is a directory with config.json and model.safetensors",
        ));
    }
    let content = Content::read(&mut reader).map_err(|e| {
        bad(
            path,
            format!("a GGUF file candle cannot read ({e})"),
            "re-download the file; a quantization candle lacks (IQ*, TQ*) needs a file quantized as Q4_K_M, Q5_K_M, Q6_K or Q8_0",
        )
    })?;
    let arch = check(path, &content)?;
    let metadata = &content.metadata;
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();

    let (tokenizer, tokenizer_path) = match dir.join("tokenizer.json") {
        beside if beside.is_file() => (read_tokenizer(&beside)?, beside),
        _ => {
            let tokenizer = gguf_tokenizer::from_metadata(metadata).map_err(|reason| {
                SummarizeError::Tokenizer {
                    path: path.into(),
                    reason: format!(
                        "{reason}; put the original model's tokenizer.json next to the GGUF file"
                    ),
                }
            })?;
            (tokenizer, path.to_path_buf())
        }
    };
    // check() found token_embd.weight; its first dimension is the vocabulary.
    let rows = content.tensor_infos.get("token_embd.weight").and_then(|t| t.shape.dims().first());
    if let Some(&rows) = rows.filter(|&&rows| tokenizer.get_vocab_size(true) > rows) {
        return Err(SummarizeError::Tokenizer {
            path: tokenizer_path,
            reason: format!(
                "it has {} tokens and the model's embedding {rows}: the tokenizer is another model's",
                tokenizer.get_vocab_size(true)
            ),
        });
    }
    let template = template(&dir, metadata, name)?;
    let eos_ids = eos_ids(metadata, &tokenizer);
    let max_positions = context_length(metadata, arch);
    log_quantization(name, &content);

    let weights_error = |e: candle_core::Error| {
        bad(
            path,
            format!("a {} GGUF whose weights do not fit its metadata ({e})", arch.key()),
            "re-download the file, or convert the model again with a current llama.cpp",
        )
    };
    let decoder = match arch {
        Arch::Qwen2 => Decoder::QuantizedQwen2(
            quantized_qwen2::ModelWeights::from_gguf(content, &mut reader, device)
                .map_err(weights_error)?,
        ),
        Arch::Llama => Decoder::QuantizedLlama(
            quantized_llama::ModelWeights::from_gguf(content, &mut reader, device)
                .map_err(weights_error)?,
        ),
    };
    Ok(Parts { decoder, tokenizer, tokenizer_path, template, eos_ids, max_positions })
}

/// The architecture, once everything candle's model will look up is known to be there:
/// candle's own errors ("cannot find tensor info for ...") do not say what to do.
fn check(path: &Path, content: &Content) -> Result<Arch, SummarizeError> {
    let metadata = &content.metadata;
    let text = |key: &str| metadata.get(key).and_then(|v| v.to_string().ok()).cloned();
    let arch = match text("general.architecture").as_deref() {
        Some("qwen2") => Arch::Qwen2,
        Some("llama") => Arch::Llama,
        Some(other) => {
            return Err(bad(
                path,
                format!("a GGUF model of architecture `{other}`"),
                "use a Qwen2.5 or Llama 3 instruct GGUF (e.g. Qwen2.5-1.5B-Instruct-Q4_K_M.gguf)",
            ));
        }
        None => {
            return Err(bad(
                path,
                "a GGUF file without general.architecture",
                "re-convert the model with llama.cpp's convert_hf_to_gguf.py",
            ));
        }
    };
    let a = arch.key();
    if let Some(count) = metadata.get("split.count").and_then(integer).filter(|n| *n > 1) {
        return Err(bad(
            path,
            format!("one of {count} parts of a split GGUF"),
            "merge the parts into one file with `llama-gguf-split --merge FIRST-PART.gguf OUT.gguf`",
        ));
    }
    if let Some(kind) = text(&format!("{a}.rope.scaling.type")).filter(|k| k != "none") {
        return Err(bad(
            path,
            format!("a {a} GGUF with `{kind}` RoPE scaling, which candle's model does not apply"),
            "use a file converted without RoPE scaling (the default for Qwen2.5 and Llama 3 instruct)",
        ));
    }
    let number = |key: &str| metadata.get(&format!("{a}.{key}")).and_then(integer);
    let mut required = vec![
        "attention.head_count",
        "attention.head_count_kv",
        "embedding_length",
        "context_length",
        "block_count",
    ];
    if arch == Arch::Llama {
        required.push("rope.dimension_count");
    }
    if let Some(key) = required.iter().find(|k| number(k).is_none_or(|n| n <= 0)) {
        return Err(bad(
            path,
            format!("a {a} GGUF without a positive {a}.{key}"),
            "re-convert the model with a current llama.cpp",
        ));
    }
    let epsilon = format!("{a}.attention.layer_norm_rms_epsilon");
    if metadata.get(&epsilon).and_then(|v| v.to_f32().ok()).is_none() {
        return Err(bad(
            path,
            format!("a {a} GGUF without {epsilon} (a float)"),
            "re-convert the model with a current llama.cpp",
        ));
    }
    let (heads, kv_heads, hidden) = (
        number("attention.head_count").unwrap_or(1),
        number("attention.head_count_kv").unwrap_or(1),
        number("embedding_length").unwrap_or(1),
    );
    if hidden % heads != 0 || heads % kv_heads != 0 {
        return Err(bad(
            path,
            format!(
                "a {a} GGUF with {heads} heads, {kv_heads} key/value heads and width {hidden}, which do not fit together"
            ),
            "re-convert the model with a current llama.cpp",
        ));
    }
    let experts = number("expert_count").unwrap_or(0) > 0;
    let missing = required_tensors(arch, number("block_count").unwrap_or(0), experts)
        .into_iter()
        .filter(|t| !content.tensor_infos.contains_key(t))
        .collect::<Vec<_>>();
    if let Some(first) = missing.first() {
        return Err(bad(
            path,
            format!("a {a} GGUF without the tensor `{first}` ({} missing in all)", missing.len()),
            "re-download the file, or convert the model again with a current llama.cpp",
        ));
    }
    if arch == Arch::Llama && content.tensor_infos.contains_key("rope_freqs.weight") {
        // Llama 3.1/3.2 scale RoPE frequencies (rope_freqs.weight); candle's quantized llama
        // does not, which moves its logits away from llama.cpp's as the prompt grows.
        tracing::warn!(
            file = %path.display(),
            "this Llama GGUF scales RoPE frequencies (Llama 3.1+ rope_freqs.weight), which candle's quantized llama ignores: its replies can differ from llama.cpp's"
        );
    }
    Ok(arch)
}

/// The tensors candle's model reads; `output.weight` is optional (tied to the embedding).
fn required_tensors(arch: Arch, blocks: i64, experts: bool) -> Vec<String> {
    let mut names = vec!["token_embd.weight".to_string(), "output_norm.weight".to_string()];
    for block in 0..blocks {
        let mut parts = vec!["attn_q", "attn_k", "attn_v", "attn_output", "attn_norm", "ffn_norm"];
        if !experts {
            parts.extend(["ffn_gate", "ffn_up", "ffn_down"]);
        }
        names.extend(parts.iter().map(|p| format!("blk.{block}.{p}.weight")));
        if arch == Arch::Qwen2 {
            names.extend(["attn_q", "attn_k", "attn_v"].map(|p| format!("blk.{block}.{p}.bias")));
        }
    }
    names
}

/// The chat template: a file next to the GGUF, else the GGUF's `tokenizer.chat_template`.
/// Its special tokens come from the same place.
fn template(
    dir: &Path,
    metadata: &HashMap<String, Value>,
    name: &str,
) -> Result<ChatTemplate, SummarizeError> {
    let tokenizer_config: Json =
        read_optional_json(&dir.join("tokenizer_config.json"))?.unwrap_or(Json::Null);
    let compile = |source: String, bos: Option<String>, eos: Option<String>| {
        ChatTemplate::new(source, bos, eos)
            .map_err(|reason| SummarizeError::ChatTemplate { model: name.into(), reason })
    };
    if let Some(source) = chat_template_source(dir, &tokenizer_config)? {
        let token = |key| special_token(&tokenizer_config, key);
        return compile(source, token("bos_token"), token("eos_token"));
    }
    let Some(source) = metadata.get("tokenizer.chat_template").and_then(|v| v.to_string().ok())
    else {
        return Err(SummarizeError::ChatTemplate {
            model: name.into(),
            reason: format!(
                "the GGUF file has no tokenizer.chat_template and {} has no chat_template.jinja nor tokenizer_config.json with one: use an instruct model's GGUF, or put the original model's tokenizer_config.json next to it",
                dir.display()
            ),
        });
    };
    let names = gguf_tokenizer::token_names(metadata);
    let token = |key: &str| {
        let id = metadata.get(key).and_then(integer)?;
        names.get(usize::try_from(id).ok()?).map(|t| t.to_string())
    };
    compile(
        source.clone(),
        token("tokenizer.ggml.bos_token_id"),
        token("tokenizer.ggml.eos_token_id"),
    )
}

/// The ids the metadata names as EOS, end of turn or end of message, then the end-of-turn
/// tokens of the supported chat formats the vocabulary has.
fn eos_ids(metadata: &HashMap<String, Value>, tokenizer: &tokenizers::Tokenizer) -> Vec<u32> {
    let named = ["eos", "eot", "eom"]
        .iter()
        .filter_map(|kind| metadata.get(&format!("tokenizer.ggml.{kind}_token_id")))
        .filter_map(integer)
        .filter_map(|id| u32::try_from(id).ok());
    let by_name = END_OF_TURN.iter().filter_map(|t| tokenizer.token_to_id(t));
    unique(named.chain(by_name))
}

fn context_length(metadata: &HashMap<String, Value>, arch: Arch) -> usize {
    let declared = metadata
        .get(&format!("{}.context_length", arch.key()))
        .and_then(integer)
        .and_then(|n| usize::try_from(n).ok())
        .unwrap_or(LLAMA_MAX_POSITIONS);
    match arch {
        Arch::Qwen2 => declared,
        Arch::Llama => declared.min(LLAMA_MAX_POSITIONS),
    }
}

/// One line saying which quantizations the file uses (e.g. Q4_K x 10, Q6_K x 5).
fn log_quantization(name: &str, content: &Content) {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for info in content.tensor_infos.values() {
        *counts.entry(format!("{:?}", info.ggml_dtype)).or_default() += 1;
    }
    let summary: Vec<String> = counts.iter().map(|(t, n)| format!("{t} x {n}")).collect();
    tracing::info!(model = name, tensors = summary.join(", "), "reading a GGUF model");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_gguf_by_name_by_magic_or_alone_in_a_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let local = |p: &Path| ModelRef::Local(p.to_path_buf());
        let blob = dir.join("sha256-0123");
        std::fs::write(&blob, b"GGUF\x03\x00\x00\x00").unwrap();
        assert_eq!(find(&local(&blob)).unwrap(), Some(blob.clone()));
        let text = dir.join("notes.txt");
        std::fs::write(&text, b"hello").unwrap();
        assert_eq!(find(&local(&text)).unwrap(), None);

        assert_eq!(find(&local(dir)).unwrap(), None, "no .gguf file in the directory");
        std::fs::write(dir.join("a-Q4_K_M.gguf"), b"x").unwrap();
        assert_eq!(find(&local(dir)).unwrap(), Some(dir.join("a-Q4_K_M.gguf")));
        std::fs::write(dir.join("a-Q8_0.gguf"), b"x").unwrap();
        let err = find(&local(dir)).unwrap_err().to_string();
        assert!(err.contains("a-Q4_K_M.gguf, a-Q8_0.gguf") && err.contains("--model"), "{err}");
        std::fs::write(dir.join("model.safetensors"), b"x").unwrap();
        assert_eq!(find(&local(dir)).unwrap(), None, "Hugging Face weights win");
        assert_eq!(find(&"hf:Qwen/Qwen2.5-0.5B-Instruct".parse().unwrap()).unwrap(), None);
    }

    #[test]
    fn a_file_that_is_not_gguf_is_refused_with_what_to_do() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("model.gguf");
        std::fs::write(&path, b"<html>404</html>").unwrap();
        let err = load(&path, "m", &Device::Cpu).err().unwrap();
        let text = err.to_string();
        assert!(err.is_user_error(), "{text}");
        assert!(text.contains(&path.display().to_string()), "{text}");
        assert!(
            text.contains("not a GGUF file") && text.contains("expected: a GGUF file"),
            "{text}"
        );

        std::fs::write(&path, b"GGUF\x03\x00\x00\x00\xff").unwrap();
        let text = load(&path, "m", &Device::Cpu).err().unwrap().to_string();
        assert!(text.contains("candle cannot read") && text.contains("re-download"), "{text}");
    }

    #[test]
    fn lists_the_tensors_candles_models_read() {
        let qwen2 = required_tensors(Arch::Qwen2, 2, false);
        assert_eq!(qwen2.len(), 2 + 2 * 12);
        assert!(qwen2.contains(&"blk.1.attn_v.bias".to_string()));
        let llama_moe = required_tensors(Arch::Llama, 1, true);
        assert!(!llama_moe.iter().any(|t| t.contains("ffn_gate")));
    }
}

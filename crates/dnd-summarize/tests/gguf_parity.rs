//! GGUF models (tests/fixtures/gguf, written by make_gguf_fixtures.py with the `gguf`
//! package: random weights, a Qwen2 in llama.cpp's Q4_K_M mix and a Llama 3 in Q8_0) against
//! transformers 5.24 in f32 on the dequantised weights: chat template and special tokens
//! from the metadata, token ids from the metadata's vocabulary, greedy tokens, logits.
//!
//! candle's quantized kernels multiply by activations rounded to 8 bits (as llama.cpp's
//! do), which moves these random models' logits by a few percent. So the quantized file is
//! held to the `act8` reference (transformers with the same rounding of every quantized
//! matmul's input), and the file dequantised to F32 to the `float` reference; both
//! references decode the same tokens.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, IndexOp, Tensor};
use dnd_summarize::local::{LocalConfig, LocalModel};
use dnd_summarize::{ChatMessage, SummarizeError};

const FIXTURES: [&str; 2] = ["qwen2-q4_k_m", "llama3-q8_0"];

fn fixture(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/gguf").join(path)
}

fn config(model: &Path) -> LocalConfig {
    LocalConfig { model: model.to_string_lossy().into_owned(), ..Default::default() }
}

struct Reference {
    json: serde_json::Value,
    /// (steps, vocab): the logits that chose each new token (and the EOS, if reached).
    step_logits: Tensor,
}

/// The reference `kind` (`float` or `act8`) of fixture `name`.
fn reference(name: &str, kind: &str) -> Reference {
    let text = std::fs::read_to_string(fixture(&format!("reference/{name}.json"))).unwrap();
    let tensors = candle_core::safetensors::load(
        fixture(&format!("reference/{name}.safetensors")),
        &Device::Cpu,
    )
    .unwrap();
    Reference {
        json: serde_json::from_str(&text).unwrap(),
        step_logits: tensors[&format!("{kind}.step_logits")].clone(),
    }
}

fn ids(value: &serde_json::Value) -> Vec<u32> {
    serde_json::from_value(value.clone()).unwrap()
}

/// max |a - b| / std(b): how far the logits are, on the scale of their spread.
fn relative_diff(a: &Tensor, b: &Tensor) -> f32 {
    let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    let mean = b.mean_all().unwrap().to_scalar::<f32>().unwrap();
    let var = b.affine(1.0, -f64::from(mean)).unwrap().sqr().unwrap().mean_all().unwrap();
    diff / var.to_scalar::<f32>().unwrap().sqrt()
}

/// Checks `model` against the reference and returns the logits' relative difference.
fn check_against_reference(model: &LocalModel, reference: &Reference) -> f32 {
    let json = &reference.json;
    let messages: Vec<ChatMessage> =
        serde_json::from_value(json["chat"]["messages"].clone()).unwrap();
    let rendered = model.render(&messages).unwrap();
    assert_eq!(rendered, json["chat"]["rendered"].as_str().unwrap());
    let prompt = model.encode(&rendered).unwrap();
    assert_eq!(prompt, ids(&json["prompt_ids"]), "token ids of the rendered chat");

    let mut eos = model.eos_ids().to_vec();
    eos.sort_unstable();
    assert_eq!(eos, ids(&json["tokenizer"]["eos_ids"]));

    let generation = &json["generation"];
    let new = model.generate(&prompt, 10).unwrap();
    assert_eq!(new, ids(&generation["new_token_ids"]), "greedy tokens");
    assert_eq!(model.decode(&new).unwrap(), generation["new_text"].as_str().unwrap());

    // The logits at the positions that chose each token: the prompt's last, then each new one's.
    let steps = reference.step_logits.dim(0).unwrap();
    assert_eq!(steps, new.len() + usize::from(generation["stopped_at_eos"].as_bool().unwrap()));
    let sequence: Vec<u32> = prompt.iter().chain(&new[..steps - 1]).copied().collect();
    let logits = model.logits(&sequence).unwrap();
    let logits = logits.i((0, prompt.len() - 1..)).unwrap().to_dtype(DType::F32).unwrap();
    relative_diff(&logits, &reference.step_logits)
}

#[test]
fn quantized_gguf_models_decode_the_reference_tokens() {
    for name in FIXTURES {
        let act8 = reference(name, "act8");
        let model = LocalModel::load(&config(&fixture(&format!("{name}.gguf")))).unwrap();
        assert_eq!(model.max_positions(), 512, "{name}: the file's context_length");
        let diff = check_against_reference(&model, &act8);
        let float_diff = check_against_reference(&model, &reference(name, "float"));
        let margins: Vec<f32> =
            serde_json::from_value(act8.json["references"]["act8"]["top1_top2_margins"].clone())
                .unwrap();
        let std = act8.json["references"]["act8"]["logits_std"].as_f64().unwrap() as f32;
        println!(
            "{name}: max |logits - act8 reference| = {diff:.4} x std, - float reference = {float_diff:.4} x std; smallest top-2 margin {:.3} x std",
            margins.iter().copied().fold(f32::INFINITY, f32::min) / std
        );
        // The integer products are the same as the reference's, but the floats between them
        // are summed in another order; where that moves an activation across a rounding
        // step of the 8-bit quantizer, these random models amplify it (measured: most steps
        // agree to 1e-5, some differ by up to 0.11 x std). A wrong RoPE base is 4 x std off,
        // a wrong norm epsilon 2.4 x std; the float reference is 0.15-0.36 x std away.
        assert!(diff < 0.15, "{name}: logits differ by {diff} x std");
    }
}

/// A copy of `src` in `dir`, `edit`ed: metadata and tensors (name -> tensor).
fn rewrite(
    src: &Path,
    dir: &Path,
    edit: impl FnOnce(&mut HashMap<String, Value>, &mut Vec<(String, QTensor)>),
) -> PathBuf {
    let mut reader = File::open(src).unwrap();
    let content = Content::read(&mut reader).unwrap();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let mut tensors: Vec<(String, QTensor)> = names
        .into_iter()
        .map(|n| (n.clone(), content.tensor(&mut reader, n, &Device::Cpu).unwrap()))
        .collect();
    let mut metadata = content.metadata;
    edit(&mut metadata, &mut tensors);
    let path = dir.join(src.file_name().unwrap());
    let mut out = File::create(&path).unwrap();
    let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    gguf_file::write(&mut out, &metadata, &tensors).unwrap();
    path
}

#[test]
fn the_same_files_dequantised_to_f32_match_transformers_to_rounding() {
    for name in FIXTURES {
        let tmp = tempfile::tempdir().unwrap();
        let f32_copy = rewrite(&fixture(&format!("{name}.gguf")), tmp.path(), |_, tensors| {
            for (_, tensor) in tensors.iter_mut() {
                let values = tensor.dequantize(&Device::Cpu).unwrap();
                *tensor = QTensor::quantize(&values, GgmlDType::F32).unwrap();
            }
        });
        let model = LocalModel::load(&config(&f32_copy)).unwrap();
        let diff = check_against_reference(&model, &reference(name, "float"));
        println!(
            "{name} dequantised to F32: max |logits - float reference| = {diff:e} x std(logits)"
        );
        assert!(diff < 1e-4, "{name}: logits differ by {diff} x std");
    }
}

fn load_error(path: &Path) -> SummarizeError {
    LocalModel::load(&config(path)).err().expect("the file must be refused")
}

fn assert_names(err: &SummarizeError, path: &Path, needles: &[&str]) {
    let text = err.to_string();
    assert!(err.is_user_error(), "{text}");
    assert!(text.contains(&path.display().to_string()), "the message names the file: {text}");
    for needle in needles {
        assert!(text.contains(needle), "`{needle}` missing from: {text}");
    }
}

#[test]
fn bad_gguf_files_are_refused_naming_the_file_and_what_to_do() {
    let qwen2 = fixture("qwen2-q4_k_m.gguf");
    let tmp = tempfile::tempdir().unwrap();
    let dir = |name: &str| {
        let d = tmp.path().join(name);
        std::fs::create_dir(&d).unwrap();
        d
    };

    let gemma = rewrite(&qwen2, &dir("arch"), |md, _| {
        md.insert("general.architecture".into(), Value::String("gemma2".into()));
    });
    assert_names(
        &load_error(&gemma),
        &gemma,
        &["`gemma2`", "expected: a GGUF file", "help: use a Qwen2.5 or Llama 3"],
    );

    let no_bias = rewrite(&qwen2, &dir("tensor"), |_, tensors| {
        tensors.retain(|(n, _)| n != "blk.1.attn_q.bias");
    });
    assert_names(&load_error(&no_bias), &no_bias, &["`blk.1.attn_q.bias`", "help:"]);

    let split = rewrite(&qwen2, &dir("split"), |md, _| {
        md.insert("split.count".into(), Value::U16(3));
    });
    assert_names(&load_error(&split), &split, &["split GGUF", "llama-gguf-split --merge"]);

    let bytes = std::fs::read(&qwen2).unwrap();
    let truncated = dir("truncated").join("qwen2-q4_k_m.gguf");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    assert_names(&load_error(&truncated), &truncated, &["re-download"]);
}

#[test]
fn files_next_to_the_gguf_supply_a_missing_tokenizer_or_chat_template() {
    let qwen2 = fixture("qwen2-q4_k_m.gguf");
    let reference = reference("qwen2-q4_k_m", "float");
    let tmp = tempfile::tempdir().unwrap();

    let no_tokenizer_dir = tmp.path().join("tokenizer");
    std::fs::create_dir(&no_tokenizer_dir).unwrap();
    let no_tokenizer = rewrite(&qwen2, &no_tokenizer_dir, |md, _| {
        md.retain(|k, _| !k.starts_with("tokenizer.ggml."));
    });
    assert_names(
        &load_error(&no_tokenizer),
        &no_tokenizer,
        &["no tokenizer", "tokenizer.json next to the GGUF"],
    );
    // The fixture Qwen2's vocabulary is the one of tests/fixtures/multimodal/lm.
    let lm = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/multimodal/lm");
    std::fs::copy(lm.join("tokenizer.json"), no_tokenizer_dir.join("tokenizer.json")).unwrap();
    let model = LocalModel::load(&config(&no_tokenizer)).unwrap();
    let rendered = reference.json["chat"]["rendered"].as_str().unwrap();
    assert_eq!(model.encode(rendered).unwrap(), ids(&reference.json["prompt_ids"]));

    let no_template_dir = tmp.path().join("template");
    std::fs::create_dir(&no_template_dir).unwrap();
    let no_template = rewrite(&qwen2, &no_template_dir, |md, _| {
        md.remove("tokenizer.chat_template");
    });
    let err = load_error(&no_template);
    assert_names(&err, &no_template, &["no tokenizer.chat_template", "tokenizer_config.json"]);
    std::fs::write(
        no_template_dir.join("tokenizer_config.json"),
        r#"{"chat_template": "{% for m in messages %}[{{ m.role }}] {{ m.content }}{{ eos_token }}{% endfor %}", "eos_token": "<|im_end|>"}"#,
    )
    .unwrap();
    let model = LocalModel::load(&config(&no_template)).unwrap();
    assert_eq!(model.render(&[ChatMessage::new("user", "hi")]).unwrap(), "[user] hi<|im_end|>");
}

#[test]
fn a_directory_holding_one_gguf_file_is_that_model() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(fixture("llama3-q8_0.gguf"), tmp.path().join("llama3-q8_0.gguf")).unwrap();
    let model = LocalModel::load(&config(tmp.path())).unwrap();
    let reference = reference("llama3-q8_0", "float");
    let rendered = reference.json["chat"]["rendered"].as_str().unwrap();
    assert_eq!(model.encode(rendered).unwrap(), ids(&reference.json["prompt_ids"]));
}

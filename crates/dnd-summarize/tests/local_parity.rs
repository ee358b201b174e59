//! The local backend against transformers 5.24 on the fixture Qwen2 (random weights, tied
//! embeddings, `rope_parameters` config): chat template, token ids, logits at every
//! position and greedy decoding with the KV cache; the same checkpoint cut into shards.
//! See tests/fixtures/README.md.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use dnd_summarize::local::{LocalConfig, LocalModel};
use dnd_summarize::{Backend, ChatMessage, PromptTemplates, Step, SummarizerConfig, build};
use serde_json::Value;

fn fixture(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/multimodal").join(path)
}

fn local_config() -> LocalConfig {
    let dir = fixture("lm").canonicalize().unwrap();
    LocalConfig { model: dir.to_string_lossy().into_owned(), ..Default::default() }
}

fn ids(tensor: &Tensor) -> Vec<u32> {
    tensor
        .flatten_all()
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|id| id as u32)
        .collect()
}

#[test]
fn matches_transformers_on_the_fixture_qwen2() {
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("reference/lm.json")).unwrap())
            .unwrap();
    let tensors =
        candle_core::safetensors::load(fixture("reference/lm.safetensors"), &Device::Cpu).unwrap();
    let chat = LocalModel::load(&local_config()).unwrap();

    let messages: Vec<ChatMessage> =
        serde_json::from_value(reference["chat"]["messages"].clone()).unwrap();
    let rendered = chat.render(&messages).unwrap();
    assert_eq!(rendered, reference["chat"]["rendered"].as_str().unwrap());

    let input_ids = chat.encode(&rendered).unwrap();
    assert_eq!(input_ids, ids(&tensors["input_ids"]));

    let logits = chat.logits(&input_ids).unwrap();
    let expected = &tensors["logits"];
    assert_eq!(logits.dims(), expected.dims());
    let max_diff = (logits - expected)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let max_diff = max_diff.to_scalar::<f32>().unwrap();
    println!("max |logits - transformers| = {max_diff:e} over {:?}", expected.dims());
    assert!(max_diff <= 1e-4, "logits differ by {max_diff}");

    let new_ids = chat.generate(&input_ids, 8).unwrap();
    let expected_new: Vec<u32> =
        serde_json::from_value(reference["generation"]["new_token_ids"].clone()).unwrap();
    assert_eq!(new_ids, expected_new);
    assert_eq!(ids(&tensors["generate.ids"])[input_ids.len()..], expected_new[..]);
    assert_eq!(
        chat.decode(&new_ids).unwrap(),
        reference["generation"]["new_text"].as_str().unwrap()
    );
}

#[test]
fn the_template_inserts_qwens_default_system_prompt() {
    let chat = LocalModel::load(&local_config()).unwrap();
    let rendered = chat.render(&[ChatMessage::new("user", "hi")]).unwrap();
    assert_eq!(
        rendered,
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    );
}

/// The fixture model has 128 positions: too few for the default prompts, so this test
/// uses short ones of its own.
fn short_prompts() -> PromptTemplates {
    PromptTemplates {
        version: "test-short-1".into(),
        system: "Name the concept.".into(),
        simplify: "Caption: {caption}\nLabel:".into(),
        summarize: "{labels}\nLabel:".into(),
        merge: "{labels}\nOne label:".into(),
    }
}

#[tokio::test]
async fn the_local_summarizer_records_the_rendered_prompt_and_the_decoded_reply() {
    let config = SummarizerConfig {
        backend: Backend::Local,
        local: local_config(),
        prompts: short_prompts(),
        ..Default::default()
    };
    let summarizer = build(&config).unwrap();
    assert_eq!(summarizer.describe(), format!("local:{}@cpu", config.local.model));
    summarizer.check().await.unwrap();

    let caption = "a red circle on a blue background";
    let ex = summarizer.simplify(caption).await.unwrap();
    let chat = LocalModel::load(&config.local).unwrap();
    let expected_request = chat.render(&config.prompts.simplify_messages(caption)).unwrap();
    assert_eq!(ex.request, expected_request);
    assert!(
        ex.request.ends_with(
            "Caption: a red circle on a blue background\nLabel:<|im_end|>\n<|im_start|>assistant\n"
        ),
        "{}",
        ex.request
    );
    let reply_ids =
        chat.generate(&chat.encode(&ex.request).unwrap(), config.local.max_new_tokens).unwrap();
    assert!(reply_ids.len() <= 24);
    assert_eq!(ex.reply, chat.decode(&reply_ids).unwrap(), "greedy decoding is deterministic");
    assert_eq!(
        (ex.step, ex.backend.as_str(), ex.model.as_str()),
        (Step::Simplify, "local", config.local.model.as_str())
    );
    assert_eq!(ex.prompt_version, "test-short-1");

    let labels = vec!["red circle".to_string(), "red ring".to_string()];
    assert_eq!(summarizer.summarize(&labels).await.unwrap().step, Step::Summarize);
}

#[tokio::test]
async fn a_prompt_longer_than_the_models_context_is_a_user_error() {
    let config =
        SummarizerConfig { backend: Backend::Local, local: local_config(), ..Default::default() };
    let err = build(&config).unwrap().simplify("a red circle").await.unwrap_err();
    assert!(err.is_user_error() && err.to_string().contains("tokens"), "{err}");
}

/// The fixture checkpoint cut into two shards with a `model.safetensors.index.json`, as
/// `save_pretrained(max_shard_size=...)` writes every 3B+ model: in `dir`, with the other files.
fn write_sharded_copy(dir: &std::path::Path) {
    let lm = fixture("lm");
    for file in ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]
    {
        std::fs::copy(lm.join(file), dir.join(file)).unwrap();
    }
    let tensors =
        candle_core::safetensors::load(lm.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let (first, second) = names.split_at(names.len() / 2);
    let mut weight_map = serde_json::Map::new();
    let mut total_size = 0;
    for (shard, part) in
        [("model-00001-of-00002.safetensors", first), ("model-00002-of-00002.safetensors", second)]
    {
        let part: HashMap<String, Tensor> =
            part.iter().map(|n| ((*n).clone(), tensors[*n].clone())).collect();
        for (name, tensor) in &part {
            weight_map.insert(name.clone(), shard.into());
            total_size += tensor.elem_count() * tensor.dtype().size_in_bytes();
        }
        candle_core::safetensors::save(&part, dir.join(shard)).unwrap();
    }
    let index =
        serde_json::json!({"metadata": {"total_size": total_size}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

#[test]
fn a_sharded_checkpoint_is_the_same_model() {
    let tmp = tempfile::tempdir().unwrap();
    write_sharded_copy(tmp.path());
    let whole = LocalModel::load(&local_config()).unwrap();
    let prompt =
        whole.encode(&whole.render(&[ChatMessage::new("user", "red ring")]).unwrap()).unwrap();
    let expected_logits = whole.logits(&prompt).unwrap();
    let expected_ids = whole.generate(&prompt, 8).unwrap();
    // The directory, and the index file itself.
    let index = tmp.path().join("model.safetensors.index.json");
    for model in [tmp.path().to_path_buf(), index] {
        let config =
            LocalConfig { model: model.to_string_lossy().into_owned(), ..Default::default() };
        let sharded = LocalModel::load(&config).unwrap();
        let logits = sharded.logits(&prompt).unwrap();
        let diff = (logits - &expected_logits).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{}", model.display());
        assert_eq!(sharded.generate(&prompt, 8).unwrap(), expected_ids);
    }
    // A shard gone is named, with what to do.
    std::fs::remove_file(tmp.path().join("model-00002-of-00002.safetensors")).unwrap();
    let config =
        LocalConfig { model: tmp.path().to_string_lossy().into_owned(), ..Default::default() };
    let err = LocalModel::load(&config).err().unwrap();
    assert!(err.is_user_error(), "{err}");
    assert!(err.to_string().contains("model-00002-of-00002.safetensors"), "{err}");
}

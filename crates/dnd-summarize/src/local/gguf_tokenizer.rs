//! A `tokenizers::Tokenizer` built from a GGUF file's `tokenizer.ggml.*` metadata.
//!
//! A GGUF carries no tokenizer.json: llama.cpp's converter stores the vocabulary (in the
//! byte-level spelling of the original tokenizer.json, `Ġ` for a space), the merges, a type
//! per token and the name of the pre-tokenizer (`tokenizer.ggml.pre`), whose split pattern
//! llama.cpp hard-codes. This builds the byte-level BPE (`tokenizer.ggml.model` = `gpt2`) of
//! Qwen2/Qwen2.5 and Llama 3; anything else needs the model's own tokenizer.json.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::normalizers::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

/// Qwen2's split: single digits.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Llama 3's split: digits in runs of up to three.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// llama.cpp's token types (`llama_token_type`) that matter here.
const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;

/// How text is cut before BPE, by the `tokenizer.ggml.pre` names llama.cpp gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PreTokenizer {
    Qwen2,
    Llama3,
    Gpt2,
}

impl PreTokenizer {
    fn named(pre: &str) -> Option<Self> {
        match pre {
            "qwen2" | "deepseek-r1-qwen" => Some(PreTokenizer::Qwen2),
            "llama3" | "llama-v3" | "llama-bpe" | "smaug-bpe" => Some(PreTokenizer::Llama3),
            "gpt-2" | "gpt2" => Some(PreTokenizer::Gpt2),
            _ => None,
        }
    }

    fn build(self) -> Result<PreTokenizerWrapper, String> {
        let split = |pattern: &str| {
            let split = Split::new(
                SplitPattern::Regex(pattern.into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| format!("its split pattern does not compile ({e})"))?;
            // The split already cut the words; ByteLevel only maps bytes to its alphabet.
            let bytes = ByteLevel::new(false, false, false);
            Ok(Sequence::new(vec![split.into(), bytes.into()]).into())
        };
        match self {
            PreTokenizer::Qwen2 => split(QWEN2_SPLIT),
            PreTokenizer::Llama3 => split(LLAMA3_SPLIT),
            PreTokenizer::Gpt2 => Ok(ByteLevel::new(false, false, true).into()),
        }
    }
}

/// The tokenizer the metadata describes; the error says what is missing or unsupported.
pub(super) fn from_metadata(metadata: &HashMap<String, Value>) -> Result<Tokenizer, String> {
    let text = |key: &str| metadata.get(key).and_then(|v| v.to_string().ok()).map(String::as_str);
    let Some(model) = text("tokenizer.ggml.model") else {
        return Err("the file has no tokenizer (no tokenizer.ggml.model in its metadata)".into());
    };
    if model != "gpt2" {
        return Err(format!(
            "its vocabulary is of type `{model}`; dnd builds a tokenizer from GGUF metadata only for byte-level BPE (`gpt2`: Qwen2, Qwen2.5, Llama 3)"
        ));
    }
    let pre_name = text("tokenizer.ggml.pre").unwrap_or("(none)");
    let pre = PreTokenizer::named(pre_name).ok_or_else(|| {
        format!(
            "its pre-tokenizer `{pre_name}` is not one dnd knows (qwen2, llama-bpe/llama3, gpt-2), and the split pattern is not in the file"
        )
    })?;
    let tokens = strings(metadata, "tokenizer.ggml.tokens")?;
    let merges = strings(metadata, "tokenizer.ggml.merges")?
        .into_iter()
        .map(|merge| {
            merge
                .split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| format!("its merge `{merge}` is not two tokens"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    // Without the types, control tokens such as <|im_end|> would be cut into bytes.
    let types = match metadata.get("tokenizer.ggml.token_type") {
        Some(value) => integers(value, "tokenizer.ggml.token_type")?,
        None => return Err("it has no tokenizer.ggml.token_type array".into()),
    };
    if types.len() != tokens.len() {
        return Err(format!("it has {} tokens but {} token types", tokens.len(), types.len()));
    }

    // A name listed twice keeps its first id, as llama.cpp's lookup does.
    let mut vocab = Vocab::default();
    for (id, token) in tokens.iter().enumerate() {
        vocab.entry(token.to_string()).or_insert(id as u32);
    }
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        // Llama 3 takes a pre-tokenized piece whole when it is in the vocabulary (its
        // tokenizer.json's `ignore_merges`, llama.cpp's `ignore_merges` for llama-bpe).
        .ignore_merges(pre == PreTokenizer::Llama3)
        .build()
        .map_err(|e| format!("its vocabulary and merges do not form a BPE model ({e})"))?;
    let mut tokenizer = Tokenizer::new(bpe);
    if pre == PreTokenizer::Qwen2 {
        // Qwen2's tokenizer.json normalises to NFC before splitting.
        tokenizer
            .with_normalizer(Some(NFC))
            .map_err(|e| format!("cannot set the normalizer ({e})"))?;
    }
    tokenizer.with_pre_tokenizer(Some(pre.build()?));
    tokenizer.with_decoder(Some(ByteLevel::default()));

    // Control tokens (<|im_end|>, <|eot_id|>) and user-defined ones (<tool_call>) are matched
    // whole in the text, before BPE; only control tokens are dropped when decoding.
    let added =
        |kind: i64, special: bool| {
            tokens.iter().zip(&types).filter(move |(_, t)| **t == kind).map(move |(token, _)| {
                AddedToken::from(token.to_string(), special).normalized(false)
            })
        };
    tokenizer
        .add_special_tokens(added(CONTROL, true))
        .and_then(|_| tokenizer.add_tokens(added(USER_DEFINED, false)))
        .map_err(|e| format!("cannot add its special tokens ({e})"))?;
    Ok(tokenizer)
}

/// The token names of the metadata's `tokenizer.ggml.tokens`, in id order.
pub(super) fn token_names(metadata: &HashMap<String, Value>) -> Vec<&str> {
    strings(metadata, "tokenizer.ggml.tokens").unwrap_or_default()
}

fn strings<'a>(metadata: &'a HashMap<String, Value>, key: &str) -> Result<Vec<&'a str>, String> {
    let Some(Value::Array(values)) = metadata.get(key) else {
        return Err(format!("it has no {key} array"));
    };
    values
        .iter()
        .map(|v| v.to_string().map(String::as_str).map_err(|_| format!("{key} holds a non-string")))
        .collect()
}

fn integers(value: &Value, key: &str) -> Result<Vec<i64>, String> {
    let Value::Array(values) = value else {
        return Err(format!("{key} is not an array"));
    };
    values.iter().map(|v| integer(v).ok_or_else(|| format!("{key} holds a non-integer"))).collect()
}

/// Any GGUF integer as i64 (writers differ in the integer types they use for ids and counts).
pub(super) fn integer(value: &Value) -> Option<i64> {
    Some(match value {
        Value::U8(v) => i64::from(*v),
        Value::I8(v) => i64::from(*v),
        Value::U16(v) => i64::from(*v),
        Value::I16(v) => i64::from(*v),
        Value::U32(v) => i64::from(*v),
        Value::I32(v) => i64::from(*v),
        Value::U64(v) => i64::try_from(*v).ok()?,
        Value::I64(v) => *v,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A byte-level vocabulary: the 256 byte symbols, two merges, two control tokens.
    fn metadata(pre: &str) -> HashMap<String, Value> {
        let byte_symbols: Vec<String> = (0u8..=255)
            .map(|b| {
                // GPT-2's byte-to-unicode map: printable Latin-1 stays, the rest moves to U+0100+.
                let printable =
                    (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
                if printable {
                    char::from(b).to_string()
                } else {
                    let rank = (0u8..b)
                        .filter(|c| {
                            !((b'!'..=b'~').contains(c) || (0xA1..=0xAC).contains(c) || *c >= 0xAE)
                        })
                        .count();
                    char::from_u32(256 + rank as u32).unwrap().to_string()
                }
            })
            .collect();
        let mut tokens = byte_symbols;
        tokens.extend(["re", "Ġre", "<|im_start|>", "<|im_end|>"].map(String::from));
        let mut types = vec![1i32; 258];
        types.extend([CONTROL as i32, CONTROL as i32]);
        let strings = |v: Vec<String>| Value::Array(v.into_iter().map(Value::String).collect());
        HashMap::from([
            ("tokenizer.ggml.model".to_string(), Value::String("gpt2".into())),
            ("tokenizer.ggml.pre".to_string(), Value::String(pre.into())),
            ("tokenizer.ggml.tokens".to_string(), strings(tokens)),
            ("tokenizer.ggml.merges".to_string(), strings(vec!["r e".into(), "Ġ re".into()])),
            (
                "tokenizer.ggml.token_type".to_string(),
                Value::Array(types.into_iter().map(Value::I32).collect()),
            ),
        ])
    }

    #[test]
    fn builds_byte_level_bpe_with_whole_control_tokens() {
        let tokenizer = from_metadata(&metadata("qwen2")).unwrap();
        let ids = tokenizer.encode("<|im_start|>re re12<|im_end|>", false).unwrap();
        let space_re = 257; // "Ġre"
        assert_eq!(ids.get_ids(), &[258, 256, space_re, b'1' as u32, b'2' as u32, 259]);
        assert_eq!(tokenizer.decode(ids.get_ids(), true).unwrap(), "re re12");
    }

    #[test]
    fn splits_digits_as_the_named_pre_tokenizer_does() {
        let pieces = |pre: &str| {
            let tokenizer = from_metadata(&metadata(pre)).unwrap();
            let pre_tokenizer = tokenizer.get_pre_tokenizer().unwrap();
            let mut text = tokenizers::PreTokenizedString::from("1234");
            tokenizers::PreTokenizer::pre_tokenize(pre_tokenizer, &mut text).unwrap();
            text.get_splits(tokenizers::OffsetReferential::Original, tokenizers::OffsetType::Byte)
                .into_iter()
                .map(|(piece, _, _)| piece.to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(pieces("qwen2"), ["1", "2", "3", "4"]);
        assert_eq!(pieces("llama-bpe"), ["123", "4"]);
    }

    #[test]
    fn refuses_what_it_cannot_build_and_says_why() {
        let mut sentencepiece = metadata("qwen2");
        sentencepiece.insert("tokenizer.ggml.model".into(), Value::String("llama".into()));
        let err = from_metadata(&sentencepiece).unwrap_err();
        assert!(err.contains("`llama`") && err.contains("byte-level"), "{err}");

        let err = from_metadata(&metadata("falcon")).unwrap_err();
        assert!(err.contains("`falcon`"), "{err}");

        let mut none = metadata("qwen2");
        none.retain(|k, _| !k.starts_with("tokenizer."));
        assert!(from_metadata(&none).unwrap_err().contains("no tokenizer"));

        let mut untyped = metadata("qwen2");
        untyped.remove("tokenizer.ggml.token_type");
        assert!(from_metadata(&untyped).unwrap_err().contains("token_type"));

        let mut bad_merge = metadata("qwen2");
        bad_merge
            .insert("tokenizer.ggml.merges".into(), Value::Array(vec![Value::String("re".into())]));
        assert!(from_metadata(&bad_merge).unwrap_err().contains("`re`"));
    }
}

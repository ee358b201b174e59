//! The world's word-level tokenizer, shared by the zoo's captioner and embedder.
//!
//! One id per word the caption grammar can write (plus a few words of the captioner's
//! prefix), four special tokens first. It is written as a Hugging Face `tokenizer.json`
//! (WordLevel model, lowercase normaliser, BERT pre-tokenizer: whitespace and punctuation
//! split, `[CLS] ... [SEP]` template, WordPiece decoder that joins words with spaces), so
//! that dnd's loaders read it with the `tokenizers` crate like any BERT tokenizer.
//! [`WorldTokenizer`] is the same mapping in plain Rust, for training.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use serde_json::json;

use dnd_synth::vocab::{Colour, Fill, Shape, Texture};

pub const PAD: &str = "[PAD]";
pub const UNK: &str = "[UNK]";
/// The sequence start: BLIP's decoder start token (`bos_token_id`) and CLIP's start of text.
pub const CLS: &str = "[CLS]";
/// The sequence end: BLIP's `sep_token_id` and CLIP's `eos_token_id` (pooled there).
pub const SEP: &str = "[SEP]";
pub const PAD_ID: u32 = 0;
pub const UNK_ID: u32 = 1;
pub const CLS_ID: u32 = 2;
pub const SEP_ID: u32 = 3;
const SPECIALS: [&str; 4] = [PAD, UNK, CLS, SEP];

/// Words outside the grammar that the captioner's prefix ("a picture of") uses.
const PREFIX_WORDS: [&str; 2] = ["picture", "of"];

/// Function words of the grammar (see `caption.rs`), and its punctuation.
const FUNCTION_WORDS: [&str; 17] = [
    "a",
    "an",
    "small",
    "large",
    "two",
    "three",
    "four",
    "five",
    "with",
    "and",
    "next",
    "to",
    "beside",
    "on",
    "against",
    "background",
    ",",
];

/// The noun of an object whose outline a crop cuts off ("a red striped shape"): in the
/// vocabulary of models trained on such captions only, so that the zoo's first models,
/// trained without them, are made again word for word.
const GENERIC_SHAPE_WORDS: [&str; 2] = ["shape", "shapes"];

/// Splits text as the tokenizer does: lowercase, whitespace, each punctuation mark its own
/// piece (BERT's pre-tokenizer).
pub fn split_words(text: &str) -> Vec<String> {
    let mut pieces = Vec::new();
    for chunk in text.to_lowercase().split_whitespace() {
        let mut word = String::new();
        for ch in chunk.chars() {
            if ch.is_ascii_punctuation() {
                if !word.is_empty() {
                    pieces.push(std::mem::take(&mut word));
                }
                pieces.push(ch.to_string());
            } else {
                word.push(ch);
            }
        }
        if !word.is_empty() {
            pieces.push(word);
        }
    }
    pieces
}

/// Every word the caption grammar can write, and the captioner prefix's words: the
/// vocabulary without the special tokens, sorted. `generic_shapes`: captions may name an
/// object without its shape.
fn grammar_words(generic_shapes: bool) -> BTreeSet<String> {
    let mut forms: Vec<&str> = FUNCTION_WORDS.iter().chain(&PREFIX_WORDS).copied().collect();
    if generic_shapes {
        forms.extend(GENERIC_SHAPE_WORDS);
    }
    for c in Colour::ALL {
        forms.push(c.name());
        forms.extend(c.synonyms());
    }
    for s in Shape::ALL {
        forms.extend([s.name(), s.plural()]);
        forms.extend(s.synonyms().iter().flat_map(|&(a, b)| [a, b]));
    }
    for f in Fill::ALL {
        forms.extend(f.adjectives().iter().chain(f.nouns()));
    }
    for t in Texture::ALL {
        forms.extend(t.adjectives().iter().chain(t.nouns()));
    }
    forms.iter().flat_map(|f| split_words(f)).collect()
}

/// The vocabulary in id order: `[PAD]`, `[UNK]`, `[CLS]`, `[SEP]`, then every word of the
/// grammar (and of the captioner prefix) in alphabetical order.
pub fn world_vocabulary(generic_shapes: bool) -> Vec<String> {
    SPECIALS.iter().map(|s| s.to_string()).chain(grammar_words(generic_shapes)).collect()
}

/// The tokenizer in plain Rust: exactly what the written `tokenizer.json` does.
#[derive(Debug, Clone)]
pub struct WorldTokenizer {
    words: Vec<String>,
    ids: HashMap<String, u32>,
}

impl WorldTokenizer {
    /// The tokenizer of the captions `sampling` draws.
    pub fn for_sampling(sampling: &crate::pairs::PairSampling) -> Self {
        Self::new(sampling.min_shape_fraction > 0.0)
    }

    /// The world's vocabulary, with the generic shape nouns or without.
    pub fn new(generic_shapes: bool) -> Self {
        let words = world_vocabulary(generic_shapes);
        let ids = words.iter().enumerate().map(|(i, w)| (w.clone(), i as u32)).collect();
        Self { words, ids }
    }

    pub fn vocab_size(&self) -> usize {
        self.words.len()
    }

    pub fn id(&self, word: &str) -> Option<u32> {
        self.ids.get(word).copied()
    }

    /// `[CLS] words... [SEP]`; unknown words become `[UNK]`.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let words = split_words(text).into_iter().map(|w| self.id(&w).unwrap_or(UNK_ID));
        std::iter::once(CLS_ID).chain(words).chain(std::iter::once(SEP_ID)).collect()
    }

    /// Words joined by spaces, special tokens skipped, no space before a comma.
    pub fn decode(&self, ids: &[u32]) -> String {
        let words: Vec<&str> = ids
            .iter()
            .filter(|&&i| i as usize >= SPECIALS.len())
            .filter_map(|&i| self.words.get(i as usize))
            .map(String::as_str)
            .collect();
        words.join(" ").replace(" ,", ",")
    }
}

fn added_token(id: u32, content: &str) -> serde_json::Value {
    json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true})
}

/// The Hugging Face `tokenizer.json` of `tokenizer`'s vocabulary.
pub fn tokenizer_json(tokenizer: &WorldTokenizer) -> serde_json::Value {
    let vocab: serde_json::Map<String, serde_json::Value> =
        tokenizer.words.iter().enumerate().map(|(i, w)| (w.clone(), json!(i))).collect();
    let special = |name: &str, id: u32| json!({"id": name, "ids": [id], "tokens": [name]});
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": SPECIALS.iter().enumerate().map(|(i, s)| added_token(i as u32, s)).collect::<Vec<_>>(),
        "normalizer": {"type": "Lowercase"},
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [
                {"SpecialToken": {"id": CLS, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": SEP, "type_id": 0}}
            ],
            "pair": [
                {"SpecialToken": {"id": CLS, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": SEP, "type_id": 0}},
                {"Sequence": {"id": "B", "type_id": 1}},
                {"SpecialToken": {"id": SEP, "type_id": 1}}
            ],
            "special_tokens": {CLS: special(CLS, CLS_ID), SEP: special(SEP, SEP_ID)}
        },
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": true},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": UNK}
    })
}

/// Writes `tokenizer.json` and `tokenizer_config.json` into `dir` (created if missing).
/// `model_max_length` is the context the model was trained for.
pub fn write_tokenizer(
    tokenizer: &WorldTokenizer,
    dir: &Path,
    model_max_length: usize,
) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let pretty = |v: &serde_json::Value| {
        serde_json::to_string_pretty(v).expect("JSON values serialise") + "\n"
    };
    std::fs::write(dir.join("tokenizer.json"), pretty(&tokenizer_json(tokenizer)))?;
    let config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": CLS,
        "cls_token": CLS,
        "eos_token": SEP,
        "sep_token": SEP,
        "pad_token": PAD,
        "unk_token": UNK,
        "do_lower_case": true,
        "model_max_length": model_max_length
    });
    std::fs::write(dir.join("tokenizer_config.json"), pretty(&config))
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;
    use dnd_synth::caption::{caption, caption_visible};
    use dnd_synth::mask::Rect;
    use dnd_synth::render::render;
    use dnd_synth::scene::Scene;

    #[test]
    fn every_grammar_word_round_trips_through_the_hf_tokenizer() {
        for generic_shapes in [false, true] {
            round_trip(generic_shapes);
        }
        assert_eq!(world_vocabulary(true).len(), world_vocabulary(false).len() + 2);
    }

    fn round_trip(generic_shapes: bool) {
        let dir = tempfile::tempdir().unwrap();
        let ours = WorldTokenizer::new(generic_shapes);
        write_tokenizer(&ours, dir.path(), 48).unwrap();
        let hf = dnd_models::hf_files::load_tokenizer(&dir.path().join("tokenizer.json")).unwrap();
        assert_eq!(hf.get_vocab_size(true), ours.vocab_size());
        for (id, word) in world_vocabulary(generic_shapes).iter().enumerate() {
            assert_eq!(hf.token_to_id(word), Some(id as u32), "{word}");
            if id < SPECIALS.len() {
                continue;
            }
            let enc = hf.encode(word.as_str(), true).unwrap();
            assert_eq!(enc.get_ids(), [CLS_ID, id as u32, SEP_ID], "{word}");
            assert_eq!(hf.decode(enc.get_ids(), true).unwrap(), *word);
            assert_eq!(ours.encode(word), enc.get_ids());
        }
        // Upper case and unknown words.
        assert_eq!(hf.encode("Red DOG", true).unwrap().get_ids(), ours.encode("Red DOG"));
        assert_eq!(ours.encode("Red DOG")[2], UNK_ID);
    }

    #[test]
    fn captions_of_scenes_and_crops_encode_without_unknowns_and_decode_back() {
        let dir = tempfile::tempdir().unwrap();
        let ours = WorldTokenizer::new(false);
        write_tokenizer(&ours, dir.path(), 48).unwrap();
        let hf = dnd_models::hf_files::load_tokenizer(&dir.path().join("tokenizer.json")).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(21);
        let mut longest = 0;
        for i in 0..600 {
            let scene = Scene::sample(&mut rng);
            let text = if i % 2 == 0 {
                caption(&scene, &mut rng)
            } else {
                let rendered = render(&scene, 64, 64);
                let (w, h) = (rng.random_range(8..=64), rng.random_range(8..=64));
                let rect =
                    Rect::new(rng.random_range(0..=64 - w), rng.random_range(0..=64 - h), w, h);
                caption_visible(&scene, &rendered, rect, &mut rng).unwrap()
            };
            let text = format!("a picture of {text}");
            let ids = ours.encode(&text);
            assert!(!ids.contains(&UNK_ID), "{text}");
            assert_eq!(hf.encode(text.as_str(), true).unwrap().get_ids(), ids, "{text}");
            assert_eq!(hf.decode(&ids, true).unwrap(), text);
            assert_eq!(ours.decode(&ids), text);
            longest = longest.max(ids.len());
        }
        assert!(longest <= 48, "captions need {longest} positions");
    }
}

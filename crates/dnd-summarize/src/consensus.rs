//! The offline summariser: rules instead of a language model.
//!
//! It serves the synthetic test world (captions such as "a red circle on a blue
//! background", where the shared attribute phrase is the right answer) and is the last
//! resort when no LLM can be reached. It is deterministic.
//!
//! * `simplify` keeps the first [`MAX_LABEL_WORDS`] content words of the caption, in order:
//!   articles, prepositions, pronouns, counts and captioner filler ("a picture of",
//!   "there is", "close up") are dropped.
//! * `summarize` reads the first two thirds of the labels in the order given (at least
//!   two): like a language model, its answer depends on the shuffle, so the method's
//!   summary rounds over differently shuffled labels give a few different candidates for
//!   stage 3 to choose from, not five copies of one. `merge` reads all of them. Both
//!   count, for every word n-gram (n = 1..3) of the labels'
//!   content words, how many labels contain it (its support), folding plurals ("circles"
//!   counts as "circle"). Among the n-grams that at least half of the labels contain, the
//!   longest wins, then the best supported, then the alphabetically first; when none
//!   reaches half, the best supported wins, then the longest, then the alphabetically
//!   first. The winner is written in its most frequent spelling.

use std::collections::{BTreeMap, BTreeSet};

use async_trait::async_trait;

use crate::error::{ReplyError, SummarizeError};
use crate::reply::{Answer, MAX_LABEL_WORDS};
use crate::{Exchange, Step, Summarizer, require_caption, require_labels};

/// Recorded as the model of every exchange; bump it when the rules change.
pub const CONSENSUS_VERSION: &str = "consensus-2";

const MAX_NGRAM: usize = 3;

/// Words that carry no visual concept in a caption.
const STOPWORDS: &[&str] = &[
    // articles, determiners, pronouns
    "a", "an", "the", "this", "that", "these", "those", "there", "here", "it", "its", "they", "them", "their",
    "his", "her", "some", "each", "other", "another", "all", "any", "many", "several", "few", "lots", "lot",
    "bunch", "group", "couple", "pair",
    // prepositions and conjunctions
    "of", "on", "in", "at", "with", "to", "from", "by", "for", "over", "under", "near", "behind", "next",
    "into", "onto", "inside", "around", "against", "above", "below", "beside", "between", "through",
    "across", "along", "top", "and", "or", "but", "as",
    // verbs that only link
    "is", "are", "was", "were", "be", "been", "being", "has", "have", "having", "shows", "showing",
    // counts
    "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    // captioner filler
    "picture", "pictures", "image", "images", "photo", "photos", "photograph", "closeup", "close", "up",
    "view", "shot", "very",
];

/// The consensus rule as a [`Summarizer`].
#[derive(Debug, Clone, Copy, Default)]
pub struct ConsensusSummarizer;

impl ConsensusSummarizer {
    fn exchange(step: Step, request: String, label: Option<String>) -> Exchange {
        Exchange {
            step,
            backend: "consensus".into(),
            model: CONSENSUS_VERSION.into(),
            prompt_version: String::new(),
            request,
            reply: label.clone().unwrap_or_default(),
            answer: label.map(Answer::Label).ok_or(ReplyError::Empty),
            cached: false,
        }
    }

    fn consensus_exchange(step: Step, labels: &[String]) -> Result<Exchange, SummarizeError> {
        require_labels(labels)?;
        let read = match step {
            Step::Summarize => &labels[..summary_window(labels.len())],
            _ => labels,
        };
        Ok(Self::exchange(step, labels.join("\n"), consensus_label(read)))
    }
}

#[async_trait]
impl Summarizer for ConsensusSummarizer {
    async fn simplify(&self, caption: &str) -> Result<Exchange, SummarizeError> {
        require_caption(caption)?;
        Ok(Self::exchange(Step::Simplify, caption.to_string(), simplify_caption(caption)))
    }

    async fn summarize(&self, labels: &[String]) -> Result<Exchange, SummarizeError> {
        Self::consensus_exchange(Step::Summarize, labels)
    }

    async fn merge(&self, labels: &[String]) -> Result<Exchange, SummarizeError> {
        Self::consensus_exchange(Step::Merge, labels)
    }

    fn describe(&self) -> String {
        format!("consensus:{CONSENSUS_VERSION} (offline rule, no language model)")
    }
}

/// How many of `n` labels a summary reads: the first two thirds, at least two (or all of
/// fewer).
pub fn summary_window(n: usize) -> usize {
    n.min((2 * n).div_ceil(3).max(2))
}

/// The caption's first content words, or `None` when it has none.
pub fn simplify_caption(caption: &str) -> Option<String> {
    let words = content_words(caption);
    (!words.is_empty()).then(|| words.into_iter().take(MAX_LABEL_WORDS).collect::<Vec<_>>().join(" "))
}

/// The phrase most of the labels share (see the module documentation), or `None` when no
/// label has a content word.
pub fn consensus_label(labels: &[String]) -> Option<String> {
    let labels: Vec<Vec<String>> = labels.iter().map(|l| content_words(l)).filter(|w| !w.is_empty()).collect();
    // support: in how many labels an n-gram (by folded key) occurs; spellings: how often
    // each written form of it occurs, to report the most common one.
    let mut support: BTreeMap<String, usize> = BTreeMap::new();
    let mut spellings: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    for words in &labels {
        let mut seen = BTreeSet::new();
        for n in 1..=MAX_NGRAM.min(words.len()) {
            for window in words.windows(n) {
                let key = window.iter().map(|w| fold_plural(w)).collect::<Vec<_>>().join(" ");
                *spellings.entry(key.clone()).or_default().entry(window.join(" ")).or_default() += 1;
                if seen.insert(key.clone()) {
                    *support.entry(key).or_default() += 1;
                }
            }
        }
    }
    let word_count = |key: &str| key.split(' ').count();
    let majority = |count: usize| 2 * count >= labels.len();
    let best = if support.values().any(|&s| majority(s)) {
        // Longest, then best supported; max_by keeps the last maximum, so iterate the
        // BTreeMap backwards for the alphabetically first on a full tie.
        support.iter().rev().filter(|(_, s)| majority(**s)).max_by_key(|(k, s)| (word_count(k), **s))
    } else {
        support.iter().rev().max_by_key(|(k, s)| (**s, word_count(k)))
    };
    let (key, _) = best?;
    let forms = &spellings[key];
    forms.iter().rev().max_by_key(|(_, count)| **count).map(|(form, _)| form.clone())
}

/// Lower-cased words without stopwords; possessive "'s" and surrounding punctuation removed.
fn content_words(text: &str) -> Vec<String> {
    text.to_lowercase()
        .split(|c: char| !(c.is_alphanumeric() || c == '\'' || c == '-'))
        .map(|w| w.trim_matches(|c| c == '\'' || c == '-'))
        .map(|w| w.strip_suffix("'s").unwrap_or(w))
        .filter(|w| !w.is_empty() && !STOPWORDS.contains(w) && !w.chars().all(|c| c.is_ascii_digit()))
        .map(str::to_string)
        .collect()
}

/// A crude singular for counting only ("circles" and "circle" are one concept); the
/// reported label keeps a spelling that occurred.
fn fold_plural(word: &str) -> String {
    if word.len() > 4
        && let Some(stem) = word.strip_suffix("ies")
    {
        return format!("{stem}y");
    }
    for suffix in ["sses", "shes", "ches", "xes"] {
        if word.ends_with(suffix) {
            return word[..word.len() - 2].to_string();
        }
    }
    let keeps_s = ["ss", "us", "is"].iter().any(|s| word.ends_with(s));
    match word.strip_suffix('s') {
        Some(stem) if word.len() > 3 && !keeps_s => stem.to_string(),
        _ => word.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn simplify_keeps_the_content_words_in_order() {
        let cases = [
            ("a red circle on a blue background", "red circle blue background"),
            ("there is a picture of two red circles and a green square", "red circles green square"),
            ("a close up of a dog's nose", "dog nose"),
            ("an image of 3 striped zebras standing in the grass", "striped zebras standing grass"),
            ("A large red circle with small blue dots and green stripes", "large red circle small blue"),
            ("black-and-white checkerboard", "black-and-white checkerboard"),
        ];
        for (caption, expected) in cases {
            assert_eq!(simplify_caption(caption).as_deref(), Some(expected), "{caption}");
        }
        assert_eq!(simplify_caption("a picture of it"), None);
    }

    #[test]
    fn summarize_prefers_the_longest_phrase_most_labels_share() {
        let labels = strings(&[
            "red circle blue background",
            "red circles green square",
            "red circle",
            "blue square",
            "red ring",
        ]);
        // "red" has support 4 and "red circle" 3 of 5: the bigram reaches half and is longer.
        assert_eq!(consensus_label(&labels).as_deref(), Some("red circle"));

        let stripes = strings(&["black white stripes", "black white stripes zebra", "black white stripes shirt", "dots"]);
        assert_eq!(consensus_label(&stripes).as_deref(), Some("black white stripes"));

        let shared_word = strings(&["striped shirt", "striped tie", "polka dots"]);
        assert_eq!(consensus_label(&shared_word).as_deref(), Some("striped"));
    }

    #[test]
    fn summarize_reports_the_most_frequent_spelling_of_a_folded_phrase() {
        let labels = strings(&["red circles", "red circles", "red circle", "squares"]);
        assert_eq!(consensus_label(&labels).as_deref(), Some("red circles"));
        let boxes = strings(&["wooden boxes", "wooden box", "box"]);
        // "box" (support 3) and "wooden box" (support 2 of 3) both reach half: longer wins.
        assert_eq!(consensus_label(&boxes).as_deref(), Some("wooden box"));
    }

    #[test]
    fn the_consensus_label_is_deterministic_without_a_majority_and_ignores_order() {
        let labels = strings(&["dog", "cat", "bird"]);
        // Support 1 each, one word each: the alphabetically first.
        assert_eq!(consensus_label(&labels).as_deref(), Some("bird"));

        let mut shuffled = strings(&["two red circles and a green square", "red circle", "a red circle on a blue background", "blue square"]);
        let expected = consensus_label(&shuffled);
        assert_eq!(expected.as_deref(), Some("red circle"));
        shuffled.reverse();
        assert_eq!(consensus_label(&shuffled), expected);
        shuffled.swap(0, 2);
        assert_eq!(consensus_label(&shuffled), expected);
    }

    #[test]
    fn summarize_of_nothing_usable_is_none() {
        assert_eq!(consensus_label(&strings(&["the", "a picture of it"])), None);
    }

    #[test]
    fn folds_common_plurals() {
        for (word, folded) in [
            ("circles", "circle"),
            ("berries", "berry"),
            ("boxes", "box"),
            ("glasses", "glass"),
            ("dishes", "dish"),
            ("grass", "grass"),
            ("bus", "bus"),
            ("dots", "dot"),
            ("gas", "gas"),
        ] {
            assert_eq!(fold_plural(word), folded, "{word}");
        }
    }

    #[tokio::test]
    async fn as_a_summarizer_it_records_its_input_and_answer() {
        let s = ConsensusSummarizer;
        let ex = s.simplify("a red circle on a blue background").await.unwrap();
        assert_eq!((ex.step, ex.backend.as_str(), ex.model.as_str()), (Step::Simplify, "consensus", CONSENSUS_VERSION));
        assert_eq!(ex.request, "a red circle on a blue background");
        assert_eq!(ex.label(), Some("red circle blue background"));

        let ex = s.summarize(&strings(&["red circle", "red circles", "blue square"])).await.unwrap();
        assert_eq!(ex.request, "red circle\nred circles\nblue square");
        assert_eq!(ex.label(), Some("red circle"));

        // A summary reads the first two thirds of what it is given, so the order matters.
        let labels = strings(&["blue square", "blue square", "red circle", "red circle", "red circle", "green star"]);
        assert_eq!(summary_window(labels.len()), 4);
        assert_eq!(s.summarize(&labels).await.unwrap().label(), Some("blue square"));
        let mut reordered = labels.clone();
        reordered.rotate_left(2);
        assert_eq!(s.summarize(&reordered).await.unwrap().label(), Some("red circle"));
        assert_eq!(s.merge(&labels).await.unwrap().label(), Some("red circle"), "a merge reads every label");
        assert_eq!((summary_window(1), summary_window(2), summary_window(3), summary_window(10)), (1, 2, 2, 7));

        let ex = s.simplify("there is a picture of it").await.unwrap();
        assert_eq!(ex.answer, Err(ReplyError::Empty));
        assert!(s.simplify("  ").await.unwrap_err().is_user_error());
        assert!(s.summarize(&[]).await.unwrap_err().is_user_error());
    }
}

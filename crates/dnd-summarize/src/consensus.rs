//! The offline summariser: rules instead of a language model.
//!
//! It serves the synthetic test world (captions such as "a red circle on a blue
//! background", where the shared attribute phrase is the right answer) and is the last
//! resort when no LLM can be reached. It is deterministic.
//!
//! * `simplify` drops what carries no visual concept (articles, prepositions, pronouns,
//!   counts and captioner filler such as "a picture of", "there is", "close up") and keeps
//!   every content word, grouped into the caption's phrases: "a yellow dotted star on a
//!   gray background with a checkerboard pattern" becomes "yellow dotted star, gray
//!   background checkerboard pattern". A phrase ends at punctuation, "and"/"or"/"but" and
//!   prepositions of place ("on", "next to", "against", ...); "with" keeps its phrase going
//!   ("a circle with stripes" is one thing) except after a background, where "with a"
//!   introduces a thing standing on it ("a yellow background with a dotted cross" is two).
//!   Nothing is cut: a rule cannot tell which words of one caption matter, so it leaves
//!   that to the summary, which sees all of them.
//! * `summarize` reads the first half of the labels in the order given (at least
//!   three): like a language model, its answer depends on the shuffle, so the method's
//!   summary rounds over differently shuffled labels give a few different candidates for
//!   stage 3 to choose from, not five copies of one. `merge` reads all of them. Both
//!   count, for every set of one to three words that occur together in one phrase of a
//!   label, how many labels contain it (its support). Word order does not matter ("dotted
//!   orange square" and "orange square with polka dots" both contain {orange, dotted}), and
//!   inflections and texture synonyms fold together for counting ("circles"/"circle",
//!   "striped"/"stripes", "noisy"/"grain", "dotted"/"spots"). Among the sets that at
//!   least half of the labels contain, the largest wins, then the best supported; when
//!   none reaches half, the best supported wins, then the largest. Between sets still
//!   equal, the one whose words the labels use least apart from it wins (summed over its
//!   words, the share of the labels holding the word that hold the set): "white triangle"
//!   over "white stripes" when the labels say stripes of other things too. Then the
//!   alphabetically first.
//! * A set made only of generic nouns ("background", "pattern", "shapes") says nothing
//!   every image would not, so it wins only when nothing else is named. Nouns that stand
//!   for a thing ("shape", "object") do not count in a set's size, and between two sets
//!   that say the same the one without them wins: "white shape with stripes" in half of
//!   the labels beats "shape with stripes" in more.
//! * Labels that split between two alternatives ("yellow square" in some, "purple
//!   square" in others) give "yellow or purple": two words that no label names together
//!   but that mostly share their phrase-mates, each in at least a third of the labels and
//!   not in all, together in every label. They compete as a set of two words supported by the
//!   labels they cover: they win over a single word and over a pair that fewer labels
//!   share, and lose to a larger set that half of the labels share. What the
//!   alternatives' phrases share stays with them: the largest set naming neither that
//!   half of the labels say in one phrase with either word ("yellow or purple square",
//!   "purple star or cross"), as a language model would not drop the shape every label
//!   names.
//! * The winner is written as its words occur most often (order and spelling).

use std::collections::{BTreeMap, BTreeSet};

use async_trait::async_trait;

use crate::error::{ReplyError, SummarizeError};
use crate::reply::Answer;
use crate::{Exchange, Step, Summarizer, require_caption, require_labels};

/// Recorded as the model of every exchange; bump it when the rules change.
pub const CONSENSUS_VERSION: &str = "consensus-10";

/// The largest word set a summary reports.
const MAX_SET: usize = 3;

/// Words that carry no visual concept in a caption.
const STOPWORDS: &[&str] = &[
    // articles, determiners, pronouns
    "a",
    "an",
    "the",
    "this",
    "that",
    "these",
    "those",
    "there",
    "here",
    "it",
    "its",
    "they",
    "them",
    "their",
    "his",
    "her",
    "some",
    "each",
    "other",
    "another",
    "all",
    "any",
    "many",
    "several",
    "few",
    "lots",
    "lot",
    "bunch",
    "group",
    "couple",
    "pair",
    // prepositions and conjunctions that do not end a phrase
    "of",
    "in",
    "at",
    "with",
    "to",
    "from",
    "by",
    "for",
    "into",
    "inside",
    "through",
    "across",
    "along",
    "top",
    "as",
    // verbs that only link
    "is",
    "are",
    "was",
    "were",
    "be",
    "been",
    "being",
    "has",
    "have",
    "having",
    "shows",
    "showing",
    // counts
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    // captioner filler
    "picture",
    "pictures",
    "image",
    "images",
    "photo",
    "photos",
    "photograph",
    "closeup",
    "close",
    "up",
    "view",
    "shot",
    "very",
];

/// Words that end a phrase: conjunctions and prepositions of place ("a red circle next to
/// a blue square on a green background" is three things).
const BOUNDARIES: &[&str] = &[
    "and",
    "or",
    "but",
    "while",
    "on",
    "onto",
    "upon",
    "atop",
    "against",
    "over",
    "under",
    "beneath",
    "above",
    "below",
    "beside",
    "besides",
    "near",
    "next",
    "behind",
    "between",
    "alongside",
    "around",
    "front",
];

/// Nouns that stand for a thing: they add nothing to a set of other words ("a white shape
/// with stripes" says {white, striped}), so a set's size does not count them, and of two
/// sets saying the same the one without them wins.
const OBJECT_NOUNS: &[&str] = &["shape", "object", "thing", "item"];

/// With [`OBJECT_NOUNS`], the nouns that name no concept on their own: every image has a
/// background, and its things are shapes or objects. A word set made only of them is not
/// an answer ("background") while any other set is; they do count within larger sets
/// ("noisy background").
const SCENE_NOUNS: &[&str] = &["background", "backdrop", "pattern", "texture", "scene"];

/// The nouns for what things stand on: after one, "with a ..." starts a new thing.
const SCENE_BACKDROPS: &[&str] = &["background", "backgrounds", "backdrop", "backdrops"];

/// Stems of words captioners use for one texture, and the word they count as, as a
/// language model reads them: spots ("spotted", "spotty") are dots, checks ("checkered",
/// "chequered") a checkerboard, grain ("grainy") noise. The reported label keeps a spelling
/// that occurred.
const TEXTURE_SYNONYMS: &[(&str, &str)] = &[
    ("spot", "dot"),
    ("check", "checkerboard"),
    ("checker", "checkerboard"),
    ("chequer", "checkerboard"),
    ("grain", "noise"),
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

/// How many of `n` labels a summary reads: the first half, at least three (or all of
/// fewer). Half rather than two thirds: the method's summary rounds then give stage 3
/// about half again as many distinct candidates (docs/benchmarks.md, `consensus-8`). At
/// least three: in a window of two, one label alone would be half of it, and its whole
/// phrase ("small red circle") would win over what both share.
pub fn summary_window(n: usize) -> usize {
    n.min(n.div_ceil(2).max(3))
}

/// The caption's content words, phrase by phrase ("red dotted star, gray background"), or
/// `None` when it has none.
pub fn simplify_caption(caption: &str) -> Option<String> {
    let phrases: Vec<String> = phrases(caption).into_iter().map(|p| p.join(" ")).collect();
    (!phrases.is_empty()).then(|| phrases.join(", "))
}

/// One phrase of a label: its content words and their folded keys, in order.
struct Phrase {
    words: Vec<String>,
    keys: Vec<String>,
}

impl Phrase {
    fn new(words: Vec<String>) -> Self {
        let keys = words.iter().map(|w| fold(w)).collect();
        Phrase { words, keys }
    }

    /// Whether the phrase holds the folded key `key`.
    fn has(&self, key: &str) -> bool {
        self.keys.iter().any(|k| k == key)
    }

    /// The distinct keys, in order of first occurrence.
    fn distinct_keys(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for k in &self.keys {
            if !out.contains(&k.as_str()) {
                out.push(k);
            }
        }
        out
    }

    /// How `set` (sorted keys) is written in this phrase: the first word of each key, in
    /// phrase order.
    fn spelling(&self, set: &[&str]) -> String {
        let mut seen = BTreeSet::new();
        let mut out = Vec::new();
        for (word, key) in self.words.iter().zip(&self.keys) {
            if set.contains(&key.as_str()) && seen.insert(key.as_str()) {
                out.push(word.as_str());
            }
        }
        out.join(" ")
    }
}

/// The phrase most of the labels share (see the module documentation), or `None` when no
/// label has a content word.
pub fn consensus_label(labels: &[String]) -> Option<String> {
    let labels: Vec<Vec<Phrase>> = labels
        .iter()
        .map(|l| phrases(l).into_iter().map(Phrase::new).collect::<Vec<_>>())
        .filter(|p| !p.is_empty())
        .collect();
    // support: in how many labels a word set (sorted folded keys, space-joined) occurs
    // within one phrase; spellings: how often each written form of it occurs.
    let mut support: BTreeMap<String, usize> = BTreeMap::new();
    let mut spellings: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    for label in &labels {
        let mut seen = BTreeSet::new();
        for phrase in label {
            let mut keys = phrase.distinct_keys();
            keys.sort_unstable();
            for set in subsets(&keys, MAX_SET) {
                let key = set.join(" ");
                *spellings
                    .entry(key.clone())
                    .or_default()
                    .entry(phrase.spelling(&set))
                    .or_default() += 1;
                if seen.insert(key.clone()) {
                    *support.entry(key).or_default() += 1;
                }
            }
        }
    }
    // A set's size counts what it says: "shape" adds nothing to {white, striped}.
    let object_keys: Vec<String> = OBJECT_NOUNS.iter().map(|g| fold(g)).collect();
    let size = |key: &str| key.split(' ').filter(|k| !object_keys.iter().any(|g| g == k)).count();
    let words = |key: &str| std::cmp::Reverse(key.split(' ').count());
    let majority = |count: usize| 2 * count >= labels.len();
    // Of two sets otherwise equal, the one whose words the labels use least apart from it:
    // "white triangle" (every triangle named is white) over "white stripes" where stripes
    // are also said of blue squares and backgrounds. The sum over its words of the share
    // of their labels that hold the set, in permille.
    let alone = support.clone();
    let cohesion = |key: &str| -> usize {
        let together = alone.get(key).copied().unwrap_or(0);
        key.split(' ').filter_map(|k| alone.get(k)).map(|&w| together * 1000 / w.max(1)).sum()
    };
    let generic_keys: Vec<String> =
        SCENE_NOUNS.iter().chain(OBJECT_NOUNS).map(|g| fold(g)).collect();
    let generic = |key: &str| key.split(' ').all(|k| generic_keys.iter().any(|g| g == k));
    if support.keys().any(|k| !generic(k)) {
        support.retain(|k, _| !generic(k));
    }
    let written = |key: &str| -> Option<String> {
        let forms = spellings.get(key)?;
        forms.iter().rev().max_by_key(|(_, count)| **count).map(|(form, _)| form.clone())
    };
    let best = if support.values().any(|&s| majority(s)) {
        // Largest, then best supported; max_by keeps the last maximum, so iterate the
        // BTreeMap backwards for the alphabetically first on a full tie.
        support
            .iter()
            .rev()
            .filter(|(_, s)| majority(**s))
            .max_by_key(|(k, s)| (size(k), **s, words(k), cohesion(k)))
    } else {
        support.iter().rev().max_by_key(|(k, s)| (**s, size(k), words(k), cohesion(k)))
    };
    let (key, &count) = best?;
    // Alternatives compete as a set of two words, supported by the labels they cover.
    if let Some(alt) = alternatives(&labels)
        && (size(key), count) <= (2, alt.covered)
    {
        let shared = alternatives_share(&labels, &alt, &support, &size);
        return write_alternatives(&alt, shared.as_deref(), &written);
    }
    written(key)
}

/// "a or b", with the words their phrases share around it as the labels write them most
/// ("yellow or purple square", "purple star or cross"); `written` spells a key set.
fn write_alternatives(
    alt: &Alternatives,
    shared: Option<&str>,
    written: &dyn Fn(&str) -> Option<String>,
) -> Option<String> {
    let either = format!("{} or {}", written(&alt.a)?, written(&alt.b)?);
    let with = |word: &str| {
        let mut set: Vec<&str> = shared?.split(' ').chain([word]).collect();
        set.sort_unstable();
        written(&set.join(" "))
    };
    let Some(form) = with(&alt.a).or_else(|| with(&alt.b)) else {
        return Some(either);
    };
    let is_alternative = |w: &str| [&alt.a, &alt.b].contains(&&fold(w));
    let words: Vec<&str> =
        form.split(' ').map(|w| if is_alternative(w) { either.as_str() } else { w }).collect();
    Some(words.join(" "))
}

/// The largest word set (then the best supported, then the alphabetically first) that at
/// least half of the labels say in one phrase with either alternative, and that names
/// neither; at most [`MAX_SET`] words with the alternative.
fn alternatives_share(
    labels: &[Vec<Phrase>],
    alt: &Alternatives,
    support: &BTreeMap<String, usize>,
    size: &dyn Fn(&str) -> usize,
) -> Option<String> {
    let with_either = |set: &[&str]| -> usize {
        labels
            .iter()
            .filter(|l| {
                l.iter().any(|p| set.iter().all(|k| p.has(k)) && (p.has(&alt.a) || p.has(&alt.b)))
            })
            .count()
    };
    support
        .keys()
        .rev()
        .filter(|key| key.split(' ').count() < MAX_SET && size(key) > 0)
        .filter(|key| key.split(' ').all(|k| k != alt.a && k != alt.b))
        .map(|key| (key, with_either(&key.split(' ').collect::<Vec<_>>())))
        .filter(|(_, n)| 2 * n >= labels.len())
        .max_by_key(|(key, n)| (size(key), *n))
        .map(|(key, _)| key.clone())
}

/// Two alternatives that labels split between (folded keys), and how many labels name one
/// of them.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Alternatives {
    a: String,
    b: String,
    covered: usize,
}

/// The pair of words that labels split between, if any: two words that no label names
/// together (each label that names one says something else than the other: "yellow" in
/// some captions, "purple" in others), that mostly share their phrase-mates (at least half
/// of the words either shares a phrase with, shares one with both: they fill the same slot,
/// as colours of squares do), that each occur in at least a third of the labels but not in
/// all of them, and that together occur in every label. The pair covering most labels wins, then the alphabetically
/// first; it is written with the better supported word first, then the one the labels
/// name first.
fn alternatives(labels: &[Vec<Phrase>]) -> Option<Alternatives> {
    let n = labels.len();
    if n < 4 {
        return None;
    }
    let mut support: BTreeMap<&str, usize> = BTreeMap::new();
    for label in labels {
        let keys: BTreeSet<&str> =
            label.iter().flat_map(|p| p.keys.iter().map(String::as_str)).collect();
        for k in keys {
            *support.entry(k).or_default() += 1;
        }
    }
    let mates = |w: &str| -> BTreeSet<&str> {
        labels
            .iter()
            .flatten()
            .filter(|p| p.has(w))
            .flat_map(|p| p.keys.iter().map(String::as_str))
            .filter(|k| *k != w)
            .collect()
    };
    let candidates: Vec<&str> =
        support.iter().filter(|(_, s)| 3 * **s >= n && **s < n).map(|(k, _)| *k).collect();
    let mut best: Option<Alternatives> = None;
    for (i, &a) in candidates.iter().enumerate() {
        for &b in &candidates[i + 1..] {
            let covered = labels.iter().filter(|l| l.iter().any(|p| p.has(a) || p.has(b))).count();
            if covered < n || best.as_ref().is_some_and(|x| x.covered >= covered) {
                continue;
            }
            let label_has = |l: &[Phrase], w: &str| l.iter().any(|p| p.has(w));
            let together = labels.iter().any(|l| label_has(l, a) && label_has(l, b));
            let (ma, mb) = (mates(a), mates(b));
            let shared = ma.intersection(&mb).count();
            if together || 2 * shared < ma.union(&mb).count() {
                continue;
            }
            // The better supported first, then the one a label names first.
            let first = |w: &str| labels.iter().flatten().position(|p| p.has(w));
            let (a, b) = if (std::cmp::Reverse(support[a]), first(a))
                <= (std::cmp::Reverse(support[b]), first(b))
            {
                (a, b)
            } else {
                (b, a)
            };
            best = Some(Alternatives { a: a.to_string(), b: b.to_string(), covered });
        }
    }
    best
}

/// Every subset of 1 to `max` elements of `items` (sorted input gives sorted subsets).
fn subsets<'a>(items: &[&'a str], max: usize) -> Vec<Vec<&'a str>> {
    let mut out: Vec<Vec<&'a str>> = Vec::new();
    fn grow<'a>(
        items: &[&'a str],
        start: usize,
        max: usize,
        current: &mut Vec<&'a str>,
        out: &mut Vec<Vec<&'a str>>,
    ) {
        for i in start..items.len() {
            current.push(items[i]);
            out.push(current.clone());
            if current.len() < max {
                grow(items, i + 1, max, current, out);
            }
            current.pop();
        }
    }
    grow(items, 0, max, &mut Vec::new(), &mut out);
    out
}

/// The phrases of a text, each as its content words (lower-cased, stopwords dropped,
/// possessive "'s" and surrounding punctuation removed); phrases without content words are
/// left out.
fn phrases(text: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut current: Vec<String> = Vec::new();
    let lower = text.to_lowercase();
    let mut flush = |current: &mut Vec<String>| {
        if !current.is_empty() {
            out.push(std::mem::take(current));
        }
    };
    // Split into words, keeping punctuation that ends a phrase as its own piece.
    let mut word = String::new();
    let mut pieces: Vec<Option<String>> = Vec::new();
    for ch in lower.chars() {
        if ch.is_alphanumeric() || ch == '\'' || ch == '-' {
            word.push(ch);
            continue;
        }
        if !word.is_empty() {
            pieces.push(Some(std::mem::take(&mut word)));
        }
        if matches!(ch, ',' | ';' | '.' | ':' | '!' | '?' | '(' | ')' | '/' | '&' | '+' | '\n') {
            pieces.push(None);
        }
    }
    if !word.is_empty() {
        pieces.push(Some(word));
    }
    let words: Vec<Option<&str>> = pieces
        .iter()
        .map(|p| {
            p.as_deref().map(|raw| {
                let w = raw.trim_matches(|c| c == '\'' || c == '-');
                w.strip_suffix("'s").unwrap_or(w)
            })
        })
        .collect();
    for (i, word) in words.iter().enumerate() {
        let Some(w) = *word else {
            flush(&mut current);
            continue;
        };
        if BOUNDARIES.contains(&w) || with_starts_a_thing(&current, &words[i..]) {
            flush(&mut current);
        } else if !w.is_empty() && !STOPWORDS.contains(&w) && !w.chars().all(|c| c.is_ascii_digit())
        {
            current.push(w.to_string());
        }
    }
    flush(&mut current);
    out
}

/// Whether `rest`, starting at "with", begins a new thing rather than continuing the
/// phrase `current`: after a background, "with" and an article introduce what stands on it
/// ("a yellow background with a dotted orange cross" is two things), unless what follows
/// ends in a scene noun ("a gray background with a checkerboard pattern" is one). Without
/// an article ("a background with stripes") and after anything but a background ("a
/// circle with a hole") the phrase goes on.
fn with_starts_a_thing(current: &[String], rest: &[Option<&str>]) -> bool {
    let [Some("with"), Some("a" | "an"), ..] = rest else {
        return false;
    };
    let after_background = current.iter().any(|w| SCENE_BACKDROPS.contains(&w.as_str()));
    let last = rest[2..]
        .iter()
        .map_while(|w| w.filter(|w| !BOUNDARIES.contains(w) && *w != "with"))
        .filter(|w| !STOPWORDS.contains(w))
        .last();
    after_background && last.is_some_and(|w| !SCENE_NOUNS.contains(&w))
}

/// A crude stem for counting only: plurals, "-ed", "-y" and a final "e" fold away
/// ("circles" and "circle", "striped" and "stripes", "dotted" and "dots", "noisy" and
/// "noise" count as one word), and [`TEXTURE_SYNONYMS`] fold into one; the reported label
/// keeps a spelling that occurred.
fn fold(word: &str) -> String {
    let mut w = fold_plural(word);
    let undouble = |stem: &str| -> String {
        let b = stem.as_bytes();
        let n = b.len();
        if n >= 3 && b[n - 1] == b[n - 2] && !b"aeiouls".contains(&b[n - 1]) {
            stem[..n - 1].to_string()
        } else {
            stem.to_string()
        }
    };
    if w.len() > 4 && w.is_ascii() {
        if let Some(stem) = w.strip_suffix("ed") {
            w = undouble(stem);
        } else if let Some(stem) = w.strip_suffix('y') {
            w = undouble(stem);
        }
    }
    if w.len() > 3 && w.is_ascii() && w.ends_with('e') {
        w.pop();
    }
    match TEXTURE_SYNONYMS.iter().find(|(stem, _)| *stem == w) {
        Some((_, word)) => fold(word),
        None => w,
    }
}

/// A crude singular ("circles" and "circle" are one concept).
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
mod tests;

//! Turning a raw model reply into one concept label, or noticing that it lists several.
//!
//! Chat models do not always answer with the bare label the prompt asks for: they add
//! "Label:", quotes, markdown, a trailing period, an explanation on the next line, or list
//! several labels. Cleaning is lenient about the wrapping and strict about the result:
//! one label of at most [`MAX_LABEL_WORDS`] words, or an explicit list that the caller
//! feeds back once to be merged.

use serde::{Deserialize, Serialize};

use crate::error::ReplyError;

/// The method's upper bound on a concept label.
pub const MAX_LABEL_WORDS: usize = 5;
/// Five long words fit easily; anything longer is an explanation, not a label.
pub const MAX_LABEL_CHARS: usize = 80;

/// What a usable reply says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "value", rename_all = "snake_case")]
pub enum Answer {
    /// One cleaned label of 1 to [`MAX_LABEL_WORDS`] words.
    Label(String),
    /// The reply enumerated several labels (cleaned, in the reply's order, no duplicates).
    Several(Vec<String>),
}

/// Cleans a raw reply; see the module documentation for the rules.
///
/// Only explicit enumerations count as lists: two or more bulleted or numbered lines,
/// items separated by semicolons, or comma-separated phrases. "red and white stripes" and
/// "red, white and blue stripes" (single-word modifiers joined by "and"/"or") are one label.
pub fn parse_reply(reply: &str) -> Result<Answer, ReplyError> {
    let lines: Vec<&str> =
        reply.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with("```")).collect();

    let listed: Vec<&str> = lines.iter().filter_map(|l| strip_list_marker(l)).collect();
    if listed.len() >= 2 {
        return several_or_one(listed.into_iter().map(clean_phrase).collect());
    }

    // A model that explains itself puts the label first; a preamble such as "Label:" or
    // "Here is the label:" on a line of its own comes before it.
    let Some(line) =
        lines.iter().map(|l| strip_list_marker(l).unwrap_or(l)).find(|l| !is_preamble(l))
    else {
        return Err(ReplyError::Empty);
    };
    let phrase = clean_phrase(line);
    match split_enumeration(&phrase) {
        Some(items) => several_or_one(items),
        None => one_label(phrase),
    }
}

fn several_or_one(items: Vec<String>) -> Result<Answer, ReplyError> {
    let mut distinct: Vec<String> = Vec::with_capacity(items.len());
    for item in items {
        if !item.is_empty() && !distinct.iter().any(|d| d.eq_ignore_ascii_case(&item)) {
            distinct.push(item);
        }
    }
    match distinct.len() {
        0 => Err(ReplyError::Empty),
        1 => one_label(distinct.remove(0)),
        _ => Ok(Answer::Several(distinct)),
    }
}

fn one_label(label: String) -> Result<Answer, ReplyError> {
    let words = label.split_whitespace().count();
    if words == 0 {
        return Err(ReplyError::Empty);
    }
    if words > MAX_LABEL_WORDS {
        return Err(ReplyError::TooManyWords { words, max: MAX_LABEL_WORDS });
    }
    let chars = label.chars().count();
    if chars > MAX_LABEL_CHARS {
        return Err(ReplyError::TooLong { chars, max: MAX_LABEL_CHARS });
    }
    Ok(Answer::Label(label))
}

/// The text after a bullet (`-`, `*`, `+`, `•`) or a number (`1.`, `2)`), if the line has one.
fn strip_list_marker(line: &str) -> Option<&str> {
    if let Some(rest) = line.strip_prefix(['-', '*', '+', '•']) {
        // "**Label:**" is emphasis, not a bullet: a bullet is followed by a space.
        return rest.starts_with(char::is_whitespace).then(|| rest.trim_start());
    }
    let digits = line.len() - line.trim_start_matches(|c: char| c.is_ascii_digit()).len();
    if digits == 0 || digits > 2 {
        return None;
    }
    let rest = line[digits..].strip_prefix(['.', ')'])?;
    rest.starts_with(char::is_whitespace).then(|| rest.trim_start())
}

/// A line that only announces the answer, e.g. "Label:" or "Here is the merged label:".
fn is_preamble(line: &str) -> bool {
    let plain = line.trim_matches(|c: char| c == '*' || c == '_' || c == '#' || c.is_whitespace());
    plain.is_empty() || plain.ends_with(':')
}

/// Removes markdown, a short "Label:"-style prefix, wrapping quotes, a trailing explanation
/// (after " - " or in parentheses) and trailing punctuation; collapses whitespace.
fn clean_phrase(text: &str) -> String {
    let text: String = text.chars().filter(|c| !matches!(c, '*' | '`')).collect();
    let mut text = text.trim_start_matches(['#', '>']).trim();
    if let Some((prefix, rest)) = text.split_once(':') {
        // Up to three words before the colon ("Label", "Final merged label") is a prefix;
        // more is a sentence, which the word limit will reject.
        if !rest.trim().is_empty() && prefix.split_whitespace().count() <= 3 {
            text = rest;
        }
    }
    for separator in [" - ", " – ", " — "] {
        if let Some((head, _explanation)) = text.split_once(separator) {
            text = head;
        }
    }
    let mut text = trim_wrapping(text);
    if text.ends_with(')')
        && let Some(open) = text.rfind('(')
        && open > 0
    {
        text = trim_wrapping(&text[..open]);
    }
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

const QUOTES: [char; 8] = ['"', '\'', '“', '”', '‘', '’', '«', '»'];

pub(crate) fn trim_wrapping(text: &str) -> &str {
    text.trim_matches(|c: char| c.is_whitespace() || QUOTES.contains(&c) || ".,;:!?".contains(c))
}

/// Splits "red circle, blue square" or "circles; squares" into items; `None` for one label,
/// including coordinated single-word modifiers such as "red, white and blue stripes".
fn split_enumeration(phrase: &str) -> Option<Vec<String>> {
    let items: Vec<&str> =
        phrase.split([',', ';']).map(str::trim).filter(|p| !p.is_empty()).collect();
    if items.len() < 2 {
        return None;
    }
    let last = *items.last()?;
    let coordinated = !phrase.contains(';')
        && items[..items.len() - 1].iter().all(|p| p.split_whitespace().count() == 1)
        && last.split_whitespace().any(|w| w == "and" || w == "or");
    if coordinated {
        return None;
    }
    let items = items
        .iter()
        .map(|item| {
            let item =
                item.strip_prefix("and ").or_else(|| item.strip_prefix("or ")).unwrap_or(item);
            trim_wrapping(item).to_string()
        })
        .collect();
    Some(items)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn label(reply: &str) -> String {
        match parse_reply(reply) {
            Ok(Answer::Label(l)) => l,
            other => panic!("{reply:?} should give one label, got {other:?}"),
        }
    }

    fn several(reply: &str) -> Vec<String> {
        match parse_reply(reply) {
            Ok(Answer::Several(items)) => items,
            other => panic!("{reply:?} should list several labels, got {other:?}"),
        }
    }

    #[test]
    fn strips_the_wrapping_models_add() {
        assert_eq!(label("red circles"), "red circles");
        assert_eq!(label("  Red circles.  "), "Red circles");
        assert_eq!(label("\"striped fabric\""), "striped fabric");
        assert_eq!(label("“dog snout”."), "dog snout");
        assert_eq!(label("Label: red circles"), "red circles");
        assert_eq!(label("**Label:** `red circles`"), "red circles");
        assert_eq!(label("Final merged label: 'animal faces'"), "animal faces");
        assert_eq!(label("## red circles"), "red circles");
        assert_eq!(label("Label:\nred circles"), "red circles");
        assert_eq!(label("Here is the label:\n\n**red circles**"), "red circles");
        assert_eq!(label("```\nred circles\n```"), "red circles");
        assert_eq!(label("red circles (most of the images)"), "red circles");
        assert_eq!(label("red circles - every caption mentions them"), "red circles");
        assert_eq!(
            label("red circles\nMost of the captions mention red round shapes, so this fits."),
            "red circles"
        );
        assert_eq!(label("- red circles"), "red circles");
        assert_eq!(label("dog's nose"), "dog's nose");
        assert_eq!(label("black-and-white   stripes"), "black-and-white stripes");
    }

    #[test]
    fn conjunctions_inside_one_label_are_not_lists() {
        assert_eq!(label("red and white stripes"), "red and white stripes");
        assert_eq!(label("red, white and blue stripes"), "red, white and blue stripes");
        assert_eq!(label("red, white, and blue"), "red, white, and blue");
        assert_eq!(label("cats or dogs"), "cats or dogs");
        // Indistinguishable from the colours above without a part-of-speech tagger: one
        // label, which is still a fair description of such images.
        assert_eq!(label("circles, squares, and triangles"), "circles, squares, and triangles");
    }

    #[test]
    fn detects_explicit_enumerations() {
        assert_eq!(
            several("1. red circles\n2. blue squares\n3. green triangles"),
            ["red circles", "blue squares", "green triangles"]
        );
        assert_eq!(several("- red circles\n- \"blue squares\"."), ["red circles", "blue squares"]);
        assert_eq!(several("Labels:\n* dog face\n* cat face"), ["dog face", "cat face"]);
        assert_eq!(several("1) stripes\n2) dots"), ["stripes", "dots"]);
        assert_eq!(
            several("red circle, blue square, green triangle"),
            ["red circle", "blue square", "green triangle"]
        );
        assert_eq!(
            several("dog face, cat face, and bird head"),
            ["dog face", "cat face", "bird head"]
        );
        assert_eq!(several("circles; squares"), ["circles", "squares"]);
        assert_eq!(several("Label: dog face, cat face."), ["dog face", "cat face"]);
    }

    #[test]
    fn a_list_of_one_distinct_item_is_a_label() {
        assert_eq!(label("1. red circle\n2. Red circle"), "red circle");
    }

    #[test]
    fn rejects_empty_and_over_long_replies() {
        assert_eq!(parse_reply(""), Err(ReplyError::Empty));
        assert_eq!(parse_reply("  \n\n "), Err(ReplyError::Empty));
        assert_eq!(parse_reply("\"\"."), Err(ReplyError::Empty));
        assert_eq!(parse_reply("Label:"), Err(ReplyError::Empty));
        assert_eq!(
            parse_reply("The images mostly show red circles on blue backgrounds"),
            Err(ReplyError::TooManyWords { words: 9, max: 5 })
        );
        let long_word = "x".repeat(100);
        assert_eq!(
            parse_reply(&long_word),
            Err(ReplyError::TooLong { chars: 100, max: MAX_LABEL_CHARS })
        );
    }

    #[test]
    fn numbers_that_are_not_list_markers_stay() {
        assert_eq!(label("3 red circles"), "3 red circles");
        assert_eq!(label("1990s cars"), "1990s cars");
    }
}

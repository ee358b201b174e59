//! Stage 2, step 4: the candidate concepts that go on to image generation.

use crate::reply::trim_wrapping;

/// Last words after which the method also tries the label as a background: "floral
/// design" names a pattern that generated images tend to show as a whole-image backdrop.
const BACKGROUND_WORDS: [&str; 4] = ["design", "designs", "graphic", "graphics"];

/// Normalises summary labels into candidates: lower-case, whitespace collapsed, leading
/// and trailing quotes and trailing punctuation removed, empty labels dropped, duplicates
/// removed (first occurrence kept, order otherwise preserved). Alternatives in another
/// order are the same concept ("purple or yellow" after "yellow or purple" is a
/// duplicate, as is "purple or yellow circle" after "yellow or purple circle"):
/// generating both would spend twice the images on one concept and split its rank
/// between two candidates. A label whose last word is "design(s)" or "graphic(s)" is
/// followed by a variant with " background" appended.
pub fn normalize_candidates<S: AsRef<str>>(labels: &[S]) -> Vec<String> {
    let mut candidates: Vec<String> = Vec::new();
    let mut concepts: Vec<Vec<String>> = Vec::new();
    let mut push = |candidate: String| {
        let readings = concept_readings(&candidate);
        if !readings.iter().any(|r| concepts.contains(r)) {
            concepts.extend(readings);
            candidates.push(candidate);
        }
    };
    for label in labels {
        let lower = label.as_ref().to_lowercase();
        let label = trim_wrapping(&lower).split_whitespace().collect::<Vec<_>>().join(" ");
        if label.is_empty() {
            continue;
        }
        let background = label
            .rsplit(' ')
            .next()
            .is_some_and(|last| BACKGROUND_WORDS.contains(&last))
            .then(|| format!("{label} background"));
        push(label);
        if let Some(variant) = background {
            push(variant);
        }
    }
    candidates
}

/// What a normalised candidate can mean, for duplicates: its alternatives as whole parts
/// (between " or "), sorted ("red circles or blue squares"); and, where words before the
/// first alternative or after the last one are shared by all of them, the alternatives as
/// single words between those words ("yellow or purple circle", "purple star or cross").
fn concept_readings(candidate: &str) -> Vec<Vec<String>> {
    let mut parts: Vec<String> = candidate.split(" or ").map(|a| a.trim().to_string()).collect();
    let mut readings = Vec::new();
    let words: Vec<Vec<&str>> = parts.iter().map(|p| p.split(' ').collect()).collect();
    if let [first, middle @ .., last] = words.as_slice() {
        let (prefix, first_word) = first.split_at(first.len() - 1);
        let (last_word, suffix) = last.split_at(1);
        let mut single: Vec<String> = std::iter::once(first_word.join(" "))
            .chain(middle.iter().map(|w| w.join(" ")))
            .chain(std::iter::once(last_word.join(" ")))
            .collect();
        single.sort_unstable();
        readings.push([vec![prefix.join(" ")], single, vec![suffix.join(" ")]].concat());
    }
    parts.sort_unstable();
    readings.push(parts);
    readings
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lower_cases_strips_and_deduplicates_in_order() {
        let labels = [
            "Red Circles.",
            "\"red circles\"",
            "  striped   fabric! ",
            "red circles",
            "'Dots'",
            "",
            " ... ",
        ];
        assert_eq!(normalize_candidates(&labels), ["red circles", "striped fabric", "dots"]);
    }

    #[test]
    fn alternatives_in_another_order_are_one_candidate() {
        let labels = [
            "yellow or purple",
            "Purple or yellow.",
            "purple striped square",
            "red or blue or green",
            "green or red or blue",
            "red or blue",
            "yellow or purple striped",
            "yellow or purple circle",
            "purple or yellow circle",
            "purple star or cross",
            "purple cross or star",
            "red circles or blue squares",
            "blue squares or red circles",
        ];
        assert_eq!(
            normalize_candidates(&labels),
            [
                "yellow or purple",
                "purple striped square",
                "red or blue or green",
                "red or blue",
                "yellow or purple striped",
                "yellow or purple circle",
                "purple star or cross",
                "red circles or blue squares",
            ]
        );
    }

    #[test]
    fn design_and_graphic_labels_get_a_background_variant() {
        let labels =
            ["Floral Designs", "geometric design.", "text graphics", "graphic novel", "design"];
        assert_eq!(
            normalize_candidates(&labels),
            [
                "floral designs",
                "floral designs background",
                "geometric design",
                "geometric design background",
                "text graphics",
                "text graphics background",
                "graphic novel",
                "design",
                "design background",
            ]
        );
    }

    #[test]
    fn a_variant_equal_to_a_later_label_appears_once() {
        let labels = ["floral design", "floral design background", "Floral design"];
        assert_eq!(normalize_candidates(&labels), ["floral design", "floral design background"]);
    }
}

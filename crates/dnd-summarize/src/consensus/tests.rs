use super::*;

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// Each pair's words count as one word.
fn assert_fold_together(pairs: &[(&str, &str)]) {
    for (a, b) in pairs {
        assert_eq!(fold(a), fold(b), "{a} / {b}");
    }
}

#[test]
fn simplify_keeps_every_content_word_phrase_by_phrase() {
    let cases = [
        ("a red circle on a blue background", "red circle, blue background"),
        ("there is a picture of two red circles and a green square", "red circles, green square"),
        ("a close up of a dog's nose", "dog nose"),
        ("an image of 3 striped zebras standing in the grass", "striped zebras standing grass"),
        (
            "A large red circle with small blue dots and green stripes",
            "large red circle small blue dots, green stripes",
        ),
        ("black-and-white checkerboard", "black-and-white checkerboard"),
        (
            "a picture of a yellow dotted star on a gray background with a checkerboard pattern",
            "yellow dotted star, gray background checkerboard pattern",
        ),
        ("a red square next to a blue circle, against green", "red square, blue circle, green"),
        (
            "a yellow striped background with a dotted orange cross, a pink cross with dots",
            "yellow striped background, dotted orange cross, pink cross dots",
        ),
        (
            "a white background with a pink square with stripes",
            "white background, pink square stripes",
        ),
        (
            "a blue background with stripes and a circle with a hole",
            "blue background stripes, circle hole",
        ),
    ];
    for (caption, expected) in cases {
        assert_eq!(simplify_caption(caption).as_deref(), Some(expected), "{caption}");
    }
    assert_eq!(simplify_caption("a picture of it"), None);
}

#[test]
fn summarize_prefers_the_largest_word_set_most_labels_share() {
    let labels = strings(&[
        "red circle, blue background",
        "red circles, green square",
        "red circle",
        "blue square",
        "red ring",
    ]);
    // "red" has support 4 and {red, circle} 3 of 5: the pair reaches half and is larger.
    assert_eq!(consensus_label(&labels).as_deref(), Some("red circle"));

    let stripes = strings(&[
        "black white stripes",
        "black white stripes zebra",
        "black white stripes shirt",
        "dots",
    ]);
    assert_eq!(consensus_label(&stripes).as_deref(), Some("black white stripes"));

    // "shape" says nothing: {white, stripes} in half of the labels beats {shape, stripes}
    // in more, and {stripes} beats {shape, stripes}.
    let shapes = strings(&[
        "white shape stripes",
        "white shape stripes, yellow background",
        "black shape stripes",
        "white star stripes",
        "white square",
        "gray triangle",
    ]);
    assert_eq!(consensus_label(&shapes).as_deref(), Some("white stripes"));
    let striped = strings(&["black shape stripes", "red shape stripes", "circle stripes"]);
    assert_eq!(consensus_label(&striped).as_deref(), Some("stripes"));

    let shared_word = strings(&["striped shirt", "striped tie", "polka dots"]);
    assert_eq!(consensus_label(&shared_word).as_deref(), Some("striped"));

    // Every caption names a background; most name a star, in no shared phrase.
    let stars = strings(&[
        "purple star, yellow background",
        "star, white background",
        "green star, cyan background",
        "gray background",
    ]);
    assert_eq!(consensus_label(&stars).as_deref(), Some("star"));
    assert_eq!(
        consensus_label(&strings(&["background", "backgrounds, patterns"])).as_deref(),
        Some("background")
    );
}

#[test]
fn words_of_one_phrase_count_together_in_any_order_and_inflection() {
    // The words the old five-word cut lost: the texture at the end of each caption.
    let checkerboard = strings(&[
        "yellow dotted star, gray background checkerboard pattern",
        "cyan striped ring, orange background checkerboard pattern",
        "gray checkerboard background",
        "brown star, cyan background checkerboard pattern",
    ]);
    assert_eq!(consensus_label(&checkerboard).as_deref(), Some("background checkerboard pattern"));

    // {orange, dotted} in every label, written in several orders and words.
    let orange_dots = strings(&[
        "small orange dotted square, gray background polka dots",
        "dotted orange ring, purple background noise",
        "orange star with dots, blue background",
        "green star, small orange dotted triangle",
        "orange dotted square",
    ]);
    assert_eq!(consensus_label(&orange_dots).as_deref(), Some("orange dotted"));

    // Words of different phrases are not a set: "red" and "background" never describe one thing.
    let split =
        strings(&["red square, green background", "blue circle, red background", "red star"]);
    assert_eq!(consensus_label(&split).as_deref(), Some("red"));

    assert_fold_together(&[
        ("stripes", "striped"),
        ("stripy", "stripe"),
        ("dotted", "dots"),
        ("noisy", "noise"),
        ("circles", "circle"),
    ]);
    assert_ne!(fold("dotted"), fold("striped"));
    assert_ne!(fold("red"), fold("reed"));
}

#[test]
fn labels_that_split_between_two_alternatives_give_an_or() {
    let labels = strings(&[
        "yellow dotted square, gray background",
        "purple dotted square, pink background",
        "yellow square, green background dots",
        "purple striped square, gray background",
        "yellow dotted square, black background",
        "purple square, blue background noise",
    ]);
    // The alternatives cover all six labels; half of them say "dotted square" in the
    // alternatives' phrase, which the label keeps.
    assert_eq!(consensus_label(&labels).as_deref(), Some("yellow or purple dotted square"));
    // Shapes the alternatives' phrases share stay in the label whichever word comes first.
    let stars = strings(&[
        "yellow star",
        "yellow star stripes",
        "green star stripes",
        "yellow star",
        "green star",
        "green star",
    ]);
    assert_eq!(consensus_label(&stars).as_deref(), Some("yellow or green star"));
    // Nothing that half of the labels share: the alternatives alone.
    let mixed = strings(&[
        "yellow square",
        "purple square",
        "yellow circle",
        "purple circle",
        "yellow star",
        "purple star",
    ]);
    assert_eq!(consensus_label(&mixed).as_deref(), Some("yellow or purple"));

    // Not alternatives: words named together, words in every label, words too rare.
    let shared = strings(&[
        "yellow purple square",
        "yellow square",
        "purple square",
        "yellow purple",
        "yellow square",
    ]);
    assert_eq!(consensus_label(&shared).as_deref(), Some("yellow square"));
    let red = strings(&[
        "red dotted square",
        "red striped square",
        "red square",
        "red dotted star",
        "red striped ring",
    ]);
    assert_eq!(consensus_label(&red).as_deref(), Some("red square"));
    // A larger set that half of the labels share wins over the alternatives.
    let larger = strings(&[
        "small yellow dotted square",
        "small purple dotted square",
        "small yellow dotted square",
        "small purple dotted square",
    ]);
    assert_eq!(consensus_label(&larger).as_deref(), Some("small dotted square"));
}

#[test]
fn summarize_reports_the_most_frequent_spelling_of_a_folded_phrase() {
    let labels = strings(&["red circles", "red circles", "red circle", "squares"]);
    assert_eq!(consensus_label(&labels).as_deref(), Some("red circles"));
    let boxes = strings(&["wooden boxes", "wooden box", "box"]);
    // "box" (support 3) and {wooden, box} (support 2 of 3) both reach half: larger wins.
    assert_eq!(consensus_label(&boxes).as_deref(), Some("wooden box"));
}

#[test]
fn between_equal_sets_the_one_said_least_of_other_things_wins() {
    // {white, triangle} and {white, stripes} are both in 6 of 10 labels, but stripes are
    // also said of a blue square and of backgrounds (9 labels), triangles only of white
    // things (6): the white triangle, not the alphabetically first.
    let labels = strings(&[
        "white triangle dots, purple background polka dots",
        "white triangle stripes, brown background dots",
        "white triangle stripes, white triangle stripes, red background dots",
        "white square, green background stripes",
        "white triangle stripes, purple background noise",
        "white circle polka dots, black background checks",
        "white triangle, black background",
        "white square polka dots, white triangle stripes, pink background grain",
        "white square stripes, purple background stripes",
        "blue square stripes, white ring stripes, black background stripes",
    ]);
    assert_eq!(consensus_label(&labels).as_deref(), Some("white triangle"));
}

#[test]
fn the_consensus_label_is_deterministic_without_a_majority_and_ignores_order() {
    let labels = strings(&["dog", "cat", "bird"]);
    // Support 1 each, one word each: the alphabetically first.
    assert_eq!(consensus_label(&labels).as_deref(), Some("bird"));

    let mut shuffled = strings(&[
        "two red circles and a green square",
        "red circle",
        "a red circle on a blue background",
        "blue square",
    ]);
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
    assert_eq!(
        (ex.step, ex.backend.as_str(), ex.model.as_str()),
        (Step::Simplify, "consensus", CONSENSUS_VERSION)
    );
    assert_eq!(ex.request, "a red circle on a blue background");
    assert_eq!(ex.label(), Some("red circle, blue background"));

    let ex = s.summarize(&strings(&["red circle", "red circles", "blue square"])).await.unwrap();
    assert_eq!(ex.request, "red circle\nred circles\nblue square");
    assert_eq!(ex.label(), Some("red circle"));

    // A summary reads the first half of what it is given, so the order matters.
    let labels = strings(&[
        "blue square",
        "blue square",
        "red circle",
        "red circle",
        "red circle",
        "green star",
    ]);
    assert_eq!(summary_window(labels.len()), 3);
    // Never fewer than three: one label of two would be half, and its whole phrase win.
    let few = strings(&["small red circle", "red circle", "red circles", "green square"]);
    assert_eq!(s.summarize(&few).await.unwrap().label(), Some("red circle"));
    assert_eq!(s.summarize(&labels).await.unwrap().label(), Some("blue square"));
    let mut reordered = labels.clone();
    reordered.rotate_left(2);
    assert_eq!(s.summarize(&reordered).await.unwrap().label(), Some("red circle"));
    assert_eq!(
        s.merge(&labels).await.unwrap().label(),
        Some("red circle"),
        "a merge reads every label"
    );
    assert_eq!(
        (summary_window(1), summary_window(2), summary_window(3), summary_window(10)),
        (1, 2, 3, 5)
    );

    let ex = s.simplify("there is a picture of it").await.unwrap();
    assert_eq!(ex.answer, Err(ReplyError::Empty));
    assert!(s.simplify("  ").await.unwrap_err().is_user_error());
    assert!(s.summarize(&[]).await.unwrap_err().is_user_error());
}

#[test]
fn texture_synonyms_count_as_one_word() {
    assert_fold_together(&[
        ("spots", "dots"),
        ("spotted", "dotted"),
        ("spotty", "dot"),
        ("checks", "checkerboard"),
        ("checkered", "checkerboard"),
        ("grainy", "noise"),
        ("grain", "noisy"),
    ]);
    assert_ne!(fold("stripes"), fold("dots"));
    // Spots, dots and spotted: four of five labels share {orange, dots}, written as the
    // labels write it most. Counted apart, no pair would reach half.
    let labels = strings(&[
        "orange square spots",
        "large orange circle dots",
        "orange cross dots",
        "orange ring spotted",
        "blue star stripes",
    ]);
    assert_eq!(consensus_label(&labels).as_deref(), Some("orange dots"));
}

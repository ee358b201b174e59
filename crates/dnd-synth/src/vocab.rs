//! The world's vocabulary: colours, shapes, fills and background textures, each with its
//! canonical name and the synonyms and plurals a description may use instead.
//!
//! The same tables drive the renderer (RGB values), the caption grammar (which words to
//! write) and the parser (which words to read), so a word the grammar writes is always a
//! word the parser reads back.
//!
//! Fills and textures share their pattern words: "striped" describes a striped object, and
//! a striped background when the context says "background". The lexicon therefore reads
//! "stripes", "dots" and "plain" as fills; [`Word::as_texture`] gives their background
//! reading. Only words that can describe nothing but a background ("checkered", "noisy")
//! are textures in the lexicon.

use std::collections::HashMap;
use std::sync::LazyLock;

use serde::{Deserialize, Serialize};

/// The dozen named colours of the world, with RGB values far apart from each other so that
/// a colour is unambiguous from its pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Colour {
    Red,
    Orange,
    Yellow,
    Green,
    Blue,
    Purple,
    Pink,
    Brown,
    Black,
    White,
    Gray,
    Cyan,
}

impl Colour {
    pub const ALL: [Colour; 12] = [
        Colour::Red,
        Colour::Orange,
        Colour::Yellow,
        Colour::Green,
        Colour::Blue,
        Colour::Purple,
        Colour::Pink,
        Colour::Brown,
        Colour::Black,
        Colour::White,
        Colour::Gray,
        Colour::Cyan,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Colour::Red => "red",
            Colour::Orange => "orange",
            Colour::Yellow => "yellow",
            Colour::Green => "green",
            Colour::Blue => "blue",
            Colour::Purple => "purple",
            Colour::Pink => "pink",
            Colour::Brown => "brown",
            Colour::Black => "black",
            Colour::White => "white",
            Colour::Gray => "gray",
            Colour::Cyan => "cyan",
        }
    }

    /// Other words for the colour; captions use them now and then.
    pub fn synonyms(self) -> &'static [&'static str] {
        match self {
            Colour::Red => &["scarlet", "crimson"],
            Colour::Purple => &["violet"],
            Colour::Gray => &["grey"],
            Colour::Cyan => &["aqua", "turquoise"],
            _ => &[],
        }
    }

    pub fn rgb(self) -> [u8; 3] {
        match self {
            Colour::Red => [220, 30, 30],
            Colour::Orange => [245, 135, 20],
            Colour::Yellow => [245, 225, 40],
            Colour::Green => [40, 170, 60],
            Colour::Blue => [40, 80, 220],
            Colour::Purple => [140, 50, 190],
            Colour::Pink => [245, 130, 190],
            Colour::Brown => [130, 80, 40],
            Colour::Black => [20, 20, 20],
            Colour::White => [240, 240, 240],
            Colour::Gray => [128, 128, 128],
            Colour::Cyan => [40, 210, 220],
        }
    }

    /// Black on light colours, white on dark ones: the colour of the stripes and dots drawn
    /// on this colour, so that patterns stay visible whatever the colour.
    pub fn contrast(self) -> Colour {
        let [r, g, b] = self.rgb().map(f32::from);
        let luma = 0.299 * r + 0.587 * g + 0.114 * b;
        if luma > 150.0 { Colour::Black } else { Colour::White }
    }
}

/// The shapes of the world's objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Shape {
    Circle,
    Square,
    Triangle,
    Star,
    Ring,
    Cross,
}

impl Shape {
    pub const ALL: [Shape; 6] =
        [Shape::Circle, Shape::Square, Shape::Triangle, Shape::Star, Shape::Ring, Shape::Cross];

    pub fn name(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
            Shape::Star => "star",
            Shape::Ring => "ring",
            Shape::Cross => "cross",
        }
    }

    pub fn plural(self) -> &'static str {
        match self {
            Shape::Circle => "circles",
            Shape::Square => "squares",
            Shape::Triangle => "triangles",
            Shape::Star => "stars",
            Shape::Ring => "rings",
            Shape::Cross => "crosses",
        }
    }

    /// Other nouns for the shape, as (singular, plural).
    pub fn synonyms(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Shape::Circle => &[("disc", "discs"), ("disk", "disks")],
            Shape::Ring => &[("donut", "donuts"), ("doughnut", "doughnuts")],
            Shape::Cross => &[("plus sign", "plus signs")],
            _ => &[],
        }
    }

    /// Further forms the parser accepts but captions never write.
    fn other_forms(self) -> &'static [&'static str] {
        match self {
            Shape::Cross => &["plus", "pluses"],
            _ => &[],
        }
    }
}

/// How an object's inside is painted: one colour, or with stripes or dots of its contrast
/// colour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fill {
    Solid,
    Striped,
    Dotted,
}

impl Fill {
    pub const ALL: [Fill; 3] = [Fill::Solid, Fill::Striped, Fill::Dotted];

    pub fn name(self) -> &'static str {
        match self {
            Fill::Solid => "solid",
            Fill::Striped => "striped",
            Fill::Dotted => "dotted",
        }
    }

    /// Adjectives for the fill, canonical first ("a striped circle").
    pub fn adjectives(self) -> &'static [&'static str] {
        match self {
            Fill::Solid => &["solid", "plain"],
            Fill::Striped => &["striped", "stripy"],
            Fill::Dotted => &["dotted", "spotted", "polka dot"],
        }
    }

    /// Nouns for the pattern, as in "a circle with stripes"; none for solid.
    pub fn nouns(self) -> &'static [&'static str] {
        match self {
            Fill::Solid => &[],
            Fill::Striped => &["stripes"],
            Fill::Dotted => &["dots", "spots", "polka dots"],
        }
    }

    /// Further forms the parser accepts but captions never write.
    fn other_forms(self) -> &'static [&'static str] {
        match self {
            Fill::Solid => &["filled", "uniform", "unpatterned"],
            Fill::Striped => &["stripe", "stripey", "streaky", "banded"],
            Fill::Dotted => &["dot", "spot", "spotty", "dotty", "polka dotted"],
        }
    }

    /// The same pattern on a background.
    pub fn as_texture(self) -> Texture {
        match self {
            Fill::Solid => Texture::Plain,
            Fill::Striped => Texture::Stripes,
            Fill::Dotted => Texture::Dots,
        }
    }
}

/// How the background is painted: its colour alone, or with a pattern in its contrast colour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Texture {
    Plain,
    Stripes,
    Dots,
    Checkerboard,
    Noise,
}

impl Texture {
    pub const ALL: [Texture; 5] =
        [Texture::Plain, Texture::Stripes, Texture::Dots, Texture::Checkerboard, Texture::Noise];

    pub fn name(self) -> &'static str {
        match self {
            Texture::Plain => "plain",
            Texture::Stripes => "stripes",
            Texture::Dots => "dots",
            Texture::Checkerboard => "checkerboard",
            Texture::Noise => "noise",
        }
    }

    /// Adjectives for a background with this texture, canonical first ("a noisy background").
    pub fn adjectives(self) -> &'static [&'static str] {
        match self {
            Texture::Plain => &["plain", "solid"],
            Texture::Stripes => Fill::Striped.adjectives(),
            Texture::Dots => Fill::Dotted.adjectives(),
            Texture::Checkerboard => &["checkerboard", "checkered", "chequered"],
            Texture::Noise => &["noisy", "grainy"],
        }
    }

    /// Noun phrases for the texture, as in "green with dots"; none for plain.
    pub fn nouns(self) -> &'static [&'static str] {
        match self {
            Texture::Plain => &[],
            Texture::Stripes => Fill::Striped.nouns(),
            Texture::Dots => Fill::Dotted.nouns(),
            Texture::Checkerboard => &["a checkerboard pattern", "checks"],
            Texture::Noise => &["noise", "grain"],
        }
    }

    /// Words that can only name this texture (the lexicon's texture entries).
    fn own_words(self) -> &'static [&'static str] {
        match self {
            Texture::Checkerboard => &[
                "checkerboard",
                "checkerboards",
                "checkered",
                "chequered",
                "checked",
                "checker",
                "checkers",
                "checks",
                "chessboard",
            ],
            Texture::Noise => &["noise", "noisy", "grainy", "grain", "grained"],
            Texture::Plain | Texture::Stripes | Texture::Dots => &[],
        }
    }

    /// The same pattern on an object, where the world has it.
    pub fn as_fill(self) -> Option<Fill> {
        match self {
            Texture::Plain => Some(Fill::Solid),
            Texture::Stripes => Some(Fill::Striped),
            Texture::Dots => Some(Fill::Dotted),
            Texture::Checkerboard | Texture::Noise => None,
        }
    }
}

/// A content word of the world, normalised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Word {
    Colour(Colour),
    Shape(Shape),
    Fill(Fill),
    Texture(Texture),
}

impl Word {
    /// The canonical spelling.
    pub fn name(self) -> &'static str {
        match self {
            Word::Colour(c) => c.name(),
            Word::Shape(s) => s.name(),
            Word::Fill(f) => f.name(),
            Word::Texture(t) => t.name(),
        }
    }

    /// The word's reading in a background context: pattern words become textures.
    pub fn as_texture(self) -> Option<Texture> {
        match self {
            Word::Fill(f) => Some(f.as_texture()),
            Word::Texture(t) => Some(t),
            Word::Colour(_) | Word::Shape(_) => None,
        }
    }
}

/// Lowercase, hyphens and underscores as spaces, single spaces: "Polka-Dot" -> "polka dot".
pub(crate) fn normalise(text: &str) -> String {
    text.to_lowercase().replace(['-', '_'], " ").split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Every surface form of every word, normalised. Built from the tables above so that the
/// grammar and the parser cannot drift apart.
fn lexicon_entries() -> Vec<(String, Word)> {
    let mut entries = Vec::new();
    let mut add = |form: &str, word: Word| entries.push((normalise(form), word));
    for c in Colour::ALL {
        add(c.name(), Word::Colour(c));
        c.synonyms().iter().for_each(|s| add(s, Word::Colour(c)));
    }
    for s in Shape::ALL {
        add(s.name(), Word::Shape(s));
        add(s.plural(), Word::Shape(s));
        for (singular, plural) in s.synonyms() {
            add(singular, Word::Shape(s));
            add(plural, Word::Shape(s));
        }
        s.other_forms().iter().for_each(|form| add(form, Word::Shape(s)));
    }
    for f in Fill::ALL {
        add(f.name(), Word::Fill(f));
        for form in f.adjectives().iter().chain(f.nouns()).chain(f.other_forms()) {
            add(form, Word::Fill(f));
        }
    }
    for t in Texture::ALL {
        t.own_words().iter().for_each(|w| add(w, Word::Texture(t)));
    }
    entries
}

static LEXICON: LazyLock<HashMap<String, Word>> =
    LazyLock::new(|| lexicon_entries().into_iter().collect());

/// Looks up an already normalised form, without the conveniences of [`canonical_word`].
pub(crate) fn lookup(normalised: &str) -> Option<Word> {
    LEXICON.get(normalised).copied()
}

/// The canonical word for any synonym, plural or spelling of a word of the world:
/// "Grey" -> gray, "squares" -> square, "polka-dot" -> dotted, "with stripes" -> striped.
/// Shape plurals not in the tables are found by dropping a final "s" or "es".
/// `None` for words outside the world's vocabulary.
pub fn canonical_word(text: &str) -> Option<Word> {
    let form = normalise(text);
    let form = form.strip_prefix("with ").unwrap_or(&form);
    if let Some(word) = lookup(form) {
        return Some(word);
    }
    let singular = [form.strip_suffix("es"), form.strip_suffix('s')];
    singular.into_iter().flatten().filter_map(lookup).find(|w| matches!(w, Word::Shape(_)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_form_maps_to_its_canonical_word() {
        for c in Colour::ALL {
            for form in std::iter::once(c.name()).chain(c.synonyms().iter().copied()) {
                assert_eq!(canonical_word(form), Some(Word::Colour(c)), "{form}");
            }
        }
        for s in Shape::ALL {
            let forms = [s.name(), s.plural()]
                .into_iter()
                .chain(s.synonyms().iter().flat_map(|(a, b)| [*a, *b]));
            for form in forms {
                assert_eq!(canonical_word(form), Some(Word::Shape(s)), "{form}");
            }
        }
        for f in Fill::ALL {
            for form in std::iter::once(f.name())
                .chain(f.adjectives().iter().copied())
                .chain(f.nouns().iter().copied())
            {
                assert_eq!(canonical_word(form), Some(Word::Fill(f)), "{form}");
            }
        }
        for t in Texture::ALL {
            let forms = [t.name()]
                .into_iter()
                .chain(t.adjectives().iter().copied())
                .chain(t.nouns().iter().copied());
            for form in forms {
                // Nouns such as "a checkerboard pattern" carry function words; their content word counts.
                let content =
                    form.strip_prefix("a ").map(|f| f.trim_end_matches(" pattern")).unwrap_or(form);
                assert_eq!(canonical_word(content).and_then(Word::as_texture), Some(t), "{form}");
            }
        }
    }

    #[test]
    fn spot_checks_of_synonyms_and_plurals() {
        let cases = [
            ("Grey", Word::Colour(Colour::Gray)),
            ("violet", Word::Colour(Colour::Purple)),
            ("squares", Word::Shape(Shape::Square)),
            ("stars", Word::Shape(Shape::Star)),
            ("crosses", Word::Shape(Shape::Cross)),
            ("plus", Word::Shape(Shape::Cross)),
            ("Discs", Word::Shape(Shape::Circle)),
            ("stripy", Word::Fill(Fill::Striped)),
            ("with stripes", Word::Fill(Fill::Striped)),
            ("spotted", Word::Fill(Fill::Dotted)),
            ("polka-dot", Word::Fill(Fill::Dotted)),
            ("checkered", Word::Texture(Texture::Checkerboard)),
            ("chequered", Word::Texture(Texture::Checkerboard)),
            ("noisy", Word::Texture(Texture::Noise)),
        ];
        for (form, word) in cases {
            assert_eq!(canonical_word(form), Some(word), "{form}");
        }
        for unknown in ["", "dog", "background", "bluish green", "s", "es"] {
            assert_eq!(canonical_word(unknown), None, "{unknown}");
        }
    }

    #[test]
    fn no_form_names_two_words() {
        let mut seen: HashMap<String, Word> = HashMap::new();
        for (form, word) in lexicon_entries() {
            if let Some(previous) = seen.insert(form.clone(), word) {
                assert_eq!(previous, word, "`{form}` is ambiguous");
            }
        }
    }

    #[test]
    fn colours_are_well_separated() {
        for (i, a) in Colour::ALL.iter().enumerate() {
            for b in &Colour::ALL[i + 1..] {
                let d: f32 = a
                    .rgb()
                    .iter()
                    .zip(b.rgb())
                    .map(|(&x, y)| (f32::from(x) - f32::from(y)).powi(2))
                    .sum::<f32>()
                    .sqrt();
                assert!(d >= 90.0, "{a:?} and {b:?} are only {d:.0} apart");
            }
            assert_ne!(a.contrast(), *a, "{a:?} must contrast with its pattern colour");
        }
    }
}

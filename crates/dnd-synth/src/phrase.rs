//! Reading descriptions: what objects and background a phrase or caption mentions.
//!
//! The reader is a small state machine over the world's words, robust to everything else:
//! unknown words, articles, sizes and fillers are skipped. Its rules, in order of the cases
//! they serve:
//! - modifiers (colour, pattern) gather until a shape noun, which closes an object
//!   ("a small red striped circle"); a second colour starts a new mention ("red, blue circles");
//! - "background" turns the gathered modifiers into the background ("a dotted green
//!   background"); so does "on"/"against" when no noun follows ("on green with dots");
//! - "with" followed by a pattern word attaches the pattern to what was just mentioned
//!   ("a red circle with stripes", "a green background with dots"); so does a pattern
//!   word right after "background" or a shape noun ("a purple background stripes", "ring
//!   stripes", as summaries word it);
//! - "and", "next to", punctuation and the like end a mention; modifiers without a noun
//!   still count ("red and striped" mentions red and striped things);
//! - "or" ends a mention too, but modifiers before it take the noun after it, as a bare
//!   adjective needs one ("purple or yellow circle": purple circles and yellow circles); a
//!   whole object before it keeps to itself ("black square or circle": a black square and
//!   a circle of any colour, the reading that does not guess);
//! - "two", "three", ... set how many objects a mention stands for.

use crate::vocab::{self, Colour, Fill, Shape, Texture, Word};

/// An object or objects a phrase mentions, with the attributes it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjectMention {
    pub colour: Option<Colour>,
    pub shape: Option<Shape>,
    pub fill: Option<Fill>,
    /// How many objects ("two red circles"); 1 unless a number says otherwise.
    pub count: usize,
}

/// A background a phrase mentions, with the attributes it names.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BackgroundMention {
    pub colour: Option<Colour>,
    pub texture: Option<Texture>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mention {
    Object(ObjectMention),
    Background(BackgroundMention),
}

/// Function words that steer the reader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cue {
    /// Ends a mention: "and", "next to", punctuation.
    Boundary,
    /// Ends a mention, except that bare modifiers before it wait for the noun of the
    /// next alternative: "or".
    Or,
    /// Introduces the background: "on", "against".
    On,
    /// Introduces a pattern of what was just mentioned: "with".
    With,
    /// "background": the gathered modifiers describe the background.
    BackgroundNoun,
    /// "shapes", "objects", "pattern": a noun naming no attribute.
    GenericNoun,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token {
    Word(Word),
    Cue(Cue),
    Count(usize),
    Other,
}

fn cue(form: &str) -> Option<Token> {
    let cue = match form {
        "or" => Cue::Or,
        "and" | "&" | "next to" | "beside" | "near" | "alongside" | "above" | "below" | "under"
        | "beneath" | "left of" | "right of" | "but" | "while" => Cue::Boundary,
        "on" | "against" | "over" | "upon" | "atop" | "in front of" | "on top of" => Cue::On,
        "with" | "having" | "featuring" => Cue::With,
        "background" | "backgrounds" | "backdrop" | "backdrops" => Cue::BackgroundNoun,
        "shape" | "shapes" | "object" | "objects" | "thing" | "things" | "item" | "items"
        | "figure" | "figures" | "pattern" | "patterns" | "texture" | "textures" => {
            Cue::GenericNoun
        }
        _ => return None,
    };
    Some(Token::Cue(cue))
}

fn count(form: &str) -> Option<Token> {
    let n = match form {
        "two" | "pair of" | "a pair of" => 2,
        "three" => 3,
        "four" => 4,
        "five" => 5,
        _ => return None,
    };
    Some(Token::Count(n))
}

/// The longest phrase the tokenizer tries to match ("in front of").
const MAX_PHRASE_WORDS: usize = 3;

/// Splits text into tokens, matching multi-word phrases ("polka dots", "next to") first.
fn tokenize(text: &str) -> Vec<Token> {
    // Pieces: words, or None for punctuation that ends a mention.
    let mut pieces: Vec<Option<String>> = Vec::new();
    let mut word = String::new();
    for ch in text.to_lowercase().chars() {
        if ch.is_alphanumeric() || ch == '\'' {
            word.push(ch);
            continue;
        }
        if !word.is_empty() {
            pieces.push(Some(std::mem::take(&mut word)));
        }
        if matches!(ch, ',' | ';' | '.' | ':' | '!' | '?' | '(' | ')' | '/' | '&' | '+') {
            pieces.push(None);
        }
    }
    if !word.is_empty() {
        pieces.push(Some(word));
    }

    let mut tokens = Vec::new();
    let mut i = 0;
    'pieces: while i < pieces.len() {
        for n in (1..=MAX_PHRASE_WORDS.min(pieces.len() - i)).rev() {
            let words: Option<Vec<&str>> = pieces[i..i + n].iter().map(|p| p.as_deref()).collect();
            let Some(words) = words else { continue };
            let form = words.join(" ");
            let token = vocab::lookup(&form)
                .map(Token::Word)
                .or_else(|| cue(&form))
                .or_else(|| count(&form));
            if let Some(token) = token {
                tokens.push(token);
                i += n;
                continue 'pieces;
            }
        }
        tokens.push(if pieces[i].is_none() { Token::Cue(Cue::Boundary) } else { Token::Other });
        i += 1;
    }
    tokens
}

/// Modifiers read but not yet attached to a noun.
#[derive(Debug, Default)]
struct Pending {
    colour: Option<Colour>,
    fill: Option<Fill>,
    texture: Option<Texture>,
    count: Option<usize>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.colour.is_none() && self.fill.is_none() && self.texture.is_none()
    }

    fn background(&self) -> BackgroundMention {
        BackgroundMention {
            colour: self.colour,
            texture: self.texture.or(self.fill.map(Fill::as_texture)),
        }
    }
}

#[derive(Default)]
struct Reader {
    mentions: Vec<Mention>,
    /// For each mention, the alternative it belongs to (how many "or"s came before it).
    alternatives: Vec<usize>,
    /// The alternative being read.
    alternative: usize,
    pending: Pending,
    /// After "on": modifiers without a noun describe the background.
    background_context: bool,
    /// Right after "with" or "background": a pattern word may attach to the last mention.
    pattern_may_attach: bool,
    /// Right after a shape noun: a pattern word next to it attaches to that object ("ring
    /// stripes"), but not one further on ("squares that are not solid").
    pattern_follows_shape: bool,
    /// Modifiers before "or" that wait for the noun of the next alternative, and their
    /// alternative.
    before_or: Option<(Pending, usize)>,
}

impl Reader {
    fn object(&mut self, shape: Option<Shape>) {
        let p = std::mem::take(&mut self.pending);
        if let Some((mut before, alternative)) = self.before_or.take() {
            before.fill = before.fill.or(p.fill);
            self.push_object(before, shape, alternative);
        }
        self.push_object(p, shape, self.alternative);
    }

    fn push(&mut self, mention: Mention, alternative: usize) {
        self.mentions.push(mention);
        self.alternatives.push(alternative);
    }

    fn push_object(&mut self, p: Pending, shape: Option<Shape>, alternative: usize) {
        if p.colour.is_some() || p.fill.is_some() || shape.is_some() {
            let count = p.count.unwrap_or(1);
            let object = ObjectMention { colour: p.colour, shape, fill: p.fill, count };
            self.push(Mention::Object(object), alternative);
        }
        if let Some(texture) = p.texture {
            // A texture word can only describe a background ("checkered circles").
            let background = BackgroundMention { colour: None, texture: Some(texture) };
            self.push(Mention::Background(background), alternative);
        }
    }

    fn background(&mut self) {
        if let Some((before, alternative)) = self.before_or.take() {
            self.push(Mention::Background(before.background()), alternative);
        }
        let p = std::mem::take(&mut self.pending);
        self.push(Mention::Background(p.background()), self.alternative);
    }

    /// Ends the pending mention, if any, as the context says.
    fn close(&mut self) {
        if self.pending.is_empty()
            && let Some((before, alternative)) = self.before_or.take()
        {
            // Modifiers before "or" that no noun followed ("striped or, ...").
            self.push_object(before, None, alternative);
            return;
        }
        if self.pending.is_empty() {
            self.pending = Pending::default();
        } else if self.background_context {
            self.background();
        } else {
            self.object(None);
        }
    }

    /// Attaches a pattern to the last mention, for "... with stripes"; false if it does not take one.
    fn attach(&mut self, word: Word) -> bool {
        match (self.mentions.last_mut(), word) {
            (Some(Mention::Object(o)), Word::Fill(f)) if o.fill.is_none() => o.fill = Some(f),
            (Some(Mention::Background(b)), _)
                if b.texture.is_none() && word.as_texture().is_some() =>
            {
                b.texture = word.as_texture()
            }
            _ => return false,
        }
        true
    }

    /// Reads `token`; `next` is the next token that is not filler, if any.
    fn read(&mut self, token: Token, next: Option<Token>) {
        let after_with = std::mem::take(&mut self.pattern_may_attach);
        let may_attach = after_with || std::mem::take(&mut self.pattern_follows_shape);
        match token {
            Token::Word(Word::Colour(c)) => {
                if self.pending.colour.is_some() {
                    self.close();
                }
                self.pending.colour = Some(c);
            }
            Token::Word(word @ (Word::Fill(_) | Word::Texture(_))) => {
                // "with a striped green triangle": the pattern starts an object instead.
                let object_follows =
                    matches!(next, Some(Token::Word(Word::Colour(_) | Word::Shape(_))));
                if may_attach && self.pending.is_empty() && !object_follows && self.attach(word) {
                    return;
                }
                let taken = match word {
                    Word::Fill(_) => self.pending.fill.is_some(),
                    _ => self.pending.texture.is_some(),
                };
                if taken {
                    self.close();
                }
                match word {
                    Word::Fill(f) => self.pending.fill = Some(f),
                    Word::Texture(t) => self.pending.texture = Some(t),
                    _ => {}
                }
            }
            Token::Word(Word::Shape(s)) => {
                self.object(Some(s));
                self.background_context = false;
                self.pattern_follows_shape = true;
            }
            Token::Cue(Cue::BackgroundNoun) => {
                self.background();
                self.background_context = false;
                self.pattern_may_attach = true;
            }
            Token::Cue(Cue::GenericNoun) => self.close(),
            Token::Cue(Cue::On) => {
                self.close();
                self.background_context = true;
            }
            Token::Cue(Cue::With) => self.pattern_may_attach = true,
            Token::Cue(Cue::Boundary) => {
                self.close();
                self.background_context = false;
            }
            Token::Cue(Cue::Or) => {
                if !self.pending.is_empty() && !self.background_context && self.before_or.is_none()
                {
                    self.before_or = Some((std::mem::take(&mut self.pending), self.alternative));
                } else {
                    self.close();
                }
                self.background_context = false;
                self.alternative += 1;
            }
            Token::Count(n) => self.pending.count = Some(n),
            // Articles and fillers between "with" and its pattern ("with a checkerboard pattern").
            Token::Other => self.pattern_may_attach = after_with,
        }
    }

    fn finish(mut self) -> Self {
        self.close();
        self
    }
}

fn read_text(text: &str) -> Reader {
    let mut reader = Reader::default();
    let tokens = tokenize(text);
    for (i, &token) in tokens.iter().enumerate() {
        let next = tokens[i + 1..].iter().copied().find(|t| *t != Token::Other);
        reader.read(token, next);
    }
    reader.finish()
}

/// The objects and backgrounds a text mentions, in order. Words outside the world's
/// vocabulary are skipped; a text without any gives no mention.
pub fn parse_mentions(text: &str) -> Vec<Mention> {
    read_text(text).mentions
}

/// The mentions of each alternative a text offers, split at "or" (one group for a text
/// without one): "purple or yellow circle" gives two groups, a purple circle and a yellow
/// circle; "a red circle and a square or a star" gives a red circle and a square, then a
/// star. A group may be empty when an alternative names nothing of the world.
pub fn parse_alternatives(text: &str) -> Vec<Vec<Mention>> {
    let reader = read_text(text);
    let mut groups: Vec<Vec<Mention>> = vec![Vec::new(); reader.alternative + 1];
    for (mention, alternative) in reader.mentions.into_iter().zip(reader.alternatives) {
        groups[alternative].push(mention);
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(
        colour: Option<Colour>,
        shape: Option<Shape>,
        fill: Option<Fill>,
        count: usize,
    ) -> Mention {
        Mention::Object(ObjectMention { colour, shape, fill, count })
    }

    fn background(colour: Option<Colour>, texture: Option<Texture>) -> Mention {
        Mention::Background(BackgroundMention { colour, texture })
    }

    #[test]
    fn reads_captions_and_labels() {
        use Colour::*;
        let red_striped_circle = object(Some(Red), Some(Shape::Circle), Some(Fill::Striped), 1);
        let cases = [
            (
                "a red striped circle and a small blue square on a dotted green background",
                vec![
                    red_striped_circle,
                    object(Some(Blue), Some(Shape::Square), None, 1),
                    background(Some(Green), Some(Texture::Dots)),
                ],
            ),
            (
                "a blue square next to a red circle with stripes, on green with dots",
                vec![
                    object(Some(Blue), Some(Shape::Square), None, 1),
                    red_striped_circle,
                    background(Some(Green), Some(Texture::Dots)),
                ],
            ),
            (
                "a chequered grey background with two polka-dot crosses",
                vec![
                    background(Some(Gray), Some(Texture::Checkerboard)),
                    object(None, Some(Shape::Cross), Some(Fill::Dotted), 2),
                ],
            ),
            (
                "on white with a checkerboard pattern",
                vec![background(Some(White), Some(Texture::Checkerboard))],
            ),
            (
                "One realistic image of green triangles",
                vec![object(Some(Green), Some(Shape::Triangle), None, 1)],
            ),
            ("dotted shapes", vec![object(None, None, Some(Fill::Dotted), 1)]),
            ("Red Circle.", vec![object(Some(Red), Some(Shape::Circle), None, 1)]),
            (
                "red, blue",
                vec![object(Some(Red), None, None, 1), object(Some(Blue), None, None, 1)],
            ),
            ("a plain background", vec![background(None, Some(Texture::Plain))]),
            ("purple background stripes", vec![background(Some(Purple), Some(Texture::Stripes))]),
            (
                "green ring stripes",
                vec![object(Some(Green), Some(Shape::Ring), Some(Fill::Striped), 1)],
            ),
            (
                "squares that are not solid",
                vec![
                    object(None, Some(Shape::Square), None, 1),
                    object(None, None, Some(Fill::Solid), 1),
                ],
            ),
            (
                "circle dots, striped square",
                vec![
                    object(None, Some(Shape::Circle), Some(Fill::Dotted), 1),
                    object(None, Some(Shape::Square), Some(Fill::Striped), 1),
                ],
            ),
            (
                "a circle dotted green triangle",
                vec![
                    object(None, Some(Shape::Circle), None, 1),
                    object(Some(Green), Some(Shape::Triangle), Some(Fill::Dotted), 1),
                ],
            ),
            (
                "a cyan background with a striped small green triangle",
                vec![
                    background(Some(Cyan), None),
                    object(Some(Green), Some(Shape::Triangle), Some(Fill::Striped), 1),
                ],
            ),
            (
                "a dotted background, striped",
                vec![
                    background(None, Some(Texture::Dots)),
                    object(None, None, Some(Fill::Striped), 1),
                ],
            ),
            (
                "purple or yellow circle",
                vec![
                    object(Some(Purple), Some(Shape::Circle), None, 1),
                    object(Some(Yellow), Some(Shape::Circle), None, 1),
                ],
            ),
            (
                "yellow or purple dotted square",
                vec![
                    object(Some(Yellow), Some(Shape::Square), Some(Fill::Dotted), 1),
                    object(Some(Purple), Some(Shape::Square), Some(Fill::Dotted), 1),
                ],
            ),
            (
                "black square or circle",
                vec![
                    object(Some(Black), Some(Shape::Square), None, 1),
                    object(None, Some(Shape::Circle), None, 1),
                ],
            ),
            (
                "a red circle or a blue square",
                vec![
                    object(Some(Red), Some(Shape::Circle), None, 1),
                    object(Some(Blue), Some(Shape::Square), None, 1),
                ],
            ),
            (
                "red or blue",
                vec![object(Some(Red), None, None, 1), object(Some(Blue), None, None, 1)],
            ),
            (
                "purple or yellow background",
                vec![background(Some(Purple), None), background(Some(Yellow), None)],
            ),
            ("the weather in spring", vec![]),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_mentions(text), expected, "{text}");
        }
    }

    #[test]
    fn alternatives_group_the_mentions_between_each_or() {
        use Colour::*;
        let circle = |c| object(Some(c), Some(Shape::Circle), None, 1);
        assert_eq!(
            parse_alternatives("purple or yellow circle"),
            vec![vec![circle(Purple)], vec![circle(Yellow)]]
        );
        assert_eq!(
            parse_alternatives("a red circle and a square or a star"),
            vec![
                vec![circle(Red), object(None, Some(Shape::Square), None, 1)],
                vec![object(None, Some(Shape::Star), None, 1)],
            ]
        );
        assert_eq!(parse_alternatives("red circles"), vec![vec![circle(Red)]]);
        assert_eq!(
            parse_alternatives("red or something"),
            vec![vec![object(Some(Red), None, None, 1)], vec![]]
        );
    }

    #[test]
    fn multi_word_phrases_win_over_their_parts() {
        assert_eq!(
            tokenize("polka dots in front of"),
            vec![Token::Word(Word::Fill(Fill::Dotted)), Token::Cue(Cue::On)]
        );
        assert_eq!(tokenize("plus signs"), vec![Token::Word(Word::Shape(Shape::Cross))]);
    }
}

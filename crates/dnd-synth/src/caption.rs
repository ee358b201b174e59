//! Captions from a small grammar: "a red striped circle and a small blue square on a dotted
//! green background", "a blue square next to a red circle with stripes, on green with dots".
//!
//! Word choice and order vary with the random generator; the words for an object are always
//! its own attributes, so [`crate::phrase::parse_mentions`] reads a caption back into the
//! scene. The grammar omits only the default attributes: an object without a fill word is
//! solid, a background without a texture word is plain.

use rand::Rng;
use rand::seq::SliceRandom;

use crate::error::SynthError;
use crate::mask::Rect;
use crate::render::Rendered;
use crate::scene::{Background, Object, Scene};
use crate::vocab::{Colour, Fill, Shape, Texture};

/// When an object or the background counts as visible in a crop.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VisibilityRule {
    /// An object is visible if this fraction of its visible pixels lies in the crop...
    pub min_object_fraction: f32,
    /// ... or if it covers this fraction of the crop (a large object cropped tightly) ...
    pub min_crop_fraction: f32,
    /// ... and in any case at least this many pixels lie in the crop.
    pub min_object_pixels: usize,
    /// The background is described if it covers this fraction of the crop.
    pub min_background_fraction: f32,
    /// A visible object's shape is named only if this fraction of its pixels lies in the
    /// crop; otherwise it is "a red striped shape". A crop inside an object shows its
    /// colour and fill but not its outline, and a caption naming the outline there teaches
    /// a captioner to guess it. 0 names every visible object's shape.
    pub min_shape_fraction: f32,
}

impl Default for VisibilityRule {
    fn default() -> Self {
        Self {
            min_object_fraction: 0.15,
            min_crop_fraction: 0.1,
            min_object_pixels: 12,
            min_background_fraction: 0.2,
            min_shape_fraction: 0.0,
        }
    }
}

/// What is visible in a crop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Visible {
    /// Indices into the scene's objects, in scene order.
    pub objects: Vec<usize>,
    pub background: bool,
    /// Those of `objects` too cut by the crop for their shape to show (see
    /// [`VisibilityRule::min_shape_fraction`]).
    pub shapeless: Vec<usize>,
}

impl Visible {
    /// Whether object `i`'s shape shows in the crop.
    pub fn shows_shape(&self, i: usize) -> bool {
        !self.shapeless.contains(&i)
    }
}

/// What of `scene` is visible in `rect` of its rendering. If nothing passes the rule, the
/// thing with most pixels in the crop counts as visible, so that every crop has a caption.
pub fn visible_in(
    scene: &Scene,
    rendered: &Rendered,
    rect: Rect,
    rule: &VisibilityRule,
) -> Result<Visible, SynthError> {
    if scene.objects.len() != rendered.object_masks.len() {
        return Err(SynthError::SceneMismatch {
            objects: scene.objects.len(),
            masks: rendered.object_masks.len(),
        });
    }
    rect.check(rendered.image.width(), rendered.image.height())?;
    let crop_area = rect.area() as f32;
    let in_crop: Vec<usize> = rendered.object_masks.iter().map(|m| m.count_in(rect)).collect();
    let objects: Vec<usize> = rendered
        .object_masks
        .iter()
        .zip(&in_crop)
        .enumerate()
        .filter(|&(_, (mask, &n))| {
            let share_of_object = n as f32 >= rule.min_object_fraction * mask.count() as f32;
            let share_of_crop = n as f32 >= rule.min_crop_fraction * crop_area;
            n >= rule.min_object_pixels && (share_of_object || share_of_crop)
        })
        .map(|(i, _)| i)
        .collect();
    let background_pixels = rendered.background_mask.count_in(rect);
    let background = background_pixels as f32 >= rule.min_background_fraction * crop_area;
    if objects.is_empty() && !background {
        // Fall back to the largest thing in the crop.
        let largest = in_crop
            .iter()
            .enumerate()
            .max_by_key(|&(_, &n)| n)
            .filter(|&(_, &n)| n > background_pixels);
        let objects: Vec<usize> = largest.map(|(i, _)| i).into_iter().collect();
        let shapeless = shapeless(&objects, rendered, &in_crop, rule);
        return Ok(Visible { background: objects.is_empty(), objects, shapeless });
    }
    let shapeless = shapeless(&objects, rendered, &in_crop, rule);
    Ok(Visible { objects, background, shapeless })
}

/// Of `objects`, those with less than `rule.min_shape_fraction` of their pixels in the crop.
fn shapeless(
    objects: &[usize],
    rendered: &Rendered,
    in_crop: &[usize],
    rule: &VisibilityRule,
) -> Vec<usize> {
    objects
        .iter()
        .copied()
        .filter(|&i| {
            (in_crop[i] as f32) < rule.min_shape_fraction * rendered.object_masks[i].count() as f32
        })
        .collect()
}

/// A caption of the whole scene.
pub fn caption<R: Rng + ?Sized>(scene: &Scene, rng: &mut R) -> String {
    let objects: Vec<(&Object, bool)> = scene.objects.iter().map(|o| (o, true)).collect();
    describe(&objects, Some(&scene.background), rng)
}

/// A caption of the crop `rect` of a rendered scene, naming only what is visible in it by
/// the default [`VisibilityRule`].
pub fn caption_visible<R: Rng + ?Sized>(
    scene: &Scene,
    rendered: &Rendered,
    rect: Rect,
    rng: &mut R,
) -> Result<String, SynthError> {
    let visible = visible_in(scene, rendered, rect, &VisibilityRule::default())?;
    Ok(caption_of(scene, &visible, rng))
}

/// A caption naming what `visible` says a crop of `scene` shows: its objects (their
/// shapes where they show) and the background.
pub fn caption_of<R: Rng + ?Sized>(scene: &Scene, visible: &Visible, rng: &mut R) -> String {
    let objects: Vec<(&Object, bool)> =
        visible.objects.iter().map(|&i| (&scene.objects[i], visible.shows_shape(i))).collect();
    describe(&objects, visible.background.then_some(&scene.background), rng)
}

/// Objects of equal attributes, described together ("two red circles"); `shape` is `None`
/// for objects whose shape does not show.
struct Group {
    colour: Colour,
    shape: Option<Shape>,
    fill: Fill,
    count: usize,
    size: f32,
}

fn groups(objects: &[(&Object, bool)]) -> Vec<Group> {
    let mut groups: Vec<Group> = Vec::new();
    for &(o, shows_shape) in objects {
        let shape = shows_shape.then_some(o.shape);
        match groups.iter_mut().find(|g| (g.colour, g.shape, g.fill) == (o.colour, shape, o.fill)) {
            Some(g) => g.count += 1,
            None => {
                groups.push(Group { colour: o.colour, shape, fill: o.fill, count: 1, size: o.size })
            }
        }
    }
    groups
}

/// The canonical word most of the time, a synonym now and then.
fn word<R: Rng + ?Sized>(
    rng: &mut R,
    canonical: &'static str,
    synonyms: &[&'static str],
) -> &'static str {
    if synonyms.is_empty() || rng.random_bool(0.75) {
        canonical
    } else {
        synonyms[rng.random_range(0..synonyms.len())]
    }
}

fn any<R: Rng + ?Sized>(rng: &mut R, words: &[&'static str]) -> &'static str {
    words[rng.random_range(0..words.len())]
}

fn colour_word<R: Rng + ?Sized>(rng: &mut R, colour: Colour) -> &'static str {
    word(rng, colour.name(), colour.synonyms())
}

fn shape_word<R: Rng + ?Sized>(rng: &mut R, shape: Shape, plural: bool) -> &'static str {
    let synonyms: Vec<&'static str> =
        shape.synonyms().iter().map(|&(s, p)| if plural { p } else { s }).collect();
    word(rng, if plural { shape.plural() } else { shape.name() }, &synonyms)
}

fn size_word(size: f32) -> Option<&'static str> {
    if size < 0.15 {
        Some("small")
    } else if size > 0.21 {
        Some("large")
    } else {
        None
    }
}

fn number_word(count: usize) -> &'static str {
    match count {
        2 => "two",
        3 => "three",
        4 => "four",
        _ => "five",
    }
}

/// Joins words, turning the article "a" into "an" before a vowel.
fn sentence(words: &[&str]) -> String {
    let mut out: Vec<&str> = Vec::with_capacity(words.len());
    for (i, &w) in words.iter().enumerate() {
        let before_vowel =
            words.get(i + 1).is_some_and(|next| next.starts_with(['a', 'e', 'i', 'o', 'u']));
        out.push(if w == "a" && before_vowel { "an" } else { w });
    }
    out.join(" ")
}

fn object_phrase<R: Rng + ?Sized>(group: &Group, rng: &mut R) -> String {
    let plural = group.count > 1;
    let mut words: Vec<&str> = vec![if plural { number_word(group.count) } else { "a" }];
    if let Some(size) = size_word(group.size).filter(|_| !plural && rng.random_bool(0.4)) {
        words.push(size);
    }
    let colour = colour_word(rng, group.colour);
    let shape = match group.shape {
        Some(shape) => shape_word(rng, shape, plural),
        None if plural => "shapes",
        None => "shape",
    };
    match group.fill {
        Fill::Solid => {
            if rng.random_bool(0.25) {
                words.push(any(rng, Fill::Solid.adjectives()));
            }
            words.extend([colour, shape]);
        }
        fill => {
            let adjective = word(rng, fill.adjectives()[0], &fill.adjectives()[1..]);
            match rng.random_range(0..3) {
                0 => words.extend([colour, adjective, shape]),
                1 => words.extend([adjective, colour, shape]),
                _ => words.extend([colour, shape, "with", any(rng, fill.nouns())]),
            }
        }
    }
    sentence(&words)
}

fn join_objects<R: Rng + ?Sized>(phrases: &[String], rng: &mut R) -> String {
    match phrases {
        [] => String::new(),
        [one] => one.clone(),
        [a, b] => format!("{a} {} {b}", any(rng, &["and", "and", "next to", "beside"])),
        [init @ .., last] => {
            format!("{}{} and {last}", init.join(", "), if rng.random_bool(0.5) { "," } else { "" })
        }
    }
}

/// "a dotted green background", or, if `with_noun`, also "a green background with dots".
fn background_noun_phrase<R: Rng + ?Sized>(
    background: &Background,
    with_noun: bool,
    rng: &mut R,
) -> String {
    let colour = colour_word(rng, background.colour);
    let texture = background.texture;
    if texture == Texture::Plain {
        let words: &[&str] = if rng.random_bool(0.3) {
            &["a", "plain", colour, "background"]
        } else {
            &["a", colour, "background"]
        };
        return sentence(words);
    }
    let adjective = word(rng, texture.adjectives()[0], &texture.adjectives()[1..]);
    match rng.random_range(0..if with_noun { 3 } else { 2 }) {
        0 => sentence(&["a", adjective, colour, "background"]),
        1 => sentence(&["a", colour, adjective, "background"]),
        _ => sentence(&["a", colour, "background", "with", any(rng, texture.nouns())]),
    }
}

/// The background after the objects: "on a dotted green background", "on green with dots".
fn background_after_objects<R: Rng + ?Sized>(background: &Background, rng: &mut R) -> String {
    let preposition = any(rng, &["on", "on", "against"]);
    if preposition == "on" && rng.random_bool(0.3) {
        let colour = colour_word(rng, background.colour);
        return match background.texture {
            Texture::Plain => format!("on {colour}"),
            texture => format!("on {colour} with {}", any(rng, texture.nouns())),
        };
    }
    format!("{preposition} {}", background_noun_phrase(background, true, rng))
}

/// A caption of some objects and, if given, the background.
fn describe<R: Rng + ?Sized>(
    objects: &[(&Object, bool)],
    background: Option<&Background>,
    rng: &mut R,
) -> String {
    let mut groups = groups(objects);
    groups.shuffle(rng);
    let phrases: Vec<String> = groups.iter().map(|g| object_phrase(g, rng)).collect();
    let objects = join_objects(&phrases, rng);
    match background {
        None => objects,
        Some(bg) if phrases.is_empty() => background_noun_phrase(bg, true, rng),
        // Background first; no "with" inside it, which would read "a ... with dots with a circle".
        Some(bg) if rng.random_bool(0.2) => {
            format!("{} with {objects}", background_noun_phrase(bg, false, rng))
        }
        Some(bg) => {
            let comma = if rng.random_bool(0.25) { "," } else { "" };
            format!("{objects}{comma} {}", background_after_objects(bg, rng))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    use super::*;
    use crate::phrase::{Mention, parse_mentions};
    use crate::render::render;
    use crate::scene::Point;

    type Attributes = (Colour, Shape, Fill);

    /// The objects and background a caption describes, with the grammar's defaults filled in.
    fn read_back(caption: &str) -> (Vec<Attributes>, Vec<(Option<Colour>, Texture)>) {
        let mut objects = Vec::new();
        let mut backgrounds = Vec::new();
        for mention in parse_mentions(caption) {
            match mention {
                Mention::Object(o) => {
                    let (Some(colour), Some(shape)) = (o.colour, o.shape) else {
                        panic!("incomplete object in `{caption}`: {o:?}")
                    };
                    objects.extend(std::iter::repeat_n(
                        (colour, shape, o.fill.unwrap_or(Fill::Solid)),
                        o.count,
                    ));
                }
                Mention::Background(b) => {
                    backgrounds.push((b.colour, b.texture.unwrap_or(Texture::Plain)))
                }
            }
        }
        objects.sort();
        (objects, backgrounds)
    }

    fn attributes<'a>(objects: impl IntoIterator<Item = &'a Object>) -> Vec<Attributes> {
        let mut attributes: Vec<Attributes> =
            objects.into_iter().map(|o| (o.colour, o.shape, o.fill)).collect();
        attributes.sort();
        attributes
    }

    #[test]
    fn captions_parse_back_to_their_scenes() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let mut forms = HashSet::new();
        for _ in 0..200 {
            let scene = Scene::sample(&mut rng);
            let caption = caption(&scene, &mut rng);
            let (objects, backgrounds) = read_back(&caption);
            assert_eq!(objects, attributes(&scene.objects), "`{caption}` for {scene:?}");
            assert_eq!(
                backgrounds,
                vec![(Some(scene.background.colour), scene.background.texture)],
                "`{caption}`"
            );
            forms.extend(
                ["with", "on", "against", "background", "next to", "an", ","]
                    .into_iter()
                    .filter(|w| caption.contains(w)),
            );
        }
        assert_eq!(forms.len(), 7, "the grammar's forms all occur: {forms:?}");
    }

    #[test]
    fn captions_vary_with_the_generator() {
        let scene = Scene::sample(&mut ChaCha8Rng::seed_from_u64(5));
        let captions: HashSet<String> =
            (0..20).map(|seed| caption(&scene, &mut ChaCha8Rng::seed_from_u64(seed))).collect();
        assert!(captions.len() >= 5, "{captions:?}");
        assert_eq!(
            caption(&scene, &mut ChaCha8Rng::seed_from_u64(1)),
            caption(&scene, &mut ChaCha8Rng::seed_from_u64(1))
        );
    }

    #[test]
    fn a_crop_caption_names_only_what_is_in_the_crop() {
        let object = |shape, colour, x| Object {
            shape,
            colour,
            fill: Fill::Solid,
            centre: Point { x, y: 0.5 },
            size: 0.15,
            rotation: 0.0,
        };
        let scene = Scene {
            background: Background::new(Colour::Green, Texture::Stripes),
            objects: vec![
                object(Shape::Circle, Colour::Red, 0.25),
                object(Shape::Square, Colour::Blue, 0.75),
            ],
        };
        let rendered = render(&scene, 100, 100);
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        for _ in 0..20 {
            let left =
                caption_visible(&scene, &rendered, Rect::new(0, 0, 50, 100), &mut rng).unwrap();
            assert_eq!(
                read_back(&left),
                (
                    vec![(Colour::Red, Shape::Circle, Fill::Solid)],
                    vec![(Some(Colour::Green), Texture::Stripes)]
                ),
                "{left}"
            );
            // Inside the circle only: no background to speak of.
            let inside =
                caption_visible(&scene, &rendered, Rect::new(20, 45, 10, 10), &mut rng).unwrap();
            assert_eq!(
                read_back(&inside),
                (vec![(Colour::Red, Shape::Circle, Fill::Solid)], vec![]),
                "{inside}"
            );
            // A corner with nothing but background.
            let corner =
                caption_visible(&scene, &rendered, Rect::new(0, 0, 20, 20), &mut rng).unwrap();
            assert_eq!(
                read_back(&corner),
                (vec![], vec![(Some(Colour::Green), Texture::Stripes)]),
                "{corner}"
            );
        }
        assert!(caption_visible(&scene, &rendered, Rect::new(90, 0, 20, 10), &mut rng).is_err());
    }

    #[test]
    fn an_object_cut_by_the_crop_is_named_without_its_shape() {
        let scene = Scene {
            background: Background::new(Colour::Green, Texture::Plain),
            objects: vec![Object {
                shape: Shape::Star,
                colour: Colour::Red,
                fill: Fill::Striped,
                centre: Point { x: 0.5, y: 0.5 },
                size: 0.2,
                rotation: 0.0,
            }],
        };
        let rendered = render(&scene, 100, 100);
        let rule = VisibilityRule { min_shape_fraction: 0.95, ..VisibilityRule::default() };
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let object = |caption: &str| {
            let objects: Vec<_> = parse_mentions(caption)
                .into_iter()
                .filter_map(|m| match m {
                    Mention::Object(o) => Some((o.colour, o.shape, o.fill)),
                    Mention::Background(_) => None,
                })
                .collect();
            assert_eq!(objects.len(), 1, "`{caption}`");
            objects[0]
        };
        for _ in 0..20 {
            // The whole star: named with its shape.
            let whole = visible_in(&scene, &rendered, Rect::new(20, 20, 60, 60), &rule).unwrap();
            assert!(whole.shows_shape(0));
            let text = caption_of(&scene, &whole, &mut rng);
            assert_eq!(object(&text), (Some(Colour::Red), Some(Shape::Star), Some(Fill::Striped)));
            // Its middle: colour and fill, no shape.
            let inside = visible_in(&scene, &rendered, Rect::new(40, 40, 20, 20), &rule).unwrap();
            assert_eq!(inside.shapeless, [0]);
            let text = caption_of(&scene, &inside, &mut rng);
            assert_eq!(object(&text), (Some(Colour::Red), None, Some(Fill::Striped)), "{text}");
            // By the default rule, as before: the shape is named anyway.
            let named = visible_in(
                &scene,
                &rendered,
                Rect::new(40, 40, 20, 20),
                &VisibilityRule::default(),
            );
            assert!(named.unwrap().shapeless.is_empty());
        }
    }

    #[test]
    fn random_crop_captions_parse_back_to_the_visible_objects() {
        let mut rng = ChaCha8Rng::seed_from_u64(12);
        for _ in 0..100 {
            let scene = Scene::sample(&mut rng);
            let rendered = render(&scene, 64, 64);
            let (w, h) = (rng.random_range(8..=64), rng.random_range(8..=64));
            let rect = Rect::new(rng.random_range(0..=64 - w), rng.random_range(0..=64 - h), w, h);
            let visible = visible_in(&scene, &rendered, rect, &VisibilityRule::default()).unwrap();
            let caption = caption_visible(&scene, &rendered, rect, &mut rng).unwrap();
            let (objects, backgrounds) = read_back(&caption);
            assert_eq!(
                objects,
                attributes(visible.objects.iter().map(|&i| &scene.objects[i])),
                "`{caption}` in {rect}"
            );
            assert_eq!(backgrounds.len(), usize::from(visible.background), "`{caption}` in {rect}");
            for &i in &visible.objects {
                assert!(rendered.object_masks[i].count_in(rect) > 0, "object {i} is not in {rect}");
            }
        }
    }
}

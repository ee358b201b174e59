//! Concepts of the world: what a neuron may detect, each with an exact mask per image.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::SynthError;
use crate::mask::Mask;
use crate::phrase::{Mention, parse_mentions};
use crate::render::Rendered;
use crate::scene::{Background, Object, Scene};
use crate::vocab::{Colour, Fill, Shape, Texture};

/// A concept: an attribute of objects, a background texture, or a colour+shape pair.
///
/// Colours, shapes, fills and pairs are about objects only: a green background is not a
/// "green" pixel region. Textures are about the background only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Concept {
    Colour(Colour),
    Shape(Shape),
    Fill(Fill),
    Texture(Texture),
    ColourShape(Colour, Shape),
}

/// Every concept of the world (the concept list of CLIP-Dissect-style baselines): colours,
/// shapes, fills, textures, then colour+shape pairs.
pub fn all_concepts() -> Vec<Concept> {
    let singles = Colour::ALL
        .into_iter()
        .map(Concept::Colour)
        .chain(Shape::ALL.into_iter().map(Concept::Shape))
        .chain(Fill::ALL.into_iter().map(Concept::Fill))
        .chain(Texture::ALL.into_iter().map(Concept::Texture));
    let pairs = Colour::ALL
        .into_iter()
        .flat_map(|c| Shape::ALL.into_iter().map(move |s| Concept::ColourShape(c, s)));
    singles.chain(pairs).collect()
}

impl Concept {
    /// The canonical phrase: "red", "circle", "striped", "checkerboard background",
    /// "green triangle". [`Concept::parse`] reads it back.
    pub fn phrase(&self) -> String {
        match self {
            Concept::Colour(c) => c.name().to_string(),
            Concept::Shape(s) => s.name().to_string(),
            Concept::Fill(f) => f.name().to_string(),
            // Adjective form, since the texture names "stripes"/"dots" would read as fills.
            Concept::Texture(t) => format!("{} background", t.adjectives()[0]),
            Concept::ColourShape(c, s) => format!("{} {}", c.name(), s.name()),
        }
    }

    /// The concepts a phrase names, in order and without repeats: "green triangles" ->
    /// \[green triangle\]; "a striped background" -> \[striped background\]; "dotted
    /// shapes" -> \[dotted\]; "red striped circles" -> \[red circle, striped\]. Synonyms, plurals, articles
    /// and unknown words are fine; a background colour names no concept; a phrase with no
    /// word of the world gives an empty list.
    pub fn parse(phrase: &str) -> Vec<Concept> {
        let mut concepts = Vec::new();
        for mention in parse_mentions(phrase) {
            let named = match mention {
                Mention::Object(o) => {
                    let object = match (o.colour, o.shape) {
                        (Some(c), Some(s)) => Some(Concept::ColourShape(c, s)),
                        (None, Some(s)) => Some(Concept::Shape(s)),
                        (Some(c), None) => Some(Concept::Colour(c)),
                        (None, None) => None,
                    };
                    [object, o.fill.map(Concept::Fill)]
                }
                Mention::Background(b) => [b.texture.map(Concept::Texture), None],
            };
            for concept in named.into_iter().flatten() {
                if !concepts.contains(&concept) {
                    concepts.push(concept);
                }
            }
        }
        concepts
    }

    /// Whether the concept describes the object (never for textures).
    pub fn describes(&self, object: &Object) -> bool {
        match *self {
            Concept::Colour(c) => object.colour == c,
            Concept::Shape(s) => object.shape == s,
            Concept::Fill(f) => object.fill == f,
            Concept::ColourShape(c, s) => object.colour == c && object.shape == s,
            Concept::Texture(_) => false,
        }
    }

    /// Whether the concept describes the background (only its texture).
    pub fn describes_background(&self, background: &Background) -> bool {
        matches!(*self, Concept::Texture(t) if background.texture == t)
    }

    /// The concept's exact mask in a rendered scene: the visible pixels of the objects it
    /// describes, or the visible background if it names the background's texture.
    /// `rendered` must be the rendering of `scene`.
    pub fn mask(&self, scene: &Scene, rendered: &Rendered) -> Result<Mask, SynthError> {
        if scene.objects.len() != rendered.object_masks.len() {
            return Err(SynthError::SceneMismatch {
                objects: scene.objects.len(),
                masks: rendered.object_masks.len(),
            });
        }
        let (width, height) = (rendered.image.width(), rendered.image.height());
        if self.describes_background(&scene.background) {
            return Ok(rendered.background_mask.clone());
        }
        let mut mask = Mask::empty(width, height);
        for (object, object_mask) in scene.objects.iter().zip(&rendered.object_masks) {
            if self.describes(object) {
                mask = mask.union(object_mask)?;
            }
        }
        Ok(mask)
    }
}

impl fmt::Display for Concept {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.phrase())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::render::render;
    use crate::scene::Point;

    #[test]
    fn every_concept_parses_back_from_its_phrase() {
        let all = all_concepts();
        assert_eq!(all.len(), 12 + 6 + 3 + 5 + 12 * 6);
        assert_eq!(all.iter().collect::<HashSet<_>>().len(), all.len());
        for concept in all {
            assert_eq!(Concept::parse(&concept.phrase()), vec![concept], "{}", concept.phrase());
        }
    }

    #[test]
    fn parses_labels_in_the_wild() {
        use Concept as C;
        let cases: &[(&str, &[Concept])] = &[
            ("green triangles", &[C::ColourShape(Colour::Green, Shape::Triangle)]),
            ("a striped background", &[C::Texture(Texture::Stripes)]),
            ("Red Circle.", &[C::ColourShape(Colour::Red, Shape::Circle)]),
            ("dotted shapes", &[C::Fill(Fill::Dotted)]),
            ("checkered background", &[C::Texture(Texture::Checkerboard)]),
            ("grey stars", &[C::ColourShape(Colour::Gray, Shape::Star)]),
            ("polka-dot discs", &[C::Shape(Shape::Circle), C::Fill(Fill::Dotted)]),
            ("things with stripes", &[C::Fill(Fill::Striped)]),
            (
                "red circles and blue squares",
                &[
                    C::ColourShape(Colour::Red, Shape::Circle),
                    C::ColourShape(Colour::Blue, Shape::Square),
                ],
            ),
            ("yellow objects", &[C::Colour(Colour::Yellow)]),
            ("a green background", &[]),
            ("dogs playing in a park", &[]),
        ];
        for (phrase, expected) in cases {
            assert_eq!(Concept::parse(phrase), expected.to_vec(), "{phrase}");
        }
    }

    #[test]
    fn masks_are_the_pixels_of_what_the_concept_describes() {
        let object = |shape, colour, fill, x| Object {
            shape,
            colour,
            fill,
            centre: Point { x, y: 0.5 },
            size: 0.15,
            rotation: 0.0,
        };
        let scene = Scene {
            background: Background::new(Colour::White, Texture::Dots),
            objects: vec![
                object(Shape::Circle, Colour::Red, Fill::Striped, 0.2),
                object(Shape::Square, Colour::Red, Fill::Solid, 0.5),
                object(Shape::Circle, Colour::Blue, Fill::Solid, 0.8),
            ],
        };
        let r = render(&scene, 128, 128);
        let m = |c: Concept| c.mask(&scene, &r).unwrap();
        let [circle, square, blue] = [0, 1, 2].map(|i| r.object_masks[i].clone());
        assert_eq!(m(Concept::Colour(Colour::Red)), circle.union(&square).unwrap());
        assert_eq!(m(Concept::Shape(Shape::Circle)), circle.union(&blue).unwrap());
        assert_eq!(m(Concept::ColourShape(Colour::Red, Shape::Circle)), circle);
        assert_eq!(m(Concept::Fill(Fill::Solid)), square.union(&blue).unwrap());
        assert_eq!(m(Concept::Texture(Texture::Dots)), r.background_mask);
        assert!(m(Concept::Texture(Texture::Stripes)).is_empty());
        assert!(
            m(Concept::Colour(Colour::White)).is_empty(),
            "a background colour is not a colour concept"
        );
        assert!(!circle.is_empty() && !square.is_empty() && !blue.is_empty());

        let other = render(&Scene { objects: vec![], ..scene.clone() }, 128, 128);
        assert!(matches!(
            Concept::Colour(Colour::Red).mask(&scene, &other),
            Err(SynthError::SceneMismatch { objects: 3, masks: 0 })
        ));
    }

    #[test]
    fn concepts_serialise_readably() {
        let json =
            serde_json::to_string(&Concept::ColourShape(Colour::Red, Shape::Circle)).unwrap();
        assert_eq!(json, r#"{"colour_shape":["red","circle"]}"#);
        assert_eq!(Concept::Texture(Texture::Noise).to_string(), "noisy background");
    }
}

//! Partial scenes: what a prompt asks for ("green triangles on a striped background"), and
//! sampling the scenes that satisfy it, with everything it leaves open drawn at random.

use rand::Rng;

use crate::geometry::BOUND;
use crate::phrase::{Mention, parse_mentions};
use crate::scene::{Background, MAX_OBJECTS, MAX_SIZE, MIN_SIZE, Object, Point, Scene};
use crate::vocab::{Colour, Fill, Shape, Texture};

/// Objects' centres stay at least this multiple of the sum of their sizes apart: below 1 so
/// that objects may overlap a little, high enough that none hides another.
const SEPARATION: f32 = 0.8;
/// Random positions tried before giving up on an optional object.
const PLACEMENT_TRIES: usize = 64;

/// An object a scene must contain; `None` attributes are drawn at random.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ObjectSpec {
    pub colour: Option<Colour>,
    pub shape: Option<Shape>,
    pub fill: Option<Fill>,
}

/// The background a scene must have; `None` attributes are drawn at random.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BackgroundSpec {
    pub colour: Option<Colour>,
    pub texture: Option<Texture>,
}

/// What a scene must contain. The default asks for nothing: any scene of the world.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SceneSpec {
    pub background: BackgroundSpec,
    /// Required objects; the first [`MAX_OBJECTS`] are honoured.
    pub objects: Vec<ObjectSpec>,
}

fn pick<T: Copy, R: Rng + ?Sized>(rng: &mut R, items: &[T]) -> T {
    items[rng.random_range(0..items.len())]
}

impl SceneSpec {
    /// The spec of mentioned things: each object mention requires `count` objects; background
    /// mentions merge, the first to name an attribute setting it.
    pub fn from_mentions(mentions: &[Mention]) -> Self {
        let mut spec = SceneSpec::default();
        for mention in mentions {
            match *mention {
                Mention::Object(o) => {
                    let object = ObjectSpec { colour: o.colour, shape: o.shape, fill: o.fill };
                    spec.objects.extend(std::iter::repeat_n(object, o.count));
                }
                Mention::Background(b) => {
                    spec.background.colour = spec.background.colour.or(b.colour);
                    spec.background.texture = spec.background.texture.or(b.texture);
                }
            }
        }
        spec
    }

    /// The spec of a text in the world's vocabulary; see [`parse_mentions`].
    pub fn from_text(text: &str) -> Self {
        Self::from_mentions(&parse_mentions(text))
    }

    /// True when the spec asks for nothing.
    pub fn is_empty(&self) -> bool {
        *self == SceneSpec::default()
    }

    /// A random scene satisfying the spec, with extra objects up to [`MAX_OBJECTS`]: more of
    /// the required objects (their open attributes drawn anew), or random ones when none is
    /// required.
    ///
    /// Required objects are drawn last, over the extras, so that they stay visible. Where the
    /// spec contradicts itself, the objects win: a background colour that a required object
    /// also has is redrawn, since the object would vanish into it.
    pub fn sample<R: Rng + ?Sized>(&self, rng: &mut R) -> Scene {
        let required = &self.objects[..self.objects.len().min(MAX_OBJECTS)];
        let required_colours: Vec<Colour> = required.iter().filter_map(|o| o.colour).collect();
        let background_colour = match self.background.colour {
            Some(c) if !required_colours.contains(&c) => c,
            _ => {
                let free: Vec<Colour> =
                    Colour::ALL.into_iter().filter(|c| !required_colours.contains(c)).collect();
                pick(rng, &free)
            }
        };
        let texture = self.background.texture.unwrap_or_else(|| pick(rng, &Texture::ALL));
        let background = Background::new(background_colour, texture);

        let total = rng.random_range(required.len().max(1)..=MAX_OBJECTS);
        let object_colours: Vec<Colour> =
            Colour::ALL.into_iter().filter(|&c| c != background_colour).collect();
        let mut attributes = |spec: &ObjectSpec| {
            (
                spec.shape.unwrap_or_else(|| pick(rng, &Shape::ALL)),
                spec.colour.unwrap_or_else(|| pick(rng, &object_colours)),
                spec.fill.unwrap_or_else(|| pick(rng, &Fill::ALL)),
            )
        };
        let required_attributes: Vec<_> = required.iter().map(&mut attributes).collect();
        // A prompt that names objects gets more of them, not random ones: a text-to-image
        // model asked for "red squares" draws red squares and nothing else.
        let extra = |i: usize| {
            if required.is_empty() { ObjectSpec::default() } else { required[i % required.len()] }
        };
        let extra_attributes: Vec<_> =
            (required.len()..total).map(|i| attributes(&extra(i))).collect();

        // Place the required objects first, so that they get room, but draw them last.
        let mut placed: Vec<Object> = Vec::new();
        for &(shape, colour, fill) in &required_attributes {
            let (centre, size) =
                place(rng, &placed, true).unwrap_or((Point { x: 0.5, y: 0.5 }, MIN_SIZE));
            placed.push(Object {
                shape,
                colour,
                fill,
                centre,
                size,
                rotation: rng.random_range(0.0..std::f32::consts::TAU),
            });
        }
        let mut extras = Vec::new();
        for &(shape, colour, fill) in &extra_attributes {
            let Some((centre, size)) = place(rng, &placed, false) else { continue };
            let object = Object {
                shape,
                colour,
                fill,
                centre,
                size,
                rotation: rng.random_range(0.0..std::f32::consts::TAU),
            };
            placed.push(object);
            extras.push(object);
        }
        let objects =
            extras.into_iter().chain(placed.into_iter().take(required_attributes.len())).collect();
        Scene { background, objects }
    }
}

/// A centre and size for a new object, far enough from the placed ones. A `required` object
/// shrinks to the minimum size after half the tries, and takes its last try if all fail.
fn place<R: Rng + ?Sized>(rng: &mut R, placed: &[Object], required: bool) -> Option<(Point, f32)> {
    let mut last = None;
    for attempt in 0..PLACEMENT_TRIES {
        let size = if required && attempt >= PLACEMENT_TRIES / 2 {
            MIN_SIZE
        } else {
            rng.random_range(MIN_SIZE..=MAX_SIZE)
        };
        // Keep the whole shape inside the image.
        let margin = BOUND * size;
        let centre = Point {
            x: rng.random_range(margin..=1.0 - margin),
            y: rng.random_range(margin..=1.0 - margin),
        };
        if placed.iter().all(|o| o.centre.distance(centre) >= SEPARATION * (o.size + size)) {
            return Some((centre, size));
        }
        last = Some((centre, size));
    }
    if required { last } else { None }
}

// A scene's own sampler is the unconstrained spec's; it lives here so that `scene` does
// not depend on `spec`.
impl Scene {
    /// A random scene: one to [`MAX_OBJECTS`] objects of random attributes, each in a colour
    /// other than the background's, placed so that none hides another (they may overlap a
    /// little).
    pub fn sample<R: Rng + ?Sized>(rng: &mut R) -> Scene {
        SceneSpec::default().sample(rng)
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    use super::*;

    #[test]
    fn sampled_scenes_satisfy_their_spec() {
        let spec = SceneSpec {
            background: BackgroundSpec {
                colour: Some(Colour::Green),
                texture: Some(Texture::Stripes),
            },
            objects: vec![
                ObjectSpec { colour: Some(Colour::Blue), shape: Some(Shape::Star), fill: None },
                ObjectSpec { colour: None, shape: None, fill: Some(Fill::Dotted) },
            ],
        };
        for seed in 0..100 {
            let scene = spec.sample(&mut ChaCha8Rng::seed_from_u64(seed));
            assert_eq!(scene.background, Background::new(Colour::Green, Texture::Stripes));
            assert!((2..=MAX_OBJECTS).contains(&scene.objects.len()));
            let n = scene.objects.len();
            // Required objects come last, in order.
            let (star, dotted) = (scene.objects[n - 2], scene.objects[n - 1]);
            assert_eq!((star.colour, star.shape), (Colour::Blue, Shape::Star));
            assert_eq!(dotted.fill, Fill::Dotted);
            assert!(scene.objects.iter().all(|o| o.colour != Colour::Green));
        }
    }

    #[test]
    fn objects_win_over_a_contradicting_background() {
        let spec = SceneSpec::from_text("red circles on a red background");
        for seed in 0..20 {
            let scene = spec.sample(&mut ChaCha8Rng::seed_from_u64(seed));
            assert_ne!(scene.background.colour, Colour::Red);
            assert!(
                scene.objects.iter().any(|o| o.colour == Colour::Red && o.shape == Shape::Circle)
            );
        }
    }

    #[test]
    fn specs_from_text() {
        let spec =
            SceneSpec::from_text("two red circles and a blue square on a striped background");
        assert_eq!(
            spec.background,
            BackgroundSpec { colour: None, texture: Some(Texture::Stripes) }
        );
        let red_circle =
            ObjectSpec { colour: Some(Colour::Red), shape: Some(Shape::Circle), fill: None };
        let blue_square =
            ObjectSpec { colour: Some(Colour::Blue), shape: Some(Shape::Square), fill: None };
        assert_eq!(spec.objects, vec![red_circle, red_circle, blue_square]);
        assert!(SceneSpec::from_text("a photograph of the sea").is_empty());
    }

    #[test]
    fn extra_objects_repeat_what_the_prompt_names() {
        let mut counts = std::collections::BTreeSet::new();
        for seed in 0..100 {
            let stars = SceneSpec::from_text("stars").sample(&mut ChaCha8Rng::seed_from_u64(seed));
            assert!(stars.objects.iter().all(|o| o.shape == Shape::Star), "seed {seed}: {stars:?}");
            counts.insert(stars.objects.len());
            let either = SceneSpec::from_text("yellow objects or purple objects")
                .sample(&mut ChaCha8Rng::seed_from_u64(seed));
            let colours: Vec<Colour> = either.objects.iter().map(|o| o.colour).collect();
            assert!(
                colours.contains(&Colour::Yellow) && colours.contains(&Colour::Purple),
                "seed {seed}: {either:?}"
            );
            assert!(
                colours.iter().all(|c| [Colour::Yellow, Colour::Purple].contains(c)),
                "seed {seed}: {either:?}"
            );
        }
        assert_eq!(counts.into_iter().collect::<Vec<_>>(), vec![1, 2, 3]);
        // Nothing named: any objects of the world.
        let shapes: std::collections::BTreeSet<Shape> = (0..100)
            .flat_map(|seed| {
                SceneSpec::from_text("a striped background")
                    .sample(&mut ChaCha8Rng::seed_from_u64(seed))
                    .objects
            })
            .map(|o| o.shape)
            .collect();
        assert_eq!(shapes.len(), Shape::ALL.len());
    }

    #[test]
    fn more_required_objects_than_fit_are_cut_to_the_maximum() {
        let spec = SceneSpec::from_text("five stars");
        let scene = spec.sample(&mut ChaCha8Rng::seed_from_u64(7));
        assert_eq!(scene.objects.len(), MAX_OBJECTS);
        assert!(scene.objects.iter().all(|o| o.shape == Shape::Star));
    }
}

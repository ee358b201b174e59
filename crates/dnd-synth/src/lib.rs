//! dnd-synth: the synthetic world, an offline ground truth for neuron descriptions.
//!
//! No pretrained weights can be downloaded everywhere dnd runs, and a description tool is
//! only as good as its labels; a world whose concepts are known pixel by pixel lets the
//! whole pipeline run offline and lets every change be scored against ground truth.
//!
//! - A [`Scene`] is a background (a colour and a texture: plain, stripes, dots,
//!   checkerboard, noise) and one to three objects, each with a shape, a colour (one of a
//!   dozen, far apart in RGB), a fill (solid, striped, dotted), a size, a position and a
//!   rotation. [`Scene::sample`] draws one from a seeded generator.
//! - [`render()`] draws a scene at any size and returns exact masks: per object its visible
//!   pixels, and the background's. [`Concept::mask`] gives the mask of every concept (a
//!   colour, shape, fill, texture, or colour+shape pair); [`Mask`]'s union, intersection
//!   and difference give the ground truth of OR, AND and AND-NOT neurons.
//! - [`caption()`] writes a caption from a small grammar with synonyms and word-order
//!   variation; [`caption_visible`] captions a crop from what is visible in it.
//! - [`Concept::parse`] and [`parse_mentions`] read phrases in the world's vocabulary
//!   (synonyms, plurals, articles and unknown words are fine), and [`canonical_word`]
//!   normalises a single word.
//! - [`TextRenderer`] is the world's text-to-image model: a [`dnd_models::Generator`] that
//!   renders varied scenes containing what the prompt names.
//! - [`planted`] is the zoo's ground truth: what each planted neuron of the trained target
//!   model detects (`planted.json`). Training the zoo is the `dnd-zoo` crate's.
//!
//! Everything is deterministic: same seed, same scene; same scene and size, same pixels.

/// Names this world's rules (vocabulary, sampling, rendering) in cache keys: bump it when
/// any of them changes what an image looks like.
pub const WORLD_VERSION: &str = "world-1";

pub mod caption;
pub mod concept;
pub mod error;
pub mod geometry;
pub mod mask;
mod pattern;
pub mod phrase;
pub mod planted;
pub mod probe_set;
pub mod quality;
pub mod render;
pub mod scene;
pub mod spec;
pub mod text_render;
pub mod vocab;

pub use caption::{VisibilityRule, Visible, caption, caption_of, caption_visible, visible_in};
pub use concept::{Concept, all_concepts};
pub use error::SynthError;
pub use mask::{Mask, Rect};
pub use phrase::{BackgroundMention, Mention, ObjectMention, parse_alternatives, parse_mentions};
pub use planted::{PlantedKind, PlantedNeuron, read_planted};
pub use probe_set::{ProbeSetSpec, read_scenes, write_probe_set};
pub use render::{Rendered, render};
pub use scene::{Background, MAX_OBJECTS, MAX_SIZE, MIN_SIZE, Object, Point, Scene};
pub use spec::{BackgroundSpec, ObjectSpec, SceneSpec};
pub use text_render::TextRenderer;
pub use vocab::{Colour, Fill, Shape, Texture, Word, canonical_word};

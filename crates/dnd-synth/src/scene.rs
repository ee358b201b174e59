//! Scenes: what an image of the world shows, as data. A scene is all the ground truth there
//! is; the renderer turns it into pixels and masks.

use serde::{Deserialize, Serialize};

use crate::vocab::{Colour, Fill, Shape, Texture};

/// Scenes hold one to this many objects.
pub const MAX_OBJECTS: usize = 3;
/// Range of object sizes sampled, as a fraction of the image's shorter side (the radius of a
/// circle; other shapes are scaled to a similar area).
pub const MIN_SIZE: f32 = 0.12;
pub const MAX_SIZE: f32 = 0.24;

/// A point in image coordinates scaled to 0..1 along each axis, y pointing down.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Point {
    pub x: f32,
    pub y: f32,
}

impl Point {
    pub fn distance(self, other: Point) -> f32 {
        ((self.x - other.x).powi(2) + (self.y - other.y).powi(2)).sqrt()
    }
}

/// The background: a colour, and a texture drawn in a tint of `texture_colour` (half-way
/// from `colour`, so that the background keeps reading as `colour`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Background {
    pub colour: Colour,
    pub texture: Texture,
    pub texture_colour: Colour,
}

impl Background {
    /// A background whose texture is drawn in the colour's contrast colour (black or white),
    /// as sampled scenes have it.
    pub fn new(colour: Colour, texture: Texture) -> Self {
        Self { colour, texture, texture_colour: colour.contrast() }
    }
}

/// One object of a scene.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Object {
    pub shape: Shape,
    pub colour: Colour,
    pub fill: Fill,
    pub centre: Point,
    /// Radius as a fraction of the image's shorter side.
    pub size: f32,
    /// Radians, clockwise on screen.
    pub rotation: f32,
}

/// A background and the objects on it; later objects are drawn over earlier ones.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scene {
    pub background: Background,
    pub objects: Vec<Object>,
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    use super::*;
    use crate::geometry::BOUND;
    use crate::render::render;

    #[test]
    fn sampled_scenes_are_varied_and_every_object_shows() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut counts = HashSet::new();
        let mut textures = HashSet::new();
        for _ in 0..200 {
            let scene = Scene::sample(&mut rng);
            counts.insert(scene.objects.len());
            textures.insert(scene.background.texture);
            assert!((1..=MAX_OBJECTS).contains(&scene.objects.len()));
            let rendered = render(&scene, 64, 64);
            for (i, o) in scene.objects.iter().enumerate() {
                assert_ne!(o.colour, scene.background.colour);
                assert!((MIN_SIZE..=MAX_SIZE).contains(&o.size));
                let margin = BOUND * o.size - 1e-4;
                assert!(
                    [o.centre.x, o.centre.y].iter().all(|v| (margin..=1.0 - margin).contains(v)),
                    "{o:?} leaves the image"
                );
                let alone = render(&Scene { objects: vec![*o], ..scene.clone() }, 64, 64)
                    .object_masks[0]
                    .count();
                let shown = rendered.object_masks[i].count();
                assert!(
                    shown * 2 >= alone,
                    "object {i} of {scene:?} shows {shown} of {alone} pixels"
                );
            }
        }
        assert_eq!(counts.len(), MAX_OBJECTS);
        assert_eq!(textures.len(), Texture::ALL.len());
    }

    #[test]
    fn sampling_is_deterministic_and_scenes_serialise() {
        let a = Scene::sample(&mut ChaCha8Rng::seed_from_u64(9));
        assert_eq!(a, Scene::sample(&mut ChaCha8Rng::seed_from_u64(9)));
        assert_ne!(a, Scene::sample(&mut ChaCha8Rng::seed_from_u64(10)));
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(serde_json::from_str::<Scene>(&json).unwrap(), a);
        assert!(json.contains(r#""background":{"colour":"#), "{json}");
    }
}

//! Rasterising scenes: pixels and, for the same price, exact masks.
//!
//! A pixel belongs to the topmost object whose shape contains the pixel's centre, else to
//! the background. There is no anti-aliasing, so every pixel shows exactly one thing and the
//! masks partition the image; an image looks the same at every size up to sampling.

use image::{Rgb, RgbImage};

use crate::geometry::{self, BOUND};
use crate::mask::Mask;
use crate::pattern::{fill_marks, texture_weight};
use crate::scene::{Background, Object, Scene};
use crate::vocab::{Colour, Fill, Shape};

/// A rendered scene: the image, and where each object and the background are visible.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    pub image: RgbImage,
    /// Per object of the scene, in its order: the pixels where it is visible (not hidden by
    /// a later object).
    pub object_masks: Vec<Mask>,
    /// The pixels where no object is.
    pub background_mask: Mask,
}

impl Rendered {
    /// Which object is visible at pixel (x, y); `None` for the background.
    pub fn object_at(&self, x: u32, y: u32) -> Option<usize> {
        self.object_masks.iter().position(|m| m.get(x, y))
    }
}

/// An object in pixel coordinates, ready for hit tests.
struct Placed {
    cx: f32,
    cy: f32,
    radius: f32,
    cos: f32,
    sin: f32,
    shape: Shape,
    fill: Fill,
    colour: Colour,
}

impl Placed {
    fn new(object: &Object, width: u32, height: u32) -> Self {
        let unit = width.min(height) as f32;
        Self {
            cx: object.centre.x * width as f32,
            cy: object.centre.y * height as f32,
            radius: object.size * unit,
            cos: object.rotation.cos(),
            sin: object.rotation.sin(),
            shape: object.shape,
            fill: object.fill,
            colour: object.colour,
        }
    }

    /// The object's frame coordinates of an image point, if the point is inside the shape.
    fn hit(&self, px: f32, py: f32) -> Option<(f32, f32)> {
        // NaN or non-positive sizes (from a hand-written scene) draw nothing.
        if self.radius.is_nan() || self.radius <= 0.0 {
            return None;
        }
        let (dx, dy) = (px - self.cx, py - self.cy);
        if dx * dx + dy * dy > (BOUND * self.radius).powi(2) {
            return None;
        }
        // Rotate by -rotation into the object's frame.
        let x = (dx * self.cos + dy * self.sin) / self.radius;
        let y = (-dx * self.sin + dy * self.cos) / self.radius;
        geometry::contains(self.shape, x, y).then_some((x, y))
    }

    fn colour_at(&self, x: f32, y: f32) -> [u8; 3] {
        if fill_marks(self.fill, x, y) { self.colour.contrast().rgb() } else { self.colour.rgb() }
    }
}

fn mix(a: [u8; 3], b: [u8; 3], t: f32) -> [u8; 3] {
    std::array::from_fn(|i| {
        (f32::from(a[i]) + (f32::from(b[i]) - f32::from(a[i])) * t).round() as u8
    })
}

fn background_colour_at(background: &Background, u: f32, v: f32) -> [u8; 3] {
    let t = texture_weight(background.texture, u, v);
    if t == 0.0 {
        background.colour.rgb()
    } else {
        mix(background.colour.rgb(), background.texture_colour.rgb(), t)
    }
}

/// Renders a scene at any size. Object positions scale with each side, sizes and pattern
/// scales with the shorter side, so shapes keep their proportions in non-square images.
/// A zero width or height gives an empty image.
pub fn render(scene: &Scene, width: u32, height: u32) -> Rendered {
    let placed: Vec<Placed> = scene.objects.iter().map(|o| Placed::new(o, width, height)).collect();
    let unit = width.min(height).max(1) as f32;
    let mut image = RgbImage::new(width, height);
    let mut object_masks = vec![Mask::empty(width, height); placed.len()];
    let mut background_mask = Mask::empty(width, height);
    for y in 0..height {
        for x in 0..width {
            let (px, py) = (x as f32 + 0.5, y as f32 + 0.5);
            let top = placed
                .iter()
                .enumerate()
                .rev()
                .find_map(|(i, p)| p.hit(px, py).map(|frame| (i, frame)));
            let rgb = match top {
                Some((i, (fx, fy))) => {
                    object_masks[i].set(x, y, true);
                    placed[i].colour_at(fx, fy)
                }
                None => {
                    background_mask.set(x, y, true);
                    background_colour_at(&scene.background, px / unit, py / unit)
                }
            };
            image.put_pixel(x, y, Rgb(rgb));
        }
    }
    Rendered { image, object_masks, background_mask }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    use super::*;
    use crate::scene::Point;
    use crate::vocab::Texture;

    fn object(shape: Shape, colour: Colour, fill: Fill, x: f32, y: f32, size: f32) -> Object {
        Object { shape, colour, fill, centre: Point { x, y }, size, rotation: 0.0 }
    }

    fn scene(background: Background, objects: Vec<Object>) -> Scene {
        Scene { background, objects }
    }

    #[test]
    fn a_circle_mask_has_the_circle_area_and_colour() {
        let s = scene(
            Background::new(Colour::White, Texture::Plain),
            vec![object(Shape::Circle, Colour::Red, Fill::Solid, 0.5, 0.5, 0.2)],
        );
        let r = render(&s, 224, 224);
        let expected = std::f32::consts::PI * (0.2f32 * 224.0).powi(2);
        let area = r.object_masks[0].count() as f32;
        assert!((area - expected).abs() / expected < 0.02, "area {area}, expected {expected}");
        for (x, y, p) in r.image.enumerate_pixels() {
            let expected =
                if r.object_masks[0].get(x, y) { Colour::Red.rgb() } else { Colour::White.rgb() };
            assert_eq!(p.0, expected, "pixel ({x}, {y})");
        }
    }

    #[test]
    fn every_shape_covers_its_exact_area() {
        for shape in Shape::ALL {
            let s = scene(
                Background::new(Colour::White, Texture::Plain),
                vec![Object {
                    rotation: 0.7,
                    ..object(shape, Colour::Blue, Fill::Solid, 0.5, 0.5, 0.3)
                }],
            );
            let area = render(&s, 300, 300).object_masks[0].count() as f32;
            let expected = geometry::area(shape) * (0.3f32 * 300.0).powi(2);
            assert!((area - expected).abs() / expected < 0.02, "{shape:?}: {area} vs {expected}");
        }
    }

    #[test]
    fn later_objects_hide_earlier_ones() {
        let bg = Background::new(Colour::White, Texture::Plain);
        let first = object(Shape::Square, Colour::Red, Fill::Solid, 0.4, 0.5, 0.2);
        let second = object(Shape::Circle, Colour::Blue, Fill::Solid, 0.6, 0.5, 0.2);
        let alone_first = render(&scene(bg, vec![first]), 128, 128).object_masks[0].count();
        let alone_second = render(&scene(bg, vec![second]), 128, 128).object_masks[0].count();
        let both = render(&scene(bg, vec![first, second]), 128, 128);
        let (a, b) = (&both.object_masks[0], &both.object_masks[1]);
        assert_eq!(b.count(), alone_second, "the top object keeps all its pixels");
        assert!(
            a.count() < alone_first && a.count() > alone_first / 2,
            "{} of {alone_first}",
            a.count()
        );
        assert!(a.intersection(b).unwrap().is_empty());
        assert_eq!(both.object_at(77, 64), Some(1));
        assert_eq!(both.object_at(0, 0), None);
    }

    #[test]
    fn masks_partition_the_image_and_rendering_is_deterministic() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for _ in 0..30 {
            let s = Scene::sample(&mut rng);
            let (w, h) = (64, 48);
            let r = render(&s, w, h);
            for y in 0..h {
                for x in 0..w {
                    let owners = r.object_masks.iter().filter(|m| m.get(x, y)).count()
                        + usize::from(r.background_mask.get(x, y));
                    assert_eq!(owners, 1, "pixel ({x}, {y}) of {s:?}");
                }
            }
            assert_eq!(render(&s, w, h), r);
        }
    }

    #[test]
    fn fills_and_textures_show_their_pattern_colour() {
        for (fill, texture) in [
            (Fill::Striped, Texture::Stripes),
            (Fill::Dotted, Texture::Dots),
            (Fill::Dotted, Texture::Checkerboard),
        ] {
            let s = scene(
                Background::new(Colour::Green, texture),
                vec![object(Shape::Square, Colour::Yellow, fill, 0.5, 0.5, 0.25)],
            );
            let r = render(&s, 96, 96);
            let colours_of = |mask: &Mask| -> HashSet<[u8; 3]> {
                r.image
                    .enumerate_pixels()
                    .filter(|(x, y, _)| mask.get(*x, *y))
                    .map(|(_, _, p)| p.0)
                    .collect()
            };
            let expected_object: HashSet<_> = [Colour::Yellow.rgb(), Colour::Black.rgb()].into();
            let half_white = mix(Colour::Green.rgb(), Colour::White.rgb(), 0.5);
            let expected_background: HashSet<_> = [Colour::Green.rgb(), half_white].into();
            assert_eq!(colours_of(&r.object_masks[0]), expected_object, "{fill:?}");
            assert_eq!(colours_of(&r.background_mask), expected_background, "{texture:?}");
        }
        let noisy = scene(Background::new(Colour::Blue, Texture::Noise), vec![]);
        let r = render(&noisy, 64, 64);
        let distinct: HashSet<[u8; 3]> = r.image.pixels().map(|p| p.0).collect();
        assert!(distinct.len() > 10, "noise gives many shades, got {}", distinct.len());
    }

    #[test]
    fn odd_sizes_and_degenerate_objects() {
        let s = scene(
            Background::new(Colour::Gray, Texture::Dots),
            vec![object(Shape::Star, Colour::Red, Fill::Solid, 0.5, 0.5, f32::NAN)],
        );
        let r = render(&s, 375, 200);
        assert!(r.object_masks[0].is_empty());
        assert_eq!(r.background_mask.count(), 375 * 200);
        let empty = render(&s, 0, 10);
        assert_eq!(empty.image.dimensions(), (0, 10));
    }
}

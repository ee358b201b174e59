//! The shapes as point sets in an object's own frame: centred on the origin, unrotated,
//! lengths in units of the object's size (a circle is the unit disc). Image y points down,
//! so the triangle and the star point up at negative y.

use std::f32::consts::{FRAC_PI_2, PI};
use std::fmt;
use std::sync::LazyLock;

use serde::{Deserialize, Serialize};

use crate::vocab::Shape;

/// Every shape lies within this distance of its centre, in units of the object's size.
pub const BOUND: f32 = 1.25;

// Proportions chosen so that the shapes look about equally large (areas 1.8 to 3.1).
const SQUARE_HALF_SIDE: f32 = 0.85;
const TRIANGLE_CIRCUMRADIUS: f32 = 1.25;
const STAR_OUTER: f32 = 1.2;
const STAR_INNER: f32 = 0.5;
const RING_INNER: f32 = 0.55;
const CROSS_HALF_WIDTH: f32 = 0.33;

/// Vertices of a polygon with `n` vertices at alternating radii, the first pointing up.
fn polygon(radii: &[f32], n: usize) -> Vec<(f32, f32)> {
    (0..n)
        .map(|i| {
            let angle = -FRAC_PI_2 + 2.0 * PI * i as f32 / n as f32;
            let r = radii[i % radii.len()];
            (r * angle.cos(), r * angle.sin())
        })
        .collect()
}

static TRIANGLE: LazyLock<Vec<(f32, f32)>> = LazyLock::new(|| polygon(&[TRIANGLE_CIRCUMRADIUS], 3));
static STAR: LazyLock<Vec<(f32, f32)>> = LazyLock::new(|| polygon(&[STAR_OUTER, STAR_INNER], 10));

/// Even-odd rule: a horizontal ray from the point crosses the boundary an odd number of times.
fn in_polygon(vertices: &[(f32, f32)], x: f32, y: f32) -> bool {
    let mut inside = false;
    let mut j = vertices.len() - 1;
    for (i, &(xi, yi)) in vertices.iter().enumerate() {
        let (xj, yj) = vertices[j];
        if (yi > y) != (yj > y) && x < (xj - xi) * (y - yi) / (yj - yi) + xi {
            inside = !inside;
        }
        j = i;
    }
    inside
}

/// Whether the point (x, y) of the object's frame is inside the shape.
pub fn contains(shape: Shape, x: f32, y: f32) -> bool {
    let r2 = x * x + y * y;
    match shape {
        Shape::Circle => r2 <= 1.0,
        Shape::Square => x.abs() <= SQUARE_HALF_SIDE && y.abs() <= SQUARE_HALF_SIDE,
        Shape::Triangle => in_polygon(&TRIANGLE, x, y),
        Shape::Star => in_polygon(&STAR, x, y),
        Shape::Ring => (RING_INNER * RING_INNER..=1.0).contains(&r2),
        Shape::Cross => {
            let (ax, ay) = (x.abs(), y.abs());
            (ax <= 1.0 && ay <= CROSS_HALF_WIDTH) || (ax <= CROSS_HALF_WIDTH && ay <= 1.0)
        }
    }
}

/// The exact area of the shape in the object's frame (size 1).
pub fn area(shape: Shape) -> f32 {
    match shape {
        Shape::Circle => PI,
        Shape::Square => (2.0 * SQUARE_HALF_SIDE).powi(2),
        Shape::Triangle => 3.0 * 3f32.sqrt() / 4.0 * TRIANGLE_CIRCUMRADIUS.powi(2),
        // Ten triangles (centre, outer vertex, inner vertex) with an angle of 36 degrees.
        Shape::Star => 10.0 * 0.5 * STAR_OUTER * STAR_INNER * (PI / 5.0).sin(),
        Shape::Ring => PI * (1.0 - RING_INNER * RING_INNER),
        Shape::Cross => 2.0 * (2.0 * 2.0 * CROSS_HALF_WIDTH) - (2.0 * CROSS_HALF_WIDTH).powi(2),
    }
}

/// A rectangle of pixels: columns `x..x + width`, rows `y..y + height`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Rect {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
}

impl Rect {
    pub fn new(x: u32, y: u32, width: u32, height: u32) -> Self {
        Self { x, y, width, height }
    }

    /// The whole of a `width` x `height` image.
    pub fn full(width: u32, height: u32) -> Self {
        Self::new(0, 0, width, height)
    }

    pub fn area(&self) -> usize {
        self.width as usize * self.height as usize
    }

    /// True when the rectangle is non-empty and lies inside a `width` x `height` image.
    pub fn fits(&self, width: u32, height: u32) -> bool {
        let right = u64::from(self.x) + u64::from(self.width);
        let bottom = u64::from(self.y) + u64::from(self.height);
        self.width > 0
            && self.height > 0
            && right <= u64::from(width)
            && bottom <= u64::from(height)
    }
}

impl fmt::Display for Rect {
    /// `WxH+X+Y`, as ImageMagick writes geometries.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}x{}+{}+{}", self.width, self.height, self.x, self.y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn areas_match_the_point_sets_and_shapes_stay_in_bounds() {
        let n = 800;
        let step = 2.0 * BOUND / n as f32;
        for shape in Shape::ALL {
            let mut inside = 0usize;
            for i in 0..n {
                for j in 0..n {
                    let x = -BOUND + (i as f32 + 0.5) * step;
                    let y = -BOUND + (j as f32 + 0.5) * step;
                    if contains(shape, x, y) {
                        inside += 1;
                        assert!(
                            x * x + y * y <= BOUND * BOUND + 1e-3,
                            "{shape:?} leaves its bound at ({x}, {y})"
                        );
                    }
                }
            }
            let measured = inside as f32 * step * step;
            let exact = area(shape);
            assert!(
                (measured - exact).abs() / exact < 0.01,
                "{shape:?}: measured {measured}, exact {exact}"
            );
            assert!((1.7..3.2).contains(&exact), "{shape:?} area {exact}");
        }
    }

    #[test]
    fn shapes_have_their_features() {
        assert!(contains(Shape::Circle, 0.0, 0.0) && !contains(Shape::Circle, 0.8, 0.8));
        assert!(!contains(Shape::Ring, 0.0, 0.0) && contains(Shape::Ring, 0.8, 0.0));
        assert!(contains(Shape::Square, 0.8, 0.8));
        assert!(contains(Shape::Cross, 0.9, 0.0) && !contains(Shape::Cross, 0.6, 0.6));
        assert!(contains(Shape::Triangle, 0.0, -1.1) && !contains(Shape::Triangle, 0.0, 0.7));
        assert!(contains(Shape::Star, 0.0, -1.1));
        assert!(contains(Shape::Star, 0.0, 0.0) && !contains(Shape::Star, 0.6, -0.6));
    }
}

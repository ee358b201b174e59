//! The stripes, dots, checks and noise of fills and backgrounds, as functions of position:
//! each says how much of the pattern colour a point gets (0 = base colour, 1 = pattern
//! colour). Positions are resolution-free, so a scene looks the same at 64 and at 375 pixels.

use crate::vocab::{Fill, Texture};

// Fill patterns, in the object's frame (units of the object's size, rotating with it).
const FILL_STRIPE_PERIOD: f32 = 0.55;
const FILL_STRIPE_DUTY: f32 = 0.45;
const FILL_DOT_SPACING: f32 = 0.6;
const FILL_DOT_RADIUS: f32 = 0.2;

// Background textures, in units of the image's shorter side.
const BG_STRIPE_PERIOD: f32 = 0.1;
/// Thin stripes keep the background reading as its base colour.
const BG_STRIPE_DUTY: f32 = 0.35;
const BG_DOT_SPACING: f32 = 0.1;
const BG_DOT_RADIUS: f32 = 0.028;
const BG_CHECK_SIZE: f32 = 0.125;
const BG_NOISE_CELL: f32 = 1.0 / 48.0;
/// Background patterns are drawn half-way towards the pattern colour, so that the
/// background still reads as its own colour and stays behind the objects.
const BG_PATTERN_STRENGTH: f32 = 0.5;
/// Noise moves each cell at most this far towards the pattern colour.
const BG_NOISE_STRENGTH: f32 = 0.6;

/// Whether a point of a lattice with the given spacing lies within `radius` of a lattice
/// node; the node sits at the origin.
fn near_lattice_node(x: f32, y: f32, spacing: f32, radius: f32) -> bool {
    let offset = |v: f32| ((v / spacing) + 0.5).rem_euclid(1.0) - 0.5;
    let (dx, dy) = (offset(x), offset(y));
    (dx * dx + dy * dy).sqrt() * spacing <= radius
}

/// Whether the point (x, y) of an object's frame is painted in the pattern colour.
pub(crate) fn fill_marks(fill: Fill, x: f32, y: f32) -> bool {
    match fill {
        Fill::Solid => false,
        Fill::Striped => (x / FILL_STRIPE_PERIOD).rem_euclid(1.0) < FILL_STRIPE_DUTY,
        Fill::Dotted => near_lattice_node(x, y, FILL_DOT_SPACING, FILL_DOT_RADIUS),
    }
}

/// A deterministic hash of a lattice cell to [0, 1) (splitmix64 finaliser).
fn cell_hash(a: i64, b: i64) -> f32 {
    let mut z = (a as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (b as u64).wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 40) as f32 / (1u64 << 24) as f32
}

/// How much pattern colour the background gets at (u, v), in units of the image's shorter
/// side: 0 or [`BG_PATTERN_STRENGTH`] for the geometric textures, a range for noise.
pub(crate) fn texture_weight(texture: Texture, u: f32, v: f32) -> f32 {
    let on = |b: bool| if b { BG_PATTERN_STRENGTH } else { 0.0 };
    match texture {
        Texture::Plain => 0.0,
        // Diagonal stripes, so that they cannot be mistaken for an object's edge.
        Texture::Stripes => on(((u + v) / (BG_STRIPE_PERIOD * std::f32::consts::SQRT_2))
            .rem_euclid(1.0)
            < BG_STRIPE_DUTY),
        Texture::Dots => on(near_lattice_node(u, v, BG_DOT_SPACING, BG_DOT_RADIUS)),
        Texture::Checkerboard => {
            let (cu, cv) = ((u / BG_CHECK_SIZE).floor() as i64, (v / BG_CHECK_SIZE).floor() as i64);
            on((cu + cv).rem_euclid(2) == 1)
        }
        Texture::Noise => {
            BG_NOISE_STRENGTH
                * cell_hash((u / BG_NOISE_CELL).floor() as i64, (v / BG_NOISE_CELL).floor() as i64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fraction of a grid of sample points for which `f` holds / its mean.
    fn mean(f: impl Fn(f32, f32) -> f32) -> f32 {
        let n = 400;
        let total: f32 = (0..n * n)
            .map(|i| f(((i % n) as f32 + 0.5) / n as f32, ((i / n) as f32 + 0.5) / n as f32))
            .sum();
        total / (n * n) as f32
    }

    #[test]
    fn patterns_cover_plausible_fractions() {
        let fill = |fill: Fill| {
            mean(|x, y| if fill_marks(fill, 3.0 * x - 1.5, 3.0 * y - 1.5) { 1.0 } else { 0.0 })
        };
        assert_eq!(fill(Fill::Solid), 0.0);
        assert!((fill(Fill::Striped) - FILL_STRIPE_DUTY).abs() < 0.05);
        assert!((0.2..0.5).contains(&fill(Fill::Dotted)), "{}", fill(Fill::Dotted));
        let texture = |t: Texture| mean(|u, v| texture_weight(t, u, v));
        assert_eq!(texture(Texture::Plain), 0.0);
        let s = BG_PATTERN_STRENGTH;
        assert!((texture(Texture::Stripes) - s * BG_STRIPE_DUTY).abs() < 0.05);
        assert!((0.1 * s..0.4 * s).contains(&texture(Texture::Dots)), "{}", texture(Texture::Dots));
        assert!((texture(Texture::Checkerboard) - s * 0.5).abs() < 0.05);
        assert!((texture(Texture::Noise) - BG_NOISE_STRENGTH / 2.0).abs() < 0.05);
    }
}

//! Pixel masks and rectangles: the exact ground truth of where things are.

use image::GrayImage;

use crate::error::SynthError;
pub use crate::geometry::Rect;

// Here rather than beside `Rect` in `geometry`, so that `geometry` does not depend on
// `error` (whose BadCrop names a Rect).
impl Rect {
    /// The rectangle, or why it does not fit a `width` x `height` image.
    pub(crate) fn check(&self, width: u32, height: u32) -> Result<(), SynthError> {
        if self.fits(width, height) {
            Ok(())
        } else {
            Err(SynthError::BadCrop { rect: *self, width, height })
        }
    }
}

/// A binary mask over an image, row-major: which pixels belong to something.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mask {
    width: u32,
    height: u32,
    bits: Vec<bool>,
}

impl Mask {
    /// A mask with no pixel set.
    pub fn empty(width: u32, height: u32) -> Self {
        Self { width, height, bits: vec![false; width as usize * height as usize] }
    }

    /// A mask with every pixel set.
    pub fn full(width: u32, height: u32) -> Self {
        Self { width, height, bits: vec![true; width as usize * height as usize] }
    }

    pub fn width(&self) -> u32 {
        self.width
    }

    pub fn height(&self) -> u32 {
        self.height
    }

    fn index(&self, x: u32, y: u32) -> Option<usize> {
        (x < self.width && y < self.height).then(|| y as usize * self.width as usize + x as usize)
    }

    /// Whether pixel (x, y) is set; false outside the mask.
    pub fn get(&self, x: u32, y: u32) -> bool {
        self.index(x, y).is_some_and(|i| self.bits[i])
    }

    /// Sets pixel (x, y); does nothing outside the mask.
    pub fn set(&mut self, x: u32, y: u32, value: bool) {
        if let Some(i) = self.index(x, y) {
            self.bits[i] = value;
        }
    }

    /// The pixels, row-major.
    pub fn as_slice(&self) -> &[bool] {
        &self.bits
    }

    /// Number of set pixels.
    pub fn count(&self) -> usize {
        self.bits.iter().filter(|&&b| b).count()
    }

    pub fn is_empty(&self) -> bool {
        !self.bits.iter().any(|&b| b)
    }

    /// The smallest rectangle holding every set pixel; `None` for an empty mask.
    pub fn bounds(&self) -> Option<Rect> {
        let w = self.width as usize;
        let (mut x0, mut y0, mut x1, mut y1) = (usize::MAX, usize::MAX, 0, 0);
        for (i, _) in self.bits.iter().enumerate().filter(|(_, b)| **b) {
            let (x, y) = (i % w, i / w);
            (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x), y1.max(y));
        }
        (x0 != usize::MAX)
            .then(|| Rect::new(x0 as u32, y0 as u32, (x1 - x0 + 1) as u32, (y1 - y0 + 1) as u32))
    }

    /// Number of set pixels inside `rect`; the part of `rect` outside the mask counts nothing.
    pub fn count_in(&self, rect: Rect) -> usize {
        let right = rect.x.saturating_add(rect.width).min(self.width);
        let bottom = rect.y.saturating_add(rect.height).min(self.height);
        (rect.y.min(bottom)..bottom)
            .map(|y| {
                let row = y as usize * self.width as usize;
                self.bits[row + rect.x.min(right) as usize..row + right as usize]
                    .iter()
                    .filter(|&&b| b)
                    .count()
            })
            .sum()
    }

    /// The part of the mask inside `rect`, as a mask of `rect`'s size.
    pub fn crop(&self, rect: Rect) -> Result<Mask, SynthError> {
        rect.check(self.width, self.height)?;
        let mut out = Mask::empty(rect.width, rect.height);
        for y in 0..rect.height {
            for x in 0..rect.width {
                out.set(x, y, self.get(rect.x + x, rect.y + y));
            }
        }
        Ok(out)
    }

    fn combine(&self, other: &Mask, op: impl Fn(bool, bool) -> bool) -> Result<Mask, SynthError> {
        if (self.width, self.height) != (other.width, other.height) {
            return Err(SynthError::MaskSizeMismatch {
                left_width: self.width,
                left_height: self.height,
                right_width: other.width,
                right_height: other.height,
            });
        }
        let bits = self.bits.iter().zip(&other.bits).map(|(&a, &b)| op(a, b)).collect();
        Ok(Mask { width: self.width, height: self.height, bits })
    }

    /// Pixels in either mask (an OR neuron's ground truth).
    pub fn union(&self, other: &Mask) -> Result<Mask, SynthError> {
        self.combine(other, |a, b| a || b)
    }

    /// Pixels in both masks (an AND neuron's ground truth).
    pub fn intersection(&self, other: &Mask) -> Result<Mask, SynthError> {
        self.combine(other, |a, b| a && b)
    }

    /// Pixels in this mask and not in `other` (an AND-NOT neuron's ground truth).
    pub fn difference(&self, other: &Mask) -> Result<Mask, SynthError> {
        self.combine(other, |a, b| a && !b)
    }

    /// Intersection over union; 0 when both masks are empty.
    pub fn iou(&self, other: &Mask) -> Result<f32, SynthError> {
        let union = self.union(other)?.count();
        let inter = self.intersection(other)?.count();
        Ok(if union == 0 { 0.0 } else { inter as f32 / union as f32 })
    }

    /// The mask as an image: 255 where set, 0 elsewhere.
    pub fn to_image(&self) -> GrayImage {
        GrayImage::from_fn(self.width, self.height, |x, y| {
            image::Luma([if self.get(x, y) { 255 } else { 0 }])
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from_rows(rows: &[&str]) -> Mask {
        let mut m = Mask::empty(rows[0].len() as u32, rows.len() as u32);
        for (y, row) in rows.iter().enumerate() {
            for (x, c) in row.chars().enumerate() {
                m.set(x as u32, y as u32, c == '#');
            }
        }
        m
    }

    #[test]
    fn set_operations() {
        let a = from_rows(&["##..", "##.."]);
        let b = from_rows(&[".##.", ".##."]);
        assert_eq!(a.union(&b).unwrap(), from_rows(&["###.", "###."]));
        assert_eq!(a.intersection(&b).unwrap(), from_rows(&[".#..", ".#.."]));
        assert_eq!(a.difference(&b).unwrap(), from_rows(&["#...", "#..."]));
        assert!((a.iou(&b).unwrap() - 2.0 / 6.0).abs() < 1e-6);
        assert_eq!(Mask::empty(4, 2).iou(&Mask::empty(4, 2)).unwrap(), 0.0);
    }

    #[test]
    fn combining_masks_of_different_sizes_is_an_error() {
        let err = Mask::empty(4, 2).union(&Mask::empty(2, 4)).unwrap_err();
        assert!(matches!(err, SynthError::MaskSizeMismatch { left_width: 4, right_width: 2, .. }));
    }

    #[test]
    fn counting_and_cropping() {
        let m = from_rows(&["#..#", ".##.", "#..#"]);
        assert_eq!(m.count(), 6);
        assert_eq!(m.count_in(Rect::new(1, 0, 2, 3)), 2);
        assert_eq!(
            m.count_in(Rect::new(3, 2, 10, 10)),
            1,
            "the part outside the mask counts nothing"
        );
        assert_eq!(m.crop(Rect::new(1, 1, 3, 2)).unwrap(), from_rows(&["##.", "..#"]));
        assert!(m.crop(Rect::new(2, 0, 3, 1)).is_err());
        assert!(m.crop(Rect::new(0, 0, 0, 1)).is_err());
        assert!(!m.get(4, 0) && m.get(3, 0));
        assert_eq!(m.to_image().get_pixel(3, 0).0, [255]);
    }

    #[test]
    fn bounds_hold_every_set_pixel() {
        assert_eq!(from_rows(&["....", ".#..", "..#."]).bounds(), Some(Rect::new(1, 1, 2, 2)));
        assert_eq!(from_rows(&["#..#"]).bounds(), Some(Rect::new(0, 0, 4, 1)));
        assert_eq!(Mask::empty(3, 3).bounds(), None);
    }
}

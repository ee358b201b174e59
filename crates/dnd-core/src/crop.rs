//! Attention cropping (method stage 1), as pure functions on activation maps.
//!
//! A neuron's spatial activation map is upsampled to the crop canvas, turned into an
//! 8-bit heatmap, thresholded with Otsu's method; every outer contour of the mask gives a
//! bounding box; boxes are kept largest first while they overlap neither each other nor
//! the whole image too much.

use serde::{Deserialize, Serialize};

use crate::error::CoreError;

/// Parameters of attention cropping; defaults are the method's numbers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CropConfig {
    /// Side of the square canvas the image is resized to before the model sees it, and
    /// the size every crop is resized back to.
    pub canvas_size: u32,
    /// At most this many crops per image.
    pub max_crops: usize,
    /// A box is dropped when its IoU with a box already kept exceeds this.
    pub max_iou_between_crops: f32,
    /// A box is dropped when its IoU with the whole image reaches this (it is not a crop).
    pub max_iou_with_image: f32,
}

impl Default for CropConfig {
    fn default() -> Self {
        Self { canvas_size: 375, max_crops: 4, max_iou_between_crops: 0.5, max_iou_with_image: 0.8 }
    }
}

impl CropConfig {
    pub fn validate(&self) -> Result<(), CoreError> {
        if self.canvas_size < 16 {
            return Err(CoreError::invalid("crop.canvas_size", "must be at least 16 pixels"));
        }
        for (field, v) in [
            ("crop.max_iou_between_crops", self.max_iou_between_crops),
            ("crop.max_iou_with_image", self.max_iou_with_image),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(CoreError::invalid(field, "must be between 0 and 1"));
            }
        }
        Ok(())
    }
}

/// An axis-aligned box in pixel coordinates, `x0..x1` by `y0..y1` (end exclusive).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BoundingBox {
    pub x0: u32,
    pub y0: u32,
    pub x1: u32,
    pub y1: u32,
}

impl BoundingBox {
    pub fn width(&self) -> u32 {
        self.x1 - self.x0
    }
    pub fn height(&self) -> u32 {
        self.y1 - self.y0
    }
    pub fn area(&self) -> u64 {
        u64::from(self.width()) * u64::from(self.height())
    }
    pub fn iou(&self, other: &BoundingBox) -> f32 {
        let ix = self.x1.min(other.x1).saturating_sub(self.x0.max(other.x0));
        let iy = self.y1.min(other.y1).saturating_sub(self.y0.max(other.y0));
        let inter = u64::from(ix) * u64::from(iy);
        let union = self.area() + other.area() - inter;
        if union == 0 { 0.0 } else { inter as f32 / union as f32 }
    }
}

/// A dense row-major 2-D map of `f32` (an activation map of one neuron).
#[derive(Debug, Clone, PartialEq)]
pub struct Map2 {
    pub width: usize,
    pub height: usize,
    pub data: Vec<f32>,
}

impl Map2 {
    pub fn new(width: usize, height: usize, data: Vec<f32>) -> Result<Self, CoreError> {
        if width == 0 || height == 0 || data.len() != width * height {
            return Err(CoreError::Shape(format!(
                "a {width}x{height} map needs {} values, got {}",
                width * height,
                data.len()
            )));
        }
        Ok(Self { width, height, data })
    }

    /// Bilinear resize with half-pixel centres (OpenCV's `INTER_LINEAR`, PyTorch's
    /// `align_corners=False`), so heatmaps line up with the reference implementation.
    pub fn resize_bilinear(&self, width: usize, height: usize) -> Map2 {
        let taps_x = linear_taps(self.width, width);
        let taps_y = linear_taps(self.height, height);
        let mut out = Vec::with_capacity(width * height);
        for &(y0, y1, fy) in &taps_y {
            let row0 = &self.data[y0 * self.width..(y0 + 1) * self.width];
            let row1 = &self.data[y1 * self.width..(y1 + 1) * self.width];
            for &(x0, x1, fx) in &taps_x {
                let top = row0[x0] * (1.0 - fx) + row0[x1] * fx;
                let bottom = row1[x0] * (1.0 - fx) + row1[x1] * fx;
                out.push(top * (1.0 - fy) + bottom * fy);
            }
        }
        Map2 { width, height, data: out }
    }
}

/// For each output index: the two source indices and the weight of the second one.
fn linear_taps(src: usize, dst: usize) -> Vec<(usize, usize, f32)> {
    let scale = src as f64 / dst as f64;
    (0..dst)
        .map(|i| {
            let s = ((i as f64 + 0.5) * scale - 0.5).max(0.0);
            let i0 = (s.floor() as usize).min(src - 1);
            let i1 = (i0 + 1).min(src - 1);
            (i0, i1, (s - i0 as f64) as f32)
        })
        .collect()
}

/// The smallest and largest finite values of a map; `None` when it has no contrast
/// (flat, or no finite value): such a map points nowhere, so it yields no crops.
pub fn finite_range(map: &Map2) -> Option<(f32, f32)> {
    let (min, max) = map
        .data
        .iter()
        .filter(|v| v.is_finite())
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    (max > min).then_some((min, max))
}

/// An 8-bit heatmap: the map min-max normalised to 0..=255 over `range`.
///
/// Deviation from the reference, which multiplies raw activations by 255 and casts to a
/// byte (saturating or wrapping above 1): normalising per map keeps the shape of any map.
/// NaN and -inf become 0, +inf 255.
pub fn heatmap_u8(map: &Map2, (min, max): (f32, f32)) -> Vec<u8> {
    let range = f64::from(max) - f64::from(min);
    map.data
        .iter()
        .map(|&v| {
            if v.is_nan() || v == f32::NEG_INFINITY {
                0
            } else if v == f32::INFINITY {
                255
            } else {
                // round half to even, as numpy does in the reference fixtures
                ((f64::from(v) - f64::from(min)) / range * 255.0)
                    .round_ties_even()
                    .clamp(0.0, 255.0) as u8
            }
        })
        .collect()
}

/// Otsu's threshold of an 8-bit image: the level `t` that maximises the between-class
/// variance of `{v <= t}` and `{v > t}` (OpenCV's convention: foreground is `v > t`).
pub fn otsu_threshold(pixels: &[u8]) -> u8 {
    let mut hist = [0u64; 256];
    for &p in pixels {
        hist[p as usize] += 1;
    }
    let total = pixels.len() as f64;
    let sum_all: f64 = hist.iter().enumerate().map(|(i, &h)| i as f64 * h as f64).sum();
    let (mut weight_bg, mut sum_bg) = (0.0f64, 0.0f64);
    let (mut best_t, mut best_var) = (0u8, -1.0f64);
    for (t, &h) in hist.iter().enumerate() {
        weight_bg += h as f64;
        sum_bg += t as f64 * h as f64;
        let weight_fg = total - weight_bg;
        if weight_bg == 0.0 || weight_fg == 0.0 {
            continue;
        }
        let mean_bg = sum_bg / weight_bg;
        let mean_fg = (sum_all - sum_bg) / weight_fg;
        let var = weight_bg * weight_fg * (mean_bg - mean_fg) * (mean_bg - mean_fg);
        if var > best_var {
            best_var = var;
            best_t = t as u8;
        }
    }
    best_t
}

/// Bounding boxes of the outer contours of a binary mask (`true` = foreground).
///
/// Foreground is 8-connected (as OpenCV traces contours). A component lying inside a
/// hole of another component has no outer contour of its own (`RETR_EXTERNAL`), so it
/// gives no box: such a component never touches the background that reaches the border.
pub fn outer_contour_boxes(mask: &[bool], width: usize, height: usize) -> Vec<BoundingBox> {
    assert_eq!(mask.len(), width * height, "mask size does not match its dimensions");
    // Background reachable from outside the image, 4-connected (the dual of 8-connected
    // foreground).
    let mut outside = vec![false; mask.len()];
    let mut stack = Vec::new();
    for x in 0..width {
        for y in [0, height - 1] {
            stack.push(y * width + x);
        }
    }
    for y in 0..height {
        for x in [0, width - 1] {
            stack.push(y * width + x);
        }
    }
    while let Some(i) = stack.pop() {
        if mask[i] || outside[i] {
            continue;
        }
        outside[i] = true;
        let (x, y) = (i % width, i / width);
        if x > 0 {
            stack.push(i - 1);
        }
        if x + 1 < width {
            stack.push(i + 1);
        }
        if y > 0 {
            stack.push(i - width);
        }
        if y + 1 < height {
            stack.push(i + width);
        }
    }

    let mut label = vec![u32::MAX; mask.len()];
    let mut boxes = Vec::new();
    for start in 0..mask.len() {
        if !mask[start] || label[start] != u32::MAX {
            continue;
        }
        let id = boxes.len() as u32;
        let (mut x0, mut y0, mut x1, mut y1) = (usize::MAX, usize::MAX, 0, 0);
        let mut external = false;
        label[start] = id;
        stack.push(start);
        while let Some(i) = stack.pop() {
            let (x, y) = (i % width, i / width);
            x0 = x0.min(x);
            y0 = y0.min(y);
            x1 = x1.max(x);
            y1 = y1.max(y);
            if x == 0 || y == 0 || x + 1 == width || y + 1 == height {
                external = true;
            }
            for dy in -1i64..=1 {
                for dx in -1i64..=1 {
                    let (nx, ny) = (x as i64 + dx, y as i64 + dy);
                    if (dx == 0 && dy == 0)
                        || nx < 0
                        || ny < 0
                        || nx >= width as i64
                        || ny >= height as i64
                    {
                        continue;
                    }
                    let j = ny as usize * width + nx as usize;
                    if mask[j] {
                        if label[j] == u32::MAX {
                            label[j] = id;
                            stack.push(j);
                        }
                    } else if (dx == 0 || dy == 0) && outside[j] {
                        external = true;
                    }
                }
            }
        }
        let bbox =
            BoundingBox { x0: x0 as u32, y0: y0 as u32, x1: x1 as u32 + 1, y1: y1 as u32 + 1 };
        boxes.push((bbox, external));
    }
    boxes.into_iter().filter(|(_, external)| *external).map(|(b, _)| b).collect()
}

/// Keeps boxes largest first: a box stays when its IoU with every box kept so far is at
/// most `max_iou_between_crops` and its IoU with the whole image is below
/// `max_iou_with_image`; at most `max_crops` boxes.
pub fn select_boxes(
    mut boxes: Vec<BoundingBox>,
    width: u32,
    height: u32,
    config: &CropConfig,
) -> Vec<BoundingBox> {
    let whole = BoundingBox { x0: 0, y0: 0, x1: width, y1: height };
    // Stable sort: equal areas keep contour order, so results are deterministic.
    boxes.sort_by_key(|b| std::cmp::Reverse(b.area()));
    let mut kept: Vec<BoundingBox> = Vec::new();
    for candidate in boxes {
        if kept.len() == config.max_crops {
            break;
        }
        if candidate.iou(&whole) >= config.max_iou_with_image {
            continue;
        }
        if kept.iter().all(|k| candidate.iou(k) <= config.max_iou_between_crops) {
            kept.push(candidate);
        }
    }
    kept
}

/// Everything attention cropping decided for one map, kept for the record.
#[derive(Debug, Clone, PartialEq)]
pub struct CropPlan {
    /// Otsu level of the heatmap; `None` for a map without contrast.
    pub threshold: Option<u8>,
    /// Boxes of all outer contours, before filtering.
    pub contour_boxes: Vec<BoundingBox>,
    /// The crops to cut, in canvas coordinates, largest first.
    pub crops: Vec<BoundingBox>,
}

/// Stage 1 for one neuron and one image: from its activation map (any resolution) to the
/// crop boxes on the `canvas_size` square canvas.
pub fn plan_crops(map: &Map2, config: &CropConfig) -> CropPlan {
    let no_crops = CropPlan { threshold: None, contour_boxes: Vec::new(), crops: Vec::new() };
    // Contrast is judged on the map itself first: upsampling a flat map only adds
    // rounding noise, which normalisation would blow up into a pattern.
    if finite_range(map).is_none() {
        return no_crops;
    }
    let side = config.canvas_size as usize;
    let upsampled = map.resize_bilinear(side, side);
    // Normalised over the upsampled map, as the reference does: its extremes can sit
    // between source pixels, inside the source's range.
    let Some(range) = finite_range(&upsampled) else {
        return no_crops;
    };
    let heat = heatmap_u8(&upsampled, range);
    let threshold = otsu_threshold(&heat);
    let mask: Vec<bool> = heat.iter().map(|&v| v > threshold).collect();
    let contour_boxes = outer_contour_boxes(&mask, side, side);
    let crops = select_boxes(contour_boxes.clone(), config.canvas_size, config.canvas_size, config);
    CropPlan { threshold: Some(threshold), contour_boxes, crops }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canvas(config_side: u32) -> CropConfig {
        CropConfig { canvas_size: config_side, ..CropConfig::default() }
    }

    /// A map of zeros with rectangles of `value` at the given cells.
    fn map_with_rects(w: usize, h: usize, rects: &[(usize, usize, usize, usize, f32)]) -> Map2 {
        let mut data = vec![0.0; w * h];
        for &(x0, y0, x1, y1, v) in rects {
            for y in y0..y1 {
                for x in x0..x1 {
                    data[y * w + x] = v;
                }
            }
        }
        Map2::new(w, h, data).unwrap()
    }

    #[test]
    fn iou_of_boxes() {
        let a = BoundingBox { x0: 0, y0: 0, x1: 10, y1: 10 };
        let b = BoundingBox { x0: 5, y0: 0, x1: 15, y1: 10 };
        assert!((a.iou(&b) - 50.0 / 150.0).abs() < 1e-6);
        assert_eq!(a.iou(&a), 1.0);
        let far = BoundingBox { x0: 20, y0: 20, x1: 30, y1: 30 };
        assert_eq!(a.iou(&far), 0.0);
    }

    #[test]
    fn bilinear_matches_half_pixel_convention() {
        // 2 -> 4 upsampling of [0, 1]: centres at -0.25, 0.25, 0.75, 1.25 of the source.
        let m = Map2::new(2, 1, vec![0.0, 1.0]).unwrap();
        let up = m.resize_bilinear(4, 1);
        assert_eq!(up.data, vec![0.0, 0.25, 0.75, 1.0]);
        // Identity when sizes agree.
        let same = m.resize_bilinear(2, 1);
        assert_eq!(same.data, m.data);
    }

    #[test]
    fn otsu_splits_two_levels() {
        let mut px = vec![10u8; 100];
        px.extend(vec![200u8; 50]);
        let t = otsu_threshold(&px);
        assert!((10..200).contains(&t), "threshold {t} must separate the two levels");
        assert_eq!(px.iter().filter(|&&p| p > t).count(), 50);
    }

    #[test]
    fn one_blob_gives_one_box() {
        // A 12x12 map with a hot 3x3 square in the middle, on a 120 px canvas.
        let map = map_with_rects(12, 12, &[(4, 4, 7, 7, 5.0)]);
        let plan = plan_crops(&map, &canvas(120));
        assert_eq!(plan.crops.len(), 1);
        let b = plan.crops[0];
        // The hot cells span 40..70 px on the canvas; interpolation widens the blob a little.
        assert!(b.x0 >= 30 && b.x0 <= 45 && b.x1 >= 65 && b.x1 <= 80, "{b:?}");
        assert_eq!((b.x0, b.x1), (b.y0, b.y1), "a centred square gives a square box");
    }

    #[test]
    fn two_blobs_give_two_boxes_largest_first() {
        let map = map_with_rects(20, 20, &[(1, 1, 4, 4, 1.0), (10, 10, 18, 18, 1.0)]);
        let plan = plan_crops(&map, &canvas(200));
        assert_eq!(plan.crops.len(), 2, "{plan:?}");
        assert!(plan.crops[0].area() > plan.crops[1].area());
        assert!(plan.crops[0].x0 >= 90, "the large blob is bottom-right: {:?}", plan.crops[0]);
        assert!(plan.crops[1].x1 <= 50, "the small blob is top-left: {:?}", plan.crops[1]);
    }

    #[test]
    fn blob_covering_the_image_is_not_a_crop() {
        // Everything hot but one corner cell: the mask covers nearly the whole image.
        let map = map_with_rects(10, 10, &[(0, 0, 10, 10, 1.0), (0, 0, 1, 1, 0.0)]);
        let plan = plan_crops(&map, &canvas(100));
        assert_eq!(plan.contour_boxes.len(), 1);
        assert!(plan.crops.is_empty(), "IoU with the image >= 0.8 must be dropped: {plan:?}");
    }

    #[test]
    fn flat_map_gives_no_crops() {
        let plan = plan_crops(&Map2::new(7, 7, vec![3.0; 49]).unwrap(), &canvas(70));
        assert_eq!(plan.threshold, None);
        assert!(plan.crops.is_empty());
        let zeros = plan_crops(&Map2::new(7, 7, vec![0.0; 49]).unwrap(), &canvas(70));
        assert!(zeros.crops.is_empty());
    }

    #[test]
    fn non_finite_values_do_not_break_cropping() {
        let mut map = map_with_rects(10, 10, &[(6, 6, 9, 9, 2.0)]);
        map.data[0] = f32::NAN;
        map.data[1] = f32::NEG_INFINITY;
        let plan = plan_crops(&map, &canvas(100));
        assert_eq!(plan.crops.len(), 1, "{plan:?}");
        assert!(plan.crops[0].x0 >= 50);

        let all_nan = Map2::new(4, 4, vec![f32::NAN; 16]).unwrap();
        assert!(plan_crops(&all_nan, &canvas(40)).crops.is_empty());

        // +inf is the hottest value: its cell becomes the crop.
        let mut inf = Map2::new(10, 10, vec![0.0; 100]).unwrap();
        inf.data[3 * 10 + 3] = f32::INFINITY;
        inf.data[7 * 10 + 7] = 1.0;
        let heat = heatmap_u8(&inf, finite_range(&inf).unwrap());
        assert_eq!(heat[33], 255);
        assert_eq!(heat[77], 255);
    }

    #[test]
    fn heatmap_is_min_max_normalised() {
        let m = Map2::new(3, 1, vec![-2.0, 0.0, 2.0]).unwrap();
        assert_eq!(heatmap_u8(&m, finite_range(&m).unwrap()), vec![0, 128, 255]);
        // Large activations do not wrap around, unlike the reference's raw *255 cast.
        let m = Map2::new(2, 1, vec![100.0, 300.0]).unwrap();
        assert_eq!(heatmap_u8(&m, finite_range(&m).unwrap()), vec![0, 255]);
        assert_eq!(finite_range(&Map2::new(2, 1, vec![4.0, 4.0]).unwrap()), None);
    }

    #[test]
    fn component_inside_a_hole_has_no_outer_contour() {
        // A ring with a dot in its hole: RETR_EXTERNAL sees only the ring.
        let (w, h) = (9, 9);
        let mut mask = vec![false; w * h];
        for i in 1..8 {
            mask[w + i] = true;
            mask[7 * w + i] = true;
            mask[i * w + 1] = true;
            mask[i * w + 7] = true;
        }
        mask[4 * w + 4] = true;
        let boxes = outer_contour_boxes(&mask, w, h);
        assert_eq!(boxes, vec![BoundingBox { x0: 1, y0: 1, x1: 8, y1: 8 }]);
    }

    #[test]
    fn diagonal_pixels_are_one_component() {
        let (w, h) = (5, 5);
        let mut mask = vec![false; w * h];
        mask[w + 1] = true;
        mask[2 * w + 2] = true;
        mask[3 * w + 3] = true;
        assert_eq!(
            outer_contour_boxes(&mask, w, h),
            vec![BoundingBox { x0: 1, y0: 1, x1: 4, y1: 4 }]
        );
    }

    #[test]
    fn selection_limits_overlap_and_count() {
        let b = |x0, y0, x1, y1| BoundingBox { x0, y0, x1, y1 };
        let config = CropConfig::default();
        let boxes = vec![
            b(0, 0, 50, 50),
            b(5, 5, 50, 50), // IoU with the first ~0.81: dropped
            b(60, 60, 100, 100),
            b(0, 60, 30, 100),
            b(60, 0, 90, 30),
            b(40, 40, 45, 45), // fifth kept would exceed max_crops
        ];
        let kept = select_boxes(boxes, 100, 100, &config);
        assert_eq!(
            kept,
            vec![b(0, 0, 50, 50), b(60, 60, 100, 100), b(0, 60, 30, 100), b(60, 0, 90, 30)]
        );
    }
}

//! Image preprocessing as the target model was trained: resize, centre crop, normalise.
//!
//! Resizing follows Pillow's bilinear filter (a convolution that widens with the
//! downscaling factor, i.e. antialiased), which is what torchvision's `Resize` does on PIL
//! images; `fast_image_resize` implements the same convolution with SIMD.

use candle_core::{Device, Tensor};
use fast_image_resize::images::Image;
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::RgbImage;
use serde::{Deserialize, Serialize};

use crate::error::ModelError;

pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// How an RGB image becomes the model's input tensor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Preprocess {
    /// Resize so the shorter side has this length (aspect kept), then ...
    pub resize_shorter: u32,
    /// ... cut the centre square of this side.
    pub crop: u32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Preprocess {
    /// torchvision's ImageNet evaluation transform: Resize(256), CenterCrop(224), Normalize.
    pub fn imagenet() -> Self {
        Self { resize_shorter: 256, crop: 224, mean: IMAGENET_MEAN, std: IMAGENET_STD }
    }

    /// Resized, cropped and normalised, channels first: `3 x crop x crop` values.
    pub fn apply(&self, img: &RgbImage) -> Vec<f32> {
        let (w, h) = img.dimensions();
        let (short, long) = if w <= h { (w, h) } else { (h, w) };
        // torchvision truncates the long side: int(size * long / short).
        let new_long = (u64::from(self.resize_shorter) * u64::from(long) / u64::from(short)) as u32;
        let (rw, rh) = if w <= h { (self.resize_shorter, new_long) } else { (new_long, self.resize_shorter) };
        let resized = resize_rgb(img, rw, rh);
        let c = self.crop.min(rw).min(rh);
        // torchvision: int(round((h - crop) / 2)), Python rounding half to even.
        let top = (f64::from(rh - c) / 2.0).round_ties_even() as u32;
        let left = (f64::from(rw - c) / 2.0).round_ties_even() as u32;
        let cropped = image::imageops::crop_imm(&resized, left, top, c, c).to_image();
        normalize_chw(&cropped, self.mean, self.std)
    }

    /// Side of the square tensor `apply` produces.
    pub fn output_side(&self) -> u32 {
        self.crop
    }

    /// A batch `(B, 3, crop, crop)` on `device`.
    pub fn batch(&self, images: &[RgbImage], device: &Device) -> Result<Tensor, ModelError> {
        let side = self.crop as usize;
        let mut data = Vec::with_capacity(images.len() * 3 * side * side);
        for img in images {
            data.extend(self.apply(img));
        }
        Ok(Tensor::from_vec(data, (images.len(), 3, side, side), device)?)
    }
}

/// A batch of images already at the model's input size, only normalised.
pub fn normalized_batch(images: &[RgbImage], mean: [f32; 3], std: [f32; 3], device: &Device) -> Result<Tensor, ModelError> {
    let (w, h) = images.first().map(|i| i.dimensions()).unwrap_or((0, 0));
    let mut data = Vec::with_capacity(images.len() * 3 * (w * h) as usize);
    for img in images {
        assert_eq!(img.dimensions(), (w, h), "a batch needs images of one size");
        data.extend(normalize_chw(img, mean, std));
    }
    Ok(Tensor::from_vec(data, (images.len(), 3, h as usize, w as usize), device)?)
}

/// `(x / 255 - mean) / std`, channels first (torchvision's ToTensor + Normalize).
pub fn normalize_chw(img: &RgbImage, mean: [f32; 3], std: [f32; 3]) -> Vec<f32> {
    let (w, h) = img.dimensions();
    let plane = (w * h) as usize;
    let mut out = vec![0f32; 3 * plane];
    for (i, px) in img.pixels().enumerate() {
        for c in 0..3 {
            out[c * plane + i] = (f32::from(px.0[c]) / 255.0 - mean[c]) / std[c];
        }
    }
    out
}

/// Pillow-compatible bilinear (antialiased) resize of an RGB image.
pub fn resize_rgb(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    if img.dimensions() == (width, height) {
        return img.clone();
    }
    let (w, h) = img.dimensions();
    let src = Image::from_vec_u8(w, h, img.as_raw().clone(), PixelType::U8x3).expect("an RgbImage buffer is w*h*3 bytes");
    let mut dst = Image::new(width, height, PixelType::U8x3);
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear));
    Resizer::new().resize(&src, &mut dst, &options).expect("source and destination are both U8x3");
    RgbImage::from_raw(width, height, dst.into_vec()).expect("the resizer fills width*height*3 bytes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn square_256_is_cropped_without_resampling() {
        let img = RgbImage::from_fn(256, 256, |x, y| image::Rgb([x as u8, y as u8, 7]));
        let p = Preprocess::imagenet();
        let t = p.apply(&img);
        assert_eq!(t.len(), 3 * 224 * 224);
        // Pixel (0,0) of the crop is (16,16) of the source.
        let expect = |v: u8, c: usize| (f32::from(v) / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c];
        assert_eq!(t[0], expect(16, 0));
        assert_eq!(t[224 * 224], expect(16, 1));
        assert_eq!(t[2 * 224 * 224 + 5], expect(7, 2));
    }

    #[test]
    fn resize_keeps_aspect_by_the_shorter_side() {
        let img = RgbImage::from_pixel(320, 240, image::Rgb([100, 150, 200]));
        let t = Preprocess::imagenet().apply(&img);
        assert_eq!(t.len(), 3 * 224 * 224);
        // A flat image stays flat through resizing.
        let expect = (100.0 / 255.0 - IMAGENET_MEAN[0]) / IMAGENET_STD[0];
        assert!(t[..224 * 224].iter().all(|v| (v - expect).abs() < 1e-6));
        assert_eq!(resize_rgb(&img, 341, 256).dimensions(), (341, 256));
    }
}

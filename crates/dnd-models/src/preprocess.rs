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

/// The resampling filter of a resize. Both are Pillow's (antialiased, support scaled by
/// the downscaling factor), which torchvision's and transformers' uint8 kernels reproduce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Filter {
    Bilinear,
    /// Keys cubic with a = -0.5 (Pillow's BICUBIC).
    Bicubic,
}

/// How the image is brought to the model's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Resize {
    /// The shorter side to this length, aspect kept (long side truncated, as torchvision).
    ShorterSide(u32),
    /// Exactly this width and height, aspect not kept.
    Exact { width: u32, height: u32 },
}

/// How a centre crop rounds an odd margin: torchvision's `CenterCrop` rounds half to even,
/// transformers' image processors truncate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CropRounding {
    HalfEven,
    Floor,
}

/// How an RGB image becomes the model's input tensor: resize, optional centre crop, then
/// `(x / 255 - mean) / std`, channels first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Preprocess {
    pub resize: Resize,
    pub filter: Filter,
    /// Side of the centre square cut after resizing, if any.
    pub crop: Option<u32>,
    pub crop_rounding: CropRounding,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

/// The fields of a Hugging Face `preprocessor_config.json` (CLIP, BLIP, ViT image
/// processors) that decide the transform.
#[derive(Deserialize)]
struct HfImageProcessor {
    size: Option<HfSize>,
    crop_size: Option<HfSize>,
    do_center_crop: Option<bool>,
    resample: Option<u32>,
    image_mean: Option<[f32; 3]>,
    image_std: Option<[f32; 3]>,
}

#[derive(Deserialize)]
struct HfSize {
    shortest_edge: Option<u32>,
    height: Option<u32>,
    width: Option<u32>,
}

impl Preprocess {
    /// torchvision's ImageNet evaluation transform: Resize(256), CenterCrop(224), Normalize.
    pub fn imagenet() -> Self {
        Self {
            resize: Resize::ShorterSide(256),
            filter: Filter::Bilinear,
            crop: Some(224),
            crop_rounding: CropRounding::HalfEven,
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
        }
    }

    /// Reads a Hugging Face image processor config (`preprocessor_config.json`).
    pub fn from_hf_config(path: &std::path::Path) -> Result<Self, ModelError> {
        let bad = |reason: String| ModelError::Config { path: path.into(), reason };
        let raw: HfImageProcessor = crate::hf_files::read_json(path)?;
        let size = raw.size.ok_or_else(|| bad("it has no `size`".into()))?;
        let resize = match (size.shortest_edge, size.height, size.width) {
            (Some(s), _, _) => Resize::ShorterSide(s),
            (None, Some(height), Some(width)) => Resize::Exact { width, height },
            _ => return Err(bad("`size` needs `shortest_edge` or `height` and `width`".into())),
        };
        let crop = match (raw.do_center_crop.unwrap_or(false), raw.crop_size) {
            (true, Some(HfSize { height: Some(h), width: Some(w), .. })) if h == w => Some(h),
            (true, Some(_)) => return Err(bad("only square `crop_size` is supported".into())),
            (true, None) => return Err(bad("`do_center_crop` without `crop_size`".into())),
            (false, _) => None,
        };
        let filter = match raw.resample.unwrap_or(3) {
            2 => Filter::Bilinear,
            3 => Filter::Bicubic,
            other => {
                return Err(bad(format!(
                    "resample {other} is not supported (2 bilinear, 3 bicubic)"
                )));
            }
        };
        Ok(Self {
            resize,
            filter,
            crop,
            crop_rounding: CropRounding::Floor,
            mean: raw.image_mean.unwrap_or(IMAGENET_MEAN),
            std: raw.image_std.unwrap_or(IMAGENET_STD),
        })
    }

    /// Resized, cropped and normalised, channels first.
    pub fn apply(&self, img: &RgbImage) -> Vec<f32> {
        normalize_chw(&self.transform(img), self.mean, self.std)
    }

    /// The geometric part: resize and crop, still 8-bit RGB.
    pub fn transform(&self, img: &RgbImage) -> RgbImage {
        let (w, h) = img.dimensions();
        let (rw, rh) = match self.resize {
            Resize::ShorterSide(side) => {
                let (short, long) = if w <= h { (w, h) } else { (h, w) };
                // torchvision truncates the long side: int(size * long / short).
                let new_long = (u64::from(side) * u64::from(long) / u64::from(short)) as u32;
                if w <= h { (side, new_long) } else { (new_long, side) }
            }
            Resize::Exact { width, height } => (width, height),
        };
        let resized = resize_with(img, rw, rh, self.filter);
        let Some(crop) = self.crop else { return resized };
        let c = crop.min(rw).min(rh);
        let offset = |margin: u32| match self.crop_rounding {
            CropRounding::HalfEven => (f64::from(margin) / 2.0).round_ties_even() as u32,
            CropRounding::Floor => margin / 2,
        };
        image::imageops::crop_imm(&resized, offset(rw - c), offset(rh - c), c, c).to_image()
    }

    /// `(width, height)` of the tensor `apply` produces for any input.
    pub fn output_size(&self) -> Option<(u32, u32)> {
        match (self.crop, self.resize) {
            (Some(c), _) => Some((c, c)),
            (None, Resize::Exact { width, height }) => Some((width, height)),
            (None, Resize::ShorterSide(_)) => None,
        }
    }

    /// A batch `(B, 3, H, W)` on `device`; the transform must give one size for all inputs.
    pub fn batch(&self, images: &[RgbImage], device: &Device) -> Result<Tensor, ModelError> {
        let transformed: Vec<RgbImage> = images.iter().map(|i| self.transform(i)).collect();
        normalized_batch(&transformed, self.mean, self.std, device)
    }
}

/// A batch of images already at the model's input size, only normalised.
pub fn normalized_batch(
    images: &[RgbImage],
    mean: [f32; 3],
    std: [f32; 3],
    device: &Device,
) -> Result<Tensor, ModelError> {
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
    resize_with(img, width, height, Filter::Bilinear)
}

/// Pillow-compatible resize of an RGB image with the given filter.
pub fn resize_with(img: &RgbImage, width: u32, height: u32, filter: Filter) -> RgbImage {
    if img.dimensions() == (width, height) {
        return img.clone();
    }
    let (w, h) = img.dimensions();
    let src = Image::from_vec_u8(w, h, img.as_raw().clone(), PixelType::U8x3)
        .expect("an RgbImage buffer is w*h*3 bytes");
    let mut dst = Image::new(width, height, PixelType::U8x3);
    let kernel = match filter {
        Filter::Bilinear => FilterType::Bilinear,
        Filter::Bicubic => FilterType::CatmullRom,
    };
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(kernel));
    Resizer::new().resize(&src, &mut dst, &options).expect("source and destination are both U8x3");
    RgbImage::from_raw(width, height, dst.into_vec())
        .expect("the resizer fills width*height*3 bytes")
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

//! Probe images: where they are, reading them, and decoding them safely.
//!
//! A probe set is a directory tree (flat or ImageFolder), an object store prefix, or a
//! list file (`.txt`/`.csv`) of paths or URLs. Image ids are paths relative to the set's
//! root (or the entries as written in a list). Files that cannot be used are skipped and
//! recorded with a reason; they never stop a run.

use std::collections::HashMap;
use std::io::Cursor;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use image::{ImageError, ImageReader, RgbImage};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use dnd_store::Location;
use dnd_store::tables::ErrorRow;

use crate::error::PipelineError;

/// File endings taken as images when listing a directory or prefix.
pub const IMAGE_EXTENSIONS: [&str; 4] = ["jpg", "jpeg", "png", "webp"];
const LIST_EXTENSIONS: [&str; 3] = ["txt", "csv", "lst"];

/// Guards against inputs that would exhaust memory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImageLimits {
    /// Larger files are skipped unread.
    pub max_file_bytes: u64,
    /// Images with more pixels are skipped before decoding (decompression bombs).
    /// The default is Pillow's: twice its MAX_IMAGE_PIXELS warning level.
    pub max_pixels: u64,
}

impl Default for ImageLimits {
    fn default() -> Self {
        Self { max_file_bytes: 256 << 20, max_pixels: 178_956_970 }
    }
}

/// One probe image: its id and where its bytes are.
#[derive(Debug, Clone)]
pub struct ImageRef {
    pub id: String,
    location: Location,
    relative: String,
    /// Size from the listing, when known, to skip huge files unread.
    size: Option<u64>,
}

impl ImageRef {
    /// Where the image is, as users see it (a path or URL).
    pub fn uri(&self) -> String {
        self.location.display_path(&self.relative)
    }
}

/// The probe set, sorted by id.
#[derive(Debug, Clone)]
pub struct ProbeImages {
    pub source: String,
    pub images: Vec<ImageRef>,
    /// Files under a directory or prefix that are not images by their ending.
    pub ignored_files: usize,
    /// Entries that could not even be listed.
    pub errors: Vec<ErrorRow>,
}

fn extension(name: &str) -> Option<String> {
    let file = name.rsplit('/').next()?;
    let (_, ext) = file.rsplit_once('.')?;
    Some(ext.to_ascii_lowercase())
}

fn error_row(id: &str, stage: &str, reason: &str, message: impl Into<String>) -> ErrorRow {
    ErrorRow {
        image_id: id.into(),
        stage: stage.into(),
        reason: reason.into(),
        message: message.into(),
    }
}

impl ProbeImages {
    /// Lists a probe set: a directory or URL prefix, or a `.txt`/`.csv`/`.lst` list file.
    pub async fn discover(spec: &str) -> Result<Self, PipelineError> {
        let is_list = extension(spec).is_some_and(|e| LIST_EXTENSIONS.contains(&e.as_str()))
            && !std::path::Path::new(spec).is_dir();
        let set =
            if is_list { Self::from_list(spec).await? } else { Self::from_prefix(spec).await? };
        if set.images.is_empty() {
            let detail = if is_list {
                "the list names no image".to_string()
            } else {
                format!(
                    "found no file ending in .{} ({} other files ignored)",
                    IMAGE_EXTENSIONS.join(", ."),
                    set.ignored_files
                )
            };
            return Err(PipelineError::NoImages { location: spec.into(), detail });
        }
        Ok(set)
    }

    async fn from_prefix(spec: &str) -> Result<Self, PipelineError> {
        let root = Location::open(spec)?;
        let mut images = Vec::new();
        let mut ignored_files = 0;
        let mut listing = root.list();
        while let Some(meta) = listing.try_next().await? {
            let Some(relative) = root.relative(&meta.location) else { continue };
            if extension(&relative).is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.as_str())) {
                images.push(ImageRef {
                    id: relative.clone(),
                    location: root.clone(),
                    relative,
                    size: Some(meta.size),
                });
            } else {
                ignored_files += 1;
            }
        }
        images.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(Self { source: spec.into(), images, ignored_files, errors: Vec::new() })
    }

    /// A list file: one path or URL per line (`#` comments and blank lines skipped), or a
    /// CSV whose header has a `path` (or `image`, `image_path`, `file`) column, else its
    /// first column. Relative entries are relative to the list's own directory. Quoted
    /// CSV fields are not supported.
    async fn from_list(spec: &str) -> Result<Self, PipelineError> {
        let (parent, file) = match spec.rsplit_once('/') {
            Some((p, f)) if !p.is_empty() => (p.to_string(), f.to_string()),
            Some((_, f)) => ("/".to_string(), f.to_string()),
            None => (".".to_string(), spec.to_string()),
        };
        let bad = |reason: String| PipelineError::BadImageList { location: spec.into(), reason };
        let base = Location::open(&parent)?;
        let bytes = base.get(&file).await?;
        let text =
            String::from_utf8(bytes.to_vec()).map_err(|_| bad("it is not UTF-8 text".into()))?;
        let mut lines =
            text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).peekable();
        let is_csv = extension(spec).as_deref() == Some("csv");
        let mut column = 0;
        if is_csv && let Some(header) = lines.peek() {
            let names: Vec<String> =
                header.split(',').map(|c| c.trim().to_ascii_lowercase()).collect();
            if let Some(i) = names
                .iter()
                .position(|n| ["path", "image", "image_path", "file"].contains(&n.as_str()))
            {
                column = i;
                lines.next();
            }
        }
        let mut locations: HashMap<String, Location> = HashMap::new();
        let mut images = Vec::new();
        let mut errors = Vec::new();
        for (n, line) in lines.enumerate() {
            let entry = if is_csv {
                match line.split(',').nth(column) {
                    Some(e) => e.trim().to_string(),
                    None => return Err(bad(format!("row {} has no column {}", n + 1, column + 1))),
                }
            } else {
                line.to_string()
            };
            // Entries with a scheme or an absolute path stand alone; the rest hang off the
            // list's directory.
            let (dir, name) = if entry.contains("://") || entry.starts_with('/') {
                match entry.rsplit_once('/') {
                    Some((d, f)) => (
                        if d.is_empty() || d.ends_with(':') {
                            format!("{d}/")
                        } else {
                            d.to_string()
                        },
                        f.to_string(),
                    ),
                    None => continue,
                }
            } else {
                (parent.clone(), entry.clone())
            };
            let location = match locations.get(&dir) {
                Some(l) => l.clone(),
                None => match Location::open(&dir) {
                    Ok(l) => {
                        locations.insert(dir.clone(), l.clone());
                        l
                    }
                    Err(e) => {
                        errors.push(error_row(&entry, "list", "unreadable", e.to_string()));
                        continue;
                    }
                },
            };
            images.push(ImageRef { id: entry, location, relative: name, size: None });
        }
        images.sort_by(|a, b| a.id.cmp(&b.id));
        images.dedup_by(|a, b| a.id == b.id);
        Ok(Self { source: spec.into(), images, ignored_files: 0, errors })
    }
}

/// Why an image was skipped.
#[derive(Debug, Clone, PartialEq)]
pub struct Skipped {
    pub reason: &'static str,
    pub message: String,
}

impl Skipped {
    pub fn into_row(self, id: &str, stage: &str) -> ErrorRow {
        error_row(id, stage, self.reason, self.message)
    }
}

/// Reads an image's bytes, refusing files over the size limit before reading them.
pub async fn read_image(image: &ImageRef, limits: &ImageLimits) -> Result<Bytes, Skipped> {
    if let Some(size) = image.size
        && size > limits.max_file_bytes
    {
        return Err(Skipped {
            reason: "too_large",
            message: format!(
                "the file has {size} bytes, over the limit of {} (images.max_file_bytes)",
                limits.max_file_bytes
            ),
        });
    }
    image
        .location
        .get(&image.relative)
        .await
        .map_err(|e| Skipped { reason: "unreadable", message: e.to_string() })
}

/// Decodes JPEG, PNG or WebP bytes to 8-bit RGB, as PIL's `convert("RGB")` does:
/// grayscale is replicated, alpha is dropped, 16-bit samples keep their high byte.
pub fn decode_rgb(bytes: &[u8], limits: &ImageLimits) -> Result<RgbImage, Skipped> {
    if bytes.is_empty() {
        return Err(Skipped { reason: "empty", message: "the file is empty (0 bytes)".into() });
    }
    if bytes.len() as u64 > limits.max_file_bytes {
        return Err(Skipped {
            reason: "too_large",
            message: format!(
                "the file has {} bytes, over the limit of {}",
                bytes.len(),
                limits.max_file_bytes
            ),
        });
    }
    let reader = || {
        ImageReader::new(Cursor::new(bytes))
            .with_guessed_format()
            .expect("reading from memory cannot fail")
    };
    let Some(format) = reader().format() else {
        return Err(Skipped {
            reason: "not_an_image",
            message: "the content is not a JPEG, PNG or WebP image (unrecognised signature)".into(),
        });
    };
    if !matches!(
        format,
        image::ImageFormat::Jpeg | image::ImageFormat::Png | image::ImageFormat::WebP
    ) {
        return Err(Skipped {
            reason: "unsupported",
            message: format!("{format:?} images are not supported; convert to JPEG, PNG or WebP"),
        });
    }
    if format == image::ImageFormat::Jpeg && !jpeg_has_end(bytes) {
        // The JPEG decoder fills missing data with grey instead of failing; Pillow refuses
        // such files ("image file is truncated"), and so do we.
        return Err(Skipped {
            reason: "truncated",
            message: "the JPEG ends before its end-of-image marker".into(),
        });
    }
    let (w, h) = reader().into_dimensions().map_err(classify)?;
    if u64::from(w) * u64::from(h) > limits.max_pixels {
        return Err(Skipped {
            reason: "too_large",
            message: format!(
                "{w}x{h} pixels is over the limit of {} (images.max_pixels); a decompression bomb?",
                limits.max_pixels
            ),
        });
    }
    let mut r = reader();
    let mut l = image::Limits::default();
    // Room for the largest sample type (16-bit RGBA) at the allowed pixel count.
    l.max_alloc = Some(limits.max_pixels.saturating_mul(8));
    r.limits(l);
    let img = r.decode().map_err(classify)?;
    Ok(img.to_rgb8())
}

/// True when an end-of-image marker (FF D9) follows the start of scan (FF DA). Entropy-coded
/// data escapes every FF byte, so the marker cannot appear inside it by chance.
fn jpeg_has_end(bytes: &[u8]) -> bool {
    let Some(sos) = bytes.windows(2).position(|w| w == [0xFF, 0xDA]) else { return false };
    bytes[sos..].windows(2).any(|w| w == [0xFF, 0xD9])
}

fn classify(e: ImageError) -> Skipped {
    let reason = match &e {
        ImageError::Limits(_) => "too_large",
        ImageError::Unsupported(_) => "unsupported",
        ImageError::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => "truncated",
        ImageError::Decoding(d) if d.to_string().to_ascii_lowercase().contains("eof") => {
            "truncated"
        }
        _ => "corrupt",
    };
    Skipped { reason, message: e.to_string() }
}

/// Reads many images concurrently, preserving their order.
pub async fn read_images(images: &[ImageRef], limits: &ImageLimits) -> Vec<Result<Bytes, Skipped>> {
    // Owned futures: borrowing closures here trip the compiler's higher-ranked lifetime
    // checks once the caller is spawned onto the runtime.
    let reads: Vec<_> = images
        .iter()
        .cloned()
        .map(|img| {
            let limits = limits.clone();
            async move { read_image(&img, &limits).await }
        })
        .collect();
    futures::stream::iter(reads).buffered(16).collect().await
}

/// Reads and decodes `images` in parallel, numbering them from `first_index`; failures
/// become error rows of `stage`.
pub(crate) async fn load_batch(
    images: &[ImageRef],
    first_index: u32,
    limits: &ImageLimits,
    stage: &'static str,
) -> Vec<(u32, Result<RgbImage, ErrorRow>)> {
    let bytes: Vec<Result<Bytes, Skipped>> = read_images(images, limits).await;
    let ids: Vec<String> = images.iter().map(|i| i.id.clone()).collect();
    let limits = limits.clone();
    tokio::task::spawn_blocking(move || {
        bytes
            .into_par_iter()
            .zip(ids)
            .enumerate()
            .map(|(i, (b, id))| {
                let decoded =
                    b.and_then(|b| decode_rgb(&b, &limits)).map_err(|s| s.into_row(&id, stage));
                (first_index + i as u32, decoded)
            })
            .collect()
    })
    .await
    .expect("decoding does not panic")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png_bytes(img: &image::DynamicImage) -> Vec<u8> {
        let mut out = Vec::new();
        img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png).unwrap();
        out
    }

    #[test]
    fn converts_gray_rgba_and_16_bit_to_rgb() {
        let limits = ImageLimits::default();
        let gray =
            image::DynamicImage::ImageLuma8(image::GrayImage::from_pixel(3, 2, image::Luma([77])));
        assert_eq!(decode_rgb(&png_bytes(&gray), &limits).unwrap().get_pixel(1, 1).0, [77, 77, 77]);
        let rgba = image::DynamicImage::ImageRgba8(image::RgbaImage::from_pixel(
            2,
            2,
            image::Rgba([10, 20, 30, 0]),
        ));
        assert_eq!(decode_rgb(&png_bytes(&rgba), &limits).unwrap().get_pixel(0, 0).0, [10, 20, 30]);
        let deep = image::DynamicImage::ImageLuma16(image::ImageBuffer::from_pixel(
            2,
            2,
            image::Luma([0x1234u16]),
        ));
        assert_eq!(
            decode_rgb(&png_bytes(&deep), &limits).unwrap().get_pixel(0, 0).0,
            [0x12, 0x12, 0x12]
        );
    }

    #[test]
    fn bad_inputs_are_classified() {
        let limits = ImageLimits::default();
        assert_eq!(decode_rgb(b"", &limits).unwrap_err().reason, "empty");
        assert_eq!(decode_rgb(b"hello, I am text", &limits).unwrap_err().reason, "not_an_image");
        let good = png_bytes(&image::DynamicImage::ImageRgb8(RgbImage::from_pixel(
            64,
            64,
            image::Rgb([1, 2, 3]),
        )));
        let cut = &good[..good.len() / 2];
        let err = decode_rgb(cut, &limits).unwrap_err();
        assert!(["truncated", "corrupt"].contains(&err.reason), "{err:?}");
        let tiny = ImageLimits { max_pixels: 100, ..ImageLimits::default() };
        assert_eq!(decode_rgb(&good, &tiny).unwrap_err().reason, "too_large");
    }

    #[tokio::test]
    async fn lists_a_directory_tree_and_a_list_file() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("cats")).unwrap();
        std::fs::write(root.join("cats/b.png"), b"x").unwrap();
        std::fs::write(root.join("a.JPG"), b"x").unwrap();
        std::fs::write(root.join("notes.txt"), b"x").unwrap();
        let set = ProbeImages::discover(root.to_str().unwrap()).await.unwrap();
        let ids: Vec<_> = set.images.iter().map(|i| i.id.as_str()).collect();
        assert_eq!(ids, vec!["a.JPG", "cats/b.png"]);
        assert_eq!(set.ignored_files, 1);

        std::fs::write(root.join("list.csv"), "label,path\ncat,cats/b.png\ndog,a.JPG\n").unwrap();
        let set = ProbeImages::discover(root.join("list.csv").to_str().unwrap()).await.unwrap();
        let ids: Vec<_> = set.images.iter().map(|i| i.id.as_str()).collect();
        assert_eq!(ids, vec!["a.JPG", "cats/b.png"]);
        let bytes = read_image(&set.images[1], &ImageLimits::default()).await.unwrap();
        assert_eq!(&bytes[..], b"x");

        let abs = root.join("cats/b.png");
        std::fs::write(root.join("abs.txt"), format!("# comment\n{}\n", abs.display())).unwrap();
        let set = ProbeImages::discover(root.join("abs.txt").to_str().unwrap()).await.unwrap();
        assert_eq!(set.images[0].id, abs.display().to_string());
        assert!(read_image(&set.images[0], &ImageLimits::default()).await.is_ok());

        let empty = tempfile::tempdir().unwrap();
        let err = ProbeImages::discover(empty.path().to_str().unwrap()).await.unwrap_err();
        assert!(err.to_string().contains("no probe images"), "{err}");
    }
}

//! Copies every image of the evidence into the report: the file as it was under
//! `images/`, a thumbnail under `thumbs/`, both named by the BLAKE3 of the file's bytes.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use bytes::Bytes;
use futures::StreamExt;

use dnd_store::Location;

use crate::data::JobResults;
use crate::{ReportError, ReportOptions};

/// An image copied into the report.
#[derive(Debug, Clone)]
pub struct Copied {
    /// `images/<hash>.<ext>`, relative to the report's root.
    pub full: String,
    /// `thumbs/<hash>.png`.
    pub thumb: String,
    pub thumb_width: u32,
    pub thumb_height: u32,
    pub width: u32,
    pub height: u32,
}

/// Every image of the report, by the `uri` the results give.
#[derive(Debug, Default)]
pub struct Images {
    pub by_uri: HashMap<String, Copied>,
    /// Images that could not be read, by uri, with why.
    pub missing: Vec<(String, String)>,
    /// Distinct images copied.
    pub copied: usize,
    /// Files written (images and thumbnails).
    pub files: usize,
}

fn looks_like_url(s: &str) -> bool {
    s.split_once("://").is_some_and(|(scheme, _)| {
        !scheme.is_empty() && scheme.chars().all(|c| c.is_ascii_alphanumeric() || c == '+')
    })
}

/// Finds an image from the `uri` the results give: a URL, a path (relative to where the
/// job ran, which need not be where the report runs), or a crop inside the job directory.
pub struct Resolver {
    job: Location,
    /// The job directory on this machine, when it is local: relative paths are tried
    /// against each of its ancestors, one of which is where `dnd dissect` ran.
    job_dir: Option<PathBuf>,
    stores: Mutex<HashMap<String, Location>>,
}

impl Resolver {
    pub fn new(job: Location) -> Self {
        let shown = job.to_string();
        let job_dir = (!looks_like_url(&shown))
            .then(|| std::path::absolute(Path::new(&shown)).ok())
            .flatten();
        Self { job, job_dir, stores: Mutex::new(HashMap::new()) }
    }

    fn store_for(&self, parent: &str) -> Result<Location, String> {
        let mut stores = self.stores.lock().map_err(|_| "a lock was poisoned".to_string())?;
        if let Some(loc) = stores.get(parent) {
            return Ok(loc.clone());
        }
        let loc = Location::open(parent).map_err(|e| e.to_string())?;
        stores.insert(parent.to_string(), loc.clone());
        Ok(loc)
    }

    pub async fn fetch(&self, uri: &str) -> Result<Bytes, String> {
        let mut why = String::new();
        if looks_like_url(uri) {
            if let Some((parent, name)) = uri.rsplit_once('/') {
                match self.store_for(parent) {
                    Ok(loc) => match loc.get(name).await {
                        Ok(bytes) => return Ok(bytes),
                        Err(e) => why = e.to_string(),
                    },
                    Err(e) => why = e,
                }
            }
        } else {
            let path = Path::new(uri);
            match tokio::fs::read(path).await {
                Ok(bytes) => return Ok(Bytes::from(bytes)),
                Err(e) => why = format!("{uri}: {e}"),
            }
            if path.is_relative()
                && let Some(dir) = &self.job_dir
            {
                for ancestor in dir.ancestors().skip(1) {
                    if let Ok(bytes) = tokio::fs::read(ancestor.join(path)).await {
                        return Ok(Bytes::from(bytes));
                    }
                }
            }
        }
        // Attention crops live in the job directory: found there wherever it moved.
        if let Some(at) = uri.find("images/crops/")
            && let Ok(bytes) = self.job.get(&uri[at..]).await
        {
            return Ok(bytes);
        }
        Err(why)
    }
}

struct Made {
    uri: String,
    hash: String,
    ext: &'static str,
    full: Bytes,
    thumb: Vec<u8>,
    size: (u32, u32),
    thumb_size: (u32, u32),
}

fn thumbnail(uri: String, bytes: Bytes, px: u32) -> Result<Made, (String, String)> {
    let format =
        image::guess_format(&bytes).map_err(|e| (uri.clone(), format!("not an image ({e})")))?;
    let ext = format.extensions_str().first().copied().unwrap_or("img");
    let img = image::load_from_memory_with_format(&bytes, format)
        .map_err(|e| (uri.clone(), format!("cannot decode it ({e})")))?;
    let size = (img.width(), img.height());
    let small = if img.width() > px || img.height() > px { img.thumbnail(px, px) } else { img };
    let mut thumb = Vec::new();
    small
        .write_to(&mut Cursor::new(&mut thumb), image::ImageFormat::Png)
        .map_err(|e| (uri.clone(), format!("cannot encode its thumbnail ({e})")))?;
    let hash = blake3::hash(&bytes).to_hex()[..32].to_string();
    Ok(Made {
        uri,
        hash,
        ext,
        full: bytes,
        thumb,
        size,
        thumb_size: (small.width(), small.height()),
    })
}

/// Copies every image the results name into `out`.
pub async fn copy_images(
    resolver: &Resolver,
    results: &JobResults,
    out: &Location,
    options: &ReportOptions,
) -> Result<Images, ReportError> {
    let uris: BTreeSet<String> =
        results.neurons.iter().flat_map(|n| n.images.iter().map(|i| i.uri.clone())).collect();
    let written: Mutex<HashSet<String>> = Mutex::new(HashSet::new());
    let px = options.thumb_px.max(16);
    let work = uris.into_iter().map(|uri| {
        let written = &written;
        async move {
            let bytes = match resolver.fetch(&uri).await {
                Ok(b) => b,
                Err(why) => return Ok(Err((uri, why))),
            };
            let made = tokio::task::spawn_blocking(move || thumbnail(uri, bytes, px))
                .await
                .map_err(|e| ReportError::Internal(format!("a thumbnail task failed: {e}")))?;
            let made = match made {
                Ok(m) => m,
                Err(missing) => return Ok(Err(missing)),
            };
            let full = format!("images/{}.{}", made.hash, made.ext);
            let thumb = format!("thumbs/{}.png", made.hash);
            let first = written
                .lock()
                .map_err(|_| ReportError::Internal("a lock was poisoned".into()))?
                .insert(made.hash.clone());
            if first {
                out.put(&full, made.full).await?;
                out.put(&thumb, Bytes::from(made.thumb)).await?;
            }
            let copied = Copied {
                full,
                thumb,
                thumb_width: made.thumb_size.0,
                thumb_height: made.thumb_size.1,
                width: made.size.0,
                height: made.size.1,
            };
            Ok::<_, ReportError>(Ok((made.uri, copied, first)))
        }
    });
    let mut stream = futures::stream::iter(work).buffer_unordered(options.parallel.max(1));
    let mut images = Images::default();
    while let Some(item) = stream.next().await {
        match item? {
            Ok((uri, copied, first)) => {
                if first {
                    images.copied += 1;
                    images.files += 2;
                }
                images.by_uri.insert(uri, copied);
            }
            Err((uri, why)) => {
                tracing::warn!(image = %uri, "cannot put the image in the report: {why}");
                images.missing.push((uri, why));
            }
        }
    }
    images.missing.sort();
    Ok(images)
}

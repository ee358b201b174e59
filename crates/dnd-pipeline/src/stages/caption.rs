//! Stage 2, first half: a caption for each of a neuron's top images, each distinct image
//! (by pixel hash) captioned once per task, through the caption cache.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use image::RgbImage;

use crate::error::PipelineError;
use crate::stages::crop::Evidence;
use crate::workbench::Workbench;

/// The captions of a task's top images.
pub struct Captions {
    /// Every distinct top image of the task, by hash, in hash order.
    pub distinct: Vec<(String, Arc<RgbImage>)>,
    /// Caption of each distinct image and whether the cache had it, by hash.
    by_hash: HashMap<String, (String, bool)>,
}

impl Captions {
    /// The caption of the image with `hash`, and whether the cache answered it.
    pub fn of(&self, hash: &str) -> &(String, bool) {
        &self.by_hash[hash]
    }

    /// The captions of a neuron's top images, in its order.
    pub fn texts<'a>(&self, top: impl IntoIterator<Item = &'a Evidence>) -> Vec<String> {
        top.into_iter().map(|e| self.of(&e.hash).0.clone()).collect()
    }
}

/// Every distinct image among the first `top_n` of each neuron's evidence, by hash.
pub fn distinct_top_images(
    evidence: &[Vec<Evidence>],
    top_n: usize,
) -> Vec<(String, Arc<RgbImage>)> {
    let mut distinct: BTreeMap<String, Arc<RgbImage>> = BTreeMap::new();
    for list in evidence {
        for e in list.iter().take(top_n) {
            distinct.entry(e.hash.clone()).or_insert_with(|| e.image.clone());
        }
    }
    distinct.into_iter().collect()
}

/// Captions the first `top_n` images of every neuron's evidence, misses in batches of
/// `batch_size`.
pub async fn caption_top_images(
    bench: &Workbench,
    evidence: &[Vec<Evidence>],
    top_n: usize,
    batch_size: usize,
) -> Result<Captions, PipelineError> {
    let distinct = distinct_top_images(evidence, top_n);
    let captioned = bench.captions(&distinct, batch_size).await?;
    let by_hash = distinct.iter().map(|(h, _)| h.clone()).zip(captioned).collect();
    Ok(Captions { distinct, by_hash })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn evidence(hash: &str) -> Evidence {
        Evidence {
            image_id: hash.into(),
            crop: None,
            activation: 0.0,
            image: Arc::new(RgbImage::new(1, 1)),
            hash: hash.into(),
            uri: String::new(),
        }
    }

    #[test]
    fn each_top_image_is_captioned_once_and_only_top_images_are() {
        let lists = vec![vec![evidence("b"), evidence("a"), evidence("z")], vec![evidence("a")]];
        let distinct = distinct_top_images(&lists, 2);
        let hashes: Vec<&str> = distinct.iter().map(|(h, _)| h.as_str()).collect();
        assert_eq!(hashes, ["a", "b"]);
        let captions = Captions {
            distinct,
            by_hash: [
                ("a".to_string(), ("one".to_string(), true)),
                ("b".into(), ("two".into(), false)),
            ]
            .into(),
        };
        assert_eq!(captions.texts(lists[0].iter().take(2)), ["two", "one"]);
        assert_eq!(captions.of("a"), &("one".to_string(), true));
    }
}

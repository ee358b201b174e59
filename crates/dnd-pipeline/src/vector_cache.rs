//! Vectors that models compute from images (the target's pooled activations and channel
//! maps, the embedder's image embeddings), cached by the image's pixels (its
//! [`crate::workbench::image_hash`]). A warm run then runs no model on an image it has
//! seen: not on the probe set, the crops or the generated images.
//!
//! A vector's key is the model's identity (its weights' hash), the device kind (GPU and
//! CPU numerics differ in the last bits), what was computed (tap and pooling, a channel's
//! map on a canvas, an embedding) and the image. Values are little-endian f32.

use std::future::Future;

use bytes::Bytes;
use futures::future::try_join_all;
use serde::Serialize;

use dnd_store::{CacheKey, CacheKind, ContentCache};

use crate::error::PipelineError;

/// Lookups and stores in flight at once: on an object store each one is a round trip.
const IN_FLIGHT: usize = 32;

/// One model's vectors in the cache.
#[derive(Clone, Copy)]
pub struct VectorCache<'a> {
    pub cache: &'a ContentCache,
    /// The model's identity (see [`dnd_models::checkpoint::fingerprint`]).
    pub model: &'a str,
    /// `cpu` or `cuda`: where the model runs.
    pub device: &'a str,
}

#[derive(Serialize)]
struct VectorInputs<'a> {
    model: &'a str,
    device: &'a str,
    /// What was computed, e.g. `pooled/layer4/mean`.
    output: &'a str,
    image: &'a str,
}

fn encode(values: &[f32]) -> Bytes {
    Bytes::from(values.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>())
}

fn decode(bytes: &[u8]) -> Option<Vec<f32>> {
    bytes.len().is_multiple_of(4).then(|| {
        bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
    })
}

impl VectorCache<'_> {
    fn key(&self, output: &str, image: &str) -> CacheKey {
        let inputs = VectorInputs { model: self.model, device: self.device, output, image };
        CacheKey::of(CacheKind::Vectors, &inputs)
    }

    /// The cached vector of `image`, if any.
    pub async fn get(&self, output: &str, image: &str) -> Result<Option<Vec<f32>>, PipelineError> {
        let key = self.key(output, image);
        match self.cache.get(&key).await? {
            None => Ok(None),
            Some(bytes) => decode(&bytes).map(Some).ok_or_else(|| {
                PipelineError::Internal(format!(
                    "corrupt vector cache entry {} ({} bytes, not a whole number of f32s); \
                     delete it and run again",
                    self.cache.display_path(&key),
                    bytes.len()
                ))
            }),
        }
    }

    pub async fn put(
        &self,
        output: &str,
        image: &str,
        vector: &[f32],
    ) -> Result<(), PipelineError> {
        Ok(self.cache.put(&self.key(output, image), encode(vector)).await?)
    }

    /// The cached vector of each `(output, image)`, if any, in order; looked up
    /// `IN_FLIGHT` (32) at a time.
    pub async fn get_all(
        &self,
        keys: &[(&str, &str)],
    ) -> Result<Vec<Option<Vec<f32>>>, PipelineError> {
        let mut out = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(IN_FLIGHT) {
            let lookups: Vec<_> = chunk.iter().map(|&(o, image)| self.get(o, image)).collect();
            out.extend(try_join_all(lookups).await?);
        }
        Ok(out)
    }

    /// Stores each `(output, image, vector)`, `IN_FLIGHT` (32) at a time.
    pub async fn put_all(&self, items: &[(&str, &str, &[f32])]) -> Result<(), PipelineError> {
        for chunk in items.chunks(IN_FLIGHT) {
            let stores: Vec<_> = chunk.iter().map(|&(o, image, v)| self.put(o, image, v)).collect();
            try_join_all(stores).await?;
        }
        Ok(())
    }

    /// The vector of every image (by hash), from the cache where it has it; `compute`
    /// gets the indices of the rest (in input order, each once) and returns their
    /// vectors in that order, which are stored.
    pub async fn rows<F, Fut>(
        &self,
        output: &str,
        images: &[String],
        compute: F,
    ) -> Result<Vec<Vec<f32>>, PipelineError>
    where
        F: FnOnce(Vec<usize>) -> Fut,
        Fut: Future<Output = Result<Vec<Vec<f32>>, PipelineError>>,
    {
        let mut first_of: std::collections::HashMap<&str, usize> = Default::default();
        let mut twins = Vec::new();
        let mut distinct = Vec::new();
        for (i, image) in images.iter().enumerate() {
            match first_of.get(image.as_str()) {
                Some(&first) => twins.push((i, first)),
                None => {
                    first_of.insert(image, i);
                    distinct.push(i);
                }
            }
        }
        let keys: Vec<(&str, &str)> =
            distinct.iter().map(|&i| (output, images[i].as_str())).collect();
        let mut out: Vec<Option<Vec<f32>>> = vec![None; images.len()];
        let mut missing = Vec::new();
        for (&i, found) in distinct.iter().zip(self.get_all(&keys).await?) {
            if found.is_none() {
                missing.push(i);
            }
            out[i] = found;
        }
        if !missing.is_empty() {
            let computed = compute(missing.clone()).await?;
            if computed.len() != missing.len() {
                return Err(PipelineError::Internal(format!(
                    "{output}: {} vectors computed for {} images",
                    computed.len(),
                    missing.len()
                )));
            }
            let items: Vec<(&str, &str, &[f32])> = missing
                .iter()
                .zip(&computed)
                .map(|(&i, v)| (output, images[i].as_str(), v.as_slice()))
                .collect();
            self.put_all(&items).await?;
            for (i, vector) in missing.into_iter().zip(computed) {
                out[i] = Some(vector);
            }
        }
        for (i, first) in twins {
            out[i] = out[first].clone();
        }
        Ok(out.into_iter().map(|v| v.expect("every image has its vector")).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dnd_store::Location;

    #[tokio::test]
    async fn computes_each_missing_image_once_and_serves_it_after() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ContentCache::new(Location::open(dir.path().to_str().unwrap()).unwrap());
        let vectors = VectorCache { cache: &cache, model: "m#blake3:1", device: "cpu" };
        let images: Vec<String> = ["a", "b", "a"].map(String::from).to_vec();
        let first = vectors
            .rows("pooled/layer4/mean", &images, |missing| async move {
                assert_eq!(missing, [0, 1], "the twin of image 0 is not computed");
                Ok(vec![vec![1.0, -0.5], vec![f32::MAX, 0.0]])
            })
            .await
            .unwrap();
        assert_eq!(first, [vec![1.0, -0.5], vec![f32::MAX, 0.0], vec![1.0, -0.5]]);
        let again = vectors
            .rows("pooled/layer4/mean", &images, |missing| async move {
                panic!("everything is cached, yet asked for {missing:?}")
            })
            .await
            .unwrap();
        assert_eq!(again, first);
        let other_device = VectorCache { device: "cuda", ..vectors };
        assert_eq!(other_device.get("pooled/layer4/mean", "a").await.unwrap(), None);
    }
}

//! Content-addressed caches in the object store: generated images, captions, LLM replies,
//! and the vectors models compute from images (activations, embeddings).
//!
//! An entry's key is the BLAKE3 hash of everything its value depends on (model identity,
//! inputs, settings), written as canonical JSON, so equal work has equal keys across
//! neurons, tasks, jobs and machines. Entries are immutable: the first writer wins, and a
//! concurrent writer of the same key wrote the same thing.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use serde::Serialize;

use crate::error::StoreError;
use crate::location::Location;

/// What a cache holds; each kind has its own directory and file extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CacheKind {
    /// Generated images (PNG).
    Images,
    /// Captions of images (JSON).
    Captions,
    /// LLM replies (JSON).
    Replies,
    /// A vector a model computed from an image: pooled activations, a channel's map, an
    /// embedding (little-endian f32).
    Vectors,
}

impl CacheKind {
    pub const ALL: [CacheKind; 4] =
        [CacheKind::Images, CacheKind::Captions, CacheKind::Replies, CacheKind::Vectors];

    pub fn name(self) -> &'static str {
        match self {
            CacheKind::Images => "images",
            CacheKind::Captions => "captions",
            CacheKind::Replies => "replies",
            CacheKind::Vectors => "vectors",
        }
    }

    fn extension(self) -> &'static str {
        match self {
            CacheKind::Images => "png",
            CacheKind::Captions | CacheKind::Replies => "json",
            CacheKind::Vectors => "f32",
        }
    }
}

impl fmt::Display for CacheKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The address of one cache entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey {
    pub kind: CacheKind,
    /// 64 hex digits.
    pub hash: String,
}

impl CacheKey {
    /// The key of a value that depends on exactly `inputs`. Struct fields serialise in
    /// declaration order, so the JSON (and the key) is stable for a given type.
    pub fn of(kind: CacheKind, inputs: &impl Serialize) -> Self {
        let json = serde_json::to_vec(inputs).expect("cache key inputs serialise to JSON");
        Self { kind, hash: blake3::hash(&json).to_hex().to_string() }
    }

    /// `<kind>/<first two hex digits>/<hash>.<ext>`: the fan-out keeps directories small.
    pub fn path(&self) -> String {
        format!("{}/{}/{}.{}", self.kind.name(), &self.hash[..2], self.hash, self.kind.extension())
    }
}

/// Hits and misses of one cache kind.
#[derive(Debug, Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
}

/// Hit and miss counts, per kind, since the cache was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct CacheCounts {
    pub hits: u64,
    pub misses: u64,
}

/// A content-addressed cache rooted at a location (`<store root>/cache` by default).
#[derive(Debug)]
pub struct ContentCache {
    root: Location,
    counters: [Counters; 4],
}

impl ContentCache {
    pub fn new(root: Location) -> Self {
        Self { root, counters: Default::default() }
    }

    pub fn root(&self) -> &Location {
        &self.root
    }

    fn counters(&self, kind: CacheKind) -> &Counters {
        &self.counters[kind as usize]
    }

    /// The entry, or `None` on a miss. Counts the hit or miss.
    pub async fn get(&self, key: &CacheKey) -> Result<Option<Bytes>, StoreError> {
        let found = self.root.get_opt(&key.path()).await?;
        let counter = if found.is_some() {
            &self.counters(key.kind).hits
        } else {
            &self.counters(key.kind).misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        Ok(found)
    }

    /// Stores an entry unless one is there already.
    pub async fn put(&self, key: &CacheKey, value: Bytes) -> Result<(), StoreError> {
        self.root.put_if_absent(&key.path(), value).await?;
        Ok(())
    }

    /// Where an entry lives, as a path relative to the cache root.
    pub fn display_path(&self, key: &CacheKey) -> String {
        self.root.display_path(&key.path())
    }

    pub fn counts(&self, kind: CacheKind) -> CacheCounts {
        let c = self.counters(kind);
        CacheCounts {
            hits: c.hits.load(Ordering::Relaxed),
            misses: c.misses.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize)]
    struct ImageInputs<'a> {
        generator: &'a str,
        prompt: &'a str,
        seed: u64,
    }

    #[tokio::test]
    async fn equal_inputs_share_an_entry_and_counts_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ContentCache::new(Location::create(dir.path().to_str().unwrap()).unwrap());
        let key = CacheKey::of(
            CacheKind::Images,
            &ImageInputs { generator: "sd", prompt: "a cat", seed: 0 },
        );
        let same = CacheKey::of(
            CacheKind::Images,
            &ImageInputs { generator: "sd", prompt: "a cat", seed: 0 },
        );
        let other = CacheKey::of(
            CacheKind::Images,
            &ImageInputs { generator: "sd", prompt: "a cat", seed: 1 },
        );
        assert_eq!(key, same);
        assert_ne!(key, other);
        assert!(
            key.path().starts_with(&format!("images/{}/", &key.hash[..2]))
                && key.path().ends_with(".png")
        );

        assert_eq!(cache.get(&key).await.unwrap(), None);
        cache.put(&key, Bytes::from_static(b"first")).await.unwrap();
        cache.put(&same, Bytes::from_static(b"second")).await.unwrap();
        assert_eq!(
            cache.get(&same).await.unwrap(),
            Some(Bytes::from_static(b"first")),
            "entries are immutable"
        );
        assert_eq!(cache.counts(CacheKind::Images), CacheCounts { hits: 1, misses: 1 });
        assert_eq!(cache.counts(CacheKind::Captions), CacheCounts::default());
        assert!(dir.path().join(key.path()).is_file());
    }
}

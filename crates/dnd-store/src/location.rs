//! Where dnd reads and writes: a local directory or any object store URL.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{
    ObjectMeta, ObjectStore, ObjectStoreExt, ObjectStoreScheme, PutMode, PutOptions, PutPayload,
};
use url::Url;

use crate::error::StoreError;
use crate::faults;
use crate::retry::{RetryPolicy, RetryStore};

/// A directory-like place in an object store: the store and a prefix inside it.
///
/// Users write a local path (`out/`, `/data/probe`) or a URL: `file:///abs/path`,
/// `memory:///`, `s3://bucket/prefix`, `gs://bucket/prefix`, `az://container/prefix`.
/// Cloud credentials come from the environment, as each cloud's own tools read them
/// (`AWS_*`, `GOOGLE_*`, `AZURE_*`).
///
/// Every call goes through a [`RetryStore`]: transient failures are retried with backoff
/// (see [`crate::retry`]).
#[derive(Clone)]
pub struct Location {
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    display: String,
}

impl fmt::Debug for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.display)
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.display)
    }
}

fn looks_like_url(s: &str) -> bool {
    s.split_once("://").is_some_and(|(scheme, _)| {
        !scheme.is_empty() && scheme.chars().all(|c| c.is_ascii_alphanumeric() || c == '+')
    }) || s.starts_with("memory:")
}

impl Location {
    /// Opens a location for reading: a local path must exist.
    pub fn open(spec: &str) -> Result<Self, StoreError> {
        Self::parse(spec, false)
    }

    /// Opens a location for writing: a missing local directory is created.
    pub fn create(spec: &str) -> Result<Self, StoreError> {
        Self::parse(spec, true)
    }

    fn parse(spec: &str, create: bool) -> Result<Self, StoreError> {
        let bad = |reason: String| StoreError::BadLocation { location: spec.to_string(), reason };
        if spec.is_empty() {
            return Err(bad("it is empty".into()));
        }
        if !looks_like_url(spec) {
            return Self::local_dir(std::path::Path::new(spec), create).map_err(bad);
        }
        let url = Url::parse(spec).map_err(|e| bad(format!("not a valid URL ({e})")))?;
        let (scheme, prefix) = ObjectStoreScheme::parse(&url).map_err(|e| {
            bad(format!(
                "{e}; dnd understands local paths, file://, memory://, s3://, gs:// and az:// URLs"
            ))
        })?;
        let built =
            |r: object_store::Result<Arc<dyn ObjectStore>>| r.map_err(|e| bad(e.to_string()));
        let store: Arc<dyn ObjectStore> = match scheme {
            ObjectStoreScheme::Local => {
                let path = url.to_file_path().map_err(|_| bad("not a local file URL".into()))?;
                return Self::local_dir(&path, create).map_err(bad);
            }
            ObjectStoreScheme::Memory => Arc::new(InMemory::new()),
            ObjectStoreScheme::AmazonS3 => built(
                object_store::aws::AmazonS3Builder::from_env()
                    .with_url(spec)
                    .build()
                    .map(|s| Arc::new(s) as _),
            )?,
            ObjectStoreScheme::GoogleCloudStorage => built(
                object_store::gcp::GoogleCloudStorageBuilder::from_env()
                    .with_url(spec)
                    .build()
                    .map(|s| Arc::new(s) as _),
            )?,
            ObjectStoreScheme::MicrosoftAzure => built(
                object_store::azure::MicrosoftAzureBuilder::from_env()
                    .with_url(spec)
                    .build()
                    .map(|s| Arc::new(s) as _),
            )?,
            other => {
                return Err(bad(format!(
                    "{other:?} URLs are not supported; use s3://, gs://, az://, file:// or a local path"
                )));
            }
        };
        Ok(Self::opened(store, prefix, spec.trim_end_matches('/')))
    }

    /// A store opened by name: with the process's injected faults, if any (chaos tests).
    fn opened(store: Arc<dyn ObjectStore>, prefix: Path, display: &str) -> Self {
        Self::from_store(faults::wrap_installed(store), prefix, display)
    }

    fn local_dir(path: &std::path::Path, create: bool) -> Result<Self, String> {
        if create {
            std::fs::create_dir_all(path).map_err(|e| format!("cannot create directory: {e}"))?;
        } else if !path.is_dir() {
            return Err(if path.exists() {
                "it is not a directory".into()
            } else {
                "no such directory".into()
            });
        }
        let store = LocalFileSystem::new_with_prefix(path).map_err(|e| e.to_string())?;
        Ok(Self::opened(Arc::new(store), Path::default(), &path.display().to_string()))
    }

    /// A location over an existing store (tests, in-memory pipelines), retried with the
    /// default [`RetryPolicy`].
    pub fn from_store(
        store: Arc<dyn ObjectStore>,
        prefix: Path,
        display: impl Into<String>,
    ) -> Self {
        Self::from_store_with_policy(store, prefix, display, RetryPolicy::default())
    }

    /// A location over an existing store, retried with `policy`.
    pub fn from_store_with_policy(
        store: Arc<dyn ObjectStore>,
        prefix: Path,
        display: impl Into<String>,
        policy: RetryPolicy,
    ) -> Self {
        let store = Arc::new(RetryStore::new(store, policy));
        Self { store, prefix, display: display.into() }
    }

    /// The store, with retries: what every call of this location goes through.
    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// The full store path of `relative` (a `/`-separated path under this location).
    pub fn path(&self, relative: &str) -> Path {
        relative
            .split('/')
            .filter(|p| !p.is_empty())
            .fold(self.prefix.clone(), |p, part| p.clone().join(part))
    }

    /// The location of a sub-directory.
    pub fn join(&self, relative: &str) -> Location {
        Location {
            store: self.store.clone(),
            prefix: self.path(relative),
            display: format!("{}/{}", self.display, relative.trim_matches('/')),
        }
    }

    /// `relative` as users see it (for messages and manifests).
    pub fn display_path(&self, relative: &str) -> String {
        format!("{}/{}", self.display, relative.trim_start_matches('/'))
    }

    /// Path of `path` relative to this location's prefix.
    pub fn relative(&self, path: &Path) -> Option<String> {
        let parts: Vec<_> =
            path.prefix_match(&self.prefix)?.map(|p| p.as_ref().to_string()).collect();
        Some(parts.join("/"))
    }

    fn err(&self, relative: &str, source: object_store::Error) -> StoreError {
        StoreError::ObjectStore { location: self.display_path(relative), source }
    }

    pub async fn put(&self, relative: &str, bytes: Bytes) -> Result<(), StoreError> {
        self.store
            .put(&self.path(relative), PutPayload::from(bytes))
            .await
            .map_err(|e| self.err(relative, e))?;
        Ok(())
    }

    /// Writes only if nothing is there yet; `Ok(false)` when the object already exists.
    /// A retry that finds the object this call wrote (its first response lost) counts as
    /// written; one that finds another writer's is `Ok(false)`.
    pub async fn put_if_absent(&self, relative: &str, bytes: Bytes) -> Result<bool, StoreError> {
        let opts = PutOptions { mode: PutMode::Create, ..Default::default() };
        match self.store.put_opts(&self.path(relative), PutPayload::from(bytes), opts).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(self.err(relative, e)),
        }
    }

    pub async fn get(&self, relative: &str) -> Result<Bytes, StoreError> {
        self.get_path(&self.path(relative)).await
    }

    /// The object, or `None` when there is none.
    pub async fn get_opt(&self, relative: &str) -> Result<Option<Bytes>, StoreError> {
        match self.get(relative).await {
            Ok(bytes) => Ok(Some(bytes)),
            Err(StoreError::ObjectStore {
                source: object_store::Error::NotFound { .. }, ..
            }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Whether an object exists at `relative`.
    pub async fn exists(&self, relative: &str) -> Result<bool, StoreError> {
        match self.store.head(&self.path(relative)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.err(relative, e)),
        }
    }

    pub async fn get_path(&self, path: &Path) -> Result<Bytes, StoreError> {
        let shown = match self.relative(path) {
            Some(relative) => self.display_path(&relative),
            None => format!("{}/{path}", self.display),
        };
        let err = |e| StoreError::ObjectStore { location: shown.clone(), source: e };
        self.store.get(path).await.map_err(err)?.bytes().await.map_err(err)
    }

    /// Every object under this location, recursively, in the store's order.
    pub fn list(&self) -> BoxStream<'static, Result<ObjectMeta, StoreError>> {
        let display = self.display.clone();
        self.store
            .list(Some(&self.prefix))
            .map(move |r| {
                r.map_err(|source| StoreError::ObjectStore { location: display.clone(), source })
            })
            .boxed()
    }

    /// Deletes an object; a missing one is fine.
    pub async fn delete(&self, relative: &str) -> Result<(), StoreError> {
        match self.store.delete(&self.path(relative)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(source) => {
                Err(StoreError::ObjectStore { location: self.display_path(relative), source })
            }
        }
    }

    /// The names of the immediate sub-directories (common prefixes) of `relative`.
    pub async fn list_dirs(&self, relative: &str) -> Result<Vec<String>, StoreError> {
        let prefix = self.path(relative);
        let listing = match self.store.list_with_delimiter(Some(&prefix)).await {
            Ok(l) => l,
            // A local directory that does not exist yet lists as empty, as a bucket prefix does.
            Err(object_store::Error::NotFound { .. }) => return Ok(Vec::new()),
            Err(source) => {
                return Err(StoreError::ObjectStore {
                    location: self.display_path(relative),
                    source,
                });
            }
        };
        let mut names: Vec<String> = listing
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().map(str::to_string))
            .collect();
        names.sort();
        Ok(names)
    }

    /// Every object under `relative`, at any depth, by path relative to it: one listing
    /// (paged by the store), however many objects.
    pub async fn list_all(&self, relative: &str) -> Result<Vec<String>, StoreError> {
        let prefix = self.path(relative);
        let mut listing = self.store.list(Some(&prefix));
        let mut names = Vec::new();
        while let Some(meta) = listing.next().await {
            let meta = match meta {
                Ok(m) => m,
                Err(object_store::Error::NotFound { .. }) => return Ok(Vec::new()),
                Err(source) => {
                    return Err(StoreError::ObjectStore {
                        location: self.display_path(relative),
                        source,
                    });
                }
            };
            if let Some(rest) = meta.location.prefix_match(&prefix) {
                names.push(rest.map(|p| p.as_ref().to_string()).collect::<Vec<_>>().join("/"));
            }
        }
        names.sort();
        Ok(names)
    }

    /// The objects directly in `relative` (not in sub-directories), by path relative to it.
    pub async fn list_files(&self, relative: &str) -> Result<Vec<String>, StoreError> {
        let prefix = self.path(relative);
        let listing = match self.store.list_with_delimiter(Some(&prefix)).await {
            Ok(l) => l,
            // A local directory that does not exist yet lists as empty, as a bucket prefix does.
            Err(object_store::Error::NotFound { .. }) => return Ok(Vec::new()),
            Err(source) => {
                return Err(StoreError::ObjectStore {
                    location: self.display_path(relative),
                    source,
                });
            }
        };
        let mut names: Vec<String> = listing
            .objects
            .iter()
            .filter_map(|o| o.location.filename().map(str::to_string))
            .collect();
        names.sort();
        Ok(names)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn local_directory_round_trip_and_create_only_puts() {
        let dir = tempfile::tempdir().unwrap();
        let loc = Location::create(dir.path().join("out").to_str().unwrap()).unwrap();
        loc.put("a/b.txt", Bytes::from_static(b"hi")).await.unwrap();
        assert!(dir.path().join("out/a/b.txt").is_file());
        assert_eq!(loc.get("a/b.txt").await.unwrap(), Bytes::from_static(b"hi"));
        assert!(loc.put_if_absent("a/marker", Bytes::from_static(b"1")).await.unwrap());
        assert!(!loc.put_if_absent("a/marker", Bytes::from_static(b"2")).await.unwrap());
        assert_eq!(loc.get("a/marker").await.unwrap(), Bytes::from_static(b"1"));
        let listed: Vec<_> = loc.list().collect::<Vec<_>>().await;
        assert_eq!(listed.len(), 2);
        let sub = loc.join("a");
        let rel = sub.relative(&loc.path("a/b.txt")).unwrap();
        assert_eq!(rel, "b.txt");
    }

    #[test]
    fn bad_locations_say_what_is_wrong() {
        let err = Location::open("/definitely/not/here").unwrap_err().to_string();
        assert!(err.contains("/definitely/not/here") && err.contains("no such directory"), "{err}");
        let err = Location::open("ftp://host/x").unwrap_err().to_string();
        assert!(err.contains("ftp://host/x"), "{err}");
        assert!(Location::open("memory:///").is_ok());
    }
}

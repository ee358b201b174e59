//! Retries of store calls, in one place: every store a [`crate::Location`] opens is
//! wrapped in a [`RetryStore`], so every call dnd makes (and the Parquet writer's uploads)
//! retries transient failures with capped exponential backoff and full jitter.
//!
//! What is retried: [`object_store::Error::Generic`] (I/O errors, timeouts, HTTP 5xx and
//! 429 throttling that the store's own client gave up on) and task join errors. What is
//! not: a missing object, a lost create-only race, a failed precondition, auth and
//! configuration errors, unsupported operations: retrying cannot change their answer.
//!
//! The subtle case is a create-only put (a task's commit marker, a cache entry) whose
//! request was applied but whose response was lost. Its retry meets `AlreadyExists`, and
//! the object may be ours or another writer's. The retry reads it back: the same bytes
//! (for a commit marker, the same attempt name) mean the first request went through and
//! the put succeeded; other bytes mean another writer won the race, which is reported as
//! `AlreadyExists` and never retried.

use std::collections::HashSet;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};
use object_store::path::Path;
use object_store::{
    CopyMode, CopyOptions, Error, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta,
    ObjectStore, ObjectStoreExt, PutMode, PutMultipartOptions, PutOptions, PutPayload, PutResult,
    RenameOptions, Result,
};

/// The message of the log line each retry writes; `dnd bench chaos` counts these lines.
pub const RETRY_LOG: &str = "store call failed; retrying";
/// The message of the log line of a call that failed on every attempt.
pub const GAVE_UP_LOG: &str = "store call failed on every attempt; giving up";
/// The message of the log line of a create-only put found, on retry, to be ours.
pub const SETTLED_LOG: &str =
    "a create-only write whose response was lost had been applied: the object is ours";

/// How a failing store call is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Calls made in all, the first included (1 = no retry).
    pub max_attempts: u32,
    /// The longest wait before the first retry; it doubles with each retry.
    pub base: Duration,
    /// The cap on any one wait.
    pub max: Duration,
}

impl Default for RetryPolicy {
    /// Ten attempts over at most about 9 s of waiting: at a 10% failure rate a call gives
    /// up once in 10^10, while an outage longer than that surfaces as an error.
    fn default() -> Self {
        Self { max_attempts: 10, base: Duration::from_millis(50), max: Duration::from_secs(2) }
    }
}

impl RetryPolicy {
    /// The longest wait before retry number `retry` (1 = the first retry):
    /// `base * 2^(retry - 1)`, capped at `max`.
    pub fn cap(&self, retry: u32) -> Duration {
        let doublings = retry.saturating_sub(1).min(31);
        self.base.saturating_mul(1u32 << doublings).min(self.max)
    }

    /// The wait before retry `retry` for a uniform draw `unit` in `[0, 1)`: "full jitter",
    /// anywhere between nothing and the cap, so that clients failing together do not
    /// retry together.
    pub fn delay(&self, retry: u32, unit: f64) -> Duration {
        self.cap(retry).mul_f64(unit.clamp(0.0, 1.0))
    }
}

/// Whether retrying a call that failed with `error` may succeed.
pub fn is_transient(error: &Error) -> bool {
    // `Error` is non-exhaustive: a kind added later is not retried until it is known.
    matches!(error, Error::Generic { .. } | Error::JoinError { .. })
}

/// Retries and give-ups of this process's store calls, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetryCounts {
    /// Retries made (a call that succeeded at its third attempt counts 2).
    pub retries: u64,
    /// Calls that still failed transiently after their last attempt.
    pub gave_up: u64,
    /// Create-only puts whose lost response was found, on retry, to have been applied.
    pub settled: u64,
}

static RETRIES: AtomicU64 = AtomicU64::new(0);
static GAVE_UP: AtomicU64 = AtomicU64::new(0);
static SETTLED: AtomicU64 = AtomicU64::new(0);

/// This process's retry counts so far.
pub fn retry_counts() -> RetryCounts {
    RetryCounts {
        retries: RETRIES.load(Ordering::Relaxed),
        gave_up: GAVE_UP.load(Ordering::Relaxed),
        settled: SETTLED.load(Ordering::Relaxed),
    }
}

/// Runs `call` (given the attempt number, from 1) until it succeeds, fails permanently,
/// or has been tried `policy.max_attempts` times.
async fn with_retries<T, F, Fut>(
    policy: RetryPolicy,
    op: &str,
    path: &Path,
    mut call: F,
) -> Result<T>
where
    F: FnMut(u32) -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let mut attempt = 1;
    loop {
        match call(attempt).await {
            Ok(value) => return Ok(value),
            Err(error) if is_transient(&error) && attempt < policy.max_attempts => {
                let delay = policy.delay(attempt, rand::random::<f64>());
                RETRIES.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    op,
                    path = %path,
                    attempt,
                    delay_ms = delay.as_millis() as u64,
                    %error,
                    "{RETRY_LOG}"
                );
                tokio::time::sleep(delay).await;
                attempt += 1;
            }
            Err(error) => {
                if is_transient(&error) {
                    GAVE_UP.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(op, path = %path, attempts = attempt, %error, "{GAVE_UP_LOG}");
                }
                return Err(error);
            }
        }
    }
}

/// After a create-only write met `AlreadyExists` on a retry: whether the object there is
/// the one this writer sent (`expected`) because an earlier attempt was applied, or
/// another writer's. Ours is a success; another's is the lost race, as `AlreadyExists`.
pub async fn settle_create(
    store: &dyn ObjectStore,
    location: &Path,
    expected: &Bytes,
) -> Result<()> {
    let found = store.get(location).await?.bytes().await?;
    if found == expected {
        SETTLED.fetch_add(1, Ordering::Relaxed);
        tracing::info!(path = %location, "{SETTLED_LOG}");
        Ok(())
    } else {
        Err(Error::AlreadyExists {
            path: location.to_string(),
            source: "another writer created the object first (found on retry)".into(),
        })
    }
}

/// An [`ObjectStore`] whose calls retry transient failures under a [`RetryPolicy`].
///
/// Not retried here: the parts and completion of a multipart upload (a part cannot be
/// sent again through [`MultipartUpload`] without taking a new part number; object
/// store clients retry each part's HTTP request themselves), a rename (dnd does not
/// rename, and a retried rename cannot tell its own success from a missing source), and
/// a response body that breaks mid-read (object_store's HTTP clients resume those).
#[derive(Debug, Clone)]
pub struct RetryStore {
    inner: Arc<dyn ObjectStore>,
    policy: RetryPolicy,
}

impl RetryStore {
    pub fn new(inner: Arc<dyn ObjectStore>, policy: RetryPolicy) -> Self {
        Self { inner, policy }
    }

    pub fn policy(&self) -> RetryPolicy {
        self.policy
    }
}

impl fmt::Display for RetryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Retry({})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for RetryStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        let create = matches!(opts.mode, PutMode::Create);
        let inner = &self.inner;
        with_retries(self.policy, "put", location, |attempt| {
            let (payload, opts) = (payload.clone(), opts.clone());
            async move {
                match inner.put_opts(location, payload.clone(), opts).await {
                    Err(Error::AlreadyExists { .. }) if create && attempt > 1 => {
                        settle_create(inner.as_ref(), location, &Bytes::from(payload)).await?;
                        Ok(PutResult { e_tag: None, version: None, extensions: Default::default() })
                    }
                    other => other,
                }
            }
        })
        .await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        with_retries(self.policy, "put_multipart", location, |_| {
            self.inner.put_multipart_opts(location, opts.clone())
        })
        .await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        with_retries(self.policy, "get", location, |_| {
            self.inner.get_opts(location, options.clone())
        })
        .await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        let (inner, policy) = (self.inner.clone(), self.policy);
        locations
            .then(move |path| {
                let inner = inner.clone();
                async move {
                    let path = path?;
                    with_retries(policy, "delete", &path, |_| {
                        let one = futures::stream::iter([Ok(path.clone())]).boxed();
                        let mut deleted = inner.delete_stream(one);
                        let path = path.clone();
                        async move { deleted.next().await.unwrap_or(Ok(path)) }
                    })
                    .await
                }
            })
            .boxed()
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        let inner = self.inner.clone();
        let prefix = prefix.cloned();
        retrying_list(self.policy, prefix.clone().unwrap_or_default(), move || {
            inner.list(prefix.as_ref())
        })
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, Result<ObjectMeta>> {
        let inner = self.inner.clone();
        let (prefix, offset) = (prefix.cloned(), offset.clone());
        retrying_list(self.policy, prefix.clone().unwrap_or_default(), move || {
            inner.list_with_offset(prefix.as_ref(), &offset)
        })
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        let path = prefix.cloned().unwrap_or_default();
        with_retries(self.policy, "list_with_delimiter", &path, |_| {
            self.inner.list_with_delimiter(prefix)
        })
        .await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        let create = matches!(options.mode, CopyMode::Create);
        let inner = &self.inner;
        with_retries(self.policy, "copy", to, |attempt| {
            let options = options.clone();
            async move {
                match inner.copy_opts(from, to, options).await {
                    // As a create-only put: the copy may be ours, applied before a lost reply.
                    Err(Error::AlreadyExists { .. }) if create && attempt > 1 => {
                        let source = inner.get(from).await?.bytes().await?;
                        settle_create(inner.as_ref(), to, &source).await
                    }
                    other => other,
                }
            }
        })
        .await
    }

    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> Result<()> {
        self.inner.rename_opts(from, to, options).await
    }
}

/// A listing that, when it fails transiently part-way, starts again and skips what it
/// already returned (listings have no order to resume from on every store: the local
/// file system's follows the directory walk).
fn retrying_list(
    policy: RetryPolicy,
    prefix: Path,
    list: impl Fn() -> BoxStream<'static, Result<ObjectMeta>> + Send + 'static,
) -> BoxStream<'static, Result<ObjectMeta>> {
    struct State<L> {
        list: L,
        current: Option<BoxStream<'static, Result<ObjectMeta>>>,
        seen: HashSet<Path>,
        /// Failures since the last new object came.
        failures: u32,
        done: bool,
    }
    let state = State { list, current: None, seen: HashSet::new(), failures: 0, done: false };
    futures::stream::unfold(state, move |mut s| {
        let prefix = prefix.clone();
        async move {
            if s.done {
                return None;
            }
            loop {
                let current = s.current.get_or_insert_with(&s.list);
                match current.next().await {
                    None => return None,
                    Some(Ok(meta)) => {
                        // Only a new object is progress: a restart that fails again
                        // after repeating what came before counts as another failure.
                        if s.seen.insert(meta.location.clone()) {
                            s.failures = 0;
                            return Some((Ok(meta), s));
                        }
                    }
                    Some(Err(error))
                        if is_transient(&error) && s.failures + 1 < policy.max_attempts =>
                    {
                        s.failures += 1;
                        let delay = policy.delay(s.failures, rand::random::<f64>());
                        RETRIES.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(
                            op = "list",
                            path = %prefix,
                            attempt = s.failures,
                            delay_ms = delay.as_millis() as u64,
                            %error,
                            "{RETRY_LOG}"
                        );
                        tokio::time::sleep(delay).await;
                        s.current = None;
                    }
                    Some(Err(error)) => {
                        if is_transient(&error) {
                            GAVE_UP.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(op = "list", path = %prefix, attempts = s.failures + 1, %error, "{GAVE_UP_LOG}");
                        }
                        s.done = true;
                        return Some((Err(error), s));
                    }
                }
            }
        }
        .boxed()
    })
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_doubles_from_base_up_to_the_cap_and_jitters_below_it() {
        let policy = RetryPolicy {
            max_attempts: 10,
            base: Duration::from_millis(50),
            max: Duration::from_secs(2),
        };
        let caps: Vec<u64> = (1..=8).map(|r| policy.cap(r).as_millis() as u64).collect();
        assert_eq!(caps, [50, 100, 200, 400, 800, 1600, 2000, 2000]);
        assert_eq!(policy.cap(0), policy.base, "retry 0 is read as the first");
        assert_eq!(policy.cap(u32::MAX), policy.max, "no overflow however many retries");
        for retry in 1..=8 {
            assert_eq!(policy.delay(retry, 0.0), Duration::ZERO);
            assert_eq!(policy.delay(retry, 0.5), policy.cap(retry) / 2);
            assert!(policy.delay(retry, 0.999_999) <= policy.cap(retry));
            assert_eq!(policy.delay(retry, 7.0), policy.cap(retry), "draws are clamped");
        }
    }

    #[test]
    fn only_failures_a_retry_can_fix_are_transient() {
        let source = || -> Box<dyn std::error::Error + Send + Sync> { "x".into() };
        let path = || "p".to_string();
        let transient = [Error::Generic { store: "S3", source: source() }];
        let permanent = [
            Error::NotFound { path: path(), source: source() },
            Error::AlreadyExists { path: path(), source: source() },
            Error::Precondition { path: path(), source: source() },
            Error::NotModified { path: path(), source: source() },
            Error::PermissionDenied { path: path(), source: source() },
            Error::Unauthenticated { path: path(), source: source() },
            Error::NotSupported { source: source() },
            Error::NotImplemented { operation: "x".into(), implementer: "y".into() },
            Error::UnknownConfigurationKey { store: "S3", key: "k".into() },
        ];
        for e in &transient {
            assert!(is_transient(e), "{e}");
        }
        for e in &permanent {
            assert!(!is_transient(e), "{e}");
        }
    }
}

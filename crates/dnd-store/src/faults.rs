//! Fault injection for chaos tests: an [`ObjectStore`] wrapper that fails a set share of
//! calls the ways real object stores do, so that the retries of [`crate::retry`] and the
//! exactly-once commit are exercised end to end (`dnd bench chaos`).
//!
//! Kinds of fault, each with its own rate:
//! - `error`: the call fails before reaching the store (a reset connection);
//! - `timeout`: the call hangs for `timeout_ms`, then fails without reaching the store;
//! - `throttle`: the call is refused as a 503 SlowDown would refuse it;
//! - `after_apply`: the call reaches the store and takes effect, then its response is lost
//!   and the caller sees an error: the case that makes a retried create-only put meet its
//!   own object.
//!
//! A process turns it on for every store it opens with [`install`]; the `dnd` binary
//! does so when [`FAULTS_ENV`] is set (`error=0.05,timeout=0.02,throttle=0.05,
//! after_apply=0.02,seed=7`). Production never sets it.

use std::collections::VecDeque;
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};
use object_store::path::Path;
use object_store::{
    CopyOptions, Error, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta,
    ObjectStore, PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions, Result,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The environment variable the `dnd` binary reads its fault settings from.
pub const FAULTS_ENV: &str = "DND_STORE_FAULTS";

/// The message of the log line each injected fault writes; `dnd bench chaos` counts them.
pub const FAULT_LOG: &str = "injected store fault";

/// A way a store call fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultKind {
    Error,
    Timeout,
    Throttle,
    AfterApply,
}

impl FaultKind {
    pub const ALL: [FaultKind; 4] =
        [FaultKind::Error, FaultKind::Timeout, FaultKind::Throttle, FaultKind::AfterApply];

    /// As [`FAULTS_ENV`] and the log lines spell it.
    pub const fn name(self) -> &'static str {
        match self {
            FaultKind::Error => "error",
            FaultKind::Timeout => "timeout",
            FaultKind::Throttle => "throttle",
            FaultKind::AfterApply => "after_apply",
        }
    }

    /// The error the caller sees.
    fn error(self, timeout: Duration) -> Error {
        let message = match self {
            FaultKind::Error => "injected fault: connection reset by peer".to_string(),
            FaultKind::Timeout => {
                format!("injected fault: no response within {} ms", timeout.as_millis())
            }
            FaultKind::Throttle => {
                "injected fault: 503 Service Unavailable (SlowDown): reduce your request rate"
                    .to_string()
            }
            FaultKind::AfterApply => {
                "injected fault: the request was applied but its response was lost".to_string()
            }
        };
        Error::Generic { store: "faults", source: message.into() }
    }
}

/// A bad fault setting, with what would work.
#[derive(Debug, thiserror::Error)]
#[error(
    "invalid store fault setting `{setting}`: {reason}; write e.g. `error=0.05,timeout=0.02,throttle=0.05,after_apply=0.02,seed=7,timeout_ms=200` (rates from 0 to 1, adding up to at most 1)"
)]
pub struct FaultConfigError {
    pub setting: String,
    pub reason: String,
}

/// The share of calls failing each way, and the seed of the draws.
#[derive(Debug, Clone, PartialEq)]
pub struct FaultConfig {
    pub error: f64,
    pub timeout: f64,
    pub throttle: f64,
    pub after_apply: f64,
    pub seed: u64,
    /// How long a `timeout` fault hangs before it fails.
    pub timeout_after: Duration,
}

impl Default for FaultConfig {
    fn default() -> Self {
        Self {
            error: 0.0,
            timeout: 0.0,
            throttle: 0.0,
            after_apply: 0.0,
            seed: 0,
            timeout_after: Duration::from_millis(200),
        }
    }
}

impl FaultConfig {
    fn rate(&self, kind: FaultKind) -> f64 {
        match kind {
            FaultKind::Error => self.error,
            FaultKind::Timeout => self.timeout,
            FaultKind::Throttle => self.throttle,
            FaultKind::AfterApply => self.after_apply,
        }
    }

    /// The share of calls that fail one way or another.
    pub fn total_rate(&self) -> f64 {
        FaultKind::ALL.iter().map(|&k| self.rate(k)).sum()
    }
}

impl FromStr for FaultConfig {
    type Err = FaultConfigError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut config = FaultConfig::default();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let bad = |reason: String| FaultConfigError { setting: part.to_string(), reason };
            let (key, value) =
                part.split_once('=').ok_or_else(|| bad("expected KEY=VALUE".into()))?;
            let (key, value) = (key.trim(), value.trim());
            let rate = || -> Result<f64, FaultConfigError> {
                let rate: f64 =
                    value.parse().map_err(|_| bad(format!("`{value}` is not a number")))?;
                if (0.0..=1.0).contains(&rate) {
                    Ok(rate)
                } else {
                    Err(bad("a rate is between 0 and 1".into()))
                }
            };
            let integer = || -> Result<u64, FaultConfigError> {
                value.parse().map_err(|_| bad(format!("`{value}` is not a whole number")))
            };
            match key {
                "error" => config.error = rate()?,
                "timeout" => config.timeout = rate()?,
                "throttle" => config.throttle = rate()?,
                "after_apply" => config.after_apply = rate()?,
                "seed" => config.seed = integer()?,
                "timeout_ms" => config.timeout_after = Duration::from_millis(integer()?),
                other => {
                    return Err(bad(format!(
                        "unknown key `{other}` (known: error, timeout, throttle, after_apply, seed, timeout_ms)"
                    )));
                }
            }
        }
        if config.total_rate() > 1.0 + 1e-9 {
            return Err(FaultConfigError {
                setting: text.to_string(),
                reason: format!("the rates add up to {:.3}, more than 1", config.total_rate()),
            });
        }
        Ok(config)
    }
}

impl fmt::Display for FaultConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "error={},timeout={},throttle={},after_apply={},seed={},timeout_ms={}",
            self.error,
            self.timeout,
            self.throttle,
            self.after_apply,
            self.seed,
            self.timeout_after.as_millis()
        )
    }
}

/// Faults injected so far, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultCounts {
    pub error: u64,
    pub timeout: u64,
    pub throttle: u64,
    pub after_apply: u64,
}

impl FaultCounts {
    pub fn total(&self) -> u64 {
        self.error + self.timeout + self.throttle + self.after_apply
    }
}

enum Plan {
    /// Each call draws its fate with the configured rates.
    Random(Box<ChaCha8Rng>),
    /// The next calls' fates, in order (tests); no fault once it runs out.
    Script(VecDeque<Option<FaultKind>>),
}

/// Decides which calls fail; shared by every [`FaultStore`] of a process, so that the
/// rates hold over all of its calls.
pub struct FaultInjector {
    config: FaultConfig,
    plan: Mutex<Plan>,
    counts: [AtomicU64; 4],
}

impl fmt::Debug for FaultInjector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FaultInjector({})", self.config)
    }
}

impl FaultInjector {
    /// Random faults at the configured rates, seeded.
    pub fn new(config: FaultConfig) -> Arc<Self> {
        let rng = Box::new(ChaCha8Rng::seed_from_u64(config.seed));
        Arc::new(Self { config, plan: Mutex::new(Plan::Random(rng)), counts: Default::default() })
    }

    /// Exactly these fates for the next calls, in the order the calls are made (`None`: the
    /// call goes through); then no more faults.
    pub fn scripted(
        fates: impl IntoIterator<Item = Option<FaultKind>>,
        timeout_after: Duration,
    ) -> Arc<Self> {
        let config = FaultConfig { timeout_after, ..FaultConfig::default() };
        let plan = Plan::Script(fates.into_iter().collect());
        Arc::new(Self { config, plan: Mutex::new(plan), counts: Default::default() })
    }

    pub fn config(&self) -> &FaultConfig {
        &self.config
    }

    pub fn counts(&self) -> FaultCounts {
        let c = |k: FaultKind| self.counts[k as usize].load(Ordering::Relaxed);
        FaultCounts {
            error: c(FaultKind::Error),
            timeout: c(FaultKind::Timeout),
            throttle: c(FaultKind::Throttle),
            after_apply: c(FaultKind::AfterApply),
        }
    }

    /// The fate of the next call; counts and logs a fault.
    fn draw(&self, op: &str, path: &Path) -> Option<FaultKind> {
        let fate = {
            let mut plan = self.plan.lock().unwrap_or_else(|e| e.into_inner());
            match &mut *plan {
                Plan::Script(fates) => fates.pop_front().flatten(),
                Plan::Random(rng) => {
                    let mut u: f64 = rng.random();
                    FaultKind::ALL.into_iter().find(|&kind| {
                        u -= self.config.rate(kind);
                        u < 0.0
                    })
                }
            }
        };
        if let Some(kind) = fate {
            self.counts[kind as usize].fetch_add(1, Ordering::Relaxed);
            tracing::info!(kind = kind.name(), op, path = %path, "{FAULT_LOG}");
        }
        fate
    }

    /// How many objects a failing listing returns before its error: a few, so that the
    /// retry has to skip what it already has.
    fn list_cutoff(&self) -> usize {
        let mut plan = self.plan.lock().unwrap_or_else(|e| e.into_inner());
        match &mut *plan {
            Plan::Script(_) => 1,
            Plan::Random(rng) => rng.random_range(0..4),
        }
    }

    /// Before a call: `Err` for a fault that stops it (after the hang of a timeout),
    /// `Ok(true)` when the call is to go through and then lose its response.
    async fn before(&self, op: &str, path: &Path) -> Result<bool> {
        match self.draw(op, path) {
            None => Ok(false),
            Some(FaultKind::AfterApply) => Ok(true),
            Some(kind) => {
                if kind == FaultKind::Timeout {
                    tokio::time::sleep(self.config.timeout_after).await;
                }
                Err(kind.error(self.config.timeout_after))
            }
        }
    }

    fn lost_response(&self) -> Error {
        FaultKind::AfterApply.error(self.config.timeout_after)
    }
}

/// The result of a call that went through, as the caller sees it: an error instead of
/// success when its response is to be lost.
fn after<T>(injector: &FaultInjector, lose: bool, result: Result<T>) -> Result<T> {
    let value = result?;
    if lose { Err(injector.lost_response()) } else { Ok(value) }
}

/// An [`ObjectStore`] whose calls fail as its [`FaultInjector`] decides.
///
/// Faults are injected into every call that [`crate::retry::RetryStore`] retries: puts
/// (create-only ones included), gets and heads, deletes, listings (part-way through) and
/// copies; into the start of a multipart upload before it reaches the store only; never
/// into renames, upload parts or completions, which are not retried at dnd's level.
#[derive(Debug, Clone)]
pub struct FaultStore {
    inner: Arc<dyn ObjectStore>,
    injector: Arc<FaultInjector>,
}

impl FaultStore {
    pub fn new(inner: Arc<dyn ObjectStore>, injector: Arc<FaultInjector>) -> Self {
        Self { inner, injector }
    }

    pub fn injector(&self) -> &Arc<FaultInjector> {
        &self.injector
    }

    fn failing_list(
        &self,
        op: &'static str,
        prefix: Option<&Path>,
        listing: BoxStream<'static, Result<ObjectMeta>>,
    ) -> BoxStream<'static, Result<ObjectMeta>> {
        let Some(kind) = self.injector.draw(op, &prefix.cloned().unwrap_or_default()) else {
            return listing;
        };
        let cutoff = self.injector.list_cutoff();
        let timeout = self.injector.config.timeout_after;
        let failure = async move {
            if kind == FaultKind::Timeout {
                tokio::time::sleep(timeout).await;
            }
            Err(kind.error(timeout))
        };
        listing.take(cutoff).chain(futures::stream::once(failure)).boxed()
    }
}

impl fmt::Display for FaultStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Faults({})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for FaultStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        let lose = self.injector.before("put", location).await?;
        after(&self.injector, lose, self.inner.put_opts(location, payload, opts).await)
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        // A started upload whose reply is lost would only leave an orphan upload behind:
        // `after_apply` fails it before it reaches the store, as the others do.
        if self.injector.before("put_multipart", location).await? {
            return Err(self.injector.lost_response());
        }
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        let lose = self.injector.before("get", location).await?;
        after(&self.injector, lose, self.inner.get_opts(location, options).await)
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        let (inner, injector) = (self.inner.clone(), self.injector.clone());
        locations
            .then(move |path| {
                let (inner, injector) = (inner.clone(), injector.clone());
                async move {
                    let path = path?;
                    let lose = injector.before("delete", &path).await?;
                    let one = futures::stream::iter([Ok(path.clone())]).boxed();
                    let deleted = inner.delete_stream(one).next().await.unwrap_or(Ok(path));
                    after(&injector, lose, deleted)
                }
                .boxed()
            })
            .boxed()
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.failing_list("list", prefix, self.inner.list(prefix))
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, Result<ObjectMeta>> {
        self.failing_list("list", prefix, self.inner.list_with_offset(prefix, offset))
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        let path = prefix.cloned().unwrap_or_default();
        let lose = self.injector.before("list_with_delimiter", &path).await?;
        after(&self.injector, lose, self.inner.list_with_delimiter(prefix).await)
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        let lose = self.injector.before("copy", to).await?;
        after(&self.injector, lose, self.inner.copy_opts(from, to, options).await)
    }

    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> Result<()> {
        self.inner.rename_opts(from, to, options).await
    }
}

static INSTALLED: OnceLock<Arc<FaultInjector>> = OnceLock::new();

/// Makes every store this process opens by name from now on ([`crate::Location::open`],
/// [`crate::Location::create`]) inject faults as `config` says. For chaos tests only.
/// Once per process: `false` when faults were installed already.
pub fn install(config: FaultConfig) -> bool {
    let injector = FaultInjector::new(config);
    let installed = INSTALLED.set(injector.clone()).is_ok();
    if installed {
        tracing::warn!(faults = %injector.config, "injecting faults into every store call (chaos testing)");
    }
    installed
}

/// The faults injected in this process so far, when [`install`] was called.
pub fn installed_counts() -> Option<FaultCounts> {
    INSTALLED.get().map(|i| i.counts())
}

/// `store` with the installed faults, or as it is.
pub(crate) fn wrap_installed(store: Arc<dyn ObjectStore>) -> Arc<dyn ObjectStore> {
    match INSTALLED.get() {
        Some(injector) => Arc::new(FaultStore::new(store, injector.clone())),
        None => store,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_parse_print_back_and_say_what_is_wrong() {
        let config: FaultConfig =
            "error=0.05, timeout=0.02,throttle=0.05,after_apply=0.02,seed=7,timeout_ms=50"
                .parse()
                .unwrap();
        assert_eq!(config.seed, 7);
        assert_eq!(config.timeout_after, Duration::from_millis(50));
        assert!((config.total_rate() - 0.14).abs() < 1e-9);
        assert_eq!(config.to_string().parse::<FaultConfig>().unwrap(), config);
        assert_eq!("".parse::<FaultConfig>().unwrap(), FaultConfig::default());
        for (bad, says) in [
            ("error=2", "between 0 and 1"),
            ("error=lots", "not a number"),
            ("errors=0.1", "unknown key `errors`"),
            ("seed=-1", "not a whole number"),
            ("error", "KEY=VALUE"),
            ("error=0.6,throttle=0.6", "more than 1"),
        ] {
            let err = bad.parse::<FaultConfig>().unwrap_err().to_string();
            assert!(err.contains(says) && err.contains("error=0.05"), "{bad}: {err}");
        }
    }

    #[test]
    fn random_faults_come_at_their_rates_and_repeat_with_the_seed() {
        let config = FaultConfig {
            error: 0.1,
            timeout: 0.05,
            throttle: 0.1,
            after_apply: 0.05,
            seed: 3,
            ..FaultConfig::default()
        };
        let fates = |config: &FaultConfig| {
            let injector = FaultInjector::new(config.clone());
            let fates: Vec<_> =
                (0..10_000).map(|_| injector.draw("get", &Path::default())).collect();
            (fates, injector.counts())
        };
        let (first, counts) = fates(&config);
        assert_eq!(fates(&config).0, first, "the same seed draws the same faults");
        let share = |n: u64| n as f64 / 10_000.0;
        assert!((share(counts.error) - 0.1).abs() < 0.02, "{counts:?}");
        assert!((share(counts.timeout) - 0.05).abs() < 0.02, "{counts:?}");
        assert!((share(counts.throttle) - 0.1).abs() < 0.02, "{counts:?}");
        assert!((share(counts.after_apply) - 0.05).abs() < 0.02, "{counts:?}");
        assert_eq!(counts.total(), first.iter().flatten().count() as u64);
    }
}

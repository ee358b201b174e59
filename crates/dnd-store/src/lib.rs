//! dnd-store: object store locations, the Arrow schemas of dnd's tables, Parquet writers
//! and readers, content-addressed caches, and exactly-once task outputs.

pub mod cache;
pub mod error;
pub mod faults;
pub mod location;
pub mod parquet_sink;
pub mod results;
pub mod retry;
pub mod rows;
pub mod tables;
pub mod tasks;

pub use cache::{CacheCounts, CacheKey, CacheKind, ContentCache};
pub use error::StoreError;
pub use location::Location;
pub use parquet_sink::{ParquetSink, write_parquet};
pub use results::ResultTable;
pub use retry::{RetryPolicy, RetryStore};
pub use rows::{batches_rows, read_parquet, rows_batch};
pub use tasks::TaskStore;

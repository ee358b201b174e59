//! dnd-store: object store locations, the Arrow schemas of dnd's tables, and streaming
//! Parquet writers.

pub mod error;
pub mod location;
pub mod parquet_sink;
pub mod tables;

pub use error::StoreError;
pub use location::Location;
pub use parquet_sink::{ParquetSink, write_parquet};

use thiserror::Error;

/// Errors of dnd's storage layer.
#[derive(Debug, Error)]
pub enum StoreError {
    /// A location a user gave that cannot be used; `help` says what would work.
    #[error("invalid location `{location}`: {reason}")]
    BadLocation { location: String, reason: String },

    #[error("{location}: {source}")]
    ObjectStore { location: String, source: object_store::Error },

    #[error("writing {location}: {source}")]
    Parquet { location: String, source: parquet::errors::ParquetError },

    #[error("building a record batch for {table}: {source}")]
    Arrow { table: String, source: arrow::error::ArrowError },
}

impl StoreError {
    /// True when the error is about something the user gave, not a failure inside dnd.
    pub fn is_user_error(&self) -> bool {
        match self {
            StoreError::BadLocation { .. } => true,
            StoreError::ObjectStore { source, .. } => {
                matches!(
                    source,
                    object_store::Error::NotFound { .. }
                        | object_store::Error::PermissionDenied { .. }
                        | object_store::Error::Unauthenticated { .. }
                )
            }
            _ => false,
        }
    }
}

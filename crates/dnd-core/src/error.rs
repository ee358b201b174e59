use thiserror::Error;

/// Errors of dnd's pure core: every one is about an input a user controls.
#[derive(Debug, Error)]
pub enum CoreError {
    #[error("invalid {field}: {reason}")]
    Invalid { field: String, reason: String },
    #[error("shape mismatch: {0}")]
    Shape(String),
}

impl CoreError {
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        CoreError::Invalid { field: field.into(), reason: reason.into() }
    }
}

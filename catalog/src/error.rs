//! The catalog's error vocabulary. Each variant maps to exactly one gRPC
//! status at the service edge; messages tell the caller what to do.

/// Errors from catalog and lifecycle operations.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    /// The object is in the wrong state for the operation.
    #[error("{0}")]
    InvalidState(String),
    /// A lease (or a concurrent writer) holds the object.
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    InvalidArgument(String),
    /// An offset past what exists (a stream's head, say).
    #[error("{0}")]
    OutOfRange(String),
    /// The backing store failed; the request may be retried.
    #[error("catalog storage failed: {0}")]
    Storage(String),
}

impl From<sqlx::Error> for CatalogError {
    fn from(err: sqlx::Error) -> Self {
        match &err {
            sqlx::Error::Database(db) if db.is_unique_violation() => {
                CatalogError::AlreadyExists(format!("already exists: {}", db.message()))
            }
            sqlx::Error::Database(db) if db.is_foreign_key_violation() => {
                CatalogError::NotFound("a referenced payload does not exist; create it first".to_string())
            }
            _ => CatalogError::Storage(err.to_string()),
        }
    }
}

pub type Result<T, E = CatalogError> = std::result::Result<T, E>;

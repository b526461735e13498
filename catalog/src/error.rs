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
    /// The backing store is unavailable (locked, down, full); the request
    /// may be retried.
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
            sqlx::Error::Database(db) if !transient_code(db.code().as_deref()) => {
                // The database refused this statement: retrying it cannot help.
                CatalogError::InvalidArgument(format!(
                    "the catalog refused the request (code {}): {}",
                    db.code().unwrap_or_default(),
                    db.message()
                ))
            }
            _ => CatalogError::Storage(err.to_string()),
        }
    }
}

/// Whether a database error code means "try again later" (a lock, a lost
/// connection, a full disk, a shutdown) rather than "this statement is bad".
/// PostgreSQL codes are SQLSTATEs; SQLite codes are (extended) result codes.
fn transient_code(code: Option<&str>) -> bool {
    let Some(code) = code else { return true };
    if let Ok(sqlite) = code.parse::<u32>() {
        // BUSY, LOCKED, NOMEM, IOERR, FULL, CANTOPEN, PROTOCOL (primary code in the low byte).
        return matches!(sqlite & 0xff, 5 | 6 | 7 | 10 | 13 | 14 | 15);
    }
    // Connection, resources, operator intervention, system errors,
    // serialization failures and lock timeouts.
    ["08", "53", "57", "58", "40", "55P03", "XX"]
        .iter()
        .any(|prefix| code.starts_with(prefix))
}

pub type Result<T, E = CatalogError> = std::result::Result<T, E>;

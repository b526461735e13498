//! The catalog's error vocabulary. Each variant maps to exactly one gRPC
//! status at the service edge; messages tell the caller what to do.

/// Errors from catalog and lifecycle operations.
// Serde: a remote catalog (the operator's) sends them to agents as they are.
#[derive(Debug, thiserror::Error, serde::Serialize, serde::Deserialize)]
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
                tracing::debug!(message = db.message(), "unique key violation");
                CatalogError::AlreadyExists("already exists (a unique key of the catalog)".to_string())
            }
            sqlx::Error::Database(db) if db.is_foreign_key_violation() => {
                CatalogError::NotFound("a referenced payload does not exist; create it first".to_string())
            }
            sqlx::Error::Database(db) if !transient_code(db.code().as_deref()) => {
                // The database refused this statement: retrying it cannot
                // help. Its own text is for the log, not for clients.
                let code = db.code().unwrap_or_default().into_owned();
                tracing::warn!(%code, message = db.message(), "the catalog refused a statement");
                CatalogError::InvalidArgument(format!(
                    "the catalog refused the request (code {code}; the agent's log has its reason)"
                ))
            }
            _ => CatalogError::Storage(err.to_string()),
        }
    }
}

/// Whether a database error code means "try again later" rather than "this
/// statement can never succeed". Only errors about the data itself are
/// permanent; anything else (a lock, a lost connection, a full disk, a
/// failover, a revoked grant, a rotated password) is an outage an operator
/// can end, so the write waits for it. PostgreSQL codes are SQLSTATEs;
/// SQLite codes are (extended) result codes.
fn transient_code(code: Option<&str>) -> bool {
    let Some(code) = code else { return true };
    // A SQLSTATE is always five characters (and may be all digits, as
    // 53100 is); SQLite's extended result codes have at most four digits.
    if code.len() == 5 {
        // Data exceptions, integrity violations, program limits (a row too
        // large for an index).
        return !["22", "23", "54"].iter().any(|class| code.starts_with(class));
    }
    match code.parse::<u32>() {
        // TOOBIG, CONSTRAINT (a trigger's abort too), MISMATCH, RANGE
        // (the primary code is the low byte).
        Ok(sqlite) => !matches!(sqlite & 0xff, 18 | 19 | 20 | 25),
        Err(_) => true,
    }
}

pub type Result<T, E = CatalogError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::transient_code;

    #[test]
    fn outages_are_transient_and_bad_statements_are_not_on_both_backends() {
        // PostgreSQL: disk full, too many connections, connection failure,
        // admin shutdown, serialization failure, a failover to a read-only
        // standby, a rotated password, a revoked grant, a statement timeout.
        for code in [
            "53100", "53300", "08006", "57P01", "40001", "58030", "25006", "28P01", "42501", "57014",
        ] {
            assert!(transient_code(Some(code)), "{code}");
        }
        // PostgreSQL: a NUL byte, a row too large for an index, a check violation.
        for code in ["22021", "54000", "23514"] {
            assert!(!transient_code(Some(code)), "{code}");
        }
        // SQLite: BUSY, BUSY_SNAPSHOT (517), FULL; a trigger's abort (1811) is not.
        for code in ["5", "517", "13"] {
            assert!(transient_code(Some(code)), "{code}");
        }
        assert!(!transient_code(Some("1811")));
    }
}

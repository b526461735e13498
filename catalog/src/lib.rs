//! The catalog domain of Payload Manager: identifiers, states and the
//! lifecycle state machine, and the repository that stores payload rows,
//! lineage, metadata and streams, on SQLite or PostgreSQL. No gRPC and no
//! Kubernetes here.

pub mod error;
pub mod follow;
pub mod lifecycle;
pub mod model;
pub mod objects;
pub mod policy;
pub mod remote;
pub mod repo;
pub mod sql;
pub mod stream;
#[cfg(feature = "testing")]
pub mod testing;

pub use error::{CatalogError, Result};
pub use model::*;
pub use objects::{BlockHash, BlockState, BlockStats, CopyRecord, Manifest, BLOCK_SIZE};
pub use policy::{Policy, NAMESPACE_LABEL};
pub use repo::{EventPage, ListQuery, MetadataEvent, Page, PageToken, Repository, Scope, Write};
pub use sql::postgres::PgRepository;
pub use sql::sqlite::SqliteRepository;
pub use stream::{AppendItem, ReadQuery, Retention, StreamEntry, StreamHead, StreamKey, StreamOwner};

/// A catalog URL fit for logs and error messages: any password replaced
/// by `***`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    match rest.split_once('@') {
        Some((user_info, host)) if user_info.contains(':') => {
            let user = user_info.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:***@{host}")
        }
        _ => url.to_string(),
    }
}

/// Opens the catalog a URL names, for node `node`: `sqlite:` (a file) or
/// `postgres://` / `postgresql://` (a shared server).
pub async fn open_catalog(url: &str, node: &str) -> Result<std::sync::Arc<dyn Repository>> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(std::sync::Arc::new(PgRepository::connect(url, node).await?))
    } else if url.starts_with("sqlite:") {
        Ok(std::sync::Arc::new(SqliteRepository::open_url(url, node).await?))
    } else {
        Err(CatalogError::InvalidArgument(format!(
            "catalog URL {:?} names no backend this agent knows; use sqlite:PATH or postgres://USER@HOST:PORT/DB",
            redact_url(url)
        )))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn passwords_never_reach_messages() {
        assert_eq!(
            super::redact_url("postgres://pm:s3cret@db:5432/x"),
            "postgres://pm:***@db:5432/x"
        );
        assert_eq!(super::redact_url("postgres://pm@db/x"), "postgres://pm@db/x");
        assert_eq!(super::redact_url("sqlite:///a/b.db"), "sqlite:///a/b.db");
    }
}

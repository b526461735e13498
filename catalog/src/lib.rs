//! The catalog domain of Payload Manager: identifiers, states and the
//! lifecycle state machine, and the repository that stores payload rows,
//! lineage and metadata. No gRPC and no Kubernetes here.

pub mod error;
pub mod lifecycle;
pub mod model;
pub mod repo;
pub mod sqlite;

pub use error::{CatalogError, Result};
pub use model::*;
pub use repo::{ListQuery, MetadataEvent, Page, PageToken, Repository, Write};
pub use sqlite::SqliteRepository;

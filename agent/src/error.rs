//! The agent's errors, mapped once to gRPC statuses ([`AgentError::status`]).
//! Catalog errors convert in; the catalog's own text about an outage goes to
//! the log, and the caller gets a message that says what to do.

use payload_catalog::CatalogError;
use tonic::Status;

#[derive(Clone, Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    /// The payload (or lease) is in the wrong state for the call.
    #[error("{0}")]
    InvalidState(String),
    /// A lease or a concurrent change holds the payload.
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    OutOfRange(String),
    /// The catalog cannot be reached or written; `detail` (database text)
    /// is logged, never sent to clients.
    #[error("the catalog is unavailable: {detail}")]
    CatalogUnavailable { detail: String },
    /// The node cannot take this work now (its own words, safe to send).
    #[error("{0}")]
    Unavailable(String),
    /// A file operation on the node failed.
    #[error("{what}: {detail}")]
    Io { what: String, detail: String },
    /// Bytes do not match their recorded SHA-256.
    #[error("{0}")]
    Integrity(String),
    /// The caller is not allowed this (the message names the rule).
    #[error("{0}")]
    PermissionDenied(String),
}

impl From<CatalogError> for AgentError {
    fn from(err: CatalogError) -> Self {
        match err {
            CatalogError::NotFound(m) => AgentError::NotFound(m),
            CatalogError::AlreadyExists(m) => AgentError::AlreadyExists(m),
            CatalogError::InvalidState(m) => AgentError::InvalidState(m),
            CatalogError::Conflict(m) => AgentError::Conflict(m),
            CatalogError::ResourceExhausted(m) => AgentError::ResourceExhausted(m),
            CatalogError::InvalidArgument(m) => AgentError::InvalidArgument(m),
            CatalogError::OutOfRange(m) => AgentError::OutOfRange(m),
            CatalogError::Storage(detail) => AgentError::CatalogUnavailable { detail },
        }
    }
}

impl AgentError {
    /// The one mapping to gRPC statuses.
    pub fn status(self) -> Status {
        match self {
            AgentError::NotFound(m) => Status::not_found(m),
            AgentError::AlreadyExists(m) => Status::already_exists(m),
            AgentError::InvalidState(m) => Status::failed_precondition(m),
            AgentError::Conflict(m) => Status::aborted(m),
            AgentError::ResourceExhausted(m) => Status::resource_exhausted(m),
            AgentError::InvalidArgument(m) => Status::invalid_argument(m),
            AgentError::OutOfRange(m) => Status::out_of_range(m),
            AgentError::CatalogUnavailable { detail } => {
                tracing::warn!(%detail, "answering UNAVAILABLE: the catalog failed");
                Status::unavailable(
                    "the node's catalog is unavailable right now (the agent's log says why); retry shortly",
                )
            }
            AgentError::Unavailable(m) => Status::unavailable(m),
            AgentError::Io { what, detail } => Status::internal(format!("{what} failed on the node: {detail}")),
            AgentError::Integrity(m) => Status::data_loss(m),
            AgentError::PermissionDenied(m) => Status::permission_denied(m),
        }
    }
}

/// A background task of the node (a copy, a hash, an fsync) that failed to finish.
pub fn task_failed(what: &str, err: impl std::fmt::Display) -> AgentError {
    AgentError::Io {
        what: what.to_string(),
        detail: err.to_string(),
    }
}

pub type Result<T, E = AgentError> = std::result::Result<T, E>;

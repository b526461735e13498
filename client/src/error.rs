//! Typed client errors: one variant per status a caller may branch on.

use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("not found: {0}")]
    NotFound(String),
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// The payload is in the wrong state for the call (e.g. uncommitted).
    #[error("wrong state: {0}")]
    FailedPrecondition(String),
    /// A lease or concurrent change blocks the call.
    #[error("conflict: {0}")]
    Aborted(String),
    #[error("out of capacity: {0}")]
    ResourceExhausted(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("agent unavailable: {0}")]
    Unavailable(String),
    #[error("{0}")]
    Other(Status),
    #[error("could not connect to {target}: {source}")]
    Connect {
        target: String,
        source: tonic::transport::Error,
    },
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    /// The agent answered something this client cannot use.
    #[error("unexpected answer from the agent: {0}")]
    Protocol(String),
}

impl From<Status> for ClientError {
    fn from(status: Status) -> Self {
        let msg = status.message().to_string();
        match status.code() {
            Code::NotFound => ClientError::NotFound(msg),
            Code::AlreadyExists => ClientError::AlreadyExists(msg),
            Code::FailedPrecondition => ClientError::FailedPrecondition(msg),
            Code::Aborted => ClientError::Aborted(msg),
            Code::ResourceExhausted => ClientError::ResourceExhausted(msg),
            Code::InvalidArgument => ClientError::InvalidArgument(msg),
            Code::Unavailable => ClientError::Unavailable(msg),
            _ => ClientError::Other(status),
        }
    }
}

impl ClientError {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        ClientError::Io {
            what: what.into(),
            source,
        }
    }
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;

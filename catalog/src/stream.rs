//! Streams: append-only, per-stream offset sequences of payload references,
//! with retention and consumer-group offsets.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{CatalogError, Result};
use crate::model::PayloadId;

/// A stream's name within its namespace (the namespace may be empty).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct StreamKey {
    pub namespace: String,
    pub name: String,
}

impl StreamKey {
    /// Validates a key from the wire: the name is required.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Result<Self> {
        let key = Self {
            namespace: namespace.into(),
            name: name.into(),
        };
        if key.name.is_empty() {
            return Err(CatalogError::InvalidArgument(
                "stream.name must not be empty; name the stream (namespace is optional)".to_string(),
            ));
        }
        Ok(key)
    }
}

impl fmt::Display for StreamKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// How much of a stream is kept; 0 = unlimited. Applied on every append.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retention {
    pub max_entries: u64,
    pub max_age_ms: u64,
}

/// One entry to append.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppendItem {
    pub payload_id: PayloadId,
    pub event_time_ms: u64,
    pub duration_ns: u64,
    pub tags: BTreeMap<String, String>,
}

/// An entry as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamEntry {
    pub offset: u64,
    pub payload_id: PayloadId,
    pub event_time_ms: u64,
    pub append_time_ms: u64,
    pub duration_ns: u64,
    pub tags: BTreeMap<String, String>,
}

/// Who owns a stream, and which stream of its name it is (row ids are
/// never reused, so one deleted and made again has another).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamOwner {
    pub id: i64,
    /// `None` for a stream created before owners were recorded.
    pub owner: Option<String>,
}

/// Where a stream stands: its row id (the key subscriptions watch) and the
/// offset its next entry will get.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamHead {
    pub id: i64,
    pub next_offset: u64,
}

/// Which entries a read returns: offsets from `start` (inclusive) up to
/// `end` (inclusive, None = the head), at most `max` of them, appended at or
/// after `not_before_ms`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadQuery {
    pub start: u64,
    pub end: Option<u64>,
    pub max: u64,
    pub not_before_ms: u64,
}

/// The most entries one read returns.
pub const MAX_READ: u64 = 10_000;

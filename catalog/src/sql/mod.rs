//! The SQL backends. Both speak the same SQL (`$N` placeholders, `ON
//! CONFLICT`, `RETURNING`, row values), so the repository is written once, in
//! `common.rs`, and `include!`d by each backend module against that backend's
//! concrete sqlx types; each module adds only what differs: connecting,
//! migrating, how a write transaction begins, and how appends are announced
//! to other agents. The parity suite holds both to the same behaviour.

pub mod postgres;
pub mod sqlite;

use std::collections::HashMap;
use std::sync::Mutex;

use sqlx::migrate::{MigrateError, Migrator};
use tokio::sync::watch;

use crate::error::CatalogError;

pub(crate) fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

pub(crate) fn to_u64(value: i64) -> u64 {
    if value == i64::MAX {
        u64::MAX
    } else {
        u64::try_from(value).unwrap_or(0)
    }
}

pub(crate) fn corrupt(what: &str) -> CatalogError {
    CatalogError::Storage(format!("catalog row has an invalid {what}"))
}

/// The schema version this binary knows up to.
fn newest(migrator: &Migrator) -> i64 {
    migrator.iter().map(|m| m.version).max().unwrap_or(0)
}

/// Explains a failed migration run; a database migrated by a newer binary
/// gets its own message, since the fix is an upgrade, not a repair.
pub(crate) fn migrate_error(backend: &str, migrator: &Migrator, err: MigrateError) -> CatalogError {
    match err {
        MigrateError::VersionMissing(version) if version > newest(migrator) => CatalogError::Storage(format!(
            "the {backend} catalog is at schema version {version}, newer than this binary knows (up to {}); \
             run a payload-agent at least as new as the one that migrated it",
            newest(migrator)
        )),
        err => CatalogError::Storage(format!("applying {backend} catalog migrations failed: {err}")),
    }
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut serde_json::Value, patch: serde_json::Value) {
    match (target, patch) {
        (serde_json::Value::Object(target), serde_json::Value::Object(patch)) => {
            for (key, value) in patch {
                if value.is_null() {
                    target.remove(&key);
                } else {
                    merge_patch(target.entry(key).or_insert(serde_json::Value::Null), value);
                }
            }
        }
        (target, patch) => *target = patch,
    }
}

/// MERGE semantics for metadata data: empty keeps the old value; two JSON
/// objects merge key by key; anything else replaces.
pub(crate) fn merge_data(old: &[u8], new: Vec<u8>) -> Vec<u8> {
    if new.is_empty() {
        return old.to_vec();
    }
    let parsed = (
        serde_json::from_slice::<serde_json::Value>(old),
        serde_json::from_slice::<serde_json::Value>(&new),
    );
    match parsed {
        (Ok(mut old @ serde_json::Value::Object(_)), Ok(patch @ serde_json::Value::Object(_))) => {
            merge_patch(&mut old, patch);
            serde_json::to_vec(&old).unwrap_or(new)
        }
        _ => new,
    }
}

/// Wakes stream subscribers: one watch channel per watched stream, holding
/// the stream's next offset. Appends notify it after they commit; a channel
/// nobody watches any more is dropped at the next notification.
#[derive(Default)]
pub(crate) struct StreamHub {
    streams: Mutex<HashMap<i64, watch::Sender<u64>>>,
}

impl StreamHub {
    pub(crate) fn watch(&self, stream_id: i64, next_offset: u64) -> watch::Receiver<u64> {
        let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        streams
            .entry(stream_id)
            .or_insert_with(|| watch::channel(next_offset).0)
            .subscribe()
    }

    pub(crate) fn notify(&self, stream_id: i64, next_offset: u64) {
        let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = streams.get(&stream_id) {
            if tx.receiver_count() == 0 {
                streams.remove(&stream_id);
                return;
            }
            tx.send_if_modified(|next| {
                let advanced = next_offset > *next;
                *next = (*next).max(next_offset);
                advanced
            });
        }
    }

    /// Wakes every subscriber to re-read: used when notifications may have
    /// been missed (a dropped listener connection).
    pub(crate) fn notify_all(&self) {
        let streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        for tx in streams.values() {
            tx.send_modify(|_| {});
        }
    }
}

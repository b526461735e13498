//! A bucket that fails on purpose (tests only, feature `failpoints`):
//! `PM_OBJECT_FAULTS=N` makes every Nth call fail, cycling through a
//! timeout, a 503, a connection reset and, for reads, a short read (bytes
//! cut off that the caller must catch by their hash). The faults are
//! deterministic so a test can count on them.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use super::bucket::{Bucket, StoreError};

pub struct Faulty {
    inner: Box<dyn Bucket>,
    every: u64,
    calls: AtomicU64,
    /// Faults injected so far (each is logged with the count).
    injected: AtomicU64,
}

enum Fault {
    Timeout,
    Unavailable,
    Reset,
    ShortRead,
}

impl Faulty {
    /// Wraps `inner` when `PM_OBJECT_FAULTS` asks for faults.
    pub fn from_env(inner: Box<dyn Bucket>) -> Box<dyn Bucket> {
        match std::env::var("PM_OBJECT_FAULTS")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
        {
            Some(every) if every > 0 => {
                tracing::warn!(every, "PM_OBJECT_FAULTS: the object store fails on purpose");
                Box::new(Faulty {
                    inner,
                    every,
                    calls: AtomicU64::new(0),
                    injected: AtomicU64::new(0),
                })
            }
            _ => inner,
        }
    }

    async fn fault(&self, what: &str) -> Result<Option<Fault>, StoreError> {
        let n = self.calls.fetch_add(1, Ordering::Relaxed) + 1;
        if !n.is_multiple_of(self.every) {
            return Ok(None);
        }
        let count = self.injected.fetch_add(1, Ordering::Relaxed) + 1;
        let (fault, kind) = match (n / self.every) % 4 {
            0 => (Fault::Timeout, "timeout"),
            1 => (Fault::Unavailable, "503"),
            2 => (Fault::Reset, "reset"),
            _ => (Fault::ShortRead, "short read"),
        };
        tracing::warn!(count, what, "PM_OBJECT_FAULTS: injected a fault: {kind}");
        match fault {
            Fault::Timeout => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                Err(StoreError::Transient(format!("{what}: injected timeout")))
            }
            Fault::Unavailable => Err(StoreError::Transient(format!("{what}: injected 503 SlowDown"))),
            Fault::Reset => Err(StoreError::Transient(format!("{what}: injected connection reset"))),
            Fault::ShortRead => Ok(Some(Fault::ShortRead)),
        }
    }
}

#[async_trait]
impl Bucket for Faulty {
    async fn put(&self, key: &str, body: Bytes, sha256: Option<[u8; 32]>) -> Result<(), StoreError> {
        self.fault("put").await?;
        self.inner.put(key, body, sha256).await
    }

    async fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<Bytes, StoreError> {
        let short = matches!(self.fault("get").await?, Some(Fault::ShortRead));
        let body = self.inner.get(key, range).await?;
        Ok(if short { body.slice(..body.len() / 2) } else { body })
    }

    async fn head(&self, key: &str) -> Result<Option<u64>, StoreError> {
        self.fault("head").await?;
        self.inner.head(key).await
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.fault("delete").await?;
        self.inner.delete(key).await
    }

    fn bucket(&self) -> &str {
        self.inner.bucket()
    }

    fn prefix(&self) -> &str {
        self.inner.prefix()
    }
}

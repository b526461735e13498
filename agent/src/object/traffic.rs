//! What the agent asked of its object store: requests that succeeded and
//! the bytes they moved, counted by a wrapper around the bucket. Stats
//! reports them (so a test or an operator can see that a block was sent
//! once), and payloadctl draws its transfer progress from them.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use super::bucket::{Bucket, StoreError};

#[derive(Debug, Default)]
pub struct Traffic {
    pub puts: AtomicU64,
    pub put_bytes: AtomicU64,
    pub gets: AtomicU64,
    pub get_bytes: AtomicU64,
    pub deletes: AtomicU64,
}

/// A snapshot of [`Traffic`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrafficFigures {
    pub puts: u64,
    pub put_bytes: u64,
    pub gets: u64,
    pub get_bytes: u64,
    pub deletes: u64,
}

impl Traffic {
    pub fn figures(&self) -> TrafficFigures {
        let read = |c: &AtomicU64| c.load(Ordering::Relaxed);
        TrafficFigures {
            puts: read(&self.puts),
            put_bytes: read(&self.put_bytes),
            gets: read(&self.gets),
            get_bytes: read(&self.get_bytes),
            deletes: read(&self.deletes),
        }
    }
}

pub struct Counted {
    pub inner: Box<dyn Bucket>,
    pub traffic: Arc<Traffic>,
}

fn count(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

#[async_trait]
impl Bucket for Counted {
    async fn put(&self, key: &str, body: Bytes, sha256: Option<[u8; 32]>) -> Result<(), StoreError> {
        let len = body.len() as u64;
        self.inner.put(key, body, sha256).await?;
        count(&self.traffic.puts, 1);
        count(&self.traffic.put_bytes, len);
        Ok(())
    }

    async fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<Bytes, StoreError> {
        let bytes = self.inner.get(key, range).await?;
        count(&self.traffic.gets, 1);
        count(&self.traffic.get_bytes, bytes.len() as u64);
        Ok(bytes)
    }

    async fn head(&self, key: &str) -> Result<Option<u64>, StoreError> {
        self.inner.head(key).await
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.inner.delete(key).await?;
        count(&self.traffic.deletes, 1);
        Ok(())
    }

    fn bucket(&self) -> &str {
        self.inner.bucket()
    }

    fn prefix(&self) -> &str {
        self.inner.prefix()
    }
}

//! What a put writes into and what a get reads from: a writable region
//! before commit, and a lease with a read-only view of the bytes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use memmap2::{Mmap, MmapMut};
use payload_proto::core::PayloadDescriptor;
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::PayloadId;

/// A freshly allocated region, mapped for writing. Commit or abort it.
pub struct WritableRegion {
    pub(crate) id: PayloadId,
    pub(crate) desc: PayloadDescriptor,
    pub(crate) map: MmapMut,
    pub(crate) verify: bool,
    pub(crate) sync: bool,
    pub(crate) object_durable: bool,
    /// Written through the native socket: committed there too.
    pub(crate) native: bool,
}

impl WritableRegion {
    pub fn id(&self) -> PayloadId {
        self.id
    }

    pub fn descriptor(&self) -> &PayloadDescriptor {
        &self.desc
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.map[..]
    }
}

/// The bytes a lease shows.
pub(crate) enum View {
    Map(Arc<Mmap>),
    /// Small payloads come back in the lease's answer.
    Inline(Vec<u8>),
}

/// One lease, shared by every handle to it.
pub(crate) struct Held {
    pub id: PayloadId,
    pub lease_id: Uuid,
    pub desc: PayloadDescriptor,
    pub view: View,
    pub expires_at_ms: u64,
    pub releases: Mutex<Option<mpsc::UnboundedSender<Uuid>>>,
}

impl Drop for Held {
    fn drop(&mut self) {
        let releases = self.releases.get_mut().unwrap_or_else(|p| p.into_inner());
        if let Some(releases) = releases.take() {
            let _ = releases.send(self.lease_id);
        }
    }
}

/// A read lease and a read-only view of the payload's bytes. Dropping the
/// last handle releases the lease in the background within a few
/// milliseconds (batched with other releases); [`crate::Client::release`]
/// releases at once. A lease taken over the native socket is a session
/// lease: it also ends when the client's connection closes, and a get of
/// a payload the client already holds a session lease on reuses it
/// without asking the agent.
#[derive(Clone)]
pub struct Lease {
    pub(crate) held: Arc<Held>,
}

impl Lease {
    pub fn payload_id(&self) -> PayloadId {
        self.held.id
    }

    pub fn lease_id(&self) -> Uuid {
        self.held.lease_id
    }

    pub fn descriptor(&self) -> &PayloadDescriptor {
        &self.held.desc
    }

    /// When the lease expires (`u64::MAX` for a session lease, which lasts
    /// until released or its connection closes).
    pub fn expires_at_ms(&self) -> u64 {
        self.held.expires_at_ms
    }

    pub fn bytes(&self) -> &[u8] {
        match &self.held.view {
            View::Map(map) => &map[..],
            View::Inline(bytes) => bytes,
        }
    }

    /// Keeps the lease past this handle's life (a timed lease then lasts
    /// until expiry; a session lease until the connection closes).
    pub fn detach(self) -> Uuid {
        let mut releases = self.held.releases.lock().unwrap_or_else(|p| p.into_inner());
        releases.take();
        self.held.lease_id
    }
}

/// Session leases this client holds, by payload, so a repeat get costs no
/// round trip. Entries whose leases are gone are pruned as the map grows.
#[derive(Default)]
pub(crate) struct HeldLeases {
    inner: Mutex<HeldInner>,
}

#[derive(Default)]
struct HeldInner {
    /// Each lease with the native connection it was granted on: a lease of
    /// a connection that closed ended with it.
    by_payload: HashMap<PayloadId, (Weak<Held>, u64)>,
    prune_at: usize,
}

impl HeldLeases {
    /// The held lease of `id`, if it was granted on connection `generation`.
    pub fn get(&self, id: PayloadId, generation: u64) -> Option<Lease> {
        let inner = self.lock();
        let (held, granted_on) = inner.by_payload.get(&id)?;
        if *granted_on != generation {
            return None;
        }
        let held = held.upgrade()?;
        // A detached or released lease is not handed out again.
        let live = held.releases.lock().unwrap_or_else(|p| p.into_inner()).is_some();
        live.then_some(Lease { held })
    }

    pub fn insert(&self, lease: &Lease, generation: u64) {
        let mut inner = self.lock();
        inner
            .by_payload
            .insert(lease.held.id, (Arc::downgrade(&lease.held), generation));
        if inner.by_payload.len() > inner.prune_at {
            inner.by_payload.retain(|_, (held, _)| held.strong_count() > 0);
            inner.prune_at = (2 * inner.by_payload.len()).max(64);
        }
    }

    pub fn forget(&self, id: PayloadId) {
        self.lock().by_payload.remove(&id);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HeldInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

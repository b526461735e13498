//! Rust client for Payload Manager. Connects to the agent on its Unix socket
//! (or TCP), writes payloads straight into the region the agent hands out,
//! and reads them zero-copy through cached read-only mappings under leases.
//!
//! ```no_run
//! # async fn demo() -> payload_client::Result<()> {
//! let client = payload_client::Client::connect("unix:///run/payload-manager/agent.sock").await?;
//! let id = client.put(b"hello").await?;
//! let lease = client.get(id).await?;
//! assert_eq!(lease.bytes(), b"hello");
//! # Ok(()) }
//! ```

mod connect;
pub mod error;
mod lease;
pub mod mapping;
mod native;
mod put;

use std::collections::HashMap;
use std::sync::Arc;

use payload_proto::admin::{StatsRequest, StatsResponse};
use payload_proto::core::{self as pb, PayloadDescriptor, PromotionPolicy, SpillPolicy};
use payload_proto::runtime;
use payload_proto::services::payload_admin_service_client::PayloadAdminServiceClient;
use payload_proto::services::payload_catalog_service_client::PayloadCatalogServiceClient;
use payload_proto::services::payload_data_service_client::PayloadDataServiceClient;
use payload_proto::services::payload_stream_service_client::PayloadStreamServiceClient;
use tokio::sync::mpsc;
use tonic::transport::Channel;
use uuid::Uuid;

pub use connect::{is_token, Bearer, Transport};
pub use error::{ClientError, Result};
use lease::{Held, HeldLeases, View};
pub use lease::{Lease, WritableRegion};
use native::Native;
pub use payload_proto::core::Tier;

/// A payload identifier (16 raw bytes on the wire).
pub type PayloadId = Uuid;

/// Options for [`Client::put_with`] and [`Client::allocate_with`].
#[derive(Clone, Debug)]
pub struct PutOptions {
    pub tier: Tier,
    pub labels: HashMap<String, String>,
    pub ttl_ms: u64,
    /// Send the SHA-256 of the bytes with the commit; the agent verifies it.
    pub verify: bool,
    /// fsync before the commit returns (disk tier).
    pub sync: bool,
    /// Commit returns once the payload is in the object store (the agent
    /// needs --object-store).
    pub object_durable: bool,
}

impl Default for PutOptions {
    fn default() -> Self {
        Self {
            tier: Tier::Ram,
            labels: HashMap::new(),
            ttl_ms: 0,
            verify: false,
            sync: false,
            object_durable: false,
        }
    }
}

/// How a lease is asked for.
#[derive(Clone, Copy, Debug, Default)]
pub struct LeaseOptions {
    /// Slowest acceptable tier (None = wherever it is).
    pub min_tier: Option<Tier>,
    /// Fail fast instead of promoting when below `min_tier`.
    pub best_effort: bool,
    /// 0 = the agent's default.
    pub duration_ms: u64,
    /// A lease with an expiry that outlives this connection, instead of
    /// the session lease the native socket gives by default.
    pub timed: bool,
}

/// A connection to one agent. Cheap to clone; clones share the channel, the
/// mapping cache and the background releaser.
#[derive(Clone)]
pub struct Client {
    data: PayloadDataServiceClient<Transport>,
    catalog: PayloadCatalogServiceClient<Transport>,
    admin: PayloadAdminServiceClient<Transport>,
    streams: PayloadStreamServiceClient<Transport>,
    maps: Arc<mapping::MappingCache>,
    releases: mpsc::UnboundedSender<Uuid>,
    /// The agent's native socket, when it serves one beside a Unix socket.
    native: Option<Arc<Native>>,
    /// Session leases released over the native socket.
    native_releases: mpsc::UnboundedSender<Uuid>,
    held: Arc<HeldLeases>,
    /// The connection's own thread, when the caller's runtime is multi-threaded.
    _io: Option<Arc<IoThread>>,
}

/// Stops the I/O thread when the last clone of its client goes.
struct IoThread(Option<tokio::sync::oneshot::Sender<()>>);

impl Drop for IoThread {
    fn drop(&mut self) {
        if let Some(stop) = self.0.take() {
            let _ = stop.send(());
        }
    }
}

fn pb_id(id: PayloadId) -> pb::PayloadId {
    pb::PayloadId {
        value: id.as_bytes().to_vec(),
    }
}

/// A protobuf timestamp as Unix milliseconds (absent or before 1970: 0).
pub fn timestamp_ms(ts: Option<&prost_types::Timestamp>) -> u64 {
    ts.map_or(0, |t| {
        (t.seconds.max(0) as u64) * 1000 + (t.nanos.max(0) as u64) / 1_000_000
    })
}

/// The payload id inside a descriptor.
pub fn descriptor_id(desc: &PayloadDescriptor) -> Result<PayloadId> {
    let raw = desc.payload_id.as_ref().map(|p| p.value.as_slice()).unwrap_or_default();
    Uuid::from_slice(raw).map_err(|_| ClientError::Protocol("descriptor carries no 16-byte payload id".into()))
}

impl Client {
    /// Connects to `target`: `unix:///path/agent.sock`, a bare socket path,
    /// or `http://host:port`.
    ///
    /// On a multi-threaded runtime the connection gets a thread of its own
    /// with a current-thread runtime: every call then crosses threads twice
    /// instead of hopping between workers, which cuts a call from about
    /// 120 µs to 80 µs on a 2-core machine.
    pub async fn connect(target: &str) -> Result<Client> {
        Self::connect_with(target, Bearer::default()).await
    }

    /// Connects as [`Client::connect`] does, sending `token` with every gRPC
    /// call when `target` is a TCP address: an agent listening on TCP with
    /// `--tcp-token-file` needs it. A Unix socket never gets it. TCP is
    /// clear text: the token and the bytes are for a trusted network.
    pub async fn connect_with_token(target: &str, token: &str) -> Result<Client> {
        Self::connect_with(target, Bearer::for_target(target, token)?).await
    }

    async fn connect_with(target: &str, bearer: Bearer) -> Result<Client> {
        use tokio::runtime::{Handle, RuntimeFlavor};
        if Handle::current().runtime_flavor() == RuntimeFlavor::CurrentThread {
            return Self::open(target, bearer).await;
        }
        let (ready, connected) = tokio::sync::oneshot::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let target = target.to_string();
        std::thread::Builder::new()
            .name("payload-client-io".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = ready.send(Err(ClientError::io("starting the client I/O runtime", e)));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let client = Client::open(&target, bearer).await;
                    if ready.send(client).is_ok() {
                        let _ = stopped.await;
                    }
                });
            })
            .map_err(|e| ClientError::io("starting the client I/O thread", e))?;
        let mut client = connected
            .await
            .map_err(|_| ClientError::Protocol("the client I/O thread ended before connecting".into()))??;
        client._io = Some(Arc::new(IoThread(Some(stop))));
        Ok(client)
    }

    /// Connects to an operator's cluster view (`payload-operator catalog`):
    /// every node's payloads, streams, nodes and stats, and deletion on the
    /// payload's node; calls that need a payload's bytes are refused there
    /// (FAILED_PRECONDITION). `token` is a Kubernetes token the operator
    /// reviews (none outside a cluster); `ca_pem` signs an https:// one.
    pub async fn connect_operator(url: &str, token: Option<&str>, ca_pem: Option<&[u8]>) -> Result<Client> {
        let bearer = match token {
            Some(token) => Bearer::new(token)?,
            None => Bearer::default(),
        };
        Ok(Self::with_bearer(
            connect::operator_channel(url, ca_pem, token.is_some()).await?,
            bearer,
        ))
    }

    /// Connects over gRPC only, as a v1 client does: RAM payloads are then
    /// named `/dev/shm` regions, and leases are timed.
    pub async fn connect_grpc(target: &str) -> Result<Client> {
        Ok(Self::from_channel(connect::channel(target).await?))
    }

    /// The gRPC channel, and the native socket beside a Unix socket when
    /// the agent serves one (an older agent without it is used over gRPC).
    async fn open(target: &str, bearer: Bearer) -> Result<Client> {
        let mut client = Self::with_bearer(connect::channel(target).await?, bearer);
        // A socket that is there but refuses us leaves gRPC carrying
        // everything, as for an older agent without one (`is_native` tells).
        if let Some(conn) = native::beside(target).and_then(|path| Native::connect(&path).ok()) {
            let conn = Arc::new(conn);
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(native_release_loop(Arc::downgrade(&conn), rx));
            client.native = Some(conn);
            client.native_releases = tx;
        }
        Ok(client)
    }

    /// Whether the data path goes over the agent's native socket.
    pub fn is_native(&self) -> bool {
        self.native.is_some()
    }

    /// A gRPC-only client on a channel the caller dialled.
    pub fn from_channel(channel: Channel) -> Client {
        Self::with_bearer(channel, Bearer::default())
    }

    fn with_bearer(channel: Channel, bearer: Bearer) -> Client {
        let channel = Transport::new(channel, bearer);
        let data = PayloadDataServiceClient::new(channel.clone());
        let (releases, rx) = mpsc::unbounded_channel();
        tokio::spawn(release_loop(data.clone(), rx));
        let (native_releases, _) = mpsc::unbounded_channel();
        Client {
            data,
            catalog: PayloadCatalogServiceClient::new(channel.clone()),
            admin: PayloadAdminServiceClient::new(channel.clone()),
            streams: PayloadStreamServiceClient::new(channel),
            maps: Arc::new(mapping::MappingCache::new(4096)),
            releases,
            native: None,
            native_releases,
            held: Arc::default(),
            _io: None,
        }
    }

    /// Stores `bytes` in RAM and returns the new payload's id.
    pub async fn put(&self, bytes: &[u8]) -> Result<PayloadId> {
        self.put_with(bytes, &PutOptions::default())
            .await
            .and_then(|d| descriptor_id(&d))
    }

    /// Stores `bytes` with options; returns the committed descriptor.
    ///
    /// Over the native socket a RAM put is one call: small payloads travel
    /// inline, larger ones in a memfd this client fills; the agent seals it.
    pub async fn put_with(&self, bytes: &[u8], opts: &PutOptions) -> Result<PayloadDescriptor> {
        if let Some(native) = &self.native {
            if opts.tier == Tier::Ram {
                return put::native_put(native, bytes, opts).await;
            }
        }
        let mut region = self.allocate_with(bytes.len() as u64, opts).await?;
        region.as_mut_slice().copy_from_slice(bytes);
        self.commit(region).await
    }

    /// Allocates a region of `size` bytes and maps it for writing.
    pub async fn allocate_with(&self, size: u64, opts: &PutOptions) -> Result<WritableRegion> {
        if let (Some(native), Tier::Ram) = (&self.native, opts.tier) {
            return put::native_allocate(native, size, opts).await;
        }
        let response = self
            .catalog
            .clone()
            .allocate_payload(runtime::AllocatePayloadRequest {
                size_bytes: size,
                preferred_tier: opts.tier as i32,
                ttl_ms: opts.ttl_ms,
                labels: opts.labels.clone(),
                ..Default::default()
            })
            .await?
            .into_inner();
        let desc = response
            .payload_descriptor
            .ok_or_else(|| ClientError::Protocol("allocate returned no descriptor".into()))?;
        let id = descriptor_id(&desc)?;
        match mapping::map_writable(&desc) {
            Ok(map) => Ok(WritableRegion {
                id,
                desc,
                map,
                verify: opts.verify,
                sync: opts.sync,
                object_durable: opts.object_durable,
                native: false,
            }),
            Err(err) => {
                let _ = self.abort(id).await;
                Err(err)
            }
        }
    }

    /// Commits a written region: its bytes never change afterwards.
    pub async fn commit(&self, region: WritableRegion) -> Result<PayloadDescriptor> {
        let WritableRegion {
            id,
            map,
            verify,
            sync,
            object_durable,
            native,
            desc,
        } = region;
        let expected_sha256 = if verify {
            use sha2::Digest;
            sha2::Sha256::digest(&map[..]).to_vec()
        } else {
            Vec::new()
        };
        // Unmapped before the commit: a sealed region refuses a writer that still maps it.
        drop(map);
        if let (true, Some(conn)) = (native, &self.native) {
            let opts = put::commit_options(expected_sha256, sync, object_durable);
            return put::native_commit(conn, id, desc.size_bytes, opts).await;
        }
        let response = self
            .catalog
            .clone()
            .commit_payload(runtime::CommitPayloadRequest {
                id: Some(pb_id(id)),
                expected_sha256,
                sync,
                object_durable,
            })
            .await?
            .into_inner();
        response
            .payload_descriptor
            .ok_or_else(|| ClientError::Protocol("commit returned no descriptor".into()))
    }

    /// Abandons an uncommitted allocation.
    pub async fn abort(&self, id: PayloadId) -> Result<()> {
        if let Some(native) = &self.native {
            return put::native_abort(native, id).await;
        }
        self.catalog
            .clone()
            .abort_payload(runtime::AbortPayloadRequest { id: Some(pb_id(id)) })
            .await?;
        Ok(())
    }

    /// Leases the payload and maps it read-only; the lease is released when
    /// the returned [`Lease`] is dropped.
    pub async fn get(&self, id: PayloadId) -> Result<Lease> {
        self.get_with(id, LeaseOptions::default()).await
    }

    ///
    /// Over the native socket (unless `opts.timed`) the lease is a session
    /// lease, and a payload this client already holds one on comes back
    /// without a call.
    pub async fn get_with(&self, id: PayloadId, opts: LeaseOptions) -> Result<Lease> {
        if let Some(native) = &self.native {
            if opts.timed {
                return put::native_lease(native, id, opts, self.native_releases.clone()).await;
            }
            // A held lease is reused only for a get that asks nothing more
            // of its copy than the lease it holds was granted for.
            let plain = opts.min_tier.is_none() && !opts.best_effort;
            let generation = native.generation();
            if let Some(lease) = self.held.get(id, generation).filter(|_| plain) {
                return Ok(lease);
            }
            let lease = put::native_lease(native, id, opts, self.native_releases.clone()).await?;
            if plain {
                self.held.insert(&lease, generation);
            }
            return Ok(lease);
        }
        let response = self
            .data
            .clone()
            .acquire_read_lease(runtime::AcquireReadLeaseRequest {
                id: Some(pb_id(id)),
                min_tier: opts.min_tier.map(|t| t as i32).unwrap_or(0),
                promotion_policy: if opts.best_effort {
                    PromotionPolicy::BestEffort
                } else {
                    PromotionPolicy::Blocking
                } as i32,
                min_lease_duration_ms: opts.duration_ms,
                mode: runtime::LeaseMode::Read as i32,
            })
            .await?
            .into_inner();
        let lease_id = response
            .lease_id
            .and_then(|l| Uuid::from_slice(&l.value).ok())
            .ok_or_else(|| ClientError::Protocol("lease without a 16-byte lease id".into()))?;
        let desc = response
            .payload_descriptor
            .ok_or_else(|| ClientError::Protocol("lease without a descriptor".into()))?;
        let expires_at_ms = timestamp_ms(response.lease_expires_at.as_ref());
        match self.maps.get(&desc) {
            Ok(map) => Ok(Lease {
                held: Arc::new(Held {
                    id,
                    lease_id,
                    desc,
                    view: View::Map(map),
                    expires_at_ms,
                    releases: std::sync::Mutex::new(Some(self.releases.clone())),
                }),
            }),
            Err(err) => {
                let _ = self.releases.send(lease_id);
                Err(err)
            }
        }
    }

    /// Releases a lease now and waits for the agent to confirm; dropping a
    /// [`Lease`] instead releases it in the background.
    pub async fn release(&self, lease: Lease) -> Result<()> {
        self.held.forget(lease.payload_id());
        let lease_id = lease.detach();
        if let Some(native) = &self.native {
            return put::native_release(native, &[lease_id]).await.map(drop);
        }
        let request = runtime::ReleaseLeaseRequest {
            lease_id: Some(pb::LeaseId {
                value: lease_id.as_bytes().to_vec(),
            }),
        };
        self.data.clone().release_lease(request).await?;
        Ok(())
    }

    /// Leases many payloads in one call, answered in order: a lease id, or
    /// why that one was refused. Over the native socket these are session
    /// leases (they pin placement until released with
    /// [`Client::release_leases`] or the connection closes); over gRPC,
    /// timed leases of the agent's default length.
    pub async fn lease_many(&self, ids: &[PayloadId]) -> Result<Vec<Result<Uuid>>> {
        if let Some(native) = &self.native {
            return put::native_lease_many(native, ids, &self.native_releases).await;
        }
        let requests = ids
            .iter()
            .map(|id| runtime::AcquireReadLeaseRequest {
                id: Some(pb_id(*id)),
                ..Default::default()
            })
            .collect();
        let response = self
            .data
            .clone()
            .batch_acquire_read_lease(runtime::BatchAcquireReadLeaseRequest { requests })
            .await?
            .into_inner();
        Ok(response
            .results
            .into_iter()
            .map(|r| match r.lease.and_then(|l| l.lease_id) {
                Some(lease) => Uuid::from_slice(&lease.value)
                    .map_err(|_| ClientError::Protocol("a lease without a 16-byte id".into())),
                None => Err(tonic::Status::new(tonic::Code::from(r.error_code), r.error_message).into()),
            })
            .collect())
    }

    /// Releases leases by id (from [`Client::lease_many`]); returns how many were live.
    pub async fn release_leases(&self, leases: &[Uuid]) -> Result<u32> {
        if let Some(native) = &self.native {
            return put::native_release(native, leases).await;
        }
        let lease_ids = leases
            .iter()
            .map(|l| pb::LeaseId {
                value: l.as_bytes().to_vec(),
            })
            .collect();
        let response = self
            .data
            .clone()
            .batch_release_lease(runtime::BatchReleaseLeaseRequest { lease_ids })
            .await?
            .into_inner();
        Ok(response.released)
    }

    /// Renews a lease for `extend_ms` from now (0 = default); returns the new expiry.
    pub async fn renew(&self, lease: &Lease, extend_ms: u64) -> Result<u64> {
        let response = self
            .data
            .clone()
            .renew_lease(runtime::RenewLeaseRequest {
                lease_id: Some(pb::LeaseId {
                    value: lease.lease_id().as_bytes().to_vec(),
                }),
                extend_ms,
            })
            .await?
            .into_inner();
        Ok(timestamp_ms(response.lease_expires_at.as_ref()))
    }

    /// Where the payload is now (advisory: it may move at once).
    pub async fn stat(&self, id: PayloadId) -> Result<runtime::GetPayloadResponse> {
        Ok(self
            .catalog
            .clone()
            .get_payload(runtime::GetPayloadRequest { id: Some(pb_id(id)) })
            .await?
            .into_inner())
    }

    pub async fn list(&self, request: runtime::ListPayloadsRequest) -> Result<runtime::ListPayloadsResponse> {
        Ok(self.catalog.clone().list_payloads(request).await?.into_inner())
    }

    pub async fn delete(&self, id: PayloadId, force: bool) -> Result<()> {
        self.catalog
            .clone()
            .delete(runtime::DeleteRequest {
                id: Some(pb_id(id)),
                force,
            })
            .await?;
        self.maps.forget(&id.hyphenated().to_string());
        self.held.forget(id);
        Ok(())
    }

    /// Pins for `duration_ms` (0 = until unpinned).
    pub async fn pin(&self, id: PayloadId, duration_ms: u64) -> Result<()> {
        self.catalog
            .clone()
            .pin(runtime::PinRequest {
                id: Some(pb_id(id)),
                duration_ms,
            })
            .await?;
        Ok(())
    }

    pub async fn unpin(&self, id: PayloadId) -> Result<()> {
        self.catalog
            .clone()
            .unpin(runtime::UnpinRequest { id: Some(pb_id(id)) })
            .await?;
        Ok(())
    }

    /// Moves the payload down to `target` (None = its spill target), waiting
    /// until done; `fsync` makes the new copy durable first.
    pub async fn spill(&self, id: PayloadId, target: Option<Tier>, fsync: bool) -> Result<PayloadDescriptor> {
        let response = self
            .catalog
            .clone()
            .spill(runtime::SpillRequest {
                ids: vec![pb_id(id)],
                policy: SpillPolicy::Blocking as i32,
                wait_for_leases: false,
                fsync,
                target_tier: target.map(|t| t as i32).unwrap_or(0),
            })
            .await?
            .into_inner();
        let result = response
            .results
            .into_iter()
            .next()
            .ok_or_else(|| ClientError::Protocol("spill returned no result".into()))?;
        if !result.ok {
            let code = match result.error_code {
                0 => tonic::Code::FailedPrecondition,
                code => tonic::Code::from(code),
            };
            return Err(tonic::Status::new(code, result.error_message).into());
        }
        result
            .payload_descriptor
            .ok_or_else(|| ClientError::Protocol("spill returned no descriptor".into()))
    }

    /// Adopts the object uploaded to the agent's `uploads/<id>` as payload
    /// `id` on the object tier (`size_bytes` 0: the allocated size, or the
    /// upload's own); returns the payload's descriptor.
    pub async fn import(&self, id: PayloadId, size_bytes: u64) -> Result<PayloadDescriptor> {
        self.catalog
            .clone()
            .import_payload(runtime::ImportPayloadRequest {
                id: Some(pb_id(id)),
                size_bytes,
            })
            .await?;
        let stat = self.stat(id).await?;
        stat.payload_descriptor.ok_or_else(|| {
            ClientError::Protocol(format!(
                "the agent described imported payload {id} without a descriptor"
            ))
        })
    }

    /// Moves the payload up to `target`, waiting until done.
    pub async fn promote(&self, id: PayloadId, target: Tier) -> Result<PayloadDescriptor> {
        let response = self
            .catalog
            .clone()
            .promote(runtime::PromoteRequest {
                id: Some(pb_id(id)),
                target_tier: target as i32,
                policy: PromotionPolicy::Blocking as i32,
            })
            .await?
            .into_inner();
        response
            .payload_descriptor
            .ok_or_else(|| ClientError::Protocol("promote returned no descriptor".into()))
    }

    /// Deletes object-store blocks no manifest has named for `grace_ms`
    /// (0 = the agent's grace period); returns how many went.
    pub async fn collect_garbage(&self, grace_ms: u64) -> Result<u64> {
        let request = payload_proto::admin::CollectGarbageRequest { grace_ms };
        Ok(self
            .admin
            .clone()
            .collect_garbage(request)
            .await?
            .into_inner()
            .blocks_deleted)
    }

    /// The nodes of the agent's catalog, as the operator last heard from
    /// them (a standalone agent answers with itself alone).
    pub async fn nodes(&self) -> Result<payload_proto::admin::ListNodesResponse> {
        let request = payload_proto::admin::ListNodesRequest {};
        Ok(self.admin.clone().list_nodes(request).await?.into_inner())
    }

    pub async fn stats(&self) -> Result<StatsResponse> {
        Ok(self.admin.clone().stats(StatsRequest {}).await?.into_inner())
    }

    /// The stream service (create, append, read, subscribe, offsets): its
    /// messages map one to one onto the wire, so it is handed out as is.
    pub fn streams(&self) -> PayloadStreamServiceClient<Transport> {
        self.streams.clone()
    }

    /// The raw generated clients, for calls this wrapper does not cover.
    pub fn raw(
        &self,
    ) -> (
        PayloadDataServiceClient<Transport>,
        PayloadCatalogServiceClient<Transport>,
        PayloadAdminServiceClient<Transport>,
    ) {
        (self.data.clone(), self.catalog.clone(), self.admin.clone())
    }
}

/// How long dropped leases gather before they go back in one call.
const RELEASE_GATHER: std::time::Duration = std::time::Duration::from_millis(2);

/// Sends dropped session leases back in batches over the native socket.
async fn native_release_loop(conn: std::sync::Weak<Native>, mut rx: mpsc::UnboundedReceiver<Uuid>) {
    let mut batch = Vec::new();
    while rx.recv_many(&mut batch, 1024).await > 0 {
        tokio::time::sleep(RELEASE_GATHER).await;
        while let Ok(lease) = rx.try_recv() {
            batch.push(lease);
        }
        let Some(conn) = conn.upgrade() else { return };
        // A failed release only keeps the lease until the connection closes.
        let _ = put::native_release(&conn, &batch).await;
        batch.clear();
    }
}

/// Sends dropped leases back in batches: a tight loop of gets pays one
/// release call per few milliseconds instead of one per get.
async fn release_loop(mut data: PayloadDataServiceClient<Transport>, mut rx: mpsc::UnboundedReceiver<Uuid>) {
    let mut batch = Vec::new();
    while rx.recv_many(&mut batch, 1024).await > 0 {
        tokio::time::sleep(RELEASE_GATHER).await;
        while let Ok(lease) = rx.try_recv() {
            batch.push(lease);
        }
        let lease_ids = batch
            .drain(..)
            .map(|l| pb::LeaseId {
                value: l.as_bytes().to_vec(),
            })
            .collect();
        // A failed release only keeps the lease until it expires.
        let _ = data
            .batch_release_lease(runtime::BatchReleaseLeaseRequest { lease_ids })
            .await;
    }
}

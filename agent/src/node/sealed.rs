//! Payloads written through the native socket: RAM regions that are memfds,
//! sealed by the kernel at commit (see [`crate::memfd`]), and puts that
//! allocate, fill, seal and commit in one call.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use payload_catalog::lifecycle::{transition, Event};
use payload_catalog::{PayloadId, PayloadRecord, Tier, Write};
use sha2::{Digest, Sha256};

use super::lifecycle::NewRegion;
use super::{AllocateRequest, Entry, Node};
use crate::error::AgentError;
use crate::store::io_error;

/// The bytes of a one-call put.
#[derive(Debug)]
pub enum PutBody {
    /// Small payloads, carried in the request.
    Inline(Vec<u8>),
    /// A memfd the client wrote and unmapped.
    Memfd(File),
}

/// What a put commits with.
#[derive(Clone, Debug, Default)]
pub struct CommitOptions {
    pub expected: Option<[u8; 32]>,
    pub sync: bool,
    pub object: bool,
}

pub(super) async fn create_memfd(node: &Arc<Node>, id: PayloadId, size: u64) -> Result<(), AgentError> {
    const INLINE: u64 = 1 << 20;
    node.store(Tier::Ram)?;
    let create = move |node: &Node| match node.store(Tier::Ram) {
        Ok(store) => store.new_memfd(size).and_then(|file| {
            crate::memfd::fix_size(&file)?;
            store.adopt_memfd(id, file).map(drop)
        }),
        Err(err) => Err(std::io::Error::other(err.to_string())),
    };
    let created = if size <= INLINE {
        create(node)
    } else {
        // Allocating many pages takes a while: off the async workers.
        let node = node.clone();
        tokio::task::spawn_blocking(move || create(&node))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)))
    };
    created.map_err(|e| io_error("creating the memfd region", e))
}

impl Node {
    /// Whether the payload's current copy is a sealed memfd (no name a v1
    /// client could open).
    pub fn is_sealed(&self, rec: &PayloadRecord) -> bool {
        self.tier(rec.tier)
            .ok()
            .and_then(|t| t.regions())
            .and_then(|r| r.memfd(rec.id))
            .is_some_and(|memfd| crate::memfd::is_sealed(&memfd))
    }

    /// Allocates a RAM payload whose region is a memfd; returns the row and
    /// the memfd for the writer.
    pub async fn allocate_sealed(
        self: &Arc<Self>,
        req: AllocateRequest,
    ) -> Result<(PayloadRecord, Arc<File>), AgentError> {
        let node = self.clone();
        tokio::spawn(async move {
            let rec = node.allocate_now(req, NewRegion::Memfd).await?;
            let memfd = node.store(Tier::Ram)?.memfd(rec.id).ok_or_else(|| {
                AgentError::InvalidState(format!("payload {} was ended while it was allocated", rec.id))
            })?;
            Ok((rec, memfd))
        })
        .await
        .map_err(|e| crate::error::task_failed("allocating", e))?
    }

    /// Stores and commits a payload in one call. A failure leaves nothing
    /// behind: the allocation it made is aborted.
    pub async fn put_sealed(
        self: &Arc<Self>,
        req: AllocateRequest,
        body: PutBody,
        opts: CommitOptions,
    ) -> Result<PayloadRecord, AgentError> {
        if req.tier != Tier::Ram {
            return Err(AgentError::InvalidArgument(format!(
                "a one-call put stores a sealed RAM payload; for the {} tier allocate, write and commit",
                req.tier.name()
            )));
        }
        let region = match body {
            PutBody::Inline(bytes) => {
                if bytes.len() as u64 != req.size_bytes {
                    return Err(AgentError::InvalidArgument(format!(
                        "the put carries {} bytes but says size_bytes {}; send them equal (or 0)",
                        bytes.len(),
                        req.size_bytes
                    )));
                }
                if !opts.sync && !opts.object {
                    return self.put_inline(req, &bytes, opts.expected).await;
                }
                Err(bytes)
            }
            PutBody::Memfd(file) => {
                check_client_memfd(&file, req.size_bytes)?;
                Ok(file)
            }
        };
        let node = self.clone();
        tokio::spawn(async move {
            let (rec, inline) = match region {
                Ok(file) => (node.allocate_now(req, NewRegion::Given(file)).await?, None),
                Err(bytes) => (node.allocate_now(req, NewRegion::Memfd).await?, Some(bytes)),
            };
            let id = rec.id;
            let committed = async {
                if let Some(bytes) = inline {
                    let memfd = node.store(Tier::Ram)?.memfd(id).ok_or_else(|| {
                        AgentError::InvalidState(format!("payload {id} was ended while it was written"))
                    })?;
                    memfd
                        .write_all_at(&bytes, 0)
                        .map_err(|e| io_error("writing the payload", e))?;
                }
                node.commit_now(id, opts.expected, opts.sync, opts.object).await
            }
            .await;
            if committed.is_err() {
                if let Err(err) = node.abort(id).await {
                    tracing::debug!(%id, %err, "could not abort a put that failed");
                }
            }
            committed
        })
        .await
        .map_err(|e| crate::error::task_failed("putting", e))?
    }
}

impl Node {
    /// The small-put hot path: a pooled memfd filled, sealed and hashed
    /// here, and one catalog write of the committed row (no allocation row,
    /// no digest written later).
    async fn put_inline(
        self: &Arc<Self>,
        mut req: AllocateRequest,
        bytes: &[u8],
        expected: Option<[u8; 32]>,
    ) -> Result<PayloadRecord, AgentError> {
        let charge = self.check_allocation(&mut req)?;
        let store = self.store(Tier::Ram)?;
        store.check_memfd_room()?;
        let digest: [u8; 32] = Sha256::digest(bytes).into();
        if let Some(want) = expected.filter(|want| *want != digest) {
            return Err(AgentError::InvalidArgument(format!(
                "the bytes sent hash to {} but the put expected {}; send them again",
                hex::encode(digest),
                hex::encode(want)
            )));
        }
        let size = req.size_bytes;
        if store.reserve(size).is_err() {
            // The only wait: nothing is taken before it, so a caller that
            // goes away here leaves nothing behind.
            self.make_room(Tier::Ram, size).await;
            store.reserve(size)?;
        }
        let id = crate::ids::payload();
        let filled = store.new_memfd(size).and_then(|file| {
            file.write_all_at(bytes, 0)?;
            crate::memfd::seal(&file)?;
            store.adopt_memfd(id, file)
        });
        if store.pool_wants_refill() {
            let node = self.clone();
            tokio::task::spawn_blocking(move || {
                if let Ok(store) = node.store(Tier::Ram) {
                    store.refill_pool();
                }
            });
        }
        if let Err(e) = filled {
            store.unreserve(size);
            return Err(io_error("writing the sealed payload", e));
        }
        let now = self.now_ms();
        let mut rec = self.allocation_record(req, id, now);
        rec.state = transition(rec.state, Event::Commit { durable: false })?;
        rec.version += 1;
        rec.sha256 = Some(digest);
        if let Err(err) = self.writer.write(Write::Insert(rec.clone())) {
            self.free_copy(Tier::Ram, id, size);
            return Err(err);
        }
        self.payloads
            .shard(&id)
            .insert(id, Arc::new(std::sync::Mutex::new(Entry::new(rec.clone(), now))));
        charge.keep();
        self.kick_spill_if_needed();
        Ok(rec)
    }
}

/// A client's memfd must be one the agent can seal, of the size declared.
fn check_client_memfd(file: &File, size: u64) -> Result<(), AgentError> {
    let seals = crate::memfd::seals(file).map_err(|_| {
        AgentError::InvalidArgument(
            "the descriptor sent with the put is not a sealable memfd; create it with memfd_create(MFD_ALLOW_SEALING)"
                .into(),
        )
    })?;
    if seals & libc::F_SEAL_SEAL != 0 && seals & crate::memfd::SEALS != crate::memfd::SEALS {
        return Err(AgentError::InvalidArgument(format!(
            "the memfd sent with the put has its seals fixed without write protection (seals {seals:#x}); send one \
             that still accepts seals"
        )));
    }
    let len = file
        .metadata()
        .map_err(|e| io_error("reading the size of the memfd sent", e))?
        .len();
    if len != size {
        return Err(AgentError::InvalidArgument(format!(
            "the memfd sent is {len} bytes but the put says size_bytes {size}; send them equal"
        )));
    }
    Ok(())
}

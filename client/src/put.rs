//! The data path over the native socket: one-call puts (inline or through
//! a memfd this client fills), allocations handed out as descriptors,
//! commits, and session leases with inline bytes or a sealed descriptor.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use memmap2::MmapOptions;
use payload_proto::core::{self as pb, PayloadDescriptor, PayloadState};
use payload_proto::native::{self as wire, request::Op, response::Result as Answer};
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::error::{ClientError, Result};
use crate::lease::{Held, View};
use crate::native::{unexpected, Native};
use crate::{Lease, LeaseOptions, PayloadId, PutOptions, Tier, WritableRegion};

/// Puts up to this size travel inline; larger ones go in a memfd.
const INLINE_PUT: usize = 32 << 10;
/// Leases of payloads up to this size bring the bytes back inline.
const INLINE_GET: u64 = 32 << 10;

fn options(opts: &PutOptions, expected_sha256: Vec<u8>) -> wire::Options {
    wire::Options {
        tier: opts.tier as i32,
        ttl_ms: opts.ttl_ms,
        labels: opts.labels.clone(),
        sync: opts.sync,
        object_durable: opts.object_durable,
        expected_sha256,
    }
}

pub(crate) fn commit_options(expected_sha256: Vec<u8>, sync: bool, object_durable: bool) -> wire::Options {
    wire::Options {
        sync,
        object_durable,
        expected_sha256,
        ..Default::default()
    }
}

fn sha256_if(verify: bool, bytes: &[u8]) -> Vec<u8> {
    if !verify {
        return Vec::new();
    }
    use sha2::Digest;
    sha2::Sha256::digest(bytes).to_vec()
}

fn pb_id(id: PayloadId) -> Option<pb::PayloadId> {
    Some(pb::PayloadId {
        value: id.as_bytes().to_vec(),
    })
}

fn parse_id(raw: &[u8], what: &str) -> Result<Uuid> {
    Uuid::from_slice(raw).map_err(|_| ClientError::Protocol(format!("the agent's {what} has no 16-byte id")))
}

/// A descriptor for what the native socket says of a payload (it has no
/// location a v1 client could open: the bytes come with descriptors).
fn descriptor(id: PayloadId, tier: i32, state: PayloadState, size: u64, sha256: Vec<u8>) -> PayloadDescriptor {
    PayloadDescriptor {
        payload_id: pb_id(id),
        tier,
        state: state as i32,
        size_bytes: size,
        sha256,
        ..Default::default()
    }
}

/// A memfd of `bytes`, unmapped and ready to send.
fn fill_memfd(bytes: &[u8]) -> Result<File> {
    let name = c"payload-put";
    // SAFETY: the name is NUL-terminated; we own the descriptor returned.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(ClientError::io(
            "creating a memfd for the put",
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: a fresh descriptor nobody else owns.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.set_len(bytes.len() as u64)
        .map_err(|e| ClientError::io("sizing the memfd for the put", e))?;
    // SAFETY: a memfd only this function has seen.
    let mut map = unsafe { MmapOptions::new().len(bytes.len()).populate().map_mut(&file) }
        .map_err(|e| ClientError::io("mapping the memfd for the put", e))?;
    map.copy_from_slice(bytes);
    // Unmapped before it is sent: the agent cannot seal a region mapped writable.
    drop(map);
    Ok(file)
}

pub(crate) async fn native_put(conn: &Native, bytes: &[u8], opts: &PutOptions) -> Result<PayloadDescriptor> {
    let options = Some(options(opts, sha256_if(opts.verify, bytes)));
    // Inline when small, and when the whole frame (labels too) fits one.
    let fits = bytes.len() <= INLINE_PUT
        && bytes.len() + options.as_ref().map_or(0, prost::Message::encoded_len) + 64 <= wire::MAX_FRAME;
    let (put, memfd) = if fits {
        let put = wire::Put {
            data: bytes.to_vec(),
            size_bytes: bytes.len() as u64,
            options,
        };
        (put, None)
    } else {
        let put = wire::Put {
            data: Vec::new(),
            size_bytes: bytes.len() as u64,
            options,
        };
        (put, Some(fill_memfd(bytes)?))
    };
    let (answer, _) = conn.call(Op::Put(put), memfd.as_ref().map(|f| f.as_raw_fd())).await?;
    committed(answer, bytes.len() as u64)
}

fn committed(answer: Answer, size: u64) -> Result<PayloadDescriptor> {
    let Answer::Committed(c) = answer else {
        return Err(unexpected("commit"));
    };
    let state = if c.tier == Tier::Ram as i32 {
        PayloadState::Active
    } else {
        PayloadState::Durable
    };
    Ok(descriptor(
        parse_id(&c.payload_id, "commit")?,
        c.tier,
        state,
        size,
        c.sha256,
    ))
}

pub(crate) async fn native_allocate(conn: &Native, size: u64, opts: &PutOptions) -> Result<WritableRegion> {
    let allocate = wire::Allocate {
        size_bytes: size,
        options: Some(options(opts, Vec::new())),
    };
    let (answer, fd) = conn.call(Op::Allocate(allocate), None).await?;
    let Answer::Allocated(a) = answer else {
        return Err(unexpected("allocate"));
    };
    let id = parse_id(&a.payload_id, "allocation")?;
    let mapped = fd
        .ok_or_else(|| ClientError::Protocol("the agent sent no descriptor with the allocation".into()))
        .and_then(|fd| {
            let file = File::from(fd);
            // SAFETY: the region was made for this writer alone; nobody
            // reads it until the commit, which needs it unmapped.
            // Populated: the agent allocated the pages, and faulting them
            // in here at once is cheaper than one fault per page later.
            unsafe { MmapOptions::new().len(size as usize).populate().map_mut(&file) }
                .map_err(|e| ClientError::io("mapping the allocation", e))
        });
    match mapped {
        Ok(map) => Ok(WritableRegion {
            id,
            desc: descriptor(id, opts.tier as i32, PayloadState::Allocated, size, Vec::new()),
            map,
            verify: opts.verify,
            sync: opts.sync,
            object_durable: opts.object_durable,
            native: true,
        }),
        Err(err) => {
            let _ = native_abort(conn, id).await;
            Err(err)
        }
    }
}

pub(crate) async fn native_commit(
    conn: &Native,
    id: PayloadId,
    size: u64,
    opts: wire::Options,
) -> Result<PayloadDescriptor> {
    let commit = wire::Commit {
        payload_id: id.as_bytes().to_vec(),
        options: Some(opts),
    };
    let (answer, _) = conn.call(Op::Commit(commit), None).await?;
    committed(answer, size)
}

pub(crate) async fn native_abort(conn: &Native, id: PayloadId) -> Result<()> {
    let abort = wire::Abort {
        payload_id: id.as_bytes().to_vec(),
    };
    conn.call(Op::Abort(abort), None).await.map(drop)
}

/// Releases leases, in calls of at most [`wire::MAX_BATCH`].
pub(crate) async fn native_release(conn: &Native, leases: &[Uuid]) -> Result<u32> {
    let mut released = 0;
    for chunk in leases.chunks(wire::MAX_BATCH) {
        let release = wire::Release { lease_ids: pack(chunk) };
        match conn.call(Op::Release(release), None).await? {
            (Answer::Released(r), _) => released += r.released,
            _ => return Err(unexpected("release")),
        }
    }
    Ok(released)
}

pub(crate) async fn native_lease(
    conn: &Native,
    id: PayloadId,
    opts: LeaseOptions,
    releases: mpsc::UnboundedSender<Uuid>,
) -> Result<Lease> {
    let lease = wire::Lease {
        payload_id: id.as_bytes().to_vec(),
        min_tier: opts.min_tier.map(|t| t as i32).unwrap_or(0),
        best_effort: opts.best_effort,
        inline_max_bytes: INLINE_GET,
        timed: opts.timed,
        duration_ms: opts.duration_ms,
    };
    let (answer, fd) = conn.call(Op::Lease(lease), None).await?;
    let Answer::Leased(l) = answer else {
        return Err(unexpected("lease"));
    };
    let lease_id = parse_id(&l.lease_id, "lease")?;
    let view = match fd {
        None if l.data.len() as u64 == l.size_bytes => Ok(View::Inline(l.data)),
        None => Err(ClientError::Protocol(
            "the agent sent neither the bytes nor a descriptor with the lease".into(),
        )),
        Some(fd) => {
            let file = File::from(fd);
            // SAFETY: a committed payload's bytes never change (a memfd's
            // seals make sure of it), and the mapping is read-only.
            unsafe { MmapOptions::new().len(l.size_bytes as usize).populate().map(&file) }
                .map(|map| View::Map(Arc::new(map)))
                .map_err(|e| ClientError::io("mapping the leased payload", e))
        }
    };
    let state = if l.tier == Tier::Ram as i32 {
        PayloadState::Active
    } else {
        PayloadState::Durable
    };
    let view = match view {
        Ok(view) => view,
        Err(err) => {
            // Not mapped: given back at once.
            let _ = releases.send(lease_id);
            return Err(err);
        }
    };
    Ok(Lease {
        held: Arc::new(Held {
            id,
            lease_id,
            desc: descriptor(id, l.tier, state, l.size_bytes, Vec::new()),
            view,
            expires_at_ms: if opts.timed { l.expires_at_ms } else { u64::MAX },
            releases: Mutex::new(Some(releases)),
        }),
    })
}

/// Ids back to back, as the native batch calls carry them.
fn pack(ids: &[Uuid]) -> Vec<u8> {
    let mut packed = Vec::with_capacity(16 * ids.len());
    for id in ids {
        packed.extend_from_slice(id.as_bytes());
    }
    packed
}

/// Session leases on many payloads, in calls of at most [`wire::MAX_BATCH`]
/// ids: a lease id each, or why not, in order. When a later call fails,
/// or the caller drops the future, the leases earlier calls were granted
/// go back through `releases`.
pub(crate) async fn native_lease_many(
    conn: &Native,
    ids: &[PayloadId],
    releases: &mpsc::UnboundedSender<Uuid>,
) -> Result<Vec<Result<Uuid>>> {
    let mut granted = Granted {
        out: Vec::with_capacity(ids.len()),
        releases,
    };
    // In calls of at most MAX_BATCH ids, whose answers always fit a frame.
    for chunk in ids.chunks(wire::MAX_BATCH) {
        let leases = wire::Leases {
            payload_ids: pack(chunk),
        };
        let (answer, _) = conn.call(Op::Leases(leases), None).await?;
        let Answer::LeasedMany(many) = answer else {
            return Err(unexpected("batch lease"));
        };
        if many.lease_ids.len() != 16 * chunk.len() {
            return Err(ClientError::Protocol(
                "the agent answered a batch lease with another count".into(),
            ));
        }
        let mut refusals: Vec<Option<wire::Refused>> = vec![None; chunk.len()];
        let mut broken = None;
        for refused in many.refused {
            match refusals.get_mut(refused.index as usize) {
                Some(slot @ None) => *slot = Some(refused),
                _ => broken = Some("the agent refused a batch lease's item twice or past its end"),
            }
        }
        for (raw, refusal) in many.lease_ids.chunks_exact(16).zip(refusals) {
            let granted_here = raw.iter().any(|b| *b != 0);
            granted.out.push(match (refusal, granted_here) {
                (None, true) => parse_id(raw, "batch lease"),
                (Some(r), false) => Err(tonic::Status::new(tonic::Code::from(r.code), r.message).into()),
                // Kept as granted, so that it is released with the rest.
                (Some(_), true) => {
                    broken = Some("the agent both granted and refused a batch lease's item");
                    parse_id(raw, "batch lease")
                }
                (None, false) => {
                    broken = Some("the agent neither granted nor refused a batch lease's item");
                    Err(ClientError::Protocol("no lease id".into()))
                }
            });
        }
        if let Some(broken) = broken {
            return Err(ClientError::Protocol(broken.into()));
        }
    }
    Ok(std::mem::take(&mut granted.out))
}

/// A batch lease's answers so far: dropped before they are returned, its
/// leases are released.
struct Granted<'a> {
    out: Vec<Result<Uuid>>,
    releases: &'a mpsc::UnboundedSender<Uuid>,
}

impl Drop for Granted<'_> {
    fn drop(&mut self) {
        for lease in self.out.iter().filter_map(|r| r.as_ref().ok()) {
            // The release loop is gone only with the connection, which
            // ends every session lease anyway.
            let _ = self.releases.send(*lease);
        }
    }
}

//! One native request: checked like its gRPC counterpart, served by the
//! same node methods, answered with a response and at most one descriptor.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use payload_catalog::{LeaseId, PayloadId, Priority, Tier};
use payload_proto::native::{self as wire, request::Op, response::Result as Answer};
use tonic::Status;

use super::Session;
use crate::grpc::convert::{expected_digest, optional_tier, status};
use crate::node::{AllocateRequest, CommitOptions, Node, PutBody};
use crate::store::io_error;

/// A descriptor to send with the response.
pub(super) type Out = Option<Arc<File>>;

pub(super) async fn handle(
    node: &Arc<Node>,
    session: &Session,
    req: wire::Request,
    fd: Option<OwnedFd>,
) -> (wire::Response, Out) {
    let id = req.id;
    let takes_fd = matches!(&req.op, Some(Op::Put(_)));
    let (kind, started) = (req.op.as_ref().map_or("unknown", op_name), std::time::Instant::now());
    let outcome = match (req.op, fd) {
        (_, Some(_)) if !takes_fd => Err(Status::invalid_argument(
            "only a put carries a descriptor (its memfd); the one sent was closed",
        )),
        (None, _) => Err(Status::unimplemented(
            "the request names no operation this agent knows; is the client newer than the agent?",
        )),
        (Some(op), fd) => serve(node, session, op, fd).await,
    };
    let code = outcome.as_ref().map_or_else(|st| st.code(), |_| tonic::Code::Ok);
    node.metrics.native_call(kind, code, started);
    let response = match outcome {
        Ok((result, out)) => {
            return (
                wire::Response {
                    id,
                    error: None,
                    result: Some(result),
                },
                out,
            )
        }
        Err(st) => wire::Response {
            id,
            error: Some(wire::Error {
                code: st.code() as i32,
                message: st.message().to_string(),
            }),
            result: None,
        },
    };
    (response, None)
}

/// The operation's name in metrics.
fn op_name(op: &Op) -> &'static str {
    match op {
        Op::Allocate(_) => "allocate",
        Op::Commit(_) => "commit",
        Op::Abort(_) => "abort",
        Op::Lease(_) => "lease",
        Op::Release(_) => "release",
        Op::Put(_) => "put",
        Op::Renew(_) => "renew",
        Op::Leases(_) => "leases",
    }
}

async fn serve(node: &Arc<Node>, session: &Session, op: Op, fd: Option<OwnedFd>) -> Result<(Answer, Out), Status> {
    match op {
        Op::Allocate(a) => {
            let req = allocation(node, session, a.size_bytes, a.options.as_ref())?;
            if req.tier != Tier::Ram {
                // A writable descriptor of a file would outlive its commit.
                return Err(Status::invalid_argument(format!(
                    "the native socket hands out RAM regions only (memfds, sealed at commit); allocate on the {} \
                     tier over gRPC",
                    req.tier.name()
                )));
            }
            let (rec, memfd) = node.allocate_sealed(req).await.map_err(status)?;
            Ok((allocated(rec.id), Some(memfd)))
        }
        Op::Commit(c) => {
            let id = payload_id(&c.payload_id)?;
            let opts = commit_options(c.options.as_ref())?;
            node.authorize_change(id, &session.caller, "committing")
                .map_err(status)?;
            let rec = node
                .commit(id, opts.expected, opts.sync, opts.object)
                .await
                .map_err(status)?;
            Ok((committed(node, &rec), None))
        }
        Op::Abort(a) => {
            let id = payload_id(&a.payload_id)?;
            node.authorize_change(id, &session.caller, "aborting").map_err(status)?;
            node.abort(id).await.map_err(status)?;
            Ok((Answer::Done(wire::Done {}), None))
        }
        Op::Put(p) => {
            let body = match fd {
                Some(fd) => PutBody::Memfd(File::from(fd)),
                None => PutBody::Inline(p.data),
            };
            let size = match &body {
                PutBody::Inline(bytes) if p.size_bytes == 0 => bytes.len() as u64,
                _ => p.size_bytes,
            };
            let req = allocation(node, session, size, p.options.as_ref())?;
            let opts = commit_options(p.options.as_ref())?;
            let rec = node.put_sealed(req, body, opts).await.map_err(status)?;
            Ok((committed(node, &rec), None))
        }
        Op::Lease(l) => lease(node, session, l).await,
        Op::Leases(l) => {
            let ids = packed(node, "payload_ids", &l.payload_ids)?;
            session.room_for(ids.len())?;
            // Every 16 bytes are an id (a payload id is any 16 bytes); the
            // read rule is checked under each payload's lock as its lease
            // is granted.
            let ids: Vec<PayloadId> = ids
                .map(|raw| PayloadId::from_slice(raw).map_err(status))
                .collect::<Result<_, _>>()?;
            let rule = node.config().read_access;
            let grants = node.acquire_many_session(&ids, |rec| session.caller.may_read(rec, rule));
            session.add_many(grants.iter().filter_map(|g| g.as_ref().ok().copied()));
            let mut many = wire::LeasedMany {
                lease_ids: Vec::with_capacity(16 * grants.len()),
                refused: Vec::new(),
            };
            for (index, grant) in grants.into_iter().enumerate() {
                match grant {
                    Ok(lease) => many.lease_ids.extend_from_slice(lease.as_bytes()),
                    Err(err) => {
                        let st = status(err);
                        many.lease_ids.extend_from_slice(&[0; 16]);
                        many.refused.push(wire::Refused {
                            index: index as u32,
                            code: st.code() as i32,
                            message: cut(st.message(), wire::BATCH_MESSAGE_MAX),
                        });
                    }
                }
            }
            Ok((Answer::LeasedMany(many), None))
        }
        Op::Release(r) => {
            let leases = packed(node, "lease_ids", &r.lease_ids)?
                .map(|raw| LeaseId::from_slice(raw).map_err(status))
                .collect::<Result<Vec<_>, _>>()?;
            session.remove_many(&leases);
            let released = node.release_many(&leases) as u32;
            Ok((Answer::Released(wire::Released { released }), None))
        }
        Op::Renew(r) => {
            let lease = LeaseId::from_slice(&r.lease_id).map_err(status)?;
            let expires_at_ms = node.renew(lease, r.extend_ms).map_err(status)?;
            Ok((Answer::Renewed(wire::Renewed { expires_at_ms }), None))
        }
    }
}

/// The 16-byte ids packed in `bytes`: a batch of at least one, within `--max-batch-items`
/// and of at most [`wire::MAX_BATCH`] ids, so its answer fits a frame.
fn packed<'a>(node: &Node, what: &str, bytes: &'a [u8]) -> Result<std::slice::ChunksExact<'a, u8>, Status> {
    // Before the ids were packed they had other field numbers: an older
    // client's batch arrives here empty, and must not pass for a no-op.
    if bytes.is_empty() {
        return Err(Status::invalid_argument(format!(
            "{what} is empty: a batch names at least one id; is the client the agent's version?"
        )));
    }
    if !bytes.len().is_multiple_of(16) {
        return Err(Status::invalid_argument(format!(
            "{what} is {} bytes, not a whole number of 16-byte ids; is the client the agent's version?",
            bytes.len()
        )));
    }
    let n = bytes.len() / 16;
    node.config().limits.batch(what, n)?;
    if n > wire::MAX_BATCH {
        return Err(Status::invalid_argument(format!(
            "{what} has {n} ids; a native call takes at most {} (its answer must fit a frame): split the batch",
            wire::MAX_BATCH
        )));
    }
    Ok(bytes.chunks_exact(16))
}

/// `text` cut to at most `max` bytes, on a character boundary.
fn cut(text: &str, max: usize) -> String {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

async fn lease(node: &Arc<Node>, session: &Session, l: wire::Lease) -> Result<(Answer, Out), Status> {
    let id = payload_id(&l.payload_id)?;
    let min_tier = optional_tier(l.min_tier, "min_tier")?;
    if l.timed {
        node.config().limits.duration("duration_ms", l.duration_ms)?;
    } else {
        session.room_for(1)?;
    }
    node.reach(id, &session.caller).await.map_err(status)?;
    node.authorize_read(id, &session.caller).map_err(status)?;
    let grant = if l.timed {
        node.acquire(id, min_tier, !l.best_effort, l.duration_ms).await
    } else {
        node.acquire_session(id, min_tier, !l.best_effort, inline_max(&l)).await
    }
    .map_err(status)?;
    if !l.timed {
        session.add(grant.lease);
    }
    let opened = open_copy(node, grant.rec.tier, id);
    let read = opened.and_then(|(file, sealed)| {
        let size = grant.rec.size_bytes;
        if size > inline_max(&l) {
            let out = if sealed { reopen_read_only(&file)? } else { file };
            return Ok((Vec::new(), Some(out), sealed));
        }
        let mapped = match sealed {
            true => node
                .tier(grant.rec.tier)?
                .regions()
                .and_then(|r| r.copy_small(id, &file, size as usize)),
            false => None,
        };
        let data = match mapped {
            Some(data) => data,
            None => {
                let mut data = vec![0u8; size as usize];
                file.read_exact_at(&mut data, 0)
                    .map_err(|e| io_error("reading the payload", e))?;
                data
            }
        };
        Ok((data, None, sealed))
    });
    match read {
        Ok((data, out, sealed)) => Ok((
            Answer::Leased(wire::Leased {
                lease_id: grant.lease.as_bytes().to_vec(),
                size_bytes: grant.rec.size_bytes,
                tier: grant.rec.tier as i32,
                data,
                sealed,
                expires_at_ms: if l.timed { grant.expires_ms } else { 0 },
            }),
            out,
        )),
        Err(err) => {
            session.remove(&grant.lease);
            node.release(grant.lease);
            Err(status(err))
        }
    }
}

/// The largest payload whose bytes the answer to `l` carries.
fn inline_max(l: &wire::Lease) -> u64 {
    l.inline_max_bytes.min(wire::INLINE_MAX as u64)
}

/// The leased copy, read-only (a memfd is sent as it is: its seals make it
/// read-only in every process), and whether it is sealed.
fn open_copy(node: &Node, tier: Tier, id: PayloadId) -> Result<(Arc<File>, bool), crate::error::AgentError> {
    let store = node.tier(tier)?;
    if let Some(memfd) = store.regions().and_then(|r| r.memfd(id)) {
        return Ok((memfd, true));
    }
    let source = store.file(id).unwrap_or_else(|| {
        // The object tier: its cache file, filled before the lease returned.
        match store.place(id) {
            Some(crate::tiers::Place::File(path)) => File::open(&path).map(|file| crate::store::Source { file, path }),
            _ => Err(std::io::Error::other("the copy has no local file")),
        }
    });
    let source = source.map_err(|e| io_error("opening the leased copy", e))?;
    Ok((Arc::new(source.file), false))
}

/// A memfd to send a reader: reopened read-only from the one held (before
/// Linux 6.7 a read-only shared mapping of a write-sealed memfd needs a
/// read-only descriptor, and a reader must not share the agent's offset).
fn reopen_read_only(memfd: &File) -> Result<Arc<File>, crate::error::AgentError> {
    use std::os::fd::AsRawFd;
    File::open(format!("/proc/self/fd/{}", memfd.as_raw_fd()))
        .map(Arc::new)
        .map_err(|e| io_error("opening the leased copy", e))
}

fn payload_id(raw: &[u8]) -> Result<PayloadId, Status> {
    if raw.is_empty() {
        return Err(Status::invalid_argument("payload_id is missing"));
    }
    PayloadId::from_slice(raw).map_err(status)
}

fn allocation(
    node: &Node,
    session: &Session,
    size: u64,
    opts: Option<&wire::Options>,
) -> Result<AllocateRequest, Status> {
    let default = wire::Options::default();
    let opts = opts.unwrap_or(&default);
    let limits = &node.config().limits;
    limits.labels("label", &opts.labels)?;
    limits.duration("ttl_ms", opts.ttl_ms)?;
    let tier = optional_tier(opts.tier, "tier")?.unwrap_or(Tier::Ram);
    Ok(AllocateRequest {
        ttl_ms: opts.ttl_ms,
        priority: Priority::Normal,
        labels: opts.labels.clone().into_iter().collect(),
        owner: Some(session.caller.principal()),
        ..AllocateRequest::new(size, tier)
    })
}

fn commit_options(opts: Option<&wire::Options>) -> Result<CommitOptions, Status> {
    let Some(opts) = opts else {
        return Ok(CommitOptions::default());
    };
    Ok(CommitOptions {
        expected: expected_digest(&opts.expected_sha256)?,
        sync: opts.sync,
        object: opts.object_durable,
    })
}

fn allocated(id: PayloadId) -> Answer {
    Answer::Allocated(wire::Allocated {
        payload_id: id.as_bytes().to_vec(),
    })
}

fn committed(node: &Node, rec: &payload_catalog::PayloadRecord) -> Answer {
    let sealed = node.store(rec.tier).is_ok_and(|s| s.memfd(rec.id).is_some());
    Answer::Committed(wire::Committed {
        payload_id: rec.id.as_bytes().to_vec(),
        tier: rec.tier as i32,
        sha256: rec.sha256.map(|d| d.to_vec()).unwrap_or_default(),
        sealed,
    })
}

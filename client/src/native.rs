//! The agent's native socket (`<grpc-socket>.native`): one frame per call
//! over `SOCK_SEQPACKET`, descriptors passed with the frames, many calls in
//! flight at once (each frame carries its request id). A reader task hands
//! every response to the call waiting for it.

use std::collections::HashMap;
use std::os::fd::{OwnedFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use payload_proto::native::{self as wire, request::Op, response::Result as Answer, Socket};
use prost::Message;
use tokio::sync::oneshot;

use crate::error::{ClientError, Result};

type Reply = (wire::Response, Option<OwnedFd>);
type Pending = Arc<Mutex<Option<HashMap<u64, oneshot::Sender<Reply>>>>>;

/// How long a lone quick call polls for its answer before waiting to be
/// woken: longer than a small put or get takes the agent, far shorter than
/// a thread wake-up on a loaded machine.
const SPIN_US: u64 = 200;
/// The most `PAYLOAD_CLIENT_SPIN_US` may ask for.
const SPIN_MAX_US: u64 = 10_000;
/// Calls moving more than this are not polled for: the agent takes long
/// enough over them that a wake-up costs nothing by comparison.
const QUICK_BYTES: u64 = 1 << 20;

/// The poll, from `PAYLOAD_CLIENT_SPIN_US` (0 turns it off), read once.
fn spin() -> std::time::Duration {
    static SPIN: std::sync::OnceLock<std::time::Duration> = std::sync::OnceLock::new();
    *SPIN.get_or_init(|| {
        let us = std::env::var("PAYLOAD_CLIENT_SPIN_US")
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(SPIN_US);
        std::time::Duration::from_micros(us.min(SPIN_MAX_US))
    })
}

/// Whether the agent answers `op` in microseconds: no hashing, syncing,
/// uploading or large region on the way.
fn quick(op: &Op) -> bool {
    let plain = |o: &Option<wire::Options>| {
        o.as_ref()
            .is_none_or(|o| !o.sync && !o.object_durable && o.expected_sha256.is_empty())
    };
    match op {
        Op::Put(p) => p.size_bytes <= QUICK_BYTES && plain(&p.options),
        Op::Allocate(a) => a.size_bytes <= QUICK_BYTES,
        Op::Commit(c) => plain(&c.options),
        Op::Abort(_) | Op::Lease(_) | Op::Release(_) | Op::Renew(_) | Op::Leases(_) => true,
    }
}

/// The agent's native socket: one connection at a time, made again after
/// the agent closes one (a restart). The call that meets the closed
/// connection fails (it may or may not have happened); later calls go on
/// the new one. Leases taken over a connection end when it closes.
pub struct Native {
    path: std::path::PathBuf,
    conn: std::sync::RwLock<Arc<Conn>>,
    /// The runtime that drives the connection (the client's I/O thread's):
    /// a new connection is made there, whichever runtime the call came on.
    runtime: tokio::runtime::Handle,
    /// Moves when a connection closes (its reader sees it) and when a new
    /// one is made, so leases of a closed one are told apart.
    generation: Arc<AtomicU64>,
}

impl Native {
    /// Connects; must run inside the runtime that drives the connection.
    pub fn connect(path: &Path) -> std::io::Result<Native> {
        let generation = Arc::new(AtomicU64::new(0));
        Ok(Native {
            path: path.to_path_buf(),
            conn: std::sync::RwLock::new(Arc::new(Conn::connect(path, generation.clone())?)),
            runtime: tokio::runtime::Handle::current(),
            generation,
        })
    }

    /// Which connection calls go on now.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub async fn call(&self, op: Op, fd: Option<RawFd>) -> Result<(Answer, Option<OwnedFd>)> {
        let conn = self.conn.read().unwrap_or_else(|p| p.into_inner()).clone();
        let outcome = conn.call(op, fd).await;
        if matches!(outcome, Err(ClientError::Unavailable(_)) | Err(ClientError::Io { .. })) && conn.is_closed() {
            let mut current = self.conn.write().unwrap_or_else(|p| p.into_inner());
            if Arc::ptr_eq(&current, &conn) {
                let _driven_there = self.runtime.enter();
                if let Ok(fresh) = Conn::connect(&self.path, self.generation.clone()) {
                    *current = Arc::new(fresh);
                    self.generation.fetch_add(1, Ordering::AcqRel);
                }
            }
        }
        outcome
    }
}

/// One connection.
struct Conn {
    socket: Arc<Socket>,
    next: Arc<AtomicU64>,
    /// `None` once the connection has failed: later calls fail at once.
    pending: Pending,
    reader: tokio::task::JoinHandle<()>,
    /// The buffer of the call that polls the socket itself (one at a time).
    spin_buf: Mutex<Vec<u8>>,
    /// Where gives-back of answers nobody waits for are sent from.
    runtime: tokio::runtime::Handle,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Conn {
    fn connect(path: &Path, generation: Arc<AtomicU64>) -> std::io::Result<Conn> {
        let socket = Arc::new(Socket::connect(path)?);
        let pending: Pending = Arc::new(Mutex::new(Some(HashMap::new())));
        let next = Arc::new(AtomicU64::new(1));
        let runtime = tokio::runtime::Handle::current();
        let reader = runtime.spawn(read_loop(socket.clone(), pending.clone(), next.clone(), generation));
        Ok(Conn {
            socket,
            next,
            pending,
            reader,
            spin_buf: Mutex::new(Vec::new()),
            runtime,
        })
    }

    /// A lone call in flight polls the socket itself for a while (see
    /// [`SPIN_US`]) instead of waiting for the reader task: that costs a
    /// wake-up of the reader's thread and another of the caller's. With
    /// other calls under way the reader is busy anyway and nobody spins.
    fn spin_for(&self, rx: &mut oneshot::Receiver<Reply>) {
        if lock(&self.pending).as_ref().is_none_or(|map| map.len() != 1) {
            return;
        }
        let Ok(mut buf) = self.spin_buf.try_lock() else {
            return;
        };
        let deadline = std::time::Instant::now() + spin();
        // The reader task may take the answer first: the loop watches `rx`.
        while rx.is_empty() && std::time::Instant::now() < deadline {
            match self.socket.try_recv(&mut buf) {
                Ok(Some(frame)) => {
                    let from = Reader {
                        socket: &self.socket,
                        pending: &self.pending,
                        next: &self.next,
                        runtime: &self.runtime,
                    };
                    if !from.deliver(&buf[..frame.len], frame.fds) {
                        lock(&self.pending).take();
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::yield_now(),
                // The peer closed or the socket failed: the reader sees it too.
                Ok(None) | Err(_) => return,
            }
        }
    }

    fn is_closed(&self) -> bool {
        lock(&self.pending).is_none() || self.reader.is_finished()
    }

    /// Sends one request (with a descriptor, for a put) and waits for its answer.
    pub async fn call(&self, op: Op, fd: Option<RawFd>) -> Result<(Answer, Option<OwnedFd>)> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let polls = quick(&op) && !spin().is_zero();
        let (tx, mut rx) = oneshot::channel();
        lock(&self.pending).as_mut().ok_or_else(closed)?.insert(id, tx);
        let frame = wire::Request { id, op: Some(op) }.encode_to_vec();
        if frame.len() > wire::MAX_FRAME {
            if let Some(map) = lock(&self.pending).as_mut() {
                map.remove(&id);
            }
            return Err(ClientError::InvalidArgument(format!(
                "the request is {} bytes, more than a native frame holds ({}); use fewer or shorter labels",
                frame.len(),
                wire::MAX_FRAME
            )));
        }
        let fds: Vec<RawFd> = fd.into_iter().collect();
        if let Err(e) = self.socket.send(&frame, &fds).await {
            if let Some(map) = lock(&self.pending).as_mut() {
                map.remove(&id);
            }
            return Err(ClientError::io("sending to the agent's native socket", e));
        }
        if polls {
            self.spin_for(&mut rx);
        }
        let (response, fd) = rx.await.map_err(|_| closed())?;
        if let Some(err) = response.error {
            return Err(tonic::Status::new(tonic::Code::from(err.code), err.message).into());
        }
        let answer = response
            .result
            .ok_or_else(|| ClientError::Protocol("a native response carried neither a result nor an error".into()))?;
        Ok((answer, fd))
    }
}

fn closed() -> ClientError {
    ClientError::Unavailable("the agent closed the native connection; connect again".into())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

async fn read_loop(socket: Arc<Socket>, pending: Pending, next: Arc<AtomicU64>, generation: Arc<AtomicU64>) {
    let mut buf = Vec::new();
    let runtime = tokio::runtime::Handle::current();
    let from = Reader {
        socket: &socket,
        pending: &pending,
        next: &next,
        runtime: &runtime,
    };
    // Registered once, for reading only (see `Socket`); without it the
    // connection is given up like a failed one.
    if let Ok(waiter) = socket.waiter() {
        while let Ok(Some(frame)) = socket.recv_on(&waiter, &mut buf).await {
            if !from.deliver(&buf[..frame.len], frame.fds) {
                break;
            }
        }
    }
    // Every waiting call learns the connection is gone, and leases held
    // on it are no longer handed out from the client's cache.
    lock(&pending).take();
    generation.fetch_add(1, Ordering::AcqRel);
}

/// What hands answers to their calls: the reader task, or a polling call.
struct Reader<'a> {
    socket: &'a Arc<Socket>,
    pending: &'a Pending,
    next: &'a AtomicU64,
    /// The connection's runtime: a give-back is sent from there, not from
    /// a polling caller's runtime, which may end first.
    runtime: &'a tokio::runtime::Handle,
}

impl Reader<'_> {
    /// Hands a response to the call waiting for it; false when the
    /// connection is not to be trusted further.
    fn deliver(&self, bytes: &[u8], fds: Vec<OwnedFd>) -> bool {
        let Ok(response) = wire::Response::decode(bytes) else {
            return false;
        };
        let waiter = lock(self.pending).as_mut().and_then(|map| map.remove(&response.id));
        match waiter {
            Some(tx) => {
                if let Err((response, _)) = tx.send((response, fds.into_iter().next())) {
                    // Its caller went away (a dropped future): what it was
                    // granted is given back rather than held until the
                    // connection closes.
                    if let Some(op) = response.result.and_then(give_back) {
                        self.send_later(op);
                    }
                }
                true
            }
            // Id 0 answers a frame the agent could not read: ours are never
            // malformed, so the connection is not to be trusted further.
            None => response.id != 0,
        }
    }

    /// Sent by a task of its own: the reader never waits on a send, or a
    /// full socket could stall both sides.
    fn send_later(&self, op: Op) {
        let request = wire::Request {
            id: self.next.fetch_add(1, Ordering::Relaxed),
            op: Some(op),
        };
        let socket = self.socket.clone();
        self.runtime.spawn(async move {
            let _ = socket.send(&request.encode_to_vec(), &[]).await;
        });
    }
}

/// What undoes an answer nobody took: the leases it granted released, the
/// region it allocated aborted.
fn give_back(answer: Answer) -> Option<Op> {
    let lease_ids = match answer {
        Answer::Leased(leased) => leased.lease_id,
        // Refused items are all zeros: no lease has that id.
        Answer::LeasedMany(many) => many
            .lease_ids
            .chunks_exact(16)
            .filter(|id| id.iter().any(|b| *b != 0))
            .flatten()
            .copied()
            .collect(),
        Answer::Allocated(allocated) => {
            return Some(Op::Abort(wire::Abort {
                payload_id: allocated.payload_id,
            }))
        }
        _ => return None,
    };
    (!lease_ids.is_empty()).then_some(Op::Release(wire::Release { lease_ids }))
}

/// Whether `answer` is the variant `want`, or a protocol error naming it.
pub fn unexpected(what: &str) -> ClientError {
    ClientError::Protocol(format!(
        "the agent answered a native {what} with another kind of result"
    ))
}

/// The native socket beside a gRPC target, when the target is a Unix socket
/// and the agent serves one there.
pub fn beside(target: &str) -> Option<std::path::PathBuf> {
    let socket = target
        .strip_prefix("unix://")
        .or_else(|| target.strip_prefix("unix:"))
        .or_else(|| target.starts_with('/').then_some(target))?;
    let native = wire::socket_path(Path::new(socket));
    native.exists().then_some(native)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_nobody_took_is_given_back() {
        let packed = |ids: &[u8]| ids.iter().flat_map(|b| [*b; 16]).collect::<Vec<u8>>();
        let many = Answer::LeasedMany(wire::LeasedMany {
            lease_ids: packed(&[1, 0, 3]),
            refused: vec![wire::Refused {
                index: 1,
                code: 5,
                message: "not found".into(),
            }],
        });
        let Some(Op::Release(release)) = give_back(many) else {
            panic!("a batch of leases is released")
        };
        assert_eq!(release.lease_ids, packed(&[1, 3]));
        let refused = Answer::LeasedMany(wire::LeasedMany {
            lease_ids: packed(&[0]),
            refused: vec![],
        });
        assert!(give_back(refused).is_none(), "nothing granted, nothing sent");
        let allocated = Answer::Allocated(wire::Allocated {
            payload_id: vec![9; 16],
        });
        let Some(Op::Abort(abort)) = give_back(allocated) else {
            panic!("an allocation is aborted")
        };
        assert_eq!(abort.payload_id, vec![9u8; 16]);
        assert!(give_back(Answer::Done(wire::Done {})).is_none());
    }

    #[test]
    fn only_calls_the_agent_answers_at_once_poll() {
        let put = |size_bytes, sync| {
            Op::Put(wire::Put {
                size_bytes,
                options: Some(wire::Options {
                    sync,
                    ..Default::default()
                }),
                ..Default::default()
            })
        };
        assert!(quick(&put(4096, false)));
        assert!(!quick(&put(4096, true)), "a synced put waits for the disk");
        assert!(!quick(&put(QUICK_BYTES + 1, false)));
        assert!(!quick(&Op::Allocate(wire::Allocate {
            size_bytes: 256 << 20,
            options: None
        })));
        assert!(quick(&Op::Lease(wire::Lease::default())));
    }
}

//! The native data plane: the agent's second Unix socket
//! (`<grpc-socket>.native`), one protobuf frame per `SOCK_SEQPACKET`
//! message, file descriptors passed with `SCM_RIGHTS`. It serves the data
//! path (allocate, commit, abort, one-call put, lease, release, renew) on
//! the same node, catalog and lease table as gRPC. Leases taken here are
//! session leases: they end when the connection closes.

mod ops;

use std::future::Future;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use payload_catalog::LeaseId;
use payload_proto::native::{self as wire, Socket};
use prost::Message;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::identity::Caller;
use crate::node::{lock, IdSet, Node};

/// Binds the native socket beside the gRPC one, with the same `mode`. A
/// stale socket file is replaced; a live one (another agent) is an error.
pub fn bind(path: &Path, mode: u32) -> anyhow::Result<Socket> {
    crate::server::bind_private(path, mode, |p| Socket::connect(p).is_ok(), Socket::listen)
}

/// Connections served at once; past it, new ones wait in the backlog.
const MAX_CONNECTIONS: usize = 1024;

/// Serves connections until `stop` turns true.
pub async fn serve(node: Arc<Node>, listener: Socket, mut stop: watch::Receiver<bool>) {
    let mut connections = JoinSet::new();
    loop {
        if connections.len() >= MAX_CONNECTIONS {
            tokio::select! {
                _ = connections.join_next() => continue,
                _ = crate::node::stopped(&mut stop) => break,
            }
        }
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(socket) => match socket.peer_cred() {
                    Ok(cred) => {
                        let caller = Caller::Unix { uid: cred.uid, gid: cred.gid, pid: cred.pid };
                        connections.spawn(Connection::new(node.clone(), socket, caller).run());
                    }
                    Err(e) => tracing::warn!(%e, "a native connection has no peer credentials; closed"),
                },
                Err(e) => {
                    // EMFILE and the like: back off instead of spinning.
                    tracing::warn!(%e, "accepting a native connection failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            _ = crate::node::stopped(&mut stop) => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    connections.shutdown().await;
}

/// One client connection: its socket and the leases it holds.
struct Connection {
    node: Arc<Node>,
    socket: Arc<Socket>,
    session: Arc<Session>,
}

/// Whether some connection is polling now (see `Connection::run`).
static SPINNING: AtomicBool = AtomicBool::new(false);

/// Who is on a connection, and the leases it holds: released when the
/// last of the connection and its calls lets go of it, however that
/// happens (a close, a panic, an abort at shutdown).
pub(crate) struct Session {
    pub caller: Caller,
    node: Arc<Node>,
    leases: Mutex<IdSet<LeaseId>>,
}

impl Drop for Session {
    fn drop(&mut self) {
        let leases: Vec<LeaseId> = lock(&self.leases).drain().collect();
        if !leases.is_empty() {
            let released = self.node.release_many(&leases);
            tracing::debug!(released, "a native connection ended; its session leases are released");
        }
    }
}

impl Session {
    /// Refuses `n` more session leases past `--max-session-leases`. Checked
    /// before granting, so calls in flight together may pass it by their
    /// own sizes at most (they are capped too).
    pub fn room_for(&self, n: usize) -> Result<(), tonic::Status> {
        let cap = self.node.config().limits.session_leases;
        let mut leases = lock(&self.leases);
        if leases.len().saturating_add(n) > cap {
            // Leases ended elsewhere (a forced delete, a gRPC release) leave
            // their ids here: drop those before refusing.
            leases.retain(|lease| self.node.lease_is_live(lease));
        }
        let held = leases.len();
        if held.saturating_add(n) > cap {
            return Err(tonic::Status::resource_exhausted(format!(
                "this connection holds {held} session leases and asks for {n} more; the limit is {cap} \
                 (--max-session-leases): release some first"
            )));
        }
        Ok(())
    }

    pub fn add(&self, lease: LeaseId) {
        lock(&self.leases).insert(lease);
    }

    /// Adds a batch's leases under one lock.
    pub fn add_many(&self, leases: impl Iterator<Item = LeaseId>) {
        lock(&self.leases).extend(leases);
    }

    pub fn remove(&self, lease: &LeaseId) {
        lock(&self.leases).remove(lease);
    }

    pub fn remove_many(&self, leases: &[LeaseId]) {
        let mut held = lock(&self.leases);
        for lease in leases {
            held.remove(lease);
        }
    }
}

impl Connection {
    fn new(node: Arc<Node>, socket: Socket, caller: Caller) -> Self {
        Self {
            node: node.clone(),
            socket: Arc::new(socket),
            session: Arc::new(Session {
                caller,
                node: node.clone(),
                leases: Mutex::default(),
            }),
        }
    }

    async fn run(self) {
        let mut buf = Vec::new();
        let mut calls = JoinSet::new();
        let in_flight = (self.node.config().limits.calls_per_connection as usize).max(1);
        let spin = self.node.config().native_spin;
        let mut waiter = None;
        loop {
            if calls.len() >= in_flight {
                // A peer that sends and never reads waits here: nothing more
                // is read from it until its calls finish.
                calls.join_next().await;
                continue;
            }
            // With nothing under way the next request is likely the peer's
            // reply to our answer: poll briefly before parking. One
            // connection polls at a time, so polling holds one worker at most.
            let spinning = calls.is_empty() && !spin.is_zero() && !SPINNING.swap(true, Ordering::AcqRel);
            let spun = match spinning {
                true => {
                    // Unregistered while polling: see `Socket`.
                    waiter = None;
                    let spun = self.socket.spin_recv(&mut buf, spin);
                    SPINNING.store(false, Ordering::Release);
                    spun
                }
                false => Err(std::io::ErrorKind::WouldBlock.into()),
            };
            let frame = match spun {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    let parked = match &waiter {
                        Some(parked) => parked,
                        None => match self.socket.waiter() {
                            Ok(made) => waiter.insert(made),
                            Err(e) => {
                                tracing::warn!(%e, "could not wait on a native connection; closed");
                                break;
                            }
                        },
                    };
                    tokio::select! {
                        frame = self.socket.recv_on(parked, &mut buf) => frame,
                        Some(_) = calls.join_next(), if !calls.is_empty() => continue,
                    }
                }
                spun => spun,
            };
            let frame = match frame {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(%e, "a native connection failed");
                    break;
                }
            };
            let answer = match decode(&buf[..frame.len], &frame) {
                Ok(request) => request,
                Err(response) => {
                    // Answered at once; the descriptors that came are closed.
                    send(&self.socket, &response, None).await;
                    continue;
                }
            };
            let (node, socket, session) = (self.node.clone(), self.socket.clone(), self.session.clone());
            let fd = frame.fds.into_iter().next();
            let mut call = Box::pin(async move {
                let (response, out) = ops::handle(&node, &session, answer, fd).await;
                send(&socket, &response, out.as_ref().map(|f| f.as_raw_fd())).await;
            });
            // Most calls finish without waiting: they run here, with no
            // hand-off to another task (on two cores a hand-off can cost as
            // much as the round trip). One that waits (a promotion, a large
            // region) goes on as a task of its own; calls pipeline past it.
            let done = std::future::poll_fn(|cx| std::task::Poll::Ready(call.as_mut().poll(cx).is_ready())).await;
            if !done {
                calls.spawn(call);
            }
        }
        // Calls under way finish first; the session's leases go when the
        // last of them lets go of it.
        while calls.join_next().await.is_some() {}
    }
}

/// A request, or the error response that answers a frame that is not one.
fn decode(bytes: &[u8], frame: &wire::Frame) -> Result<wire::Request, wire::Response> {
    let refuse = |id: u64, message: String| wire::Response {
        id,
        error: Some(wire::Error {
            code: tonic::Code::InvalidArgument as i32,
            message,
        }),
        result: None,
    };
    if frame.truncated {
        return Err(refuse(
            0,
            format!(
                "a frame was larger than {} bytes and was dropped; put larger payloads through a memfd",
                wire::MAX_FRAME
            ),
        ));
    }
    let request = wire::Request::decode(bytes).map_err(|e| {
        refuse(
            0,
            format!("a frame is not a native request ({e}); is the client the agent's version?"),
        )
    })?;
    if frame.extra_fds {
        return Err(refuse(
            request.id,
            format!(
                "a request carries at most {} descriptor; the others were closed",
                wire::MAX_FDS
            ),
        ));
    }
    Ok(request)
}

async fn send(socket: &Socket, response: &wire::Response, mut fd: Option<std::os::fd::RawFd>) {
    let mut bytes = response.encode_to_vec();
    if bytes.len() > wire::MAX_FRAME {
        // Never expected (batches are capped to fit); if it happens, the
        // caller gets an error instead of a cut frame or no answer at all.
        let refusal = wire::Response {
            id: response.id,
            error: Some(wire::Error {
                code: tonic::Code::Internal as i32,
                message: format!(
                    "the answer is {} bytes, more than a native frame holds ({}); ask for less in one call",
                    bytes.len(),
                    wire::MAX_FRAME
                ),
            }),
            result: None,
        };
        bytes = refusal.encode_to_vec();
        fd = None;
    }
    let fds: Vec<_> = fd.into_iter().collect();
    if let Err(e) = socket.send(&bytes, &fds).await {
        // Usually the peer went away. Whatever the reason, an answer was
        // lost: the connection is shut, so the peer learns it (its calls
        // fail) instead of waiting for ever, and its session ends.
        tracing::debug!(%e, "could not answer on a native connection; shutting it");
        socket.shutdown();
    }
}

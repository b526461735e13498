//! The memfd keeper: a small process that holds the descriptors of sealed
//! RAM payloads, so that they outlive an agent killed with SIGKILL (a
//! memfd lives only while someone holds it; a `/dev/shm` file lives on
//! its own). The agent hands it each memfd as it is created and tells it
//! when one is freed; a restarted agent takes them all back. The keeper
//! runs in a session of its own (an interrupt aimed at the agent's
//! terminal does not reach it), listens on `<state-dir>/keeper.sock`, and
//! exits when its socket is removed, or when the agent disconnects and it
//! holds nothing.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use payload_catalog::PayloadId;
use payload_proto::native::{connect_fd, listen_fd, recv_frame, send_frame};

const SOCKET: &str = "keeper.sock";

/// The agent's connection to its keeper.
pub struct Keeper {
    path: PathBuf,
    link: Mutex<Link>,
    /// One replacement at a time: a second caller finds the link healthy.
    replacing: Mutex<()>,
}

/// One connection to a keeper, and whether its keeper hung up.
struct Link {
    fd: OwnedFd,
    /// Set by this connection's watcher thread when the keeper hangs up.
    lost: Arc<AtomicBool>,
}

impl Link {
    fn new(fd: OwnedFd) -> Link {
        let lost = Arc::new(AtomicBool::new(false));
        watch(&fd, lost.clone());
        Link { fd, lost }
    }

    /// Whether the keeper is still there: not reported lost, not hung up.
    fn alive(&self) -> bool {
        let mut poll = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: one pollfd, valid for the call; a zero timeout never blocks.
        let ready = unsafe { libc::poll(&mut poll, 1, 0) };
        !self.lost.load(Ordering::Acquire) && ready == 0
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        // The watcher holds a copy of the descriptor: shutting the socket
        // (not just closing ours) ends the watcher, and lets a keeper that
        // still lives stop serving this connection and accept the next.
        // SAFETY: shutdown on a descriptor we own.
        unsafe { libc::shutdown(self.fd.as_raw_fd(), libc::SHUT_RDWR) };
    }
}

/// Watches a keeper connection on a thread of its own and sets `lost`
/// once the keeper hangs up, so a dead keeper is noticed at once rather
/// than at the next payload handed to it.
fn watch(conn: &OwnedFd, lost: Arc<AtomicBool>) {
    let Ok(fd) = conn.try_clone() else { return };
    let spawned = std::thread::Builder::new()
        .name("payload-keeper-watch".into())
        .spawn(move || loop {
            let mut poll = libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLRDHUP,
                revents: 0,
            };
            // SAFETY: one pollfd, valid for the call.
            let ready = unsafe { libc::poll(&mut poll, 1, -1) };
            if ready > 0 && poll.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0 {
                lost.store(true, Ordering::Release);
                return;
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(%e, "could not watch the memfd keeper");
    }
}

impl std::fmt::Debug for Keeper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keeper").field("path", &self.path).finish()
    }
}

impl Keeper {
    /// Connects to the keeper of `state_dir` (starting one if none runs)
    /// and takes back every memfd it holds.
    pub fn start(state_dir: &Path) -> anyhow::Result<(Keeper, Vec<(PayloadId, File)>)> {
        let path = state_dir.join(SOCKET);
        let mut last = None;
        // A keeper may be exiting as we connect (it held nothing): try again.
        for _ in 0..3 {
            let conn = connect_or_spawn(&path)?;
            match list(&conn) {
                Ok(kept) => {
                    let keeper = Keeper {
                        path,
                        link: Mutex::new(Link::new(conn)),
                        replacing: Mutex::new(()),
                    };
                    return Ok((keeper, kept));
                }
                Err(e) => last = Some(e),
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(anyhow::anyhow!(
            "could not take the sealed payloads back from the keeper at {}: {}",
            path.display(),
            last.map(|e| e.to_string()).unwrap_or_default()
        ))
    }

    /// Gives the keeper a copy of `file`'s descriptor for `id`.
    pub fn keep(&self, id: PayloadId, file: &File) -> io::Result<()> {
        self.send(&format!("keep {id}"), Some(file))
    }

    /// Whether the keeper of the current connection has hung up.
    pub fn lost(&self) -> bool {
        self.link().lost.load(Ordering::Acquire)
    }

    /// After a failed send: the sweeper replaces the keeper (see
    /// [`Keeper::reconnect`]) rather than the request that noticed.
    pub fn mark_lost(&self) {
        self.link().lost.store(true, Ordering::Release);
    }

    /// Tells the keeper to close its copy of `id`'s memfd.
    pub fn forget(&self, id: PayloadId) {
        if let Err(e) = self.send(&format!("drop {id}"), None) {
            tracing::warn!(%id, %e, "could not tell the keeper to drop a memfd; it is dropped at the next start");
        }
    }

    fn link(&self) -> std::sync::MutexGuard<'_, Link> {
        self.link.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn send(&self, message: &str, file: Option<&File>) -> io::Result<()> {
        let fds: Vec<_> = file.map(|f| f.as_raw_fd()).into_iter().collect();
        send_frame(self.link().fd.as_raw_fd(), message.as_bytes(), &fds)
    }

    /// Connects to a keeper again (starting one) when the current one is
    /// gone; true when it did, and the caller must then hand it every memfd
    /// (a dead keeper no longer holds them). A keeper found healthy (one
    /// that another caller already replaced) is kept. Blocking: it may
    /// start a process and wait for it.
    pub fn reconnect(&self) -> io::Result<bool> {
        let _one = self.replacing.lock().unwrap_or_else(|p| p.into_inner());
        if self.link().alive() {
            return Ok(false);
        }
        tracing::error!("the memfd keeper is gone; starting a new one and handing it every sealed payload again");
        // Connected with no lock held: sends meanwhile fail at once on the
        // dead link, and their memfds are handed over below.
        let fresh = Link::new(connect_or_spawn(&self.path).map_err(io::Error::other)?);
        drop(std::mem::replace(&mut *self.link(), fresh));
        Ok(true)
    }
}

fn connect_or_spawn(path: &Path) -> anyhow::Result<OwnedFd> {
    if let Ok(conn) = connect_fd(path, false) {
        return Ok(conn);
    }
    let exe = std::env::current_exe().context("finding the agent binary to start the memfd keeper")?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path.with_extension("log"))
        .context("opening the keeper's log")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("keeper")
        .arg("--socket")
        .arg(path)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log);
    // SAFETY: setsid is async-signal-safe; nothing else runs in the child.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("starting the memfd keeper")?;
    for _ in 0..250 {
        if let Ok(conn) = connect_fd(path, false) {
            return Ok(conn);
        }
        if let Ok(Some(status)) = child.try_wait() {
            anyhow::bail!(
                "the memfd keeper exited with {status}; see {}",
                path.with_extension("log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    anyhow::bail!("the memfd keeper did not come up at {}", path.display())
}

fn list(conn: &OwnedFd) -> io::Result<Vec<(PayloadId, File)>> {
    send_frame(conn.as_raw_fd(), b"list", &[])?;
    let mut buf = vec![0u8; 256];
    let mut kept = Vec::new();
    loop {
        let frame = recv_frame(conn.as_raw_fd(), &mut buf)?
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "the keeper closed the connection"))?;
        let text = std::str::from_utf8(&buf[..frame.len]).unwrap_or_default();
        if text == "end" {
            return Ok(kept);
        }
        let id = text.strip_prefix("fd ").and_then(|id| PayloadId::parse(id).ok());
        if let (Some(id), Some(fd)) = (id, frame.fds.into_iter().next()) {
            kept.push((id, File::from(fd)));
        }
    }
}

/// The keeper process: holds memfds until told to drop them.
pub fn run(socket: &Path) -> anyhow::Result<()> {
    // One descriptor per payload it keeps.
    crate::memfd::raise_fd_limit();
    if socket.exists() {
        anyhow::ensure!(
            connect_fd(socket, false).is_err(),
            "a keeper already serves {}",
            socket.display()
        );
        std::fs::remove_file(socket)?;
    }
    let listener = listen_fd(socket, false).with_context(|| format!("binding {}", socket.display()))?;
    let mut kept: HashMap<PayloadId, OwnedFd> = HashMap::new();
    let mut buf = vec![0u8; 256];
    loop {
        // Wakes each second to see whether its socket (state dir) is gone.
        let mut poll = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd, valid for the call.
        let ready = unsafe { libc::poll(&mut poll, 1, 1000) };
        if !socket.exists() {
            return Ok(());
        }
        if ready <= 0 {
            continue;
        }
        // SAFETY: accept4 with no address out-parameters; we own the result.
        let conn = unsafe {
            libc::accept4(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if conn < 0 {
            continue;
        }
        // SAFETY: a fresh descriptor.
        let conn: OwnedFd = unsafe { std::os::fd::FromRawFd::from_raw_fd(conn) };
        serve(&conn, &mut kept, &mut buf);
        if kept.is_empty() {
            let _ = std::fs::remove_file(socket);
            return Ok(());
        }
    }
}

/// How long the keeper lets messages gather between reads: while it
/// sleeps, an agent's send wakes nobody (one wake-up per batch, not per put).
const GATHER: Duration = Duration::from_millis(2);

/// One agent's connection, until it closes.
fn serve(conn: &OwnedFd, kept: &mut HashMap<PayloadId, OwnedFd>, buf: &mut [u8]) {
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let flags = libc::fcntl(conn.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(conn.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK);
    }
    loop {
        let mut poll = libc::pollfd {
            fd: conn.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd, valid for the call.
        if unsafe { libc::poll(&mut poll, 1, -1) } < 0 {
            continue;
        }
        loop {
            match recv_frame(conn.as_raw_fd(), buf) {
                Ok(Some(frame)) => {
                    if !handle(conn, kept, &buf[..frame.len], frame.fds) {
                        return;
                    }
                }
                Ok(None) => return,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
        std::thread::sleep(GATHER);
    }
}

/// One message; false when the connection is to be dropped.
fn handle(conn: &OwnedFd, kept: &mut HashMap<PayloadId, OwnedFd>, bytes: &[u8], fds: Vec<OwnedFd>) -> bool {
    let text = std::str::from_utf8(bytes).unwrap_or_default().to_string();
    let (verb, id) = text.split_once(' ').unwrap_or((text.as_str(), ""));
    let id = PayloadId::parse(id).ok();
    match (verb, id, fds.into_iter().next()) {
        ("keep", Some(id), Some(fd)) => {
            kept.insert(id, fd);
        }
        ("drop", Some(id), _) => {
            kept.remove(&id);
        }
        ("list", _, _) => {
            let sent = kept
                .iter()
                .try_for_each(|(id, fd)| send_blocking(conn, format!("fd {id}").as_bytes(), &[fd.as_raw_fd()]));
            return sent.and_then(|()| send_blocking(conn, b"end", &[])).is_ok();
        }
        _ => eprintln!("payload-agent keeper: ignored a message it does not know: {text:?}"),
    }
    true
}

/// Sends on the non-blocking connection, waiting while its buffer is full.
fn send_blocking(conn: &OwnedFd, bytes: &[u8], fds: &[std::os::fd::RawFd]) -> io::Result<()> {
    loop {
        match send_frame(conn.as_raw_fd(), bytes, fds) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(GATHER),
            other => return other,
        }
    }
}

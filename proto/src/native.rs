//! The native data plane's transport: one protobuf message per
//! `SOCK_SEQPACKET` frame on a Unix socket, with file descriptors passed in
//! the same frame (`SCM_RIGHTS`). Message boundaries come from the socket,
//! so there is no length prefix to get wrong, and a descriptor always
//! arrives with the request it belongs to.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

pub use crate::generated::payload::native::*;

/// The largest frame either side sends or accepts.
pub const MAX_FRAME: usize = 128 << 10;
/// Payloads up to this size travel inline in a put or a lease.
pub const INLINE_MAX: usize = 64 << 10;
/// The most ids one batch lease or release carries: its answer, refusals
/// included (their messages are cut to [`BATCH_MESSAGE_MAX`]), always fits
/// in a frame. Clients split longer lists.
pub const MAX_BATCH: usize = 1000;
/// The longest refusal message of one item of a batch answer.
pub const BATCH_MESSAGE_MAX: usize = 96;
/// The most descriptors one frame carries.
pub const MAX_FDS: usize = 1;

/// The native socket that sits beside an agent's gRPC socket.
pub fn socket_path(grpc_socket: &Path) -> PathBuf {
    let mut name = grpc_socket.as_os_str().to_owned();
    name.push(".native");
    PathBuf::from(name)
}

/// One received frame; its bytes are the first `len` of the buffer given
/// to [`Socket::recv`].
#[derive(Debug)]
pub struct Frame {
    pub len: usize,
    pub fds: Vec<OwnedFd>,
    /// The frame was larger than [`MAX_FRAME`] and was cut.
    pub truncated: bool,
    /// More descriptors came than [`MAX_FDS`]; the extra ones were closed.
    pub extra_fds: bool,
}

/// A connected (or listening) non-blocking seqpacket socket.
///
/// It is registered with the runtime's poller only for what a caller
/// waits for: a registered socket wakes the poller's thread for every
/// frame that arrives (and, registered for writing, every frame the peer
/// takes off it), even while a polling caller ([`Socket::spin_recv`])
/// takes the frames itself, and on a small machine that wake-up costs
/// more than the round trip. A reader that parks often keeps a
/// [`Waiter`] (registered for reading only) and drops it while it polls;
/// senders share one registration for writing, made at the first send that
/// would block; other waits register a duplicate descriptor for their length.
pub struct Socket {
    fd: OwnedFd,
    /// The runtime the socket was made in: registrations are made with its
    /// poller, whichever runtime's task waits on them.
    runtime: Option<tokio::runtime::Handle>,
    /// Every sender's registration for writing (see above).
    writes: std::sync::OnceLock<AsyncFd<OwnedFd>>,
}

/// A socket's registration with the poller for reading (see [`Socket`]).
pub struct Waiter(AsyncFd<OwnedFd>);

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn new_socket(nonblocking: bool) -> io::Result<OwnedFd> {
    let flags = if nonblocking { libc::SOCK_NONBLOCK } else { 0 };
    // SAFETY: socket has no memory preconditions; we own what it returns.
    let fd = cvt(unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC | flags, 0) })?;
    // SAFETY: fd is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn sockaddr(path: &Path) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    // SAFETY: an all-zero sockaddr_un is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "the socket path {} is longer than the {} bytes a Unix socket name holds",
                path.display(),
                addr.sun_path.len() - 1
            ),
        ));
    }
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    Ok((addr, len as libc::socklen_t))
}

/// A connected seqpacket socket (blocking unless `nonblocking`).
pub fn connect_fd(path: &Path, nonblocking: bool) -> io::Result<OwnedFd> {
    let fd = new_socket(nonblocking)?;
    let (addr, len) = sockaddr(path)?;
    // SAFETY: addr is a valid sockaddr_un of length len.
    cvt(unsafe { libc::connect(fd.as_raw_fd(), &addr as *const _ as *const libc::sockaddr, len) })?;
    Ok(fd)
}

/// A seqpacket socket listening on `path` (blocking unless `nonblocking`).
pub fn listen_fd(path: &Path, nonblocking: bool) -> io::Result<OwnedFd> {
    let fd = new_socket(nonblocking)?;
    let (addr, len) = sockaddr(path)?;
    // SAFETY: as in connect_fd.
    cvt(unsafe { libc::bind(fd.as_raw_fd(), &addr as *const _ as *const libc::sockaddr, len) })?;
    // SAFETY: listen on a bound socket we own.
    cvt(unsafe { libc::listen(fd.as_raw_fd(), 1024) })?;
    Ok(fd)
}

impl Socket {
    fn new(fd: OwnedFd) -> Self {
        Self {
            fd,
            runtime: tokio::runtime::Handle::try_current().ok(),
            writes: std::sync::OnceLock::new(),
        }
    }

    /// A duplicate of the descriptor registered for `interest`.
    fn register(&self, interest: Interest) -> io::Result<AsyncFd<OwnedFd>> {
        let _made_there = self.runtime.as_ref().map(|r| r.enter());
        // SAFETY: the duplicate is open, and only this AsyncFd owns it until dropped.
        let registered = unsafe { AsyncFd::register_with_interest(self.fd.try_clone()?, interest) }?;
        Ok(registered)
    }

    /// Shuts both directions: the peer reads end-of-file, and this side's
    /// waits end.
    pub fn shutdown(&self) {
        // SAFETY: shutdown on a descriptor we own.
        unsafe { libc::shutdown(self.fd.as_raw_fd(), libc::SHUT_RDWR) };
    }

    /// Runs `op` until it stops answering `WouldBlock`, waiting for
    /// `interest` in between.
    async fn retry<T>(&self, interest: Interest, mut op: impl FnMut(RawFd) -> io::Result<T>) -> io::Result<T> {
        loop {
            match op(self.fd.as_raw_fd()) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.ready(interest).await?,
                other => return other,
            }
        }
    }

    /// A registration for reading, for [`Socket::recv_on`].
    pub fn waiter(&self) -> io::Result<Waiter> {
        self.register(Interest::READABLE).map(Waiter)
    }

    /// [`Socket::recv`], waiting on `waiter` (made by this socket's
    /// [`Socket::waiter`]) instead of a registration of its own.
    pub async fn recv_on(&self, waiter: &Waiter, buf: &mut Vec<u8>) -> io::Result<Option<Frame>> {
        if buf.len() < MAX_FRAME {
            buf.resize(MAX_FRAME, 0);
        }
        let fd = self.fd.as_raw_fd();
        loop {
            let mut ready = waiter.0.readable().await?;
            // A `WouldBlock` clears the readiness, so the next wait parks.
            if let Ok(frame) = ready.try_io(|_| recv_frame(fd, buf)) {
                return frame;
            }
        }
    }

    /// Waits until the socket may be ready for `interest`. A registration
    /// of its own, so waits for reading and writing can run at once; one
    /// made while the socket is ready already reports at once.
    async fn ready(&self, interest: Interest) -> io::Result<()> {
        let waiter = self.register(interest)?;
        let _ready = waiter.ready(interest).await?;
        Ok(())
    }

    /// Connects to a listening native socket.
    pub fn connect(path: &Path) -> io::Result<Self> {
        Ok(Self::new(connect_fd(path, true)?))
    }

    /// Binds and listens on `path` (which must not exist).
    pub fn listen(path: &Path) -> io::Result<Self> {
        Ok(Self::new(listen_fd(path, true)?))
    }

    /// Accepts one connection.
    pub async fn accept(&self) -> io::Result<Socket> {
        let fd = self
            .retry(Interest::READABLE, |fd| {
                // SAFETY: accept4 with no address out-parameters.
                let conn = cvt(unsafe {
                    libc::accept4(
                        fd,
                        std::ptr::null_mut(),
                        std::ptr::null_mut(),
                        libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                    )
                })?;
                // SAFETY: a fresh descriptor nobody else owns.
                Ok(unsafe { OwnedFd::from_raw_fd(conn) })
            })
            .await?;
        Ok(Socket::new(fd))
    }

    /// The peer's uid, gid and pid, as the kernel recorded them at connect.
    pub fn peer_cred(&self) -> io::Result<libc::ucred> {
        let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
        let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        // SAFETY: cred and len describe a buffer of the right size.
        cvt(unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                &mut cred as *mut _ as *mut libc::c_void,
                &mut len,
            )
        })?;
        Ok(cred)
    }

    /// Sends one frame with the given descriptors.
    pub async fn send(&self, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
        let fd = self.fd.as_raw_fd();
        match send_frame(fd, bytes, fds) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            sent => return sent,
        }
        // The peer is not reading: wait, on the one registration every
        // sender of this socket shares (one per blocked send could hold a
        // descriptor each for hundreds of calls in flight).
        if self.writes.get().is_none() {
            let _ = self.writes.set(self.register(Interest::WRITABLE)?);
        }
        let writes = self
            .writes
            .get()
            .ok_or_else(|| io::Error::other("the socket's registration for writing was not kept"))?;
        loop {
            let mut ready = writes.writable().await?;
            if let Ok(sent) = ready.try_io(|_| send_frame(fd, bytes, fds)) {
                return sent;
            }
        }
    }

    /// Receives one frame into `buf` (grown to [`MAX_FRAME`] once and
    /// reused); `Ok(None)` when the peer has closed (or sent an empty frame,
    /// which no request or response is).
    pub async fn recv(&self, buf: &mut Vec<u8>) -> io::Result<Option<Frame>> {
        if buf.len() < MAX_FRAME {
            buf.resize(MAX_FRAME, 0);
        }
        self.retry(Interest::READABLE, |fd| recv_frame(fd, buf)).await
    }

    /// Receives one frame if it arrives within `spin`, polling instead of
    /// parking: on small VMs waking a parked thread costs more than the
    /// round trip itself. `WouldBlock` when none came (then [`Socket::recv`]
    /// waits). Between tries the CPU is yielded, so a peer that shares it
    /// still runs. Blocks the calling thread for at most `spin`.
    pub fn spin_recv(&self, buf: &mut Vec<u8>, spin: Duration) -> io::Result<Option<Frame>> {
        let deadline = Instant::now() + spin;
        loop {
            match self.try_recv(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::yield_now()
                }
                other => return other,
            }
        }
    }

    /// Receives one frame if one is there now; `WouldBlock` if not.
    pub fn try_recv(&self, buf: &mut Vec<u8>) -> io::Result<Option<Frame>> {
        if buf.len() < MAX_FRAME {
            buf.resize(MAX_FRAME, 0);
        }
        recv_frame(self.fd.as_raw_fd(), buf)
    }
}

/// Space for the control message of [`MAX_FDS`] descriptors, and one more
/// so that a peer sending too many is noticed.
const CMSG_SPACE: usize = 64;

/// Sends one frame with `fds` on a seqpacket socket.
pub fn send_frame(fd: RawFd, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    let mut control = [0u64; CMSG_SPACE / 8];
    // SAFETY: an all-zero msghdr is valid; the pointers set below outlive the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        let payload = std::mem::size_of_val(fds) as u32;
        // SAFETY: CMSG_SPACE is a pure computation.
        let space = unsafe { libc::CMSG_SPACE(payload) } as usize;
        assert!(space <= CMSG_SPACE, "too many descriptors for one frame");
        msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = space;
        // SAFETY: the control buffer is large enough for one header and fds.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(payload) as usize;
            std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(cmsg) as *mut RawFd, fds.len());
        }
    }
    // SAFETY: msg points at valid buffers; MSG_NOSIGNAL turns a closed peer into EPIPE.
    let sent = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Receives one frame into `bytes`; `None` when the peer has closed.
pub fn recv_frame(fd: RawFd, bytes: &mut [u8]) -> io::Result<Option<Frame>> {
    let mut iov = libc::iovec {
        iov_base: bytes.as_mut_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    let mut control = [0u64; CMSG_SPACE / 8];
    // SAFETY: as in send_frame.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = CMSG_SPACE;
    // SAFETY: msg points at valid buffers; CLOEXEC keeps received fds out of children.
    let got = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if got < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: walking the control messages the kernel wrote into `control`.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg) as *const RawFd;
                let count = ((*cmsg).cmsg_len - libc::CMSG_LEN(0) as usize) / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    let closed = got == 0 && fds.is_empty() && msg.msg_flags & libc::MSG_TRUNC == 0;
    if closed {
        return Ok(None);
    }
    let extra_fds = fds.len() > MAX_FDS || msg.msg_flags & libc::MSG_CTRUNC != 0;
    fds.truncate(MAX_FDS);
    Ok(Some(Frame {
        len: got as usize,
        fds,
        truncated: msg.msg_flags & libc::MSG_TRUNC != 0,
        extra_fds,
    }))
}

//! Serving the gRPC services on a Unix socket and, optionally, TCP, until a
//! shutdown signal; in-flight calls drain before the servers return.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;

use crate::deadline::DeadlineLayer;
use crate::grpc::routes;
use crate::metrics::MetricsLayer;
use crate::node::Node;

/// How often an idle connection is probed, and how long a probe may wait.
const KEEPALIVE: Duration = Duration::from_secs(30);

/// Binds the agent socket, owner-only. A stale socket file is replaced; a
/// live one (another agent) is an error.
pub fn bind_socket(path: &Path) -> anyhow::Result<UnixListener> {
    bind_socket_with_mode(path, 0o600)
}

/// [`bind_socket`], then opened to `mode` (`--read-access` decides who may
/// connect at all).
pub fn bind_socket_with_mode(path: &Path, mode: u32) -> anyhow::Result<UnixListener> {
    bind_private(
        path,
        mode,
        |p| std::os::unix::net::UnixStream::connect(p).is_ok(),
        |p| UnixListener::bind(p),
    )
}

/// Binds a socket at `path` with `bind`: its directory made, a stale socket
/// file replaced (one that `live` can still reach belongs to another
/// agent: an error), created owner-only and then opened to `mode`.
pub fn bind_private<T>(
    path: &Path,
    mode: u32,
    live: impl Fn(&Path) -> bool,
    bind: impl FnOnce(&Path) -> std::io::Result<T>,
) -> anyhow::Result<T> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if path.exists() {
        anyhow::ensure!(
            !live(path),
            "another agent is already listening on {}; stop it or choose another --socket",
            path.display()
        );
        std::fs::remove_file(path).with_context(|| format!("removing the stale socket {}", path.display()))?;
    }
    // Created 0600 by the bind itself, so there is no moment when another
    // user could connect. The umask is the process's: this runs at start-up,
    // and it only ever takes permissions away.
    // SAFETY: umask has no preconditions.
    let old = unsafe { libc::umask(0o177) };
    let bound = bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let listener = bound.with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(listener)
}

pub async fn bind_tcp(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}; is another agent running? choose another --listen or --listen off"))
}

/// Serves until `stop` turns true, then drains. TCP calls must carry
/// `token` when one is given.
pub async fn serve(
    node: Arc<Node>,
    uds: UnixListener,
    tcp: Option<TcpListener>,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    serve_with_token(node, uds, tcp, None, stop).await
}

pub async fn serve_with_token(
    node: Arc<Node>,
    uds: UnixListener,
    tcp: Option<TcpListener>,
    token: Option<String>,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let limits = node.config().limits.clone();
    let metrics = node.metrics.clone();
    let builder = move || {
        Server::builder()
            .max_concurrent_streams(Some(limits.calls_per_connection))
            // Dead peers are found and their connections closed.
            .http2_keepalive_interval(Some(KEEPALIVE))
            .http2_keepalive_timeout(Some(KEEPALIVE))
            .tcp_keepalive(Some(KEEPALIVE))
            .layer(MetricsLayer(metrics.clone()))
            .layer(DeadlineLayer {
                limit: Duration::from_millis(limits.request_timeout_ms),
            })
    };
    let unix = builder()
        .add_routes(routes(node.clone()))
        .serve_with_incoming_shutdown(UnixListenerStream::new(uds), stopped(stop.clone()));
    let tcp = async {
        match tcp {
            Some(listener) => builder()
                .layer(tower::util::option_layer(
                    token.as_deref().map(crate::token::TokenLayer::new),
                ))
                .add_routes(routes(node))
                .serve_with_incoming_shutdown(TcpIncoming::from(listener).with_nodelay(Some(true)), stopped(stop))
                .await
                .context("TCP server"),
            None => Ok(()),
        }
    };
    let (unix, tcp) = tokio::join!(unix, tcp);
    unix.context("Unix socket server")?;
    tcp
}

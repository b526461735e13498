//! Channels to an agent over a Unix socket or TCP.

use std::path::PathBuf;

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};
use tower::service_fn;

use crate::error::{ClientError, Result};

pub async fn channel(target: &str) -> Result<Channel> {
    let socket = target
        .strip_prefix("unix://")
        .or_else(|| target.strip_prefix("unix:"))
        .or_else(|| target.starts_with('/').then_some(target));
    let connect_err = |source| ClientError::Connect {
        target: target.to_string(),
        source,
    };
    match socket {
        Some(path) => {
            let path = PathBuf::from(path);
            // The URI is required by the API but unused: the connector dials the socket.
            Endpoint::from_static("http://agent.local")
                .connect_with_connector(service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move { UnixStream::connect(path).await.map(TokioIo::new) }
                }))
                .await
                .map_err(connect_err)
        }
        None => {
            let endpoint = Endpoint::from_shared(target.to_string()).map_err(|_| {
                ClientError::InvalidArgument(format!(
                    "{target:?} is not an agent address; use unix:///path/agent.sock, /path/agent.sock or http://host:port"
                ))
            })?;
            endpoint.tcp_nodelay(true).connect().await.map_err(connect_err)
        }
    }
}

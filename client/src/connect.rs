//! Channels to an agent over a Unix socket or TCP, and to an operator.

use std::path::PathBuf;

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Uri};
use tower::service_fn;

use crate::error::{ClientError, Result};

/// What every generated client of a [`crate::Client`] sends through: the
/// channel, with the agent's TCP token added to each call when one is set.
pub type Transport = InterceptedService<Channel, Bearer>;

/// Adds `authorization: Bearer <token>` to every call (an agent listening
/// on TCP with `--tcp-token-file` refuses calls without it). Its `Debug`
/// does not show the token.
#[derive(Clone, Default)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Bearer {
    /// The header for `token`, which must be printable ASCII with no spaces
    /// (as the agent's `--tcp-token-file` requires).
    pub(crate) fn new(token: &str) -> Result<Bearer> {
        if !is_token(token) {
            return Err(ClientError::InvalidArgument(
                "a TCP token must be one word of printable ASCII (as in the agent's --tcp-token-file)".into(),
            ));
        }
        let mut value: MetadataValue<Ascii> = format!("Bearer {token}")
            .parse()
            .map_err(|_| ClientError::InvalidArgument("the TCP token cannot be sent as a header".into()))?;
        // Never indexed by HPACK, and printed as `Sensitive`.
        value.set_sensitive(true);
        Ok(Bearer(Some(value)))
    }

    /// The token for `target`: sent to TCP addresses only, never down a
    /// Unix socket (whose agent knows its callers by their credentials).
    pub(crate) fn for_target(target: &str, token: &str) -> Result<Bearer> {
        let bearer = Bearer::new(token)?;
        Ok(if unix_socket(target).is_some() {
            Bearer::default()
        } else {
            bearer
        })
    }
}

/// Whether `token` is one a TCP agent can be given: one word of printable
/// ASCII, as its `--tcp-token-file` requires.
pub fn is_token(token: &str) -> bool {
    !token.is_empty() && token.bytes().all(|b| b.is_ascii_graphic())
}

impl std::fmt::Debug for Bearer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Bearer(<redacted>)"
        } else {
            "Bearer(None)"
        })
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut request: tonic::Request<()>) -> std::result::Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// The socket path of a Unix `target`, None for a TCP address.
fn unix_socket(target: &str) -> Option<&str> {
    target
        .strip_prefix("unix://")
        .or_else(|| target.strip_prefix("unix:"))
        .or_else(|| target.starts_with('/').then_some(target))
}

pub async fn channel(target: &str) -> Result<Channel> {
    let socket = unix_socket(target);
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

/// A channel to an operator's cluster view: `http://host:port` (loopback,
/// or a `kubectl port-forward`) or `https://host:port`, whose certificate
/// `ca_pem` must sign.
/// `token` says a bearer token will ride on the calls: over plain http it
/// is sent only to a loopback host, where nobody else can read it.
pub async fn operator_channel(url: &str, ca_pem: Option<&[u8]>, token: bool) -> Result<Channel> {
    let endpoint = Endpoint::from_shared(url.to_string()).map_err(|_| {
        ClientError::InvalidArgument(format!(
            "{url:?} is not an operator address; use http://host:port or https://host:port"
        ))
    })?;
    let tls = url.starts_with("https://");
    if token && !tls && !endpoint.uri().host().is_some_and(loopback) {
        return Err(ClientError::InvalidArgument(format!(
            "{url} is plain http to another host: a token would travel in the clear; \
             use https:// (with --ca-file) or a kubectl port-forward to 127.0.0.1"
        )));
    }
    let endpoint = match (tls, ca_pem) {
        (true, Some(pem)) => endpoint
            .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)))
            .map_err(|e| ClientError::InvalidArgument(format!("the CA certificate for {url}: {e}")))?,
        (true, None) => {
            return Err(ClientError::InvalidArgument(format!(
                "{url} is served over TLS: pass the CA certificate that signed the operator's (--ca-file)"
            )))
        }
        (false, Some(_)) => {
            return Err(ClientError::InvalidArgument(format!(
                "a CA certificate was given but {url} is not https://"
            )))
        }
        (false, None) => endpoint,
    };
    endpoint
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|source| ClientError::Connect {
            target: url.to_string(),
            source,
        })
}

/// Whether `host` (as a URI spells it) names this machine.
fn loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_hosts_are_loopback() {
        for host in ["127.0.0.1", "127.3.4.5", "localhost", "[::1]", "LOCALHOST"] {
            assert!(loopback(host), "{host}");
        }
        for host in ["10.0.0.1", "operator.example", "[::2]", "localhost.example"] {
            assert!(!loopback(host), "{host}");
        }
    }

    #[test]
    fn a_bearer_never_prints_its_token() {
        let bearer = Bearer::new("s3cret").unwrap();
        assert!(bearer.0.is_some());
        assert!(!format!("{bearer:?}").contains("s3cret"));
    }

    #[test]
    fn the_token_goes_to_tcp_addresses_only() {
        assert!(Bearer::for_target("http://10.0.0.1:50051", "t").unwrap().0.is_some());
        for unix in ["unix:///run/agent.sock", "unix:/run/agent.sock", "/run/agent.sock"] {
            assert!(Bearer::for_target(unix, "t").unwrap().0.is_none(), "{unix}");
        }
        assert!(Bearer::for_target("/run/agent.sock", "two words").is_err());
    }
}

//! Node mode's catalog: the operator's (`payload-operator catalog`),
//! reached over gRPC. Every repository call goes through [`OperatorLink`];
//! writes still go to the node's own log first and reach the operator in
//! batches (see [`crate::writer`]), so a pod's request never waits on the
//! network and an operator that is away only delays them. Heartbeats tell
//! the operator the node is alive and what its tiers hold.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use payload_catalog::remote::Link;
use payload_catalog::repo::GcLock;
use payload_catalog::{CatalogError, StreamHead};
use payload_proto::cluster::cluster_catalog_client::ClusterCatalogClient;
use payload_proto::cluster::{Envelope, HeartbeatRequest, TierUsage};
use tokio::sync::watch;
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::node::{lock, Node};

/// A projected token is re-read this often: the kubelet rotates it.
const TOKEN_REREAD: Duration = Duration::from_secs(60);
/// How long one call to the operator may take before it counts as down.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Until the operator says otherwise.
const FIRST_INTERVAL: Duration = Duration::from_secs(5);

/// How this agent reaches the operator and proves which node it is.
pub struct OperatorLink {
    client: ClusterCatalogClient<Channel>,
    node: MetadataValue<tonic::metadata::Ascii>,
    token: Option<Arc<Token>>,
    /// The PayloadPool the node's agent runs for, sent with heartbeats.
    pool: String,
}

struct Token {
    path: PathBuf,
    read: Mutex<Option<(MetadataValue<tonic::metadata::Ascii>, Instant)>>,
}

impl OperatorLink {
    /// Connects lazily: an agent starts (and serves its node) while the
    /// operator is away.
    pub fn new(
        url: &str,
        node: &str,
        token_file: Option<PathBuf>,
        ca_file: Option<&std::path::Path>,
    ) -> anyhow::Result<Self> {
        use anyhow::Context;
        let mut endpoint = Endpoint::from_shared(url.to_string())
            .with_context(|| format!("--operator {url:?} is not a URL such as http://HOST:PORT"))?
            .timeout(CALL_TIMEOUT)
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            // A half-open connection (the operator's node gone) is noticed,
            // and long calls (watches, the GC lock) are not left hanging.
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(20))
            .keep_alive_while_idle(true);
        if url.starts_with("https://") {
            let ca = ca_file
                .context("--operator https://… needs --operator-ca-file (the CA that signed its certificate)")?;
            let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
            endpoint = endpoint
                .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)))
                .context("the operator's TLS settings")?;
        } else {
            anyhow::ensure!(
                url.starts_with("http://"),
                "--operator {url:?} must be http:// or https://"
            );
        }
        let node = node
            .parse()
            .map_err(|_| anyhow::anyhow!("--node-name {node:?} must be ASCII to reach the operator"))?;
        Ok(OperatorLink {
            client: ClusterCatalogClient::new(endpoint.connect_lazy())
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(64 << 20),
            node,
            pool: String::new(),
            token: token_file.map(|path| {
                Arc::new(Token {
                    path,
                    read: Mutex::new(None),
                })
            }),
        })
    }

    /// Names the PayloadPool this agent runs for, in its heartbeats.
    pub fn for_pool(mut self, pool: String) -> Self {
        self.pool = pool;
        self
    }

    fn request<T>(&self, body: T) -> Result<tonic::Request<T>, CatalogError> {
        stamp(&self.node, self.token.as_deref(), body)
    }
}

/// A request carrying the node's name and its current token.
fn stamp<T>(
    node: &MetadataValue<tonic::metadata::Ascii>,
    token: Option<&Token>,
    body: T,
) -> Result<tonic::Request<T>, CatalogError> {
    let mut request = tonic::Request::new(body);
    request.metadata_mut().insert("x-payload-node", node.clone());
    if let Some(token) = token {
        request.metadata_mut().insert("authorization", token.header()?);
    }
    Ok(request)
}

impl Token {
    fn header(&self) -> Result<MetadataValue<tonic::metadata::Ascii>, CatalogError> {
        let mut read = lock(&self.read);
        if let Some((value, at)) = read.as_ref() {
            if at.elapsed() < TOKEN_REREAD {
                return Ok(value.clone());
            }
        }
        let unreadable = |why: String| {
            CatalogError::Storage(format!("reading --operator-token-file {}: {why}", self.path.display()))
        };
        let text = std::fs::read_to_string(&self.path).map_err(|e| unreadable(e.to_string()))?;
        let value: MetadataValue<_> = format!("Bearer {}", text.trim())
            .parse()
            .map_err(|_| unreadable("not a token".into()))?;
        *read = Some((value.clone(), Instant::now()));
        Ok(value)
    }
}

/// Ends the GC lock's call when the lock is dropped (the task that reads
/// the call owns it).
struct EndsCall(tokio::task::AbortHandle);

impl Drop for EndsCall {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Every failure to reach the operator is an outage the writer waits out:
/// a refused token, say, is fixed by whoever runs the cluster, and the
/// writes it holds must not be set aside meanwhile.
fn outage(status: tonic::Status) -> CatalogError {
    CatalogError::Storage(format!(
        "the operator's catalog: {}: {}",
        status.code(),
        status.message()
    ))
}

/// [`outage`], but for a call the operator does not know (it is of an
/// earlier release), which its caller tells apart
/// ([`payload_catalog::remote::is_unknown_call`]).
fn refusal(status: tonic::Status) -> CatalogError {
    let unknown = CatalogError::InvalidArgument(status.message().to_string());
    if status.code() == tonic::Code::InvalidArgument && payload_catalog::remote::is_unknown_call(&unknown) {
        return unknown;
    }
    outage(status)
}

#[async_trait]
impl Link for OperatorLink {
    async fn call(&self, call: Vec<u8>) -> Result<Vec<u8>, CatalogError> {
        let request = self.request(Envelope { json: call })?;
        let answer = self.client.clone().call(request).await.map_err(refusal)?;
        Ok(answer.into_inner().json)
    }

    async fn gc_lock(&self) -> Result<GcLock, CatalogError> {
        let request = self.request(Envelope::default())?;
        let mut held = self
            .client
            .clone()
            .hold_gc_lock(request)
            .await
            .map_err(outage)?
            .into_inner();
        // The first message says the lock is held; ending the call frees
        // it, and the call ending otherwise (the operator restarted, the
        // connection died) means it is lost.
        if held.message().await.map_err(outage)?.is_none() {
            return Err(CatalogError::Storage(
                "the operator ended the GC lock call at once".into(),
            ));
        }
        let (lost_tx, lost) = watch::channel(false);
        let watcher = tokio::spawn(async move {
            while let Ok(Some(_)) = held.message().await {}
            let _ = lost_tx.send(true);
        });
        Ok(GcLock::losable(EndsCall(watcher.abort_handle()), lost))
    }

    fn watch_stream(&self, head: StreamHead) -> watch::Receiver<u64> {
        let (tx, rx) = watch::channel(head.next_offset);
        let (client, node, token) = (self.client.clone(), self.node.clone(), self.token.clone());
        let body = Envelope {
            json: serde_json::to_vec(&head).expect("a head serializes"),
        };
        tokio::spawn(async move {
            // Until every subscriber is gone. A lost call is made again
            // (with the token of the moment: it rotates), and a wake-up
            // then makes subscribers re-read whatever they missed.
            while !tx.is_closed() {
                if let Ok(request) = stamp(&node, token.as_deref(), body.clone()) {
                    if let Ok(answer) = client.clone().watch_stream(request).await {
                        let mut nexts = answer.into_inner();
                        loop {
                            tokio::select! {
                                next = nexts.message() => match next {
                                    Ok(Some(next)) => { tx.send_replace(next.next_offset); }
                                    _ => break,
                                },
                                _ = tx.closed() => return,
                            }
                        }
                    }
                }
                tx.send_modify(|_| {});
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = tx.closed() => return,
                }
            }
        });
        rx
    }
}

impl OperatorLink {
    /// The nodes the operator knows whose heartbeats have stopped (one it
    /// has not heard from since it started is not among them).
    pub async fn down_nodes(&self) -> Result<std::collections::HashSet<String>, CatalogError> {
        let nodes = self.list_nodes().await?;
        Ok(nodes.into_iter().filter(|n| !n.live).map(|n| n.name).collect())
    }

    /// Opens the operator's control call: `replies` go out on it, and
    /// its requests come back.
    pub async fn control(
        &self,
        replies: tokio::sync::mpsc::Receiver<payload_proto::cluster::ControlReply>,
    ) -> Result<tonic::Streaming<payload_proto::cluster::ControlRequest>, CatalogError> {
        let request = self.request(tokio_stream::wrappers::ReceiverStream::new(replies))?;
        let answer = self.client.clone().control(request).await.map_err(outage)?;
        Ok(answer.into_inner())
    }

    /// Every node the operator has heard from.
    pub async fn list_nodes(&self) -> Result<Vec<payload_proto::cluster::NodeInfo>, CatalogError> {
        let request = self.request(payload_proto::cluster::ListNodesRequest {})?;
        let reply = self.client.clone().list_nodes(request).await.map_err(outage)?;
        Ok(reply.into_inner().nodes)
    }
}

/// Sends the node's heartbeats until `stop`: it registers the node, and
/// its tier use reaches the pool's status.
pub async fn heartbeats(
    node: std::sync::Arc<Node>,
    link: std::sync::Arc<OperatorLink>,
    mut stop: watch::Receiver<bool>,
) {
    let mut interval = FIRST_INTERVAL;
    let mut reported_down = false;
    loop {
        let stats = node.stats();
        let beat = HeartbeatRequest {
            tiers: stats
                .tiers
                .iter()
                .map(|t| TierUsage {
                    tier: t.tier as i32,
                    capacity_bytes: t.capacity_bytes,
                    used_bytes: t.bytes,
                })
                .collect(),
            version: env!("CARGO_PKG_VERSION").into(),
            backlog: stats.catalog_backlog,
            pool: link.pool.clone(),
        };
        let sent = match link.request(beat) {
            Ok(request) => link.client.clone().heartbeat(request).await.map_err(outage),
            Err(e) => Err(e),
        };
        match sent {
            Ok(reply) => {
                if reported_down {
                    tracing::info!("the operator answers heartbeats again");
                }
                reported_down = false;
                let ms = reply.into_inner().interval_ms.clamp(500, 60_000);
                interval = Duration::from_millis(ms);
            }
            Err(err) if !reported_down => {
                tracing::warn!(%err, "a heartbeat did not reach the operator; the node keeps serving");
                reported_down = true;
            }
            Err(_) => {}
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_call_the_operator_does_not_know_is_told_apart_from_an_outage() {
        let unknown = refusal(tonic::Status::invalid_argument(
            "not a catalog call of this release: unknown variant `LocatePayload`",
        ));
        assert!(payload_catalog::remote::is_unknown_call(&unknown), "{unknown:?}");
        let other = refusal(tonic::Status::invalid_argument("x-payload-node is not ASCII"));
        assert!(matches!(other, CatalogError::Storage(_)), "{other:?}");
        let down = refusal(tonic::Status::unavailable("connection refused"));
        assert!(matches!(down, CatalogError::Storage(_)), "{down:?}");
    }
}

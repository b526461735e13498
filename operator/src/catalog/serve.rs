//! `payload-operator catalog`: its flags, and serving until SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use tonic::transport::{Identity, Server, ServerTlsConfig};

use super::identity::{Gate, Reviewer};
use super::{CatalogService, ClusterCatalogServer};

/// A node not heard from for this long, holding no payload rows, is
/// forgotten at start (a node the cluster removed).
const FORGET_NODES: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

#[derive(clap::Args, Debug)]
pub struct CatalogArgs {
    /// The PostgreSQL catalog: postgres://USER@HOST:PORT/DB (a password in
    /// the URL, or PGPASSWORD). Migrations are applied at start.
    #[arg(long, env = "PM_DATABASE")]
    pub database: String,
    /// Where agents connect. Anything but loopback needs --tls-cert.
    #[arg(long, env = "PM_LISTEN", default_value = "127.0.0.1:50052")]
    pub listen: SocketAddr,
    /// How callers are told apart: `kubernetes` (a projected ServiceAccount
    /// token, checked by TokenReview, names the caller's node), `none`
    /// (loopback only: agents name their node themselves) or `auto`
    /// (kubernetes when its API is reachable, else none on loopback).
    #[arg(long, env = "PM_AUTH", value_enum, default_value_t = Auth::Auto)]
    pub auth: Auth,
    /// The namespace of the agents' ServiceAccounts (the operator's).
    #[arg(long, env = "PM_NAMESPACE", default_value = "payload-manager")]
    pub namespace: String,
    /// The server's certificate chain (PEM); with --tls-key, TLS is served.
    #[arg(long, env = "PM_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The server's private key (PEM).
    #[arg(long, env = "PM_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// How often agents send heartbeats (milliseconds); a node whose
    /// heartbeats stop for three of these is no longer live.
    #[arg(long, env = "PM_HEARTBEAT_INTERVAL_MS", default_value_t = super::nodes::INTERVAL.as_millis() as u64,
          value_parser = clap::value_parser!(u64).range(500..=60_000))]
    pub heartbeat_interval_ms: u64,
    #[command(flatten)]
    pub probes: crate::metrics::ProbeArgs,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Auth {
    Auto,
    Kubernetes,
    None,
}

impl CatalogArgs {
    pub async fn run(self) -> anyhow::Result<()> {
        let loopback = self.listen.ip().is_loopback();
        anyhow::ensure!(
            loopback || self.tls_cert.is_some(),
            "--listen {} is reachable from other hosts: serve TLS (--tls-cert and --tls-key) or listen on 127.0.0.1",
            self.listen
        );
        let metrics = std::sync::Arc::new(crate::metrics::Metrics::default());
        let (ready, readiness) = tokio::sync::watch::channel(false);
        self.probes.start(metrics.clone(), readiness).await?;
        let gate = self.gate(loopback).await?;
        let shown = payload_catalog::redact_url(&self.database);
        let base = payload_catalog::PgRepository::connect(&self.database, "payload-operator")
            .await
            .with_context(|| format!("opening the catalog {shown}"))?;
        let client = gate.client();
        let client_for_view = client.clone();
        match client.clone() {
            Some(client) => {
                let ctx = crate::policy::reconcile::Context {
                    events: Some(crate::events::recorder(client.clone(), "payload-operator-policies")),
                    client,
                    store: crate::policy::reconcile::Store::Postgres(base.clone()),
                    metrics: metrics.clone(),
                };
                tracing::info!("reconciling PayloadPolicies into the catalog");
                tokio::spawn(crate::policy::run(ctx));
            }
            None => tracing::info!(
                "no Kubernetes API: PayloadPolicies are not watched (store them with `payload-operator policy apply`)"
            ),
        }
        // A dead peer is noticed, so the GC lock and watches it held end.
        let mut server = Server::builder()
            .http2_keepalive_interval(Some(std::time::Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(std::time::Duration::from_secs(20)));
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            let read = |p: &PathBuf| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
            let identity = Identity::from_pem(read(cert)?, read(key)?);
            server = server
                .tls_config(ServerTlsConfig::new().identity(identity))
                .context("the TLS certificate and key")?;
        }
        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        let now = super::now_ms();
        // Housekeeping: a failure here must not keep the catalog down.
        if let Err(err) = base
            .forget_nodes(now.saturating_sub(FORGET_NODES.as_millis() as u64))
            .await
        {
            tracing::warn!(error = %err, "could not forget the catalog's long-gone nodes; trying at the next start");
        }
        let restored = base
            .known_nodes()
            .await
            .with_context(|| format!("reading the nodes of the catalog {shown}"))?;
        tracing::info!(nodes = restored.len(), "nodes known from the catalog");
        let nodes = super::nodes::Nodes::new(
            std::time::Duration::from_millis(self.heartbeat_interval_ms),
            restored,
            now,
        );
        let catalog = CatalogService::new(base, gate, nodes, stop, metrics);
        if let Some(client) = client {
            tokio::spawn(super::usage::run(client, catalog.nodes()));
        }
        let view = catalog.view(super::access::Access::new(client_for_view));
        let service = ClusterCatalogServer::new(catalog)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20);
        let listener = tokio::net::TcpListener::bind(self.listen)
            .await
            .with_context(|| format!("listening on {}", self.listen))?;
        tracing::info!(listen = %listener.local_addr()?, catalog = %shown, "payload-operator catalog is serving");
        let _ = ready.send(true);
        server
            .add_service(service)
            // The cluster view, for payloadctl --operator and v1 clients.
            .add_service(view.catalog.max_encoding_message_size(64 << 20))
            .add_service(view.streams.max_encoding_message_size(64 << 20))
            .add_service(view.admin)
            .serve_with_incoming_shutdown(
                // Small answers go out at once (Nagle and delayed ACKs
                // held each page of a listing for 40 ms).
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                async move {
                    stopped().await;
                    let _ = ready.send(false);
                    // The long calls end too, or the drain would wait on them.
                    let _ = stop_tx.send(true);
                },
            )
            .await
            .context("serving the catalog")?;
        tracing::info!("stopped");
        Ok(())
    }

    async fn gate(&self, loopback: bool) -> anyhow::Result<Gate> {
        let open = || {
            anyhow::ensure!(
                loopback,
                "--auth none is for loopback only: agents on other hosts must prove their node (--auth kubernetes)"
            );
            tracing::warn!("no Kubernetes API: accepting agents without a token, each naming its own node");
            Ok(Gate::Open)
        };
        match self.auth {
            Auth::None => open(),
            Auth::Kubernetes => Ok(Gate::Kubernetes(Reviewer::new(
                kube::Client::try_default()
                    .await
                    .context("--auth kubernetes needs the Kubernetes API (in a cluster, or through KUBECONFIG)")?,
                &self.namespace,
            ))),
            Auth::Auto => match kube::Client::try_default().await {
                Ok(client) => Ok(Gate::Kubernetes(Reviewer::new(client, &self.namespace))),
                Err(_) => open(),
            },
        }
    }
}

async fn stopped() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

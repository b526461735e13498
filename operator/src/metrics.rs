//! Prometheus metrics and health probes over HTTP (`--metrics-listen`) of
//! both operator commands: reconciles (by controller and outcome, with
//! their latency, and those running now) for `run`; catalog calls (by call
//! and outcome, with their latency) for `catalog`.
//!
//! kube-runtime keeps its queue to itself, so the queue's depth is shown
//! as what can be seen of it: reconciles running now.

use std::sync::Arc;
use std::time::Instant;

use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ControllerLabels {
    controller: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    controller: &'static str,
    /// `ok`, or the error's kind.
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    call: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallNameLabels {
    call: &'static str,
}

/// From 100 µs to about 40 s.
fn latency() -> Histogram {
    Histogram::new(exponential_buckets(0.000_1, 2.7, 14))
}

pub struct Metrics {
    registry: Registry,
    reconciles: Family<OutcomeLabels, Counter>,
    reconcile_seconds: Family<ControllerLabels, Histogram, fn() -> Histogram>,
    in_flight: Family<ControllerLabels, Gauge>,
    calls: Family<CallLabels, Counter>,
    call_seconds: Family<CallNameLabels, Histogram, fn() -> Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let reconciles = Family::<OutcomeLabels, Counter>::default();
        let reconcile_seconds = Family::new_with_constructor(latency as fn() -> Histogram);
        let in_flight = Family::<ControllerLabels, Gauge>::default();
        let calls = Family::<CallLabels, Counter>::default();
        let call_seconds = Family::new_with_constructor(latency as fn() -> Histogram);
        registry.register(
            "payload_operator_reconciles",
            "Reconciles finished, by controller and result (ok, or the kind of error)",
            reconciles.clone(),
        );
        registry.register(
            "payload_operator_reconcile_seconds",
            "Time one reconcile took",
            reconcile_seconds.clone(),
        );
        registry.register(
            "payload_operator_reconciles_in_flight",
            "Reconciles running now (the part of the work queue that can be seen)",
            in_flight.clone(),
        );
        registry.register(
            "payload_operator_catalog_calls",
            "Catalog calls of agents answered, by call and result (ok or error)",
            calls.clone(),
        );
        registry.register(
            "payload_operator_catalog_call_seconds",
            "Time to answer a catalog call",
            call_seconds.clone(),
        );
        Self {
            registry,
            reconciles,
            reconcile_seconds,
            in_flight,
            calls,
            call_seconds,
        }
    }
}

/// A reconcile being timed: recorded when dropped, with the result
/// [`Reconcile::finish`] gave (`cancelled` without one).
pub struct Reconcile<'a> {
    metrics: &'a Metrics,
    controller: &'static str,
    started: Instant,
    result: &'static str,
}

impl Metrics {
    /// Counts a reconcile of `controller` as running until it finishes.
    pub fn reconcile(&self, controller: &'static str) -> Reconcile<'_> {
        self.in_flight.get_or_create(&ControllerLabels { controller }).inc();
        Reconcile {
            metrics: self,
            controller,
            started: Instant::now(),
            result: "cancelled",
        }
    }

    /// Counts a catalog call named `call` answered after `started`.
    pub fn catalog_call(&self, call: &'static str, ok: bool, started: Instant) {
        self.call_seconds
            .get_or_create(&CallNameLabels { call })
            .observe(started.elapsed().as_secs_f64());
        let result = if ok { "ok" } else { "error" };
        self.calls.get_or_create(&CallLabels { call, result }).inc();
    }

    pub fn render(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).expect("writing to a String cannot fail");
        text
    }
}

impl Reconcile<'_> {
    /// `result` is `ok` or the error's kind (a bounded label).
    pub fn finish(mut self, result: &'static str) {
        self.result = result;
    }
}

impl Drop for Reconcile<'_> {
    fn drop(&mut self) {
        let (controller, result) = (self.controller, self.result);
        let m = self.metrics;
        m.reconcile_seconds
            .get_or_create(&ControllerLabels { controller })
            .observe(self.started.elapsed().as_secs_f64());
        m.reconciles.get_or_create(&OutcomeLabels { controller, result }).inc();
        m.in_flight.get_or_create(&ControllerLabels { controller }).dec();
    }
}

/// Serves `/metrics`, `/healthz` (the process answers) and `/readyz`
/// (`ready` is true: the command is at work and not stopping).
pub async fn serve(metrics: Arc<Metrics>, listener: TcpListener, ready: watch::Receiver<bool>) -> anyhow::Result<()> {
    use axum::routing::get;
    let router = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let text = metrics.render();
                async move { ([(header::CONTENT_TYPE, OPENMETRICS)], text).into_response() }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let ready = *ready.borrow();
                async move {
                    match ready {
                        true => (StatusCode::OK, "ready\n"),
                        false => (StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
                    }
                }
            }),
        );
    axum::serve(listener, router).await?;
    Ok(())
}

#[derive(clap::Args, Debug, Clone)]
pub struct ProbeArgs {
    /// HTTP address of `/metrics` (Prometheus), `/healthz` and `/readyz`,
    /// or `off`.
    #[arg(long, env = "PM_METRICS_LISTEN", default_value = "off")]
    pub metrics_listen: String,
}

impl ProbeArgs {
    /// Binds `--metrics-listen` (unless off) and serves it in the
    /// background; `/readyz` follows `ready`.
    pub async fn start(&self, metrics: Arc<Metrics>, ready: watch::Receiver<bool>) -> anyhow::Result<()> {
        let addr = match self.metrics_listen.as_str() {
            "off" | "" => return Ok(()),
            addr => addr
                .parse::<std::net::SocketAddr>()
                .map_err(|_| anyhow::anyhow!("--metrics-listen {addr:?} is not host:port or off"))?,
        };
        start(addr, metrics, ready).await
    }
}

async fn start(addr: std::net::SocketAddr, metrics: Arc<Metrics>, ready: watch::Receiver<bool>) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("binding --metrics-listen {addr}: {e}"))?;
    tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
    tokio::spawn(async move {
        if let Err(e) = serve(metrics, listener, ready).await {
            tracing::warn!(%e, "the metrics server stopped");
        }
    });
    Ok(())
}

//! Prometheus metrics and health probes over HTTP (`--metrics-listen`):
//! calls per gRPC method and native operation with their outcome and
//! latency, counted as they are answered, and the node's own figures (per
//! tier, leases, spill queue, catalog backlog, sealed payloads) read at
//! each scrape, as `payloadctl stats` reads them.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
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
use tonic::codegen::http;
use tower::{Layer, Service};

use crate::node::Node;

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    method: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TierLabels {
    tier: String,
}

/// From 50 µs to about 7.5 s.
fn latency() -> Histogram {
    Histogram::new(exponential_buckets(0.000_05, 2.5, 14))
}

type Latencies = Family<MethodLabels, Histogram, fn() -> Histogram>;

pub struct Metrics {
    registry: Registry,
    grpc_calls: Family<CallLabels, Counter>,
    grpc_seconds: Latencies,
    native_calls: Family<CallLabels, Counter>,
    native_seconds: Latencies,
    /// Figures of the node, set from its stats at each scrape.
    tier: [Family<TierLabels, Gauge>; TIER_FIGURES.len()],
    node: [Gauge; NODE_FIGURES.len()],
}

/// Per tier: (name, help).
const TIER_FIGURES: [(&str, &str); 7] = [
    (
        "payload_agent_tier_payloads",
        "Payloads whose authoritative copy is on the tier",
    ),
    ("payload_agent_tier_bytes", "Bytes of those payloads"),
    (
        "payload_agent_tier_capacity_bytes",
        "The tier's capacity (--ram-capacity, --disk-capacity...)",
    ),
    (
        "payload_agent_tier_pinned_bytes",
        "Bytes of pinned payloads on the tier",
    ),
    (
        "payload_agent_tier_leased_bytes",
        "Bytes of payloads on the tier with a live lease",
    ),
    (
        "payload_agent_tier_reserved_bytes",
        "Bytes reserved by allocations not yet committed",
    ),
    (
        "payload_agent_tier_cache_bytes",
        "The object tier's block cache: bytes of blocks present",
    ),
];

const NODE_FIGURES: [(&str, &str); 4] = [
    ("payload_agent_active_leases", "Live leases on this node"),
    (
        "payload_agent_spill_queue_depth",
        "Payloads waiting to be spilled or promoted",
    ),
    (
        "payload_agent_catalog_backlog",
        "Catalog writes in the node's log that the catalog does not have yet",
    ),
    ("payload_agent_sealed_payloads", "RAM payloads held as sealed memfds"),
];

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let grpc_calls = Family::<CallLabels, Counter>::default();
        let grpc_seconds = Latencies::new_with_constructor(latency);
        let native_calls = Family::<CallLabels, Counter>::default();
        let native_seconds = Latencies::new_with_constructor(latency);
        registry.register(
            "payload_agent_grpc_calls",
            "gRPC calls answered, by method and status code (a stream counts by how it began)",
            grpc_calls.clone(),
        );
        registry.register(
            "payload_agent_grpc_seconds",
            "Time to answer a gRPC call (for a stream: until its handler hands it over)",
            grpc_seconds.clone(),
        );
        registry.register(
            "payload_agent_native_calls",
            "Native socket requests answered, by operation and status code",
            native_calls.clone(),
        );
        registry.register(
            "payload_agent_native_seconds",
            "Time to answer a native socket request",
            native_seconds.clone(),
        );
        let tier: [Family<TierLabels, Gauge>; TIER_FIGURES.len()] = Default::default();
        for ((name, help), family) in TIER_FIGURES.iter().zip(&tier) {
            registry.register(*name, *help, family.clone());
        }
        let node: [Gauge; NODE_FIGURES.len()] = Default::default();
        for ((name, help), gauge) in NODE_FIGURES.iter().zip(&node) {
            registry.register(*name, *help, gauge.clone());
        }
        Self {
            registry,
            grpc_calls,
            grpc_seconds,
            native_calls,
            native_seconds,
            tier,
            node,
        }
    }
}

impl Metrics {
    /// Counts a gRPC call to `path` answered with `code` after `started`.
    /// Paths no service serves (UNIMPLEMENTED), and calls refused before
    /// any did (UNAUTHENTICATED), count as `unknown`: a caller cannot make
    /// up series.
    pub fn grpc_call(&self, path: &str, code: tonic::Code, started: Instant) {
        let method = match code {
            tonic::Code::Unimplemented | tonic::Code::Unauthenticated => "unknown".to_string(),
            _ => path.to_string(),
        };
        observe(&self.grpc_calls, &self.grpc_seconds, method, code, started);
    }

    /// Counts a native request of kind `op` answered with `code`.
    pub fn native_call(&self, op: &'static str, code: tonic::Code, started: Instant) {
        observe(&self.native_calls, &self.native_seconds, op.to_string(), code, started);
    }

    /// The exposition: counters as they stand, `stats`' figures as gauges.
    pub fn render(&self, stats: &payload_proto::admin::StatsResponse) -> String {
        for t in &stats.tiers {
            let labels = TierLabels {
                tier: tier_name(t.tier),
            };
            let figures = [
                t.payloads,
                t.bytes,
                t.capacity_bytes,
                t.pinned_bytes,
                t.leased_bytes,
                t.reserved_bytes,
                t.cache_bytes,
            ];
            for (family, value) in self.tier.iter().zip(figures) {
                family.get_or_create(&labels).set(gauge(value));
            }
        }
        let figures = [
            stats.active_leases,
            stats.spill_queue_depth,
            stats.catalog_backlog,
            stats.sealed_payloads,
        ];
        for (g, value) in self.node.iter().zip(figures) {
            g.set(gauge(value));
        }
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).expect("writing to a String cannot fail");
        text
    }
}

fn observe(
    calls: &Family<CallLabels, Counter>,
    seconds: &Latencies,
    method: String,
    code: tonic::Code,
    started: Instant,
) {
    seconds
        .get_or_create(&MethodLabels { method: method.clone() })
        .observe(started.elapsed().as_secs_f64());
    let code = format!("{code:?}");
    calls.get_or_create(&CallLabels { method, code }).inc();
}

fn gauge(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn tier_name(tier: u32) -> String {
    i32::try_from(tier)
        .ok()
        .and_then(payload_catalog::Tier::from_i32)
        .map_or_else(|| tier.to_string(), |t| t.name().to_string())
}

/// How long a scrape's answer is served again: a scrape scans every
/// payload, so a loop of them must not slow the data path.
const SCRAPE_KEPT: std::time::Duration = std::time::Duration::from_secs(1);

/// Serves `/metrics`, `/healthz` (the process answers, recovering too) and
/// `/readyz` (the node serves and is not draining) until the process ends:
/// it answers through the drain, 503 on `/readyz`. `serving` holds the
/// node once recovery is done.
pub async fn serve(
    serving: watch::Receiver<Option<Arc<Node>>>,
    listener: TcpListener,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    use axum::routing::get;
    let scraped: Arc<tokio::sync::Mutex<Option<(Instant, String)>>> = Arc::default();
    let node = serving.clone();
    let router = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let (node, scraped) = (node.borrow().clone(), scraped.clone());
                async move {
                    let Some(node) = node else {
                        return (StatusCode::SERVICE_UNAVAILABLE, "recovering\n").into_response();
                    };
                    // One scan at a time; callers meanwhile get its answer.
                    let mut kept = scraped.lock().await;
                    if let Some((_, text)) = kept.as_ref().filter(|(at, _)| at.elapsed() < SCRAPE_KEPT) {
                        return ([(header::CONTENT_TYPE, OPENMETRICS)], text.clone()).into_response();
                    }
                    match scrape(&node).await {
                        Ok(text) => {
                            *kept = Some((Instant::now(), text.clone()));
                            ([(header::CONTENT_TYPE, OPENMETRICS)], text).into_response()
                        }
                        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
                    }
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let why = match (serving.borrow().is_some(), *stop.borrow()) {
                    (false, _) => Some("recovering\n"),
                    (true, true) => Some("draining\n"),
                    (true, false) => None,
                };
                async move {
                    match why {
                        Some(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
                        None => (StatusCode::OK, "ready\n"),
                    }
                }
            }),
        );
    axum::serve(listener, router).await?;
    Ok(())
}

/// The exposition, from the node's own figures (no catalog call: a scrape
/// must answer while the catalog is away).
async fn scrape(node: &Arc<Node>) -> Result<String, String> {
    let scanned = node.clone();
    let mut stats = tokio::task::spawn_blocking(move || scanned.stats())
        .await
        .map_err(|e| format!("reading the node's figures failed: {e}"))?;
    if let Ok(ram) = node.store(payload_catalog::Tier::Ram) {
        (stats.sealed_payloads, stats.sealed_bytes) = ram.memfd_usage();
    }
    Ok(node.metrics.render(&stats))
}

/// Counts every call a gRPC server answers in [`Metrics`].
#[derive(Clone)]
pub struct MetricsLayer(pub Arc<Metrics>);

impl<S> Layer<S> for MetricsLayer {
    type Service = Counted<S>;

    fn layer(&self, inner: S) -> Counted<S> {
        Counted {
            inner,
            metrics: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Counted<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S, B, R> Service<http::Request<B>> for Counted<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let mut pending = Pending {
            metrics: self.metrics.clone(),
            path: request.uri().path().to_string(),
            started: Instant::now(),
            answered: false,
        };
        let call = self.inner.call(request);
        Box::pin(async move {
            let answer = call.await;
            // A refusal comes in the headers (trailers-only); a call that
            // got this far without one began well.
            let code = match &answer {
                Ok(response) => response
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i32>().ok())
                    .map_or(tonic::Code::Ok, tonic::Code::from),
                Err(_) => tonic::Code::Unknown,
            };
            pending.answered = true;
            pending.metrics.grpc_call(&pending.path, code, pending.started);
            answer
        })
    }
}

/// A call being answered: one its caller gave up on (the future dropped
/// unanswered) counts as CANCELLED.
struct Pending {
    metrics: Arc<Metrics>,
    path: String,
    started: Instant,
    answered: bool,
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.answered {
            self.metrics.grpc_call(&self.path, tonic::Code::Cancelled, self.started);
        }
    }
}

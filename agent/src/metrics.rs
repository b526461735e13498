//! Prometheus metrics and health probes over HTTP (`--metrics-listen`):
//! calls per gRPC method and native operation with their outcome and
//! latency, counted as they are answered, and the node's own figures (per
//! tier, leases, spill queue, catalog backlog, object store traffic) read
//! at each scrape, as `payloadctl stats` reads them.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
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

use crate::node::{lock, Node};

/// Distinct method names counted; past them (a client calling made-up
/// paths) calls count as `other`, so the series stay bounded.
const METHODS_KEPT: usize = 256;

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

/// From 50 µs to about 13 s.
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
    methods: Mutex<HashSet<String>>,
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
            "Time to answer a gRPC call (to the first response of a stream)",
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
            methods: Mutex::new(HashSet::new()),
            tier,
            node,
        }
    }
}

impl Metrics {
    /// Counts a gRPC call to `path` answered with `code` after `started`.
    pub fn grpc_call(&self, path: &str, code: tonic::Code, started: Instant) {
        let method = self.method(path);
        observe(&self.grpc_calls, &self.grpc_seconds, method, code, started);
    }

    /// Counts a native request of kind `op` answered with `code`.
    pub fn native_call(&self, op: &'static str, code: tonic::Code, started: Instant) {
        observe(&self.native_calls, &self.native_seconds, op.to_string(), code, started);
    }

    fn method(&self, path: &str) -> String {
        let mut methods = lock(&self.methods);
        if methods.contains(path) {
            return path.to_string();
        }
        if methods.len() >= METHODS_KEPT {
            return "other".into();
        }
        methods.insert(path.to_string());
        path.to_string()
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

/// Serves `/metrics`, `/healthz` (the process answers) and `/readyz` (the
/// node serves and is not draining) until `stop` turns true.
pub async fn serve(node: Arc<Node>, listener: TcpListener, stop: watch::Receiver<bool>) -> anyhow::Result<()> {
    use axum::routing::get;
    let draining = stop.clone();
    let router = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let node = node.clone();
                async move { scrape(node).await }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let draining = *draining.borrow();
                async move {
                    if draining {
                        (StatusCode::SERVICE_UNAVAILABLE, "draining\n")
                    } else {
                        (StatusCode::OK, "ready\n")
                    }
                }
            }),
        );
    let mut stopped = stop;
    axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            let _ = stopped.wait_for(|s| *s).await;
        })
        .await?;
    Ok(())
}

async fn scrape(node: Arc<Node>) -> axum::response::Response {
    match node.report().await {
        Ok(stats) => ([(header::CONTENT_TYPE, OPENMETRICS)], node.metrics.render(&stats)).into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("reading the node's figures failed: {e}\n"),
        )
            .into_response(),
    }
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
        let path = request.uri().path().to_string();
        let started = Instant::now();
        let call = self.inner.call(request);
        let metrics = self.metrics.clone();
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
            metrics.grpc_call(&path, code, started);
            answer
        })
    }
}

//! `make bench` (operator): how long a PayloadPool change takes to become
//! an updated DaemonSet, against a mock API server (tower-test) that
//! answers every call at once with the object it was sent. Ours: one
//! whole reconcile (build the objects, apply ServiceAccount, ConfigMap and
//! DaemonSet, write the status), each with a changed RAM capacity so every
//! object differs. Floor: the same four PATCH calls, bodies built ahead,
//! through the same client and mock (what the API round trips cost).
//! Prints a Markdown table.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Request, Response};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, ServiceAccount};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::{Patch, PatchParams};
use kube::client::Body;
use kube::core::DeserializeGuard;
use kube::{Api, Client};
use payload_operator::crd::PayloadPool;
use payload_operator::pool::desired::{desired, Settings};
use payload_operator::pool::reconcile::{reconcile, Context, MANAGER};

const ROUNDS: usize = 2_000;

fn pool(ram_gib: usize) -> PayloadPool {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/examples/payloadpool.yaml");
    let mut pool: PayloadPool = serde_saphyr::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    pool.metadata.uid = Some("6c1f0e6a-52c3-4b8e-9d0e-4a3f1b2c9d10".into());
    pool.metadata.generation = Some(ram_gib as i64);
    pool.spec.ram.capacity = Quantity(format!("{ram_gib}Gi"));
    pool
}

fn settings() -> Settings {
    Settings {
        namespace: "payload-manager".into(),
        agent_image: "registry.example/payload-agent:1.0".into(),
        catalog_url: "https://payload-operator.payload-manager.svc:50052".into(),
        catalog_ca_secret: None,
    }
}

/// A client whose API server answers each call with its own body (a
/// DaemonSet gets a settled status, so the reconcile finds it ready).
fn client() -> Client {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    tokio::spawn(async move {
        while let Some((request, reply)) = handle.next_request().await {
            let bytes = request.into_body().collect_bytes().await.unwrap();
            let mut body: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            if body["kind"] == "DaemonSet" {
                body["status"] = serde_json::json!({"desiredNumberScheduled": 3, "numberReady": 3,
                    "updatedNumberScheduled": 3, "currentNumberScheduled": 3, "numberMisscheduled": 0});
            }
            if body["kind"] == "PayloadPool" {
                body = serde_json::to_value(pool(1)).unwrap();
            }
            reply.send_response(Response::new(Body::from(serde_json::to_vec(&body).unwrap())));
        }
    });
    Client::new(service, "default")
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

async fn floor(client: &Client) -> Vec<Duration> {
    let ns = "payload-manager";
    let params = PatchParams::apply(MANAGER).force();
    let mut took = Vec::with_capacity(ROUNDS);
    for n in 0..ROUNDS {
        let p = pool(n % 500 + 1);
        let objects = desired(&p, &settings()).unwrap();
        let status = serde_json::json!({"apiVersion": "payload-manager.io/v1alpha1", "kind": "PayloadPool",
            "status": {"observedGeneration": n}});
        let t = Instant::now();
        Api::<ServiceAccount>::namespaced(client.clone(), ns)
            .patch(
                "payload-agent-gpu-nodes",
                &params,
                &Patch::Apply(&objects.service_account),
            )
            .await
            .unwrap();
        Api::<ConfigMap>::namespaced(client.clone(), ns)
            .patch("payload-agent-gpu-nodes", &params, &Patch::Apply(&objects.config_map))
            .await
            .unwrap();
        Api::<DaemonSet>::namespaced(client.clone(), ns)
            .patch("payload-agent-gpu-nodes", &params, &Patch::Apply(&objects.daemon_set))
            .await
            .unwrap();
        Api::<PayloadPool>::all(client.clone())
            .patch_status("gpu-nodes", &params, &Patch::Apply(&status))
            .await
            .unwrap();
        took.push(t.elapsed());
    }
    took.sort();
    took
}

async fn ours(client: &Client) -> Vec<Duration> {
    let ctx = Arc::new(Context {
        client: client.clone(),
        settings: settings(),
        metrics: Default::default(),
        events: None,
    });
    let mut took = Vec::with_capacity(ROUNDS);
    for n in 0..ROUNDS {
        let changed = Arc::new(DeserializeGuard(Ok(pool(n % 500 + 1))));
        let t = Instant::now();
        reconcile(changed, ctx.clone()).await.unwrap();
        took.push(t.elapsed());
    }
    took.sort();
    took
}

fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let client = client();
        // Warm both paths (allocator, first-use of the serializers).
        ours(&client).await;
        let floor = floor(&client).await;
        let ours = ours(&client).await;
        println!("| PayloadPool change → DaemonSet applied and status written ({ROUNDS} reconciles, mock API server) | p50 µs | p99 µs | p50 vs floor |");
        println!("|---|---|---|---|");
        for (label, took) in [
            ("the four PATCH calls, bodies built ahead (floor)", &floor),
            ("one reconcile (payload-operator run)", &ours),
        ] {
            println!(
                "| {label} | {:.0} | {:.0} | {:.2}× |",
                us(percentile(took, 0.5)),
                us(percentile(took, 0.99)),
                percentile(took, 0.5).as_secs_f64() / percentile(&floor, 0.5).as_secs_f64()
            );
        }
    });
}

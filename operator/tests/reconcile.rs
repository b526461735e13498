//! One reconcile against a mock API server (tower-test): every call is
//! checked for its method, path, field manager and body, in order, and a
//! missing call fails the test instead of hanging it.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{answer, ApiServer};
use http::{Method, Request, Response};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::client::Body;
use kube::core::error_boundary::InvalidObject;
use kube::core::DeserializeGuard;
use kube::runtime::controller::Action;
use kube::Client;
use payload_operator::crd::PayloadPool;
use payload_operator::pool::desired::Settings;
use payload_operator::pool::reconcile::{reconcile, Context, Error};
use serde_json::{json, Value};
use tower_test::mock;

fn pool() -> PayloadPool {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/examples/payloadpool.yaml");
    let mut pool: PayloadPool = serde_saphyr::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    pool.metadata.uid = Some("6c1f0e6a-52c3-4b8e-9d0e-4a3f1b2c9d10".into());
    pool.metadata.generation = Some(4);
    pool
}

fn context() -> (Arc<Context>, ApiServer) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let settings = Settings {
        namespace: "payload-manager".into(),
        agent_image: "registry.example/payload-agent:1.0".into(),
        catalog_url: "https://payload-operator.payload-manager.svc:50052".into(),
        catalog_ca_secret: Some("payload-manager-catalog-tls".into()),
    };
    let client = Client::new(service, "default");
    let metrics = Default::default();
    (
        Arc::new(Context {
            client,
            settings,
            metrics,
            events: None,
        }),
        handle,
    )
}

/// The next call: its method, path, query and JSON body.
async fn next(server: &mut ApiServer) -> (Method, String, String, Value, mock::SendResponse<Response<Body>>) {
    let (request, reply) = tokio::time::timeout(Duration::from_secs(1), server.next_request())
        .await
        .expect("the reconciler made no further call")
        .expect("the client went away");
    let (method, path, query) = (
        request.method().clone(),
        request.uri().path().to_string(),
        request.uri().query().unwrap_or("").to_string(),
    );
    let bytes = request.into_body().collect_bytes().await.unwrap();
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (method, path, query, body, reply)
}

/// Expects a server-side apply of `path` by our field manager; answers
/// with the applied object, `status` added.
async fn expect_apply(server: &mut ApiServer, path: &str, status: Value) -> Value {
    let (method, got, query, mut body, reply) = next(server).await;
    assert_eq!((method, got.as_str()), (Method::PATCH, path));
    assert!(
        query.contains("fieldManager=payload-operator") && query.contains("force=true"),
        "{query}"
    );
    let applied = body.clone();
    if !status.is_null() {
        body["status"] = status;
    }
    answer(reply, 200, &body);
    applied
}

const NS: &str = "/api/v1/namespaces/payload-manager";
const STATUS: &str = "/apis/payload-manager.io/v1alpha1/payloadpools/gpu-nodes/status";

fn conditions(status_patch: &Value) -> Vec<(String, String, String)> {
    status_patch["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let s = |k: &str| c[k].as_str().unwrap().to_string();
            (s("type"), s("status"), s("reason"))
        })
        .collect()
}

#[tokio::test]
async fn a_pool_is_applied_in_order_and_its_status_counts_the_agents() {
    let (ctx, mut server) = context();
    let watched = Arc::new(DeserializeGuard(Ok(pool())));
    let run = tokio::spawn(reconcile(watched, ctx.clone()));
    let sa = expect_apply(
        &mut server,
        &format!("{NS}/serviceaccounts/payload-agent-gpu-nodes"),
        Value::Null,
    )
    .await;
    assert_eq!(sa["automountServiceAccountToken"], false);
    let cm = expect_apply(
        &mut server,
        &format!("{NS}/configmaps/payload-agent-gpu-nodes"),
        Value::Null,
    )
    .await;
    assert_eq!(cm["data"]["PM_RAM_CAPACITY"], (64u64 << 30).to_string());
    let ds_path = "/apis/apps/v1/namespaces/payload-manager/daemonsets/payload-agent-gpu-nodes";
    let ds_status = json!({"desiredNumberScheduled": 3, "numberReady": 2, "updatedNumberScheduled": 3,
        "currentNumberScheduled": 3, "numberMisscheduled": 0, "observedGeneration": 1});
    let ds = expect_apply(&mut server, ds_path, ds_status).await;
    assert_eq!(ds["metadata"]["ownerReferences"][0]["kind"], "PayloadPool");
    let (method, path, query, patch, reply) = next(&mut server).await;
    assert_eq!((method, path.as_str()), (Method::PATCH, STATUS));
    assert!(query.contains("fieldManager=payload-operator"), "{query}");
    assert_eq!(patch["kind"], "PayloadPool");
    assert_eq!(patch["status"]["observedGeneration"], 4);
    assert_eq!(
        (
            patch["status"]["nodesDesired"].clone(),
            patch["status"]["nodesReady"].clone()
        ),
        (json!(3), json!(2))
    );
    let got = conditions(&patch);
    assert!(
        got.contains(&("Ready".into(), "False".into(), "AgentsNotReady".into())),
        "{got:?}"
    );
    assert!(
        got.contains(&("Degraded".into(), "False".into(), "AsExpected".into())),
        "{got:?}"
    );
    answer(reply, 200, &serde_json::to_value(pool()).unwrap());
    let action = run.await.unwrap().unwrap();
    assert_eq!(
        action,
        Action::requeue(Duration::from_secs(10)),
        "an agent is not ready yet: soon again"
    );
    let metrics = ctx.metrics.render();
    for line in [
        r#"payload_operator_reconciles_total{controller="payloadpool",result="ok"} 1"#,
        r#"payload_operator_reconciles_in_flight{controller="payloadpool"} 0"#,
        r#"payload_operator_reconcile_seconds_count{controller="payloadpool"} 1"#,
    ] {
        assert!(metrics.contains(line), "no {line:?} in:\n{metrics}");
    }
}

#[tokio::test]
async fn a_pool_that_cannot_be_built_applies_nothing_and_says_why() {
    let (ctx, mut server) = context();
    let mut bad = pool();
    bad.spec.ram.capacity = Quantity("500m".into());
    let run = tokio::spawn(reconcile(Arc::new(DeserializeGuard(Ok(bad))), ctx));
    let (method, path, _, patch, reply) = next(&mut server).await;
    assert_eq!(
        (method, path.as_str()),
        (Method::PATCH, STATUS),
        "only the status is written"
    );
    let got = conditions(&patch);
    assert!(
        got.contains(&("Degraded".into(), "True".into(), "InvalidSpec".into())),
        "{got:?}"
    );
    let message = patch["status"]["conditions"][2]["message"].as_str().unwrap();
    assert!(message.contains("ram.capacity"), "{message}");
    answer(reply, 200, &serde_json::to_value(pool()).unwrap());
    assert_eq!(run.await.unwrap().unwrap(), Action::await_change());
}

#[tokio::test]
async fn an_unreadable_pool_is_reported_in_its_status_and_does_not_stop_the_controller() {
    let (ctx, mut server) = context();
    let unreadable = InvalidObject {
        error: "spec.ram.capacity: invalid type: map, expected a string".into(),
        metadata: pool().metadata,
    };
    let run = tokio::spawn(reconcile(Arc::new(DeserializeGuard(Err(unreadable))), ctx));
    let (method, path, _, patch, reply) = next(&mut server).await;
    assert_eq!((method, path.as_str()), (Method::PATCH, STATUS));
    let message = patch["status"]["conditions"][0]["message"].as_str().unwrap();
    assert!(
        message.contains("could not be read") && message.contains("spec.ram.capacity"),
        "{message}"
    );
    answer(reply, 200, &serde_json::to_value(pool()).unwrap());
    assert_eq!(run.await.unwrap().unwrap(), Action::await_change());
}

#[tokio::test]
async fn an_api_error_is_returned_for_the_retry_policy() {
    let (ctx, mut server) = context();
    let run = tokio::spawn(reconcile(Arc::new(DeserializeGuard(Ok(pool()))), ctx.clone()));
    let (_, path, _, _, reply) = next(&mut server).await;
    assert!(
        ctx.metrics
            .render()
            .contains(r#"payload_operator_reconciles_in_flight{controller="payloadpool"} 1"#),
        "running now"
    );
    assert!(path.ends_with("/serviceaccounts/payload-agent-gpu-nodes"), "{path}");
    let refusal = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
        "message": "serviceaccounts is forbidden", "reason": "Forbidden", "code": 403});
    answer(reply, 403, &refusal);
    let err = run.await.unwrap().unwrap_err();
    assert!(matches!(err, Error::Apply { .. }), "{err}");
    assert_eq!(err.category(), "apply");
    assert!(err.to_string().contains("ServiceAccount"), "{err}");
    let metrics = ctx.metrics.render();
    assert!(
        metrics.contains(r#"payload_operator_reconciles_total{controller="payloadpool",result="apply"} 1"#),
        "{metrics}"
    );
}

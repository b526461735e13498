//! The PayloadPolicy controller: compiling specs (pure, from inline YAML)
//! and one reconcile against a mock API server (tower-test) with a real
//! SQLite catalog behind it: every call's method, path and body, in order.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{answer, ApiServer};
use http::{Method, Request, Response};
use kube::client::Body;
use kube::core::DeserializeGuard;
use kube::Client;
use payload_catalog::policy::Operator;
use payload_catalog::{Repository, SqliteRepository, Tier};
use payload_operator::crd::{PayloadPolicy, PayloadPolicySpec};
use payload_operator::policy::compile::{compile, not_applied};
use payload_operator::policy::reconcile::{reconcile, Context, Store, FINALIZER};
use serde_json::{json, Value};
use tower_test::mock;

fn spec(yaml: &str) -> PayloadPolicySpec {
    serde_saphyr::from_str(yaml).unwrap()
}

#[test]
fn a_spec_compiles_into_what_agents_apply() {
    let spec = spec(
        "selector:
  matchLabels: {app: llm}
  matchExpressions:
    - {key: stage, operator: NotIn, values: [prod]}
maxLeaseSeconds: 30
evictionPriority: Never
quotas:
  - {tier: RAM, bytes: 8Gi}
  - {tier: DISK, bytes: \"0\"}
",
    );
    let policy = compile("team-a", "cap", 7, &spec).unwrap();
    assert_eq!(policy.key(), "team-a/cap");
    assert_eq!(policy.generation, 7);
    assert_eq!(policy.selector.labels, [("app".to_string(), "llm".to_string())]);
    assert_eq!(policy.selector.expressions[0].op, Operator::NotIn);
    assert_eq!((policy.ttl_ms, policy.max_lease_ms), (None, Some(30_000)));
    let ttl = compile("team-a", "cap", 7, &self::spec("ttlSeconds: 60\n")).unwrap();
    assert_eq!(ttl.ttl_ms, Some(60_000));
    assert!(policy.never_evict);
    assert_eq!(policy.quotas, [(Tier::Ram, 8 << 30), (Tier::Disk, 0)]);
    assert!(not_applied(&spec).is_empty());
    assert_eq!(
        (policy.priority, policy.min_lease_tier),
        (None, None),
        "Never is never_evict"
    );
    let more =
        self::spec("durability: Disk\ndedup: true\ntierPreference: [DISK]\nminLeaseTier: RAM\nevictionPriority: Low\n");
    assert_eq!(not_applied(&more), ["durability", "tierPreference", "dedup"]);
    let more = compile("team-a", "more", 1, &more).unwrap();
    assert_eq!(more.priority, Some(payload_catalog::Priority::Low));
    assert_eq!(more.min_lease_tier, Some(Tier::Ram));
}

#[test]
fn a_spec_the_schema_lets_through_but_no_agent_could_apply_is_refused_saying_why() {
    for (yaml, says) in [
        (
            "selector: {matchExpressions: [{key: a, operator: Near, values: [x]}]}",
            "operator \"Near\"",
        ),
        (
            "selector: {matchExpressions: [{key: a, operator: In}]}",
            "give at least one value",
        ),
        (
            "selector: {matchExpressions: [{key: a, operator: Exists, values: [x]}]}",
            "give no values",
        ),
        (
            "quotas: [{tier: RAM, bytes: 1Gi}, {tier: RAM, bytes: 2Gi}]",
            "RAM tier twice",
        ),
        ("quotas: [{tier: RAM, bytes: 12Q}]", "quotas[tier=RAM].bytes"),
        ("quotas: [{tier: RAM, bytes: 0abc}]", "quotas[tier=RAM].bytes"),
        ("ttlSeconds: 0", "ttlSeconds must be 1"),
        ("maxLeaseSeconds: 0", "maxLeaseSeconds must be 1"),
        ("ttlSeconds: 5\nevictionPriority: Never", "never expires"),
    ] {
        let why = compile("ns", "p", 1, &spec(yaml)).unwrap_err();
        assert!(why.contains(says), "{yaml}: {why}");
    }
}

fn policy(finalizers: &[&str], quotas: &str) -> PayloadPolicy {
    let mut p: PayloadPolicy = serde_saphyr::from_str(&format!(
        "apiVersion: payload-manager.io/v1alpha1
kind: PayloadPolicy
metadata: {{name: cap, namespace: team-a, generation: 2, resourceVersion: \"41\"}}
spec:
  quotas: {quotas}
"
    ))
    .unwrap();
    p.metadata.finalizers = Some(finalizers.iter().map(|f| f.to_string()).collect());
    p
}

async fn context(dir: &tempfile::TempDir) -> (Arc<Context>, ApiServer, SqliteRepository) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let db = dir.path().join("catalog.db");
    let store = SqliteRepository::open(&db).await.unwrap();
    let reader = SqliteRepository::open(&db).await.unwrap();
    let ctx = Context {
        client: Client::new(service, "default"),
        store: Store::Sqlite(store),
        metrics: Default::default(),
        events: None,
    };
    (Arc::new(ctx), handle, reader)
}

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
    let content_type = request.headers()["content-type"].to_str().unwrap().to_string();
    let bytes = request.into_body().collect_bytes().await.unwrap();
    let mut body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    body["_content_type"] = content_type.into();
    (method, path, query, body, reply)
}

const PATH: &str = "/apis/payload-manager.io/v1alpha1/namespaces/team-a/payloadpolicies/cap";

fn as_object(p: &PayloadPolicy) -> Value {
    serde_json::to_value(p).unwrap()
}

#[tokio::test]
async fn a_new_policy_gets_the_finalizer_then_its_row_then_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let (ctx, mut server, reader) = context(&dir).await;
    let p = policy(&[], "[{tier: RAM, bytes: 1Gi}]");
    let run = tokio::spawn(reconcile(Arc::new(DeserializeGuard(Ok(p.clone()))), ctx));

    let (method, path, _, body, reply) = next(&mut server).await;
    assert_eq!((method, path.as_str()), (Method::PATCH, PATH));
    assert_eq!(body["_content_type"], "application/merge-patch+json");
    assert_eq!(body["metadata"]["finalizers"], json!([FINALIZER]));
    assert_eq!(body["metadata"]["resourceVersion"], "41");
    answer(reply, 200, &as_object(&p));

    let (method, path, query, body, reply) = next(&mut server).await;
    assert_eq!(
        (method, path.as_str()),
        (Method::PATCH, format!("{PATH}/status").as_str())
    );
    assert!(query.contains("fieldManager=payload-operator"), "{query}");
    // The row is stored before the status says so.
    let stored = reader.policies().await.unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(
        (stored[0].key(), stored[0].quota(Tier::Ram)),
        ("team-a/cap".into(), Some(1 << 30))
    );
    let accepted = &body["status"]["conditions"][0];
    assert_eq!(
        (&accepted["type"], &accepted["status"], &accepted["reason"]),
        (&json!("Accepted"), &json!("True"), &json!("Valid"))
    );
    assert_eq!(body["status"]["observedGeneration"], 2);
    answer(reply, 200, &as_object(&p));
    run.await.unwrap().unwrap();
}

#[tokio::test]
async fn an_invalid_policy_is_taken_out_of_the_catalog_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let (ctx, mut server, reader) = context(&dir).await;
    let valid = policy(&[FINALIZER], "[{tier: RAM, bytes: 1Gi}]");
    let good = payload_operator::policy::compile::compile("team-a", "cap", 1, &valid.spec).unwrap();
    if let Store::Sqlite(store) = &ctx.store {
        store.put_policy(&good, 1).await.unwrap();
    }
    let broken = policy(&[FINALIZER], "[{tier: RAM, bytes: 1Gi}, {tier: RAM, bytes: 2Gi}]");
    let run = tokio::spawn(reconcile(Arc::new(DeserializeGuard(Ok(broken.clone()))), ctx));
    let (method, path, _, body, reply) = next(&mut server).await;
    assert_eq!(
        (method, path.as_str()),
        (Method::PATCH, format!("{PATH}/status").as_str())
    );
    assert_eq!(
        reader.policies().await.unwrap(),
        vec![],
        "the old spec no longer applies"
    );
    let accepted = &body["status"]["conditions"][0];
    assert_eq!(
        (&accepted["status"], &accepted["reason"]),
        (&json!("False"), &json!("InvalidSpec"))
    );
    assert!(
        accepted["message"].as_str().unwrap().contains("RAM tier twice"),
        "{accepted}"
    );
    answer(reply, 200, &as_object(&broken));
    run.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_deleted_policy_loses_its_row_before_its_finalizer() {
    let dir = tempfile::tempdir().unwrap();
    let (ctx, mut server, reader) = context(&dir).await;
    let mut p = policy(&["someone-else/keep", FINALIZER], "[{tier: RAM, bytes: 1Gi}]");
    let compiled = compile("team-a", "cap", 2, &p.spec).unwrap();
    if let Store::Sqlite(store) = &ctx.store {
        store.put_policy(&compiled, 1).await.unwrap();
    }
    p.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::now(),
    ));
    let run = tokio::spawn(reconcile(Arc::new(DeserializeGuard(Ok(p.clone()))), ctx));
    let (method, path, _, body, reply) = next(&mut server).await;
    assert_eq!((method, path.as_str()), (Method::PATCH, PATH));
    assert_eq!(reader.policies().await.unwrap(), vec![], "the row went first");
    assert_eq!(body["metadata"]["finalizers"], json!(["someone-else/keep"]));
    answer(reply, 200, &as_object(&p));
    run.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_refused_status_write_is_an_error_for_the_retry_policy() {
    let dir = tempfile::tempdir().unwrap();
    let (ctx, mut server, _reader) = context(&dir).await;
    let p = policy(&[FINALIZER], "[{tier: RAM, bytes: 1Gi}]");
    let run = tokio::spawn(reconcile(Arc::new(DeserializeGuard(Ok(p))), ctx));
    let (_, path, _, _, reply) = next(&mut server).await;
    assert!(path.ends_with("/status"), "{path}");
    answer(
        reply,
        409,
        &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": "conflict", "reason": "Conflict", "code": 409}),
    );
    let err = run.await.unwrap().unwrap_err();
    assert_eq!(err.category(), "api");
}

#[tokio::test]
async fn a_change_of_acceptance_is_an_event_and_an_unchanged_one_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let (service, mut server) = mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let ctx = Arc::new(Context {
        events: Some(payload_operator::events::recorder(
            client.clone(),
            "payload-operator-policies",
        )),
        client,
        store: Store::Sqlite(SqliteRepository::open(&dir.path().join("catalog.db")).await.unwrap()),
        metrics: Default::default(),
    });
    let mut accepted = policy(&[FINALIZER], "[{tier: RAM, bytes: 1Gi}, {tier: RAM, bytes: 2Gi}]");
    let was = json!({"conditions": [{"type": "Accepted", "status": "True", "reason": "Valid", "message": "",
        "lastTransitionTime": "2026-12-01T00:00:00Z"}]});
    accepted.status = Some(serde_json::from_value(was).unwrap());
    let run = tokio::spawn(reconcile(Arc::new(DeserializeGuard(Ok(accepted.clone()))), ctx.clone()));
    let (_, path, _, status, reply) = next(&mut server).await;
    assert!(path.ends_with("/status"), "{path}");
    answer(reply, 200, &as_object(&accepted));
    let (method, path, _, event, reply) = next(&mut server).await;
    assert_eq!(
        (method, path.as_str()),
        (Method::POST, "/apis/events.k8s.io/v1/namespaces/team-a/events")
    );
    assert_eq!(
        (&event["type"], &event["reason"]),
        (&json!("Warning"), &json!("InvalidSpec"))
    );
    assert_eq!(event["regarding"]["name"], "cap");
    assert!(event["note"].as_str().unwrap().contains("RAM tier twice"), "{event}");
    answer(reply, 201, &event);
    run.await.unwrap().unwrap();

    // Reconciled again with that status: nothing new to say.
    let mut refused = accepted;
    refused.status = Some(serde_json::from_value(status["status"].clone()).unwrap());
    let run = tokio::spawn(reconcile(Arc::new(DeserializeGuard(Ok(refused.clone()))), ctx));
    let (_, path, _, _, reply) = next(&mut server).await;
    assert!(path.ends_with("/status"), "{path}");
    answer(reply, 200, &as_object(&refused));
    run.await.unwrap().unwrap();
    assert!(server.next_request().await.is_none(), "no second event");
}

#[tokio::test]
async fn an_unreadable_policy_says_so_and_keeps_the_last_version_read() {
    let dir = tempfile::tempdir().unwrap();
    let (ctx, mut server, reader) = context(&dir).await;
    let valid = policy(&[FINALIZER], "[{tier: RAM, bytes: 1Gi}]");
    let stored = compile("team-a", "cap", 1, &valid.spec).unwrap();
    if let Store::Sqlite(store) = &ctx.store {
        store.put_policy(&stored, 1).await.unwrap();
    }
    let unreadable = kube::core::error_boundary::InvalidObject {
        error: "spec.quotas[0].tier: unknown variant `HBM`".into(),
        metadata: valid.metadata.clone(),
    };
    let run = tokio::spawn(reconcile(Arc::new(DeserializeGuard(Err(unreadable))), ctx));
    let (method, path, _, body, reply) = next(&mut server).await;
    assert_eq!(
        (method, path.as_str()),
        (Method::PATCH, format!("{PATH}/status").as_str())
    );
    let accepted = &body["status"]["conditions"][0];
    assert_eq!(accepted["status"], "False");
    assert!(accepted["message"].as_str().unwrap().contains("HBM"), "{accepted}");
    answer(reply, 200, &as_object(&valid));
    run.await.unwrap().unwrap();
    assert_eq!(reader.policies().await.unwrap(), vec![stored], "still in force");
}

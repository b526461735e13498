//! Leader election: what a candidate decides about a lease (pure), and its
//! calls against a mock API server (tower-test): creating a missing lease,
//! taking a lapsed one with the resourceVersion read, losing a race.

mod common;

use std::time::Duration;

use common::{answer, ApiServer};
use http::{Method, Request, Response};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::client::Body;
use kube::Client;
use payload_operator::leader::{decide, Decision, Elector};
use serde_json::{json, Value};
use tower_test::mock;

fn lease(holder: &str, renewed_secs_ago: i64) -> Lease {
    let renewed = Timestamp::now() - SignedDuration::from_secs(renewed_secs_ago);
    Lease {
        metadata: ObjectMeta {
            name: Some("payload-operator".into()),
            namespace: Some("payload-manager".into()),
            resource_version: Some("77".into()),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(renewed)),
            acquire_time: Some(MicroTime(renewed)),
            lease_transitions: Some(2),
            ..Default::default()
        }),
    }
}

#[test]
fn a_candidate_waits_for_a_live_holder_and_takes_a_lapsed_or_its_own_lease() {
    let now = Timestamp::now();
    assert_eq!(decide(None, "me", now), Decision::Create);
    match decide(Some(&lease("other", 5)), "me", now) {
        Decision::Wait(left) => assert!(
            left <= Duration::from_secs(10) && left >= Duration::from_secs(9),
            "{left:?}"
        ),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        decide(Some(&lease("other", 16)), "me", now),
        Decision::Take { transition: true }
    );
    assert_eq!(
        decide(Some(&lease("me", 5)), "me", now),
        Decision::Take { transition: false }
    );
    assert_eq!(
        decide(Some(&lease("", 1)), "me", now),
        Decision::Take { transition: true },
        "released"
    );
}

async fn next(server: &mut ApiServer) -> (Method, String, Value, mock::SendResponse<Response<Body>>) {
    let (request, reply) = tokio::time::timeout(Duration::from_secs(1), server.next_request())
        .await
        .expect("no further call")
        .unwrap();
    let (method, path) = (request.method().clone(), request.uri().path().to_string());
    let bytes = request.into_body().collect_bytes().await.unwrap();
    (
        method,
        path,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        reply,
    )
}

const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/payload-manager/leases";

fn not_found() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"})
}

fn elector() -> (Elector, ApiServer) {
    let (service, server) = mock::pair::<Request<Body>, Response<Body>>();
    let elector = Elector::new(
        Client::new(service, "default"),
        "payload-manager",
        "payload-operator",
        "pod-a",
    );
    (elector, server)
}

#[tokio::test]
async fn a_missing_lease_is_created_held() {
    let (elector, mut server) = elector();
    let attempt = tokio::spawn(async move { elector.try_hold().await.unwrap() });
    let (method, path, _, reply) = next(&mut server).await;
    assert_eq!(
        (method, path.as_str()),
        (Method::GET, format!("{LEASES}/payload-operator").as_str())
    );
    answer(reply, 404, &not_found());
    let (method, path, body, reply) = next(&mut server).await;
    assert_eq!((method, path.as_str()), (Method::POST, LEASES));
    assert_eq!(body["spec"]["holderIdentity"], "pod-a");
    assert_eq!(body["spec"]["leaseDurationSeconds"], 15);
    answer(reply, 201, &body);
    assert_eq!(attempt.await.unwrap(), Ok(()));
}

#[tokio::test]
async fn a_lapsed_lease_is_taken_only_if_nobody_wrote_it_since_it_was_read() {
    let (elector, mut server) = elector();
    let attempt = tokio::spawn(async move { elector.try_hold().await.unwrap() });
    let (_, _, _, reply) = next(&mut server).await;
    answer(reply, 200, &serde_json::to_value(lease("pod-b", 60)).unwrap());
    let (method, path, body, reply) = next(&mut server).await;
    assert_eq!(
        (method, path.as_str()),
        (Method::PUT, format!("{LEASES}/payload-operator").as_str())
    );
    assert_eq!(body["metadata"]["resourceVersion"], "77", "the version read");
    assert_eq!(body["spec"]["holderIdentity"], "pod-a");
    assert_eq!(body["spec"]["leaseTransitions"], 3);
    // Another candidate wrote first.
    answer(
        reply,
        409,
        &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409, "message": "the object has been modified"}),
    );
    assert!(attempt.await.unwrap().is_err(), "lost the race: wait and read again");
}

#[tokio::test]
async fn a_live_holder_is_left_alone() {
    let (elector, mut server) = elector();
    let attempt = tokio::spawn(async move { elector.try_hold().await.unwrap() });
    let (_, _, _, reply) = next(&mut server).await;
    answer(reply, 200, &serde_json::to_value(lease("pod-b", 2)).unwrap());
    let wait = attempt.await.unwrap().unwrap_err();
    assert!(wait <= Duration::from_secs(15), "{wait:?}");
    // The elector is gone with its task: any call it made would be queued.
    assert!(server.next_request().await.is_none(), "no write");
}

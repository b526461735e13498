//! Who may use the operator's cluster view: tokens and RBAC decisions
//! answered by a mock API server (tower-test), each request checked.

use std::time::Duration;

use http::{Method, Request, Response};
use kube::client::Body;
use kube::Client;
use payload_operator::catalog::access::{Access, AUDIENCE, LOCAL};
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tonic::metadata::MetadataMap;
use tonic::Code;
use tower_test::mock::{self, Handle};

type ApiServer = Handle<Request<Body>, Response<Body>>;

fn access() -> (Access, ApiServer) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    (Access::new(Some(Client::new(service, "default"))), handle)
}

fn bearing(token: &str) -> MetadataMap {
    let mut map = MetadataMap::new();
    map.insert("authorization", format!("Bearer {token}").parse().unwrap());
    map
}

/// Answers the next request, which must be a POST to `path`, with the
/// request's own object and `status`; returns what was asked.
async fn answer(server: &mut ApiServer, path: &str, status: Value) -> Value {
    let (request, reply) = tokio::time::timeout(Duration::from_secs(5), server.next_request())
        .await
        .unwrap_or_else(|_| panic!("nothing was posted to {path}"))
        .expect("the client went away");
    assert_eq!(request.method(), Method::POST);
    assert_eq!(request.uri().path(), path);
    let asked: Value = serde_json::from_slice(&request.into_body().collect_bytes().await.unwrap()).unwrap();
    let mut answered = asked.clone();
    answered["status"] = status;
    reply.send_response(Response::new(Body::from(serde_json::to_vec(&answered).unwrap())));
    asked
}

async fn token_review(server: &mut ApiServer, status: Value) -> Value {
    answer(server, "/apis/authentication.k8s.io/v1/tokenreviews", status).await
}

async fn access_review(server: &mut ApiServer, allowed: bool) -> Value {
    answer(
        server,
        "/apis/authorization.k8s.io/v1/subjectaccessreviews",
        json!({"allowed": allowed}),
    )
    .await
}

fn alice() -> Value {
    json!({
        "authenticated": true,
        "audiences": [AUDIENCE],
        "user": {"username": "system:serviceaccount:team:alice", "groups": ["system:serviceaccounts"]},
    })
}

/// Waits for `asking` to finish; panics if it asks the API server anything
/// more on the way, so a cached decision is proven without a clock.
async fn without_asking_more<T>(asking: JoinHandle<T>, server: &mut ApiServer) -> T {
    tokio::select! {
        biased;
        done = asking => done.unwrap(),
        asked = server.next_request() => match asked {
            Some((request, _)) => panic!("asked again: {} {}", request.method(), request.uri()),
            None => unreachable!("the API client went away before the caller finished"),
        },
    }
}

#[tokio::test]
async fn without_a_cluster_every_caller_is_local() {
    let access = Access::new(None);
    let who = access.check(&MetadataMap::new(), "delete", "payloads", None).await;
    assert_eq!(who.unwrap(), LOCAL);
}

#[tokio::test]
async fn a_call_without_a_token_is_unauthenticated_and_says_how_to_get_one() {
    let (access, mut server) = access();
    let asking = tokio::spawn(async move { access.check(&MetadataMap::new(), "list", "payloads", None).await });
    let err = without_asking_more(asking, &mut server).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(
        err.message().contains(&format!("--audience {AUDIENCE}")),
        "{}",
        err.message()
    );
}

#[tokio::test]
async fn an_allowed_user_is_reviewed_once_and_named() {
    let (access, mut server) = access();
    let asking = tokio::spawn(async move {
        let first = access.check(&bearing("t1"), "list", "payloads", None).await;
        let again = access.check(&bearing("t1"), "list", "payloads", None).await;
        (first, again)
    });
    let asked = token_review(&mut server, alice()).await;
    assert_eq!(asked["spec"]["token"], "t1");
    assert_eq!(asked["spec"]["audiences"], json!([AUDIENCE]));
    let asked = access_review(&mut server, true).await;
    assert_eq!(asked["spec"]["user"], "system:serviceaccount:team:alice");
    assert_eq!(asked["spec"]["groups"], json!(["system:serviceaccounts"]));
    let attributes = &asked["spec"]["resourceAttributes"];
    assert_eq!(attributes["group"], "payload-manager.io");
    assert_eq!(attributes["resource"], "payloads");
    assert_eq!(attributes["verb"], "list");
    assert!(
        attributes.get("namespace").is_none(),
        "payloads are cluster-wide: {attributes}"
    );
    // The second call is answered from the cache.
    let (first, again) = without_asking_more(asking, &mut server).await;
    assert_eq!(first.unwrap(), "k8s:system:serviceaccount:team:alice");
    assert_eq!(again.unwrap(), "k8s:system:serviceaccount:team:alice");
}

#[tokio::test]
async fn a_refused_verb_names_the_role_to_bind_and_is_not_asked_again_at_once() {
    let (access, mut server) = access();
    let asking = tokio::spawn(async move {
        let first = access.check(&bearing("t"), "delete", "payloads", None).await;
        let again = access.check(&bearing("t"), "delete", "payloads", None).await;
        (first, again)
    });
    token_review(&mut server, alice()).await;
    assert_eq!(
        access_review(&mut server, false).await["spec"]["resourceAttributes"]["verb"],
        "delete"
    );
    // A refusal is kept briefly: the second call does not ask again.
    let (first, again) = without_asking_more(asking, &mut server).await;
    for err in [first.unwrap_err(), again.unwrap_err()] {
        assert_eq!(err.code(), Code::PermissionDenied);
        assert!(err.message().contains("payload-manager-editor"), "{}", err.message());
        assert!(err.message().contains("alice"), "{}", err.message());
    }
}

#[tokio::test]
async fn a_stream_is_checked_in_its_namespace() {
    let (access, mut server) = access();
    let asking = tokio::spawn(async move { access.check(&bearing("t"), "get", "streams", Some("team")).await });
    token_review(&mut server, alice()).await;
    let asked = access_review(&mut server, false).await;
    assert_eq!(asked["spec"]["resourceAttributes"]["namespace"], "team");
    assert_eq!(asked["spec"]["resourceAttributes"]["resource"], "streams");
    let err = asking.await.unwrap().unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("payload-manager-viewer"), "{}", err.message());
    assert!(err.message().contains("in namespace team"), "{}", err.message());
}

#[tokio::test]
async fn a_token_of_another_audience_is_refused() {
    let (access, mut server) = access();
    let asking = tokio::spawn(async move { access.check(&bearing("t"), "list", "payloads", None).await });
    let mut status = alice();
    status["audiences"] = json!(["https://kubernetes.default.svc"]);
    token_review(&mut server, status).await;
    // No access review for a refused token.
    let err = without_asking_more(asking, &mut server).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains(AUDIENCE), "{}", err.message());
}

#[tokio::test]
async fn an_unauthenticated_token_is_refused_with_the_api_servers_reason() {
    let (access, mut server) = access();
    let asking = tokio::spawn(async move { access.check(&bearing("t"), "list", "payloads", None).await });
    token_review(
        &mut server,
        json!({"authenticated": false, "error": "token has expired"}),
    )
    .await;
    let err = asking.await.unwrap().unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("token has expired"), "{}", err.message());
}

#[tokio::test]
async fn an_api_server_that_fails_is_unavailable_and_not_remembered() {
    let (access, mut server) = access();
    let asking = tokio::spawn(async move {
        let first = access.check(&bearing("t"), "list", "payloads", None).await;
        let again = access.check(&bearing("t"), "list", "payloads", None).await;
        (first, again)
    });
    let (_, reply) = server.next_request().await.unwrap();
    reply.send_error(std::io::Error::other("connection refused"));
    token_review(&mut server, alice()).await;
    access_review(&mut server, true).await;
    let (first, again) = asking.await.unwrap();
    assert_eq!(first.unwrap_err().code(), Code::Unavailable);
    assert_eq!(
        again.unwrap(),
        "k8s:system:serviceaccount:team:alice",
        "asked again after the failure"
    );
}

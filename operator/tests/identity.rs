//! Who may call the cluster catalog: tokens reviewed by a mock API server
//! (tower-test), each review's request and answer checked.

use std::time::Duration;

use http::{Method, Request, Response};
use kube::client::Body;
use kube::Client;
use payload_operator::catalog::identity::{Gate, Reviewer};
use serde_json::{json, Value};
use tonic::metadata::MetadataMap;
use tonic::Code;
use tower_test::mock::{self, Handle};

type ApiServer = Handle<Request<Body>, Response<Body>>;

fn gate() -> (Gate, ApiServer) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    (Gate::Kubernetes(Reviewer::new(client, "payload-manager")), handle)
}

fn headers(token: Option<&str>, node: Option<&str>) -> MetadataMap {
    let mut map = MetadataMap::new();
    if let Some(token) = token {
        map.insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    if let Some(node) = node {
        map.insert("x-payload-node", node.parse().unwrap());
    }
    map
}

/// Answers the next TokenReview with `status`; returns what was asked.
async fn review(server: &mut ApiServer, status: Value) -> Value {
    let (request, reply) = tokio::time::timeout(Duration::from_secs(5), server.next_request())
        .await
        .expect("no TokenReview was made")
        .expect("the client went away");
    assert_eq!(request.method(), Method::POST);
    assert_eq!(request.uri().path(), "/apis/authentication.k8s.io/v1/tokenreviews");
    let asked: Value = serde_json::from_slice(&request.into_body().collect_bytes().await.unwrap()).unwrap();
    let mut answer = asked.clone();
    answer["status"] = status;
    reply.send_response(Response::new(Body::from(serde_json::to_vec(&answer).unwrap())));
    asked
}

fn agent_on(node: &str) -> Value {
    json!({
        "authenticated": true,
        "audiences": ["payload-manager-catalog"],
        "user": {
            "username": "system:serviceaccount:payload-manager:payload-agent-gpu",
            "extra": {"authentication.kubernetes.io/node-name": [node]},
        },
    })
}

#[tokio::test]
async fn an_agents_token_names_its_node_and_is_reviewed_once() {
    let (gate, mut server) = gate();
    let asking = tokio::spawn(async move {
        let first = gate.node_of(&headers(Some("t1"), None)).await;
        let again = gate.node_of(&headers(Some("t1"), Some("node-7"))).await;
        (first, again)
    });
    let asked = review(&mut server, agent_on("node-7")).await;
    assert_eq!(asked["spec"]["token"], "t1");
    assert_eq!(asked["spec"]["audiences"], json!(["payload-manager-catalog"]));
    let (first, again) = asking.await.unwrap();
    assert_eq!(first.unwrap(), "node-7");
    assert_eq!(again.unwrap(), "node-7", "answered from the cache: no second review");
}

#[tokio::test]
async fn an_agent_cannot_claim_another_node() {
    let (gate, mut server) = gate();
    let asking = tokio::spawn(async move { gate.node_of(&headers(Some("t"), Some("node-2"))).await });
    review(&mut server, agent_on("node-1")).await;
    let refused = asking.await.unwrap().unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert!(refused.message().contains("bound to node \"node-1\""), "{refused:?}");
}

#[tokio::test]
async fn tokens_that_are_not_an_agents_bound_token_are_refused() {
    let cases = [
        (
            json!({"authenticated": false, "error": "token expired"}),
            Code::Unauthenticated,
            "token expired",
        ),
        (
            json!({"authenticated": true, "user": {"username": "system:serviceaccount:payload-manager:payload-agent-x",
                "extra": {"authentication.kubernetes.io/node-name": ["n"]}}}),
            Code::Unauthenticated,
            "not for audience payload-manager-catalog",
        ),
        (
            json!({"authenticated": true, "audiences": ["payload-manager-catalog"],
                "user": {"username": "system:serviceaccount:default:builder",
                "extra": {"authentication.kubernetes.io/node-name": ["n"]}}}),
            Code::PermissionDenied,
            "not a pool's agent",
        ),
        (
            json!({"authenticated": true, "audiences": ["payload-manager-catalog"],
                "user": {"username": "system:serviceaccount:payload-manager:payload-agent-x"}}),
            Code::PermissionDenied,
            "not bound to a node",
        ),
    ];
    for (status, code, message) in cases {
        let (gate, mut server) = gate();
        let asking = tokio::spawn(async move { gate.node_of(&headers(Some("t"), None)).await });
        review(&mut server, status).await;
        let refused = asking.await.unwrap().unwrap_err();
        assert_eq!(refused.code(), code, "{refused:?}");
        assert!(refused.message().contains(message), "{refused:?}");
    }
    // No token at all: refused before any review.
    let (gate, _server) = gate();
    let refused = gate.node_of(&headers(None, Some("n"))).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    assert!(refused.message().contains("--operator-token-file"), "{refused:?}");
}

#[tokio::test]
async fn without_kubernetes_a_loopback_caller_names_its_node() {
    assert_eq!(
        Gate::Open.node_of(&headers(None, Some("laptop"))).await.unwrap(),
        "laptop"
    );
    let refused = Gate::Open.node_of(&headers(None, None)).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    let long = "n".repeat(254);
    let refused = Gate::Open.node_of(&headers(None, Some(&long))).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
}

#[test]
fn the_catalog_refuses_to_listen_beyond_loopback_without_tls_or_tokens() {
    let operator = env!("CARGO_BIN_EXE_payload-operator");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(operator)
            .args(["catalog", "--database", "postgres://nobody@127.0.0.1:1/x"])
            .args(args)
            .env_remove("KUBECONFIG")
            .env("HOME", "/nonexistent")
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let plaintext = run(&["--listen", "0.0.0.0:50052"]);
    assert!(
        plaintext.contains("serve TLS (--tls-cert and --tls-key)"),
        "{plaintext}"
    );
    let cert = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
    let open = run(&[
        "--listen",
        "0.0.0.0:50052",
        "--tls-cert",
        cert,
        "--tls-key",
        cert,
        "--auth",
        "none",
    ]);
    assert!(open.contains("--auth none is for loopback only"), "{open}");
}

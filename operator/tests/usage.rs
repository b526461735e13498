//! A pool's tier use in its status: summed over its live agents'
//! heartbeats (pure), and written under the catalog's own field manager
//! only when it changed (a mock API server checks every call).

use std::collections::BTreeMap;
use std::time::Duration;

use http::{Method, Request, Response};
use kube::client::Body;
use kube::Client;
use payload_operator::catalog::usage::{by_pool, publish, MANAGER};
use payload_operator::crd::{Tier, TierUsage};
use payload_proto::cluster::{NodeInfo, TierUsage as Beat};
use serde_json::{json, Value};
use tower_test::mock;

fn node(name: &str, pool: &str, live: bool, ram: (u64, u64), disk: Option<(u64, u64)>) -> NodeInfo {
    let mut tiers = vec![Beat {
        tier: 2,
        capacity_bytes: ram.0,
        used_bytes: ram.1,
    }];
    if let Some((capacity_bytes, used_bytes)) = disk {
        tiers.push(Beat {
            tier: 3,
            capacity_bytes,
            used_bytes,
        });
    }
    NodeInfo {
        name: name.into(),
        pool: pool.into(),
        live,
        tiers,
        ..Default::default()
    }
}

fn usage(tier: Tier, capacity_bytes: i64, used_bytes: i64) -> TierUsage {
    TierUsage {
        tier,
        capacity_bytes,
        used_bytes,
    }
}

#[test]
fn live_agents_of_a_pool_are_summed_per_tier() {
    let nodes = [
        node("a", "gpu", true, (100, 10), Some((1000, 1))),
        node("b", "gpu", true, (100, 20), None),
        node("c", "gpu", false, (100, 99), None),
        node("d", "cpu", true, (50, 5), None),
        node("e", "", true, (7, 7), None),
    ];
    let sums = by_pool(&nodes);
    assert_eq!(
        sums,
        BTreeMap::from([
            ("cpu".to_string(), vec![usage(Tier::Ram, 50, 5)]),
            (
                "gpu".to_string(),
                vec![usage(Tier::Ram, 200, 30), usage(Tier::Disk, 1000, 1)]
            ),
        ])
    );
}

type ApiServer = mock::Handle<Request<Body>, Response<Body>>;

/// The next call: a status write of pool `gpu` by the catalog's manager
/// carrying `tiers` and nothing else.
async fn expect(server: &mut ApiServer, tiers: Value) {
    let (request, reply) = tokio::time::timeout(Duration::from_secs(1), server.next_request())
        .await
        .expect("no status write")
        .unwrap();
    assert_eq!(request.method(), Method::PATCH);
    assert_eq!(
        request.uri().path(),
        "/apis/payload-manager.io/v1alpha1/payloadpools/gpu/status"
    );
    let query = request.uri().query().unwrap().to_string();
    assert!(query.contains(&format!("fieldManager={MANAGER}")), "{query}");
    let body: Value = serde_json::from_slice(&request.into_body().collect_bytes().await.unwrap()).unwrap();
    assert_eq!(body["status"], json!({"tiers": tiers}), "only the tiers");
    let pool = json!({"apiVersion": "payload-manager.io/v1alpha1", "kind": "PayloadPool",
        "metadata": {"name": "gpu"}, "spec": {"ram": {"capacity": "1Gi"}}});
    reply.send_response(Response::new(Body::from(serde_json::to_vec(&pool).unwrap())));
}

#[tokio::test]
async fn sums_are_written_when_they_change_and_emptied_when_the_agents_go_quiet() {
    let (service, mut server) = mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let mut written = BTreeMap::new();
    let nodes = vec![node("a", "gpu", true, (100, 10), None)];

    let (_, ()) = tokio::join!(
        publish(&client, &nodes, &mut written),
        expect(
            &mut server,
            json!([{"tier": "RAM", "capacityBytes": 100, "usedBytes": 10}])
        )
    );
    // Unchanged: no call at all (a call would wait for an answer forever).
    tokio::time::timeout(Duration::from_secs(1), publish(&client, &nodes, &mut written))
        .await
        .expect("an unchanged sum is not written again");
    // Every agent quiet: the pool's tiers are emptied, once.
    let quiet = vec![node("a", "gpu", false, (100, 10), None)];
    let (_, ()) = tokio::join!(publish(&client, &quiet, &mut written), expect(&mut server, json!([])));
    tokio::time::timeout(Duration::from_secs(1), publish(&client, &quiet, &mut written))
        .await
        .expect("written once");
}

//! `/metrics`, `/healthz` and `/readyz` of a real agent process
//! (`--metrics-listen`), read over plain HTTP/1.1 after real calls on its
//! gRPC and native sockets.

mod common;

use common::process::{put, v1, Agent};
use common::*;
use payload_client::Tier;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_calls_by_method_and_outcome_and_show_the_tiers() {
    let dirs = Dirs::new();
    let port = spare_port();
    let listen = format!("127.0.0.1:{port}");
    let (agent, client) = Agent::start_with(&dirs, &["--metrics-listen", &listen]).await;
    put(&client, &pattern(10_000, 1), Tier::Ram).await.unwrap();
    let (id, _) = put(&client, &pattern(5_000, 2), Tier::Disk).await.unwrap();
    assert!(client.get(uuid::Uuid::new_v4()).await.is_err());
    drop(client.get(id).await.unwrap());
    v1(&dirs).await.stats().await.unwrap();

    let (code, text) = http_get(port, "/metrics");
    assert_eq!(code, 200, "{text}");
    assert!(text.contains("application/openmetrics-text"), "{text}");
    for line in [
        r#"payload_agent_tier_payloads{tier="ram"} 1"#,
        r#"payload_agent_tier_payloads{tier="disk"} 1"#,
        r#"payload_agent_tier_bytes{tier="disk"} 5000"#,
        r#"payload_agent_tier_capacity_bytes{tier="ram"} 134217728"#,
        r#"payload_agent_native_calls_total{method="lease",code="NotFound"} 1"#,
        r#"payload_agent_native_calls_total{method="lease",code="Ok"} 1"#,
        "payload_agent_active_leases ",
        "# EOF",
    ] {
        assert!(text.contains(line), "no {line:?} in:\n{text}");
    }
    for line in [
        r#"payload_agent_grpc_calls_total{method="/payload.manager.services.v1.PayloadAdminService/Stats",code="Ok"}"#,
        r#"payload_agent_grpc_seconds_count{method="/payload.manager.services.v1.PayloadAdminService/Stats"}"#,
    ] {
        assert!(text.contains(line), "no {line:?} in:\n{text}");
    }
    assert!(!text.contains(&id.to_string()), "no payload ids in the metrics");

    assert_eq!(http_get(port, "/healthz").0, 200);
    assert_eq!(http_get(port, "/readyz").0, 200);
    assert_eq!(http_get(port, "/nothing").0, 404);
    drop(agent);
}

#[test]
fn a_metrics_address_that_is_not_host_port_is_refused_at_start() {
    let dirs = Dirs::new();
    let said = Agent::refused(&dirs, &["--metrics-listen", "everywhere"]);
    assert!(
        said.contains("--metrics-listen \"everywhere\" is not host:port or off"),
        "{said}"
    );
}

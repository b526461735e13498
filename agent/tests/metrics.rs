//! `/metrics`, `/healthz` and `/readyz` of a real agent process
//! (`--metrics-listen`), read over plain HTTP/1.1 after real calls on its
//! gRPC and native sockets.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;

use common::process::{put, v1, Agent};
use common::*;
use payload_client::Tier;

/// `GET path` on `port`: (status code, the whole response).
fn get(port: u16, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let code = response
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"));
    (code, response)
}

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

    let (code, text) = get(port, "/metrics");
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

    assert_eq!(get(port, "/healthz").0, 200);
    assert_eq!(get(port, "/readyz").0, 200);
    assert_eq!(get(port, "/nothing").0, 404);
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

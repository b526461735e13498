//! Cluster nodes (`payload-agent node`) against the operator's catalog
//! (`payload-operator catalog`) on a real PostgreSQL: real processes, the
//! operator killed with SIGKILL and started again.

mod common;

use common::operator::Operator;
use common::process::{put, Agent};
use common::{eventually, spare_port, Dirs};
use payload_catalog::{PayloadId, PayloadState, Repository};
use payload_client::Tier;
use payload_proto::cluster::cluster_catalog_client::ClusterCatalogClient;
use payload_proto::cluster::ListNodesRequest;

async fn node(dirs: &Dirs, operator: &str, name: &str) -> (Agent, payload_client::Client) {
    node_with(dirs, operator, &["--node-name", name]).await
}

async fn node_with(dirs: &Dirs, operator: &str, flags: &[&str]) -> (Agent, payload_client::Client) {
    let all: Vec<&str> = ["node", "--operator", operator].iter().chain(flags).copied().collect();
    Agent::start_with(dirs, &all).await
}

/// The operator's PostgreSQL, read directly (one pool for the whole test).
async fn catalog(database: &str) -> payload_catalog::PgRepository {
    payload_catalog::PgRepository::connect(database, "test-reader")
        .await
        .unwrap()
}

/// The row the operator's catalog holds for `id`, whichever node wrote it.
async fn row(catalog: &payload_catalog::PgRepository, id: uuid::Uuid) -> Option<payload_catalog::PayloadRecord> {
    catalog.get_payload(PayloadId(id)).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_reach_the_operator_and_it_lists_the_live_nodes() {
    let Some(database) = payload_catalog::testing::fresh_database().await else {
        return;
    };
    let db = catalog(&database).await;
    let logs = tempfile::tempdir().unwrap();
    let metrics = spare_port();
    let probes = ["--metrics-listen".to_string(), format!("127.0.0.1:{metrics}")];
    let probes: Vec<&str> = probes.iter().map(String::as_str).collect();
    let operator = Operator::start_with(&database, spare_port(), logs.path(), &probes).await;
    let (a_dirs, b_dirs) = (Dirs::new(), Dirs::new());
    let (a, a_client) = node_with(
        &a_dirs,
        &operator.url(),
        &["--node-name", "node-a", "--pool", "gpu-nodes"],
    )
    .await;
    let (b, b_client) = node(&b_dirs, &operator.url(), "node-b").await;

    let (id, _) = put(&a_client, b"weights", Tier::Ram).await.unwrap();
    eventually("the commit is in the operator's catalog, on node-a's rows", || async {
        row(&db, id).await.is_some_and(|r| r.state == PayloadState::Active)
    })
    .await;
    let on = |node: &'static str| {
        let database = database.clone();
        async move {
            let repo = payload_catalog::PgRepository::connect(&database, node).await.unwrap();
            repo.load_payloads()
                .await
                .unwrap()
                .iter()
                .any(|r| r.id == PayloadId(id))
        }
    };
    assert!(on("node-a").await && !on("node-b").await, "on node-a's rows only");
    // Reads of the catalog go through the operator too: this node's
    // payloads, another node's, or the cluster's, each with its node.
    let (on_b, _) = put(&b_client, b"tokenizer", Tier::Ram).await.unwrap();
    let listed = a_client.list(Default::default()).await.unwrap();
    assert_eq!(listed.payloads.len(), 1, "{listed:?}");
    eventually("node-b's commit is in the catalog", || async {
        row(&db, on_b).await.is_some()
    })
    .await;
    let scoped = |filter: &str| {
        let request = payload_proto::runtime::ListPayloadsRequest {
            node_filter: filter.into(),
            ..Default::default()
        };
        let client = a_client.clone();
        async move {
            let page = client.list(request).await.unwrap();
            let mut seen: Vec<_> = page
                .payloads
                .iter()
                .map(|p| {
                    (
                        uuid::Uuid::from_slice(&p.id.as_ref().unwrap().value).unwrap(),
                        p.node.clone(),
                    )
                })
                .collect();
            seen.sort();
            seen
        }
    };
    assert_eq!(scoped("node-b").await, [(on_b, "node-b".to_string())]);
    let mut both = vec![(id, "node-a".to_string()), (on_b, "node-b".to_string())];
    both.sort();
    assert_eq!(scoped("*").await, both);

    let mut client = ClusterCatalogClient::connect(operator.url()).await.unwrap();
    eventually("both nodes have sent a heartbeat", || {
        let mut client = client.clone();
        async move {
            let mut request = tonic::Request::new(ListNodesRequest {});
            request
                .metadata_mut()
                .insert("x-payload-node", "probe".parse().unwrap());
            let nodes = client.list_nodes(request).await.unwrap().into_inner().nodes;
            nodes.iter().filter(|n| n.live).count() == 2
        }
    })
    .await;
    let mut request = tonic::Request::new(ListNodesRequest {});
    request
        .metadata_mut()
        .insert("x-payload-node", "probe".parse().unwrap());
    let nodes = client.list_nodes(request).await.unwrap().into_inner().nodes;
    let a_info = nodes.iter().find(|n| n.name == "node-a").unwrap();
    let ram = a_info.tiers.iter().find(|t| t.tier == Tier::Ram as i32).unwrap();
    assert_eq!(ram.capacity_bytes, 128 << 20, "{a_info:?}");
    assert_eq!(a_info.pool, "gpu-nodes", "heartbeats name the pool");

    // Any node's agent lists the cluster's nodes (payloadctl nodes).
    let listed = b_client.nodes().await.unwrap();
    assert!(listed.cluster);
    let names: Vec<_> = listed
        .nodes
        .iter()
        .filter(|n| n.live)
        .map(|n| n.name.as_str())
        .collect();
    assert_eq!(names, ["node-a", "node-b"]);

    // A caller that names no node is refused, saying what calls this service.
    let refused = client.list_nodes(ListNodesRequest {}).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(refused.message().contains("payload-agent node"), "{refused:?}");

    // The operator counts the agents' catalog calls.
    let (code, text) = common::http_get(metrics, "/metrics");
    assert_eq!(code, 200, "{text}");
    for line in [
        r#"payload_operator_catalog_calls_total{call="WriteBatch",result="ok"}"#,
        r#"payload_operator_catalog_calls_total{call="ListPayloads",result="ok"}"#,
        r#"payload_operator_catalog_call_seconds_count{call="WriteBatch"}"#,
    ] {
        assert!(text.contains(line), "no {line:?} in:\n{text}");
    }
    assert_eq!(common::http_get(metrics, "/readyz").0, 200);
    a.kill9();
    b.kill9();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_serves_while_the_operator_is_down_and_catches_up() {
    let Some(database) = payload_catalog::testing::fresh_database().await else {
        return;
    };
    let db = catalog(&database).await;
    let logs = tempfile::tempdir().unwrap();
    let port = spare_port();
    let operator = Operator::start(&database, port, logs.path()).await;
    let dirs = Dirs::new();
    let (agent, client) = node(&dirs, &operator.url(), "node-a").await;
    let (before, _) = put(&client, b"before", Tier::Ram).await.unwrap();
    operator.kill9();

    // Puts and gets go on: the writes wait in the node's log.
    let mut during = Vec::new();
    for n in 0..5u8 {
        during.push(put(&client, &[n; 100], Tier::Ram).await.unwrap().0);
    }
    for (n, id) in during.iter().enumerate() {
        assert_eq!(client.get(*id).await.unwrap().bytes(), &[n as u8; 100]);
    }
    assert!(client.stats().await.unwrap().catalog_backlog > 0);

    let _operator = Operator::start(&database, port, logs.path()).await;
    for id in std::iter::once(before).chain(during) {
        eventually("what was committed meanwhile reaches the operator", || async {
            row(&db, id).await.is_some()
        })
        .await;
    }
    eventually("the node's log is empty again", || async {
        client.stats().await.unwrap().catalog_backlog == 0
    })
    .await;
    agent.kill9();
}

#[tokio::test]
async fn a_cluster_node_refuses_flags_that_belong_to_standalone() {
    let dirs = Dirs::new();
    let operator = "http://127.0.0.1:1";
    let out = Agent::refused(&dirs, &["node", "--operator", operator]);
    assert!(out.contains("needs --node-name"), "{out}");
    let out = Agent::refused(
        &dirs,
        &[
            "node",
            "--operator",
            operator,
            "--node-name",
            "n",
            "--catalog",
            "sqlite://x",
        ],
    );
    assert!(out.contains("--catalog is for standalone nodes"), "{out}");
    let out = Agent::refused(&dirs, &["node", "--operator", "https://op:1", "--node-name", "n"]);
    assert!(out.contains("--operator-ca-file"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gc_lock_held_through_the_operator_is_lost_with_it() {
    let Some(database) = payload_catalog::testing::fresh_database().await else {
        return;
    };
    let logs = tempfile::tempdir().unwrap();
    let port = spare_port();
    let operator = Operator::start(&database, port, logs.path()).await;
    let link = payload_agent::cluster::OperatorLink::new(&operator.url(), "node-a", None, None).unwrap();
    let repo = payload_catalog::remote::RemoteRepository::new("node-a", link);
    let lock = repo.gc_lock().await.unwrap();
    let mut lost = lock.lost().expect("a lock held through the operator can be lost");
    assert!(!*lost.borrow());
    assert!(repo.gc_begin(0, 10).await.unwrap().is_empty(), "the holder collects");
    let second = repo.gc_lock().await.err().expect("one collection per node");
    assert!(second.to_string().contains("one collection per node"), "{second}");

    operator.kill9();
    tokio::time::timeout(std::time::Duration::from_secs(60), lost.wait_for(|l| *l))
        .await
        .expect("the lock is known lost once its call ends")
        .unwrap();
    let _operator = Operator::start(&database, port, logs.path()).await;
    let refused = repo.gc_begin(0, 10).await.unwrap_err();
    assert!(
        refused.to_string().contains("does not hold the catalog's GC lock"),
        "{refused}"
    );
    drop(lock);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_down_nodes_payloads_are_listed_unavailable_and_its_node_not_live() {
    let Some(database) = payload_catalog::testing::fresh_database().await else {
        return;
    };
    let db = catalog(&database).await;
    let logs = tempfile::tempdir().unwrap();
    let fast = ["--heartbeat-interval-ms", "500"];
    let port = spare_port();
    let operator = Operator::start_with(&database, port, logs.path(), &fast).await;
    let (a_dirs, b_dirs) = (Dirs::new(), Dirs::new());
    let (a, a_client) = node(&a_dirs, &operator.url(), "node-a").await;
    let (b, b_client) = node(&b_dirs, &operator.url(), "node-b").await;
    let (on_a, _) = put(&a_client, b"here", Tier::Ram).await.unwrap();
    let (on_b, _) = put(&b_client, b"there", Tier::Ram).await.unwrap();
    eventually("node-b's commit is in the catalog", || async {
        row(&db, on_b).await.is_some()
    })
    .await;
    let cluster_from = |client: &payload_client::Client| {
        let client = client.clone();
        async move {
            let request = payload_proto::runtime::ListPayloadsRequest {
                node_filter: "*".into(),
                ..Default::default()
            };
            client.list(request).await.unwrap().payloads
        }
    };
    let unavailable = |payloads: &[payload_proto::runtime::PayloadSummary], id: uuid::Uuid| {
        payloads
            .iter()
            .find(|p| p.id.as_ref().unwrap().value == id.as_bytes())
            .unwrap()
            .unavailable
    };
    // Each node sees the other's payloads, available while both are up.
    let from_b = cluster_from(&b_client).await;
    assert!(!unavailable(&from_b, on_a), "node-a is up");
    let listed = cluster_from(&a_client).await;
    assert!(!unavailable(&listed, on_b), "node-b is up");

    b.kill9();
    eventually("node-b is no longer live", || async {
        a_client
            .nodes()
            .await
            .unwrap()
            .nodes
            .iter()
            .any(|n| n.name == "node-b" && !n.live)
    })
    .await;
    let listed = cluster_from(&a_client).await;
    assert!(unavailable(&listed, on_b), "its only copy was on node-b");
    assert!(!unavailable(&listed, on_a), "node-a is up");

    // The operator restarts: node-b, down since before, is still listed
    // (not live once the restart's grace has passed, as last heard from)
    // and its payload still unavailable.
    operator.kill9();
    let _operator = Operator::start_with(&database, port, logs.path(), &fast).await;
    eventually("node-b is listed as down after the operator's restart", || async {
        a_client.nodes().await.is_ok_and(|listed| {
            listed
                .nodes
                .iter()
                .any(|n| n.name == "node-b" && !n.live && n.last_seen_ms > 0)
        })
    })
    .await;
    let listed = cluster_from(&a_client).await;
    assert!(unavailable(&listed, on_b), "node-b's payload, after the restart");
    assert!(!unavailable(&listed, on_a), "node-a is up");
    a.kill9();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_on_another_nodes_payload_reads_its_object_copy_or_names_its_node() {
    let Some(database) = payload_catalog::testing::fresh_database().await else {
        return;
    };
    let Some(s3) = common::s3::server() else { return };
    let store = format!("s3://{}/cluster", s3.bucket().await);
    let db = catalog(&database).await;
    let logs = tempfile::tempdir().unwrap();
    let operator = Operator::start(&database, spare_port(), logs.path()).await;
    let (a_dirs, b_dirs, c_dirs) = (Dirs::new(), Dirs::new(), Dirs::new());
    let with_store = |name: &'static str| ["--node-name", name, "--object-store", store.as_str()];
    let (a, a_client) = node_with(&a_dirs, &operator.url(), &with_store("node-a")).await;
    let (b, b_client) = node_with(&b_dirs, &operator.url(), &with_store("node-b")).await;
    // A node without an object tier cannot read anyone's object copies.
    let (c, c_client) = node(&c_dirs, &operator.url(), "node-c").await;
    let bytes = common::noise::noise(5 << 20, 3);
    let (id, _) = put(&a_client, &bytes, Tier::Ram).await.unwrap();
    eventually("the commit is in the catalog", || async {
        row(&db, id).await.is_some()
    })
    .await;

    // Only in node-a's RAM: node-b says where it is, over both paths.
    let v1_b = payload_client::Client::connect_grpc(b_dirs.socket().to_str().unwrap())
        .await
        .unwrap();
    for client in [&b_client, &v1_b] {
        let refused = client.get(id).await.map(drop).unwrap_err();
        let payload_client::ClientError::FailedPrecondition(message) = &refused else {
            panic!("{refused:?}")
        };
        assert!(
            message.contains("node node-a") && message.contains("no object-store copy"),
            "{message}"
        );
    }
    // Stat names the node; delete is refused, naming it.
    let stat = b_client.stat(id).await.unwrap();
    assert_eq!(stat.payload.as_ref().unwrap().node, "node-a");
    assert!(
        stat.payload_descriptor.unwrap().location.is_none(),
        "its bytes are not here"
    );
    let refused = b_client.delete(id, false).await.unwrap_err();
    assert!(
        matches!(&refused, payload_client::ClientError::FailedPrecondition(m) if m.contains("belongs to node node-a")),
        "{refused:?}"
    );

    // Spilled to the object store, any node with that store reads it.
    a_client.spill(id, Some(Tier::Object), false).await.unwrap();
    eventually("the object copy is in the catalog", || async {
        row(&db, id).await.is_some_and(|r| r.in_object_store())
    })
    .await;
    // Node-b remembers the catalog's answer (no object copy) for a second.
    eventually("node-b leases the object copy", || async {
        b_client.get(id).await.is_ok()
    })
    .await;
    for client in [&b_client, &v1_b] {
        let lease = client.get(id).await.unwrap();
        assert!(lease.bytes() == bytes.as_slice(), "node-b reads node-a's bytes");
    }
    let cached = b_client.stats().await.unwrap();
    let object = cached.tiers.iter().find(|t| t.tier == Tier::Object as u32).unwrap();
    assert!(
        object.cache_bytes >= bytes.len() as u64,
        "fetched into node-b's block cache: {object:?}"
    );
    assert_eq!(object.payloads, 0, "and not counted as node-b's own payload");
    // Not promoted on a node that does not own it.
    let faster = payload_client::LeaseOptions {
        min_tier: Some(Tier::Ram),
        ..Default::default()
    };
    let refused = b_client.get_with(id, faster).await.map(drop).unwrap_err();
    assert!(
        matches!(&refused, payload_client::ClientError::FailedPrecondition(m) if m.contains("object tier only")),
        "{refused:?}"
    );
    let refused = c_client.get(id).await.map(drop).unwrap_err();
    assert!(
        matches!(&refused, payload_client::ClientError::FailedPrecondition(m) if m.contains("no object tier")),
        "{refused:?}"
    );
    // Node-a's payload is still node-a's alone.
    assert_eq!(b_client.list(Default::default()).await.unwrap().payloads.len(), 0);
    a_client.delete(id, false).await.unwrap();
    a.kill9();
    b.kill9();
    c.kill9();
}

//! The operator's cluster view (`payloadctl --operator`): the v1 services
//! served by `payload-operator catalog` over every node's rows, and a
//! deletion carried out by the payload's node over its control call. Real
//! processes on a real PostgreSQL; a node killed with SIGKILL.

mod common;

use common::operator::Operator;
use common::process::{put, Agent};
use common::{eventually, spare_port, Dirs};
use payload_catalog::{PayloadId, Repository};
use payload_client::{Client, ClientError, Tier};
use payload_proto::runtime::{self, AppendItem, AppendRequest, CreateStreamRequest, ReadRequest, StreamId};

async fn node(dirs: &Dirs, operator: &str, name: &str) -> (Agent, Client) {
    Agent::start_with(dirs, &["node", "--operator", operator, "--node-name", name]).await
}

fn pb(id: uuid::Uuid) -> Option<payload_proto::core::PayloadId> {
    Some(payload_proto::core::PayloadId {
        value: id.as_bytes().to_vec(),
    })
}

fn stream() -> Option<StreamId> {
    Some(StreamId {
        namespace: "view".into(),
        name: "batches".into(),
    })
}

/// The operator's answer to deleting `id`, once the payload's node has its
/// control call open (until then the operator says it is not connected).
async fn delete_when_connected(view: &Client, id: uuid::Uuid, force: bool) -> Result<(), ClientError> {
    // As `eventually`: every 20 ms for at most 30 s.
    for _ in 0..1_500 {
        match view.delete(id, force).await {
            Err(ClientError::Unavailable(m)) if m.contains("not connected") => {}
            outcome => return outcome,
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("the payload's node never opened its control call");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_lists_every_nodes_payloads_and_rm_reaches_the_owning_node() {
    let Some(database) = payload_catalog::testing::fresh_database().await else {
        return;
    };
    let db = payload_catalog::PgRepository::connect(&database, "test-reader")
        .await
        .unwrap();
    let logs = tempfile::tempdir().unwrap();
    let operator = Operator::start(&database, spare_port(), logs.path()).await;
    let (a_dirs, b_dirs) = (Dirs::new(), Dirs::new());
    let (a, a_client) = node(&a_dirs, &operator.url(), "node-a").await;
    let (b, b_client) = node(&b_dirs, &operator.url(), "node-b").await;
    let (on_a, _) = put(&a_client, b"here", Tier::Ram).await.unwrap();
    let (on_b, _) = put(&b_client, b"there", Tier::Ram).await.unwrap();
    let (kept_on_b, _) = put(&b_client, b"kept", Tier::Ram).await.unwrap();
    let (forced_on_b, _) = put(&b_client, b"forced", Tier::Ram).await.unwrap();
    eventually("every commit is in the operator's catalog", || async {
        let mut all = true;
        for id in [on_a, on_b, kept_on_b, forced_on_b] {
            all &= db.get_payload(PayloadId(id)).await.unwrap().is_some();
        }
        all
    })
    .await;

    let view = Client::connect_operator(&operator.url(), None, None).await.unwrap();
    // Every node's payloads, each with its node, without naming a node.
    let listed = view.list(runtime::ListPayloadsRequest::default()).await.unwrap();
    assert_eq!(listed.total_count, 4);
    let node_of = |id: uuid::Uuid| {
        listed
            .payloads
            .iter()
            .find(|p| p.id.as_ref().unwrap().value == id.as_bytes())
            .map(|p| p.node.clone())
    };
    assert_eq!(node_of(on_a).as_deref(), Some("node-a"));
    assert_eq!(node_of(on_b).as_deref(), Some("node-b"));
    let stat = view.stat(on_b).await.unwrap();
    assert_eq!(stat.payload.unwrap().node, "node-b");
    assert_eq!(stat.payload_descriptor.unwrap().size_bytes, 5);
    let nodes = view.nodes().await.unwrap();
    assert!(nodes.cluster);
    let mut live: Vec<_> = nodes.nodes.iter().filter(|n| n.live).map(|n| n.name.as_str()).collect();
    live.sort_unstable();
    assert_eq!(live, ["node-a", "node-b"]);
    assert_eq!(view.stats().await.unwrap().payloads_ram, 4);

    // A stream made through the operator is the one every node serves.
    let mut streams = view.streams();
    streams
        .create_stream(CreateStreamRequest {
            stream: stream(),
            ..Default::default()
        })
        .await
        .unwrap();
    let items = [on_a, on_b]
        .map(|id| AppendItem {
            payload_id: pb(id),
            ..Default::default()
        })
        .to_vec();
    let appended = streams
        .append(AppendRequest {
            stream: stream(),
            items,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((appended.first_offset, appended.last_offset), (0, 1));
    let read = a_client
        .streams()
        .read(ReadRequest {
            stream: stream(),
            max_entries: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let read: Vec<_> = read.entries.iter().map(|e| e.payload_id.clone()).collect();
    assert_eq!(read, [pb(on_a), pb(on_b)]);

    // What needs a payload's bytes is refused with the way to do it.
    match view.put(b"bytes").await {
        Err(ClientError::FailedPrecondition(m)) => assert!(m.contains("agent"), "{m}"),
        other => panic!("a put through the operator: {other:?}"),
    }

    // rm: node-b checks its leases, then deletes there.
    let lease = b_client.get(on_b).await.unwrap();
    match delete_when_connected(&view, on_b, false).await {
        Err(ClientError::Aborted(m)) => assert!(m.contains("node-b"), "names the node: {m}"),
        other => panic!("deleting a leased payload through the operator: {other:?}"),
    }
    assert_eq!(lease.bytes(), b"there", "the leased bytes are untouched");
    b_client.release(lease).await.unwrap();
    view.delete(on_b, false).await.unwrap();
    assert!(matches!(b_client.stat(on_b).await, Err(ClientError::NotFound(_))));
    eventually("the deletion reaches the catalog", || async {
        db.get_payload(PayloadId(on_b)).await.unwrap().is_none()
    })
    .await;
    assert!(matches!(view.delete(on_b, false).await, Err(ClientError::NotFound(_))));

    // rm --force: the node revokes the lease and deletes anyway.
    let lease = b_client.get(forced_on_b).await.unwrap();
    view.delete(forced_on_b, true).await.unwrap();
    assert!(matches!(
        b_client.stat(forced_on_b).await,
        Err(ClientError::NotFound(_))
    ));
    drop(lease);

    // A node that is down cannot delete: nothing is, and the caller hears why.
    b.kill9();
    eventually("node-b's control call is gone", || async {
        matches!(view.delete(kept_on_b, false).await, Err(ClientError::Unavailable(_)))
    })
    .await;
    assert!(db.get_payload(PayloadId(kept_on_b)).await.unwrap().is_some());
    assert!(view.stat(on_a).await.is_ok(), "node-a's payloads are still served");
    a.kill9();
}

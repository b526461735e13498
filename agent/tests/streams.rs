//! Streams over gRPC on a real agent: pushed subscriptions, flow control,
//! consumer offsets, precise errors, and agents sharing a PostgreSQL catalog.

mod common;

use std::time::Duration;

use common::{Capacity, Dirs, Served};
use payload_agent::node::NodeConfig;
use payload_catalog::PgRepository;
use payload_client::Transport;
use payload_proto::core as pb;
use payload_proto::runtime::subscribe_request::Start;
use payload_proto::runtime::*;
use payload_proto::services::payload_stream_service_client::PayloadStreamServiceClient;
use tonic::{Code, Streaming};

/// Generous: only a hang fails on it, never a slow machine.
const PATIENCE: Duration = Duration::from_secs(30);

fn sid(name: &str) -> Option<StreamId> {
    Some(StreamId {
        name: name.into(),
        namespace: "test".into(),
    })
}

async fn create(streams: &mut PayloadStreamServiceClient<Transport>, name: &str) {
    streams
        .create_stream(CreateStreamRequest {
            stream: sid(name),
            ..Default::default()
        })
        .await
        .unwrap();
}

async fn append(
    streams: &mut PayloadStreamServiceClient<Transport>,
    name: &str,
    id: &pb::PayloadId,
    n: usize,
) -> (u64, u64) {
    let items = (0..n)
        .map(|i| AppendItem {
            payload_id: Some(id.clone()),
            duration_ns: i as u64,
            ..Default::default()
        })
        .collect();
    let done = streams
        .append(AppendRequest {
            stream: sid(name),
            items,
        })
        .await
        .unwrap()
        .into_inner();
    (done.first_offset, done.last_offset)
}

async fn subscribe(
    streams: &mut PayloadStreamServiceClient<Transport>,
    name: &str,
    start: Start,
    max_inflight: u32,
) -> Streaming<SubscribeResponse> {
    streams
        .subscribe(SubscribeRequest {
            stream: sid(name),
            start: Some(start),
            max_inflight,
        })
        .await
        .unwrap()
        .into_inner()
}

async fn next_offset(sub: &mut Streaming<SubscribeResponse>) -> u64 {
    let msg = tokio::time::timeout(PATIENCE, sub.message())
        .await
        .expect("an entry arrives")
        .unwrap()
        .expect("the subscription stays open");
    msg.entry.unwrap().offset
}

fn code<T>(result: Result<tonic::Response<T>, tonic::Status>) -> Code {
    match result {
        Ok(_) => Code::Ok,
        Err(status) => {
            assert!(!status.message().is_empty(), "{status:?} says what to do");
            status.code()
        }
    }
}

async fn a_payload(served: &Served) -> pb::PayloadId {
    let id = served.client.put(b"entry").await.unwrap();
    pb::PayloadId {
        value: id.as_bytes().to_vec(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_started_before_appends_gets_them_pushed_in_order() {
    let dirs = Dirs::new();
    let served = Served::start(&dirs, NodeConfig::default(), &Capacity::default()).await;
    let id = a_payload(&served).await;
    let mut streams = served.client.streams();
    create(&mut streams, "s").await;
    append(&mut streams, "s", &id, 3).await;
    let mut latest = subscribe(&mut streams, "s", Start::FromLatest(true), 0).await;
    let mut all = subscribe(&mut streams, "s", Start::FromBeginning(true), 0).await;
    let mut from_two = subscribe(&mut streams, "s", Start::Offset(2), 0).await;
    for round in 0..5u64 {
        // Each append is answered by a push: no later append is needed to
        // flush it out.
        assert_eq!(append(&mut streams, "s", &id, 2).await, (3 + 2 * round, 4 + 2 * round));
        for want in [3 + 2 * round, 4 + 2 * round] {
            assert_eq!(next_offset(&mut latest).await, want);
        }
    }
    for want in 0..13 {
        assert_eq!(next_offset(&mut all).await, want, "the backlog, then new entries");
    }
    assert_eq!(next_offset(&mut from_two).await, 2);
    drop((latest, all, from_two));
    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_subscriber_does_not_hold_back_writers() {
    let dirs = Dirs::new();
    let served = Served::start(&dirs, NodeConfig::default(), &Capacity::default()).await;
    let id = a_payload(&served).await;
    let mut streams = served.client.streams();
    create(&mut streams, "s").await;
    // A window of one entry that is never read while the writer runs.
    let mut slow = subscribe(&mut streams, "s", Start::FromBeginning(true), 1).await;
    for i in 0..200u64 {
        let done = tokio::time::timeout(PATIENCE, append(&mut streams, "s", &id, 1))
            .await
            .expect("appends never wait for subscribers");
        assert_eq!(done, (i, i));
    }
    for want in 0..200 {
        assert_eq!(next_offset(&mut slow).await, want, "it catches up, in order");
    }
    drop(slow);
    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_share_transactions_but_keep_their_own_offsets() {
    let dirs = Dirs::new();
    let served = Served::start(&dirs, NodeConfig::default(), &Capacity::default()).await;
    let id = a_payload(&served).await;
    let mut streams = served.client.streams();
    create(&mut streams, "s").await;
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..8 {
        let (mut streams, id) = (streams.clone(), id.clone());
        tasks.spawn(async move {
            let mut ranges = Vec::new();
            for round in 0..50 {
                if task == 0 && round % 10 == 0 {
                    // A bad call in the crowd fails alone.
                    let ghost = Some(pb::PayloadId { value: vec![9; 16] });
                    let bad = AppendRequest {
                        stream: sid("s"),
                        items: vec![AppendItem {
                            payload_id: ghost,
                            ..Default::default()
                        }],
                    };
                    assert_eq!(code(streams.append(bad).await), Code::NotFound);
                }
                ranges.push(append(&mut streams, "s", &id, 2).await);
            }
            ranges
        });
    }
    let mut offsets = Vec::new();
    while let Some(ranges) = tasks.join_next().await {
        for (first, last) in ranges.unwrap() {
            assert_eq!(last, first + 1, "a call's entries are contiguous");
            offsets.extend([first, last]);
        }
    }
    offsets.sort();
    assert_eq!(offsets, (0..800).collect::<Vec<_>>());
    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_calls_with_bad_input_get_precise_statuses() {
    let dirs = Dirs::new();
    let served = Served::start(&dirs, NodeConfig::default(), &Capacity::default()).await;
    let id = a_payload(&served).await;
    let mut s = served.client.streams();
    let empty_name = CreateStreamRequest {
        stream: sid(""),
        ..Default::default()
    };
    assert_eq!(code(s.create_stream(empty_name).await), Code::InvalidArgument);
    assert_eq!(
        code(s.create_stream(CreateStreamRequest::default()).await),
        Code::InvalidArgument
    );
    let read = |name: &str, start_offset| ReadRequest {
        stream: sid(name),
        start_offset,
        ..Default::default()
    };
    assert_eq!(code(s.read(read("ghost", 0)).await), Code::NotFound);
    let ghost_item = AppendRequest {
        stream: sid("ghost"),
        items: vec![AppendItem::default()],
    };
    assert_eq!(
        code(s.append(ghost_item).await),
        Code::InvalidArgument,
        "an item without a payload id"
    );
    let sub = SubscribeRequest {
        stream: sid("ghost"),
        ..Default::default()
    };
    assert_eq!(code(s.subscribe(sub).await), Code::NotFound);

    create(&mut s, "s").await;
    let again = CreateStreamRequest {
        stream: sid("s"),
        ..Default::default()
    };
    assert_eq!(code(s.create_stream(again).await), Code::AlreadyExists);
    let unknown_payload = AppendRequest {
        stream: sid("s"),
        items: vec![AppendItem {
            payload_id: Some(pb::PayloadId { value: vec![7; 16] }),
            ..Default::default()
        }],
    };
    assert_eq!(code(s.append(unknown_payload).await), Code::NotFound);
    append(&mut s, "s", &id, 2).await;
    assert_eq!(code(s.read(read("s", 3)).await), Code::OutOfRange);
    let range = |start_offset, end_offset| GetRangeRequest {
        stream: sid("s"),
        start_offset,
        end_offset,
    };
    assert_eq!(code(s.get_range(range(0, 2)).await), Code::OutOfRange);
    assert_eq!(code(s.get_range(range(1, 0)).await), Code::InvalidArgument);
    assert_eq!(s.get_range(range(0, 1)).await.unwrap().into_inner().entries.len(), 2);
    let past = SubscribeRequest {
        stream: sid("s"),
        start: Some(Start::Offset(3)),
        max_inflight: 0,
    };
    assert_eq!(code(s.subscribe(past).await), Code::OutOfRange);

    let committed = |group: &str| GetCommittedRequest {
        stream: sid("s"),
        consumer_group: group.into(),
    };
    let nothing = s.get_committed(committed("g")).await.unwrap().into_inner();
    assert_eq!((nothing.offset, nothing.committed), (0, false));
    let commit = |offset| CommitRequest {
        stream: sid("s"),
        consumer_group: "g".into(),
        offset,
    };
    s.commit(commit(0)).await.unwrap();
    let zero = s.get_committed(committed("g")).await.unwrap().into_inner();
    assert_eq!((zero.offset, zero.committed), (0, true));
    assert_eq!(code(s.commit(commit(9)).await), Code::OutOfRange);
    assert_eq!(
        code(s.get_committed(committed("")).await),
        Code::Ok,
        "reading an empty group finds nothing"
    );

    // Deleting ends live subscriptions with NOT_FOUND.
    let mut live = subscribe(&mut s, "s", Start::FromLatest(true), 0).await;
    s.delete_stream(DeleteStreamRequest { stream: sid("s") }).await.unwrap();
    let ended = tokio::time::timeout(PATIENCE, live.message())
        .await
        .expect("the subscription ends");
    assert_eq!(ended.unwrap_err().code(), Code::NotFound);
    s.delete_stream(DeleteStreamRequest { stream: sid("s") }).await.unwrap();
    served.stop().await;
}

/// Two agents on one PostgreSQL catalog: appends through either reach
/// subscribers on the other, offsets stay unique, and payload rows stay
/// with their node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_sharing_postgres_see_each_others_appends() {
    let Some(url) = payload_catalog::testing::fresh_database().await else {
        return;
    };
    let (dirs_a, dirs_b) = (Dirs::new(), Dirs::new());
    let node = |name: &str| NodeConfig {
        node_name: name.into(),
        ..NodeConfig::default()
    };
    let repo_a = PgRepository::connect(&url, "a").await.unwrap();
    let repo_b = PgRepository::connect(&url, "b").await.unwrap();
    let a = Served::start_on(&dirs_a, node("a"), std::sync::Arc::new(repo_a)).await;
    let b = Served::start_on(&dirs_b, node("b"), std::sync::Arc::new(repo_b)).await;
    let id_a = a_payload(&a).await;
    let id_b = a_payload(&b).await;
    let (mut sa, mut sb) = (a.client.streams(), b.client.streams());
    create(&mut sa, "shared").await;
    let mut on_b = subscribe(&mut sb, "shared", Start::FromBeginning(true), 0).await;
    assert_eq!(append(&mut sa, "shared", &id_a, 2).await, (0, 1));
    assert_eq!(
        append(&mut sb, "shared", &id_b, 1).await,
        (2, 2),
        "one offset sequence across agents"
    );
    for want in 0..3 {
        assert_eq!(next_offset(&mut on_b).await, want);
    }
    assert_eq!(
        append(&mut sa, "shared", &id_b, 1).await,
        (3, 3),
        "payloads of any node may be appended"
    );
    assert_eq!(next_offset(&mut on_b).await, 3);

    let listed = |served: &Served| {
        let client = served.client.clone();
        async move {
            client
                .list(ListPayloadsRequest::default())
                .await
                .unwrap()
                .payloads
                .len()
        }
    };
    assert_eq!(
        (listed(&a).await, listed(&b).await),
        (1, 1),
        "each agent lists its own copies"
    );
    drop(on_b);
    a.stop().await;
    b.stop().await;
}

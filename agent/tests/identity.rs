//! Caller identity from the socket: a second user (`nobody`, in a process
//! of its own) can neither change the first user's payloads nor, unless
//! the read rule lets it, connect and read them; TCP with a token refuses
//! callers without it.

mod common;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use common::process::{put, Agent};
use common::{pattern, Dirs};
use payload_client::{Client, ClientError, PutOptions, Tier};

const NOBODY: u32 = 65534;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A directory anyone may enter, for sockets other users connect to (the
/// state dir is private).
fn public_dir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

async fn start(dirs: &Dirs, socket: &Path, rule: &str) -> (Agent, Client) {
    let flags = ["--socket", socket.to_str().unwrap(), "--read-access", rule];
    Agent::start_at(dirs, &flags, &[], socket)
        .await
        .unwrap_or_else(|log| panic!("agent did not come up: {log}"))
}

/// Runs `identity_helper` as uid `nobody` (and `gid`) against `socket`;
/// returns what it printed: one `operation=outcome` line each.
fn as_nobody(socket: &Path, gid: u32, payload: uuid::Uuid, allocation: uuid::Uuid) -> String {
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args(["identity_helper", "--exact", "--ignored", "--nocapture"])
        .env("IDENTITY_SOCKET", socket)
        .env("IDENTITY_PAYLOAD", payload.to_string())
        .env("IDENTITY_ALLOCATION", allocation.to_string());
    // SAFETY: setgroups/setgid/setuid are async-signal-safe; nothing else runs.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setgroups(0, std::ptr::null()) != 0 || libc::setgid(gid) != 0 || libc::setuid(NOBODY) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().expect("the helper runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn outcome<T>(result: Result<T, ClientError>) -> String {
    match result {
        Ok(_) => "ok".into(),
        Err(ClientError::Other(status)) => format!("{:?}", status.code()),
        Err(ClientError::Connect { .. }) => "cannot-connect".into(),
        Err(other) => format!("{other:?}").split('(').next().unwrap_or_default().to_string(),
    }
}

/// What another user tries against the first user's payloads.
#[tokio::test]
#[ignore = "run by the tests below as another user"]
async fn identity_helper() {
    let Ok(socket) = std::env::var("IDENTITY_SOCKET") else {
        return;
    };
    let id: uuid::Uuid = std::env::var("IDENTITY_PAYLOAD").unwrap().parse().unwrap();
    let allocation: uuid::Uuid = std::env::var("IDENTITY_ALLOCATION").unwrap().parse().unwrap();
    let client = match Client::connect(&socket).await {
        Ok(client) => client,
        Err(e) => {
            println!("connect={}", outcome::<()>(Err(e)));
            return;
        }
    };
    println!("native={}", client.is_native());
    println!("get={}", outcome(client.get(id).await.map(|l| l.bytes().len())));
    println!("delete={}", outcome(client.delete(id, true).await));
    println!("pin={}", outcome(client.pin(id, 0).await));
    println!("spill={}", outcome(client.spill(id, Some(Tier::Disk), false).await));
    println!("abort={}", outcome(client.abort(allocation).await));
    let (_, mut catalog, _) = client.raw();
    let commit = payload_proto::runtime::CommitPayloadRequest {
        id: Some(payload_proto::core::PayloadId {
            value: allocation.as_bytes().to_vec(),
        }),
        ..Default::default()
    };
    say_grpc("commit", catalog.commit_payload(commit).await);
    let prefetch = payload_proto::runtime::PrefetchRequest {
        id: Some(payload_proto::core::PayloadId {
            value: id.as_bytes().to_vec(),
        }),
        target_tier: Tier::Ram as i32,
    };
    say_grpc("prefetch", catalog.prefetch(prefetch).await);
    // The first user's stream: appending and deleting are its owner's;
    // reading follows the rule.
    let mut streams = client.streams();
    let append = payload_proto::runtime::AppendRequest {
        stream: owned_stream(),
        items: vec![payload_proto::runtime::AppendItem {
            payload_id: Some(payload_proto::core::PayloadId {
                value: id.as_bytes().to_vec(),
            }),
            ..Default::default()
        }],
    };
    say_grpc("append", streams.append(append).await);
    let delete = payload_proto::runtime::DeleteStreamRequest { stream: owned_stream() };
    say_grpc("delete-stream", streams.delete_stream(delete).await);
    let read = payload_proto::runtime::ReadRequest {
        stream: owned_stream(),
        ..Default::default()
    };
    say_grpc("read-stream", streams.read(read).await);
    // Its own payloads are its own.
    let own = client.put(b"nobody's").await;
    println!(
        "put={}",
        outcome(own.as_ref().map(drop).map_err(|e| ClientError::Protocol(e.to_string())))
    );
    if let Ok(own) = own {
        println!("delete-own={}", outcome(client.delete(own, false).await));
    }
}

fn owned_stream() -> Option<payload_proto::runtime::StreamId> {
    Some(payload_proto::runtime::StreamId {
        namespace: "identity".into(),
        name: "owned".into(),
    })
}

/// Prints what a raw gRPC call came to, as [`outcome`] says it.
fn say_grpc<T>(key: &str, result: Result<T, tonic::Status>) {
    println!("{key}={}", outcome(result.map_err(ClientError::from)));
}

fn line<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("the helper said nothing of {key}: {out}"))
}

async fn first_users_payloads(client: &Client) -> (uuid::Uuid, uuid::Uuid) {
    let (id, _) = put(client, &pattern(4096, 1), Tier::Ram).await.unwrap();
    let region = client.allocate_with(4096, &PutOptions::default()).await.unwrap();
    let allocation = region.id();
    // Kept uncommitted (and unmapped) for the other user to try.
    drop(region);
    (id, allocation)
}

#[tokio::test]
async fn another_user_changes_nothing_and_reads_only_as_the_rule_allows() {
    if !is_root() {
        eprintln!("skipped: switching to uid {NOBODY} needs root");
        return;
    }
    let dirs = Dirs::new();
    let public = public_dir();
    let socket: PathBuf = public.path().join("agent.sock");

    // owner: the sockets are the owner's alone; nobody cannot even connect.
    let (agent, client) = start(&dirs, &socket, "owner").await;
    let (id, allocation) = first_users_payloads(&client).await;
    let out = as_nobody(&socket, NOBODY, id, allocation);
    assert_eq!(line(&out, "connect"), "cannot-connect", "{out}");
    drop(client);
    agent.kill9();

    // node: nobody connects and reads, and changes none of it. (The
    // restart dropped the uncommitted allocation: make another.)
    let (agent, client) = start(&dirs, &socket, "node").await;
    let (_, allocation) = first_users_payloads(&client).await;
    let create = payload_proto::runtime::CreateStreamRequest {
        stream: owned_stream(),
        ..Default::default()
    };
    client.streams().create_stream(create).await.unwrap();
    let out = as_nobody(&socket, NOBODY, id, allocation);
    assert_eq!(line(&out, "native"), "true", "{out}");
    assert_eq!(line(&out, "get"), "ok", "{out}");
    assert_eq!(line(&out, "read-stream"), "ok", "{out}");
    for op in [
        "delete",
        "pin",
        "spill",
        "abort",
        "commit",
        "prefetch",
        "append",
        "delete-stream",
    ] {
        assert_eq!(line(&out, op), "PermissionDenied", "{op}: {out}");
    }
    assert_eq!(line(&out, "put"), "ok", "{out}");
    assert_eq!(line(&out, "delete-own"), "ok", "{out}");
    // Still the first user's, untouched.
    let stat = client.stat(id).await.unwrap().payload.unwrap();
    assert!(!stat.pinned);
    assert_eq!(stat.tier, Tier::Ram as i32);
    let head = client
        .streams()
        .read(payload_proto::runtime::ReadRequest {
            stream: owned_stream(),
            ..Default::default()
        })
        .await
        .expect("the stream is still there")
        .into_inner();
    assert!(head.entries.is_empty(), "nobody appended nothing");
    client
        .abort(allocation)
        .await
        .expect("the owner aborts its own allocation");
    drop(client);
    agent.kill9();

    // group: a caller in the owner's group (gid 0) reads; one outside does not connect.
    let (agent, client) = start(&dirs, &socket, "group").await;
    let out = as_nobody(&socket, 0, id, allocation);
    assert_eq!(line(&out, "get"), "ok", "{out}");
    assert_eq!(line(&out, "delete"), "PermissionDenied", "{out}");
    let out = as_nobody(&socket, NOBODY, id, allocation);
    assert_eq!(line(&out, "connect"), "cannot-connect", "{out}");
    client
        .delete(id, false)
        .await
        .expect("the owner deletes its own payload");
    agent.kill9();
}

#[tokio::test]
async fn tcp_refuses_calls_without_the_token() {
    let dirs = Dirs::new();
    let token = dirs.state.path().join("token");
    std::fs::write(&token, "s3cret-token\n").unwrap();
    let port = common::spare_port();
    let listen = format!("127.0.0.1:{port}");
    let flags = ["--listen", listen.as_str(), "--tcp-token-file", token.to_str().unwrap()];
    let (agent, _client) = Agent::start_with(&dirs, &flags).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{listen}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut admin = payload_proto::services::payload_admin_service_client::PayloadAdminServiceClient::new(channel);
    let bare = admin.stats(payload_proto::admin::StatsRequest {}).await.unwrap_err();
    assert_eq!(bare.code(), tonic::Code::Unauthenticated, "{bare}");
    let mut wrong = tonic::Request::new(payload_proto::admin::StatsRequest {});
    wrong
        .metadata_mut()
        .insert("authorization", "Bearer guess".parse().unwrap());
    assert_eq!(
        admin.stats(wrong).await.unwrap_err().code(),
        tonic::Code::Unauthenticated
    );
    let mut right = tonic::Request::new(payload_proto::admin::StatsRequest {});
    right
        .metadata_mut()
        .insert("authorization", "Bearer s3cret-token".parse().unwrap());
    admin.stats(right).await.expect("the token lets the call through");

    // The Rust client sends it with every call when given one.
    let addr = format!("http://{listen}");
    let with = payload_client::Client::connect_with_token(&addr, "s3cret-token")
        .await
        .unwrap();
    let id = with.put(b"over tcp").await.expect("a put with the token");
    assert_eq!(with.get(id).await.unwrap().bytes(), b"over tcp");
    let without = payload_client::Client::connect(&addr).await.unwrap();
    match without.stats().await {
        Err(payload_client::ClientError::Other(status)) => {
            assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status}")
        }
        other => panic!("a client without the token got {:?}", other.map(|_| ())),
    }
    assert!(matches!(
        payload_client::Client::connect_with_token(&addr, "two words").await,
        Err(payload_client::ClientError::InvalidArgument(_))
    ));
    agent.kill9();

    // Reachable from other hosts without a token: refused at start.
    let refused = Agent::refused(&Dirs::new(), &["--listen", "0.0.0.0:0"]);
    assert!(refused.contains("--tcp-token-file"), "{refused}");
}

/// Streams of a Unix caller, tried by the anonymous TCP identity (no root
/// needed): appending, deleting, reading and moving offsets are refused
/// under `--read-access owner`; its own stream is its own.
#[tokio::test]
async fn the_tcp_identity_cannot_touch_a_unix_callers_stream() {
    use payload_proto::runtime;
    use payload_proto::services::payload_stream_service_client::PayloadStreamServiceClient;
    let dirs = Dirs::new();
    let port = common::spare_port();
    let listen = format!("127.0.0.1:{port}");
    let (agent, client) = Agent::start_with(&dirs, &["--listen", listen.as_str()]).await;
    let stream = |name: &str| {
        Some(runtime::StreamId {
            namespace: "identity".into(),
            name: name.into(),
        })
    };
    let (id, _) = put(&client, &pattern(64, 3), Tier::Ram).await.unwrap();
    let item = || runtime::AppendItem {
        payload_id: Some(payload_proto::core::PayloadId {
            value: id.as_bytes().to_vec(),
        }),
        ..Default::default()
    };
    let mut owner = client.streams();
    let create = |name: &str| runtime::CreateStreamRequest {
        stream: stream(name),
        ..Default::default()
    };
    owner.create_stream(create("unix")).await.unwrap();
    let append = |name: &str| runtime::AppendRequest {
        stream: stream(name),
        items: vec![item()],
    };
    owner.append(append("unix")).await.unwrap();

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{listen}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut tcp = PayloadStreamServiceClient::new(channel);
    fn denied<T>(outcome: Result<T, tonic::Status>, what: &str) {
        let Err(status) = outcome else {
            panic!("{what} went through")
        };
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{what}: {status}");
        assert!(status.message().contains("stream identity/unix"), "{what}: {status}");
    }
    denied(tcp.append(append("unix")).await, "append");
    let delete = runtime::DeleteStreamRequest { stream: stream("unix") };
    denied(tcp.delete_stream(delete).await, "delete");
    let read = runtime::ReadRequest {
        stream: stream("unix"),
        ..Default::default()
    };
    denied(tcp.read(read.clone()).await, "read");
    let commit = runtime::CommitRequest {
        stream: stream("unix"),
        consumer_group: "g".into(),
        offset: 0,
    };
    denied(tcp.commit(commit).await, "commit offset");
    // Its own stream is its own.
    tcp.create_stream(create("tcp")).await.unwrap();
    tcp.append(append("tcp")).await.unwrap();
    // The owner's stream is as it was.
    let entries = owner.read(read).await.unwrap().into_inner().entries;
    assert_eq!(entries.len(), 1);
    agent.kill9();
}

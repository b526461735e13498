//! The native socket against a real agent process: one-call puts (inline
//! and through a memfd), leases with descriptors, sealing, session leases
//! that die with their holder, and a protocol that survives bad peers.

mod common;

use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use common::process::{put, Agent};
use common::{eventually, pattern, Dirs};
use payload_client::{ClientError, Tier};
use payload_proto::native::{self as wire, request::Op, response::Result as Answer, Socket};
use prost::Message;
use sha2::{Digest, Sha256};

/// A raw native connection, for what the client library never sends.
struct Raw {
    socket: Socket,
    buf: Vec<u8>,
    next: u64,
}

impl Raw {
    fn connect(dirs: &Dirs) -> Raw {
        let socket = Socket::connect(&wire::socket_path(&dirs.socket())).expect("native socket");
        Raw {
            socket,
            buf: Vec::new(),
            next: 1,
        }
    }

    async fn send_bytes(&self, bytes: &[u8], fds: &[i32]) {
        self.socket.send(bytes, fds).await.expect("send");
    }

    /// Sends; false once the agent no longer takes frames from us.
    async fn send_bytes_checked(&self, bytes: &[u8]) -> bool {
        self.socket.send(bytes, &[]).await.is_ok()
    }

    async fn recv(&mut self) -> (wire::Response, Option<std::os::fd::OwnedFd>) {
        let frame = self
            .socket
            .recv(&mut self.buf)
            .await
            .expect("recv")
            .expect("the agent answers");
        let response = wire::Response::decode(&self.buf[..frame.len]).expect("a response");
        (response, frame.fds.into_iter().next())
    }

    async fn call(&mut self, op: Op, fds: &[i32]) -> (wire::Response, Option<std::os::fd::OwnedFd>) {
        let id = self.next;
        self.next += 1;
        self.send_bytes(&wire::Request { id, op: Some(op) }.encode_to_vec(), fds)
            .await;
        let (response, fd) = self.recv().await;
        assert_eq!(response.id, id, "answers carry their request id");
        (response, fd)
    }
}

fn error_of(response: &wire::Response) -> (tonic::Code, String) {
    let err = response.error.as_ref().expect("an error answer");
    (tonic::Code::from(err.code), err.message.clone())
}

#[tokio::test]
async fn puts_and_gets_go_over_the_native_socket() {
    let dirs = Dirs::new();
    let (agent, client) = Agent::start(&dirs).await;
    assert!(
        client.is_native(),
        "the client finds the native socket beside the gRPC one"
    );
    for len in [1usize, 4096, 40 << 10, 3 << 20] {
        let bytes = pattern(len, len as u8);
        let (id, digest) = put(&client, &bytes, Tier::Ram).await.unwrap();
        let lease = client.get(id).await.unwrap();
        assert_eq!(Sha256::digest(lease.bytes()).to_vec(), digest, "{len} bytes read back");
        // A second get while the first lease is held reuses it.
        let again = client.get(id).await.unwrap();
        assert_eq!(again.lease_id(), lease.lease_id());
        let stat = client.stat(id).await.unwrap();
        let desc = stat.payload_descriptor.unwrap();
        assert!(desc.sealed, "a native RAM put is a sealed memfd");
        assert!(
            desc.location.is_none(),
            "a sealed payload has no name to hand a v1 client"
        );
    }
    let stats = client.stats().await.unwrap();
    assert_eq!(stats.sealed_payloads, 4);
    // Disk puts go through a descriptor too, and are named files.
    let (id, digest) = put(&client, &pattern(10_000, 9), Tier::Disk).await.unwrap();
    let lease = client.get(id).await.unwrap();
    assert_eq!(Sha256::digest(lease.bytes()).to_vec(), digest);
    common::process::assert_no_orphans(&dirs, &client).await;
    agent.kill9();
}

#[tokio::test]
async fn a_v1_lease_on_a_sealed_payload_says_why_it_cannot() {
    let dirs = Dirs::new();
    let (agent, client) = Agent::start(&dirs).await;
    let (id, _) = put(&client, b"sealed", Tier::Ram).await.unwrap();
    let v1 = common::process::v1(&dirs).await;
    match v1.get(id).await {
        Err(ClientError::FailedPrecondition(msg)) => assert!(msg.contains("sealed memfd"), "{msg}"),
        Err(other) => panic!("wrong error: {other}"),
        Ok(_) => panic!("a v1 lease cannot hand out a sealed payload"),
    }
    assert_eq!(
        client.stats().await.unwrap().active_leases,
        0,
        "the refused lease is given back"
    );
    agent.kill9();
}

#[tokio::test]
async fn a_writer_that_keeps_its_mapping_cannot_commit_and_sealed_bytes_never_change() {
    let dirs = Dirs::new();
    let (agent, client) = Agent::start(&dirs).await;
    let mut raw = Raw::connect(&dirs);
    let (response, fd) = raw
        .call(
            Op::Allocate(wire::Allocate {
                size_bytes: 8192,
                options: None,
            }),
            &[],
        )
        .await;
    let Some(Answer::Allocated(allocated)) = response.result else {
        panic!("allocate failed: {:?}", response.error)
    };
    let file = std::fs::File::from(fd.expect("the allocation's memfd"));
    assert!(
        file.set_len(1 << 20).is_err(),
        "a writer cannot grow its region past what was reserved"
    );
    // SAFETY: our own allocation.
    let mut map = unsafe { memmap2::MmapMut::map_mut(&file) }.unwrap();
    map.copy_from_slice(&pattern(8192, 3));
    let commit = || {
        Op::Commit(wire::Commit {
            payload_id: allocated.payload_id.clone(),
            options: None,
        })
    };
    let (response, _) = raw.call(commit(), &[]).await;
    let (code, msg) = error_of(&response);
    assert_eq!(code, tonic::Code::FailedPrecondition);
    assert!(msg.contains("mapped writable"), "{msg}");
    drop(map);
    let (response, _) = raw.call(commit(), &[]).await;
    assert!(
        matches!(response.result, Some(Answer::Committed(ref c)) if c.sealed),
        "{response:?}"
    );

    // Every way of changing the bytes fails, in this process, which is not the agent.
    assert!(file.write_all_at(b"x", 0).is_err(), "write");
    assert!(file.set_len(1).is_err(), "ftruncate");
    // SAFETY: fallocate on our descriptor.
    assert_ne!(
        unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, 16384) },
        0,
        "fallocate"
    );
    // SAFETY: a mapping attempt that must fail.
    assert!(
        unsafe { memmap2::MmapMut::map_mut(&file) }.is_err(),
        "a writable shared mapping"
    );

    // Another process reads exactly the committed bytes.
    let id = uuid::Uuid::from_slice(&allocated.payload_id).unwrap();
    let out = helper("reader_helper", &dirs, id).output().expect("the reader runs");
    let printed = String::from_utf8_lossy(&out.stdout);
    let want = hex::encode(Sha256::digest(pattern(8192, 3)));
    assert!(printed.contains(&format!("digest={want}")), "{printed}");
    let lease = client.get(id).await.unwrap();
    assert_eq!(lease.bytes(), &pattern(8192, 3)[..]);

    // A reader gets a read-only descriptor of its own (older kernels refuse
    // a read-only mapping of a write-sealed memfd through a writable one).
    let lease = Op::Lease(wire::Lease {
        payload_id: allocated.payload_id.clone(),
        ..Default::default()
    });
    let (response, fd) = raw.call(lease, &[]).await;
    assert!(matches!(response.result, Some(Answer::Leased(_))), "{response:?}");
    let fd = fd.expect("no bytes inline: a descriptor");
    // SAFETY: fcntl on a descriptor we own.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    assert_eq!(flags & libc::O_ACCMODE, libc::O_RDONLY);
    agent.kill9();
}

#[tokio::test]
async fn lease_durations_are_capped_and_a_session_cannot_be_asked_for_over_grpc() {
    let dirs = Dirs::new();
    let (agent, _client) = Agent::start_with(&dirs, &["--lease-max-ms", "60000"]).await;
    let v1 = common::process::v1(&dirs).await;
    let (id, _) = put(&v1, b"named", Tier::Ram).await.unwrap();
    let (mut data, _, _) = v1.raw();
    let forever = payload_proto::runtime::AcquireReadLeaseRequest {
        id: Some(payload_proto::core::PayloadId {
            value: id.as_bytes().to_vec(),
        }),
        min_lease_duration_ms: u64::MAX,
        ..Default::default()
    };
    let granted = data.acquire_read_lease(forever).await.unwrap().into_inner();
    let expires = payload_client::timestamp_ms(granted.lease_expires_at.as_ref());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    assert!(
        expires <= now + 61_000,
        "capped at --lease-max-ms, not forever: {expires}"
    );
    let renew = payload_proto::runtime::RenewLeaseRequest {
        lease_id: granted.lease_id,
        extend_ms: u64::MAX,
    };
    let renewed = data.renew_lease(renew).await.unwrap().into_inner();
    assert!(payload_client::timestamp_ms(renewed.lease_expires_at.as_ref()) <= now + 61_000);
    agent.kill9();
}

#[tokio::test]
async fn a_peer_that_never_reads_cannot_take_the_agent_down() {
    let dirs = Dirs::new();
    let (agent, client) = Agent::start(&dirs).await;
    let (id, _) = put(&client, &pattern(1 << 20, 4), Tier::Ram).await.unwrap();
    let fds_before = open_fds(agent.pid());
    let flood = Raw::connect(&dirs);
    let lease = wire::Request {
        id: 9,
        op: Some(Op::Lease(wire::Lease {
            payload_id: id.as_bytes().to_vec(),
            ..Default::default()
        })),
    }
    .encode_to_vec();
    // Thousands of leases asked for and no answer read: the agent stops
    // reading this peer once its answers back up.
    let mut sent = 0;
    for _ in 0..5000 {
        match tokio::time::timeout(std::time::Duration::from_millis(200), flood.send_bytes_checked(&lease)).await {
            Ok(true) => sent += 1,
            _ => break,
        }
    }
    assert!(sent > 0);
    // Others are served meanwhile.
    let other = payload_client::Client::connect(dirs.socket().to_str().unwrap())
        .await
        .unwrap();
    let (fresh, _) = put(&other, b"still serving", Tier::Ram).await.unwrap();
    assert_eq!(other.get(fresh).await.unwrap().bytes(), b"still serving");
    let leases = client.stats().await.unwrap().active_leases;
    assert!(
        leases <= 256 + 300 + 1,
        "held leases are bounded by the calls in flight: {leases}"
    );
    drop(flood);
    eventually("the flood's session leases are released", || async {
        client.stats().await.unwrap().active_leases <= 1
    })
    .await;
    let fds = open_fds(agent.pid());
    assert!(fds >= 3, "the agent's descriptors can be counted");
    eventually("the flood's descriptors are closed", || async {
        open_fds(agent.pid()) <= fds_before + 4
    })
    .await;
    agent.kill9();
}

#[tokio::test]
async fn bad_frames_get_precise_errors_and_leak_nothing() {
    let dirs = Dirs::new();
    let (agent, client) = Agent::start(&dirs).await;
    let (id, _) = put(&client, b"kept", Tier::Ram).await.unwrap();
    let fds_before = open_fds(agent.pid());
    let mut raw = Raw::connect(&dirs);

    // Too large for a frame.
    raw.send_bytes(&vec![7u8; wire::MAX_FRAME + 100], &[]).await;
    let (response, _) = raw.recv().await;
    assert_eq!(error_of(&response).0, tonic::Code::InvalidArgument);
    assert!(error_of(&response).1.contains("larger than"), "{response:?}");

    // Not a request at all.
    raw.send_bytes(&[0xff, 0xff, 0xff, 0xff, 0x0f], &[]).await;
    let (response, _) = raw.recv().await;
    assert_eq!(error_of(&response).0, tonic::Code::InvalidArgument);

    // A request naming no operation.
    raw.send_bytes(&wire::Request { id: 77, op: None }.encode_to_vec(), &[])
        .await;
    let (response, _) = raw.recv().await;
    assert_eq!((response.id, error_of(&response).0), (77, tonic::Code::Unimplemented));

    // A descriptor where none belongs: refused, and closed by the agent.
    let stray = tempfile::tempfile().unwrap();
    let release = Op::Release(wire::Release { lease_ids: vec![] });
    let (response, _) = raw.call(release, &[stray.as_raw_fd()]).await;
    assert_eq!(error_of(&response).0, tonic::Code::InvalidArgument);

    // A put with a descriptor that is not a memfd.
    let put_fd = Op::Put(wire::Put {
        data: vec![],
        size_bytes: 4,
        options: None,
    });
    let (response, _) = raw.call(put_fd, &[stray.as_raw_fd()]).await;
    let (code, msg) = error_of(&response);
    assert_eq!(code, tonic::Code::InvalidArgument);
    assert!(msg.contains("memfd"), "{msg}");

    // A bad payload id.
    let lease = Op::Lease(wire::Lease {
        payload_id: vec![1, 2, 3],
        ..Default::default()
    });
    let (response, _) = raw.call(lease, &[]).await;
    assert_eq!(error_of(&response).0, tonic::Code::InvalidArgument);

    // Batch ids that are not whole 16-byte ids.
    for (name, op) in [
        (
            "payload_ids",
            Op::Leases(wire::Leases {
                payload_ids: vec![7; 17],
            }),
        ),
        ("lease_ids", Op::Release(wire::Release { lease_ids: vec![7; 15] })),
    ] {
        let (response, _) = raw.call(op, &[]).await;
        let (code, msg) = error_of(&response);
        assert_eq!(code, tonic::Code::InvalidArgument);
        assert!(msg.contains(name) && msg.contains("16-byte"), "{msg}");
    }

    // An empty batch (what an older client's ids decode as) is not a no-op.
    for (name, op) in [
        ("payload_ids", Op::Leases(wire::Leases { payload_ids: vec![] })),
        ("lease_ids", Op::Release(wire::Release { lease_ids: vec![] })),
    ] {
        let (response, _) = raw.call(op, &[]).await;
        let (code, msg) = error_of(&response);
        assert_eq!(code, tonic::Code::InvalidArgument);
        assert!(msg.contains(name) && msg.contains("agent's version"), "{msg}");
    }

    // A peer that asks for a lease and goes away before the answer.
    let gone = Raw::connect(&dirs);
    let lease = Op::Lease(wire::Lease {
        payload_id: id.as_bytes().to_vec(),
        ..Default::default()
    });
    gone.send_bytes(&wire::Request { id: 1, op: Some(lease) }.encode_to_vec(), &[])
        .await;
    drop(gone);
    drop(raw);

    // The agent still serves, and holds nothing for the peers that left.
    let lease = client.get(id).await.unwrap();
    assert_eq!(lease.bytes(), b"kept");
    drop(lease);
    eventually("the session leases of closed connections are gone", || async {
        client.stats().await.unwrap().active_leases == 0
    })
    .await;
    let ram = client.stats().await.unwrap();
    assert_eq!(ram.sealed_payloads, 1, "failed puts left no memfd behind");
    let leaked = |now: usize| now <= fds_before + 2;
    eventually("the agent closed every descriptor it was sent", || async {
        leaked(open_fds(agent.pid()))
    })
    .await;
    agent.kill9();
}

#[tokio::test]
async fn a_killed_reader_holds_nothing() {
    let dirs = Dirs::new();
    let (agent, client) = Agent::start(&dirs).await;
    let (id, _) = put(&client, &pattern(5000, 1), Tier::Ram).await.unwrap();
    let mut holder = helper("holder_helper", &dirs, id).spawn().expect("the holder runs");
    eventually("the holder's lease is live", || async {
        client.stats().await.unwrap().active_leases == 1
    })
    .await;
    match client.delete(id, false).await {
        Err(ClientError::Aborted(_)) => {}
        other => panic!("a held payload refuses a plain delete: {other:?}"),
    }
    holder.kill().unwrap();
    holder.wait().unwrap();
    eventually("the killed holder's session lease ended", || async {
        client.stats().await.unwrap().active_leases == 0
    })
    .await;
    client
        .delete(id, false)
        .await
        .expect("deletable once its holder is gone");
    agent.kill9();
}

/// This test binary again, running one of the helpers below in a process
/// of its own against the agent.
fn helper(name: &str, dirs: &Dirs, id: uuid::Uuid) -> std::process::Command {
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args([name, "--exact", "--ignored", "--nocapture"])
        .env("NATIVE_HELPER_SOCKET", dirs.socket())
        .env("NATIVE_HELPER_PAYLOAD", id.to_string())
        .stdout(std::process::Stdio::piped());
    cmd
}

async fn helper_lease() -> Option<(payload_client::Client, payload_client::Lease)> {
    let socket = std::env::var("NATIVE_HELPER_SOCKET").ok()?;
    let id: uuid::Uuid = std::env::var("NATIVE_HELPER_PAYLOAD").ok()?.parse().ok()?;
    let client = payload_client::Client::connect(&socket).await.unwrap();
    assert!(client.is_native());
    let lease = client.get(id).await.unwrap();
    Some((client, lease))
}

#[tokio::test]
#[ignore = "run by the tests above in a process of its own"]
async fn reader_helper() {
    if let Some((_client, lease)) = helper_lease().await {
        println!("digest={}", hex::encode(Sha256::digest(lease.bytes())));
    }
}

#[tokio::test]
#[ignore = "run by the tests above in a process of its own"]
async fn holder_helper() {
    if let Some((_client, _lease)) = helper_lease().await {
        println!("holding");
        std::future::pending::<()>().await;
    }
}

/// How many memfds a process holds.
fn memfds_held(pid: i32) -> usize {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return 0;
    };
    dir.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy().starts_with("/memfd:"))
        .count()
}

/// The agent's open descriptors other than memfds (its payloads and its
/// pool of fresh regions hold those).
fn open_fds(pid: u32) -> usize {
    let dir = std::fs::read_dir(format!("/proc/{pid}/fd")).expect("the agent's /proc/PID/fd");
    dir.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| !target.to_string_lossy().starts_with("/memfd:"))
        .count()
}

#[tokio::test]
async fn a_client_carries_on_after_the_agent_restarts() {
    let dirs = Dirs::new();
    let (agent, client) = Agent::start(&dirs).await;
    let (id, digest) = put(&client, &pattern(100_000, 8), Tier::Ram).await.unwrap();
    let before = client.get(id).await.unwrap();
    agent.kill9();
    let (agent, _fresh) = Agent::start(&dirs).await;
    // The call that meets the closed connection fails; the next ones go
    // over a new connection.
    let _ = client.put(b"meets the closed connection").await;
    let lease = client.get(id).await.expect("served over a new native connection");
    assert_ne!(
        lease.lease_id(),
        before.lease_id(),
        "a session lease of the closed connection is not handed out again"
    );
    drop(before);
    assert_eq!(
        Sha256::digest(lease.bytes()).to_vec(),
        digest,
        "the sealed payload survived the agent"
    );
    assert!(client.stat(id).await.unwrap().payload_descriptor.unwrap().sealed);
    agent.kill9();
}

#[tokio::test]
async fn native_puts_obey_the_ram_capacity() {
    let dirs = Dirs::new();
    let flags = ["--ram-capacity", "8MiB", "--disk-capacity", "4MiB"];
    let (agent, client) = Agent::start_with(&dirs, &flags).await;
    let mut refused = None;
    for n in 0..6u8 {
        if let Err(err) = put(&client, &pattern(3 << 20, n), Tier::Ram).await {
            refused = Some(err);
            break;
        }
    }
    assert!(
        matches!(refused, Some(ClientError::ResourceExhausted(_))),
        "RAM and disk fill up and a put says so: {refused:?}"
    );
    let stats = client.stats().await.unwrap();
    let ram = stats.tiers.iter().find(|t| t.tier == Tier::Ram as u32).unwrap();
    assert!(ram.reserved_bytes <= ram.capacity_bytes, "{ram:?}");
    agent.kill9();
}

#[tokio::test]
async fn a_keeper_that_dies_is_replaced_and_handed_every_sealed_payload() {
    let dirs = Dirs::new();
    let (agent, client) = Agent::start(&dirs).await;
    let (id, digest) = put(&client, &pattern(50_000, 5), Tier::Ram).await.unwrap();
    let first = common::process::keeper_pids(&dirs);
    assert_eq!(first.len(), 1, "one keeper per state dir");
    common::process::kill_keeper(&dirs);
    eventually("a new keeper took over and holds the payload", || async {
        let now = common::process::keeper_pids(&dirs);
        now.len() == 1 && now != first && memfds_held(now[0]) == 1
    })
    .await;
    // Now the agent dies too: the new keeper must hold the payload.
    drop(client);
    agent.kill9();
    let (agent, client) = Agent::start(&dirs).await;
    let lease = client
        .get(id)
        .await
        .expect("the sealed payload outlived its first keeper and the agent");
    assert_eq!(Sha256::digest(lease.bytes()).to_vec(), digest);
    agent.kill9();
}

#[tokio::test]
async fn a_keeper_killed_under_concurrent_puts_is_replaced_once_and_holds_them_all() {
    let dirs = Dirs::new();
    let (agent, client) = Agent::start(&dirs).await;
    let client = std::sync::Arc::new(client);
    let first = {
        put(&client, &pattern(100, 0), Tier::Ram).await.unwrap();
        common::process::keeper_pids(&dirs)
    };
    let writers: Vec<_> = (0..8u8)
        .map(|w| {
            let client = client.clone();
            tokio::spawn(async move {
                let mut made = Vec::new();
                for n in 0..40u8 {
                    made.push(put(&client, &pattern(3000, w ^ n), Tier::Ram).await.unwrap());
                }
                made
            })
        })
        .collect();
    common::process::kill_keeper(&dirs);
    let mut made = Vec::new();
    for writer in writers {
        made.extend(writer.await.unwrap());
    }
    eventually("one new keeper holds every sealed payload", || async {
        let now = common::process::keeper_pids(&dirs);
        now.len() == 1 && now != first && memfds_held(now[0]) == made.len() + 1
    })
    .await;
    drop(client);
    agent.kill9();
    let (agent, client) = Agent::start(&dirs).await;
    for (id, digest) in &made {
        let lease = client
            .get(*id)
            .await
            .expect("a sealed payload outlived its keeper and the agent");
        assert_eq!(&Sha256::digest(lease.bytes()).to_vec(), digest);
    }
    agent.kill9();
}

#[tokio::test]
async fn a_connection_holds_at_most_its_session_lease_limit() {
    let dirs = Dirs::new();
    let (agent, client) = Agent::start_with(&dirs, &["--max-session-leases", "4"]).await;
    let mut ids = Vec::new();
    for n in 0..5u8 {
        ids.push(put(&client, &pattern(100, n), Tier::Ram).await.unwrap().0);
    }
    let holder = payload_client::Client::connect(dirs.socket().to_str().unwrap())
        .await
        .unwrap();
    // A batch past the limit grants nothing.
    let refused = holder.lease_many(&ids).await;
    assert!(
        matches!(&refused, Err(ClientError::ResourceExhausted(m)) if m.contains("--max-session-leases")),
        "{refused:?}"
    );
    assert_eq!(client.stats().await.unwrap().active_leases, 0);
    let granted: Vec<_> = holder
        .lease_many(&ids[..4])
        .await
        .unwrap()
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let one_more = holder.lease_many(&ids[4..]).await;
    assert!(
        matches!(one_more, Err(ClientError::ResourceExhausted(_))),
        "{one_more:?}"
    );
    // Released leases make room again, and another connection has its own.
    assert_eq!(holder.release_leases(&granted[..1]).await.unwrap(), 1);
    assert!(holder.lease_many(&ids[4..]).await.unwrap()[0].is_ok());
    assert!(client.lease_many(&ids[..4]).await.unwrap().iter().all(Result::is_ok));
    assert_eq!(client.stats().await.unwrap().active_leases, 8);
    agent.kill9();
}

#[tokio::test]
async fn a_batch_refused_part_way_gives_back_what_its_earlier_calls_were_granted() {
    let dirs = Dirs::new();
    // 1,500 ids go in two calls: the first (1,000) fits, the second does not.
    let (agent, client) = Agent::start_with(&dirs, &["--max-session-leases", "1200"]).await;
    let (id, _) = put(&client, b"popular", Tier::Ram).await.unwrap();
    let holder = payload_client::Client::connect(dirs.socket().to_str().unwrap())
        .await
        .unwrap();
    let refused = holder.lease_many(&vec![id; 1500]).await;
    assert!(
        matches!(&refused, Err(ClientError::ResourceExhausted(m)) if m.contains("--max-session-leases")),
        "{refused:?}"
    );
    eventually("the first call's 1,000 leases are released", || async {
        client.stats().await.unwrap().active_leases == 0
    })
    .await;
    // The holder's connection is still open and has its room back.
    let granted = holder.lease_many(&vec![id; 1200]).await.unwrap();
    assert!(granted.iter().all(Result::is_ok));
    client.delete(id, false).await.unwrap_err();
    agent.kill9();
}

#[tokio::test]
async fn many_leases_in_one_call_answer_in_order_and_end_with_the_connection() {
    let dirs = Dirs::new();
    let (agent, client) = Agent::start(&dirs).await;
    let mut ids = Vec::new();
    for n in 0..20u8 {
        ids.push(put(&client, &pattern(1000, n), Tier::Ram).await.unwrap().0);
    }
    let mut asked = ids.clone();
    asked.insert(5, uuid::Uuid::new_v4());
    asked.insert(12, uuid::Uuid::new_v4());
    let holder = payload_client::Client::connect(dirs.socket().to_str().unwrap())
        .await
        .unwrap();
    let granted = holder.lease_many(&asked).await.unwrap();
    assert_eq!(granted.len(), 22);
    for (n, g) in granted.iter().enumerate() {
        assert_eq!(g.is_err(), n == 5 || n == 12, "answer {n}: {g:?}");
    }
    assert!(
        matches!(granted[12], Err(ClientError::NotFound(_))),
        "{:?}",
        granted[12]
    );
    assert_eq!(client.stats().await.unwrap().active_leases, 20);
    // Each lease is on the payload asked for in its place: releasing the
    // 8th answer frees exactly the 8th id asked (ids[6]), no other.
    let eighth = *granted[7].as_ref().unwrap();
    assert_eq!(holder.release_leases(&[eighth]).await.unwrap(), 1);
    client.delete(ids[6], false).await.unwrap();
    for held in [ids[5], ids[7]] {
        assert!(matches!(client.delete(held, false).await, Err(ClientError::Aborted(_))));
    }
    drop(holder);
    eventually("the rest end with the holder's connection", || async {
        client.stats().await.unwrap().active_leases == 0
    })
    .await;
    client.delete(ids[0], false).await.unwrap();
    // Past a native call's 1,000 ids the client splits the list.
    let many = vec![ids[1]; 1500];
    let granted: Vec<_> = client
        .lease_many(&many)
        .await
        .unwrap()
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(client.stats().await.unwrap().active_leases, 1500);
    assert_eq!(client.release_leases(&granted).await.unwrap(), 1500);
    agent.kill9();
}

//! `make bench` (native section) and `make bench-peers`: the data path over
//! the agent's native socket against the floor of any round trip (a raw
//! SOCK_SEQPACKET ping-pong between two processes), a plain memcpy and a
//! plain mmap put, measured in one run. Prints a Markdown table; with
//! PM_BENCH_JSON=PATH also writes the figures as JSON (for bench-peers).

use std::hint::black_box;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

mod support;

use futures_util::{stream, StreamExt};
use payload_client::{Client, PutOptions};
use support::{connect, kill, percentile, spawn};

const SMALL: usize = 4096;
const BIG: usize = 256 << 20;

/// The round-trip floor: 64-byte ping-pong over SOCK_SEQPACKET between this
/// process and a forked child (forked before any runtime or thread exists).
/// Rounds are interleaved with ours, so both meet the same machine state.
struct Floor {
    fd: OwnedFd,
    pid: libc::pid_t,
}

impl Floor {
    fn fork() -> Floor {
        let mut fds = [0i32; 2];
        // SAFETY: socketpair fills two descriptors we then own.
        assert_eq!(
            unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET, 0, fds.as_mut_ptr()) },
            0
        );
        // SAFETY: both are fresh descriptors.
        let (ours, theirs) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: no threads exist yet; the child only reads and writes.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            drop(ours);
            let mut buf = [0u8; 64];
            loop {
                // SAFETY: reads into and writes from a local buffer.
                let n = unsafe { libc::read(theirs.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                if n <= 0 || unsafe { libc::write(theirs.as_raw_fd(), buf.as_ptr().cast(), n as usize) } != n {
                    // SAFETY: the child ends here without running the parent's destructors.
                    unsafe { libc::_exit(0) };
                }
            }
        }
        drop(theirs);
        Floor { fd: ours, pid }
    }

    fn round_trip(&self) -> Duration {
        let mut buf = [0u8; 64];
        let start = Instant::now();
        // SAFETY: as in the child.
        unsafe {
            assert_eq!(libc::write(self.fd.as_raw_fd(), buf.as_ptr().cast(), 64), 64);
            assert_eq!(libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), 64), 64);
        }
        start.elapsed()
    }
}

impl Drop for Floor {
    fn drop(&mut self) {
        // SAFETY: closing our end ends the child; then it is reaped.
        unsafe {
            libc::shutdown(self.fd.as_raw_fd(), libc::SHUT_RDWR);
            libc::waitpid(self.pid, std::ptr::null_mut(), 0);
        }
    }
}

fn p50_us(v: &[Duration]) -> f64 {
    percentile(v, 0.5).as_secs_f64() * 1e6
}

fn p99_us(v: &[Duration]) -> f64 {
    percentile(v, 0.99).as_secs_f64() * 1e6
}

fn sorted(mut v: Vec<Duration>) -> Vec<Duration> {
    v.sort();
    v
}

struct Latencies {
    floor: Vec<Duration>,
    put: Vec<Duration>,
    get: Vec<Duration>,
    repeat_ns: f64,
}

/// Waits until the agent has written the catalog rows of earlier puts
/// (it does so behind them), so what is timed next meets an agent doing
/// only that: on this 2-core VM 5,300 rows keep a core busy for seconds.
async fn quiet(client: &Client) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let backlog = client.stats().await.unwrap().catalog_backlog;
        if backlog == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the agent still has {backlog} catalog rows to write after 120 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One client, one call at a time, each call next to a floor round trip.
async fn latencies(client: &Client, floor: &Floor) -> (Latencies, Vec<payload_client::PayloadId>) {
    let payload = vec![7u8; SMALL];
    let mut ids = Vec::new();
    for _ in 0..300 {
        ids.push(client.put(&payload).await.unwrap());
    }
    let (mut put, mut rtt) = (Vec::new(), Vec::new());
    for _ in 0..5000 {
        rtt.push(floor.round_trip());
        let start = Instant::now();
        ids.push(client.put(&payload).await.unwrap());
        put.push(start.elapsed());
    }
    quiet(client).await;
    let mut get = Vec::new();
    for id in ids.iter().cycle().take(10_000) {
        rtt.push(floor.round_trip());
        let start = Instant::now();
        let lease = client.get(*id).await.unwrap();
        black_box(lease.bytes()[SMALL - 1]);
        drop(lease);
        get.push(start.elapsed());
    }
    // A repeat get of a payload whose lease this client holds.
    let held = client.get(ids[0]).await.unwrap();
    let rounds = 200_000;
    let start = Instant::now();
    for _ in 0..rounds {
        let lease = client.get(ids[0]).await.unwrap();
        black_box(lease.bytes()[0]);
    }
    let repeat_ns = start.elapsed().as_secs_f64() * 1e9 / rounds as f64;
    drop(held);
    (
        Latencies {
            floor: sorted(rtt),
            put: sorted(put),
            get: sorted(get),
            repeat_ns,
        },
        ids,
    )
}

/// Leases per second of one native call leasing 1,000 payloads (median
/// of 20); each batch is released before the next.
async fn batch_leases(client: &Client, ids: &[payload_client::PayloadId]) -> f64 {
    let mut rates = Vec::new();
    for round in 0..20 {
        let batch = &ids[(round * 100) % (ids.len() - 1000)..][..1000];
        let start = Instant::now();
        let granted = client.lease_many(batch).await.unwrap();
        rates.push(1000.0 / start.elapsed().as_secs_f64());
        let leases: Vec<_> = granted.into_iter().map(Result::unwrap).collect();
        client.release_leases(&leases).await.unwrap();
    }
    median(rates)
}

/// Ops/s of one client with `depth` calls in flight on its connection.
async fn pipelined(client: &Client, ids: &[payload_client::PayloadId], depth: usize, n: usize) -> (f64, f64) {
    let payload = vec![9u8; SMALL];
    let start = Instant::now();
    let put: Vec<_> = stream::iter(0..n)
        .map(|_| client.put(&payload))
        .buffer_unordered(depth)
        .collect()
        .await;
    let put_ops = n as f64 / start.elapsed().as_secs_f64();
    let fresh: Vec<_> = put.into_iter().map(Result::unwrap).collect();
    let start = Instant::now();
    let got = stream::iter(ids.iter().chain(&fresh).cycle().take(n))
        .map(|id| async move {
            let lease = client.get(*id).await.unwrap();
            black_box(lease.bytes()[0]);
        })
        .buffer_unordered(depth)
        .count()
        .await;
    let get_ops = got as f64 / start.elapsed().as_secs_f64();
    for id in fresh {
        client.delete(id, true).await.unwrap();
    }
    (put_ops, get_ops)
}

/// Ops/s of `clients` clients, each on its own thread, runtime and
/// connection, with `depth` calls in flight each. Threads start together
/// and the clock runs until the last one is done; the payloads put are
/// deleted after the clock stops.
fn many_clients(
    socket: &Path,
    ids: &[payload_client::PayloadId],
    clients: usize,
    depth: usize,
) -> (f64, f64, Vec<payload_client::PayloadId>) {
    // Within the descriptor budget: every sealed payload holds one.
    let per = 2_000;
    let run = |puts: bool| {
        let barrier = std::sync::Barrier::new(clients + 1);
        let (wall, made) = std::thread::scope(|scope| {
            let threads: Vec<_> = (0..clients)
                .map(|c| {
                    let (ids, barrier) = (&ids[(c * 500) % ids.len()..], &barrier);
                    scope.spawn(move || {
                        let rt = tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                            .unwrap();
                        rt.block_on(async {
                            let client = Client::connect(socket.to_str().unwrap()).await.unwrap();
                            barrier.wait();
                            let made: Vec<_> = if puts {
                                let payload = vec![3u8; SMALL];
                                stream::iter(0..per)
                                    .map(|_| client.put(&payload))
                                    .buffer_unordered(depth)
                                    .map(Result::unwrap)
                                    .collect()
                                    .await
                            } else {
                                stream::iter(ids.iter().cycle().take(per))
                                    .map(|id| {
                                        let client = &client;
                                        async move { black_box(client.get(*id).await.unwrap().bytes()[0]) }
                                    })
                                    .buffer_unordered(depth)
                                    .count()
                                    .await;
                                Vec::new()
                            };
                            (Instant::now(), made)
                        })
                    })
                })
                .collect();
            barrier.wait();
            let start = Instant::now();
            let done: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
            let end = done.iter().map(|(at, _)| *at).max().unwrap();
            let made: Vec<_> = done.into_iter().flat_map(|(_, made)| made).collect();
            (end - start, made)
        });
        (((clients * per) as f64) / wall.as_secs_f64(), made)
    };
    let (get_ops, _) = run(false);
    let (put_ops, made) = run(true);
    (put_ops, get_ops, made)
}

/// A lease and its release from a blocking client with no runtime: what
/// the agent's side of a round trip costs without the client library's.
fn raw_lease_release(socket: &Path, id: payload_client::PayloadId, rounds: usize) -> Vec<Duration> {
    use payload_proto::native::{self as wire, request::Op};
    use prost::Message;
    let fd = wire::connect_fd(&wire::socket_path(socket), false).unwrap();
    let mut buf = vec![0u8; wire::MAX_FRAME];
    let mut lat = Vec::new();
    for n in 0..rounds as u64 {
        let lease = Op::Lease(wire::Lease {
            payload_id: id.as_bytes().to_vec(),
            inline_max_bytes: 1 << 20,
            ..Default::default()
        });
        let start = Instant::now();
        let frame = wire::Request {
            id: n + 1,
            op: Some(lease),
        }
        .encode_to_vec();
        wire::send_frame(fd.as_raw_fd(), &frame, &[]).unwrap();
        let got = wire::recv_frame(fd.as_raw_fd(), &mut buf).unwrap().unwrap();
        lat.push(start.elapsed());
        let response = wire::Response::decode(&buf[..got.len]).unwrap();
        let Some(wire::response::Result::Leased(leased)) = response.result else {
            panic!("lease failed: {:?}", response.error)
        };
        let release = Op::Release(wire::Release {
            lease_ids: leased.lease_id,
        });
        let frame = wire::Request {
            id: n + 1,
            op: Some(release),
        }
        .encode_to_vec();
        wire::send_frame(fd.as_raw_fd(), &frame, &[]).unwrap();
        wire::recv_frame(fd.as_raw_fd(), &mut buf).unwrap().unwrap();
    }
    sorted(lat)
}

fn memcpy_floor(src: &[u8]) -> f64 {
    let mut dst = vec![0u8; src.len()];
    // Fault it in first: the floor is the copy alone.
    dst.iter_mut().step_by(4096).for_each(|b| *b = 1);
    let start = Instant::now();
    dst.copy_from_slice(src);
    black_box(&dst);
    start.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn gib_s(secs: f64) -> f64 {
    BIG as f64 / secs / f64::from(1 << 30)
}

/// 256 MiB: a one-call put (a memfd this client fills) against a plain mmap
/// put, and a copy into an allocated (pre-faulted) region against memcpy.
async fn big(client: &Client, dir: &Path) -> [f64; 4] {
    let src: Vec<u8> = (0..BIG).map(|i| (i * 13) as u8).collect();
    let (mut ours, mut floor, mut copy, mut memcpy) = (vec![], vec![], vec![], vec![]);
    for round in 0..6 {
        if round % 2 == 0 {
            floor.push(support::floor_put(dir, &src));
        }
        let start = Instant::now();
        let desc = client.put_with(&src, &PutOptions::default()).await.unwrap();
        ours.push(start.elapsed().as_secs_f64());
        if round % 2 == 1 {
            floor.push(support::floor_put(dir, &src));
        }
        client
            .delete(payload_client::descriptor_id(&desc).unwrap(), true)
            .await
            .unwrap();

        let mut region = client.allocate_with(BIG as u64, &PutOptions::default()).await.unwrap();
        let start = Instant::now();
        region.as_mut_slice().copy_from_slice(&src);
        copy.push(start.elapsed().as_secs_f64());
        let desc = client.commit(region).await.unwrap();
        client
            .delete(payload_client::descriptor_id(&desc).unwrap(), true)
            .await
            .unwrap();
        memcpy.push(memcpy_floor(&src));
    }
    [median(ours), median(floor), median(copy), median(memcpy)]
}

fn main() {
    let echo = Floor::fork();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let state = tempfile::tempdir().unwrap();
    let ram = tempfile::Builder::new()
        .prefix("pm-bench-")
        .tempdir_in("/dev/shm")
        .unwrap();
    let mut child = spawn(state.path(), ram.path(), "3GiB", &[]);
    let socket = state.path().join("agent.sock");
    let mut rows = Vec::new();
    let mut json = serde_json::Map::new();
    let mut put = |key: &str, value: f64| {
        json.insert(key.into(), serde_json::json!(value));
    };
    rt.block_on(async {
        let client = connect(&socket).await;
        assert!(client.is_native(), "the benchmark measures the native socket");
        let (lat, ids) = latencies(&client, &echo).await;
        let raw = raw_lease_release(&socket, ids[0], 5000);
        rows.push(format!(
            "| raw native lease+release round trip (blocking client, no runtime) | p50 {:.1} µs, p99 {:.1} µs | | |",
            p50_us(&raw),
            p99_us(&raw)
        ));
        let (put_p50, get_p50) = (p50_us(&lat.put), p50_us(&lat.get));
        let floor = &lat.floor;
        let floor_p50 = p50_us(floor);
        rows.push(format!(
            "| round-trip floor: 64 B ping-pong, SOCK_SEQPACKET, 2 processes (next to each call below) | p50 {floor_p50:.1} µs, p99 {:.1} µs | the floor | |",
            p99_us(floor)
        ));
        rows.push(format!(
            "| 4 KiB put (one call) | p50 {put_p50:.1} µs, p99 {:.1} µs | floor + {:.1} µs | ≤ floor + 35 µs {} |",
            p99_us(&lat.put),
            put_p50 - floor_p50,
            mark(put_p50 <= floor_p50 + 35.0)
        ));
        rows.push(format!(
            "| 4 KiB get, lease not held (one call, bytes inline) | p50 {get_p50:.1} µs, p99 {:.1} µs | {:.2}× floor | ≤ 1.2× {} |",
            p99_us(&lat.get),
            get_p50 / floor_p50,
            mark(get_p50 <= 1.2 * floor_p50)
        ));
        rows.push(format!(
            "| 4 KiB get, lease held (no call) | {:.0} ns | | < 2 µs {} |",
            lat.repeat_ns,
            mark(lat.repeat_ns < 2000.0)
        ));
        put("floor_rtt_p50_us", floor_p50);
        put("put_4k_p50_us", put_p50);
        put("put_4k_p99_us", p99_us(&lat.put));
        put("get_4k_p50_us", get_p50);
        put("get_4k_p99_us", p99_us(&lat.get));
        put("get_4k_held_ns", lat.repeat_ns);

        quiet(&client).await;
        let rate = batch_leases(&client, &ids).await;
        rows.push(format!(
            "| batch lease of 1,000 payloads (one native call, session leases) | {rate:.0} leases/s (median of 20) | | ≥ 1,000,000/s {} |",
            mark(rate >= 1_000_000.0)
        ));
        put("batch_lease_per_s", rate);
        let (put_ops, get_ops) = pipelined(&client, &ids, 64, 8_000).await;
        rows.push(format!("| 4 KiB put, 1 client, 64 in flight | {put_ops:.0} ops/s | | |"));
        rows.push(format!("| 4 KiB get, 1 client, 64 in flight | {get_ops:.0} ops/s | | |"));
        put("put_4k_ops", put_ops);
        put("get_4k_ops", get_ops);
        let (put4, get4, made) = many_clients(&socket, &ids, 4, 16);
        for id in made {
            client.delete(id, true).await.unwrap();
        }
        rows.push(format!("| 4 KiB put, 4 clients, 16 in flight each | {put4:.0} ops/s | | |"));
        rows.push(format!("| 4 KiB get, 4 clients, 16 in flight each | {get4:.0} ops/s | | |"));
        put("put_4k_ops_4c", put4);
        put("get_4k_ops_4c", get4);

        let [ours, floor_put, copy, memcpy] = big(&client, ram.path()).await;
        rows.push(format!(
            "| 256 MiB put (one call, client-filled memfd) | {:.2} GiB/s | plain mmap put {:.2} GiB/s: {:.2}× | ≥ 0.9× {} |",
            gib_s(ours),
            gib_s(floor_put),
            floor_put / ours,
            mark(floor_put / ours >= 0.9)
        ));
        rows.push(format!(
            "| 256 MiB copy into an allocated (pre-faulted) region | {:.2} GiB/s | memcpy {:.2} GiB/s: {:.2}× | ≥ 0.8× {} |",
            gib_s(copy),
            gib_s(memcpy),
            memcpy / copy,
            mark(memcpy / copy >= 0.8)
        ));
        put("put_256m_gibs", gib_s(ours));
        put("put_256m_floor_gibs", gib_s(floor_put));
    });
    // The multi-thread client: the same latencies through its I/O thread.
    let mt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (lat, _) = mt.block_on(async {
        let client = Client::connect(socket.to_str().unwrap()).await.unwrap();
        latencies(&client, &echo).await
    });
    rows.push(format!(
        "| 4 KiB put, multi-thread client | p50 {:.1} µs, p99 {:.1} µs | | |",
        p50_us(&lat.put),
        p99_us(&lat.put)
    ));
    rows.push(format!(
        "| 4 KiB get, multi-thread client | p50 {:.1} µs, p99 {:.1} µs | | |",
        p50_us(&lat.get),
        p99_us(&lat.get)
    ));
    put("put_4k_p50_us_mt", p50_us(&lat.put));
    put("get_4k_p50_us_mt", p50_us(&lat.get));
    drop(echo);
    kill(&mut child);
    println!("| benchmark (native socket) | figure | against the floor | target |");
    println!("|---|---|---|---|");
    for row in rows {
        println!("{row}");
    }
    if let Ok(path) = std::env::var("PM_BENCH_JSON") {
        if let Some(dir) = Path::new(&path).parent() {
            std::fs::create_dir_all(dir).unwrap();
        }
        std::fs::write(&path, serde_json::to_string_pretty(&json).unwrap()).unwrap();
    }
}

fn mark(ok: bool) -> &'static str {
    if ok {
        "✔"
    } else {
        "✘"
    }
}

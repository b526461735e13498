//! `make bench`: the standalone node measured against the floor on the same
//! machine in the same run. Prints a Markdown report (copy it into
//! docs/benchmarks.md). Scale with PM_BENCH_PAYLOADS (default 1,000,000);
//! run some sections only with PM_BENCH_ONLY=big,small,scale.

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

mod support;

use std::time::{Duration, Instant};
use support::{connect, floor_put, kill, percentile, scale, spawn, wanted};

use payload_catalog::{PayloadId, PayloadRecord, PayloadState, Repository, SqliteRepository, Tier, Write};
use payload_client::{Client, PutOptions};
use payload_proto::{core as pb, runtime};
use sha2::Digest;

const MIB: usize = 1 << 20;
const BIG: usize = 256 * MIB;

struct Agent {
    child: Child,
    state: tempfile::TempDir,
    _ram: Option<tempfile::TempDir>,
}

impl Agent {
    async fn start(ram_root: Option<&Path>) -> (Agent, Client) {
        let state = tempfile::tempdir().unwrap();
        let ram = match ram_root {
            Some(_) => None,
            None => Some(
                tempfile::Builder::new()
                    .prefix("pm-bench-")
                    .tempdir_in("/dev/shm")
                    .unwrap(),
            ),
        };
        let ram_path: PathBuf = ram_root
            .map(Path::to_path_buf)
            .unwrap_or_else(|| ram.as_ref().unwrap().path().into());
        let child = spawn(state.path(), &ram_path, "2GiB", &[]);
        let client = connect(&state.path().join("agent.sock")).await;
        (
            Agent {
                child,
                state,
                _ram: ram,
            },
            client,
        )
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Reads every byte (as u64 words) so the pages are really touched.
fn read_all(bytes: &[u8]) -> u64 {
    let (head, words, tail) = unsafe { bytes.align_to::<u64>() };
    let mut acc = 0u64;
    for w in words {
        acc = acc.wrapping_add(*w);
    }
    acc.wrapping_add(head.len() as u64 + tail.len() as u64)
}

fn gib_s(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / secs / (1u64 << 30) as f64
}

async fn big_transfers(report: &mut Vec<String>, label: &str, ram_root: Option<&Path>) {
    let (agent, client) = Agent::start(ram_root).await;
    let floor_dir = ram_root
        .map(Path::to_path_buf)
        .unwrap_or_else(|| agent._ram.as_ref().unwrap().path().into());
    let src: Vec<u8> = (0..BIG).map(|i| (i * 7) as u8).collect();
    let (mut floor, mut ours) = (Vec::new(), Vec::new());
    let mut ids = Vec::new();
    // Both sides free their pages before the next round, so each writes into
    // memory the other just released. (In a VM, never-touched guest memory
    // costs host page faults; whoever kept its pages would make the other
    // look slow.)
    // Alternating who goes first evens out the rest (page compaction, reclaim).
    for round in 0..7 {
        if round % 2 == 0 {
            floor.push(floor_put(&floor_dir, &src));
        }
        let start = Instant::now();
        let desc = client.put_with(&src, &PutOptions::default()).await.unwrap();
        ours.push(start.elapsed().as_secs_f64());
        if round % 2 == 1 {
            floor.push(floor_put(&floor_dir, &src));
        }
        let id = payload_client::descriptor_id(&desc).unwrap();
        if round < 6 {
            client.delete(id, false).await.unwrap();
        } else {
            ids.push(id);
        }
    }
    let (floor_put_s, put_s) = (median(floor), median(ours));
    // Floor read: a region already mapped. Ours: lease + cached mapping + read + release.
    let warm = client.get(ids[0]).await.unwrap();
    let (mut floor, mut ours) = (Vec::new(), Vec::new());
    for _ in 0..7 {
        let start = Instant::now();
        black_box(read_all(warm.bytes()));
        floor.push(start.elapsed().as_secs_f64());
        let start = Instant::now();
        let lease = client.get(ids[0]).await.unwrap();
        black_box(read_all(lease.bytes()));
        drop(lease);
        ours.push(start.elapsed().as_secs_f64());
    }
    drop(warm);
    let (floor_get_s, get_s) = (median(floor), median(ours));
    report.push(format!(
        "| 256 MiB put ({label}) | {:.2} GiB/s | {:.2} GiB/s | {:.2}× |",
        gib_s(BIG, put_s),
        gib_s(BIG, floor_put_s),
        floor_put_s / put_s
    ));
    report.push(format!(
        "| 256 MiB get+read ({label}) | {:.2} GiB/s | {:.2} GiB/s | {:.2}× |",
        gib_s(BIG, get_s),
        gib_s(BIG, floor_get_s),
        floor_get_s / get_s
    ));
    for id in ids {
        client.delete(id, true).await.unwrap();
    }
    drop(client);
    drop(agent);
}

/// Put and get latencies of one client, plus the bare RPC floor.
async fn single_client(client: &Client, ids: &mut Vec<payload_client::PayloadId>) -> [Vec<Duration>; 3] {
    let payload = vec![7u8; 4096];
    let (mut puts, mut gets, mut rpcs) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..200 {
        ids.push(client.put(&payload).await.unwrap()); // warm-up
    }
    for _ in 0..5000 {
        let start = Instant::now();
        ids.push(client.put(&payload).await.unwrap());
        puts.push(start.elapsed());
    }
    for id in ids.iter().cycle().take(10_000) {
        let start = Instant::now();
        let lease = client.get(*id).await.unwrap();
        black_box(read_all(lease.bytes()));
        drop(lease);
        gets.push(start.elapsed());
    }
    // The floor of any call: one unary RPC that only reads memory.
    let (mut data, _, _) = client.raw();
    for id in ids.iter().take(5000) {
        let start = Instant::now();
        let request = runtime::ResolveSnapshotRequest {
            id: Some(pb::PayloadId {
                value: id.as_bytes().to_vec(),
            }),
        };
        data.resolve_snapshot(request).await.unwrap();
        rpcs.push(start.elapsed());
    }
    for v in [&mut puts, &mut gets, &mut rpcs] {
        v.sort();
    }
    [rpcs, puts, gets]
}

fn latency_row(what: &str, v: &[Duration]) -> String {
    let total: Duration = v.iter().sum();
    format!(
        "| {what} | p50 {:.0} µs, p99 {:.0} µs | {:.0} ops/s |",
        percentile(v, 0.5).as_secs_f64() * 1e6,
        percentile(v, 0.99).as_secs_f64() * 1e6,
        v.len() as f64 / total.as_secs_f64()
    )
}

async fn small_ops(report: &mut Vec<String>) {
    let (agent, client) = Agent::start(None).await;
    let mut ids = Vec::new();
    let [rpcs, puts, gets] = single_client(&client, &mut ids).await;
    report.push(latency_row(
        "ResolveSnapshot (one RPC, the floor), current-thread client",
        &rpcs,
    ));
    report.push(latency_row("4 KiB put, 1 client, current-thread runtime", &puts));
    report.push(latency_row("4 KiB get, 1 client, current-thread runtime", &gets));

    // The same client on a multi-threaded runtime pays cross-thread wake-ups.
    let socket = agent.state.path().join("agent.sock");
    let [rpcs, puts, gets] = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    let client = Client::connect(socket.to_str().unwrap()).await.unwrap();
                    single_client(&client, &mut Vec::new()).await
                })
            })
            .join()
            .unwrap()
    });
    report.push(latency_row(
        "ResolveSnapshot (one RPC, the floor), multi-thread client",
        &rpcs,
    ));
    report.push(latency_row("4 KiB put, 1 client, multi-thread runtime", &puts));
    report.push(latency_row("4 KiB get, 1 client, multi-thread runtime", &gets));

    // Many clients, each on its own connection.
    for clients in [4usize, 16] {
        let start = Instant::now();
        let mut tasks = Vec::new();
        for c in 0..clients {
            let socket = socket.clone();
            let ids = ids.clone();
            tasks.push(tokio::spawn(async move {
                let client = Client::connect(socket.to_str().unwrap()).await.unwrap();
                let mut lat = Vec::new();
                for id in ids.iter().skip(c * 100).take(2000) {
                    let t = Instant::now();
                    let lease = client.get(*id).await.unwrap();
                    black_box(read_all(lease.bytes()));
                    drop(lease);
                    lat.push(t.elapsed());
                }
                lat
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        let wall = start.elapsed().as_secs_f64();
        all.sort();
        report.push(format!(
            "| 4 KiB get, {clients} clients | p50 {:.0} µs, p99 {:.0} µs | {:.0} ops/s |",
            percentile(&all, 0.5).as_secs_f64() * 1e6,
            percentile(&all, 0.99).as_secs_f64() * 1e6,
            all.len() as f64 / wall
        ));
    }

    // Batch acquire of 1,000 leases in one call.
    let (mut data, _, _) = client.raw();
    let mut rates = Vec::new();
    for round in 0..10 {
        let requests = ids[round * 100..round * 100 + 1000]
            .iter()
            .map(|id| runtime::AcquireReadLeaseRequest {
                id: Some(pb::PayloadId {
                    value: id.as_bytes().to_vec(),
                }),
                ..Default::default()
            })
            .collect();
        let start = Instant::now();
        let got = data
            .batch_acquire_read_lease(runtime::BatchAcquireReadLeaseRequest { requests })
            .await
            .unwrap()
            .into_inner();
        rates.push(1000.0 / start.elapsed().as_secs_f64());
        let lease_ids = got
            .results
            .into_iter()
            .filter_map(|r| r.lease.and_then(|l| l.lease_id))
            .collect();
        data.batch_release_lease(runtime::BatchReleaseLeaseRequest { lease_ids })
            .await
            .unwrap();
    }
    report.push(format!(
        "| batch acquire of 1,000 leases | {:.0} leases/s (median of 10) | |",
        median(rates)
    ));
    drop((data, client));
    drop(agent);
}

/// Seeds `n` committed 1-byte RAM payloads straight into a catalog and shm
/// directory (what a long-running node would hold), then starts an agent on them.
async fn at_scale(report: &mut Vec<String>, n: usize) {
    let state = tempfile::tempdir().unwrap();
    let ram = tempfile::Builder::new()
        .prefix("pm-bench-scale-")
        .tempdir_in("/dev/shm")
        .unwrap();
    let repo = SqliteRepository::open(&state.path().join("catalog.db")).await.unwrap();
    // The agent names its regions after the node id it keeps in its state dir.
    let node_id = "0123456789abcdef";
    std::fs::write(state.path().join("node-id"), node_id).unwrap();
    let seed_start = Instant::now();
    let one_byte_digest: [u8; 32] = sha2::Sha256::digest([1u8]).into();
    let now = 1_700_000_000_000u64;
    for chunk in 0..n.div_ceil(10_000) {
        let mut writes = Vec::new();
        for i in chunk * 10_000..((chunk + 1) * 10_000).min(n) {
            let id = PayloadId::random();
            std::fs::write(ram.path().join(format!("pm-{node_id}-{id}")), [1u8]).unwrap();
            writes.push(Write::Insert(PayloadRecord {
                state: PayloadState::Active,
                labels: [("shard".to_string(), (i % 100).to_string())].into(),
                sha256: Some(one_byte_digest),
                version: 2,
                ..PayloadRecord::allocated(id, Tier::Ram, 1, now + i as u64)
            }));
        }
        repo.write_batch(&writes).await.unwrap();
    }
    drop(repo);
    let seed_s = seed_start.elapsed().as_secs_f64();

    let empty_state = tempfile::tempdir().unwrap();
    let empty_ram = tempfile::Builder::new()
        .prefix("pm-bench-empty-")
        .tempdir_in("/dev/shm")
        .unwrap();
    let mut empty = spawn(empty_state.path(), empty_ram.path(), "2GiB", &[]);
    let _ = connect(&empty_state.path().join("agent.sock")).await;
    let empty_rss = rss_kib(empty.id());
    kill(&mut empty);

    let start = Instant::now();
    let mut child = spawn(state.path(), ram.path(), "8GiB", &[]);
    let client = connect(&state.path().join("agent.sock")).await;
    let startup_s = start.elapsed().as_secs_f64();
    let loaded_rss = rss_kib(child.id());
    let per_payload = (loaded_rss.saturating_sub(empty_rss)) as f64 * 1024.0 / n as f64;

    // Pages of 100 through the first 50 pages, then a filtered page.
    let mut lat = Vec::new();
    let mut token = String::new();
    for _ in 0..50 {
        let t = Instant::now();
        let page = client
            .list(runtime::ListPayloadsRequest {
                page_size: 100,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
        lat.push(t.elapsed());
        token = page.next_page_token;
    }
    lat.sort();
    let t = Instant::now();
    let filtered = client
        .list(runtime::ListPayloadsRequest {
            page_size: 100,
            label_selector: "shard=7".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let filtered_ms = t.elapsed().as_secs_f64() * 1e3;

    // Live leases: 100,000 of them, in batches.
    let leases_n = 100_000.min(n);
    let ids: Vec<_> = client
        .list(runtime::ListPayloadsRequest {
            page_size: 500,
            ..Default::default()
        })
        .await
        .unwrap()
        .payloads
        .into_iter()
        .map(|p| p.id.unwrap())
        .collect();
    let before = rss_kib(child.id());
    let (mut data, _, _) = client.raw();
    for batch in 0..leases_n / 1000 {
        let requests = (0..1000)
            .map(|i| runtime::AcquireReadLeaseRequest {
                id: Some(ids[(batch * 1000 + i) % ids.len()].clone()),
                min_lease_duration_ms: 120_000,
                ..Default::default()
            })
            .collect();
        data.batch_acquire_read_lease(runtime::BatchAcquireReadLeaseRequest { requests })
            .await
            .unwrap();
    }
    let per_lease = rss_kib(child.id()).saturating_sub(before) as f64 * 1024.0 / leases_n as f64;

    report.push(format!(
        "| seeding {n} payloads (catalog rows + shm files) | {seed_s:.1} s | |"
    ));
    report.push(format!(
        "| agent start-up (recovery) with {n} payloads | {startup_s:.1} s | |"
    ));
    report.push(format!(
        "| agent memory per stored payload | {per_payload:.0} B | RSS {empty_rss} KiB empty → {loaded_rss} KiB |"
    ));
    report.push(format!(
        "| agent memory per live lease | {per_lease:.0} B | {leases_n} leases |"
    ));
    report.push(format!(
        "| ListPayloads page of 100 at {n} | p50 {:.2} ms, p99 {:.2} ms | first 50 pages |",
        percentile(&lat, 0.5).as_secs_f64() * 1e3,
        percentile(&lat, 0.99).as_secs_f64() * 1e3
    ));
    report.push(format!(
        "| ListPayloads with label selector at {n} | {filtered_ms:.1} ms | total {} |",
        filtered.total_count
    ));
    drop((data, client));
    kill(&mut child);
}

/// A tmpfs with transparent huge pages under /dev/shm, if this machine lets us mount one.
fn mount_huge() -> Option<tempfile::TempDir> {
    let dir = tempfile::Builder::new()
        .prefix("pm-bench-huge-")
        .tempdir_in("/dev/shm")
        .ok()?;
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2G,huge=always", "tmpfs"])
        .arg(dir.path())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    ok.then_some(dir)
}

fn main() {
    // `cargo bench` passes --bench; nothing to parse.
    let n = scale();
    // Clients measured on a current-thread runtime unless a row says otherwise.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut report = vec![
            "| benchmark | ours | floor | ratio (ours/floor speed) |".to_string(),
            "|---|---|---|---|".to_string(),
        ];
        if wanted("big") {
            big_transfers(&mut report, "/dev/shm", None).await;
            match mount_huge() {
                Some(dir) => {
                    big_transfers(&mut report, "tmpfs huge=always", Some(dir.path())).await;
                    let _ = Command::new("umount").arg(dir.path()).status();
                }
                None => {
                    report.push("| 256 MiB put/get (tmpfs huge=always) | skipped: cannot mount tmpfs here | | |".into())
                }
            }
        }
        report.push(String::new());
        report.push("| latency benchmark | figure | throughput / note |".into());
        report.push("|---|---|---|".into());
        if wanted("small") {
            small_ops(&mut report).await;
        }
        if wanted("scale") {
            at_scale(&mut report, n).await;
        }
        println!("{}", report.join("\n"));
    });
}

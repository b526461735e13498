//! What both benchmark programs need: an agent process and a client on it.

#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use payload_client::Client;

/// Starts `payload-agent standalone` on `state` with its RAM tier in `ram`;
/// `extra` adds flags (a `--catalog`, a `--node-name`).
pub fn spawn(state: &Path, ram: &Path, ram_capacity: &str, extra: &[&str]) -> Child {
    spawn_mode("standalone", state, ram, ram_capacity, extra)
}

/// As [`spawn`], as `payload-agent MODE` (`node`, say).
pub fn spawn_mode(mode: &str, state: &Path, ram: &Path, ram_capacity: &str, extra: &[&str]) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_payload-agent"));
    // PM_BENCH_AGENT_THREADS: the agent's worker threads (its --worker-threads).
    if let Ok(threads) = std::env::var("PM_BENCH_AGENT_THREADS") {
        cmd.arg("--worker-threads").arg(threads);
    }
    cmd.arg(mode)
        .arg("--state-dir")
        .arg(state)
        .arg("--ram-root")
        .arg(ram)
        .args([
            "--listen",
            "off",
            "--disk-capacity",
            "4GiB",
            "--ram-capacity",
            ram_capacity,
        ])
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("agent starts")
}

pub fn kill(child: &mut Child) {
    // SAFETY: plain kill(2) on our own child. SIGKILL: a graceful drain would
    // wait for this process's idle connections, which cannot close while it blocks here.
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    let _ = child.wait();
}

pub async fn connect(socket: &Path) -> Client {
    for _ in 0..30_000 {
        if let Ok(client) = Client::connect(socket.to_str().unwrap()).await {
            if client.stats().await.is_ok() {
                return client;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("agent did not start");
}

pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Whether a section runs: all of them unless PM_BENCH_ONLY lists some.
pub fn wanted(section: &str) -> bool {
    let only = std::env::var("PM_BENCH_ONLY").unwrap_or_default();
    only.is_empty() || only.split(',').any(|s| s.trim() == section)
}

/// How many payloads the at-scale sections seed: PM_BENCH_PAYLOADS, else a million.
pub fn scale() -> usize {
    std::env::var("PM_BENCH_PAYLOADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000)
}

/// The floor for a put: mmap + copy into a fresh file under `dir`.
pub fn floor_put(dir: &Path, src: &[u8]) -> f64 {
    let path = dir.join(format!("floor-{}", uuid::Uuid::new_v4()));
    let start = Instant::now();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .unwrap();
    file.set_len(src.len() as u64).unwrap();
    // SAFETY: a private file of this benchmark.
    let mut map = unsafe { memmap2::MmapOptions::new().map_mut(&file).unwrap() };
    map.copy_from_slice(src);
    drop(map);
    let secs = start.elapsed().as_secs_f64();
    std::fs::remove_file(path).unwrap();
    secs
}

/// Starts `payload-operator catalog --auth none` on 127.0.0.1:`port` for
/// `database` (the release build beside the agent's).
pub fn operator(database: &str, port: u16) -> Child {
    let bin = Path::new(env!("CARGO_BIN_EXE_payload-agent")).with_file_name("payload-operator");
    assert!(
        bin.exists(),
        "build it first: cargo build --release -p payload-operator"
    );
    Command::new(bin)
        .args(["catalog", "--auth", "none", "--database", database])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env("RUST_LOG", "warn")
        .spawn()
        .expect("the operator starts")
}

//! Node hardening with real processes and real filesystems: agents sharing
//! one host, a catalog that is locked or down, filesystems that are full
//! or smaller than the configured capacity, private files, and the fsync
//! order of a `sync` commit. Nothing acknowledged may be lost; refusals are
//! RESOURCE_EXHAUSTED or UNAVAILABLE, never SIGBUS or a silent drop.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::process::*;
use common::tmpfs::Tmpfs;
use common::*;
use payload_client::{ClientError, PutOptions, Tier};
use sqlx::Connection as _;

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_agents_sharing_dev_shm_with_default_flags_never_touch_each_others_files() {
    let dirs: Vec<Dirs> = (0..3).map(|_| Dirs::new()).collect();
    // One RAM root for all three, as /dev/shm is on a real host.
    let shared = dirs[0].ram.path().display().to_string();
    // A region of an agent from before node ids, and a stranger's file:
    // nobody may remove either.
    let legacy = dirs[0].ram.path().join(format!("pm-{}", uuid::Uuid::new_v4()));
    let stranger = dirs[0].ram.path().join("pm-not-ours");
    std::fs::write(&legacy, b"old").unwrap();
    std::fs::write(&stranger, b"x").unwrap();
    let flags = ["--ram-root", shared.as_str()];
    let mut acked = Vec::new();
    let mut agents = Vec::new();
    for (i, d) in dirs.iter().enumerate() {
        let (agent, _) = Agent::start_with(d, &flags).await;
        // Named regions in the shared root are what this test is about.
        let client = v1(d).await;
        let mut mine = Vec::new();
        for n in 0..4u8 {
            mine.push(put(&client, &pattern(8192, n + 10 * i as u8), Tier::Ram).await.unwrap());
        }
        acked.push(mine);
        agents.push(agent);
    }
    // Each crashes and recovers in turn (its orphan sweep runs) while the
    // others hold regions in the same root.
    for (agent, d) in agents.into_iter().zip(&dirs) {
        agent.kill9();
        Agent::start_with(d, &flags).await.0.kill9();
    }
    for (i, d) in dirs.iter().enumerate() {
        let (agent, _) = Agent::start_with(d, &flags).await;
        // Named regions in the shared root are what this test is about.
        let client = v1(d).await;
        assert_served(&client, &acked[i]).await;
        let node = d.node_id();
        let on_shm: Vec<_> = Dirs::files_in(dirs[0].ram.path())
            .into_iter()
            .filter(|f| f.starts_with(&format!("pm-{node}-")))
            .collect();
        assert_eq!(on_shm.len(), acked[i].len(), "agent {i} has exactly its own regions");
        agent.kill9();
    }
    let ids: std::collections::HashSet<_> = dirs.iter().map(Dirs::node_id).collect();
    assert_eq!(ids.len(), 3, "every state dir has its own node id");
    assert!(
        legacy.exists() && stranger.exists(),
        "files no agent can prove it made are left alone"
    );
}

#[tokio::test]
async fn a_second_agent_on_the_same_state_dir_is_refused_and_a_restart_after_sigkill_is_not() {
    let dirs = Dirs::new();
    let (first, _client) = Agent::start(&dirs).await;
    let other_socket = dirs.state.path().join("other.sock").display().to_string();
    let log = Agent::refused(&dirs, &["--socket", &other_socket]);
    assert!(
        log.contains("another payload-agent is running on the state dir"),
        "{log}"
    );
    first.kill9();
    let (again, _client) = Agent::start(&dirs).await;
    again.kill9();
}

#[tokio::test]
async fn state_files_and_the_socket_are_private() {
    let dirs = Dirs::new();
    std::fs::set_permissions(dirs.state.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (agent, client) = Agent::start(&dirs).await;
    put(&client, b"private", Tier::Ram).await.unwrap();
    let state = dirs.state.path();
    assert_eq!(mode(state), 0o700, "the state dir is tightened");
    for name in [
        "catalog.db",
        "catalog.log",
        "leases.journal",
        "node-id",
        "agent.lock",
        "agent.sock",
    ] {
        assert_eq!(mode(&state.join(name)), 0o600, "{name}");
    }
    agent.kill9();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_sqlite_catalog_loses_no_acknowledged_commit() {
    let dirs = Dirs::new();
    let (agent, client) = Agent::start(&dirs).await;
    let mut locker = lock_sqlite(&dirs.state.path().join("catalog.db")).await;
    let mut acked = Vec::new();
    for i in 0..3u8 {
        acked.push(put(&client, &pattern(4096, i), Tier::Ram).await.unwrap());
    }
    // Locked past every timeout (a 5 s transaction limit, SQLite's 10 s busy wait).
    wait_for_log(&dirs, "catalog write failed").await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    acked.push(
        put(&client, b"while the catalog has been locked for 11 s", Tier::Ram)
            .await
            .unwrap(),
    );
    agent.kill9();
    drop(client);
    // Still locked: start-up cannot replay its log, so it refuses and keeps it.
    let log_before = std::fs::read(dirs.state.path().join("catalog.log")).unwrap();
    assert!(!log_before.is_empty(), "the commits wait in the log");
    let refused = Agent::refused(&dirs, &[]);
    assert!(refused.contains("they are kept there"), "{refused}");
    assert_eq!(
        std::fs::read(dirs.state.path().join("catalog.log")).unwrap(),
        log_before
    );

    sqlx::query("ROLLBACK").execute(&mut locker).await.unwrap();
    drop(locker);
    let (agent, client) = Agent::start(&dirs).await;
    assert_served(&client, &acked).await;
    assert_eq!(assert_no_orphans(&dirs, &client).await, acked.len());

    // Locked again while the agent runs, then released: it drains by itself.
    let mut locker = lock_sqlite(&dirs.state.path().join("catalog.db")).await;
    acked.push(put(&client, b"logged while locked", Tier::Ram).await.unwrap());
    wait_for_backlog(&client, |n| n > 0).await;
    sqlx::query("ROLLBACK").execute(&mut locker).await.unwrap();
    drop(locker);
    wait_for_backlog(&client, |n| n == 0).await;
    agent.kill9();
    let (agent, client) = Agent::start(&dirs).await;
    assert_served(&client, &acked).await;
    agent.kill9();
}

async fn wait_for_log(dirs: &Dirs, text: &str) {
    eventually(&format!("the agent logs {text:?}"), || async {
        dirs.read_log().contains(text)
    })
    .await;
}

async fn wait_for_backlog(client: &payload_client::Client, done: impl Fn(u64) -> bool) {
    eventually("the catalog backlog reaches the expected size", || async {
        done(client.stats().await.unwrap().catalog_backlog)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_outage_mid_stream_loses_no_acknowledged_commit_and_refuses_past_the_backlog() {
    let cluster = match payload_catalog::testing::PgCluster::start() {
        Ok(cluster) => cluster,
        Err(err) if std::env::var_os("CI").is_some() => panic!("PostgreSQL is required in CI: {err}"),
        Err(err) => return eprintln!("SKIPPED: no PostgreSQL ({err})"),
    };
    let url = payload_catalog::testing::create_database(&cluster.url()).await.unwrap();
    let dirs = Dirs::new();
    let flags = ["--catalog", url.as_str(), "--node-name", "a", "--catalog-backlog", "40"];
    let (agent, client) = Agent::start_with(&dirs, &flags).await;
    let mut acked = Vec::new();
    for i in 0..10u8 {
        acked.push(put(&client, &pattern(4096, i), Tier::Ram).await.unwrap());
    }
    cluster.pause().unwrap();
    let mut refused = None;
    for i in 0..200u32 {
        match put(&client, &pattern(4096, i as u8), Tier::Ram).await {
            Ok(done) => acked.push(done),
            Err(ClientError::Unavailable(msg)) => {
                refused = Some(msg);
                break;
            }
            Err(err) => panic!("an outage must answer UNAVAILABLE, not {err}"),
        }
    }
    let refused = refused.expect("past the backlog new payloads are refused");
    assert!(refused.contains("catalog"), "{refused}");
    assert!(acked.len() > 10, "writes were acknowledged while the catalog was down");
    cluster.resume().unwrap();
    // The writer catches up by itself; new payloads are taken again.
    let again = loop {
        match put(&client, b"after the outage", Tier::Ram).await {
            Ok(done) => break done,
            Err(ClientError::Unavailable(_)) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(err) => panic!("{err}"),
        }
    };
    acked.push(again);
    agent.kill9();
    let (agent, client) = Agent::start_with(&dirs, &flags).await;
    assert_served(&client, &acked).await;
    assert_eq!(assert_no_orphans(&dirs, &client).await, acked.len());
    agent.kill9();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_root_answers_resource_exhausted_instead_of_sigbus() {
    let Some(fs) = Tmpfs::mount(&std::env::temp_dir(), 16 << 20) else {
        return;
    };
    let dirs = Dirs::new();
    let root = fs.path().display().to_string();
    // More than the filesystem holds: refused at start-up, with the numbers.
    let refused = Agent::refused(&dirs, &["--disk-root", &root, "--disk-capacity", "64MiB"]);
    assert!(refused.contains("larger than the filesystem"), "{refused}");

    let flags = ["--disk-root", root.as_str(), "--disk-capacity", "12MiB"];
    let (agent, client) = Agent::start_with(&dirs, &flags).await;
    let first = put(&client, &pattern(1 << 20, 1), Tier::Disk).await.unwrap();
    // Someone else fills the filesystem: the tier's books say 11 MiB free, the disk says 2.
    fs.fill(2 << 20);
    let err = put(&client, &pattern(6 << 20, 2), Tier::Disk).await.unwrap_err();
    assert!(matches!(err, ClientError::ResourceExhausted(_)), "{err}");
    let small = put(&client, &pattern(512 << 10, 3), Tier::Disk).await.unwrap();
    agent.kill9();
    let (agent, client) = Agent::start_with(&dirs, &flags).await;
    assert_served(&client, &[first, small]).await;
    agent.kill9();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ram_root_smaller_than_its_capacity_is_refused_and_a_full_one_answers_resource_exhausted() {
    let Some(fs) = Tmpfs::mount(std::path::Path::new("/dev/shm"), 16 << 20) else {
        return;
    };
    let dirs = Dirs::new();
    let root = fs.path().display().to_string();
    let refused = Agent::refused(&dirs, &["--ram-root", &root, "--ram-capacity", "64MiB"]);
    assert!(refused.contains("larger than the filesystem"), "{refused}");
    let flags = ["--ram-root", root.as_str(), "--ram-capacity", "12MiB"];
    let (agent, _) = Agent::start_with(&dirs, &flags).await;
    // Named regions in the shared root are what this test is about.
    let client = v1(&dirs).await;
    let first = put(&client, &pattern(1 << 20, 4), Tier::Ram).await.unwrap();
    fs.fill(2 << 20);
    let err = put(&client, &pattern(6 << 20, 5), Tier::Ram).await.unwrap_err();
    assert!(matches!(err, ClientError::ResourceExhausted(_)), "{err}");
    assert_served(&client, &[first]).await;
    agent.kill9();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_state_dir_refuses_new_payloads_and_keeps_the_acknowledged_ones() {
    let Some(fs) = Tmpfs::mount(&std::env::temp_dir(), 4 << 20) else {
        return;
    };
    let dirs = Dirs::new();
    let state = fs.path().join("state");
    let state_arg = state.display().to_string();
    let disk = dirs.disk().display().to_string();
    let flags = [
        "--state-dir",
        state_arg.as_str(),
        "--disk-root",
        disk.as_str(),
        "--socket",
    ];
    let socket = dirs.socket().display().to_string();
    let flags: Vec<&str> = flags.iter().copied().chain([socket.as_str()]).collect();
    let (agent, client) = Agent::start_with(&dirs, &flags).await;
    let mut acked = Vec::new();
    for i in 0..5u8 {
        acked.push(put(&client, &pattern(4096, i), Tier::Ram).await.unwrap());
    }
    let filler = fs.fill(0);
    let mut refused = 0;
    for i in 0..20u8 {
        match put(&client, &pattern(4096, i), Tier::Ram).await {
            Ok(done) => acked.push(done),
            Err(ClientError::ResourceExhausted(_)) | Err(ClientError::Unavailable(_)) => refused += 1,
            Err(err) => panic!("a full state dir must answer RESOURCE_EXHAUSTED or UNAVAILABLE, not {err}"),
        }
    }
    assert!(refused > 0, "a full state dir refuses new payloads");
    // Each refused allocation gave back what it had taken.
    let stats = client.stats().await.unwrap();
    for tier in &stats.tiers {
        assert_eq!(tier.reserved_bytes, tier.bytes, "tier {} leaked capacity", tier.tier);
    }
    std::fs::remove_file(filler).unwrap();
    agent.kill9();
    let (agent, client) = Agent::start_with(&dirs, &flags).await;
    assert_served(&client, &acked).await;
    agent.kill9();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_commit_fsyncs_data_directory_and_log_before_it_answers() {
    if std::process::Command::new("strace").arg("-V").output().is_err() {
        return eprintln!("SKIPPED: strace is not installed");
    }
    let dirs = Dirs::new();
    let trace = dirs.state.path().join("trace.txt");
    let wrap = format!("strace -f -y -e trace=fsync,fdatasync,rename -o {}", trace.display());
    let (agent, client) = Agent::start_env(&dirs, &[], &[(WRAP, wrap.as_str())]).await.unwrap();
    let start = std::fs::read_to_string(&trace).unwrap();
    // Start-up rewrote the lease journal: temp file fsynced, renamed, directory fsynced.
    let journal = order(&start, &["fsync(", "leases.tmp", "rename(", "leases.journal", "fsync("]);
    assert!(journal, "journal rewrite order:\n{start}");

    let opts = PutOptions {
        tier: Tier::Disk,
        sync: true,
        ..Default::default()
    };
    let (id, _) = put_opts(&client, &pattern(8192, 9), &opts).await.unwrap();
    // Read after the reply: everything below happened before it.
    let all = std::fs::read_to_string(&trace).unwrap();
    let after = &all[start.len()..];
    let data = format!("{}-{id}.bin>", dirs.node_id());
    let lines: Vec<&str> = after.lines().collect();
    let at = |pred: &dyn Fn(&str) -> bool| lines.iter().position(|l| pred(l));
    let data_sync = at(&|l| l.contains("fsync(") && l.contains(&data));
    let dir_sync = at(&|l| l.contains("fsync(") && l.contains("/disk>)"));
    let log_sync = at(&|l| l.contains("fdatasync(") && l.contains("catalog.log>"));
    let (Some(data_sync), Some(dir_sync), Some(log_sync)) = (data_sync, dir_sync, log_sync) else {
        panic!("a sync commit must fsync its file, its directory and the catalog log:\n{after}");
    };
    assert!(data_sync < dir_sync && dir_sync < log_sync, "fsync order:\n{after}");
    agent.kill9();
}

/// Whether `needles` occur in `text` in this order.
fn order(text: &str, needles: &[&str]) -> bool {
    let mut rest = text;
    needles.iter().all(|n| match rest.find(n) {
        Some(i) => {
            rest = &rest[i + n.len()..];
            true
        }
        None => false,
    })
}

#[tokio::test]
async fn an_orphan_that_cannot_be_removed_is_reported_and_start_up_goes_on() {
    let dirs = Dirs::new();
    let (agent, client) = Agent::start(&dirs).await;
    let kept = put(&client, b"kept", Tier::Ram).await.unwrap();
    agent.kill9();
    // Looks like this node's region, but is a directory: remove_file fails.
    let odd = dirs
        .ram
        .path()
        .join(format!("pm-{}-{}", dirs.node_id(), uuid::Uuid::new_v4()));
    std::fs::create_dir(&odd).unwrap();
    let (agent, client) = Agent::start(&dirs).await;
    assert_served(&client, &[kept]).await;
    assert!(dirs.read_log().contains("could not remove an orphan region"));
    agent.kill9();
    std::fs::remove_dir(odd).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_reboot_a_disk_copy_that_lost_its_bytes_is_dropped_not_served() {
    let dirs = Dirs::new();
    let (agent, client) = Agent::start(&dirs).await;
    let opts = PutOptions {
        tier: Tier::Disk,
        verify: true,
        ..Default::default()
    };
    let intact = put_opts(&client, &pattern(8192, 1), &opts).await.unwrap();
    let zeroed = put_opts(&client, &pattern(8192, 2), &opts).await.unwrap();
    agent.kill9();
    // What a power cut does to a file that was never synced: the length
    // made it to disk, the bytes did not.
    let path = dirs.disk().join(format!("{}-{}.bin", dirs.node_id(), zeroed.0));
    std::fs::write(&path, vec![0u8; 8192]).unwrap();
    std::fs::write(dirs.state.path().join("boot-id"), "an earlier boot\n").unwrap();
    let (agent, client) = Agent::start(&dirs).await;
    assert_served(&client, &[intact]).await;
    assert!(matches!(client.stat(zeroed.0).await, Err(ClientError::NotFound(_))));
    assert!(!path.exists(), "the damaged copy is removed");
    agent.kill9();
}

#[tokio::test]
async fn a_replaced_node_id_stops_start_up_instead_of_dropping_rows() {
    let dirs = Dirs::new();
    let (agent, client) = Agent::start(&dirs).await;
    let kept = put(&client, &pattern(4096, 3), Tier::Disk).await.unwrap();
    agent.kill9();
    let id_file = dirs.state.path().join("node-id");
    let original = std::fs::read(&id_file).unwrap();
    std::fs::remove_file(&id_file).unwrap();
    let refused = Agent::refused(&dirs, &[]);
    assert!(refused.contains("under another node id"), "{refused}");
    std::fs::write(&id_file, original).unwrap();
    let (agent, client) = Agent::start(&dirs).await;
    assert_served(&client, &[kept]).await;
    agent.kill9();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_the_catalog_refuses_is_set_aside_and_its_region_kept() {
    let dirs = Dirs::new();
    let (agent, _client) = Agent::start(&dirs).await;
    agent.kill9();
    // A catalog that refuses one kind of row for good (as PostgreSQL does a
    // row too large for an index).
    let db = dirs.state.path().join("catalog.db");
    let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    sqlx::query(
        "CREATE TRIGGER refuse BEFORE INSERT ON payloads WHEN NEW.size_bytes = 4097 \
         BEGIN SELECT RAISE(ABORT, 'refused'); END",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    drop(conn);
    let (agent, client) = Agent::start(&dirs).await;
    let other = put(&client, &pattern(4096, 1), Tier::Disk).await.unwrap();
    let (refused, _) = put(&client, &pattern(4097, 2), Tier::Disk).await.unwrap();
    wait_for_log(&dirs, "it is set aside").await;
    agent.kill9();
    let rejected = std::fs::read_to_string(dirs.state.path().join("catalog.rejected")).unwrap();
    assert!(rejected.contains(&refused.to_string()), "{rejected}");
    let (agent, client) = Agent::start(&dirs).await;
    assert_served(&client, &[other]).await;
    let region = dirs.disk().join(format!("{}-{refused}.bin", dirs.node_id()));
    assert!(
        region.exists(),
        "the bytes of a refused write are kept for the operator"
    );
    agent.kill9();
}

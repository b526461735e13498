//! The agent binary as a real process: started on a test's directories,
//! killed with SIGKILL (or aborted at a fault point), started again.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use payload_client::{Client, ClientError, PutOptions, Tier};
use sha2::{Digest, Sha256};

use super::Dirs;

pub struct Agent {
    pub child: Child,
}

const AGENT: &str = env!("CARGO_BIN_EXE_payload-agent");
/// In `env`: a program and its arguments to run the agent under.
pub const WRAP: &str = "PM_TEST_WRAP";

/// The flags every test agent gets; `extra` may add or override. With
/// `extra` starting `node`, a cluster node (`payload-agent node ...`).
fn command(dirs: &Dirs, extra: &[&str], env: &[(&str, &str)]) -> Command {
    let (mode, extra) = match extra {
        ["node", rest @ ..] => ("node", rest),
        _ => ("standalone", extra),
    };
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dirs.log())
        .unwrap();
    let (program, wrapper) = match env.iter().find(|(k, _)| *k == WRAP) {
        // A tracer in front of the agent: `strace -o FILE ...`.
        Some((_, wrap)) => {
            let mut words = wrap.split(' ');
            (words.next().unwrap().to_string(), words.map(str::to_string).collect())
        }
        None => (AGENT.to_string(), Vec::new()),
    };
    let mut cmd = Command::new(program);
    if !wrapper.is_empty() {
        cmd.args(wrapper).arg(AGENT);
    }
    cmd.arg(mode).args(extra);
    let ram = dirs.ram.path().display().to_string();
    let state = dirs.state.path().display().to_string();
    let defaults = [
        ("--state-dir", state.as_str()),
        ("--listen", "off"),
        ("--ram-capacity", "128MiB"),
        ("--disk-capacity", "512MiB"),
        ("--ram-root", ram.as_str()),
    ];
    for (flag, value) in defaults {
        if !extra.contains(&flag) {
            cmd.args([flag, value]);
        }
    }
    // A group of its own, so a signal reaches the agent behind a wrapper
    // too (a killed strace would leave its tracee running).
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    // And it dies with the test process, even one killed before its Drop.
    // SAFETY: prctl is async-signal-safe; nothing else runs in the child.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    cmd.envs(env.iter().filter(|(k, _)| *k != WRAP).copied())
        .stdout(Stdio::null())
        .stderr(log);
    cmd
}

impl Agent {
    pub async fn start(dirs: &Dirs) -> (Agent, Client) {
        Self::start_with(dirs, &[]).await
    }

    /// With `extra` flags: a `--catalog` and `--node-name`, say.
    pub async fn start_with(dirs: &Dirs, extra: &[&str]) -> (Agent, Client) {
        Self::start_env(dirs, extra, &[])
            .await
            .unwrap_or_else(|log| panic!("agent did not come up; log: {log}"))
    }

    /// Starts the agent and waits until it serves; a process that exits
    /// first gives back its log.
    pub async fn start_env(dirs: &Dirs, extra: &[&str], env: &[(&str, &str)]) -> Result<(Agent, Client), String> {
        Self::start_at(dirs, extra, env, &dirs.socket()).await
    }

    /// As [`Agent::start_env`], for an agent whose `--socket` (in `extra`) is `socket`.
    pub async fn start_at(
        dirs: &Dirs,
        extra: &[&str],
        env: &[(&str, &str)],
        socket: &Path,
    ) -> Result<(Agent, Client), String> {
        let child = command(dirs, extra, env).spawn().expect("agent binary starts");
        let mut agent = Agent { child };
        // Readiness poll: the socket accepts once recovery is done.
        for _ in 0..1500 {
            if let Some(status) = agent.child.try_wait().unwrap() {
                return Err(format!("exited with {status}: {}", dirs.read_log()));
            }
            if let Ok(client) = Client::connect(socket.to_str().unwrap()).await {
                if client.stats().await.is_ok() {
                    return Ok((agent, client));
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        agent.kill9();
        Err(format!("did not come up: {}", dirs.read_log()))
    }

    /// Runs an agent that must refuse to start; returns what it printed.
    pub fn refused(dirs: &Dirs, extra: &[&str]) -> String {
        Self::refused_with(dirs, extra, &[])
    }

    pub fn refused_env(dirs: &Dirs, env: &[(&str, &str)]) -> String {
        Self::refused_with(dirs, &[], env)
    }

    fn refused_with(dirs: &Dirs, extra: &[&str], env: &[(&str, &str)]) -> String {
        let out = command(dirs, extra, env)
            .stderr(Stdio::piped())
            .output()
            .expect("agent binary runs");
        let text = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !out.status.success(),
            "the agent was expected to refuse to start: {text}"
        );
        text
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn kill9(self) {
        self.signal(libc::SIGKILL);
    }

    /// Sends `signal` and waits for the process to end.
    pub fn signal(mut self, signal: i32) -> std::process::ExitStatus {
        // SAFETY: plain kill(2) on our own child's process group.
        unsafe { libc::kill(-(self.child.id() as i32), signal) };
        self.child.wait().unwrap()
    }

    /// Waits for the process to end by itself (a fault point aborted it);
    /// one still running after `limit` is killed and `None` comes back.
    pub fn wait_exit(mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let until = std::time::Instant::now() + limit;
        while std::time::Instant::now() < until {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill9();
        None
    }
}

/// A test that fails before it stops its agent must not leave it running.
impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: plain kill(2) on our own child's process group.
            unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
            let _ = self.child.wait();
        }
    }
}

impl Dirs {
    pub fn log(&self) -> std::path::PathBuf {
        self.state.path().join("agent.log")
    }

    pub fn read_log(&self) -> String {
        std::fs::read_to_string(self.log()).unwrap_or_default()
    }

    /// The node id the agent made in its state dir.
    pub fn node_id(&self) -> String {
        node_id(self.state.path())
    }
}

/// The memfd keepers serving `dirs`' state dir.
pub fn keeper_pids(dirs: &Dirs) -> Vec<i32> {
    let wanted = dirs.state.path().join("keeper.sock").to_string_lossy().into_owned();
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.iter().any(|a| a == "keeper") && args.contains(&wanted) {
            pids.extend(entry.file_name().to_string_lossy().parse::<i32>());
        }
    }
    pids
}

/// Kills the memfd keeper of `dirs`' agent, as a reboot would (it holds
/// the sealed payloads across agent restarts).
pub fn kill_keeper(dirs: &Dirs) {
    for pid in keeper_pids(dirs) {
        // SAFETY: kill(2) of a process this test's agent started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let _ = std::fs::remove_file(dirs.state.path().join("keeper.sock"));
}

/// A client that speaks gRPC only, as a v1 client: its RAM payloads are
/// named /dev/shm regions.
pub async fn v1(dirs: &Dirs) -> Client {
    Client::connect_grpc(dirs.socket().to_str().unwrap())
        .await
        .expect("gRPC connects")
}

pub fn node_id(state: &Path) -> String {
    std::fs::read_to_string(state.join("node-id"))
        .expect("the agent made a node id")
        .trim()
        .to_string()
}

/// Lists every payload and checks that this node's files in shm and on
/// disk are exactly their regions: nothing orphaned, nothing missing
/// (object-tier payloads have no region here).
/// Returns how many there are.
pub async fn assert_no_orphans(dirs: &Dirs, client: &Client) -> usize {
    let node = dirs.node_id();
    let mut expected = BTreeSet::new();
    let mut sealed = 0;
    let mut token = String::new();
    loop {
        let page = client
            .list(payload_proto::runtime::ListPayloadsRequest {
                page_size: 500,
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap();
        for p in &page.payloads {
            let id = uuid::Uuid::from_slice(&p.id.as_ref().unwrap().value).unwrap();
            if p.sealed {
                // A memfd: nothing in shm to find.
                sealed += 1;
            } else if p.tier == Tier::Ram as i32 {
                expected.insert(format!("ram:pm-{node}-{id}"));
            } else if p.tier == Tier::Disk as i32 {
                expected.insert(format!("disk:{node}-{id}.bin"));
            }
        }
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let ours = |f: &String| f.starts_with(&format!("pm-{node}-")) || f.starts_with(&format!("{node}-"));
    let mut found = BTreeSet::new();
    found.extend(
        Dirs::files_in(dirs.ram.path())
            .into_iter()
            .filter(ours)
            .map(|f| format!("ram:{f}")),
    );
    found.extend(
        Dirs::files_in(&dirs.disk())
            .into_iter()
            .filter(ours)
            .map(|f| format!("disk:{f}")),
    );
    assert_eq!(
        found, expected,
        "this node's regions must match its catalog rows exactly"
    );
    expected.len() + sealed
}

/// Puts `bytes` on `tier`; returns the id and the digest to check later.
pub async fn put(client: &Client, bytes: &[u8], tier: Tier) -> Result<(uuid::Uuid, Vec<u8>), ClientError> {
    put_opts(
        client,
        bytes,
        &PutOptions {
            tier,
            ..Default::default()
        },
    )
    .await
}

pub async fn put_opts(client: &Client, bytes: &[u8], opts: &PutOptions) -> Result<(uuid::Uuid, Vec<u8>), ClientError> {
    let desc = client.put_with(bytes, opts).await?;
    Ok((payload_client::descriptor_id(&desc)?, Sha256::digest(bytes).to_vec()))
}

/// Every payload in `acked` is served with the bytes it was put with.
pub async fn assert_served(client: &Client, acked: &[(uuid::Uuid, Vec<u8>)]) {
    for (id, digest) in acked {
        let lease = client
            .get(*id)
            .await
            .unwrap_or_else(|e| panic!("acknowledged payload {id} lost: {e}"));
        assert_eq!(Sha256::digest(lease.bytes()).to_vec(), *digest, "payload {id} changed");
    }
}

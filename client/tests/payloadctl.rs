//! `payloadctl` against a real `payload-agent standalone` process: bytes round
//! trip through files and stdin, tier moves obey pins, and every failure a
//! script may branch on comes back as its documented exit code.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;
use sha2::{Digest, Sha256};
use tempfile::TempDir;
use uuid::Uuid;

const PAYLOADCTL: &str = env!("CARGO_BIN_EXE_payloadctl");

/// The agent binary beside payloadctl in the workspace's target directory,
/// built first if this package's build did not produce it.
fn agent_binary() -> PathBuf {
    let dir = Path::new(PAYLOADCTL).parent().expect("payloadctl lies in a directory");
    let agent = dir.join("payload-agent");
    if agent.exists() {
        return agent;
    }
    let profile = match dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => "dev",
        Some(other) => other,
    };
    let target_dir = dir
        .parent()
        .expect("the profile directory lies in the target directory");
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args([
            "build",
            "-p",
            "payload-agent",
            "--bin",
            "payload-agent",
            "--profile",
            profile,
        ])
        .arg("--target-dir")
        .arg(target_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("running cargo to build payload-agent");
    assert!(
        status.success() && agent.exists(),
        "could not build {}; run `cargo build -p payload-agent --bin payload-agent` first",
        agent.display()
    );
    agent
}

/// A standalone agent on private directories, stopped with SIGTERM on drop.
struct Agent {
    child: Child,
    state: TempDir,
    _ram: TempDir,
}

impl Agent {
    fn start() -> Agent {
        Self::start_with(&["--listen", "off"])
    }

    /// An agent started with `flags` (which must say where it listens).
    fn start_with(flags: &[&str]) -> Agent {
        let state = tempfile::tempdir().expect("state dir");
        let ram = tempfile::Builder::new()
            .prefix("pmctl-test-")
            .tempdir_in("/dev/shm")
            .expect("ram dir under /dev/shm");
        let log = std::fs::File::create(state.path().join("agent.log")).expect("agent log");
        let child = Command::new(agent_binary())
            .arg("standalone")
            .arg("--state-dir")
            .arg(state.path())
            .args(flags)
            .args(["--shm-prefix", "pm"])
            .arg("--ram-root")
            .arg(ram.path())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("agent binary starts");
        let mut agent = Agent {
            child,
            state,
            _ram: ram,
        };
        for _ in 0..500 {
            if agent.socket().exists() {
                return agent;
            }
            if let Ok(Some(status)) = agent.child.try_wait() {
                panic!("agent exited with {status} before serving; log:\n{}", agent.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("agent socket did not appear within 10 s; log:\n{}", agent.log());
    }

    /// Waits for the TCP port, bound just after the Unix socket appears.
    fn wait_for_tcp(&mut self, listen: &str) {
        for _ in 0..500 {
            if std::net::TcpStream::connect(listen).is_ok() {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "agent exited with {status} before listening on {listen}; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("agent did not listen on {listen} within 10 s; log:\n{}", self.log());
    }

    fn socket(&self) -> PathBuf {
        self.state.path().join("agent.sock")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.state.path().join("agent.log")).unwrap_or_default()
    }

    fn dir(&self) -> &Path {
        self.state.path()
    }

    fn ctl(&self, args: &[&str]) -> Output {
        self.ctl_stdin(args, None)
    }

    /// Runs payloadctl against this agent, feeding `stdin` if given.
    fn ctl_stdin(&self, args: &[&str], stdin: Option<&[u8]>) -> Output {
        let socket = self.socket();
        let mut all = vec!["--agent", socket.to_str().expect("utf-8 temp path")];
        all.extend(args);
        payloadctl(&all, stdin)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        for _ in 0..500 {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn payloadctl(args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut child = Command::new(PAYLOADCTL)
        .args(args)
        .env_remove("PM_AGENT")
        .env_remove("PM_OUTPUT")
        .env_remove("PM_TOKEN_FILE")
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("payloadctl starts");
    if let Some(bytes) = stdin {
        let mut pipe = child.stdin.take().expect("stdin pipe");
        let bytes = bytes.to_vec();
        // A thread, so a large input cannot deadlock against unread output.
        std::thread::spawn(move || pipe.write_all(&bytes));
    }
    child.wait_with_output().expect("payloadctl runs")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts success and returns stdout.
fn ok_bytes(out: &Output) -> Vec<u8> {
    assert!(
        out.status.success(),
        "payloadctl failed with {}: {}",
        out.status,
        stderr(out)
    );
    out.stdout.clone()
}

/// Asserts success and returns stdout as text.
fn ok(out: &Output) -> String {
    String::from_utf8(ok_bytes(out)).expect("stdout is UTF-8")
}

/// Asserts the exit code and the `payloadctl: ` error line.
fn fails_with(out: &Output, code: i32) -> String {
    assert_eq!(out.status.code(), Some(code), "stderr: {}", stderr(out));
    let text = stderr(out);
    assert!(!text.contains("panicked"), "{text}");
    text
}

fn json(out: &Output) -> Value {
    serde_json::from_str(&ok(out)).expect("stdout is JSON")
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(7)).collect()
}

/// `put FILE` in table mode prints just the id.
fn put_file(agent: &Agent, bytes: &[u8], extra: &[&str]) -> String {
    let input = agent.dir().join(format!("input-{}", Uuid::new_v4()));
    std::fs::write(&input, bytes).expect("input file");
    let mut args = vec!["put", input.to_str().expect("utf-8 temp path")];
    args.extend(extra);
    let id = ok(&agent.ctl(&args)).trim().to_string();
    Uuid::parse_str(&id).unwrap_or_else(|_| panic!("put printed {id:?}, not an id"));
    id
}

fn tier_of(agent: &Agent, id: &str) -> String {
    json(&agent.ctl(&["stat", id, "--output", "json"]))["tier"]
        .as_str()
        .expect("stat has a tier")
        .to_string()
}

#[test]
fn a_file_put_then_got_comes_back_byte_for_byte() {
    let agent = Agent::start();
    let bytes = pattern(100 << 10);
    let id = put_file(&agent, &bytes, &["--verify", "--label", "team=ml", "--label", "run=7"]);

    let out_path = agent.dir().join("out");
    ok(&agent.ctl(&["get", &id, "-o", out_path.to_str().unwrap()]));
    assert_eq!(std::fs::read(&out_path).unwrap(), bytes);
    assert_eq!(ok_bytes(&agent.ctl(&["get", &id])), bytes);

    let stat = json(&agent.ctl(&["stat", &id, "--output", "json"]));
    assert_eq!(stat["id"], id.as_str());
    assert_eq!(stat["tier"], "ram");
    assert_eq!(stat["size_bytes"], bytes.len() as u64);
    assert_eq!(stat["labels"]["team"], "ml");
    assert_eq!(stat["sha256"], hex::encode(Sha256::digest(&bytes)));
    // Put over the native socket: a sealed memfd, with no name in /dev/shm.
    assert_eq!(stat["sealed"], true);
    assert!(stat["location"].get("shm_name").is_none(), "{stat}");
}

#[test]
fn stdin_put_is_listed_and_its_bytes_read_back() {
    let agent = Agent::start();
    let bytes = b"hello from stdin\n";
    let id = ok(&agent.ctl_stdin(&["put", "-"], Some(bytes))).trim().to_string();
    assert_eq!(ok_bytes(&agent.ctl(&["get", &id])), bytes);

    let listed = json(&agent.ctl(&["ls", "--output", "json"]));
    let row = listed
        .as_array()
        .expect("ls prints an array")
        .iter()
        .find(|p| p["id"] == id.as_str())
        .unwrap_or_else(|| panic!("{id} missing from {listed}"));
    assert_eq!(row["size_bytes"], bytes.len() as u64);
    assert_eq!(row["state"], "active");

    let table = ok(&agent.ctl(&["ls"]));
    assert!(table.starts_with("ID "), "{table}");
    assert!(table.contains(&id), "{table}");

    // The catalog's view: every node's payloads, each with its node.
    let everyone = ok(&agent.ctl(&["ls", "--all-nodes"]));
    assert!(everyone.starts_with("ID ") && everyone.contains(" NODE "), "{everyone}");
    assert!(everyone.contains("standalone"), "{everyone}");
    let elsewhere = json(&agent.ctl(&["ls", "--node", "node-b", "--output", "json"]));
    assert_eq!(elsewhere, Value::Array(vec![]), "no such node, no payloads");

    // A standalone agent is the only node it knows.
    let nodes = json(&agent.ctl(&["nodes", "--output", "json"]));
    assert_eq!(nodes["cluster"], false);
    assert_eq!(nodes["nodes"].as_array().unwrap().len(), 1, "{nodes}");
    assert_eq!(nodes["nodes"][0]["name"], "standalone");
    assert_eq!(nodes["nodes"][0]["live"], true);
    let ram = nodes["nodes"][0]["tiers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["tier"] == "ram")
        .cloned();
    assert!(
        ram.is_some_and(|t| t["bytes"].as_u64() >= Some(bytes.len() as u64)),
        "{nodes}"
    );
}

#[test]
fn put_in_json_mode_prints_the_descriptor() {
    let agent = Agent::start();
    let desc = json(&agent.ctl_stdin(&["put", "-", "--tier", "disk", "--output", "json"], Some(b"abc")));
    assert_eq!(desc["tier"], "disk");
    assert_eq!(desc["size_bytes"], 3);
    let path = desc["path"].as_str().expect("disk payloads have a path");
    assert_eq!(std::fs::read(path).unwrap(), b"abc");
}

#[test]
fn a_pinned_payload_refuses_to_spill_until_unpinned_and_then_moves_both_ways() {
    let agent = Agent::start();
    let bytes = pattern(64 << 10);
    let id = put_file(&agent, &bytes, &[]);

    ok(&agent.ctl(&["pin", &id]));
    assert_eq!(json(&agent.ctl(&["stat", &id, "--output", "json"]))["pinned"], true);
    let refused = fails_with(&agent.ctl(&["spill", &id]), 4);
    assert!(
        refused.starts_with("payloadctl: ") && refused.contains("pinned"),
        "{refused}"
    );
    assert_eq!(tier_of(&agent, &id), "ram");

    ok(&agent.ctl(&["unpin", &id]));
    ok(&agent.ctl(&["spill", &id, "--to", "disk"]));
    assert_eq!(tier_of(&agent, &id), "disk");
    assert_eq!(ok_bytes(&agent.ctl(&["get", &id])), bytes);

    ok(&agent.ctl(&["promote", &id, "--to", "ram"]));
    assert_eq!(tier_of(&agent, &id), "ram");
    assert_eq!(ok_bytes(&agent.ctl(&["get", &id])), bytes);
}

#[test]
fn a_removed_payload_is_not_found() {
    let agent = Agent::start();
    let id = put_file(&agent, &pattern(4096), &[]);
    ok(&agent.ctl(&["rm", &id]));
    let missing = fails_with(&agent.ctl(&["get", &id]), 3);
    assert!(
        missing.starts_with("payloadctl: ") && missing.contains("not found"),
        "{missing}"
    );
    fails_with(&agent.ctl(&["stat", &id]), 3);
    fails_with(&agent.ctl(&["spill", &id]), 3);
    fails_with(&agent.ctl(&["pin", &id]), 3);
    fails_with(&agent.ctl(&["rm", &id]), 3);
}

#[test]
fn a_lease_outlives_the_command_and_blocks_rm_without_force() {
    let agent = Agent::start();
    let id = put_file(&agent, &pattern(4096), &[]);
    let lease = json(&agent.ctl(&["lease", &id, "--duration", "1m", "--output", "json"]));
    assert!(Uuid::parse_str(lease["lease_id"].as_str().expect("lease id")).is_ok());
    assert_eq!(lease["location"]["sealed"], true, "put over the native socket: {lease}");
    assert_eq!(json(&agent.ctl(&["stat", &id, "--output", "json"]))["active_leases"], 1);

    fails_with(&agent.ctl(&["rm", &id]), 4);
    ok(&agent.ctl(&["rm", &id, "--force"]));
    fails_with(&agent.ctl(&["stat", &id]), 3);
}

#[test]
fn stats_count_what_was_stored() {
    let agent = Agent::start();
    put_file(&agent, &pattern(10_000), &[]);
    let stats = json(&agent.ctl(&["stats", "--output", "json"]));
    let ram = stats["tiers"]
        .as_array()
        .expect("tiers")
        .iter()
        .find(|t| t["tier"] == "ram")
        .unwrap_or_else(|| panic!("no ram tier in {stats}"));
    assert_eq!(ram["payloads"], 1);
    assert_eq!(ram["bytes"], 10_000);
    assert!(ok(&agent.ctl(&["stats"])).starts_with("TIER "));
}

#[test]
fn empty_input_is_refused_as_a_usage_error() {
    let agent = Agent::start();
    let text = fails_with(&agent.ctl_stdin(&["put", "-"], Some(b"")), 2);
    assert!(text.contains("empty"), "{text}");
    assert_eq!(json(&agent.ctl(&["ls", "--output", "json"])), Value::Array(vec![]));
}

#[test]
fn a_malformed_id_is_a_usage_error_naming_the_expected_form() {
    let text = fails_with(
        &payloadctl(&["--agent", "/nonexistent/agent.sock", "stat", "not-an-id"], None),
        2,
    );
    assert!(text.contains("dashed UUID"), "{text}");
}

#[test]
fn an_agent_that_is_not_there_is_exit_code_6() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let text = fails_with(&payloadctl(&["--agent", socket.to_str().unwrap(), "ls"], None), 6);
    assert!(text.starts_with("payloadctl: could not connect"), "{text}");
}

#[test]
fn an_operator_is_never_asked_for_bytes_and_one_not_there_is_exit_code_6() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let text = fails_with(&payloadctl(&["--operator", &url, "put", "-"], Some(b"x")), 2);
    assert!(text.contains("--agent ADDR instead of --operator"), "{text}");
    let text = fails_with(&payloadctl(&["--operator", &url, "ls"], None), 6);
    assert!(text.contains("is the operator running?"), "{text}");
    // A pod's PM_AGENT gives way to --operator; --agent beside it does not.
    let out = Command::new(PAYLOADCTL)
        .args(["--operator", &url, "ls"])
        .env("PM_AGENT", "/run/payload-manager/agent.sock")
        .output()
        .unwrap();
    let text = fails_with(&out, 6);
    assert!(text.contains("is the operator running?"), "{text}");
    let text = fails_with(
        &payloadctl(&["--operator", &url, "ls", "--agent", "/tmp/a.sock"], None),
        2,
    );
    assert!(text.contains("pass one"), "{text}");
}

#[test]
fn streams_are_created_appended_read_and_their_offsets_kept() {
    let agent = Agent::start();
    let a = put_file(&agent, b"first", &[]);
    let b = put_file(&agent, b"second", &[]);
    ok(&agent.ctl(&["stream", "create", "events", "--max-entries", "100"]));
    assert!(fails_with(&agent.ctl(&["stream", "create", "events"]), 4).contains("already exists"));
    let offsets = json(&agent.ctl(&[
        "stream", "append", "events", &a, &b, "--tag", "run=1", "--output", "json",
    ]));
    assert_eq!(
        (offsets["first_offset"].as_u64(), offsets["last_offset"].as_u64()),
        (Some(0), Some(1))
    );

    let entries = json(&agent.ctl(&["stream", "read", "events", "--from", "1", "--output", "json"]));
    let entries = entries.as_array().expect("a list of entries");
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0]["payload_id"], b.as_str());
    assert_eq!(entries[0]["tags"]["run"], "1");
    assert!(ok(&agent.ctl(&["stream", "read", "events"])).contains(&a));

    let nothing = json(&agent.ctl(&["stream", "committed", "events", "g", "--output", "json"]));
    assert!(nothing["offset"].is_null(), "{nothing}");
    ok(&agent.ctl(&["stream", "commit", "events", "g", "0"]));
    assert_eq!(ok(&agent.ctl(&["stream", "committed", "events", "g"])).trim(), "0");

    let ghost = Uuid::new_v4().to_string();
    fails_with(&agent.ctl(&["stream", "append", "events", &ghost]), 3);
    fails_with(&agent.ctl(&["stream", "read", "nope"]), 3);
    ok(&agent.ctl(&["stream", "rm", "events"]));
    fails_with(&agent.ctl(&["stream", "read", "events"]), 3);
}

/// An agent's TCP port with a token takes payloadctl given `--token-file`
/// (a put and a get go through), and refuses it without, naming the flag.
#[test]
fn a_token_file_lets_payloadctl_through_an_agents_tcp_port() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let secrets = tempfile::tempdir().unwrap();
    let token = secrets.path().join("token");
    std::fs::write(&token, "tcp-s3cret\n").unwrap();
    let token = token.to_str().unwrap();
    let mut agent = Agent::start_with(&["--listen", &listen, "--tcp-token-file", token]);
    agent.wait_for_tcp(&listen);
    let addr = format!("http://{listen}");
    let bytes = pattern(10_000);
    let id = ok(&payloadctl(
        &["--agent", &addr, "--token-file", token, "put", "-"],
        Some(&bytes),
    ));
    let got = ok_bytes(&payloadctl(
        &["--agent", &addr, "--token-file", token, "get", id.trim()],
        None,
    ));
    assert_eq!(got, bytes);

    let refused = fails_with(&payloadctl(&["--agent", &addr, "stats"], None), 1);
    assert!(refused.contains("--token-file"), "{refused}");
    let wrong = secrets.path().join("wrong");
    std::fs::write(&wrong, "guess\n").unwrap();
    let wrong = wrong.to_str().unwrap();
    let refused = fails_with(
        &payloadctl(&["--agent", &addr, "--token-file", wrong, "stats"], None),
        1,
    );
    assert!(refused.contains("not this agent's"), "{refused}");
    let empty = secrets.path().join("empty");
    std::fs::write(&empty, "\n").unwrap();
    let usage = fails_with(
        &payloadctl(
            &["--agent", &addr, "--token-file", empty.to_str().unwrap(), "stats"],
            None,
        ),
        2,
    );
    assert!(usage.contains("no token"), "{usage}");
    std::fs::write(wrong, "two words\n").unwrap();
    let usage = fails_with(
        &payloadctl(&["--agent", &addr, "--token-file", wrong, "stats"], None),
        2,
    );
    assert!(usage.contains("one word of printable ASCII"), "{usage}");
}

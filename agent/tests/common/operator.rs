//! The operator's catalog service as a real process (`payload-operator
//! catalog --auth none` on loopback), for the cluster-mode tests.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct Operator {
    child: Child,
    pub port: u16,
    log: PathBuf,
}

/// The operator binary, which `cargo test --workspace` (`make test`) builds
/// beside the agent's.
fn binary() -> PathBuf {
    let bin = Path::new(env!("CARGO_BIN_EXE_payload-agent")).with_file_name("payload-operator");
    assert!(
        bin.exists(),
        "{} is missing: build it first (cargo build -p payload-operator) or run `make test`",
        bin.display()
    );
    bin
}

impl Operator {
    /// Serves `database` on 127.0.0.1:`port` and waits until it accepts.
    pub async fn start(database: &str, port: u16, log_dir: &Path) -> Operator {
        Self::start_with(database, port, log_dir, &[]).await
    }

    /// As [`Operator::start`], with `extra` flags.
    pub async fn start_with(database: &str, port: u16, log_dir: &Path, extra: &[&str]) -> Operator {
        let log = log_dir.join("operator.log");
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let mut cmd = Command::new(binary());
        cmd.args(["catalog", "--auth", "none", "--database", database])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(out);
        // SAFETY: prctl is async-signal-safe; nothing else runs in the child.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut operator = Operator {
            child: cmd.spawn().expect("the operator binary starts"),
            port,
            log,
        };
        for _ in 0..1500 {
            if let Some(status) = operator.child.try_wait().unwrap() {
                panic!("the operator exited with {status}: {}", operator.read_log());
            }
            if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                return operator;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the operator did not come up: {}", operator.read_log());
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn read_log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

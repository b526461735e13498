//! A real S3-compatible server for tests: `moto_server` (PyPI `moto[server]`,
//! installed into the repository's .venv by `make test` and CI) on a spare
//! port of 127.0.0.1, one per test process, dying with it. Each test gets a
//! fresh bucket. Without moto a test skips, saying so, except in CI
//! (`CI` set), where it fails.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

pub struct S3 {
    _server: Child,
}

fn moto_binary() -> Option<PathBuf> {
    if let Some(bin) = std::env::var_os("PM_MOTO_SERVER") {
        return Some(bin.into());
    }
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let bin = repo.join(".venv/bin/moto_server");
    bin.exists().then_some(bin)
}

fn start() -> Option<S3> {
    let Some(bin) = moto_binary() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "moto_server not found (.venv/bin/moto_server or PM_MOTO_SERVER); CI must run the S3 tests"
        );
        eprintln!("SKIPPED: moto_server not found; run `make test` (it installs moto into .venv)");
        return None;
    };
    let port = TcpListener::bind("127.0.0.1:0").ok()?.local_addr().ok()?.port();
    let mut command = Command::new(bin);
    command
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: prctl in the child before exec; it only sets a signal.
    unsafe {
        use std::os::unix::process::CommandExt;
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let mut server = command.spawn().expect("starting moto_server");
    let endpoint = format!("http://127.0.0.1:{port}");
    for _ in 0..600 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            // The standard AWS environment, as a user would set it.
            std::env::set_var("AWS_ENDPOINT_URL", &endpoint);
            std::env::set_var("AWS_ACCESS_KEY_ID", "test");
            std::env::set_var("AWS_SECRET_ACCESS_KEY", "test");
            std::env::set_var("AWS_REGION", "us-east-1");
            return Some(S3 { _server: server });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = server.kill();
    let _ = server.wait();
    panic!("moto_server did not listen on port {port} within 30 s");
}

/// The server, started on first use; `None` when the test should skip.
pub fn server() -> Option<&'static S3> {
    static SERVER: OnceLock<Option<S3>> = OnceLock::new();
    SERVER.get_or_init(start).as_ref()
}

impl S3 {
    pub async fn client(&self) -> aws_sdk_s3::Client {
        let config = aws_config::defaults(aws_config::BehaviorVersion::latest()).load().await;
        let config = aws_sdk_s3::config::Builder::from(&config)
            .force_path_style(true)
            .build();
        aws_sdk_s3::Client::from_conf(config)
    }

    /// A fresh bucket; returns its name.
    pub async fn bucket(&self) -> String {
        let name = format!("pm-test-{}", uuid::Uuid::new_v4().simple());
        self.client()
            .await
            .create_bucket()
            .bucket(&name)
            .send()
            .await
            .expect("creating a bucket");
        name
    }

    /// Keys in `bucket` under `prefix`.
    pub async fn keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let client = self.client().await;
        let mut keys = Vec::new();
        let mut token = None;
        loop {
            let page = client
                .list_objects_v2()
                .bucket(bucket)
                .prefix(prefix)
                .set_continuation_token(token)
                .send()
                .await
                .expect("listing the bucket");
            keys.extend(page.contents().iter().filter_map(|o| o.key().map(str::to_string)));
            match page.next_continuation_token() {
                Some(next) => token = Some(next.to_string()),
                None => return keys,
            }
        }
    }
}

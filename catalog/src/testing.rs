//! Test support (feature `testing`): a private PostgreSQL cluster on
//! 127.0.0.1 and a fresh database per test. `make test` starts one cluster
//! for the whole run (`with-postgres`) and hands its URL to every test in
//! `PM_TEST_POSTGRES_URL`; a test run without it starts a cluster of its own.
//! With `CI` set, a PostgreSQL that cannot be had fails the test instead of
//! skipping it.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use sqlx::{Connection, Executor, PgConnection};
use tempfile::TempDir;

/// Where the suite looks for an already running server (an admin URL).
pub const URL_VAR: &str = "PM_TEST_POSTGRES_URL";

/// A throwaway PostgreSQL cluster; stopped and deleted on drop.
pub struct PgCluster {
    dir: TempDir,
    bin: PathBuf,
    port: u16,
    options: String,
}

fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PM_POSTGRES_BIN") {
        return dir.into();
    }
    ["17", "16", "15", "14"]
        .iter()
        .map(|v| PathBuf::from(format!("/usr/lib/postgresql/{v}/bin")))
        .find(|p| p.join("initdb").exists())
        .unwrap_or_default()
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// PostgreSQL refuses to run as root; there it runs as user `postgres`.
fn run(bin: &Path, program: &str, args: &[&str]) -> Result<Output, String> {
    let program = bin.join(program);
    let mut cmd = if is_root() {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--"]).arg(&program);
        cmd
    } else {
        Command::new(&program)
    };
    let out = cmd
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", program.display()))?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(format!(
            "{} {args:?} failed: {}{}",
            program.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn give_to_postgres(path: &Path) -> Result<(), String> {
    if !is_root() {
        return Ok(());
    }
    let name = c"postgres";
    // SAFETY: a valid C string; the result is read before any other call.
    let user = unsafe { libc::getpwnam(name.as_ptr()) };
    if user.is_null() {
        return Err("running as root and there is no user `postgres` to run PostgreSQL as".into());
    }
    // SAFETY: non-null, points at libc's static passwd entry.
    let (uid, gid) = unsafe { ((*user).pw_uid, (*user).pw_gid) };
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(|e| format!("chown {}: {e}", path.display()))
}

impl PgCluster {
    /// initdb into a temporary directory and start the server on a spare
    /// port, without fsync: fast, and a crash of the machine loses it.
    pub fn start() -> Result<Self, String> {
        Self::start_with("-c fsync=off -c synchronous_commit=off")
    }

    /// As [`PgCluster::start`], with PostgreSQL's durable defaults (fsync
    /// and synchronous commit on), for benchmarks.
    pub fn start_durable() -> Result<Self, String> {
        Self::start_with("")
    }

    fn start_with(settings: &str) -> Result<Self, String> {
        let bin = bin_dir();
        let dir = tempfile::Builder::new()
            .prefix("pm-postgres-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        let data = dir.path().join("data");
        std::fs::create_dir(&data).map_err(|e| e.to_string())?;
        give_to_postgres(&data)?;
        let data_arg = data.to_str().ok_or("temporary path is not UTF-8")?;
        run(
            &bin,
            "initdb",
            &[
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
                "-D",
                data_arg,
            ],
        )?;
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| e.to_string())?
            .port();
        let options = format!(
            "-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={data_arg} \
             -c max_connections=300 {settings}"
        );
        let cluster = Self {
            dir,
            bin,
            port,
            options,
        };
        cluster.resume()?;
        Ok(cluster)
    }

    /// Starts the server (again) on the same data and port.
    pub fn resume(&self) -> Result<(), String> {
        let data = self.dir.path().join("data");
        let data = data.to_str().ok_or("temporary path is not UTF-8")?;
        let log = format!("{data}/server.log");
        run(
            &self.bin,
            "pg_ctl",
            &["-D", data, "-l", &log, "-w", "-o", &self.options, "start"],
        )
        .map(drop)
    }

    /// Stops the server as an outage would (`pg_ctl stop -m fast`); the
    /// data stays for [`PgCluster::resume`].
    pub fn pause(&self) -> Result<(), String> {
        let data = self.dir.path().join("data");
        let data = data.to_str().ok_or("temporary path is not UTF-8")?;
        run(&self.bin, "pg_ctl", &["-D", data, "-m", "fast", "-w", "stop"]).map(drop)
    }

    /// The superuser's URL on the maintenance database.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl PgCluster {
    fn stop(&self) {
        let data = self.dir.path().join("data");
        if let Some(data) = data.to_str() {
            let _ = run(&self.bin, "pg_ctl", &["-D", data, "-m", "immediate", "-w", "stop"]);
        }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// This process's own cluster, when no URL was handed down. Statics are never
/// dropped, so it is stopped from an exit hook.
static OWN: OnceLock<Result<PgCluster, String>> = OnceLock::new();

extern "C" fn stop_own_cluster() {
    if let Some(Ok(cluster)) = OWN.get() {
        cluster.stop();
        let _ = std::fs::remove_dir_all(cluster.dir.path());
    }
}

fn server_url() -> Result<String, String> {
    if let Ok(url) = std::env::var(URL_VAR) {
        return Ok(url);
    }
    let own = OWN.get_or_init(|| {
        let cluster = PgCluster::start()?;
        // SAFETY: registers a plain extern "C" function.
        unsafe { libc::atexit(stop_own_cluster) };
        Ok(cluster)
    });
    own.as_ref().map(PgCluster::url).map_err(Clone::clone)
}

/// Creates an empty database on `server` (an admin URL) and returns its URL.
pub async fn create_database(server: &str) -> Result<String, String> {
    let mut conn = PgConnection::connect(server)
        .await
        .map_err(|e| format!("cannot connect to {server}: {e}"))?;
    let name = format!("pm_test_{}", uuid::Uuid::new_v4().simple());
    conn.execute(format!("CREATE DATABASE {name}").as_str())
        .await
        .map_err(|e| format!("CREATE DATABASE on {server}: {e}"))?;
    let base = server.rsplit_once('/').map_or(server, |(base, _)| base);
    Ok(format!("{base}/{name}"))
}

/// The URL of a new, empty database for one test, or `None` (with a notice)
/// when PostgreSQL cannot be had and `CI` is not set.
pub async fn fresh_database() -> Option<String> {
    let result = match tokio::task::spawn_blocking(server_url).await {
        Ok(Ok(server)) => create_database(&server).await,
        Ok(Err(err)) => Err(err),
        Err(err) => Err(err.to_string()),
    };
    match result {
        Ok(url) => Some(url),
        Err(err) if std::env::var_os("CI").is_some_and(|v| !v.is_empty()) => {
            panic!("PostgreSQL is required when CI is set and could not be had: {err}")
        }
        Err(err) => {
            eprintln!("SKIPPED: PostgreSQL tests need a server and none could be had ({err}); set {URL_VAR}");
            None
        }
    }
}

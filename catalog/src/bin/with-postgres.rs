//! `with-postgres CMD ARGS...`: runs a command with a private PostgreSQL
//! cluster up, its URL in `PM_TEST_POSTGRES_URL`, so a whole test run shares
//! one cluster instead of starting one per test process.

use std::process::{Command, ExitCode};

use payload_catalog::testing::{PgCluster, URL_VAR};

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let Some(program) = args.next() else {
        eprintln!("usage: with-postgres COMMAND [ARGS...]");
        return ExitCode::from(2);
    };
    let cluster = match PgCluster::start() {
        Ok(cluster) => cluster,
        Err(err) => {
            // Without a cluster the tests start their own or skip (fail in CI).
            eprintln!("with-postgres: no shared cluster ({err}); running without one");
            return run(Command::new(program).args(args));
        }
    };
    eprintln!("with-postgres: PostgreSQL at {}", cluster.url());
    let code = run(Command::new(program).args(args).env(URL_VAR, cluster.url()));
    drop(cluster);
    code
}

fn run(cmd: &mut Command) -> ExitCode {
    match cmd.status() {
        Ok(status) => ExitCode::from(status.code().unwrap_or(1).clamp(0, 255) as u8),
        Err(err) => {
            eprintln!("with-postgres: cannot run the command: {err}");
            ExitCode::from(127)
        }
    }
}

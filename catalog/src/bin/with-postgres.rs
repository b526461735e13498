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
    outlive_interrupts();
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

extern "C" fn ignore(_: libc::c_int) {}

/// Ctrl-C and SIGTERM go to the command, which ends; this process lives on
/// long enough to stop the cluster. A handler (not SIG_IGN) is reset by exec,
/// so the command still gets the default behaviour.
fn outlive_interrupts() {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: installs a handler that does nothing, for this process only.
        unsafe { libc::signal(signal, ignore as *const () as libc::sighandler_t) };
    }
}

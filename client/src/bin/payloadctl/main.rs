//! `payloadctl`: the command-line client of a Payload Manager agent. Tables
//! for people, `--output json` for scripts, and exit codes scripts can branch
//! on (listed in `--help`): every error is mapped from the client's typed
//! error, never from its text.

mod cli;
mod commands;
mod render;
mod stream;
mod transfer;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use payload_client::{Client, ClientError};

use cli::{
    Cli, Command, GlobalArgs, EXIT_CONFLICT, EXIT_NOT_FOUND, EXIT_NO_CAPACITY, EXIT_OK, EXIT_OTHER, EXIT_UNREACHABLE,
    EXIT_USAGE,
};
use render::StdoutClosed;

/// An argument the agent was never asked about was unusable (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

fn main() -> ExitCode {
    // Clap prints its own usage errors and exits with code 2.
    let cli = Cli::try_parse_args(std::env::args_os()).unwrap_or_else(|e| e.exit());
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => return fail(&anyhow::Error::new(err).context("starting the async runtime"), false),
    };
    let token_file = cli.global.token_file.clone();
    let operator = cli.global.operator.is_some();
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::from(EXIT_OK),
        Err(err) if err.downcast_ref::<StdoutClosed>().is_some() => ExitCode::from(EXIT_OK),
        // The operator's own message says which token it takes.
        Err(err) if unauthenticated(&err) && !operator => {
            let hint = match token_file {
                Some(path) => format!(
                    "the token in {} (--token-file or PM_TOKEN_FILE) is not this agent's",
                    path.display()
                ),
                None => "this agent's TCP port needs its token: pass --token-file PATH or set PM_TOKEN_FILE".into(),
            };
            fail(&err.context(hint), operator)
        }
        Err(err) => fail(&err, operator),
    }
}

fn unauthenticated(err: &anyhow::Error) -> bool {
    err.chain().any(|c| {
        matches!(c.downcast_ref::<ClientError>(), Some(ClientError::Other(s)) if s.code() == tonic::Code::Unauthenticated)
    })
}

fn fail(err: &anyhow::Error, operator: bool) -> ExitCode {
    let mut message = describe(err);
    let connect_failed = err
        .chain()
        .any(|c| matches!(c.downcast_ref::<ClientError>(), Some(ClientError::Connect { .. })));
    if connect_failed {
        message.push_str(match operator {
            true => " (is the operator running? `kubectl port-forward` its service, or pass --operator URL)",
            false => " (is the agent running? pass --agent ADDR or set PM_AGENT)",
        });
    }
    let _ = writeln!(std::io::stderr(), "payloadctl: {message}");
    ExitCode::from(exit_code(err))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let Cli {
        global:
            GlobalArgs {
                agent,
                operator,
                ca_file,
                token_file,
                output,
            },
        command,
    } = cli;
    let token = token_file.as_deref().map(read_token).transpose()?;
    let client = match operator {
        Some(url) => {
            if let Some(what) = command.moves_bytes() {
                return Err(UsageError(format!(
                    "`payloadctl {what}` needs the payload's bytes, which only the agent on its node holds: pass \
                     --agent ADDR instead of --operator"
                ))
                .into());
            }
            let ca = match &ca_file {
                Some(path) => {
                    Some(std::fs::read(path).with_context(|| format!("reading --ca-file {}", path.display()))?)
                }
                None => None,
            };
            Client::connect_operator(&url, token.as_deref(), ca.as_deref()).await?
        }
        None => {
            let agent = match agent {
                Some(agent) => agent,
                None => default_agent()?,
            };
            match token {
                Some(token) => Client::connect_with_token(&agent, &token).await?,
                None => Client::connect(&agent).await?,
            }
        }
    };
    match command {
        Command::Put(args) => transfer::put(&client, args, output).await,
        Command::Get(args) => transfer::get(&client, args, output).await,
        Command::Ls(args) => commands::ls(&client, args, output).await,
        Command::Stat(args) => commands::stat(&client, args, output).await,
        Command::Rm(args) => commands::rm(&client, args, output).await,
        Command::Pin(args) => commands::pin(&client, args, output).await,
        Command::Unpin(args) => commands::unpin(&client, args, output).await,
        Command::Spill(args) => commands::spill(&client, args, output).await,
        Command::Promote(args) => commands::promote(&client, args, output).await,
        Command::Lease(args) => commands::lease(&client, args, output).await,
        Command::Stats => commands::stats(&client, output).await,
        Command::Nodes => commands::nodes(&client, output).await,
        Command::Gc(args) => commands::gc(&client, args, output).await,
        Command::Import(args) => commands::import(&client, args, output).await,
        Command::Stream(command) => stream::run(&client, command, output).await,
    }
}

/// The token: the first line of `path`, trimmed.
fn read_token(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading --token-file {}", path.display()))?;
    let token = text.lines().next().unwrap_or_default().trim();
    if token.is_empty() {
        return Err(UsageError(format!(
            "--token-file {} has no token on its first line",
            path.display()
        ))
        .into());
    }
    if !payload_client::is_token(token) {
        return Err(UsageError(format!(
            "--token-file {}: the token on its first line must be one word of printable ASCII",
            path.display()
        ))
        .into());
    }
    Ok(token.to_string())
}

/// The standalone agent's socket, where `payload-agent standalone` puts it by default.
fn default_agent() -> anyhow::Result<String> {
    let state = match std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => match std::env::var_os("HOME").filter(|d| !d.is_empty()) {
            Some(home) => PathBuf::from(home).join(".local/state"),
            None => return Err(UsageError("neither XDG_STATE_HOME nor HOME is set; pass --agent ADDR".into()).into()),
        },
    };
    Ok(state.join("payload-manager/agent.sock").display().to_string())
}

fn exit_code(err: &anyhow::Error) -> u8 {
    for cause in err.chain() {
        if let Some(err) = cause.downcast_ref::<ClientError>() {
            return client_exit_code(err);
        }
        if cause.downcast_ref::<UsageError>().is_some() {
            return EXIT_USAGE;
        }
    }
    EXIT_OTHER
}

fn client_exit_code(err: &ClientError) -> u8 {
    match err {
        ClientError::NotFound(_) => EXIT_NOT_FOUND,
        ClientError::AlreadyExists(_) => EXIT_CONFLICT,
        ClientError::FailedPrecondition(_) => EXIT_CONFLICT,
        ClientError::Aborted(_) => EXIT_CONFLICT,
        ClientError::ResourceExhausted(_) => EXIT_NO_CAPACITY,
        ClientError::InvalidArgument(_) => EXIT_USAGE,
        ClientError::Unavailable(_) => EXIT_UNREACHABLE,
        ClientError::Connect { .. } => EXIT_UNREACHABLE,
        ClientError::Other(_) => EXIT_OTHER,
        ClientError::Io { .. } => EXIT_OTHER,
        ClientError::Protocol(_) => EXIT_OTHER,
    }
}

/// One line: each cause in the chain once, outermost first; a raw gRPC status
/// by its message and code, never its Debug form.
fn describe(err: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in err.chain() {
        let part = match cause.downcast_ref::<ClientError>() {
            Some(ClientError::Other(status)) => {
                format!("agent error: {} ({})", status.message(), status.code().description())
            }
            _ => cause.to_string(),
        };
        if part.is_empty() || text.contains(&part) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn client_errors_keep_their_exit_code_under_context() {
        let cases = [
            (ClientError::NotFound("x".into()), EXIT_NOT_FOUND),
            (ClientError::Aborted("leased".into()), EXIT_CONFLICT),
            (ClientError::FailedPrecondition("pinned".into()), EXIT_CONFLICT),
            (ClientError::ResourceExhausted("full".into()), EXIT_NO_CAPACITY),
            (ClientError::InvalidArgument("bad".into()), EXIT_USAGE),
            (ClientError::Unavailable("down".into()), EXIT_UNREACHABLE),
            (ClientError::Protocol("odd".into()), EXIT_OTHER),
        ];
        for (err, code) in cases {
            let err = Err::<(), _>(err).context("doing something").unwrap_err();
            assert_eq!(exit_code(&err), code, "{err:#}");
        }
        assert_eq!(exit_code(&UsageError("empty".into()).into()), EXIT_USAGE);
        assert_eq!(exit_code(&anyhow::anyhow!("disk on fire")), EXIT_OTHER);
    }

    #[test]
    fn a_raw_status_is_described_without_its_debug_form() {
        let err = anyhow::Error::new(ClientError::Other(tonic::Status::internal("catalog is locked")))
            .context("listing payloads");
        let text = describe(&err);
        assert!(
            text.starts_with("listing payloads: agent error: catalog is locked ("),
            "{text}"
        );
        assert!(!text.contains("MetadataMap"), "{text}");
    }
}

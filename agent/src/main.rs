use clap::Parser;
use payload_agent::cli::{Cli, Command};
use tracing_subscriber::EnvFilter;

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if let Command::Keeper(args) = &cli.command {
        return payload_agent::keeper::run(&args.socket);
    }
    let mut runtime = match cli.worker_threads {
        // One thread: no cross-thread wake-ups on the request path.
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n.into());
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    let runtime = runtime.enable_all().build()?;
    match cli.command {
        Command::Standalone(args) => runtime.block_on(args.run()),
        Command::Node(args) => runtime.block_on(args.run()),
        Command::Keeper(_) => unreachable!("served above"),
    }
}

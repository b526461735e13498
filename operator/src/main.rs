//! `payload-operator`: the Kubernetes operator of Payload Manager. Today it
//! renders what it would apply for a pool; the controllers and the catalog
//! service come next (docs/kubernetes.md).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use payload_operator::crd::PayloadPool;
use payload_operator::pool::desired::{desired, Settings};

#[derive(Parser)]
#[command(version, about = "The Payload Manager operator")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Prints the objects the operator applies for a PayloadPool (its
    /// ServiceAccount, ConfigMap and DaemonSet) as YAML, without a cluster.
    /// A pool read from a file has no uid: a placeholder stands in for it
    /// in the owner references.
    Render {
        /// A PayloadPool manifest (YAML).
        pool: PathBuf,
        /// The namespace the agents run in (the operator's).
        #[arg(long, env = "PM_NAMESPACE", default_value = "payload-manager")]
        namespace: String,
        /// The agent image, for pools that name none.
        #[arg(long, env = "PM_AGENT_IMAGE", default_value = "payload-manager/agent:latest")]
        agent_image: String,
        /// The catalog service the agents report to.
        #[arg(
            long,
            env = "PM_CATALOG_URL",
            default_value = "http://payload-operator.payload-manager.svc:50052"
        )]
        catalog_url: String,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("payload-operator: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let Command::Render {
        pool,
        namespace,
        agent_image,
        catalog_url,
    } = cli.command;
    let text = std::fs::read_to_string(&pool).with_context(|| format!("reading {}", pool.display()))?;
    let mut parsed: PayloadPool =
        serde_saphyr::from_str(&text).with_context(|| format!("{} is not a PayloadPool", pool.display()))?;
    parsed
        .metadata
        .uid
        .get_or_insert_with(|| "00000000-0000-0000-0000-000000000000".into());
    let settings = Settings {
        namespace,
        agent_image,
        catalog_url,
    };
    let objects = desired(&parsed, &settings).map_err(anyhow::Error::msg)?;
    let docs = [
        serde_saphyr::to_string(&objects.service_account)?,
        serde_saphyr::to_string(&objects.config_map)?,
        serde_saphyr::to_string(&objects.daemon_set)?,
    ];
    print!("---\n{}", docs.join("---\n"));
    Ok(())
}

//! `payload-operator`: the Kubernetes operator of Payload Manager. `run`
//! reconciles PayloadPools into their agents' objects; `render` prints what
//! it would apply for a pool; `catalog` serves the cluster catalog to the
//! agents, and reconciles PayloadPolicies into it; `policy` stores a policy
//! without Kubernetes. Leader election comes next (docs/kubernetes.md).

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

/// Where the agents run and what they run: shared by `run` and `render`.
#[derive(clap::Args)]
struct AgentArgs {
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
    /// A Secret (this namespace) whose ca.crt signed the catalog's TLS
    /// certificate; the agents get that key only. Unset: agents verify
    /// nothing (use with an http:// catalog URL only).
    #[arg(long, env = "PM_CATALOG_CA_SECRET")]
    catalog_ca_secret: Option<String>,
}

/// Which of several operators runs the controllers.
#[derive(clap::Args)]
struct Election {
    /// The coordination.k8s.io Lease (in --namespace) whose holder leads;
    /// the others wait, and take over within 15 s of its last renewal.
    #[arg(long, env = "PM_LEADER_LEASE", default_value = "payload-operator")]
    leader_lease: String,
    /// Run the controllers without taking the lease (one operator only).
    #[arg(long, env = "PM_NO_LEADER_ELECTION")]
    no_leader_election: bool,
}

impl AgentArgs {
    fn settings(self) -> Settings {
        let AgentArgs {
            namespace,
            agent_image,
            catalog_url,
            catalog_ca_secret,
        } = self;
        Settings {
            namespace,
            agent_image,
            catalog_url,
            catalog_ca_secret: catalog_ca_secret.filter(|s| !s.is_empty()),
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Reconciles every PayloadPool into its agents' ServiceAccount,
    /// ConfigMap and DaemonSet, and writes each pool's status, until SIGTERM.
    /// Uses the in-cluster ServiceAccount, or the kubeconfig outside a cluster.
    Run {
        #[command(flatten)]
        agents: AgentArgs,
        #[command(flatten)]
        probes: payload_operator::metrics::ProbeArgs,
        #[command(flatten)]
        election: Election,
    },
    /// Prints the objects the operator applies for a PayloadPool (its
    /// ServiceAccount, ConfigMap and DaemonSet) as YAML, without a cluster.
    /// A pool read from a file has no uid: a placeholder stands in for it
    /// in the owner references.
    Render {
        /// A PayloadPool manifest (YAML).
        pool: PathBuf,
        #[command(flatten)]
        agents: AgentArgs,
    },
    /// Serves the cluster catalog on PostgreSQL to the pools' agents
    /// (`payload-agent node --operator URL`), until SIGTERM.
    Catalog(payload_operator::catalog::serve::CatalogArgs),
    /// Stores or removes a PayloadPolicy in a catalog directly, without
    /// Kubernetes (in a cluster the controller in `catalog` does it).
    #[command(subcommand)]
    Policy(payload_operator::policy::cli::PolicyCommand),
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
    match cli.command {
        Command::Run {
            agents,
            probes,
            election,
        } => controllers(agents.settings(), probes, election),
        Command::Render { pool, agents } => render(&pool, &agents.settings()),
        Command::Catalog(args) => {
            logs();
            let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
            runtime.block_on(args.run())
        }
        Command::Policy(command) => {
            let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
            runtime.block_on(command.run())
        }
    }
}

fn logs() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
}

fn controllers(
    settings: Settings,
    probes: payload_operator::metrics::ProbeArgs,
    election: Election,
) -> anyhow::Result<()> {
    logs();
    let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
    runtime.block_on(async {
        let metrics = std::sync::Arc::new(payload_operator::metrics::Metrics::default());
        let (ready, readiness) = tokio::sync::watch::channel(false);
        probes.start(metrics.clone(), readiness).await?;
        let client = kube::Client::try_default()
            .await
            .context("connecting to the Kubernetes API (in a cluster, or through KUBECONFIG)")?;
        client
            .apiserver_version()
            .await
            .context("asking the Kubernetes API for its version (in a cluster, or through KUBECONFIG)")?;
        let _ = ready.send(true);
        let elector = (!election.no_leader_election).then(|| {
            // The pod's name (the chart passes it); HOSTNAME is the same in a pod.
            let me = std::env::var("POD_NAME")
                .or_else(|_| std::env::var("HOSTNAME"))
                .unwrap_or_else(|_| format!("payload-operator-{}", std::process::id()));
            payload_operator::leader::Elector::new(client.clone(), &settings.namespace, &election.leader_lease, &me)
        });
        if let Some(elector) = &elector {
            elector.acquire().await;
            tracing::info!(lease = %election.leader_lease, "leading");
        }
        tracing::info!(namespace = %settings.namespace, "reconciling PayloadPools");
        let ctx = payload_operator::pool::reconcile::Context {
            events: Some(payload_operator::events::recorder(client.clone(), "payload-operator")),
            client,
            settings,
            metrics,
        };
        let Some(elector) = elector else {
            payload_operator::pool::run(ctx).await;
            return Ok(());
        };
        tokio::select! {
            () = payload_operator::pool::run(ctx) => Ok(()),
            lost = elector.keep() => Err(anyhow::anyhow!("{lost}; stopping so another operator leads")),
        }
    })
}

fn render(pool: &std::path::Path, settings: &Settings) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(pool).with_context(|| format!("reading {}", pool.display()))?;
    let mut parsed: PayloadPool =
        serde_saphyr::from_str(&text).with_context(|| format!("{} is not a PayloadPool", pool.display()))?;
    parsed
        .metadata
        .uid
        .get_or_insert_with(|| "00000000-0000-0000-0000-000000000000".into());
    let objects = desired(&parsed, settings).map_err(anyhow::Error::msg)?;
    let docs = [
        serde_saphyr::to_string(&objects.service_account)?,
        serde_saphyr::to_string(&objects.config_map)?,
        serde_saphyr::to_string(&objects.daemon_set)?,
    ];
    print!("---\n{}", docs.join("---\n"));
    Ok(())
}

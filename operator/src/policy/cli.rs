//! `payload-operator policy`: stores a PayloadPolicy in a catalog without
//! Kubernetes (standalone agents sharing a catalog, tests), compiled and
//! checked exactly as the controller does.

use std::path::PathBuf;

use anyhow::Context;

use super::compile::{compile, not_applied};
use super::reconcile::Store;
use crate::crd::PayloadPolicy;

#[derive(clap::Subcommand, Debug)]
pub enum PolicyCommand {
    /// Checks a PayloadPolicy manifest (YAML) and stores it; every agent of
    /// the catalog applies it within seconds. Its namespace is
    /// metadata.namespace (default: `default`).
    Apply {
        #[command(flatten)]
        catalog: CatalogUrl,
        /// The manifest.
        file: PathBuf,
    },
    /// Removes a stored policy (NAMESPACE/NAME); removing one that is not
    /// there is not an error.
    Delete {
        #[command(flatten)]
        catalog: CatalogUrl,
        /// The policy, as NAMESPACE/NAME.
        policy: String,
    },
}

#[derive(clap::Args, Debug)]
pub struct CatalogUrl {
    /// The catalog: postgres://USER@HOST:PORT/DB (the cluster's) or
    /// sqlite:PATH (a standalone agent's).
    #[arg(long, env = "PM_DATABASE")]
    database: String,
}

impl CatalogUrl {
    async fn open(&self) -> anyhow::Result<Store> {
        let shown = payload_catalog::redact_url(&self.database);
        let opened = if self.database.starts_with("sqlite:") {
            // As the standalone agent names itself: opening a catalog as
            // another node would claim its rows of an older schema.
            payload_catalog::SqliteRepository::open_url(&self.database, "standalone")
                .await
                .map(Store::Sqlite)
        } else {
            payload_catalog::PgRepository::connect(&self.database, "payload-operator")
                .await
                .map(Store::Postgres)
        };
        opened.with_context(|| format!("opening the catalog {shown}"))
    }
}

impl PolicyCommand {
    pub async fn run(self) -> anyhow::Result<()> {
        match self {
            PolicyCommand::Apply { catalog, file } => {
                let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
                let head: serde_json::Value =
                    serde_saphyr::from_str(&text).with_context(|| format!("{} is not YAML", file.display()))?;
                let (api, kind) = (&head["apiVersion"], &head["kind"]);
                anyhow::ensure!(
                    api == "payload-manager.io/v1alpha1" && kind == "PayloadPolicy",
                    "{} is a {kind} of {api}, not a PayloadPolicy of payload-manager.io/v1alpha1",
                    file.display()
                );
                let policy: PayloadPolicy = serde_saphyr::from_str(&text)
                    .with_context(|| format!("{} is not a PayloadPolicy", file.display()))?;
                let namespace = policy.metadata.namespace.as_deref().unwrap_or("default");
                let name = policy
                    .metadata
                    .name
                    .as_deref()
                    .with_context(|| format!("{} has no metadata.name", file.display()))?;
                let generation = policy.metadata.generation.unwrap_or(1);
                let compiled = compile(namespace, name, generation, &policy.spec).map_err(anyhow::Error::msg)?;
                catalog.open().await?.put(&compiled).await?;
                println!("policy {} stored; agents apply it within seconds", compiled.key());
                let unapplied = not_applied(&policy.spec);
                if !unapplied.is_empty() {
                    println!("note: agents do not apply {} yet", unapplied.join(", "));
                }
            }
            PolicyCommand::Delete { catalog, policy } => {
                let (namespace, name) = policy
                    .split_once('/')
                    .filter(|(ns, name)| !ns.is_empty() && !name.is_empty())
                    .with_context(|| format!("{policy:?} is not NAMESPACE/NAME"))?;
                catalog.open().await?.delete(namespace, name).await?;
                println!("policy {namespace}/{name} removed");
            }
        }
        Ok(())
    }
}

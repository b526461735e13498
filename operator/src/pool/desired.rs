//! What a `PayloadPool` becomes, as a pure function of the pool and the
//! operator's settings: the agents' ServiceAccount, the ConfigMap of their
//! settings (the agent's own `PM_*` variables) and the DaemonSet that runs
//! them. Every object is owned by the pool, so deleting the pool deletes
//! them. The agents get no RBAC on purpose: they never call the API server
//! (they talk to the operator's catalog service with a projected token).

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{DaemonSet, DaemonSetSpec, DaemonSetUpdateStrategy, RollingUpdateDaemonSet};
use k8s_openapi::api::core::v1::{
    ConfigMap, ConfigMapEnvSource, Container, ContainerPort, EnvFromSource, EnvVar, EnvVarSource, HTTPGetAction,
    HostPathVolumeSource, KeyToPath, ObjectFieldSelector, PodSpec, PodTemplateSpec, Probe, ProjectedVolumeSource,
    ResourceRequirements, SecretKeySelector, SecretProjection, ServiceAccount, ServiceAccountTokenProjection, Volume,
    VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use sha2::{Digest, Sha256};

use crate::crd::PayloadPool;
use crate::quantity;

/// The audience of the agents' projected token: the catalog service
/// accepts no token minted for anything else.
pub const TOKEN_AUDIENCE: &str = "payload-manager-catalog";
/// The longest pool name: `payload-agent-<pool>` is a label value (63).
const MAX_POOL_NAME: usize = 49;
/// The agent's `/metrics`, `/healthz` and `/readyz` (the pod's own
/// network: nothing else on the host listens there).
pub const AGENT_METRICS_PORT: i32 = 9464;
/// Memory the agent needs besides the RAM tier it holds.
const AGENT_OVERHEAD: u64 = 512 << 20;
/// Where things are inside the agent's container.
const SOCKET_DIR: &str = "/run/payload-manager";
const STATE_DIR: &str = "/var/lib/payload-manager";
const DISK_DIR: &str = "/var/lib/payload-manager-disk";
const TOKEN_DIR: &str = "/var/run/secrets/payload-manager";

/// The operator's side of the objects: where they go and what they run.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The operator's namespace: the agents run there.
    pub namespace: String,
    /// The agent image when the pool names none.
    pub agent_image: String,
    /// The catalog service the agents report to.
    pub catalog_url: String,
    /// A Secret in the operator's namespace whose `ca.crt` signed the
    /// catalog's certificate: projected into the agents (that key only),
    /// which then verify the catalog's TLS.
    pub catalog_ca_secret: Option<String>,
}

/// The objects of one pool, in the order they are applied.
#[derive(Clone, Debug, PartialEq)]
pub struct Desired {
    pub service_account: ServiceAccount,
    pub config_map: ConfigMap,
    pub daemon_set: DaemonSet,
}

/// The host directories a pool's pods share with its agents.
pub fn host_paths(pool: &str, huge_pages: bool) -> (String, String) {
    let ram = match huge_pages {
        true => format!("/dev/hugepages/payload-manager-{pool}"),
        false => format!("/dev/shm/payload-manager-{pool}"),
    };
    (format!("/run/payload-manager/{pool}"), ram)
}

/// The objects `pool` asks for, or why it cannot have them (a message for
/// its status).
pub fn desired(pool: &PayloadPool, settings: &Settings) -> Result<Desired, String> {
    let name = pool.metadata.name.clone().ok_or("the pool has no name")?;
    if name.len() > MAX_POOL_NAME {
        return Err(format!(
            "the pool's name is {} characters; at most {MAX_POOL_NAME} fit in its agents' object names",
            name.len()
        ));
    }
    let owner = pool
        .controller_owner_ref(&())
        .ok_or("the pool has no uid yet (it was not read from the API server)")?;
    let object = format!("payload-agent-{name}");
    let labels = labels(&name);
    let meta = ObjectMeta {
        name: Some(object.clone()),
        namespace: Some(settings.namespace.clone()),
        labels: Some(labels.clone()),
        owner_references: Some(vec![owner]),
        ..Default::default()
    };
    let env = agent_env(pool, settings)?;
    let config_map = ConfigMap {
        metadata: meta.clone(),
        data: Some(env),
        ..Default::default()
    };
    let service_account = ServiceAccount {
        metadata: meta.clone(),
        // Only the projected token of our audience is mounted.
        automount_service_account_token: Some(false),
        ..Default::default()
    };
    let daemon_set = DaemonSet {
        metadata: meta,
        spec: Some(DaemonSetSpec {
            selector: LabelSelector {
                match_labels: Some(labels.clone()),
                ..Default::default()
            },
            // One node at a time: the node's payloads wait for its agent.
            update_strategy: Some(DaemonSetUpdateStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDaemonSet {
                    max_unavailable: Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(1)),
                    ..Default::default()
                }),
            }),
            template: pod_template(pool, &name, &object, labels, &config_map, settings)?,
            ..Default::default()
        }),
        ..Default::default()
    };
    Ok(Desired {
        service_account,
        config_map,
        daemon_set,
    })
}

fn labels(pool: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".into(), "payload-agent".into()),
        ("app.kubernetes.io/instance".into(), pool.into()),
        ("app.kubernetes.io/managed-by".into(), "payload-operator".into()),
        ("payload-manager.io/pool".into(), pool.into()),
    ])
}

/// The agent's settings, as the variables its flags read.
fn agent_env(pool: &PayloadPool, settings: &Settings) -> Result<BTreeMap<String, String>, String> {
    let spec = &pool.spec;
    let mut env = BTreeMap::from([
        ("PM_SOCKET".to_string(), format!("{SOCKET_DIR}/agent.sock")),
        ("PM_STATE_DIR".into(), STATE_DIR.into()),
        ("PM_RAM_ROOT".into(), "/dev/shm".into()),
        ("PM_LISTEN".into(), "off".into()),
        ("PM_METRICS_LISTEN".into(), format!("0.0.0.0:{AGENT_METRICS_PORT}")),
        ("PM_OPERATOR".into(), settings.catalog_url.clone()),
        ("PM_OPERATOR_TOKEN_FILE".into(), format!("{TOKEN_DIR}/token")),
        ("PM_POOL".into(), pool.name_any()),
        ("PM_READ_ACCESS".into(), spec.agent.read_access.flag().into()),
        (
            "PM_RAM_CAPACITY".into(),
            quantity::bytes("ram.capacity", &spec.ram.capacity)?.to_string(),
        ),
    ]);
    if settings.catalog_ca_secret.is_some() {
        env.insert("PM_OPERATOR_CA_FILE".into(), format!("{TOKEN_DIR}/ca.crt"));
    }
    let marks = &spec.watermarks;
    for tier in ["RAM", "DISK"] {
        env.insert(format!("PM_{tier}_HIGH_WATERMARK"), marks.high.to_string());
        env.insert(format!("PM_{tier}_LOW_WATERMARK"), marks.low.to_string());
    }
    if let Some(disk) = &spec.disk {
        env.insert("PM_DISK_ROOT".into(), DISK_DIR.into());
        env.insert(
            "PM_DISK_CAPACITY".into(),
            quantity::bytes("disk.capacity", &disk.capacity)?.to_string(),
        );
    }
    if let Some(object) = &spec.object_store {
        env.insert("PM_OBJECT_STORE".into(), object.url.clone());
        if let Some(endpoint) = &object.endpoint {
            env.insert("AWS_ENDPOINT_URL".into(), endpoint.clone());
        }
        if let Some(region) = &object.region {
            env.insert("AWS_REGION".into(), region.clone());
        }
    }
    if let Some(gpu) = &spec.gpu {
        env.insert("PM_GPU_DEVICES".into(), gpu.devices.join(","));
        let share = match (&gpu.capacity, gpu.fraction) {
            (Some(bytes), _) => quantity::bytes("gpu.capacity", bytes)?.to_string(),
            (None, Some(fraction)) => fraction.to_string(),
            (None, None) => "0.9".into(),
        };
        env.insert("PM_GPU_CAPACITY".into(), share);
    }
    Ok(env)
}

/// The agent's token for the catalog, and the CA that signed the catalog's
/// certificate (only that key of its Secret: never the private key).
fn catalog_credentials(settings: &Settings) -> Vec<VolumeProjection> {
    let mut sources = vec![VolumeProjection {
        service_account_token: Some(ServiceAccountTokenProjection {
            audience: Some(TOKEN_AUDIENCE.into()),
            expiration_seconds: Some(3600),
            path: "token".into(),
        }),
        ..Default::default()
    }];
    if let Some(secret) = &settings.catalog_ca_secret {
        sources.push(VolumeProjection {
            secret: Some(SecretProjection {
                name: secret.clone(),
                items: Some(vec![KeyToPath {
                    key: "ca.crt".into(),
                    path: "ca.crt".into(),
                    mode: None,
                }]),
                optional: Some(false),
            }),
            ..Default::default()
        });
    }
    sources
}

fn pod_template(
    pool: &PayloadPool,
    name: &str,
    object: &str,
    labels: BTreeMap<String, String>,
    config: &ConfigMap,
    settings: &Settings,
) -> Result<PodTemplateSpec, String> {
    let spec = &pool.spec;
    // A changed ConfigMap rolls the agents: its digest is in the template.
    let digest = Sha256::digest(serde_json::to_vec(&config.data).map_err(|e| e.to_string())?);
    let annotations = BTreeMap::from([(
        "payload-manager.io/config-digest".to_string(),
        hex::encode(&digest[..8]),
    )]);
    let (socket_host, ram_host) = host_paths(name, spec.ram.huge_pages);
    let mut volumes = vec![
        host_dir("socket", &socket_host),
        host_dir("ram", &ram_host),
        host_dir("state", &format!("/var/lib/payload-manager/{name}")),
        Volume {
            name: "token".into(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(catalog_credentials(settings)),
                ..Default::default()
            }),
            ..Default::default()
        },
    ];
    let mut mounts = vec![
        mount("socket", SOCKET_DIR, false),
        mount("ram", "/dev/shm", false),
        mount("state", STATE_DIR, false),
        mount("token", TOKEN_DIR, true),
    ];
    if let Some(disk) = &spec.disk {
        volumes.push(host_dir("disk", &disk.path));
        mounts.push(mount("disk", DISK_DIR, false));
    }
    let mut env = vec![EnvVar {
        name: "PM_NODE_NAME".into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: "spec.nodeName".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }];
    if let Some(secret) = spec.object_store.as_ref().and_then(|o| o.credentials_secret.as_ref()) {
        for key in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"] {
            env.push(EnvVar {
                name: key.into(),
                value_from: Some(EnvVarSource {
                    secret_key_ref: Some(SecretKeySelector {
                        name: secret.clone(),
                        key: key.into(),
                        optional: Some(false),
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            });
        }
    }
    let agent = Container {
        name: "agent".into(),
        image: Some(spec.agent.image.clone().unwrap_or_else(|| settings.agent_image.clone())),
        args: Some(vec!["node".into()]),
        env: Some(env),
        env_from: Some(vec![EnvFromSource {
            config_map_ref: Some(ConfigMapEnvSource {
                name: object.into(),
                optional: Some(false),
            }),
            ..Default::default()
        }]),
        resources: Some(match &spec.agent.resources {
            Some(resources) => resources.clone(),
            None => guaranteed(pool)?,
        }),
        volume_mounts: Some(mounts),
        ports: Some(vec![ContainerPort {
            name: Some("metrics".into()),
            container_port: AGENT_METRICS_PORT,
            ..Default::default()
        }]),
        // The agent answers /healthz while it recovers (which may hash a
        // whole disk tier after a reboot); ten minutes to start serving.
        startup_probe: Some(probe("/healthz", 60)),
        liveness_probe: Some(probe("/healthz", 3)),
        readiness_probe: Some(probe("/readyz", 2)),
        ..Default::default()
    };
    Ok(PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(labels),
            annotations: Some(annotations),
            ..Default::default()
        }),
        spec: Some(PodSpec {
            service_account_name: Some(object.into()),
            automount_service_account_token: Some(false),
            node_selector: (!spec.node_selector.is_empty()).then(|| spec.node_selector.clone()),
            tolerations: (!spec.tolerations.is_empty()).then(|| spec.tolerations.clone()),
            priority_class_name: Some(
                spec.agent
                    .priority_class_name
                    .clone()
                    .unwrap_or_else(|| "system-node-critical".into()),
            ),
            containers: vec![agent],
            volumes: Some(volumes),
            // The agent drains its clients and journal on SIGTERM.
            termination_grace_period_seconds: Some(60),
            ..Default::default()
        }),
    })
}

/// An HTTP probe of the agent's metrics port, failed after `failures`
/// misses in a row.
fn probe(path: &str, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("metrics".into()),
            ..Default::default()
        }),
        period_seconds: Some(10),
        // A scrape of a large node may take a moment.
        timeout_seconds: Some(5),
        failure_threshold: Some(failures),
        ..Default::default()
    }
}

/// Requests equal to limits (Guaranteed QoS), the memory sized so the
/// pages the agent reserves for the RAM tier are charged to it.
fn guaranteed(pool: &PayloadPool) -> Result<ResourceRequirements, String> {
    let ram = quantity::bytes("ram.capacity", &pool.spec.ram.capacity)?;
    let mut amounts = BTreeMap::from([("cpu".to_string(), Quantity("1".into()))]);
    if pool.spec.ram.huge_pages {
        amounts.insert("memory".into(), Quantity(AGENT_OVERHEAD.to_string()));
        // Whole 2 MiB pages.
        let pages = ram.div_ceil(2 << 20) * (2 << 20);
        amounts.insert("hugepages-2Mi".into(), Quantity(pages.to_string()));
    } else {
        amounts.insert("memory".into(), Quantity((ram + AGENT_OVERHEAD).to_string()));
    }
    Ok(ResourceRequirements {
        requests: Some(amounts.clone()),
        limits: Some(amounts),
        ..Default::default()
    })
}

fn host_dir(name: &str, path: &str) -> Volume {
    Volume {
        name: name.into(),
        host_path: Some(HostPathVolumeSource {
            path: path.into(),
            type_: Some("DirectoryOrCreate".into()),
        }),
        ..Default::default()
    }
}

fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: read_only.then_some(true),
        ..Default::default()
    }
}

//! What a pool becomes: the agents' objects, built from the example pool and
//! variants of it.

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Container, PodSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use payload_operator::crd::PayloadPool;
use payload_operator::pool::desired::{desired, host_paths, Desired, Settings, TOKEN_AUDIENCE};

fn example() -> PayloadPool {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/examples/payloadpool.yaml");
    let mut pool: PayloadPool = serde_saphyr::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    pool.metadata.uid = Some("6c1f0e6a-52c3-4b8e-9d0e-4a3f1b2c9d10".into());
    pool
}

fn settings() -> Settings {
    Settings {
        namespace: "payload-manager".into(),
        agent_image: "registry.example/payload-agent:1.0".into(),
        catalog_url: "https://payload-operator.payload-manager.svc:50052".into(),
        catalog_ca_secret: Some("payload-manager-catalog-tls".into()),
    }
}

fn build(pool: &PayloadPool) -> Desired {
    desired(pool, &settings()).unwrap()
}

fn pod(ds: &DaemonSet) -> &PodSpec {
    ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap()
}

fn agent(ds: &DaemonSet) -> &Container {
    &pod(ds).containers[0]
}

fn digest(ds: &DaemonSet) -> String {
    let template = &ds.spec.as_ref().unwrap().template;
    template.metadata.as_ref().unwrap().annotations.as_ref().unwrap()["payload-manager.io/config-digest"].clone()
}

#[test]
fn every_object_is_owned_by_the_pool_and_lives_in_the_operators_namespace() {
    let pool = example();
    let objects = build(&pool);
    for meta in [
        &objects.service_account.metadata,
        &objects.config_map.metadata,
        &objects.daemon_set.metadata,
    ] {
        assert_eq!(meta.name.as_deref(), Some("payload-agent-gpu-nodes"));
        assert_eq!(meta.namespace.as_deref(), Some("payload-manager"));
        let owner = &meta.owner_references.as_ref().unwrap()[0];
        assert_eq!((owner.kind.as_str(), owner.name.as_str()), ("PayloadPool", "gpu-nodes"));
        assert_eq!(owner.uid, pool.metadata.uid.clone().unwrap());
        assert_eq!(owner.controller, Some(true));
    }
    let ds = &objects.daemon_set;
    let selector = ds.spec.as_ref().unwrap().selector.match_labels.as_ref().unwrap();
    let labels = ds
        .spec
        .as_ref()
        .unwrap()
        .template
        .metadata
        .as_ref()
        .unwrap()
        .labels
        .as_ref()
        .unwrap();
    assert!(
        selector.iter().all(|(k, v)| labels.get(k) == Some(v)),
        "the selector matches the pods"
    );
}

#[test]
fn the_agents_run_where_the_pool_says_with_its_settings() {
    let pool = example();
    let objects = build(&pool);
    let ds = &objects.daemon_set;
    assert_eq!(pod(ds).node_selector.as_ref(), Some(&pool.spec.node_selector));
    assert_eq!(pod(ds).tolerations.as_deref(), Some(&pool.spec.tolerations[..]));
    assert_eq!(pod(ds).priority_class_name.as_deref(), Some("system-node-critical"));
    assert_eq!(agent(ds).image.as_deref(), Some("registry.example/payload-agent:1.0"));
    let env = objects.config_map.data.as_ref().unwrap();
    assert_eq!(env["PM_RAM_CAPACITY"], (64u64 << 30).to_string());
    assert_eq!(env["PM_POOL"], "gpu-nodes", "heartbeats name the pool");
    assert_eq!(env["PM_READ_ACCESS"], "owner", "the agent's own default");
    assert_eq!(env["PM_DISK_CAPACITY"], (1u64 << 40).to_string());
    assert_eq!(env["PM_RAM_LOW_WATERMARK"], "0.7");
    assert_eq!(env["PM_OBJECT_STORE"], "s3://models-cache/payloads");
    assert_eq!(env["PM_OPERATOR"], settings().catalog_url);
    assert_eq!(env["PM_LISTEN"], "off", "pods reach the agent through its socket only");
    assert_eq!(env["PM_OPERATOR_TOKEN_FILE"], "/var/run/secrets/payload-manager/token");
    assert_eq!(env["PM_OPERATOR_CA_FILE"], "/var/run/secrets/payload-manager/ca.crt");
    // Its probes and metrics on the port the container names.
    assert_eq!(env["PM_METRICS_LISTEN"], "0.0.0.0:9464");
    let port = &agent(ds).ports.as_ref().unwrap()[0];
    assert_eq!((port.name.as_deref(), port.container_port), (Some("metrics"), 9464));
    let path = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        let get = p.as_ref().unwrap().http_get.as_ref().unwrap();
        (get.path.clone().unwrap(), get.port.clone())
    };
    let named = k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String("metrics".into());
    assert_eq!(path(&agent(ds).readiness_probe), ("/readyz".into(), named.clone()));
    assert_eq!(path(&agent(ds).liveness_probe), ("/healthz".into(), named.clone()));
    assert_eq!(path(&agent(ds).startup_probe), ("/healthz".into(), named));
    // The credentials come from the Secret, never through the ConfigMap.
    assert!(env
        .keys()
        .all(|k| !k.starts_with("AWS_ACCESS") && !k.starts_with("AWS_SECRET")));
    let secrets: Vec<_> = agent(ds)
        .env
        .iter()
        .flatten()
        .filter_map(|e| e.value_from.as_ref()?.secret_key_ref.as_ref())
        .map(|s| (s.name.as_str(), s.key.as_str()))
        .collect();
    assert_eq!(
        secrets,
        [
            ("payload-s3", "AWS_ACCESS_KEY_ID"),
            ("payload-s3", "AWS_SECRET_ACCESS_KEY")
        ]
    );
}

#[test]
fn the_agents_get_their_catalog_token_and_only_the_ca_of_the_catalogs_secret() {
    let objects = build(&example());
    let volumes = pod(&objects.daemon_set).volumes.as_ref().unwrap();
    let token = volumes.iter().find(|v| v.name == "token").unwrap();
    let sources = token.projected.as_ref().unwrap().sources.as_ref().unwrap();
    let minted = sources[0].service_account_token.as_ref().unwrap();
    assert_eq!(minted.audience.as_deref(), Some("payload-manager-catalog"));
    let secret = sources[1].secret.as_ref().unwrap();
    assert_eq!(secret.name, "payload-manager-catalog-tls");
    let keys: Vec<_> = secret.items.iter().flatten().map(|k| k.key.as_str()).collect();
    assert_eq!(keys, ["ca.crt"], "never the catalog's private key");
    // Without a CA Secret, the token alone (an http:// catalog).
    let mut plain = settings();
    plain.catalog_ca_secret = None;
    let objects = payload_operator::pool::desired::desired(&example(), &plain).unwrap();
    let volumes = pod(&objects.daemon_set).volumes.clone().unwrap();
    let token = volumes.iter().find(|v| v.name == "token").unwrap();
    assert_eq!(token.projected.as_ref().unwrap().sources.as_ref().unwrap().len(), 1);
    assert!(!objects.config_map.data.unwrap().contains_key("PM_OPERATOR_CA_FILE"));
}

#[test]
fn pods_share_host_directories_never_a_socket_file() {
    let objects = build(&example());
    let ds = &objects.daemon_set;
    let volumes = pod(ds).volumes.as_ref().unwrap();
    let host = |name: &str| {
        let v = volumes.iter().find(|v| v.name == name).unwrap();
        let h = v.host_path.as_ref().unwrap();
        (h.path.clone(), h.type_.clone().unwrap())
    };
    let (socket_dir, ram_dir) = host_paths("gpu-nodes", true);
    assert_eq!(host("socket"), (socket_dir, "DirectoryOrCreate".into()));
    assert_eq!(host("ram"), (ram_dir, "DirectoryOrCreate".into()));
    assert_eq!(host("disk").0, "/mnt/nvme/payloads");
    let mounts = agent(ds).volume_mounts.as_ref().unwrap();
    let ram = mounts.iter().find(|m| m.name == "ram").unwrap();
    assert_eq!(ram.mount_path, "/dev/shm", "v1 clients open /dev/shm/<shm_name>");
    // The only credential mounted is the token of the catalog's audience.
    assert_eq!(pod(ds).automount_service_account_token, Some(false));
    let token = volumes.iter().find(|v| v.name == "token").unwrap();
    let projection = &token.projected.as_ref().unwrap().sources.as_ref().unwrap()[0];
    let audience = projection.service_account_token.as_ref().unwrap().audience.as_deref();
    assert_eq!(audience, Some(TOKEN_AUDIENCE));
}

#[test]
fn the_agent_is_guaranteed_the_memory_of_its_ram_tier() {
    let mut pool = example();
    pool.spec.ram.huge_pages = false;
    pool.spec.ram.capacity = Quantity("8Gi".into());
    let ds = build(&pool).daemon_set;
    let resources = agent(&ds).resources.clone().unwrap();
    assert_eq!(resources.requests, resources.limits, "Guaranteed QoS");
    let limits = resources.limits.unwrap();
    assert_eq!(limits["memory"], Quantity(((8u64 << 30) + (512 << 20)).to_string()));
    assert!(!limits.contains_key("hugepages-2Mi"));
    // With huge pages the tier is in hugepages, whole 2 MiB pages of it.
    pool.spec.ram.huge_pages = true;
    pool.spec.ram.capacity = Quantity("3M".into());
    let limits = agent(&build(&pool).daemon_set)
        .resources
        .clone()
        .unwrap()
        .limits
        .unwrap();
    assert_eq!(limits["hugepages-2Mi"], Quantity((4u64 << 20).to_string()));
    // Resources the pool names are used as they are.
    let mut own = example();
    own.spec.agent.resources = Some(Default::default());
    assert_eq!(agent(&build(&own).daemon_set).resources, Some(Default::default()));
}

#[test]
fn a_settings_change_rolls_the_agents_and_nothing_else_does() {
    let pool = example();
    let before = digest(&build(&pool).daemon_set);
    let mut moved = pool.clone();
    moved.spec.tolerations.clear();
    assert_eq!(
        digest(&build(&moved).daemon_set),
        before,
        "the template changes by itself"
    );
    let mut bigger = pool.clone();
    bigger.spec.ram.capacity = Quantity("65Gi".into());
    assert_ne!(digest(&build(&bigger).daemon_set), before);
}

#[test]
fn a_pool_that_cannot_be_built_says_why() {
    let mut no_uid = example();
    no_uid.metadata.uid = None;
    assert!(desired(&no_uid, &settings()).unwrap_err().contains("no uid"));
    let mut fractional = example();
    fractional.spec.ram.capacity = Quantity("500m".into());
    let err = desired(&fractional, &settings()).unwrap_err();
    assert!(
        err.contains("ram.capacity") && err.contains("fraction of a byte"),
        "{err}"
    );
    let mut long = example();
    long.metadata.name = Some("p".repeat(50));
    assert!(desired(&long, &settings()).unwrap_err().contains("at most 49"));
    let rule = long.validate_cel();
    assert!(format!("{rule:?}").contains("at most 49 characters"), "{rule:?}");
}

#[test]
fn a_pool_read_by_every_pod_opens_its_agents_socket_to_them() {
    let mut pool = example();
    pool.spec.agent.read_access = payload_operator::crd::ReadAccess::Node;
    let env = build(&pool).config_map.data.unwrap();
    assert_eq!(env["PM_READ_ACCESS"], "node");
}

/// The example workload of docs/pods.md mounts the directories the pool's
/// agents use, and runs where they run.
#[test]
fn the_example_workload_mounts_the_example_pools_directories() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/examples/pod-reader.yaml");
    let workload: k8s_openapi::api::apps::v1::Deployment =
        serde_saphyr::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let pod = workload.spec.unwrap().template.spec.unwrap();
    let host = |name: &str| {
        let volume = pod.volumes.as_ref().unwrap().iter().find(|v| v.name == name).unwrap();
        volume.host_path.as_ref().unwrap().path.clone()
    };
    let pool = example();
    let (socket, ram) = host_paths("gpu-nodes", pool.spec.ram.huge_pages);
    assert_eq!(host("payload-socket"), socket);
    assert_eq!(host("payload-ram"), ram);
    assert_eq!(pod.node_selector.as_ref(), Some(&pool.spec.node_selector));
    let mounts = pod.containers[0].volume_mounts.as_ref().unwrap();
    assert!(mounts
        .iter()
        .any(|m| m.name == "payload-ram" && m.mount_path == "/dev/shm"));
}

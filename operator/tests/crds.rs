//! The CRDs as the API server sees them: the files in `crds/` are what the
//! types generate, every field is documented, conditions merge by type, and
//! the CEL rules refuse what they should (evaluated by kube-cel, a Rust
//! implementation of Kubernetes' CEL libraries) with the message they give.

use kube::CustomResourceExt;
use payload_operator::crd::{self, PayloadPolicy, PayloadPool};
use serde_json::{json, Value};

fn repo(path: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

fn example<T: serde::de::DeserializeOwned>(name: &str) -> T {
    let text = std::fs::read_to_string(repo("docs/examples").join(name)).unwrap();
    serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// `value` with the JSON at `pointer` replaced by `with` (or removed, for null).
fn edit<T: serde::Serialize + serde::de::DeserializeOwned>(value: &T, pointer: &str, with: Value) -> T {
    let mut json = serde_json::to_value(value).unwrap();
    let (parent, key) = pointer.rsplit_once('/').unwrap();
    let object = json.pointer_mut(parent).unwrap().as_object_mut().unwrap();
    match with {
        Value::Null => object.remove(key),
        with => object.insert(key.to_string(), with),
    };
    serde_json::from_value(json).unwrap()
}

/// The messages of the rules `result` says were broken.
fn broken(result: Result<(), kube::core::cel::ValidationErrors>) -> String {
    match result {
        Ok(()) => String::new(),
        Err(errors) => format!("{errors:?}"),
    }
}

#[test]
fn the_crds_in_the_tree_are_what_the_types_generate() {
    for dir in ["crds", "charts/payload-manager/crds"] {
        for (name, crd) in crd::all() {
            let on_disk = std::fs::read_to_string(repo(dir).join(name)).unwrap_or_default();
            assert!(
                on_disk == crd::yaml(&crd).unwrap(),
                "{dir}/{name} is out of date: run `make crds`"
            );
        }
    }
}

/// Every property below `schema`, by its path, with its schema.
fn properties<'a>(path: String, schema: &'a Value, out: &mut Vec<(String, &'a Value)>) {
    if let Some(props) = schema.get("properties").and_then(Value::as_object) {
        for (name, prop) in props {
            let at = format!("{path}.{name}");
            out.push((at.clone(), prop));
            properties(at, prop, out);
        }
    }
    if let Some(items) = schema.get("items") {
        properties(format!("{path}[]"), items, out);
    }
}

#[test]
fn every_field_is_documented_for_kubectl_explain() {
    for (name, crd) in crd::all() {
        let schema = serde_json::to_value(&crd.spec.versions[0].schema).unwrap();
        let mut all = Vec::new();
        properties(String::new(), &schema["openAPIV3Schema"], &mut all);
        assert!(all.len() > 20, "{name}: {} properties", all.len());
        // apiVersion, kind and metadata are Kubernetes' own.
        let undocumented: Vec<_> = all
            .iter()
            .filter(|(path, prop)| path.matches('.').count() > 1 && prop.get("description").is_none())
            .map(|(path, _)| path.as_str())
            .collect();
        assert!(undocumented.is_empty(), "{name}: no description on {undocumented:?}");
    }
}

#[test]
fn conditions_merge_by_type_and_the_status_is_a_subresource() {
    for (name, crd) in crd::all() {
        let version = &crd.spec.versions[0];
        assert!(version.subresources.as_ref().unwrap().status.is_some(), "{name}");
        let schema = serde_json::to_value(&version.schema).unwrap();
        let conditions = &schema["openAPIV3Schema"]["properties"]["status"]["properties"]["conditions"];
        assert_eq!(conditions["x-kubernetes-list-type"], "map", "{name}");
        assert_eq!(conditions["x-kubernetes-list-map-keys"], json!(["type"]), "{name}");
        let columns: Vec<_> = version
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| c.name.as_str())
            .collect();
        assert!(columns.contains(&"Age"), "{name}: {columns:?}");
    }
    assert_eq!(PayloadPool::crd().spec.scope, "Cluster");
    assert_eq!(PayloadPolicy::crd().spec.scope, "Namespaced");
}

#[test]
fn the_example_pool_and_policy_pass_every_rule() {
    let pool: PayloadPool = example("payloadpool.yaml");
    assert_eq!(broken(pool.validate_cel()), "");
    assert_eq!(broken(pool.validate_cel_update(&pool)), "");
    let policy: PayloadPolicy = example("payloadpolicy.yaml");
    assert_eq!(broken(policy.validate_cel()), "");
    // The defaults alone make a valid pool.
    let bare = PayloadPool::new("bare", Default::default());
    assert_eq!(broken(bare.validate_cel()), "");
}

#[test]
fn pool_rules_refuse_bad_capacities_watermarks_and_endpoints() {
    let pool: PayloadPool = example("payloadpool.yaml");
    let cases = [
        (
            "/spec/ram/capacity",
            json!("0"),
            "ram.capacity must be a positive whole number of bytes",
        ),
        (
            "/spec/ram/capacity",
            json!("lots"),
            "ram.capacity must be a positive whole number of bytes",
        ),
        (
            "/spec/ram/capacity",
            json!(0),
            "ram.capacity must be a positive whole number of bytes",
        ),
        (
            "/spec/disk/capacity",
            json!("-1Gi"),
            "disk.capacity must be a positive whole number of bytes",
        ),
        (
            "/spec/disk/capacity",
            json!("1.5"),
            "disk.capacity must be a positive whole number of bytes",
        ),
        (
            "/spec/ram/capacity",
            json!("100m"),
            "ram.capacity must be a positive whole number of bytes",
        ),
        (
            "/spec/watermarks/low",
            json!(0.95),
            "watermarks.low must be below watermarks.high",
        ),
        (
            "/spec/gpu/capacity",
            json!("40Gi"),
            "set gpu.fraction or gpu.capacity, not both",
        ),
        (
            "/spec/objectStore/endpoint",
            json!("ftp://minio:9000"),
            "must be an http or https URL",
        ),
    ];
    for (pointer, value, message) in cases {
        let bad = edit(&pool, pointer, value.clone());
        let errors = broken(bad.validate_cel());
        assert!(errors.contains(message), "{pointer} = {value}: {errors:?}");
    }
    // A plain byte count is a quantity too.
    let bytes = edit(&pool, "/spec/ram/capacity", json!(68719476736u64));
    assert_eq!(broken(bytes.validate_cel()), "");
    let minio = edit(&pool, "/spec/objectStore/endpoint", json!("http://minio.storage:9000"));
    assert_eq!(broken(minio.validate_cel()), "");
}

#[test]
fn a_pools_disk_tier_cannot_be_added_moved_or_removed() {
    let pool: PayloadPool = example("payloadpool.yaml");
    let bigger = edit(&pool, "/spec/disk/capacity", json!("2Ti"));
    assert_eq!(broken(bigger.validate_cel_update(&pool)), "", "the capacity may change");
    let diskless = edit(&pool, "/spec/disk", Value::Null);
    // Unset, the disk tier lives in the state directory: adding one moves it.
    for (old, new) in [
        (&pool, edit(&pool, "/spec/disk/path", json!("/mnt/other"))),
        (&pool, diskless.clone()),
        (&diskless, pool.clone()),
    ] {
        let errors = broken(new.validate_cel_update(old));
        assert!(errors.contains("disk cannot be added, removed or moved"), "{errors}");
        assert_eq!(broken(new.validate_cel()), "", "a new pool may have any path");
    }
}

#[test]
fn a_disk_path_is_a_plain_absolute_path() {
    let pool: PayloadPool = example("payloadpool.yaml");
    for path in ["/mnt/../etc", "/mnt/./nvme", "/..", "/mnt/nvme/."] {
        let errors = broken(edit(&pool, "/spec/disk/path", json!(path)).validate_cel());
        assert!(
            errors.contains("must not contain . or .. components"),
            "{path}: {errors}"
        );
    }
    for path in ["/mnt/nvme0", "/mnt/.hidden", "/data/..x"] {
        let errors = broken(edit(&pool, "/spec/disk/path", json!(path)).validate_cel());
        assert_eq!(errors, "", "{path}");
    }
    // The schema's pattern (not CEL) refuses relative paths and empty components.
    let schema = serde_json::to_value(&PayloadPool::crd().spec.versions[0].schema).unwrap();
    let path = &schema["openAPIV3Schema"]["properties"]["spec"]["properties"]["disk"]["properties"]["path"];
    assert_eq!(path["pattern"], "^(/[^/]+)+$");
}

#[test]
fn the_agents_memory_limit_must_hold_the_ram_tier() {
    let pool = edit(
        &example::<PayloadPool>("payloadpool.yaml"),
        "/spec/ram/hugePages",
        json!(false),
    );
    let capacity = "/spec/agent/resources";
    let small = edit(&pool, capacity, json!({"limits": {"memory": "1Gi"}}));
    let errors = broken(small.validate_cel());
    assert!(
        errors.contains("agent.resources.limits must hold ram.capacity"),
        "{errors}"
    );
    let enough = edit(&pool, capacity, json!({"limits": {"memory": "1Ti", "cpu": "2"}}));
    assert_eq!(broken(enough.validate_cel()), "");
    let cpu_only = edit(&pool, capacity, json!({"limits": {"cpu": "2"}}));
    assert_eq!(
        broken(cpu_only.validate_cel()),
        "",
        "no memory limit: the operator sizes it"
    );
    // With huge pages the tier is charged to hugepages-2Mi instead.
    let huge = edit(&small, "/spec/ram/hugePages", json!(true));
    assert_eq!(broken(huge.validate_cel()), "", "memory need not hold a huge-page tier");
    let few_pages = edit(&huge, capacity, json!({"limits": {"hugepages-2Mi": "2Mi"}}));
    let errors = broken(few_pages.validate_cel());
    assert!(
        errors.contains("agent.resources.limits must hold ram.capacity"),
        "{errors}"
    );
}

#[test]
fn defaults_are_on_the_leaves_so_partial_applies_are_complete() {
    let schema = serde_json::to_value(&PayloadPool::crd().spec.versions[0].schema).unwrap();
    let spec = &schema["openAPIV3Schema"]["properties"]["spec"]["properties"];
    assert_eq!(spec["ram"]["properties"]["capacity"]["default"], "1Gi");
    assert_eq!(spec["watermarks"]["properties"]["high"]["default"], 0.9);
    assert_eq!(spec["watermarks"]["properties"]["low"]["default"], 0.75);
    for object in ["ram", "watermarks"] {
        assert!(spec[object].get("required").is_none(), "{object}: {}", spec[object]);
    }
    let only_huge: PayloadPool = serde_json::from_value(json!({
        "apiVersion": "payload-manager.io/v1alpha1", "kind": "PayloadPool",
        "metadata": {"name": "p"}, "spec": {"ram": {"hugePages": true}, "watermarks": {"low": 0.5}},
    }))
    .unwrap();
    assert_eq!(only_huge.spec.ram.capacity.0, "1Gi");
    assert_eq!(only_huge.spec.watermarks.high, 0.9);
}

#[test]
fn policy_rules_refuse_contradictions_and_bad_quotas() {
    let policy: PayloadPolicy = example("payloadpolicy.yaml");
    let never = edit(&policy, "/spec/evictionPriority", json!("Never"));
    assert!(broken(never.validate_cel()).contains("never expires"));
    let forever = edit(&never, "/spec/ttlSeconds", Value::Null);
    assert_eq!(broken(forever.validate_cel()), "");
    // Placed on disk, leased from RAM: the lease promotes.
    let disk_first = edit(&policy, "/spec/tierPreference", json!(["DISK"]));
    let promoting = edit(&disk_first, "/spec/minLeaseTier", json!("RAM"));
    assert_eq!(broken(promoting.validate_cel()), "");
    let twice = edit(&policy, "/spec/tierPreference", json!(["RAM", "DISK", "RAM"]));
    assert!(broken(twice.validate_cel()).contains("tierPreference names each tier at most once"));
    for bytes in [json!("-5Gi"), json!("0.5")] {
        let bad = edit(&policy, "/spec/quotas", json!([{"tier": "RAM", "bytes": bytes}]));
        let errors = broken(bad.validate_cel());
        assert!(
            errors.contains("a quota must be a whole number of bytes of at least 0"),
            "{errors}"
        );
    }
    let zero = edit(&policy, "/spec/quotas", json!([{"tier": "DISK", "bytes": 0}]));
    assert_eq!(broken(zero.validate_cel()), "", "a zero quota forbids the tier");
}

#[test]
fn the_schema_refuses_what_serde_would_refuse() {
    // Enums are closed: a tier the operator does not know is an error, not
    // a default.
    let text = "selector: {}\ntierPreference: [RAM, TAPE]\n";
    let spec: Result<crd::PayloadPolicySpec, _> = serde_saphyr::from_str(text);
    assert!(spec.is_err(), "{spec:?}");
    let schema = serde_json::to_value(&PayloadPolicy::crd().spec.versions[0].schema).unwrap();
    let tiers = &schema["openAPIV3Schema"]["properties"]["spec"]["properties"]["tierPreference"];
    assert_eq!(tiers["items"]["enum"], json!(["GPU", "RAM", "DISK", "OBJECT"]));
    assert_eq!(tiers["x-kubernetes-list-type"], "atomic", "the order is the meaning");
}

//! PayloadPolicies applied by real agents: stored with `payload-operator
//! policy apply` in the operator's PostgreSQL (as the controller stores
//! them), read by `payload-agent node` processes through the operator, and
//! enforced at Allocate and at lease time.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use common::operator::Operator;
use common::process::{put_opts, Agent};
use common::{eventually, spare_port, Dirs};
use payload_client::{Client, ClientError, LeaseOptions, PutOptions, Tier};

const POLICY: &str = "\
apiVersion: payload-manager.io/v1alpha1
kind: PayloadPolicy
metadata:
  name: ram-cap
  namespace: team-a
spec:
  selector:
    matchLabels:
      app: llm
  maxLeaseSeconds: 3
  quotas:
    - tier: RAM
      bytes: \"1000\"
";

fn operator_cli(args: &[&str]) -> String {
    let bin = Path::new(env!("CARGO_BIN_EXE_payload-agent")).with_file_name("payload-operator");
    let out = Command::new(bin).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn labelled(pairs: &[(&str, &str)]) -> PutOptions {
    PutOptions {
        labels: pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<HashMap<_, _>>(),
        ..Default::default()
    }
}

const TEAM_A_LLM: &[(&str, &str)] = &[("payload-manager.io/namespace", "team-a"), ("app", "llm")];

async fn node(dirs: &Dirs, operator: &str, name: &str) -> (Agent, Client) {
    Agent::start_with(dirs, &["node", "--operator", operator, "--node-name", name]).await
}

/// Puts `len` bytes with `opts`; `Err` carries the refusal.
async fn try_put(client: &Client, len: usize, opts: &PutOptions) -> Result<uuid::Uuid, ClientError> {
    put_opts(client, &vec![7u8; len], opts).await.map(|(id, _)| id)
}

/// Puts `len` bytes, trying again while the agent says the quota is used
/// up (bytes deleted a moment ago count until its next count).
async fn put_once_room(client: &Client, len: usize, opts: &PutOptions) -> uuid::Uuid {
    for _ in 0..100 {
        match try_put(client, len, opts).await {
            Ok(id) => return id,
            Err(ClientError::ResourceExhausted(_)) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
            Err(other) => panic!("{other}"),
        }
    }
    panic!("{len} bytes never fitted");
}

/// Waits until `client`'s agent refuses a payload bigger than the quota
/// (one it stored before the policy reached it is deleted again).
async fn applied(client: &Client, opts: &PutOptions, node: &str) {
    eventually(&format!("{node} applies the policy"), || async {
        match try_put(client, 1001, opts).await {
            Ok(id) => {
                client.delete(id, true).await.unwrap();
                false
            }
            Err(ClientError::ResourceExhausted(_)) => true,
            Err(other) => panic!("{other}"),
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_policy_caps_its_namespace_on_each_node_and_its_leases() {
    let Some(database) = payload_catalog::testing::fresh_database().await else {
        return;
    };
    let logs = tempfile::tempdir().unwrap();
    let operator = Operator::start(&database, spare_port(), logs.path()).await;
    let (a_dirs, b_dirs) = (Dirs::new(), Dirs::new());
    let (_a, a) = node(&a_dirs, &operator.url(), "node-a").await;
    let (_b, b) = node(&b_dirs, &operator.url(), "node-b").await;

    let file = logs.path().join("policy.yaml");
    std::fs::write(&file, POLICY).unwrap();
    let said = operator_cli(&["policy", "apply", "--database", &database, file.to_str().unwrap()]);
    assert!(said.contains("policy team-a/ram-cap stored"), "{said}");

    // In force within seconds: a payload bigger than the quota is refused.
    let opts = labelled(TEAM_A_LLM);
    applied(&a, &opts, "node-a").await;
    let Err(ClientError::ResourceExhausted(refusal)) = try_put(&a, 1001, &opts).await else {
        panic!("a payload past the quota was stored");
    };
    assert!(
        refusal.contains("PayloadPolicy team-a/ram-cap") && refusal.contains("RAM"),
        "{refusal}"
    );

    // The quota counts what is held: 600 fits, 600 more does not.
    let first = put_once_room(&a, 600, &opts).await;
    let over = try_put(&a, 600, &opts).await.unwrap_err();
    assert!(matches!(over, ClientError::ResourceExhausted(_)), "{over}");
    // Payloads it does not govern are not counted or capped.
    for others in [
        labelled(&[("payload-manager.io/namespace", "team-b"), ("app", "llm")]),
        labelled(&[("payload-manager.io/namespace", "team-a"), ("app", "other")]),
        labelled(&[("app", "llm")]),
    ] {
        try_put(&a, 2000, &others).await.unwrap();
    }
    // The quota is per node: node-b's share is its own.
    applied(&b, &opts, "node-b").await;
    put_once_room(&b, 600, &opts).await;

    // A governed payload's lease lasts at most maxLeaseSeconds.
    let lease = a
        .get_with(
            first,
            LeaseOptions {
                duration_ms: 60_000,
                timed: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    assert!(
        lease.expires_at_ms() <= now + 3_000,
        "{} vs {now}",
        lease.expires_at_ms()
    );
    a.release(lease).await.unwrap();

    // A delete gives the quota back once the node counts again.
    a.delete(first, false).await.unwrap();
    put_once_room(&a, 600, &opts).await;

    // Removed from the catalog, the policy stops applying.
    let said = operator_cli(&["policy", "delete", "--database", &database, "team-a/ram-cap"]);
    assert!(said.contains("removed"), "{said}");
    put_once_room(&a, 2000, &opts).await;
}

const WEIGHTS: &str = "\
apiVersion: payload-manager.io/v1alpha1
kind: PayloadPolicy
metadata:
  name: weights
  namespace: team-a
spec:
  selector:
    matchLabels:
      app: weights
  minLeaseTier: RAM
  evictionPriority: High
";

async fn tier_of(client: &Client, id: uuid::Uuid) -> i32 {
    client.stat(id).await.unwrap().payload.unwrap().tier
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_promotes_leases_to_its_min_tier_and_keeps_its_payloads_in_ram_longest() {
    let Some(database) = payload_catalog::testing::fresh_database().await else {
        return;
    };
    let logs = tempfile::tempdir().unwrap();
    let operator = Operator::start(&database, spare_port(), logs.path()).await;
    let dirs = Dirs::new();
    let (_agent, client) = Agent::start_with(
        &dirs,
        &[
            "node",
            "--operator",
            &operator.url(),
            "--node-name",
            "node-a",
            "--ram-capacity",
            "3MiB",
        ],
    )
    .await;
    let file = logs.path().join("weights.yaml");
    std::fs::write(&file, WEIGHTS).unwrap();
    operator_cli(&["policy", "apply", "--database", &database, file.to_str().unwrap()]);
    let weights = labelled(&[("payload-manager.io/namespace", "team-a"), ("app", "weights")]);

    // minLeaseTier RAM: a lease on a governed DISK payload, asked without a
    // tier and without blocking, is granted once the payload is in RAM.
    let on_disk = PutOptions {
        tier: Tier::Disk,
        ..weights.clone()
    };
    eventually("node-a promotes a governed payload for its lease", || async {
        let id = try_put(&client, 16, &on_disk).await.unwrap();
        let lease = client
            .get_with(
                id,
                LeaseOptions {
                    best_effort: true,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        let promoted = tier_of(&client, id).await == Tier::Ram as i32;
        client.release(lease).await.unwrap();
        client.delete(id, true).await.unwrap();
        promoted
    })
    .await;
    let other = labelled(&[("payload-manager.io/namespace", "team-a"), ("app", "other")]);
    let id = try_put(
        &client,
        16,
        &PutOptions {
            tier: Tier::Disk,
            ..other.clone()
        },
    )
    .await
    .unwrap();
    let lease = client.get(id).await.unwrap();
    assert_eq!(
        tier_of(&client, id).await,
        Tier::Disk as i32,
        "an ungoverned payload stays"
    );
    client.release(lease).await.unwrap();

    // evictionPriority High: RAM full, the governed payload stays though it
    // is the oldest (without the policy the oldest goes first).
    const MIB: usize = 1 << 20;
    let governed = try_put(&client, MIB, &weights).await.unwrap();
    let older = try_put(&client, MIB, &other).await.unwrap();
    try_put(&client, MIB, &other).await.unwrap();
    try_put(&client, MIB, &other).await.unwrap();
    assert_eq!(tier_of(&client, governed).await, Tier::Ram as i32, "High stays in RAM");
    assert_eq!(
        tier_of(&client, older).await,
        Tier::Disk as i32,
        "the oldest Normal one left"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_the_controller_would_refuse_is_refused_before_it_is_stored() {
    let Some(database) = payload_catalog::testing::fresh_database().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.yaml");
    std::fs::write(&file, POLICY.replace("\"1000\"", "\"12Q\"")).unwrap();
    let bin = Path::new(env!("CARGO_BIN_EXE_payload-agent")).with_file_name("payload-operator");
    let out = Command::new(bin)
        .args(["policy", "apply", "--database", &database, file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("quotas[tier=RAM].bytes"), "{err}");
    let stored = payload_catalog::PgRepository::connect(&database, "reader")
        .await
        .unwrap();
    assert_eq!(payload_catalog::Repository::policies(&stored).await.unwrap(), vec![]);
}

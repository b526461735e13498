"""The install suite, for a real cluster: runs only when KUBECONFIG names
one, and says so when it skips. It installs the chart (rendered by Helm's
own engine, applied server-side) with its bundled PostgreSQL and a
self-signed certificate for the catalog, applies a PayloadPool and a
PayloadPolicy, waits for the pool's agents, then: a pod puts a payload
through its node's agent and a second pod on that node gets it back byte
for byte; a put over the policy's quota is refused naming the policy; and
`payloadctl --operator` in a pod stats a payload and sees its node.

The images must be where the cluster pulls from: `make images`, then for
kind `kind load docker-image payload-manager/operator:0.1.0
payload-manager/agent:0.1.0`; or push them and set PM_E2E_IMAGE_PREFIX
(e.g. registry.example/pm/) and PM_E2E_IMAGE_TAG. Everything it makes is
in the namespace pm-e2e (and the pool pm-e2e, and the chart's cluster
roles); it removes them after, and leaves the CRDs."""

import datetime
import json
import os
import time

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from kube import CHART, kubectl, needs_cluster, ok, render

pytestmark = [
    *needs_cluster,
    # It installs things: only when asked (make test-e2e), never because a
    # KUBECONFIG happens to be exported during `make test`.
    pytest.mark.skipif(
        os.environ.get("PM_E2E_INSTALL") != "1", reason="the install suite runs with PM_E2E_INSTALL=1 (make test-e2e)"
    ),
]

NAMESPACE = "pm-e2e"
RELEASE = "pm-e2e"
POOL = "pm-e2e"
# The chart's fullname for this release: its catalog Service and operator.
FULLNAME = "pm-e2e-payload-manager"
PREFIX = os.environ.get("PM_E2E_IMAGE_PREFIX", "payload-manager/")
TAG = os.environ.get("PM_E2E_IMAGE_TAG", "")
AGENT_IMAGE = f"{PREFIX}agent:{TAG or yaml.safe_load((CHART / 'Chart.yaml').read_text())['appVersion']}"
# How long a step may take on a slow cluster (an image pull, a rollout).
PATIENCE = 300


def apply(*docs):
    ok("apply", "--server-side", "--force-conflicts", "--field-manager=payload-e2e", "-f", "-", stdin=yaml.safe_dump_all(docs))


def catalog_tls():
    """A CA and the catalog's certificate for its Service names, as the
    Secret cert-manager would write (tls.crt, tls.key, ca.crt)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    span = (now - datetime.timedelta(hours=1), now + datetime.timedelta(days=1))

    def certificate(subject, issuer, public_key, signer, extensions):
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(span[0])
            .not_valid_after(span[1])
        )
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        return builder.sign(signer, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = certificate("pm-e2e-ca", "pm-e2e-ca", ca_key.public_key(), ca_key, [(x509.BasicConstraints(ca=True, path_length=None), True)])
    key = ec.generate_private_key(ec.SECP256R1())
    names = [f"{FULLNAME}.{NAMESPACE}.svc", f"{FULLNAME}.{NAMESPACE}.svc.cluster.local"]
    leaf = certificate(
        names[0],
        "pm-e2e-ca",
        key.public_key(),
        ca_key,
        [
            (x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), False),
            (x509.BasicConstraints(ca=False, path_length=None), True),
        ],
    )
    pem = lambda cert: cert.public_bytes(serialization.Encoding.PEM).decode()
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "kubernetes.io/tls",
        "metadata": {"name": "pm-e2e-catalog-tls", "namespace": NAMESPACE},
        "stringData": {"tls.crt": pem(leaf), "tls.key": key_pem, "ca.crt": pem(ca)},
    }


def chart_objects():
    image = lambda name: {"repository": f"{PREFIX}{name}", "tag": TAG}
    values = {
        "operator": {"image": image("operator")},
        "agent": {"image": image("agent")},
        "postgresql": {"enabled": True},
        "catalog": {"tlsSecret": "pm-e2e-catalog-tls"},
    }
    return render(values, namespace=NAMESPACE, name=RELEASE)


def wait_for(what, probe):
    """Polls `probe` every 2 s until it returns something true, for at
    most PATIENCE seconds; `what` says what never happened."""
    deadline = time.monotonic() + PATIENCE
    while time.monotonic() < deadline:
        found = probe()
        if found:
            return found
        time.sleep(2)
    pytest.fail(f"{what} within {PATIENCE} s")


def refuse_a_cluster_in_use():
    """The chart's cluster roles have fixed names, and an operator
    reconciles every pool of the cluster: on a cluster that already runs
    Payload Manager this suite would take over the one and start a second
    agent on the other's host directories. It stops first."""
    pools = json.loads(ok("get", "payloadpools", "-o", "json"))["items"] if crd_exists() else []
    others = [p["metadata"]["name"] for p in pools if p["metadata"]["name"] != POOL]
    if others:
        pytest.fail(f"this cluster has PayloadPools {others}: run the install suite on a cluster of its own")
    role = kubectl("get", "clusterrole", "payload-manager-viewer", "-o", "json")
    if role.returncode == 0:
        instance = json.loads(role.stdout)["metadata"].get("labels", {}).get("app.kubernetes.io/instance")
        if instance != RELEASE:
            pytest.fail(f"Payload Manager is installed here (release {instance}): run the install suite on a cluster of its own")


def crd_exists():
    return kubectl("get", "crd", "payloadpools.payload-manager.io").returncode == 0


def uninstall(objects):
    # Policies first, while the catalog that removes their finalizer runs;
    # then the pool, while the operator that owns its objects runs.
    kubectl("-n", NAMESPACE, "delete", "payloadpolicy", "--all", "--ignore-not-found", f"--timeout={PATIENCE}s")
    kubectl("delete", "payloadpool", POOL, "--ignore-not-found", f"--timeout={PATIENCE}s")
    kubectl("delete", "--ignore-not-found", "-f", "-", stdin=yaml.safe_dump_all(objects))
    kubectl("delete", "namespace", NAMESPACE, "--ignore-not-found", "--wait=false")


@pytest.fixture(scope="module")
def installed(request):
    refuse_a_cluster_in_use()
    objects = chart_objects()
    # Registered before anything is made, so a failed setup is undone too.
    request.addfinalizer(lambda: uninstall(objects))
    apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}})
    apply(catalog_tls())
    ok("apply", "--server-side", "--field-manager=payload-e2e", "-f", str(CHART / "crds"))
    for crd in ["payloadpools.payload-manager.io", "payloadpolicies.payload-manager.io"]:
        ok("wait", "--for=condition=Established", "--timeout=60s", f"crd/{crd}")
    apply(*objects)
    for deployment in [f"{FULLNAME}-postgresql", FULLNAME]:
        ok("-n", NAMESPACE, "rollout", "status", f"deployment/{deployment}", f"--timeout={PATIENCE}s")


@pytest.fixture(scope="module")
def pool(installed):
    apply(
        {
            "apiVersion": "payload-manager.io/v1alpha1",
            "kind": "PayloadPool",
            "metadata": {"name": POOL},
            # Small: kind's nodes have Docker's 64 MiB /dev/shm, and an
            # agent refuses a RAM tier its filesystem cannot hold.
            "spec": {"ram": {"capacity": "32Mi"}},
        },
        {
            "apiVersion": "payload-manager.io/v1alpha1",
            "kind": "PayloadPolicy",
            "metadata": {"name": "small", "namespace": NAMESPACE},
            "spec": {"selector": {"matchLabels": {"e2e": "quota"}}, "quotas": [{"tier": "RAM", "bytes": "1Mi"}]},
        },
    )
    ok("wait", "--for=condition=Ready", f"payloadpool/{POOL}", f"--timeout={PATIENCE}s")
    ok("-n", NAMESPACE, "wait", "--for=condition=Accepted", "payloadpolicy/small", f"--timeout={PATIENCE}s")


def run_pod(name, script, node=None, account=None, volumes=()):
    """Runs `script` (sh) in the agent image with the pool's socket and RAM
    root mounted, as docs/pods.md says, and each of `volumes` (a pod
    volume) at /NAME; its log once it ends, and its node. A pod that fails
    fails the test with its log."""
    mounts = [
        {"name": "socket", "mountPath": "/run/payload-manager"},
        {"name": "ram", "mountPath": "/dev/shm"},
    ]
    mounts += [{"name": v["name"], "mountPath": f"/{v['name']}", "readOnly": True} for v in volumes]
    spec = {
        "restartPolicy": "Never",
        "containers": [
            {
                "name": "main",
                "image": AGENT_IMAGE,
                "command": ["sh", "-ec", script],
                "env": [{"name": "PM_AGENT", "value": "/run/payload-manager/agent.sock"}],
                # The pool's default readAccess (Owner): root reaches the socket.
                "securityContext": {"runAsUser": 0},
                "volumeMounts": mounts,
            }
        ],
        "volumes": [
            {"name": "socket", "hostPath": {"path": f"/run/payload-manager/{POOL}", "type": "Directory"}},
            {"name": "ram", "hostPath": {"path": f"/dev/shm/payload-manager-{POOL}", "type": "Directory"}},
            *volumes,
        ],
    }
    if node:
        spec["nodeName"] = node
    if account:
        spec["serviceAccountName"] = account
    kubectl("-n", NAMESPACE, "delete", "pod", name, "--ignore-not-found", "--wait=true")
    apply({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NAMESPACE}, "spec": spec})

    def ended():
        pod = json.loads(ok("-n", NAMESPACE, "get", "pod", name, "-o", "json"))
        return pod if pod["status"].get("phase") in ("Succeeded", "Failed") else None

    pod = wait_for(f"pod {name} ended", ended)
    log = ok("-n", NAMESPACE, "logs", name)
    assert pod["status"]["phase"] == "Succeeded", f"pod {name} failed:\n{log}"
    return log, pod["spec"]["nodeName"]


def test_a_pod_puts_and_another_gets_the_same_bytes_on_that_node(pool):
    put, node = run_pod(
        "pm-e2e-put",
        "head -c 1048576 /dev/urandom > /tmp/payload\n"
        "sha256sum /tmp/payload | cut -d' ' -f1\n"
        "payloadctl put --ttl 10m /tmp/payload\n",
    )
    digest, payload = put.split()[-2:]
    got, _ = run_pod(
        "pm-e2e-get",
        f"payloadctl get {payload} -o /tmp/payload\nsha256sum /tmp/payload | cut -d' ' -f1\n",
        node=node,
    )
    assert got.split()[-1] == digest, got


def test_a_put_over_the_policys_quota_is_refused_naming_it(pool):
    # The agents read policies every 2 s: a put may land before this one
    # is in force, so the pod tries until one is refused (or gives up).
    log, _ = run_pod(
        "pm-e2e-quota",
        "head -c 2097152 /dev/urandom > /tmp/big\n"
        "for attempt in $(seq 30); do\n"
        f"  if id=$(payloadctl put --ttl 10m --label payload-manager.io/namespace={NAMESPACE} --label e2e=quota /tmp/big 2>/tmp/err)\n"
        "  then payloadctl rm --force \"$id\"; sleep 2; else cat /tmp/err; exit 0; fi\n"
        "done\n"
        "echo never refused; exit 1\n",
    )
    assert f"PayloadPolicy {NAMESPACE}/small" in log, log


def test_the_operator_lists_the_cluster_for_a_viewer(pool):
    put, node = run_pod("pm-e2e-put-viewed", "echo viewed > /tmp/p\npayloadctl put --ttl 10m /tmp/p\n")
    payload = put.split()[-1]
    apply(
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "viewer", "namespace": NAMESPACE}},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "pm-e2e-viewer"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "payload-manager-viewer"},
            "subjects": [{"kind": "ServiceAccount", "name": "viewer", "namespace": NAMESPACE}],
        },
    )
    try:
        token = {"path": "token", "audience": "payload-manager-view", "expirationSeconds": 600}
        ca = {"secret": {"name": "pm-e2e-catalog-tls", "items": [{"key": "ca.crt", "path": "ca.crt"}]}}
        view = {"name": "view", "projected": {"sources": [{"serviceAccountToken": token}, ca]}}
        # The commit reaches the operator's catalog within seconds.
        log, _ = run_pod(
            "pm-e2e-view",
            "for attempt in $(seq 30); do\n"
            f"  payloadctl --operator https://{FULLNAME}.{NAMESPACE}.svc:50052 --ca-file /view/ca.crt "
            f"--token-file /view/token --output json stat {payload} 2>/tmp/err && exit 0\n"
            "  sleep 2\n"
            "done\n"
            "cat /tmp/err; exit 1\n",
            account="viewer",
            volumes=[view],
        )
    finally:
        kubectl("delete", "clusterrolebinding", "pm-e2e-viewer", "--ignore-not-found")
    stat = json.loads(log[log.index("{") :])
    assert stat["node"] == node, log
    assert payload in log, log

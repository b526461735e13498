"""The Kubernetes manifests, checked without a cluster: the CRDs in crds/
against the API's own schema for CustomResourceDefinition (by
kubernetes-validate), the example resources in docs/examples/ against the
schemas those CRDs declare (and the example workload against the API's), and the objects `payload-operator render`
builds for a pool against the API's schemas."""

import os
import pathlib
import subprocess

import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO = pathlib.Path(__file__).resolve().parents[2]
# The oldest Kubernetes the CRDs are meant for (k8s-openapi's v1_34).
KUBERNETES = "1.34"


def crds():
    return sorted((REPO / "crds").glob("*.yaml"))


def crd_schema(kind):
    for path in crds():
        crd = yaml.safe_load(path.read_text())
        if crd["spec"]["names"]["kind"] == kind:
            return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    raise AssertionError(f"no CRD in crds/ for {kind}")


def test_there_is_a_crd_for_each_resource():
    kinds = {yaml.safe_load(p.read_text())["spec"]["names"]["kind"] for p in crds()}
    assert kinds == {"PayloadPool", "PayloadPolicy"}


@pytest.mark.parametrize("path", crds(), ids=lambda p: p.name)
def test_each_crd_is_a_valid_customresourcedefinition(path):
    crd = yaml.safe_load(path.read_text())
    kubernetes_validate.validate(crd, KUBERNETES, strict=True)


def test_a_malformed_crd_is_caught():
    crd = yaml.safe_load(crds()[0].read_text())
    crd["spec"]["scope"] = 5
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(crd, KUBERNETES, strict=True)


@pytest.mark.parametrize("path", sorted((REPO / "docs/examples").glob("*.yaml")), ids=lambda p: p.name)
def test_each_example_fits_its_crds_schema(path):
    resource = yaml.safe_load(path.read_text())
    if resource["apiVersion"].startswith("payload-manager.io/"):
        jsonschema.validate(resource, crd_schema(resource["kind"]))
    else:
        # The pod side (docs/pods.md): a Kubernetes object of its own.
        kubernetes_validate.validate(resource, KUBERNETES, strict=True)


def test_the_pool_schema_refuses_a_bad_bucket_and_a_relative_disk_path():
    pool = yaml.safe_load((REPO / "docs/examples/payloadpool.yaml").read_text())
    schema = crd_schema("PayloadPool")
    for field, value in [("objectStore", {"url": "gs://bucket"}), ("disk", {"path": "mnt", "capacity": "1Ti"})]:
        bad = {**pool, "spec": {**pool["spec"], field: value}}
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


def rendered(pool_file):
    """The objects `payload-operator render` prints for a pool file."""
    binary = os.environ.get("PM_OPERATOR_BIN")
    if not binary:
        pytest.skip("PM_OPERATOR_BIN is not set (make test-python sets it)")
    out = subprocess.run([binary, "render", str(pool_file)], check=True, capture_output=True, text=True)
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def test_what_a_pool_becomes_is_valid_kubernetes(tmp_path):
    objects = rendered(REPO / "docs/examples/payloadpool.yaml")
    assert [o["kind"] for o in objects] == ["ServiceAccount", "ConfigMap", "DaemonSet"]
    for obj in objects:
        kubernetes_validate.validate(obj, KUBERNETES, strict=True)
    # A bare pool (every default) too.
    bare = tmp_path / "bare.yaml"
    bare.write_text("apiVersion: payload-manager.io/v1alpha1\nkind: PayloadPool\nmetadata: {name: bare}\nspec: {}\n")
    for obj in rendered(bare):
        kubernetes_validate.validate(obj, KUBERNETES, strict=True)


def test_render_refuses_a_pool_it_cannot_build(tmp_path):
    if not os.environ.get("PM_OPERATOR_BIN"):
        pytest.skip("PM_OPERATOR_BIN is not set (make test-python sets it)")
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: payload-manager.io/v1alpha1\nkind: PayloadPool\nmetadata: {name: bad}\n"
        "spec: {ram: {capacity: 100m}}\n"
    )
    out = subprocess.run([os.environ["PM_OPERATOR_BIN"], "render", str(bad)], capture_output=True, text=True)
    assert out.returncode == 1
    assert "ram.capacity" in out.stderr and "fraction of a byte" in out.stderr

"""The Kubernetes manifests in the tree, checked without a cluster: the CRDs
in crds/ against the API's own schema for CustomResourceDefinition (by
kubernetes-validate), and the example resources in docs/examples/ against
the schemas those CRDs declare."""

import pathlib

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
    jsonschema.validate(resource, crd_schema(resource["kind"]))


def test_the_pool_schema_refuses_a_bad_bucket_and_a_relative_disk_path():
    pool = yaml.safe_load((REPO / "docs/examples/payloadpool.yaml").read_text())
    schema = crd_schema("PayloadPool")
    for field, value in [("objectStore", {"url": "gs://bucket"}), ("disk", {"path": "mnt", "capacity": "1Ti"})]:
        bad = {**pool, "spec": {**pool["spec"], field: value}}
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)

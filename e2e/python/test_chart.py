"""The Helm chart, with Helm's own engine (helm-python-sdk, no cluster):
it lints clean, renders with its defaults and with overrides, every object
it renders is valid Kubernetes (kubernetes-validate), its values are
checked by its schema, and it carries the CRDs crds/ holds."""

import helm_python as helm
import kubernetes_validate
import pytest

from kube import CHART, REPO, render

KUBERNETES = "1.34"
CATALOG = {"catalog": {"databaseSecret": "pm-db", "tlsSecret": "pm-catalog-tls"}}
BUNDLED = {"postgresql": {"enabled": True}, "catalog": {"tlsSecret": "pm-catalog-tls"}}


def by_kind(docs, kind):
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, [d["kind"] for d in docs]
    return found[0]


def test_the_chart_lints_clean():
    report = helm.lint(str(CHART), strict=True, kube_version="v1.34.0")
    assert report["errors"] == []
    # Severity 2 is a warning, 3 an error; 1 (info) is Helm's advice.
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize(
    "values",
    [
        None,
        {"catalogUrl": "https://catalog.example:50052", "operator": {"image": {"repository": "r/op", "tag": "1.2"}}},
        CATALOG,
        BUNDLED,
        {**BUNDLED, "postgresql": {"enabled": True, "storage": "10Gi"}},
    ],
    ids=["defaults", "overrides", "catalog", "bundled-postgresql", "bundled-postgresql-storage"],
)
def test_every_rendered_object_is_valid_kubernetes(values):
    docs = render(values)
    kinds = sorted(d["kind"] for d in docs)
    base = ["ClusterRole", "ClusterRoleBinding", "Deployment", "Role", "RoleBinding", "ServiceAccount"]
    # A catalog adds its Service and the cluster view's two user roles.
    extra = ["Service", "ClusterRole", "ClusterRole"] if values is CATALOG or "postgresql" in (values or {}) else []
    # The bundled PostgreSQL: its Deployment, Secret and Service (and claim).
    if "postgresql" in (values or {}):
        extra += ["Deployment", "Secret", "Service"]
        extra += ["PersistentVolumeClaim"] if values["postgresql"].get("storage") else []
    assert kinds == sorted(base + extra), kinds
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def test_the_operator_runs_the_controller_with_the_release_settings():
    docs = render({"agent": {"image": {"repository": "reg/agent", "tag": "9"}}}, namespace="pm-system")
    pod = by_kind(docs, "Deployment")["spec"]["template"]["spec"]
    operator = pod["containers"][0]
    assert operator["args"] == ["run"]
    assert operator["image"] == "payload-manager/operator:0.1.0", "the tag defaults to appVersion"
    env = {e["name"]: e for e in operator["env"]}
    assert env["PM_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert env["PM_AGENT_IMAGE"]["value"] == "reg/agent:9"
    assert env["PM_CATALOG_URL"]["value"] == "https://pm-payload-manager.pm-system.svc:50052"
    assert "PM_CATALOG_CA_SECRET" not in env
    assert len(pod["containers"]) == 1, "no catalog without a database"
    assert env["PM_METRICS_LISTEN"]["value"] == "0.0.0.0:9090"
    assert operator["ports"] == [{"name": "metrics", "containerPort": 9090}]
    assert operator["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert operator["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["serviceAccountName"] == by_kind(docs, "ServiceAccount")["metadata"]["name"]


def test_the_catalog_serves_tls_with_the_database_secret_and_reviews_tokens():
    docs = render(CATALOG, namespace="pm-system")
    pod = by_kind(docs, "Deployment")["spec"]["template"]["spec"]
    operator, catalog = pod["containers"]
    assert catalog["args"] == ["catalog"]
    env = {e["name"]: e for e in catalog["env"]}
    assert env["PM_DATABASE"]["valueFrom"]["secretKeyRef"] == {"name": "pm-db", "key": "dsn"}
    assert env["PM_AUTH"]["value"] == "kubernetes"
    assert env["PM_LISTEN"]["value"] == "0.0.0.0:50052"
    assert env["PM_METRICS_LISTEN"]["value"] == "0.0.0.0:9091"
    assert catalog["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "catalog-metrics"}
    assert catalog["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "catalog-metrics"}
    assert env["PM_TLS_CERT"]["value"].startswith(catalog["volumeMounts"][0]["mountPath"])
    assert pod["volumes"][0]["secret"]["secretName"] == "pm-catalog-tls"
    # The controller hands the agents the CA (and only it) of the same Secret.
    operator_env = {e["name"]: e.get("value") for e in operator["env"]}
    assert operator_env["PM_CATALOG_CA_SECRET"] == "pm-catalog-tls"
    service = by_kind(docs, "Service")
    assert service["spec"]["ports"][0]["port"] == 50052
    assert service["spec"]["selector"] == by_kind(docs, "Deployment")["spec"]["selector"]["matchLabels"]
    users = {"payload-manager-viewer", "payload-manager-editor"}
    (own,) = [d for d in docs if d["kind"] == "ClusterRole" and d["metadata"]["name"] not in users]
    rules = own["rules"]
    assert {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]} in rules
    # The cluster view asks whether each caller may; the chart's roles grant it.
    assert {"apiGroups": ["authorization.k8s.io"], "resources": ["subjectaccessreviews"], "verbs": ["create"]} in rules
    roles = {d["metadata"]["name"]: d["rules"] for d in docs if d and d["kind"] == "ClusterRole"}
    granted = lambda role: {(r, v) for rule in roles[role] for r in rule["resources"] for v in rule["verbs"]}
    assert granted("payload-manager-viewer") == {(r, v) for r in ["payloads", "streams"] for v in ["get", "list"]}
    editor = granted("payload-manager-editor")
    assert {("payloads", "delete"), ("streams", "create"), ("streams", "update"), ("streams", "delete")} <= editor
    assert ("payloads", "create") not in editor, "bytes are written through a node's agent"
    # The policy controller runs in the catalog container.
    assert {"apiGroups": ["payload-manager.io"], "resources": ["payloadpolicies"], "verbs": ["get", "list", "watch", "patch"]} in rules
    assert {"apiGroups": ["payload-manager.io"], "resources": ["payloadpolicies/status"], "verbs": ["get", "patch"]} in rules


def test_a_catalog_without_tls_is_refused_at_install():
    chart = helm.Chart.load(str(CHART))
    with pytest.raises(helm.HelmError, match="catalog.tlsSecret is required"):
        chart.render({"catalog": {"databaseSecret": "pm-db"}}, name="pm", namespace="ns")


def test_rbac_grants_what_the_controller_calls_and_no_more():
    docs = render(namespace="pm-system")
    cluster = by_kind(docs, "ClusterRole")["rules"]
    assert {(r["resources"][0], tuple(r["verbs"])) for r in cluster} == {
        ("payloadpools", ("get", "list", "watch")),
        ("payloadpools/status", ("get", "patch")),
        ("events", ("create", "patch")),
    }
    role = by_kind(docs, "Role")
    assert role["metadata"]["namespace"] == "pm-system", "the agents' objects only in the release namespace"
    granted = {(res, verb) for r in role["rules"] for res in r["resources"] for verb in r["verbs"]}
    for resource in ["daemonsets", "configmaps", "serviceaccounts"]:
        for verb in ["get", "list", "watch", "patch"]:
            assert (resource, verb) in granted
    assert not any(verb in ("delete", "*") for _, verb in granted), "deletion is the garbage collector's"
    assert {(res, verb) for res, verb in granted if res == "leases"} == {
        ("leases", "get"),
        ("leases", "create"),
        ("leases", "update"),
    }, "the leader's lease"


def test_the_values_schema_refuses_a_typo():
    chart = helm.Chart.load(str(CHART))
    with pytest.raises(helm.HelmError):
        chart.render({"operator": {"image": {"repository": "r", "pullPolicy": "Sometimes"}}}, name="pm", namespace="ns")
    with pytest.raises(helm.HelmError):
        chart.render({"catalogurl": "http://x"}, name="pm", namespace="ns")


def test_the_chart_carries_the_generated_crds():
    for crd in sorted((REPO / "crds").glob("*.yaml")):
        assert (CHART / "crds" / crd.name).read_text() == crd.read_text(), f"run `make crds` ({crd.name})"


def postgresql(docs, kind):
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith("-postgresql")]
    assert len(found) == 1, [(d["kind"], d["metadata"]["name"]) for d in docs]
    return found[0]


def test_the_bundled_postgresql_is_the_catalogs_database_and_only_its_pods_are_selected():
    docs = render(BUNDLED, namespace="pm-system")
    secret = postgresql(docs, "Secret")["stringData"]
    password = secret["password"]
    assert len(password) == 32 and password.isalnum()
    assert secret["dsn"] == f"postgres://payload:{password}@pm-payload-manager-postgresql.pm-system.svc:5432/payload"
    database = postgresql(docs, "Deployment")
    pod = database["spec"]["template"]
    env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
    assert env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "pm-payload-manager-postgresql", "key": "password"}
    assert pod["spec"]["volumes"][0] == {"name": "data", "emptyDir": {}}, "no storage set: an emptyDir"
    operator = next(d for d in docs if d["kind"] == "Deployment" and d is not database)
    catalog = next(c for c in operator["spec"]["template"]["spec"]["containers"] if c["name"] == "catalog")
    dsn = next(e for e in catalog["env"] if e["name"] == "PM_DATABASE")["valueFrom"]["secretKeyRef"]
    assert dsn == {"name": "pm-payload-manager-postgresql", "key": "dsn"}
    # Neither the operator's Deployment nor the catalog's Service selects
    # the database's pod, and its Service selects only that pod.
    labels = pod["metadata"]["labels"]
    selects = lambda selector, labels: all(labels.get(k) == v for k, v in selector.items())
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    assert not selects(operator["spec"]["selector"]["matchLabels"], labels)
    assert not selects(services["pm-payload-manager"]["spec"]["selector"], labels)
    assert selects(services["pm-payload-manager-postgresql"]["spec"]["selector"], labels)
    assert not selects(services["pm-payload-manager-postgresql"]["spec"]["selector"], operator["spec"]["template"]["metadata"]["labels"])


def test_the_bundled_postgresql_keeps_its_data_on_a_claim_when_sized():
    docs = render({**BUNDLED, "postgresql": {"enabled": True, "storage": "10Gi"}})
    claim = postgresql(docs, "PersistentVolumeClaim")
    assert claim["spec"]["resources"]["requests"]["storage"] == "10Gi"
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    # The Secret stays with it: the data there was made with its password.
    assert postgresql(docs, "Secret")["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert "annotations" not in postgresql(render(BUNDLED), "Secret")["metadata"], "no claim: nothing to keep"
    volumes = postgresql(docs, "Deployment")["spec"]["template"]["spec"]["volumes"]
    assert volumes[0] == {"name": "data", "persistentVolumeClaim": {"claimName": claim["metadata"]["name"]}}


def test_a_bundled_postgresql_beside_a_database_secret_is_refused():
    chart = helm.Chart.load(str(CHART))
    with pytest.raises(helm.HelmError, match="set one of them"):
        chart.render({**CATALOG, "postgresql": {"enabled": True}}, name="pm", namespace="ns")
    for storage in ["lots", "0"]:
        with pytest.raises(helm.HelmError):
            chart.render({**BUNDLED, "postgresql": {"enabled": True, "storage": storage}}, name="pm", namespace="ns")
    with pytest.raises(helm.HelmError, match="databaseKey"):
        chart.render({**BUNDLED, "catalog": {**BUNDLED["catalog"], "databaseKey": "password"}}, name="pm", namespace="ns")


def test_a_long_release_name_keeps_the_bundled_postgresqls_names_valid():
    docs = render(BUNDLED, name="r" * 60)
    for kind in ["Secret", "Service", "Deployment"]:
        name = postgresql(docs, kind)["metadata"]["name"]
        assert len(name) <= 63 and name.endswith("-postgresql"), name
        kubernetes_validate.validate(postgresql(docs, kind), KUBERNETES, strict=True)

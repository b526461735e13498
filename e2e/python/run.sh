#!/usr/bin/env bash
# Python compatibility suite: generate a client from proto/ with grpcio-tools
# and run it against a real payload-agent.
#
#   bash e2e/python/run.sh [extra pytest args]
#
# VENV          virtual environment to use/create (default: <repo>/.venv)
# PM_AGENT_BIN  agent binary (default: <repo>/target/debug/payload-agent, built if missing)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO"

VENV="${VENV:-$REPO/.venv}"
PY="$VENV/bin/python"

if ! [ -x "$PY" ] || ! "$PY" -c 'import grpc_tools, grpc, pytest, kubernetes_validate, jsonschema, yaml, helm_python' >/dev/null 2>&1; then
    echo "run.sh: setting up $VENV" >&2
    [ -x "$PY" ] || python3 -m venv "$VENV"
    "$PY" -m pip install --quiet --upgrade pip
    "$PY" -m pip install --quiet -r e2e/python/requirements.txt
fi

if [ -z "${PM_AGENT_BIN:-}" ]; then
    PM_AGENT_BIN="$REPO/target/debug/payload-agent"
    if ! [ -x "$PM_AGENT_BIN" ]; then
        echo "run.sh: building payload-agent" >&2
        cargo build -p payload-agent --bin payload-agent
    fi
fi
export PM_AGENT_BIN

set +e
"$PY" -m pytest -q -rs -p no:cacheprovider e2e/python "$@"
status=$?
set -e
exit "$status"

#!/usr/bin/env bash
# `make bench-peers`: our native data plane beside Vineyard and Ray's object
# store on the same workloads, in one run, as one table in docs/benchmarks.md.
#
#   bash bench/peers/run.sh
#
# CARGO       cargo to use (default: cargo)
# BENCH_VENV  virtual environment for the peers (default: <repo>/.venv-bench)
# OUT         where the JSON figures go (default: <repo>/target/bench-peers)
# DOCS        the Markdown file the table goes into (default: docs/benchmarks.md)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO"

CARGO="${CARGO:-cargo}"
BENCH_VENV="${BENCH_VENV:-$REPO/.venv-bench}"
OUT="${OUT:-$REPO/target/bench-peers}"
DOCS="${DOCS:-docs/benchmarks.md}"
PY="$BENCH_VENV/bin/python"
REQUIREMENTS=bench/peers/requirements.txt

if ! [ -x "$PY" ] || ! "$PY" -c 'import vineyard, ray, numpy' >/dev/null 2>&1; then
    echo "run.sh: installing the peers into $BENCH_VENV" >&2
    [ -x "$PY" ] || python3 -m venv "$BENCH_VENV"
    if ! "$PY" -m pip install --quiet --disable-pip-version-check -r "$REQUIREMENTS"; then
        # One peer without a wheel for this Python must not stop the other:
        # install what installs, and peers.py reports the rest in the table.
        echo "run.sh: not all of $REQUIREMENTS installs; trying one at a time" >&2
        grep -Ev '^\s*(#|$)' "$REQUIREMENTS" | while read -r requirement; do
            "$PY" -m pip install --quiet --disable-pip-version-check "$requirement" ||
                echo "run.sh: $requirement did not install" >&2
        done
    fi
fi

mkdir -p "$OUT"
rm -f "$OUT"/{ours,vineyard,ray}.json
PM_BENCH_JSON="$OUT/ours.json" "$CARGO" bench -p payload-agent --bench native
for peer in vineyard ray; do
    echo "run.sh: measuring $peer" >&2
    "$PY" bench/peers/peers.py --peer "$peer" --json "$OUT/$peer.json" >/dev/null
done
"$PY" bench/peers/table.py --dir "$OUT" --write "$DOCS"

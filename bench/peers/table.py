#!/usr/bin/env python3
"""One side-by-side table: ours (ours.json, from `--bench native`) beside the
peers (vineyard.json, ray.json, from peers.py), all read from --dir.

    python bench/peers/table.py --dir target/bench-peers
    python bench/peers/table.py --dir target/bench-peers --write docs/benchmarks.md

It prints the section as Markdown. --write also puts it into the file,
between the lines BEGIN and END below, or at the end under its own heading
when the file has no such lines yet.
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys

BEGIN = "<!-- bench-peers:begin -->"
END = "<!-- bench-peers:end -->"
HEADING = "## Peers side by side (make bench-peers)"
PEERS = (("vineyard", "Vineyard"), ("ray", "Ray"))

# key, what it measures, unit, whether more is better
ROWS = (
    ("put_4k_p50_us", "4 KiB put, p50", "µs", False),
    ("put_4k_p99_us", "4 KiB put, p99", "µs", False),
    ("get_4k_p50_us", "4 KiB get, p50", "µs", False),
    ("get_4k_p99_us", "4 KiB get, p99", "µs", False),
    ("put_4k_ops", "4 KiB put, 1 client", "ops/s", True),
    ("get_4k_ops", "4 KiB get, 1 client", "ops/s", True),
    ("put_4k_ops_4c", "4 KiB put, 4 clients", "ops/s", True),
    ("get_4k_ops_4c", "4 KiB get, 4 clients", "ops/s", True),
    ("put_256m_gibs", "256 MiB put, median", "GiB/s", True),
)


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def number(value, unit):
    if not isinstance(value, (int, float)):
        return "—"
    if unit == "ops/s":
        return f"{value:,.0f}"
    if unit == "GiB/s":
        return f"{value:.2f}"
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def advantage(ours, peers, more_is_better):
    """>1 means ours wins: ours ÷ best peer for rates, best peer ÷ ours for
    latencies."""
    peers = [v for v in peers if isinstance(v, (int, float)) and v > 0]
    if not isinstance(ours, (int, float)) or ours <= 0 or not peers:
        return "—"
    ratio = ours / max(peers) if more_is_better else min(peers) / ours
    return f"{ratio:.2f}×"


def commit():
    try:
        out = subprocess.run(["git", "log", "-1", "--format=%h %s"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip() or None


def section(ours, peers, command):
    """The Markdown between the markers."""
    heads = []
    for name, title, figures in peers:
        version = figures.get("version") if figures else None
        heads.append(f"{title} {version}" if version else f"{title} (no figures)")
    lines = [
        f"| measurement | ours | {' | '.join(heads)} | ours vs best peer (>1: ours wins) |",
        "|---|---|" + "---|" * len(peers) + "---|",
    ]
    for key, label, unit, more_is_better in ROWS:
        values = [(figures or {}).get(key) for _, _, figures in peers]
        how = "ours ÷ best peer" if more_is_better else "best peer ÷ ours"
        lines.append(
            f"| {label} ({unit}) | {number(ours.get(key), unit)} | "
            + " | ".join(number(v, unit) for v in values)
            + f" | {advantage(ours.get(key), values, more_is_better)} ({how}) |"
        )

    pythons = sorted({f["python"] for _, _, f in peers if f and f.get("python")})
    head = [
        f"Measured {datetime.date.today().isoformat()} with `{command}`",
        f"on {os.cpu_count()} cores ({platform.machine()})",
    ]
    if pythons:
        head.append(f"peers through their Python clients on Python {', '.join(pythons)}")
    at = commit()
    if at:
        head.append(f"at commit `{at.split(' ', 1)[0]}`")
    out = [", ".join(head) + ".", "", *lines, ""]

    if isinstance(ours.get("floor_rtt_p50_us"), (int, float)):
        out.append(f"The round-trip floor (64 B ping-pong over a SOCK_SEQPACKET socketpair between two processes, measured beside each of our calls), p50: {ours['floor_rtt_p50_us']:.1f} µs.")
        out.append("")
    out.append("How each side was driven:")
    out.append(
        "- ours: `cargo bench -p payload-agent --bench native`, its Rust client; its ops/s rows keep several "
        "calls in flight on each connection (see that bench), where the peers' Python clients make one call at a time"
        + (f"; {ours['note']}" if ours.get("note") else "")
        + "."
    )
    for name, title, figures in peers:
        if figures is None:
            out.append(f"- {title}: no figures ({name}.json missing).")
        else:
            out.append(f"- {title}: {figures.get('note') or 'no note'}.")
    return "\n".join(out)


def write(path, body):
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        text = ""
    block = f"{BEGIN}\n{body}\n{END}"
    start, end = text.find(BEGIN), text.find(END)
    if 0 <= start < end:
        text = text[:start] + block + text[end + len(END) :]
    else:
        text = text.rstrip("\n") + ("\n\n" if text.strip() else "") + f"{HEADING}\n\n{block}\n"
    with open(path, "w") as f:
        f.write(text)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="target/bench-peers", help="where ours.json and the peers' files are")
    parser.add_argument("--write", metavar="FILE", help="put the section into this Markdown file")
    parser.add_argument("--command", default="make bench-peers", help="the command named in the section")
    args = parser.parse_args()

    ours = load(os.path.join(args.dir, "ours.json"))
    if ours is None:
        sys.exit(f"table.py: {args.dir}/ours.json is missing (PM_BENCH_JSON of `cargo bench --bench native` writes it)")
    peers = [(name, title, load(os.path.join(args.dir, f"{name}.json"))) for name, title in PEERS]
    body = section(ours, peers, args.command)
    print(body)
    if args.write:
        write(args.write, body)
        print(f"table.py: wrote the section into {args.write}", file=sys.stderr)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Measure one peer store (Vineyard or Ray's object store) on the workloads of
`cargo bench -p payload-agent --bench native`, through its Python client.

    python bench/peers/peers.py --peer vineyard --json target/bench-peers/vineyard.json
    python bench/peers/peers.py --peer ray --json target/bench-peers/ray.json

The peer is started privately (its own socket or temp dir, loopback only) and
stopped at the end. Written keys: put_4k_p50_us, put_4k_p99_us, get_4k_p50_us,
get_4k_p99_us, put_4k_ops, get_4k_ops, put_4k_ops_4c, get_4k_ops_4c,
put_256m_gibs (null where not measured), plus peer, version, python and note.
A peer that cannot be imported or started gives all nulls and a note saying
why; the exit status is 0 then, so the table still gets written.
"""

import argparse
import json
import math
import multiprocessing
import os
import platform
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

SMALL = 4096
BIG = 256 << 20
KEYS = (
    "put_4k_p50_us",
    "put_4k_p99_us",
    "get_4k_p50_us",
    "get_4k_p99_us",
    "put_4k_ops",
    "get_4k_ops",
    "put_4k_ops_4c",
    "get_4k_ops_4c",
    "put_256m_gibs",
)
# Ray's cluster is private: every address on loopback (by default Ray turns
# 127.0.0.1 into the host's outward address; this switch, meant for single
# machine clusters, stops that), no usage reports, and no token written into
# the home directory.
RAY_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
}


def percentile_us(samples_ns, p):
    """Nearest-rank percentile of nanosecond samples, in microseconds."""
    ordered = sorted(samples_ns)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1] / 1000


def consume(buf):
    """Read the bytes a get returned: copy them out, as a caller would."""
    return bytes(memoryview(buf))[-1]


class Vineyard:
    """vineyardd from the `vineyard` wheel, on a private IPC socket."""

    name = "vineyard"
    get_path = "client.get(id), a memoryview over the shared blob"
    put_path = "client.put(bytes)"

    def __init__(self, workdir):
        import vineyard

        self.version = vineyard.__version__
        self.socket = os.path.join(workdir, "vineyard.sock")
        self.log = os.path.join(workdir, "vineyardd.log")
        binary = os.path.join(os.path.dirname(vineyard.__file__), "bdist", "vineyardd")
        command = [binary] if os.access(binary, os.X_OK) else [sys.executable, "-m", "vineyard"]
        # Local metadata (no etcd) and no TCP RPC listener: IPC only.
        command += ["--socket", self.socket, "--size", "2Gi", "--meta", "local", "--rpc=false"]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        while not os.path.exists(self.socket):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"vineyardd did not start: {self.log_tail()}")
            time.sleep(0.1)

    def log_tail(self):
        try:
            with open(self.log, errors="replace") as log:
                return " | ".join(log.read().strip().splitlines()[-3:])
        except OSError:
            return "(no log)"

    def address(self):
        return self.socket

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class VineyardClient:
    def __init__(self, address):
        import vineyard

        self.client = vineyard.connect(address)

    def put(self, data):
        return self.client.put(data)

    def get(self, handle):
        return self.client.get(handle)

    def delete(self, handle):
        self.client.delete(handle)

    def close(self):
        self.client.close()


class Ray:
    """A one-node Ray cluster on 127.0.0.1 with a 2 GiB object store."""

    name = "ray"
    get_path = "ray.get(ref)"
    put_path = "ray.put(bytes)"

    def __init__(self, workdir):
        os.environ.update(RAY_ENV)
        import ray

        self.version = ray.__version__
        ray.init(
            num_cpus=2,
            object_store_memory=2 * 1024**3,
            include_dashboard=False,
            log_to_driver=False,
            _node_ip_address="127.0.0.1",
            _temp_dir=workdir,
        )
        self.gcs = ray.get_runtime_context().gcs_address

    def address(self):
        return self.gcs

    def stop(self):
        import ray

        ray.shutdown()


class RayClient:
    def __init__(self, address):
        os.environ.update(RAY_ENV)
        import ray

        self.ray = ray
        if address is not None:
            ray.init(address=address, log_to_driver=False, _node_ip_address="127.0.0.1")

    def put(self, data):
        return self.ray.put(data)

    def get(self, handle):
        return self.ray.get(handle)

    def delete(self, handle):
        # A ref's object is freed when the last reference goes; the caller
        # drops its own.
        pass

    def close(self):
        pass


CLIENTS = {"vineyard": VineyardClient, "ray": RayClient}


def small_ops(client, ops, warmup):
    """One call at a time: put latencies, then get latencies cycling over
    every payload put (distinct objects, as the native bench does)."""
    payload = os.urandom(SMALL)
    handles = [client.put(payload) for _ in range(warmup)]
    clock = time.perf_counter_ns
    put_ns = []
    start = clock()
    for _ in range(ops):
        t = clock()
        handles.append(client.put(payload))
        put_ns.append(clock() - t)
    put_wall = (clock() - start) / 1e9
    for handle in handles[:warmup]:
        consume(client.get(handle))
    get_ns = []
    start = clock()
    for i in range(ops):
        handle = handles[(warmup + i) % len(handles)]
        t = clock()
        consume(client.get(handle))
        get_ns.append(clock() - t)
    get_wall = (clock() - start) / 1e9
    for handle in handles:
        client.delete(handle)
    return {
        "put_4k_p50_us": percentile_us(put_ns, 50),
        "put_4k_p99_us": percentile_us(put_ns, 99),
        "get_4k_p50_us": percentile_us(get_ns, 50),
        "get_4k_p99_us": percentile_us(get_ns, 99),
        "put_4k_ops": ops / put_wall,
        "get_4k_ops": ops / get_wall,
    }


def worker(peer, address, per, barrier, results):
    """One of the concurrent clients: its own process and connection. Gets
    (of its own warm-up payloads) first, then puts, as the native bench."""
    try:
        client = CLIENTS[peer](address)
        payload = os.urandom(SMALL)
        handles = [client.put(payload) for _ in range(300)]
        for handle in handles:
            consume(client.get(handle))
        barrier.wait()
        start = time.perf_counter_ns()
        for i in range(per):
            consume(client.get(handles[i % len(handles)]))
        got = (start, time.perf_counter_ns())
        barrier.wait()
        start = time.perf_counter_ns()
        made = [client.put(payload) for _ in range(per)]
        put = (start, time.perf_counter_ns())
        barrier.wait()
        for handle in handles + made:
            client.delete(handle)
        client.close()
        results.put(("ok", got, put))
    except BaseException as err:  # noqa: BLE001 - reported to the parent
        barrier.abort()
        results.put(("error", f"{type(err).__name__}: {err}", None))


def many_clients(peer, address, clients, per):
    """Aggregate ops/s of `clients` processes, each one call at a time; the
    clock runs from the first start to the last finish of each phase."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(clients, timeout=300)
    results = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(peer, address, per, barrier, results)) for _ in range(clients)]
    for proc in procs:
        proc.start()
    outcomes = []
    try:
        deadline = time.monotonic() + 900
        while len(outcomes) < clients:
            try:
                outcomes.append(results.get(timeout=1))
            except queue.Empty:
                crashed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if crashed or time.monotonic() > deadline:
                    raise RuntimeError(f"a client died (exit codes {crashed}) or the run took over 900 s")
        for proc in procs:
            proc.join(60)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(10)
    errors = [detail for kind, detail, _ in outcomes if kind == "error"]
    if errors:
        raise RuntimeError(f"a client failed: {errors[0]}")

    def rate(spans):
        wall = (max(end for _, end in spans) - min(start for start, _ in spans)) / 1e9
        return clients * per / wall

    return {
        "get_4k_ops_4c": rate([got for _, got, _ in outcomes]),
        "put_4k_ops_4c": rate([put for _, _, put in outcomes]),
    }


def big_puts(client, rounds):
    """256 MiB puts of one pre-touched numpy array; each is freed before the
    next. Returns the GiB/s of every round, in order."""
    import numpy

    pattern = (numpy.arange(256, dtype=numpy.uint16) * 13).astype(numpy.uint8)
    src = numpy.tile(pattern, BIG // 256)
    speeds = []
    for _ in range(rounds):
        start = time.perf_counter()
        handle = client.put(src)
        speeds.append(BIG / (time.perf_counter() - start) / 2**30)
        client.delete(handle)
        del handle
        time.sleep(0.2)
    return speeds


def measure(peer, args, figures, notes):
    workdir = tempfile.mkdtemp(prefix=f"pm-bench-{peer}-", dir="/tmp")
    server = None
    try:
        server = (Vineyard if peer == "vineyard" else Ray)(workdir)
        figures["version"] = server.version
        # Ray's driver is itself the client; Vineyard's connects to the socket.
        client = CLIENTS[peer](server.address() if peer == "vineyard" else None)
        figures.update(small_ops(client, args.ops, args.warmup))
        notes.append(f"4 KiB: {server.put_path} and {server.get_path}, one call at a time, one client")
        if peer == "vineyard":
            notes.append(blob_path(client, args.ops, args.warmup))
        speeds = big_puts(client, args.rounds)
        figures["put_256m_gibs"] = statistics.median(speeds)
        notes.append(
            f"256 MiB: put of a numpy uint8 array, each freed before the next, median of {args.rounds} "
            f"(rounds in GiB/s: {', '.join(f'{s:.2f}' for s in speeds)}; the first round's pages are new "
            "to the store, later rounds may reuse them)"
        )
        client.close()
        figures.update(many_clients(peer, server.address(), args.clients, args.per_client))
        how = "each its own vineyard.connect(socket)" if peer == "vineyard" else "each a Ray driver joined with ray.init(address=...)"
        notes.append(f"{args.clients} clients: {args.clients} processes, {how}, one call at a time, {args.per_client} ops each")
    except Exception as err:  # noqa: BLE001 - what failed goes in the note
        notes.append(f"stopped early: {type(err).__name__}: {err}")
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def blob_path(client, ops, warmup):
    """Vineyard's lower-level path (create_blob, copy, seal; get_blob), for
    reference: the table uses client.put/client.get."""
    raw = client.client
    payload = os.urandom(SMALL)

    def put():
        blob = raw.create_blob(SMALL)
        blob.copy(0, payload)
        return blob.seal(raw).id

    ids = [put() for _ in range(warmup)]
    put_ns, get_ns = [], []
    for _ in range(ops // 3):
        t = time.perf_counter_ns()
        ids.append(put())
        put_ns.append(time.perf_counter_ns() - t)
    for oid in ids[warmup:]:
        t = time.perf_counter_ns()
        consume(raw.get_blob(oid))
        get_ns.append(time.perf_counter_ns() - t)
    for oid in ids:
        raw.delete(oid)
    return (
        f"for reference, the Blob path (create_blob+copy+seal; get_blob) p50: "
        f"put {percentile_us(put_ns, 50):.0f} µs, get {percentile_us(get_ns, 50):.0f} µs"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer", required=True, choices=sorted(CLIENTS))
    parser.add_argument("--json", required=True, help="where to write the figures")
    parser.add_argument("--ops", type=int, default=3000, help="timed 4 KiB puts and gets (one client)")
    parser.add_argument("--warmup", type=int, default=300, help="untimed 4 KiB puts and gets first")
    parser.add_argument("--clients", type=int, default=4, help="concurrent client processes")
    parser.add_argument("--per-client", type=int, default=2000, help="4 KiB puts and gets per concurrent client")
    parser.add_argument("--rounds", type=int, default=5, help="256 MiB puts (the median is reported)")
    args = parser.parse_args()

    python = platform.python_version()
    figures = {key: None for key in KEYS}
    figures.update(peer=args.peer, version=None, python=python)
    notes = []
    if args.peer == "ray":
        os.environ.update(RAY_ENV)  # read when ray is imported
    try:
        __import__(args.peer)
    except Exception as err:  # noqa: BLE001 - an ImportError, or worse, from a wheel
        notes.append(f"{args.peer}: not installable or not importable on Python {python} ({type(err).__name__}: {err})")
    else:
        measure(args.peer, args, figures, notes)
    figures["note"] = "; ".join(notes)

    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as out:
        json.dump(figures, out, indent=2)
        out.write("\n")
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()

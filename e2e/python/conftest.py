"""Fixtures of the Python suites: stubs generated from proto/ by grpcio-tools,
a real payload-agent on TCP and its Unix socket, and a client on one channel.
The agent binary comes from $PM_AGENT_BIN (default: target/debug/payload-agent).
"""

import contextlib
import importlib
import importlib.resources
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import grpc
import pytest

REPO = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO / "proto"
SHM_ROOT = Path("/dev/shm")
CALL_TIMEOUT = 30  # seconds, per RPC
START_TIMEOUT = 15  # seconds for the agent's TCP port to accept


# --------------------------------------------------------------------------
# Stubs generated at test time by grpcio-tools
# --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pb(tmp_path_factory):
    """Generate *_pb2 / *_pb2_grpc modules from proto/ and import them."""
    from grpc_tools import protoc

    out = tmp_path_factory.mktemp("stubs")
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / "payload").rglob("*.proto"))
    assert protos, f"no .proto files under {PROTO_ROOT / 'payload'}"
    # google/protobuf/{empty,timestamp}.proto ship inside grpc_tools.
    wkt = str(importlib.resources.files("grpc_tools") / "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{wkt}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        *protos,
    ]
    rc = protoc.main(args)
    assert rc == 0, f"grpc_tools.protoc failed with {rc}: {' '.join(args)}"
    sys.path.insert(0, str(out))
    try:
        mod = lambda name: importlib.import_module(f"payload.manager.{name}")  # noqa: E731
        ns = types.SimpleNamespace(
            id=mod("core.v1.id_pb2"),
            types=mod("core.v1.types_pb2"),
            policy=mod("core.v1.policy_pb2"),
            lease=mod("runtime.v1.lease_pb2"),
            lifecycle=mod("runtime.v1.lifecycle_pb2"),
            tiering=mod("runtime.v1.tiering_pb2"),
            stats=mod("admin.v1.stats_pb2"),
            stream=mod("runtime.v1.stream_pb2"),
            lineage=mod("catalog.v1.lineage_pb2"),
            catalog=mod("catalog.v1.catalog_pb2"),
            metadata=mod("catalog.v1.metadata_pb2"),
            data_grpc=mod("services.v1.payload_data_service_pb2_grpc"),
            catalog_grpc=mod("services.v1.payload_catalog_service_pb2_grpc"),
            admin_grpc=mod("services.v1.payload_admin_service_pb2_grpc"),
            stream_grpc=mod("services.v1.payload_stream_service_pb2_grpc"),
        )
        yield ns
    finally:
        sys.path.remove(str(out))


# --------------------------------------------------------------------------
# The agent under test
# --------------------------------------------------------------------------


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def running_agent(state_dir, extra_args=(), env=None):
    """A payload-agent on a spare TCP port and its socket, until the block ends."""
    binary = os.environ.get("PM_AGENT_BIN") or str(REPO / "target" / "debug" / "payload-agent")
    if not os.access(binary, os.X_OK):
        pytest.fail(f"agent binary not found or not executable: {binary} (set PM_AGENT_BIN)")

    ram_root = Path(tempfile.mkdtemp(prefix="e2e-", dir=SHM_ROOT))
    port = _free_port()
    log_path = state_dir / "agent.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        [
            binary,
            "standalone",
            "--state-dir", str(state_dir),
            "--listen", f"127.0.0.1:{port}",
            "--ram-root", str(ram_root),
            "--shm-prefix", "pm",
            *extra_args,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "info"), **(env or {})},
    )

    def log_tail():
        log.flush()
        return log_path.read_text(errors="replace")[-4000:]

    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not _port_open(port):
            if proc.poll() is not None:
                pytest.fail(f"agent exited with {proc.returncode} before listening:\n{log_tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"agent did not accept on 127.0.0.1:{port} within {START_TIMEOUT}s:\n{log_tail()}")
            time.sleep(0.05)

        yield types.SimpleNamespace(
            port=port,
            state_dir=state_dir,
            ram_root=ram_root,
            socket=state_dir / "agent.sock",
            log_tail=log_tail,
        )
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        log.close()
        shutil.rmtree(ram_root, ignore_errors=True)


@pytest.fixture(scope="session")
def agent(tmp_path_factory):
    with running_agent(tmp_path_factory.mktemp("agent")) as running:
        yield running


class Client:
    """The three unary services on one channel."""

    def __init__(self, pb, channel):
        self.channel = channel
        self.data = pb.data_grpc.PayloadDataServiceStub(channel)
        self.catalog = pb.catalog_grpc.PayloadCatalogServiceStub(channel)
        self.admin = pb.admin_grpc.PayloadAdminServiceStub(channel)
        self.streams = pb.stream_grpc.PayloadStreamServiceStub(channel)


def _connect(pb, target):
    channel = grpc.insecure_channel(target)
    grpc.channel_ready_future(channel).result(timeout=CALL_TIMEOUT)
    return channel


@pytest.fixture(scope="session")
def client(pb, agent):
    channel = _connect(pb, f"127.0.0.1:{agent.port}")
    yield Client(pb, channel)
    channel.close()

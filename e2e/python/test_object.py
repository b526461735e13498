"""The object tier through a v1 client: an agent with --object-store on a
real S3-compatible server (moto_server, on 127.0.0.1), a client that
allocates on TIER_OBJECT, uploads with its own S3 client (boto3), imports,
and reads object-tier payloads through the contract's `disk` location.
"""

import mmap
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc
import pytest

from conftest import CALL_TIMEOUT, Client, _connect, _free_port, _port_open, running_agent

boto3 = pytest.importorskip("boto3", reason="boto3 comes with moto[server] (e2e/python/requirements.txt)")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which("moto_server")
    if server is None:
        pytest.fail("moto_server not found; install e2e/python/requirements.txt")
    port = _free_port()
    proc = subprocess.Popen([server, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not _port_open(port):
        assert proc.poll() is None, "moto_server exited"
        assert time.monotonic() < deadline, "moto_server did not listen"
        time.sleep(0.05)
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_REGION": "us-east-1",
    }
    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                      aws_access_key_id="test", aws_secret_access_key="test")
    bucket = f"e2e-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    yield s3, bucket, env
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def object_agent(s3, tmp_path_factory):
    _, bucket, env = s3
    with running_agent(tmp_path_factory.mktemp("object-agent"), ["--object-store", f"s3://{bucket}/e2e"], env) as a:
        yield a


@pytest.fixture(scope="module")
def object_client(pb, object_agent):
    channel = _connect(pb, f"127.0.0.1:{object_agent.port}")
    yield Client(pb, channel)
    channel.close()


def read_disk(desc):
    assert desc.WhichOneof("location") == "disk", desc
    assert os.path.isabs(desc.disk.path), desc.disk.path
    assert desc.disk.offset_bytes == 0 and desc.disk.length_bytes == desc.size_bytes
    with open(desc.disk.path, "rb") as f:
        if desc.size_bytes == 0:
            return b""
        with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
            return bytes(m[: desc.disk.length_bytes])


def lease(pb, c, raw):
    req = pb.lease.AcquireReadLeaseRequest(id=pb.id.PayloadID(value=raw), min_lease_duration_ms=30_000)
    return c.data.AcquireReadLease(req, timeout=CALL_TIMEOUT)


def test_allocate_on_object_upload_import_and_read_through_the_disk_location(pb, s3, object_client):
    c, (client_s3, bucket, _) = object_client, s3
    data = os.urandom(5 * 2**20 + 11)
    alloc = c.catalog.AllocatePayload(
        pb.lifecycle.AllocatePayloadRequest(size_bytes=len(data), preferred_tier=pb.types.TIER_OBJECT),
        timeout=CALL_TIMEOUT,
    )
    url = alloc.object_upload_path
    assert url.startswith(f"s3://{bucket}/e2e/uploads/"), url
    raw = alloc.payload_descriptor.payload_id.value
    client_s3.put_object(Bucket=bucket, Key=url.split("/", 3)[3], Body=data)
    c.catalog.ImportPayload(pb.lifecycle.ImportPayloadRequest(id=pb.id.PayloadID(value=raw)), timeout=CALL_TIMEOUT)
    got = lease(pb, c, raw)
    desc = got.payload_descriptor
    assert desc.tier == pb.types.TIER_OBJECT
    assert desc.state == pb.types.PAYLOAD_STATE_DURABLE
    assert read_disk(desc) == data
    stat = c.catalog.GetPayload(pb.lifecycle.GetPayloadRequest(id=pb.id.PayloadID(value=raw)), timeout=CALL_TIMEOUT)
    assert stat.payload_descriptor.object.bucket == bucket
    assert len(stat.payload_descriptor.object.block_keys) == 2, "5 MiB + 11 bytes is two 4 MiB blocks"
    assert not client_s3.list_objects_v2(Bucket=bucket, Prefix="e2e/uploads/").get("Contents"), "upload removed"


def test_a_spilled_payload_reads_back_and_stat_names_its_blocks(pb, object_client):
    c = object_client
    data = os.urandom(9 * 2**20)
    alloc = c.catalog.AllocatePayload(
        pb.lifecycle.AllocatePayloadRequest(size_bytes=len(data), preferred_tier=pb.types.TIER_RAM),
        timeout=CALL_TIMEOUT,
    )
    desc = alloc.payload_descriptor
    with open("/dev/shm/" + desc.ram.shm_name.lstrip("/"), "r+b") as f:
        f.write(data)
    raw = desc.payload_id.value
    c.catalog.CommitPayload(pb.lifecycle.CommitPayloadRequest(id=pb.id.PayloadID(value=raw)), timeout=CALL_TIMEOUT)
    spilled = c.catalog.Spill(
        pb.tiering.SpillRequest(ids=[pb.id.PayloadID(value=raw)], target_tier=pb.types.TIER_OBJECT),
        timeout=CALL_TIMEOUT,
    )
    assert spilled.results[0].ok, spilled.results[0].error_message
    got = lease(pb, c, raw).payload_descriptor
    assert got.tier == pb.types.TIER_OBJECT
    assert read_disk(got) == data
    stat = c.catalog.GetPayload(pb.lifecycle.GetPayloadRequest(id=pb.id.PayloadID(value=raw)), timeout=CALL_TIMEOUT)
    assert len(stat.payload_descriptor.object.block_keys) == 3
    assert [copy.tier for copy in stat.payload_descriptor.copies] == [pb.types.TIER_OBJECT]


def test_import_without_an_upload_says_where_to_put_it(pb, object_client):
    c = object_client
    alloc = c.catalog.AllocatePayload(
        pb.lifecycle.AllocatePayloadRequest(size_bytes=10, preferred_tier=pb.types.TIER_OBJECT),
        timeout=CALL_TIMEOUT,
    )
    with pytest.raises(grpc.RpcError) as err:
        c.catalog.ImportPayload(
            pb.lifecycle.ImportPayloadRequest(id=alloc.payload_descriptor.payload_id), timeout=CALL_TIMEOUT
        )
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert alloc.object_upload_path in err.value.details()


def test_payloadctl_imports_an_object_uploaded_without_an_allocation(s3, object_agent):
    payloadctl = Path(os.environ.get("PM_PAYLOADCTL_BIN", Path(__file__).parents[2] / "target/debug/payloadctl"))
    if not payloadctl.exists():
        pytest.skip(f"no payloadctl at {payloadctl}; make test-python builds it")
    client_s3, bucket, _ = s3
    data = os.urandom(4 * 2**20 + 3)
    pid = str(uuid.uuid4())
    client_s3.put_object(Bucket=bucket, Key=f"e2e/uploads/{pid}", Body=data)
    ctl = [str(payloadctl), "--agent", f"http://127.0.0.1:{object_agent.port}", "--output", "json"]
    out = subprocess.run(ctl + ["import", pid], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert '"tier": "object"' in out.stdout, out.stdout
    got = subprocess.run(ctl + ["get", pid], capture_output=True, timeout=60)
    assert got.returncode == 0, got.stderr
    assert got.stdout == data
    missing = str(uuid.uuid4())
    refused = subprocess.run(ctl + ["import", missing], capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0
    assert f"s3://{bucket}/e2e/uploads/{missing}" in refused.stderr, refused.stderr

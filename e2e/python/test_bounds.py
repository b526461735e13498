"""Adversarial suite over TCP: requests past every bound get the precise
status and a message naming the limit, and the agent stays responsive
(a Stats call after each answers at once)."""

import grpc
import pytest

from conftest import CALL_TIMEOUT

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def put_ram(pb, c, data):
    desc = c.catalog.AllocatePayload(
        pb.lifecycle.AllocatePayloadRequest(size_bytes=len(data), preferred_tier=pb.types.TIER_RAM),
        timeout=CALL_TIMEOUT,
    ).payload_descriptor
    with open("/dev/shm" + desc.ram.shm_name, "r+b") as f:
        f.write(data)
    c.catalog.CommitPayload(pb.lifecycle.CommitPayloadRequest(id=desc.payload_id), timeout=CALL_TIMEOUT)
    return desc.payload_id


def refused(c, pb, rpc, request, code, word):
    with pytest.raises(grpc.RpcError) as ei:
        rpc(request, timeout=CALL_TIMEOUT)
    assert ei.value.code() == code, f"expected {code}, got {ei.value.code()}: {ei.value.details()}"
    assert word in ei.value.details(), ei.value.details()
    # Responsive throughout.
    c.admin.Stats(pb.stats.StatsRequest(), timeout=5)


@pytest.fixture(scope="module")
def kept(pb, client):
    return put_ram(pb, client, b"kept through every bad request")


def test_batch_of_150000_leases_is_refused_at_once(pb, client, kept):
    item = pb.lease.AcquireReadLeaseRequest(id=kept)
    request = pb.lease.BatchAcquireReadLeaseRequest(requests=[item] * 150_000)
    refused(client, pb, client.data.BatchAcquireReadLease, request, INVALID, "--max-batch-items")


def test_labels_past_their_bounds_are_refused(pb, client):
    alloc = pb.lifecycle.AllocatePayloadRequest
    ram = pb.types.TIER_RAM
    cases = [
        ({f"k{i}": "v" for i in range(65)}, "--max-labels"),
        ({"k" * 257: "v"}, "--max-label-key-bytes"),
        ({"k": "v" * 2049}, "--max-label-value-bytes"),
        ({"k": "a\0b"}, "NUL"),
    ]
    for labels, word in cases:
        request = alloc(size_bytes=16, preferred_tier=ram, labels=labels)
        refused(client, pb, client.catalog.AllocatePayload, request, INVALID, word)


def test_unknown_enum_values_are_refused(pb, client, kept):
    policy = pb.policy.EvictionPolicy(priority=99)
    request = pb.lifecycle.AllocatePayloadRequest(size_bytes=16, preferred_tier=pb.types.TIER_RAM, eviction_policy=policy)
    refused(client, pb, client.catalog.AllocatePayload, request, INVALID, "not a known value")
    update = pb.catalog.UpdatePayloadMetadataRequest(id=kept, mode=99)
    refused(client, pb, client.catalog.UpdatePayloadMetadata, update, INVALID, "not a known value")
    # An unknown lease mode stays FAILED_PRECONDITION, as the reference answers.
    lease = pb.lease.AcquireReadLeaseRequest(id=kept, mode=99)
    refused(client, pb, client.data.AcquireReadLease, lease, grpc.StatusCode.FAILED_PRECONDITION, "LEASE_MODE_READ")


def test_metadata_and_names_past_their_bounds_are_refused(pb, client, kept):
    big = pb.metadata.PayloadMetadata(data=b"x" * ((1 << 20) + 1))
    update = pb.catalog.UpdatePayloadMetadataRequest(id=kept, metadata=big)
    refused(client, pb, client.catalog.UpdatePayloadMetadata, update, INVALID, "--max-metadata-bytes")
    event = pb.catalog.AppendPayloadMetadataEventRequest(id=kept, source="s\0")
    refused(client, pb, client.catalog.AppendPayloadMetadataEvent, event, INVALID, "NUL")
    stream = pb.stream.CreateStreamRequest(stream=pb.stream.StreamID(name="n" * 257))
    refused(client, pb, client.streams.CreateStream, stream, INVALID, "--max-name-bytes")
    selector = pb.lifecycle.ListPayloadsRequest(label_selector="a=b," * 17)
    refused(client, pb, client.catalog.ListPayloads, selector, INVALID, "--max-selector-terms")


def test_lineage_bounds_and_the_self_edge_the_reference_sends(pb, client, kept):
    edge = pb.lineage.LineageEdge(parent=kept, operation="op")
    many = pb.lineage.AddLineageRequest(child=kept, parents=[edge] * 1001)
    refused(client, pb, client.catalog.AddLineage, many, INVALID, "--max-lineage-parents")
    deep = pb.lineage.GetLineageRequest(id=kept, upstream=True, max_depth=1001)
    refused(client, pb, client.catalog.GetLineage, deep, INVALID, "--max-lineage-depth")
    # Accepted, recorded, never followed.
    client.catalog.AddLineage(pb.lineage.AddLineageRequest(child=kept, parents=[edge]), timeout=CALL_TIMEOUT)
    got = client.catalog.GetLineage(pb.lineage.GetLineageRequest(id=kept, upstream=True), timeout=CALL_TIMEOUT)
    assert list(got.edges) == []


def test_a_message_over_the_size_limit_is_refused_before_decoding(pb, client):
    request = pb.lifecycle.AllocatePayloadRequest(
        size_bytes=16, preferred_tier=pb.types.TIER_RAM, labels={"k": "v" * (5 << 20)}
    )
    with pytest.raises(grpc.RpcError) as ei:
        client.catalog.AllocatePayload(request, timeout=CALL_TIMEOUT)
    assert ei.value.code() in (grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.RESOURCE_EXHAUSTED), ei.value
    client.admin.Stats(pb.stats.StatsRequest(), timeout=5)


def test_durations_and_the_write_deadline_are_bounded(pb, client, kept):
    century = 100 * 365 * 86_400_000
    ttl = pb.lifecycle.AllocatePayloadRequest(size_bytes=16, preferred_tier=pb.types.TIER_RAM, ttl_ms=century)
    refused(client, pb, client.catalog.AllocatePayload, ttl, INVALID, "--max-duration-ms")
    deadline = pb.lifecycle.AllocatePayloadRequest(
        size_bytes=16, preferred_tier=pb.types.TIER_RAM, write_deadline_ms=2**63
    )
    refused(client, pb, client.catalog.AllocatePayload, deadline, INVALID, "--write-deadline-ms")
    pin = pb.tiering.PinRequest(id=kept, duration_ms=century)
    refused(client, pb, client.catalog.Pin, pin, INVALID, "--max-duration-ms")


def test_consumer_groups_and_stream_batches_are_bounded(pb, client, kept):
    sid = pb.stream.StreamID(name="bounded")
    client.streams.CreateStream(pb.stream.CreateStreamRequest(stream=sid), timeout=CALL_TIMEOUT)
    group = pb.stream.CommitRequest(stream=sid, consumer_group="g" * 257, offset=0)
    refused(client, pb, client.streams.Commit, group, INVALID, "--max-name-bytes")
    items = [pb.stream.AppendItem(payload_id=kept)] * 10_001
    append = pb.stream.AppendRequest(stream=sid, items=items)
    refused(client, pb, client.streams.Append, append, INVALID, "--max-batch-items")

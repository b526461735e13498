-- Several agents share one PostgreSQL catalog: a payload row describes the
-- copy held by one node, and each agent loads and recovers only its own rows.
ALTER TABLE payloads ADD COLUMN node TEXT NOT NULL DEFAULT '';
-- Listings are per node, newest first: one index serves the order, the
-- keyset seek and the count.
DROP INDEX payloads_by_created;
CREATE INDEX payloads_by_node_created ON payloads (node, created_at_ms DESC, id DESC);

-- Label rows carry their payload's listing key, so a label-filtered page is
-- one range of this index, in listing order.
ALTER TABLE payload_labels ADD COLUMN node TEXT NOT NULL DEFAULT '';
ALTER TABLE payload_labels ADD COLUMN created_at_ms BIGINT NOT NULL DEFAULT 0;
UPDATE payload_labels SET
    node = (SELECT p.node FROM payloads p WHERE p.id = payload_labels.payload_id),
    created_at_ms = (SELECT p.created_at_ms FROM payloads p WHERE p.id = payload_labels.payload_id);
DROP INDEX payload_labels_by_kv;
CREATE INDEX payload_labels_by_kv ON payload_labels (key, value, node, created_at_ms DESC, payload_id DESC);

-- Optimistic concurrency for metadata updates (expected_version).
ALTER TABLE metadata ADD COLUMN version BIGINT NOT NULL DEFAULT 1;

CREATE TABLE streams (
    id                    BIGSERIAL PRIMARY KEY,
    namespace             TEXT NOT NULL,
    name                  TEXT NOT NULL,
    retention_max_entries BIGINT NOT NULL DEFAULT 0,
    retention_max_age_ms  BIGINT NOT NULL DEFAULT 0,
    -- The offset the next appended entry gets; bumped under the row lock, so
    -- concurrent appends (from any agent) never share an offset.
    next_offset           BIGINT NOT NULL DEFAULT 0,
    created_at_ms         BIGINT NOT NULL,
    UNIQUE (namespace, name)
);

-- Entries refer to payloads by id without a foreign key: deleting a payload
-- must not rewrite a stream's history.
CREATE TABLE stream_entries (
    stream_id      BIGINT NOT NULL REFERENCES streams (id) ON DELETE CASCADE,
    entry_offset   BIGINT NOT NULL,
    payload_id     BYTEA NOT NULL CHECK (octet_length(payload_id) = 16),
    event_time_ms  BIGINT NOT NULL,
    append_time_ms BIGINT NOT NULL,
    duration_ns    BIGINT NOT NULL,
    tags           TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (stream_id, entry_offset)
);

CREATE INDEX stream_entries_by_append_time ON stream_entries (stream_id, append_time_ms);

CREATE TABLE consumer_offsets (
    stream_id      BIGINT NOT NULL REFERENCES streams (id) ON DELETE CASCADE,
    consumer_group TEXT NOT NULL,
    entry_offset   BIGINT NOT NULL,
    updated_at_ms  BIGINT NOT NULL,
    PRIMARY KEY (stream_id, consumer_group)
);

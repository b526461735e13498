-- Payload rows: one per payload copy. Same shape as the SQLite schema at the
-- same version; integers that hold u64 values are BIGINT.
CREATE TABLE payloads (
    id                 BYTEA PRIMARY KEY CHECK (octet_length(id) = 16),
    tier               INTEGER NOT NULL,
    state              INTEGER NOT NULL,
    size_bytes         BIGINT NOT NULL,
    created_at_ms      BIGINT NOT NULL,
    expires_at_ms      BIGINT NOT NULL DEFAULT 0,
    write_deadline_ms  BIGINT NOT NULL DEFAULT 0,
    priority           INTEGER NOT NULL DEFAULT 2,
    spill_target       INTEGER NOT NULL DEFAULT 3,
    min_residency_tier INTEGER,
    require_durable    BOOLEAN NOT NULL DEFAULT FALSE,
    labels             TEXT NOT NULL DEFAULT '{}',
    sha256             BYTEA,
    version            BIGINT NOT NULL,
    pinned_until_ms    BIGINT NOT NULL DEFAULT 0
);

CREATE INDEX payloads_by_created ON payloads (created_at_ms DESC, id DESC);

CREATE TABLE payload_labels (
    payload_id BYTEA NOT NULL REFERENCES payloads (id) ON DELETE CASCADE,
    key        TEXT NOT NULL,
    value      TEXT NOT NULL,
    PRIMARY KEY (payload_id, key)
);

CREATE INDEX payload_labels_by_kv ON payload_labels (key, value);

CREATE TABLE lineage (
    child      BYTEA NOT NULL REFERENCES payloads (id) ON DELETE CASCADE,
    parent     BYTEA NOT NULL REFERENCES payloads (id) ON DELETE CASCADE,
    operation  TEXT NOT NULL DEFAULT '',
    role       TEXT NOT NULL DEFAULT '',
    parameters BYTEA NOT NULL DEFAULT '\x',
    PRIMARY KEY (child, parent, operation, role)
);

CREATE INDEX lineage_by_parent ON lineage (parent);

CREATE TABLE metadata (
    payload_id    BYTEA PRIMARY KEY REFERENCES payloads (id) ON DELETE CASCADE,
    data          BYTEA NOT NULL,
    schema        TEXT NOT NULL,
    updated_at_ms BIGINT NOT NULL
);

CREATE TABLE metadata_events (
    seq        BIGSERIAL PRIMARY KEY,
    payload_id BYTEA NOT NULL REFERENCES payloads (id) ON DELETE CASCADE,
    ts_ms      BIGINT NOT NULL,
    data       BYTEA NOT NULL,
    source     TEXT NOT NULL,
    version    TEXT NOT NULL
);

CREATE INDEX metadata_events_by_payload ON metadata_events (payload_id, seq);

-- Payload rows: one per payload copy held by this catalog's node.
CREATE TABLE payloads (
    id                 BLOB PRIMARY KEY NOT NULL CHECK (length(id) = 16),
    tier               INTEGER NOT NULL,
    state              INTEGER NOT NULL,
    size_bytes         INTEGER NOT NULL,
    created_at_ms      INTEGER NOT NULL,
    expires_at_ms      INTEGER NOT NULL DEFAULT 0,
    write_deadline_ms  INTEGER NOT NULL DEFAULT 0,
    priority           INTEGER NOT NULL DEFAULT 2,
    spill_target       INTEGER NOT NULL DEFAULT 3,
    min_residency_tier INTEGER,
    require_durable    INTEGER NOT NULL DEFAULT 0,
    labels             TEXT NOT NULL DEFAULT '{}',
    sha256             BLOB,
    version            INTEGER NOT NULL,
    pinned_until_ms    INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;

CREATE INDEX payloads_by_created ON payloads (created_at_ms DESC, id DESC);

-- Labels again, one row each, so selectors are index lookups.
CREATE TABLE payload_labels (
    payload_id BLOB NOT NULL REFERENCES payloads (id) ON DELETE CASCADE,
    key        TEXT NOT NULL,
    value      TEXT NOT NULL,
    PRIMARY KEY (payload_id, key)
) WITHOUT ROWID;

CREATE INDEX payload_labels_by_kv ON payload_labels (key, value);

CREATE TABLE lineage (
    child      BLOB NOT NULL REFERENCES payloads (id) ON DELETE CASCADE,
    parent     BLOB NOT NULL REFERENCES payloads (id) ON DELETE CASCADE,
    operation  TEXT NOT NULL DEFAULT '',
    role       TEXT NOT NULL DEFAULT '',
    parameters BLOB NOT NULL DEFAULT x'',
    PRIMARY KEY (child, parent, operation, role)
) WITHOUT ROWID;

CREATE INDEX lineage_by_parent ON lineage (parent);

CREATE TABLE metadata (
    payload_id    BLOB PRIMARY KEY NOT NULL REFERENCES payloads (id) ON DELETE CASCADE,
    data          BLOB NOT NULL,
    schema        TEXT NOT NULL,
    updated_at_ms INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE metadata_events (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    payload_id BLOB NOT NULL REFERENCES payloads (id) ON DELETE CASCADE,
    ts_ms      INTEGER NOT NULL,
    data       BLOB NOT NULL,
    source     TEXT NOT NULL,
    version    TEXT NOT NULL
);

CREATE INDEX metadata_events_by_payload ON metadata_events (payload_id, seq);

-- Copies of a payload besides the authoritative one (its tier): a JSON list
-- of {"tier", "verified"}.
ALTER TABLE payloads ADD COLUMN copies TEXT NOT NULL DEFAULT '[]';

-- How a payload is cut into content-addressed blocks. A manifest is
-- pending from the moment it takes its block references until every block
-- and the manifest object are in the store.
CREATE TABLE object_manifests (
    payload_id    BLOB PRIMARY KEY CHECK (length(payload_id) = 16),
    node          TEXT NOT NULL,
    size_bytes    INTEGER NOT NULL,
    sha256        BLOB NOT NULL,
    block_size    INTEGER NOT NULL,
    -- Lowercase hex block hashes in payload order, joined by commas.
    blocks        TEXT NOT NULL,
    complete      BOOLEAN NOT NULL DEFAULT FALSE,
    created_at_ms INTEGER NOT NULL
);
CREATE INDEX object_manifests_by_node ON object_manifests (node, complete);

-- One row per block: how many manifests name it. A block at zero since
-- zero_since_ms is collected after the grace period; `deleting` marks the
-- ones a collection is removing from the store right now.
CREATE TABLE object_blocks (
    hash          BLOB PRIMARY KEY CHECK (length(hash) = 32),
    size_bytes    INTEGER NOT NULL,
    refs          INTEGER NOT NULL,
    stored        BOOLEAN NOT NULL DEFAULT FALSE,
    deleting      BOOLEAN NOT NULL DEFAULT FALSE,
    zero_since_ms INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX object_blocks_unreferenced ON object_blocks (refs, zero_since_ms);

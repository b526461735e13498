-- The nodes a cluster catalog has heard from, so one that went down is
-- still listed, and its payloads marked unavailable, after the operator
-- restarts. The operator writes a node's row at its first heartbeat and
-- about once a minute after; a standalone catalog leaves the table empty.
CREATE TABLE nodes (
    name         TEXT PRIMARY KEY,
    pool         TEXT NOT NULL,
    version      TEXT NOT NULL,
    last_seen_ms BIGINT NOT NULL
);

-- The nodes a cluster catalog has heard from, so one that went down is
-- still listed, and its payloads marked unavailable, after the operator
-- restarts. The operator writes a node's row at its first heartbeat and
-- about once a minute after.
CREATE TABLE nodes (
    name         TEXT PRIMARY KEY,
    pool         TEXT NOT NULL,
    version      TEXT NOT NULL,
    last_seen_ms BIGINT NOT NULL
);

-- Nodes holding rows from before this table: known, never heard from (0).
INSERT INTO nodes (name, pool, version, last_seen_ms)
SELECT DISTINCT node, '', '', 0 FROM payloads WHERE node <> '';

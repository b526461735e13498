-- Listings of every node's payloads (the cluster view) in listing order,
-- newest first, without a node to lead the index.
CREATE INDEX payloads_by_created ON payloads (created_at_ms DESC, id DESC);
CREATE INDEX payload_labels_by_kv_created ON payload_labels (key, value, created_at_ms DESC, payload_id DESC);

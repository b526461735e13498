-- Who created a stream, as for payloads (`unix:<uid>:<gid>` or `tcp`).
-- NULL for streams created before owners were recorded: any local caller
-- may append to or delete those, as before.
ALTER TABLE streams ADD COLUMN owner TEXT;

-- Who created a payload, as the agent saw it on its socket: `unix:<uid>:<gid>`,
-- or `tcp` for the anonymous identity of tokenless loopback TCP. NULL for
-- payloads created before owners were recorded: any local caller may
-- change those, as before.
ALTER TABLE payloads ADD COLUMN owner TEXT;

-- PayloadPolicies the operator accepted, compiled for agents (JSON of
-- payload_catalog::Policy); agents read them all every few seconds.
CREATE TABLE policies (
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    spec TEXT NOT NULL,
    updated_at_ms BIGINT NOT NULL,
    PRIMARY KEY (namespace, name)
);

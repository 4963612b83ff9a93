-- The audit trail, in the spirit of IHE ATNA: who connected (accepted or refused, over TLS or
-- not), what an association stored, what was exported where, and reloads of the configuration.
-- Append-only: the agent never updates or deletes a row. event_key makes a replayed record
-- (after an outage of the database) land once.
CREATE TABLE audit_events (
    id BIGSERIAL PRIMARY KEY,
    event_key TEXT NOT NULL UNIQUE,
    at TEXT NOT NULL,
    agent TEXT NOT NULL,
    -- association-accepted, association-refused, tls-failure, instances-stored, export, reload
    event TEXT NOT NULL,
    peer TEXT,
    calling_ae TEXT,
    called_ae TEXT,
    detail TEXT
);
CREATE INDEX audit_events_at ON audit_events (at);

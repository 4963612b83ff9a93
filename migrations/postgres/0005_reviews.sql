-- Radiologists' reviews of findings: who reviewed which finding, when, and the class they give
-- (the agent's, confirmed, or a correction). A finding may be reviewed again; its latest review
-- counts. Reviews are the labels of a site's next training round and the measure of how far the
-- agent agrees with its readers.
CREATE TABLE reviews (
    id BIGSERIAL PRIMARY KEY,
    finding_id BIGINT NOT NULL REFERENCES findings (id),
    reviewer TEXT NOT NULL,
    -- normal, schmorl, bulge, protrusion
    class TEXT NOT NULL,
    -- 1 when the reviewer kept the agent's class
    confirmed INTEGER NOT NULL,
    comment TEXT,
    reviewed_at TEXT NOT NULL
);
CREATE INDEX reviews_finding ON reviews (finding_id);

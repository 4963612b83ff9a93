-- The finding log. Times are ISO 8601 UTC text ('2026-11-27T22:50:00.123Z'), the same on both
-- backends, so they sort as text; on PostgreSQL cast with ::timestamptz for date arithmetic.
-- Minimal PHI: patient ID and accession number (to follow a patient and link to the RIS), never
-- the patient's name or birth date.

-- One row per DICOM association, accepted or not.
CREATE TABLE associations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    -- Unique across agents and restarts: "<agent id>/<counter>".
    association_key TEXT NOT NULL UNIQUE,
    agent TEXT NOT NULL,
    peer TEXT NOT NULL,
    calling_ae TEXT NOT NULL,
    called_ae TEXT NOT NULL,
    started_at TEXT NOT NULL,
    ended_at TEXT NOT NULL,
    instances BIGINT NOT NULL DEFAULT 0,
    bytes BIGINT NOT NULL DEFAULT 0,
    discarded BIGINT NOT NULL DEFAULT 0,
    failed BIGINT NOT NULL DEFAULT 0,
    -- released, aborted, rejected (with the reason in detail)
    outcome TEXT NOT NULL,
    detail TEXT
);
CREATE INDEX associations_started ON associations (started_at);

-- The tracker's decision on each series (latest revision).
CREATE TABLE series (
    series_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    patient_id TEXT,
    accession TEXT,
    study_date TEXT,
    body_part TEXT,
    modality TEXT,
    instances BIGINT NOT NULL,
    slices BIGINT NOT NULL,
    -- complete or skipped
    state TEXT NOT NULL,
    skip_reason TEXT,
    trigger_reason TEXT NOT NULL,
    revision BIGINT NOT NULL,
    decided_at TEXT NOT NULL
);
CREATE INDEX series_patient ON series (patient_id);
CREATE INDEX series_study ON series (study_uid);

-- One analysis job per completed series revision, claimed by one agent at a time.
CREATE TABLE jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    series_uid TEXT NOT NULL REFERENCES series (series_uid),
    revision BIGINT NOT NULL,
    -- queued, running, done, failed
    state TEXT NOT NULL,
    attempts BIGINT NOT NULL DEFAULT 0,
    claimed_by TEXT,
    created_at TEXT NOT NULL,
    started_at TEXT,
    finished_at TEXT,
    error TEXT,
    weights_sha256 TEXT,
    UNIQUE (series_uid, revision)
);
CREATE INDEX jobs_state ON jobs (state, id);

-- One finding per disc level per job.
CREATE TABLE findings (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id BIGINT NOT NULL REFERENCES jobs (id),
    series_uid TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    patient_id TEXT,
    accession TEXT,
    study_date TEXT,
    -- T12/L1 ... L5/S1
    level TEXT NOT NULL,
    -- normal, schmorl, bulge, protrusion, undetermined
    class TEXT NOT NULL,
    confidence REAL NOT NULL,
    -- JSON array of the views that saw it: ["sagittal", "axial"]
    views TEXT NOT NULL,
    -- JSON [x1, y1, x2, y2] in the key slice's pixels, or null
    box TEXT,
    mask_area_mm2 REAL,
    model_version TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE INDEX findings_patient ON findings (patient_id, level);
CREATE INDEX findings_study ON findings (study_uid);

-- Objects waiting to be sent, per destination; kept after a refusal, with its status.
CREATE TABLE outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    destination TEXT NOT NULL,
    job_id BIGINT REFERENCES jobs (id),
    object_path TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    -- pending, sent, refused
    state TEXT NOT NULL,
    attempts BIGINT NOT NULL DEFAULT 0,
    next_attempt_at TEXT NOT NULL,
    last_status TEXT,
    last_error TEXT,
    created_at TEXT NOT NULL,
    sent_at TEXT,
    UNIQUE (destination, sop_instance_uid)
);
CREATE INDEX outbox_due ON outbox (state, next_attempt_at);

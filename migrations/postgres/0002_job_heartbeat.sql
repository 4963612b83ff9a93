-- When the agent running a job last renewed its claim. A running job whose claim has not been
-- renewed for database.job_lease_s is taken over by any agent sharing the database: its agent
-- (host) is gone. NULL on jobs claimed before this column existed: their started_at counts.
ALTER TABLE jobs ADD COLUMN heartbeat_at TEXT;

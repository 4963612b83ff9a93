-- When retention (storage.retention_days) removed the series' instances and objects from the
-- state directory; NULL while they are there. A new decision on the series clears it.
ALTER TABLE series ADD COLUMN purged_at TEXT;

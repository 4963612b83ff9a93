-- Whether a finding's level name was counted from an anatomical landmark (the sacrum, or T12 by
-- its ribs): 1 certain, 0 the best name but uncertain, NULL for findings logged before the agent
-- said. A report that puts a finding on the wrong level is worse than none: readers of the log
-- and the API must see which names to check.
ALTER TABLE findings ADD COLUMN level_certain INTEGER;

-- Rows without an org (requests nobody was authenticated for: 401s, 404s) are capped per
-- UTC day, so unauthenticated traffic cannot grow the log table without limit. One counter
-- row per day, bumped once per written batch (not per row); the sink stores a day's
-- anonymous rows only while the counter is under the cap. Purged with the day.

CREATE TABLE tollgate_request_log_anonymous_days (
    -- UTC day number: time_ms / 86400000.
    day  bigint PRIMARY KEY,
    -- Anonymous rows offered that day (stored ones and refused ones).
    rows bigint NOT NULL
);

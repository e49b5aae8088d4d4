-- Request logs (tollgate-request-logger, feature `postgres`): one row per request, in DAILY
-- partitions by request time (ms since the Unix epoch, UTC days), so the retention is a
-- partition drop rather than a mass DELETE. Partitions are named
-- tollgate_request_logs_pYYYYMMDD and created ahead of time by the sink
-- (tollgate_request_logs_ensure_partition).

CREATE SEQUENCE tollgate_request_logs_id_seq AS bigint;

CREATE TABLE tollgate_request_logs (
    time_ms    bigint  NOT NULL,
    -- Arrival order: the tiebreak among rows of the same millisecond (keyset paging on
    -- (time_ms, id)).
    id         bigint  NOT NULL DEFAULT nextval('tollgate_request_logs_id_seq'),
    request_id text    NOT NULL,
    -- NULL before authentication; such rows are never shown to an org.
    org_id     uuid,
    key_id     uuid,
    model_id   uuid,
    method     text    NOT NULL,
    route      text,
    status     integer NOT NULL,
    code       text,
    credits    bigint  NOT NULL,
    latency_ms bigint  NOT NULL
) PARTITION BY RANGE (time_ms);

ALTER SEQUENCE tollgate_request_logs_id_seq OWNED BY tollgate_request_logs.id;

-- The one index: an org's rows in (time, id) order, for the filters and the cursor. Logs are
-- write-heavy, so nothing else is indexed.
CREATE INDEX tollgate_request_logs_org_time ON tollgate_request_logs (org_id, time_ms, id);

-- Makes sure the partition `p_name` for [p_from, p_to) exists and is attached; true when it
-- had to be created (or re-attached after an interrupted purge). Replicas creating the same
-- partition at once take turns on an advisory lock.
CREATE FUNCTION tollgate_request_logs_ensure_partition(p_name text, p_from bigint, p_to bigint)
RETURNS boolean
LANGUAGE plpgsql
AS $$
DECLARE
    rel regclass;
BEGIN
    -- DDL needs a brief exclusive lock on the parent: never queue behind long readers.
    PERFORM set_config('lock_timeout', '5s', true);
    PERFORM pg_advisory_xact_lock(hashtext(coalesce(current_schema(), '') || '.' || p_name));
    rel := to_regclass(quote_ident(p_name));
    IF rel IS NULL THEN
        EXECUTE format(
            'CREATE TABLE %I PARTITION OF tollgate_request_logs FOR VALUES FROM (%s) TO (%s)',
            p_name, p_from, p_to);
        RETURN true;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_inherits WHERE inhrelid = rel) THEN
        EXECUTE format(
            'ALTER TABLE tollgate_request_logs ATTACH PARTITION %I FOR VALUES FROM (%s) TO (%s)',
            p_name, p_from, p_to);
        RETURN true;
    END IF;
    RETURN false;
END
$$;

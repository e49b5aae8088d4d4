-- Usage rollups (tollgate-accounts, feature `postgres`): one row per org, UTC hour (ms since
-- the Unix epoch), model and route, added into by every replica's request-log worker
-- (INSERT … ON CONFLICT DO UPDATE). Kept 400 days.

CREATE TABLE tollgate_usage_hourly (
    org_id        uuid    NOT NULL,
    hour_ms       bigint  NOT NULL,
    -- The nil UUID for requests without a model (e.g. /api/credits): a primary key column
    -- cannot be NULL.
    model_id      uuid    NOT NULL,
    -- '' when no route matched.
    route         text    NOT NULL,
    requests      bigint  NOT NULL,
    ok            bigint  NOT NULL,
    client_errors bigint  NOT NULL,
    server_errors bigint  NOT NULL,
    rate_limited  bigint  NOT NULL,
    credits       bigint  NOT NULL,
    PRIMARY KEY (org_id, hour_ms, model_id, route)
);

-- The retention purge.
CREATE INDEX tollgate_usage_hourly_hour ON tollgate_usage_hourly (hour_ms);

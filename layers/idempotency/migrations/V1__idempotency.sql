-- The PostgreSQL idempotency store (tollgate-idempotency, feature `postgres`).
--
-- One row per (scope, key): either in flight (a lease token, and `expires_ms` is when the
-- lease runs out) or done (the stored response, and `expires_ms` is when it is forgotten).
-- Times are milliseconds since the Unix epoch, from the replicas' clocks. An expired row
-- counts as absent; `DELETE … WHERE expires_ms <= now` purges them.
CREATE TABLE tollgate_idempotency_keys (
    scope       text     NOT NULL,
    key         text     NOT NULL,
    -- SHA-256 of method, path and body hash.
    fingerprint bytea    NOT NULL CHECK (octet_length(fingerprint) = 32),
    -- The lease of the run in flight; NULL once the response is stored.
    lease       uuid,
    status      smallint CHECK (status BETWEEN 100 AND 999),
    -- The replayed headers as a JSON array of [name, value] pairs.
    headers     text,
    body        bytea,
    expires_ms  bigint   NOT NULL,
    PRIMARY KEY (scope, key),
    CHECK ((lease IS NULL) = (status IS NOT NULL)),
    CHECK ((status IS NULL) = (headers IS NULL) AND (status IS NULL) = (body IS NULL))
);

CREATE INDEX tollgate_idempotency_keys_expiry ON tollgate_idempotency_keys (expires_ms);

-- Claims (scope, key) for a request, atomically: 'started' when the key is free (never
-- used, released or expired; the row then holds p_lease), else 'mismatch' (another
-- fingerprint), 'in_flight', or 'replay' with the stored response.
CREATE FUNCTION tollgate_idempotency_begin(
    p_scope text,
    p_key text,
    p_fingerprint bytea,
    p_lease uuid,
    p_now bigint,
    p_lease_ms bigint
) RETURNS TABLE (outcome text, replay_status smallint, replay_headers text, replay_body bytea)
LANGUAGE plpgsql AS $$
DECLARE
    r tollgate_idempotency_keys%ROWTYPE;
BEGIN
    LOOP
        -- Waits for a concurrent insert of the same key to commit or roll back.
        INSERT INTO tollgate_idempotency_keys (scope, key, fingerprint, lease, expires_ms)
        VALUES (p_scope, p_key, p_fingerprint, p_lease, p_now + p_lease_ms)
        ON CONFLICT (scope, key) DO NOTHING;
        IF FOUND THEN
            RETURN QUERY SELECT 'started'::text, NULL::smallint, NULL::text, NULL::bytea;
            RETURN;
        END IF;
        -- Each statement of a function sees rows committed before it started, so this finds
        -- the row the insert conflicted with (unless it was purged meanwhile: loop).
        SELECT * INTO r FROM tollgate_idempotency_keys k
        WHERE k.scope = p_scope AND k.key = p_key
        FOR UPDATE;
        IF FOUND THEN
            IF r.expires_ms <= p_now THEN
                UPDATE tollgate_idempotency_keys k
                SET fingerprint = p_fingerprint, lease = p_lease, status = NULL,
                    headers = NULL, body = NULL, expires_ms = p_now + p_lease_ms
                WHERE k.scope = p_scope AND k.key = p_key;
                RETURN QUERY SELECT 'started'::text, NULL::smallint, NULL::text, NULL::bytea;
            ELSIF r.fingerprint <> p_fingerprint THEN
                RETURN QUERY SELECT 'mismatch'::text, NULL::smallint, NULL::text, NULL::bytea;
            ELSIF r.lease IS NOT NULL THEN
                RETURN QUERY SELECT 'in_flight'::text, NULL::smallint, NULL::text, NULL::bytea;
            ELSE
                RETURN QUERY SELECT 'replay'::text, r.status, r.headers, r.body;
            END IF;
            RETURN;
        END IF;
    END LOOP;
END
$$;

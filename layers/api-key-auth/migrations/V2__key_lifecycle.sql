-- Key lifecycle (docs/contract.md §13): expiry, scopes, model restrictions, a credit limit
-- per billing period, and rotation with a grace period.
--
-- A rotation with a grace period keeps the old key `active` and sets `revoked_at` to the end
-- of the grace period (a time in the future); from then on the key is refused and lists as
-- revoked. A revocation sets `status = 'revoked'` at once (and `revoked_at` to the earlier
-- of now and any pending grace end). Replicas compare these times with their own clocks, so
-- an expiry or a grace end takes effect everywhere at its time without a notification.

ALTER TABLE tollgate_api_keys
    ADD COLUMN expires_at   timestamptz,
    -- A non-empty subset of {read, write}; existing keys keep both.
    ADD COLUMN scopes       text[] NOT NULL DEFAULT ARRAY['read', 'write']
        CHECK (cardinality(scopes) BETWEEN 1 AND 2
               AND scopes <@ ARRAY['read', 'write']),
    -- The org's models the key may use; NULL: all of them.
    ADD COLUMN models       uuid[],
    -- The most credits the key may spend per billing period (enforced by the ledger); NULL:
    -- no limit of its own.
    ADD COLUMN credit_limit bigint CHECK (credit_limit >= 0);

-- tollgate-api-key-auth: org subscriptions, API keys (SHA-256 hashes only, never secrets)
-- and model ownership. No foreign keys to other crates' tables: each layer works alone.

CREATE TABLE tollgate_org_plans (
    org_id     uuid PRIMARY KEY,
    -- NULL: no active subscription (the org's keys get 402 NO_SUBSCRIPTION).
    plan       text CHECK (plan IN ('free', 'basic', 'pro', 'enterprise')),
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE tollgate_api_keys (
    id           uuid PRIMARY KEY,
    -- Creation order (list_keys is oldest first, even within one millisecond).
    seq          bigint GENERATED ALWAYS AS IDENTITY,
    org_id       uuid NOT NULL,
    name         text NOT NULL,
    -- Display prefix, e.g. sk_live_ab12.
    prefix       text NOT NULL,
    key_hash     bytea NOT NULL UNIQUE CHECK (octet_length(key_hash) = 32),
    status       text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'revoked')),
    created_at   timestamptz NOT NULL,
    last_used_at timestamptz,
    revoked_at   timestamptz
);

CREATE INDEX tollgate_api_keys_by_org ON tollgate_api_keys (org_id, seq);

CREATE TABLE tollgate_model_owners (
    model_id   uuid PRIMARY KEY,
    org_id     uuid NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

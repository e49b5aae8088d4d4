-- Dashboard users (tollgate-accounts, feature `postgres`). Times are milliseconds since the
-- Unix epoch (bigint), from the store's clock, as in the Rust API.

CREATE TABLE tollgate_users (
    id              uuid    PRIMARY KEY,
    org_id          uuid    NOT NULL,
    -- Normalized (trimmed, lowercased) by the application; unique across the installation.
    email           text    NOT NULL UNIQUE,
    role            text    NOT NULL CHECK (role IN ('owner', 'viewer')),
    -- Argon2id PHC string; NULL until the invite is accepted.
    password_hash   text,
    created_ms      bigint  NOT NULL,
    password_set_ms bigint
);

CREATE INDEX tollgate_users_org ON tollgate_users (org_id, created_ms);

-- Single-use invites: only the SHA-256 of the token is stored.
CREATE TABLE tollgate_user_invites (
    token_hash bytea   PRIMARY KEY,
    user_id    uuid    NOT NULL REFERENCES tollgate_users (id) ON DELETE CASCADE,
    expires_ms bigint  NOT NULL,
    used_ms    bigint
);

CREATE INDEX tollgate_user_invites_user ON tollgate_user_invites (user_id);

-- The sign-in throttle: attempts per key (the SHA-256 of the normalized email) in a window
-- that starts at the first attempt. Shared by every replica.
CREATE TABLE tollgate_sign_in_attempts (
    key_hash        bytea   PRIMARY KEY,
    window_start_ms bigint  NOT NULL,
    attempts        integer NOT NULL
);

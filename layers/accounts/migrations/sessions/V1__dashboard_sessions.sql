-- Dashboard sessions (tollgate-accounts, feature `postgres`): only the SHA-256 of the
-- session token is stored. Times are milliseconds since the Unix epoch.

CREATE TABLE tollgate_dashboard_sessions (
    token_hash   bytea   PRIMARY KEY,
    -- NULL: the operator (signed in with the admin token).
    user_id      uuid,
    created_ms   bigint  NOT NULL,
    last_seen_ms bigint  NOT NULL
);

-- Revoking every session of a user (password change, deletion).
CREATE INDEX tollgate_dashboard_sessions_user
    ON tollgate_dashboard_sessions (user_id) WHERE user_id IS NOT NULL;

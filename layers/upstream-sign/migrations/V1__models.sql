-- tollgate-upstream-sign: models (connected creator accounts) and their sessions.
-- The session material is stored only encrypted (XChaCha20-Poly1305, key from
-- TOLLGATE_SESSION_KEY, a random 24-byte nonce per write, the model id as associated data).

CREATE TABLE tollgate_models (
    id                 uuid PRIMARY KEY,
    -- Creation order (list is oldest first).
    seq                bigint GENERATED ALWAYS AS IDENTITY,
    org_id             uuid NOT NULL,
    name               text NOT NULL,
    status             text NOT NULL CHECK (status IN ('connected', 'disconnected')),
    session_ciphertext bytea NOT NULL,
    session_nonce      bytea NOT NULL CHECK (octet_length(session_nonce) = 24),
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX tollgate_models_by_org ON tollgate_models (org_id, seq);

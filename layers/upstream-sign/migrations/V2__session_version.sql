-- tollgate-upstream-sign: a version per model session, so that a request signed with an old
-- session cannot disconnect the session the model was reconnected with since. Every connect
-- starts at 1 and every reconnect adds 1; a disconnect names the version it saw.
-- A constant default: existing rows get version 1 without a table rewrite.

ALTER TABLE tollgate_models ADD COLUMN session_version bigint NOT NULL DEFAULT 1;

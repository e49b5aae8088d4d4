-- tollgate-upstream-sign: when each model was last disconnected (ms since the epoch, the
-- server's clock), shown by the dashboard's Models page. Null for models never disconnected
-- (and for those disconnected before this migration). Nullable, no default: no rewrite.

ALTER TABLE tollgate_models ADD COLUMN disconnected_at_ms bigint;

-- The hot-path functions look up only rows their arguments name: holds by id, accounts by
-- org. The holds table grows from nothing by thousands of rows a second (each kept one TTL
-- after its commit), so its statistics are usually behind; planned with a row count from
-- the last ANALYZE, the joins of `unnest(p_holds)` with the holds became a hash join over a
-- sequential scan of the whole table (measured: 5 ms of a 9 ms commit batch scanning 33,751
-- rows, while the org's account row stayed locked). PL/pgSQL caches those plans for the
-- connection's lifetime. With these settings, every lookup of these functions is an index
-- probe (a nested loop over the arguments, each a primary-key scan) whatever the statistics
-- say; nothing they run needs a sequential scan.

ALTER FUNCTION tollgate_credit_hold_batch(
    uuid[], bigint[], text[], uuid[], bigint[], bigint, bigint, text)
    SET enable_seqscan = off SET enable_hashjoin = off SET enable_mergejoin = off;

ALTER FUNCTION tollgate_credit_hold_batch(uuid[], bigint[], text[], bigint, bigint, text)
    SET enable_seqscan = off SET enable_hashjoin = off SET enable_mergejoin = off;

ALTER FUNCTION tollgate_credit_commit_batch(uuid[], bigint[], bigint, bigint, text)
    SET enable_seqscan = off SET enable_hashjoin = off SET enable_mergejoin = off;

ALTER FUNCTION tollgate_credit_release_batch(uuid[], bigint[], boolean[], bigint, text)
    SET enable_seqscan = off SET enable_hashjoin = off SET enable_mergejoin = off;

ALTER FUNCTION tollgate_credit_release(uuid, bigint, boolean, bigint)
    SET enable_seqscan = off SET enable_hashjoin = off SET enable_mergejoin = off;

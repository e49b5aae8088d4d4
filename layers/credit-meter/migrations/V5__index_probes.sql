-- The hot path, faster (issue: billing on PostgreSQL at memory speed).
--
-- 1. Index probes only. The hot-path functions look up only rows their arguments name: holds
--    by id, accounts by org. The holds table grows from nothing by thousands of rows a second
--    (each kept one TTL after its commit), so its statistics are usually behind; planned with
--    a row count from the last ANALYZE, the join of `unnest(p_holds)` with the holds became a
--    hash join over a sequential scan of the whole table (measured: 5 ms of a 9 ms commit
--    batch scanning 33,751 rows, while the org's account row stayed locked). PL/pgSQL caches
--    those plans for the connection's lifetime. With the settings below every lookup of these
--    functions is a nested loop of primary-key probes whatever the statistics say.
--
-- 2. One pass for all orgs of a batch. V3/V4 took each org of a batch in turn: a
--    subtransaction (for its lock timeout), a renewal check, a locking read and an update per
--    org, so a batch of 16 requests of 16 orgs cost 16 times what 16 requests of one org did.
--    The batch functions below lock the batch's account rows one after the other in org
--    order (as before, so batches never deadlock) inside ONE subtransaction, renew only the
--    accounts that are due, decide the items in arrival order (per org, exactly as before)
--    and write the accounts back in one statement. If an org's row stays locked past the lock
--    timeout, the pass is rolled back, that org's items are answered `busy`, and the pass
--    runs again without it: as before, each locked org delays its batch by one lock timeout.
--
-- Replicas of the previous release call the same functions with the same arguments and get
-- the same answers.

-- The V3 hold batch (replicas of two releases ago) and the functions not redefined here.
ALTER FUNCTION tollgate_credit_hold_batch(uuid[], bigint[], text[], bigint, bigint, text)
    SET enable_seqscan = off SET enable_hashjoin = off SET enable_mergejoin = off
    SET plan_cache_mode = force_generic_plan;

ALTER FUNCTION tollgate_credit_release_batch(uuid[], bigint[], boolean[], bigint, text)
    SET enable_seqscan = off SET enable_hashjoin = off SET enable_mergejoin = off
    SET plan_cache_mode = force_generic_plan;

ALTER FUNCTION tollgate_credit_release(uuid, bigint, boolean, bigint)
    SET enable_seqscan = off SET enable_hashjoin = off SET enable_mergejoin = off
    SET plan_cache_mode = force_generic_plan;

-- Holds: the same arguments and answers as V4.
CREATE OR REPLACE FUNCTION tollgate_credit_hold_batch(
    p_orgs uuid[], p_amounts bigint[], p_request_ids text[], p_keys uuid[],
    p_key_limits bigint[], p_now bigint, p_expires_at bigint, p_lock_timeout text)
RETURNS TABLE (idx integer, outcome text, hold_id bigint, available bigint)
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_hashjoin = off SET enable_mergejoin = off
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    n        integer := coalesce(array_length(p_orgs, 1), 0);
    v_out    text[];
    v_ids    bigint[];
    v_avail  bigint[];
    v_seq    text := pg_get_serial_sequence('tollgate_credit_holds', 'id');
    -- The batch's orgs in lock order, those whose row stayed locked, the one being locked.
    v_orgs   uuid[];
    v_skip   uuid[] := '{}';
    v_org    uuid;
    -- The accounts locked in this pass (in org order) and what each has left.
    a_org    uuid[];
    a_plan   text[];
    a_unlim  boolean[];
    a_period bigint[];
    a_free   bigint[];
    a_taken  bigint[];
    acct     record;
    p        integer;
    i        integer;
    -- Credits held in this batch per key (keys in b_keys, amounts at the same index).
    b_keys   uuid[];
    b_held   bigint[];
    v_pos    integer;
    v_used   bigint;
BEGIN
    IF n = 0 THEN
        RETURN;
    END IF;
    SELECT array_agg(DISTINCT o ORDER BY o) INTO v_orgs FROM unnest(p_orgs) AS o;
    LOOP
        v_out := array_fill(NULL::text, ARRAY[n]);
        v_ids := array_fill(NULL::bigint, ARRAY[n]);
        v_avail := array_fill(NULL::bigint, ARRAY[n]);
        b_keys := '{}';
        b_held := '{}';
        a_org := '{}';
        a_plan := '{}';
        a_unlim := '{}';
        a_period := '{}';
        a_free := '{}';
        BEGIN
            PERFORM set_config('lock_timeout', p_lock_timeout, true);
            FOREACH v_org IN ARRAY v_orgs LOOP
                CONTINUE WHEN v_org = ANY(v_skip);
                SELECT a.plan IS NOT NULL AND a.period_end_ms <> 9223372036854775807
                           AND a.period_end_ms <= p_now AS due
                  INTO acct
                  FROM tollgate_credit_accounts a WHERE a.org = v_org FOR UPDATE;
                CONTINUE WHEN NOT FOUND;
                IF acct.due THEN
                    PERFORM tollgate_credit_renew(v_org, p_now);
                END IF;
                SELECT a.plan, a.plan IS NOT NULL AND a.plan_monthly IS NULL AS unlim,
                       a.period_start_ms,
                       greatest(tollgate_credit_balance(a.plan_credits, a.topup_credits)
                                - a.held, 0) AS free
                  INTO acct
                  FROM tollgate_credit_accounts a WHERE a.org = v_org;
                a_org := a_org || v_org;
                a_plan := a_plan || acct.plan;
                a_unlim := a_unlim || acct.unlim;
                a_period := a_period || acct.period_start_ms;
                a_free := a_free || acct.free;
            END LOOP;
            v_org := NULL;
            a_taken := array_fill(0::bigint, ARRAY[coalesce(array_length(a_org, 1), 0)]);

            FOR i IN 1 .. n LOOP
                IF p_orgs[i] = ANY(v_skip) THEN
                    v_out[i] := 'busy';
                    CONTINUE;
                END IF;
                p := array_position(a_org, p_orgs[i]);
                IF p IS NULL OR a_plan[p] IS NULL THEN
                    v_out[i] := 'no_subscription';
                    CONTINUE;
                END IF;
                IF a_unlim[p] THEN
                    v_out[i] := 'unlimited';
                    CONTINUE;
                END IF;
                v_pos := NULL;
                IF p_keys[i] IS NOT NULL THEN
                    v_pos := array_position(b_keys, p_keys[i]);
                END IF;
                IF p_key_limits[i] IS NOT NULL THEN
                    -- The key's spend this period, its open holds, and what this batch
                    -- already held for it: all under the org's row lock.
                    v_used := coalesce((SELECT s.spent FROM tollgate_credit_key_spend s
                                         WHERE s.key_id = p_keys[i]
                                           AND s.period_start_ms = a_period[p]), 0)
                            + coalesce((SELECT sum(h.amount) FROM tollgate_credit_holds h
                                         WHERE h.key_id = p_keys[i]
                                           AND h.forget_at_ms IS NULL), 0)
                            + coalesce(b_held[v_pos], 0);
                    IF p_key_limits[i] - v_used < p_amounts[i] THEN
                        v_out[i] := 'key_limit';
                        v_avail[i] := greatest(p_key_limits[i] - v_used, 0);
                        CONTINUE;
                    END IF;
                END IF;
                IF p_amounts[i] <= a_free[p] THEN
                    a_free[p] := a_free[p] - p_amounts[i];
                    a_taken[p] := a_taken[p] + p_amounts[i];
                    v_out[i] := 'held';
                    v_ids[i] := nextval(v_seq);
                    IF p_keys[i] IS NOT NULL THEN
                        IF v_pos IS NULL THEN
                            b_keys := b_keys || p_keys[i];
                            b_held := b_held || p_amounts[i];
                        ELSE
                            b_held[v_pos] := b_held[v_pos] + p_amounts[i];
                        END IF;
                    END IF;
                ELSE
                    v_out[i] := 'insufficient';
                    v_avail[i] := a_free[p];
                END IF;
            END LOOP;

            UPDATE tollgate_credit_accounts a SET held = a.held + t.taken
              FROM unnest(a_org, a_taken) AS t(org, taken)
             WHERE a.org = t.org AND t.taken > 0;
            EXIT;
        EXCEPTION WHEN lock_not_available THEN
            -- Everything this pass did is undone; again, without the org whose row it is.
            IF v_org IS NULL THEN
                RAISE;
            END IF;
            v_skip := v_skip || v_org;
        END;
    END LOOP;

    INSERT INTO tollgate_credit_holds (id, org, amount, request_id, expires_at_ms, key_id)
    OVERRIDING SYSTEM VALUE
    SELECT v_ids[k], p_orgs[k], p_amounts[k], p_request_ids[k], p_expires_at, p_keys[k]
      FROM generate_series(1, n) AS k
     WHERE v_out[k] = 'held'
     ORDER BY k;

    RETURN QUERY
    SELECT k, v_out[k], v_ids[k], v_avail[k] FROM generate_series(1, n) AS k ORDER BY k;
END
$$;

-- Commits: the same arguments and answers as V4, the same ledger rows in the same order per
-- org.
CREATE OR REPLACE FUNCTION tollgate_credit_commit_batch(
    p_orgs uuid[], p_holds bigint[], p_now bigint, p_forget_at bigint, p_lock_timeout text)
RETURNS TABLE (idx integer, outcome text, balance bigint, note text, charged bigint)
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_hashjoin = off SET enable_mergejoin = off
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    n          integer := coalesce(array_length(p_orgs, 1), 0);
    -- The hold row of each item, as locked.
    h_found    boolean[] := array_fill(false, ARRAY[n]);
    h_amount   bigint[] := array_fill(NULL::bigint, ARRAY[n]);
    h_request  text[] := array_fill(NULL::text, ARRAY[n]);
    h_swept    boolean[] := array_fill(NULL::boolean, ARRAY[n]);
    h_done     boolean[] := array_fill(NULL::boolean, ARRAY[n]);
    h_key      uuid[] := array_fill(NULL::uuid, ARRAY[n]);
    -- The period each charge counts in, for its key's spend.
    v_period   bigint[];
    -- The answers.
    v_out      text[];
    v_balance  bigint[];
    v_note     text[];
    v_charged  bigint[];
    -- What becomes of each hold row: 'charged' (keeps what it took), 'delete', or NULL.
    v_fate     text[];
    v_cplan    bigint[];
    v_ctopup   bigint[];
    -- The orgs whose accounts are needed in lock order, those whose row stayed locked, the
    -- one being locked.
    v_orgs     uuid[];
    v_skip     uuid[] := '{}';
    v_org      uuid;
    -- The accounts locked in this pass (in org order).
    a_org      uuid[];
    a_unlim    boolean[];
    a_period   bigint[];
    a_held     bigint[];
    a_plan     bigint[];
    a_topup    bigint[];
    acct       record;
    r          record;
    p          integer;
    v_amount   bigint;
    v_from     bigint;
    v_bal      bigint;
    i          integer;
BEGIN
    IF n = 0 THEN
        RETURN;
    END IF;
    -- The holds first, in id order (waiting as long as the statement may: hold rows are only
    -- ever locked briefly).
    FOR r IN
        SELECT u.k::integer AS k, h.amount, h.request_id, h.forget_at_ms, h.charged_plan,
               h.key_id
          FROM unnest(p_holds, p_orgs) WITH ORDINALITY AS u(hid, o, k)
          JOIN tollgate_credit_holds h ON h.id = u.hid AND h.org = u.o
         ORDER BY h.id
           FOR UPDATE OF h
    LOOP
        h_found[r.k] := true;
        h_amount[r.k] := r.amount;
        h_request[r.k] := r.request_id;
        h_swept[r.k] := r.forget_at_ms IS NOT NULL;
        h_done[r.k] := r.charged_plan IS NOT NULL;
        h_key[r.k] := r.key_id;
    END LOOP;
    -- Items whose hold is gone or settled need no account.
    SELECT array_agg(DISTINCT p_orgs[k] ORDER BY p_orgs[k]) INTO v_orgs
      FROM generate_series(1, n) AS k
     WHERE h_found[k] AND NOT h_done[k];
    v_orgs := coalesce(v_orgs, '{}');

    LOOP
        v_period := array_fill(NULL::bigint, ARRAY[n]);
        v_out := array_fill(NULL::text, ARRAY[n]);
        v_balance := array_fill(NULL::bigint, ARRAY[n]);
        v_note := array_fill(NULL::text, ARRAY[n]);
        v_charged := array_fill(0::bigint, ARRAY[n]);
        v_fate := array_fill(NULL::text, ARRAY[n]);
        v_cplan := array_fill(NULL::bigint, ARRAY[n]);
        v_ctopup := array_fill(NULL::bigint, ARRAY[n]);
        a_org := '{}';
        a_unlim := '{}';
        a_period := '{}';
        a_held := '{}';
        a_plan := '{}';
        a_topup := '{}';
        BEGIN
            PERFORM set_config('lock_timeout', p_lock_timeout, true);
            FOREACH v_org IN ARRAY v_orgs LOOP
                CONTINUE WHEN v_org = ANY(v_skip);
                SELECT a.plan IS NOT NULL AND a.period_end_ms <> 9223372036854775807
                           AND a.period_end_ms <= p_now AS due
                  INTO acct
                  FROM tollgate_credit_accounts a WHERE a.org = v_org FOR UPDATE;
                CONTINUE WHEN NOT FOUND;
                IF acct.due THEN
                    PERFORM tollgate_credit_renew(v_org, p_now);
                END IF;
                SELECT a.plan IS NOT NULL AND a.plan_monthly IS NULL AS unlim,
                       a.period_start_ms, a.held, a.plan_credits, a.topup_credits
                  INTO acct
                  FROM tollgate_credit_accounts a WHERE a.org = v_org;
                a_org := a_org || v_org;
                a_unlim := a_unlim || acct.unlim;
                a_period := a_period || acct.period_start_ms;
                a_held := a_held || acct.held;
                a_plan := a_plan || acct.plan_credits;
                a_topup := a_topup || acct.topup_credits;
            END LOOP;
            v_org := NULL;

            FOR i IN 1 .. n LOOP
                IF NOT h_found[i] OR h_done[i] THEN
                    v_out[i] := 'unknown';
                    CONTINUE;
                END IF;
                IF p_orgs[i] = ANY(v_skip) THEN
                    v_out[i] := 'busy';
                    CONTINUE;
                END IF;
                p := array_position(a_org, p_orgs[i]);
                IF p IS NULL THEN
                    v_out[i] := 'unknown';
                    CONTINUE;
                END IF;
                v_bal := tollgate_credit_balance(a_plan[p], a_topup[p]);
                IF NOT h_swept[i] THEN
                    -- An open hold: its credits were counted in `held`.
                    a_held[p] := greatest(a_held[p] - h_amount[i], 0);
                    IF a_unlim[p] THEN
                        v_out[i] := 'unlimited';
                        v_fate[i] := 'charged';
                        v_cplan[i] := 0;
                        v_ctopup[i] := 0;
                        CONTINUE;
                    END IF;
                    IF h_amount[i] > v_bal THEN
                        v_note[i] := 'lowered';
                    END IF;
                ELSE
                    -- Swept after its TTL: charged only if the balance still covers it.
                    v_note[i] := 'swept';
                    IF a_unlim[p] THEN
                        v_out[i] := 'unlimited';
                        v_fate[i] := 'charged';
                        v_cplan[i] := 0;
                        v_ctopup[i] := 0;
                        CONTINUE;
                    END IF;
                    IF v_bal - a_held[p] < h_amount[i] THEN
                        v_out[i] := 'expired';
                        v_fate[i] := 'delete';
                        CONTINUE;
                    END IF;
                END IF;
                v_amount := least(h_amount[i], v_bal);
                v_from := least(v_amount, a_plan[p]);
                a_plan[p] := a_plan[p] - v_from;
                a_topup[p] := a_topup[p] - (v_amount - v_from);
                v_out[i] := 'charged';
                v_charged[i] := v_amount;
                v_period[i] := a_period[p];
                v_balance[i] := tollgate_credit_balance(a_plan[p], a_topup[p]);
                v_fate[i] := 'charged';
                v_cplan[i] := v_from;
                v_ctopup[i] := v_amount - v_from;
            END LOOP;

            UPDATE tollgate_credit_accounts a
               SET held = t.held, plan_credits = t.plan_credits, topup_credits = t.topup_credits
              FROM unnest(a_org, a_held, a_plan, a_topup)
                       AS t(org, held, plan_credits, topup_credits)
             WHERE a.org = t.org;
            EXIT;
        EXCEPTION WHEN lock_not_available THEN
            -- Everything this pass did is undone; again, without the org whose row it is.
            IF v_org IS NULL THEN
                RAISE;
            END IF;
            v_skip := v_skip || v_org;
        END;
    END LOOP;

    UPDATE tollgate_credit_holds h
       SET charged_plan = v_cplan[u.k], charged_topup = v_ctopup[u.k],
           forget_at_ms = p_forget_at
      FROM unnest(p_holds) WITH ORDINALITY AS u(hid, k)
     WHERE h.id = u.hid AND v_fate[u.k] = 'charged';
    DELETE FROM tollgate_credit_holds h
     USING unnest(p_holds) WITH ORDINALITY AS u(hid, k)
     WHERE h.id = u.hid AND v_fate[u.k] = 'delete';
    -- One row per charge, in item order (so in arrival order within each org).
    INSERT INTO tollgate_credit_ledger
        (org, at_ms, kind, delta_plan, delta_topup, balance_after, request_id)
    SELECT p_orgs[k], p_now, 'charge', -v_cplan[k], -v_ctopup[k], v_balance[k], h_request[k]
      FROM generate_series(1, n) AS k
     WHERE v_out[k] = 'charged' AND v_charged[k] > 0
     ORDER BY k;

    -- What each key spent, in the period of its org's account (under that row's lock).
    INSERT INTO tollgate_credit_key_spend AS s (key_id, period_start_ms, org, spent)
    SELECT h_key[k], v_period[k], p_orgs[k], sum(v_charged[k])
      FROM generate_series(1, n) AS k
     WHERE v_out[k] = 'charged' AND v_charged[k] > 0 AND h_key[k] IS NOT NULL
     GROUP BY h_key[k], v_period[k], p_orgs[k]
    ON CONFLICT (key_id, period_start_ms) DO UPDATE SET spent = s.spent + EXCLUDED.spent;

    RETURN QUERY
    SELECT k, v_out[k], v_balance[k], v_note[k], v_charged[k]
      FROM generate_series(1, n) AS k ORDER BY k;
END
$$;

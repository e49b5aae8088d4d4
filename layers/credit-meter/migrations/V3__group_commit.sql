-- Group commit: holds, commits and releases of many requests (of any number of orgs) in ONE
-- statement each, decided one by one in arrival order inside it.
--
-- Each function takes parallel arrays (item k = the k-th element of each) and returns one row
-- per item (`idx` = k). Orgs are visited in uuid order — every batch locks account rows in the
-- same order, so batches of different replicas never deadlock — and each org's items in
-- arrival order, under that org's row lock, exactly as the one-item functions of V1/V2 would
-- decide them one after the other: no hold can overdraw (`balance − held ≥ cost` for each, in
-- order), and each commit reports its own balance after its charge.
--
-- One locked org cannot stall a batch: each org is handled in a block of its own (a
-- subtransaction) under `p_lock_timeout` (a `lock_timeout` value, '0' = wait as long as the
-- statement may); an org whose row stays locked longer has its items answered 'busy', with
-- nothing done for them, and the other orgs of the batch go ahead. The caller retries busy
-- items in a batch of that org alone.
--
-- Hold rows are locked (commits, releases) before any account row, in id order, like the V2
-- functions do: a sweeper that has locked a hold waits for nothing such a batch holds.

-- Holds. outcome per item: 'held' (hold_id), 'unlimited', 'no_subscription', 'insufficient'
-- (available: what `balance − held` was when the item's turn came) or 'busy'.
CREATE FUNCTION tollgate_credit_hold_batch(
    p_orgs uuid[], p_amounts bigint[], p_request_ids text[], p_now bigint,
    p_expires_at bigint, p_lock_timeout text)
RETURNS TABLE (idx integer, outcome text, hold_id bigint, available bigint)
LANGUAGE plpgsql
AS $$
DECLARE
    n       integer := coalesce(array_length(p_orgs, 1), 0);
    v_out   text[] := array_fill(NULL::text, ARRAY[n]);
    v_ids   bigint[] := array_fill(NULL::bigint, ARRAY[n]);
    v_avail bigint[] := array_fill(NULL::bigint, ARRAY[n]);
    v_seq   text := pg_get_serial_sequence('tollgate_credit_holds', 'id');
    v_org   uuid;
    v_items integer[];
    acct    record;
    v_free  bigint;
    v_taken bigint;
    i       integer;
BEGIN
    IF n = 0 THEN
        RETURN;
    END IF;
    PERFORM set_config('lock_timeout', p_lock_timeout, true);
    FOR v_org, v_items IN
        SELECT u.o, array_agg(u.k::integer ORDER BY u.k)
          FROM unnest(p_orgs) WITH ORDINALITY AS u(o, k)
         GROUP BY u.o ORDER BY u.o
    LOOP
        BEGIN
            PERFORM tollgate_credit_renew(v_org, p_now);
            SELECT a.plan, a.plan_monthly,
                   greatest(tollgate_credit_balance(a.plan_credits, a.topup_credits) - a.held, 0)
                       AS free
              INTO acct
              FROM tollgate_credit_accounts a
             WHERE a.org = v_org
               FOR UPDATE;
            IF NOT FOUND OR acct.plan IS NULL THEN
                FOREACH i IN ARRAY v_items LOOP
                    v_out[i] := 'no_subscription';
                END LOOP;
            ELSIF acct.plan_monthly IS NULL THEN
                FOREACH i IN ARRAY v_items LOOP
                    v_out[i] := 'unlimited';
                END LOOP;
            ELSE
                v_free := acct.free;
                v_taken := 0;
                FOREACH i IN ARRAY v_items LOOP
                    IF p_amounts[i] <= v_free THEN
                        v_free := v_free - p_amounts[i];
                        v_taken := v_taken + p_amounts[i];
                        v_out[i] := 'held';
                        v_ids[i] := nextval(v_seq);
                    ELSE
                        v_out[i] := 'insufficient';
                        v_avail[i] := v_free;
                    END IF;
                END LOOP;
                IF v_taken > 0 THEN
                    UPDATE tollgate_credit_accounts SET held = held + v_taken WHERE org = v_org;
                END IF;
            END IF;
        EXCEPTION WHEN lock_not_available THEN
            FOREACH i IN ARRAY v_items LOOP
                v_out[i] := 'busy';
                v_ids[i] := NULL;
                v_avail[i] := NULL;
            END LOOP;
        END;
    END LOOP;

    INSERT INTO tollgate_credit_holds (id, org, amount, request_id, expires_at_ms)
    OVERRIDING SYSTEM VALUE
    SELECT v_ids[k], p_orgs[k], p_amounts[k], p_request_ids[k], p_expires_at
      FROM generate_series(1, n) AS k
     WHERE v_out[k] = 'held'
     ORDER BY k;

    RETURN QUERY
    SELECT k, v_out[k], v_ids[k], v_avail[k] FROM generate_series(1, n) AS k ORDER BY k;
END
$$;

-- Commits (tollgate_credit_commit_charged, V2, for each item in turn). outcome per item:
-- 'charged' (balance after this charge, charged, note 'lowered' / 'swept' as in V2),
-- 'unlimited', 'unknown', 'expired' or 'busy'. The charge rows of the whole batch are written
-- in one multi-row insert, in item order within each org. A hold id must appear at most
-- once per batch.
CREATE FUNCTION tollgate_credit_commit_batch(
    p_orgs uuid[], p_holds bigint[], p_now bigint, p_forget_at bigint, p_lock_timeout text)
RETURNS TABLE (idx integer, outcome text, balance bigint, note text, charged bigint)
LANGUAGE plpgsql
AS $$
DECLARE
    n          integer := coalesce(array_length(p_orgs, 1), 0);
    -- The hold row of each item, as locked.
    h_found    boolean[] := array_fill(false, ARRAY[n]);
    h_amount   bigint[] := array_fill(NULL::bigint, ARRAY[n]);
    h_request  text[] := array_fill(NULL::text, ARRAY[n]);
    h_swept    boolean[] := array_fill(NULL::boolean, ARRAY[n]);
    h_done     boolean[] := array_fill(NULL::boolean, ARRAY[n]);
    -- The answers.
    v_out      text[] := array_fill(NULL::text, ARRAY[n]);
    v_balance  bigint[] := array_fill(NULL::bigint, ARRAY[n]);
    v_note     text[] := array_fill(NULL::text, ARRAY[n]);
    v_charged  bigint[] := array_fill(0::bigint, ARRAY[n]);
    -- What becomes of each hold row: 'charged' (keeps what it took), 'delete', or NULL.
    v_fate     text[] := array_fill(NULL::text, ARRAY[n]);
    v_cplan    bigint[] := array_fill(NULL::bigint, ARRAY[n]);
    v_ctopup   bigint[] := array_fill(NULL::bigint, ARRAY[n]);
    -- Charge rows: the item each is for, per org, moved to the batch's list once the org is
    -- done.
    l_items    integer[] := '{}';
    l_after    bigint[] := '{}';
    o_items    integer[];
    o_after    bigint[];
    r          record;
    v_org      uuid;
    v_items    integer[];
    acct       tollgate_credit_accounts;
    v_amount   bigint;
    v_from     bigint;
    v_unlim    boolean;
    i          integer;
BEGIN
    IF n = 0 THEN
        RETURN;
    END IF;
    -- The holds first, in id order (waiting as long as the statement may: hold rows are only
    -- ever locked briefly).
    FOR r IN
        SELECT u.k::integer AS k, h.amount, h.request_id, h.forget_at_ms, h.charged_plan
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
    END LOOP;

    PERFORM set_config('lock_timeout', p_lock_timeout, true);
    FOR v_org, v_items IN
        SELECT u.o, array_agg(u.k::integer ORDER BY u.k)
          FROM unnest(p_orgs) WITH ORDINALITY AS u(o, k)
         GROUP BY u.o ORDER BY u.o
    LOOP
        o_items := '{}';
        o_after := '{}';
        BEGIN
            -- Items whose hold is gone or settled need no account.
            FOREACH i IN ARRAY v_items LOOP
                IF NOT h_found[i] OR h_done[i] THEN
                    v_out[i] := 'unknown';
                END IF;
            END LOOP;
            IF EXISTS (SELECT 1 FROM unnest(v_items) AS j WHERE v_out[j] IS NULL) THEN
                PERFORM tollgate_credit_renew(v_org, p_now);
                SELECT * INTO acct FROM tollgate_credit_accounts WHERE org = v_org FOR UPDATE;
                IF NOT FOUND THEN
                    FOREACH i IN ARRAY v_items LOOP
                        v_out[i] := 'unknown';
                    END LOOP;
                ELSE
                    v_unlim := acct.plan IS NOT NULL AND acct.plan_monthly IS NULL;
                    FOREACH i IN ARRAY v_items LOOP
                        CONTINUE WHEN v_out[i] IS NOT NULL;
                        IF NOT h_swept[i] THEN
                            -- An open hold: its credits were counted in `held`.
                            acct.held := greatest(acct.held - h_amount[i], 0);
                            IF v_unlim THEN
                                v_out[i] := 'unlimited';
                                v_fate[i] := 'charged';
                                v_cplan[i] := 0;
                                v_ctopup[i] := 0;
                                CONTINUE;
                            END IF;
                            IF h_amount[i] > tollgate_credit_balance(acct.plan_credits,
                                                                     acct.topup_credits) THEN
                                v_note[i] := 'lowered';
                            END IF;
                        ELSE
                            -- Swept after its TTL: charged only if the balance still covers it.
                            v_note[i] := 'swept';
                            IF v_unlim THEN
                                v_out[i] := 'unlimited';
                                v_fate[i] := 'charged';
                                v_cplan[i] := 0;
                                v_ctopup[i] := 0;
                                CONTINUE;
                            END IF;
                            IF tollgate_credit_balance(acct.plan_credits, acct.topup_credits)
                                   - acct.held < h_amount[i] THEN
                                v_out[i] := 'expired';
                                v_fate[i] := 'delete';
                                CONTINUE;
                            END IF;
                        END IF;
                        v_amount := least(h_amount[i],
                                          tollgate_credit_balance(acct.plan_credits,
                                                                  acct.topup_credits));
                        v_from := least(v_amount, acct.plan_credits);
                        acct.plan_credits := acct.plan_credits - v_from;
                        acct.topup_credits := acct.topup_credits - (v_amount - v_from);
                        v_out[i] := 'charged';
                        v_charged[i] := v_amount;
                        v_balance[i] := tollgate_credit_balance(acct.plan_credits,
                                                                acct.topup_credits);
                        v_fate[i] := 'charged';
                        v_cplan[i] := v_from;
                        v_ctopup[i] := v_amount - v_from;
                        IF v_amount > 0 THEN
                            o_items := o_items || i;
                            o_after := o_after || v_balance[i];
                        END IF;
                    END LOOP;
                    UPDATE tollgate_credit_accounts
                       SET held = acct.held,
                           plan_credits = acct.plan_credits,
                           topup_credits = acct.topup_credits
                     WHERE org = v_org;
                END IF;
            END IF;
            l_items := l_items || o_items;
            l_after := l_after || o_after;
        EXCEPTION WHEN lock_not_available THEN
            FOREACH i IN ARRAY v_items LOOP
                v_out[i] := 'busy';
                v_balance[i] := NULL;
                v_note[i] := NULL;
                v_charged[i] := 0;
                v_fate[i] := NULL;
            END LOOP;
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
    INSERT INTO tollgate_credit_ledger
        (org, at_ms, kind, delta_plan, delta_topup, balance_after, request_id)
    SELECT p_orgs[c.k], p_now, 'charge', -v_cplan[c.k], -v_ctopup[c.k], c.after,
           h_request[c.k]
      FROM unnest(l_items, l_after) WITH ORDINALITY AS c(k, after, ord)
     ORDER BY c.ord;

    RETURN QUERY
    SELECT k, v_out[k], v_balance[k], v_note[k], v_charged[k]
      FROM generate_series(1, n) AS k ORDER BY k;
END
$$;

-- Releases (tollgate_credit_release, V2, for each item in turn; `p_refunds[k]`: a committed
-- hold is refunded). outcome per item: 'released', 'swept', 'committed', 'refunded', 'gone'
-- or 'busy'; `charged`: what a committed hold took. A hold id must appear at most once per
-- batch.
CREATE FUNCTION tollgate_credit_release_batch(
    p_orgs uuid[], p_holds bigint[], p_refunds boolean[], p_now bigint, p_lock_timeout text)
RETURNS TABLE (idx integer, outcome text, charged bigint)
LANGUAGE plpgsql
AS $$
DECLARE
    n         integer := coalesce(array_length(p_orgs, 1), 0);
    h_found   boolean[] := array_fill(false, ARRAY[n]);
    h_amount  bigint[] := array_fill(NULL::bigint, ARRAY[n]);
    h_request text[] := array_fill(NULL::text, ARRAY[n]);
    h_swept   boolean[] := array_fill(NULL::boolean, ARRAY[n]);
    h_cplan   bigint[] := array_fill(NULL::bigint, ARRAY[n]);
    h_ctopup  bigint[] := array_fill(NULL::bigint, ARRAY[n]);
    v_out     text[] := array_fill(NULL::text, ARRAY[n]);
    v_charged bigint[] := array_fill(0::bigint, ARRAY[n]);
    v_delete  boolean[] := array_fill(false, ARRAY[n]);
    -- Refund rows (item, balance after), per org then for the batch.
    l_items   integer[] := '{}';
    l_after   bigint[] := '{}';
    o_items   integer[];
    o_after   bigint[];
    r         record;
    v_org     uuid;
    v_items   integer[];
    acct      tollgate_credit_accounts;
    v_touch   boolean;
    i         integer;
BEGIN
    IF n = 0 THEN
        RETURN;
    END IF;
    FOR r IN
        SELECT u.k::integer AS k, h.amount, h.request_id, h.forget_at_ms, h.charged_plan,
               h.charged_topup
          FROM unnest(p_holds, p_orgs) WITH ORDINALITY AS u(hid, o, k)
          JOIN tollgate_credit_holds h ON h.id = u.hid AND h.org = u.o
         ORDER BY h.id
           FOR UPDATE OF h
    LOOP
        h_found[r.k] := true;
        h_amount[r.k] := r.amount;
        h_request[r.k] := r.request_id;
        h_swept[r.k] := r.forget_at_ms IS NOT NULL;
        h_cplan[r.k] := r.charged_plan;
        h_ctopup[r.k] := r.charged_topup;
    END LOOP;

    PERFORM set_config('lock_timeout', p_lock_timeout, true);
    FOR v_org, v_items IN
        SELECT u.o, array_agg(u.k::integer ORDER BY u.k)
          FROM unnest(p_orgs) WITH ORDINALITY AS u(o, k)
         GROUP BY u.o ORDER BY u.o
    LOOP
        o_items := '{}';
        o_after := '{}';
        BEGIN
            -- Answers that need no account first; the account row only when a hold gives
            -- credits back.
            v_touch := false;
            FOREACH i IN ARRAY v_items LOOP
                IF NOT h_found[i] THEN
                    v_out[i] := 'gone';
                ELSIF h_cplan[i] IS NULL THEN
                    v_delete[i] := true;
                    IF h_swept[i] THEN
                        v_out[i] := 'swept';
                    ELSE
                        v_out[i] := 'released';
                        v_touch := true;
                    END IF;
                ELSE
                    v_charged[i] := h_cplan[i] + h_ctopup[i];
                    IF NOT p_refunds[i] THEN
                        v_out[i] := 'committed';
                    ELSE
                        v_out[i] := 'refunded';
                        v_delete[i] := true;
                        IF v_charged[i] > 0 THEN
                            v_touch := true;
                        END IF;
                    END IF;
                END IF;
            END LOOP;
            IF v_touch THEN
                SELECT * INTO acct FROM tollgate_credit_accounts WHERE org = v_org FOR UPDATE;
                IF FOUND THEN
                    FOREACH i IN ARRAY v_items LOOP
                        IF v_out[i] = 'released' THEN
                            acct.held := greatest(acct.held - h_amount[i], 0);
                        ELSIF v_out[i] = 'refunded' AND v_charged[i] > 0 THEN
                            acct.plan_credits := least(acct.plan_credits::numeric + h_cplan[i],
                                                       9223372036854775807)::bigint;
                            acct.topup_credits := least(acct.topup_credits::numeric
                                                            + h_ctopup[i],
                                                        9223372036854775807)::bigint;
                            o_items := o_items || i;
                            o_after := o_after || tollgate_credit_balance(acct.plan_credits,
                                                                          acct.topup_credits);
                        END IF;
                    END LOOP;
                    UPDATE tollgate_credit_accounts
                       SET held = acct.held,
                           plan_credits = acct.plan_credits,
                           topup_credits = acct.topup_credits
                     WHERE org = v_org;
                END IF;
            END IF;
            l_items := l_items || o_items;
            l_after := l_after || o_after;
        EXCEPTION WHEN lock_not_available THEN
            FOREACH i IN ARRAY v_items LOOP
                v_out[i] := 'busy';
                v_charged[i] := 0;
                v_delete[i] := false;
            END LOOP;
        END;
    END LOOP;

    DELETE FROM tollgate_credit_holds h
     USING unnest(p_holds) WITH ORDINALITY AS u(hid, k)
     WHERE h.id = u.hid AND v_delete[u.k];
    INSERT INTO tollgate_credit_ledger
        (org, at_ms, kind, delta_plan, delta_topup, balance_after, request_id)
    SELECT p_orgs[c.k], p_now, 'refund', h_cplan[c.k], h_ctopup[c.k], c.after, h_request[c.k]
      FROM unnest(l_items, l_after) WITH ORDINALITY AS c(k, after, ord)
     ORDER BY c.ord;

    RETURN QUERY
    SELECT k, v_out[k], v_charged[k] FROM generate_series(1, n) AS k ORDER BY k;
END
$$;

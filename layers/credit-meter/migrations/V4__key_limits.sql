-- Per-key credit limits (docs/contract.md §13): the API key each hold is for, what each key
-- was charged per billing period, and the batch functions of V3 taught to count it.
--
-- A key's use in the current period = its row in tollgate_credit_key_spend (charges net of
-- refunds, keyed by the org's period start, so a new period starts from zero without a
-- reset) + its open holds. The hold batch checks `limit − use ≥ cost` under the org's
-- account row lock, the same lock every commit and refund of the org's holds takes before it
-- updates the spend row: a key's holds cannot overshoot its limit however many replicas race.
--
-- A hold that the sweeper released no longer counts; if its request commits after all, the
-- charge is counted (the key may then pass its limit by that one request, as the org's
-- balance can only be re-checked, not refused, at that point).
--
-- The V3 hold batch (without keys) stays for replicas still running the previous release;
-- its holds are for no key.

ALTER TABLE tollgate_credit_holds ADD COLUMN key_id uuid;

CREATE INDEX tollgate_credit_holds_open_by_key
    ON tollgate_credit_holds (key_id) WHERE key_id IS NOT NULL AND forget_at_ms IS NULL;

CREATE TABLE tollgate_credit_key_spend (
    key_id          uuid   NOT NULL,
    period_start_ms bigint NOT NULL,
    org             uuid   NOT NULL,
    spent           bigint NOT NULL DEFAULT 0 CHECK (spent >= 0),
    PRIMARY KEY (key_id, period_start_ms)
);

-- Holds, as in V3, each for a key (`p_keys[k]`, may be NULL) with an optional limit
-- (`p_key_limits[k]`). outcome per item: as in V3, plus 'key_limit' (available: what the
-- key's limit still allowed when the item's turn came). The key limit is checked first.
CREATE FUNCTION tollgate_credit_hold_batch(
    p_orgs uuid[], p_amounts bigint[], p_request_ids text[], p_keys uuid[],
    p_key_limits bigint[], p_now bigint, p_expires_at bigint, p_lock_timeout text)
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
    -- Credits held in this batch per key (keys in b_keys, amounts at the same index).
    b_keys  uuid[] := '{}';
    b_held  bigint[] := '{}';
    v_pos   integer;
    v_used  bigint;
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
            SELECT a.plan, a.plan_monthly, a.period_start_ms,
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
                    v_pos := NULL;
                    IF p_keys[i] IS NOT NULL THEN
                        v_pos := array_position(b_keys, p_keys[i]);
                    END IF;
                    IF p_key_limits[i] IS NOT NULL THEN
                        -- The key's spend this period, its open holds, and what this batch
                        -- already held for it: all under the org's row lock.
                        v_used := coalesce((SELECT s.spent FROM tollgate_credit_key_spend s
                                             WHERE s.key_id = p_keys[i]
                                               AND s.period_start_ms = acct.period_start_ms), 0)
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
                    IF p_amounts[i] <= v_free THEN
                        v_free := v_free - p_amounts[i];
                        v_taken := v_taken + p_amounts[i];
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

-- Commits, as in V3; a charge also counts in its key's spend for the period.
CREATE OR REPLACE FUNCTION tollgate_credit_commit_batch(
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
    h_key      uuid[] := array_fill(NULL::uuid, ARRAY[n]);
    -- The period each charge counts in, for its key's spend.
    v_period   bigint[] := array_fill(NULL::bigint, ARRAY[n]);
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
                        v_period[i] := acct.period_start_ms;
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

-- Releases, as in V3; a refund also gives the credits back to its key's spend.
CREATE OR REPLACE FUNCTION tollgate_credit_release_batch(
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
    h_key     uuid[] := array_fill(NULL::uuid, ARRAY[n]);
    v_period  bigint[] := array_fill(NULL::bigint, ARRAY[n]);
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
               h.charged_topup, h.key_id
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
        h_key[r.k] := r.key_id;
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
                            v_period[i] := acct.period_start_ms;
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

    -- A refund gives the key its credits back too (in the current period).
    UPDATE tollgate_credit_key_spend s
       SET spent = greatest(s.spent - d.amount, 0)
      FROM (SELECT h_key[k] AS key_id, v_period[k] AS period, sum(v_charged[k]) AS amount
              FROM generate_series(1, n) AS k
             WHERE v_out[k] = 'refunded' AND v_period[k] IS NOT NULL AND h_key[k] IS NOT NULL
             GROUP BY h_key[k], v_period[k]) AS d
     WHERE s.key_id = d.key_id AND s.period_start_ms = d.period;

    RETURN QUERY
    SELECT k, v_out[k], v_charged[k] FROM generate_series(1, n) AS k ORDER BY k;
END
$$;

-- The one-hold release of V2 (detached releases), with the same change.
CREATE OR REPLACE FUNCTION tollgate_credit_release(
    p_org uuid, p_hold bigint, p_refund boolean, p_now bigint,
    OUT outcome text, OUT charged bigint)
LANGUAGE plpgsql
AS $$
DECLARE
    h    record;
    acct tollgate_credit_accounts;
BEGIN
    charged := 0;
    SELECT amount, request_id, forget_at_ms, charged_plan, charged_topup, key_id INTO h
      FROM tollgate_credit_holds
     WHERE id = p_hold AND org = p_org
       FOR UPDATE;
    IF NOT FOUND THEN
        outcome := 'gone';
        RETURN;
    END IF;
    IF h.charged_plan IS NULL THEN
        DELETE FROM tollgate_credit_holds WHERE id = p_hold;
        IF h.forget_at_ms IS NULL THEN
            UPDATE tollgate_credit_accounts SET held = greatest(held - h.amount, 0)
             WHERE org = p_org;
            outcome := 'released';
        ELSE
            outcome := 'swept';
        END IF;
        RETURN;
    END IF;
    charged := h.charged_plan + h.charged_topup;
    IF NOT p_refund THEN
        outcome := 'committed';
        RETURN;
    END IF;
    DELETE FROM tollgate_credit_holds WHERE id = p_hold;
    outcome := 'refunded';
    IF h.charged_plan + h.charged_topup = 0 THEN
        RETURN;
    END IF;
    UPDATE tollgate_credit_accounts
       SET plan_credits = least(plan_credits::numeric + h.charged_plan,
                                9223372036854775807)::bigint,
           topup_credits = least(topup_credits::numeric + h.charged_topup,
                                 9223372036854775807)::bigint
     WHERE org = p_org
    RETURNING * INTO acct;
    INSERT INTO tollgate_credit_ledger
        (org, at_ms, kind, delta_plan, delta_topup, balance_after, request_id)
    VALUES
        (p_org, p_now, 'refund', h.charged_plan, h.charged_topup,
         tollgate_credit_balance(acct.plan_credits, acct.topup_credits), h.request_id);
    IF h.key_id IS NOT NULL THEN
        UPDATE tollgate_credit_key_spend
           SET spent = greatest(spent - (h.charged_plan + h.charged_topup), 0)
         WHERE key_id = h.key_id AND period_start_ms = acct.period_start_ms;
    END IF;
END
$$;

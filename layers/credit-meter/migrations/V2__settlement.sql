-- What a commit took, holds that remember it, refunds, and subscriptions that are safe to
-- retry.
--
-- A committed hold is no longer deleted at once: it keeps what it charged from each pot
-- (`charged_plan`, `charged_topup`) and is forgotten one hold TTL later, like a swept hold.
-- That lets a settlement whose answer was lost be resolved exactly: a later release says the
-- hold was committed, and a *void* (the release of a request whose response was withheld)
-- refunds it. A committed or swept hold has `forget_at_ms` set; an open one has it NULL.
ALTER TABLE tollgate_credit_holds
    ADD COLUMN charged_plan  bigint CHECK (charged_plan >= 0),
    ADD COLUMN charged_topup bigint CHECK (charged_topup >= 0);

-- A refund gives back a charge whose response never reached the client.
ALTER TABLE tollgate_credit_ledger DROP CONSTRAINT tollgate_credit_ledger_kind_check;
ALTER TABLE tollgate_credit_ledger ADD CONSTRAINT tollgate_credit_ledger_kind_check
    CHECK (kind IN
        ('charge', 'top_up', 'renewal', 'plan_change', 'adjustment', 'cancel', 'refund'));

-- tollgate_credit_commit (V1) stays for replicas still running the previous release; this
-- version also returns `charged`, the credits actually taken (less than the hold when
-- support lowered the balance while it was open, 0 on an unlimited plan), so the receipt,
-- the request log and the usage figures report what the ledger took, and it keeps the hold
-- row (with what it took) for one more TTL.
CREATE FUNCTION tollgate_credit_commit_charged(
    p_org uuid, p_hold bigint, p_now bigint, p_forget_at bigint,
    OUT outcome text, OUT balance bigint, OUT note text, OUT charged bigint)
LANGUAGE plpgsql
AS $$
DECLARE
    h           record;
    acct        tollgate_credit_accounts;
    v_amount    bigint;
    v_from_plan bigint;
BEGIN
    charged := 0;
    -- The hold first: a sweeper that has locked it waits for nothing this call holds.
    SELECT amount, request_id, forget_at_ms, charged_plan INTO h
      FROM tollgate_credit_holds
     WHERE id = p_hold AND org = p_org
       FOR UPDATE;
    IF NOT FOUND OR h.charged_plan IS NOT NULL THEN
        -- Never held, released, forgotten, or committed already.
        outcome := 'unknown';
        RETURN;
    END IF;

    PERFORM tollgate_credit_renew(p_org, p_now);
    SELECT * INTO acct FROM tollgate_credit_accounts WHERE org = p_org FOR UPDATE;
    IF NOT FOUND THEN
        outcome := 'unknown';
        RETURN;
    END IF;

    IF h.forget_at_ms IS NULL THEN
        -- An open hold: its credits were counted in `held`.
        acct.held := greatest(acct.held - h.amount, 0);
        IF acct.plan IS NOT NULL AND acct.plan_monthly IS NULL THEN
            -- Upgraded to an unlimited plan while the request was in flight.
            UPDATE tollgate_credit_accounts SET held = acct.held WHERE org = p_org;
            UPDATE tollgate_credit_holds
               SET charged_plan = 0, charged_topup = 0, forget_at_ms = p_forget_at
             WHERE id = p_hold;
            outcome := 'unlimited';
            RETURN;
        END IF;
        IF h.amount > tollgate_credit_balance(acct.plan_credits, acct.topup_credits) THEN
            note := 'lowered';
        END IF;
    ELSE
        -- Swept after its TTL (`held` no longer counts it): charged only if the balance
        -- still covers it.
        note := 'swept';
        IF acct.plan IS NOT NULL AND acct.plan_monthly IS NULL THEN
            UPDATE tollgate_credit_holds
               SET charged_plan = 0, charged_topup = 0, forget_at_ms = p_forget_at
             WHERE id = p_hold;
            outcome := 'unlimited';
            RETURN;
        END IF;
        IF tollgate_credit_balance(acct.plan_credits, acct.topup_credits) - acct.held
               < h.amount THEN
            -- Refused once, forgotten: it can never be charged later either.
            DELETE FROM tollgate_credit_holds WHERE id = p_hold;
            outcome := 'expired';
            RETURN;
        END IF;
    END IF;

    v_amount := least(h.amount, tollgate_credit_balance(acct.plan_credits, acct.topup_credits));
    v_from_plan := least(v_amount, acct.plan_credits);
    acct.plan_credits := acct.plan_credits - v_from_plan;
    acct.topup_credits := acct.topup_credits - (v_amount - v_from_plan);
    UPDATE tollgate_credit_accounts
       SET held = acct.held,
           plan_credits = acct.plan_credits,
           topup_credits = acct.topup_credits
     WHERE org = p_org;
    UPDATE tollgate_credit_holds
       SET charged_plan = v_from_plan, charged_topup = v_amount - v_from_plan,
           forget_at_ms = p_forget_at
     WHERE id = p_hold;
    IF v_amount > 0 THEN
        INSERT INTO tollgate_credit_ledger
            (org, at_ms, kind, delta_plan, delta_topup, balance_after, request_id)
        VALUES
            (p_org, p_now, 'charge', -v_from_plan, -(v_amount - v_from_plan),
             tollgate_credit_balance(acct.plan_credits, acct.topup_credits), h.request_id);
    END IF;
    outcome := 'charged';
    charged := v_amount;
    balance := tollgate_credit_balance(acct.plan_credits, acct.topup_credits);
END
$$;

-- Releases a hold without charging it. outcome: 'released' (it was open: its credits are
-- available again), 'swept' (the sweeper had released it), 'committed' (it was charged:
-- nothing changes; `charged` says what it took) or 'gone' (no such hold). `p_refund`: a committed hold is refunded
-- instead (outcome 'refunded'), once — what a request whose response was withheld needs.
CREATE FUNCTION tollgate_credit_release(
    p_org uuid, p_hold bigint, p_refund boolean, p_now bigint,
    OUT outcome text, OUT charged bigint)
LANGUAGE plpgsql
AS $$
DECLARE
    h    record;
    acct tollgate_credit_accounts;
BEGIN
    charged := 0;
    SELECT amount, request_id, forget_at_ms, charged_plan, charged_topup INTO h
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
END
$$;

-- Subscribing an org to the plan it is already on changes nothing: no new period, no
-- ledger row. A subscription retried after a failure part-way (or sent twice) must not
-- reset the period and refill the plan credits.
CREATE OR REPLACE FUNCTION tollgate_credit_subscribe(
    p_org uuid, p_plan text, p_monthly bigint, p_now bigint)
RETURNS SETOF tollgate_credit_accounts
LANGUAGE plpgsql
AS $$
DECLARE
    acct  tollgate_credit_accounts;
    fresh bigint := coalesce(p_monthly, 0);
BEGIN
    INSERT INTO tollgate_credit_accounts (org) VALUES (p_org) ON CONFLICT (org) DO NOTHING;
    PERFORM tollgate_credit_renew(p_org, p_now);
    SELECT * INTO acct FROM tollgate_credit_accounts WHERE org = p_org FOR UPDATE;
    IF acct.plan IS NOT DISTINCT FROM p_plan THEN
        RETURN NEXT acct;
        RETURN;
    END IF;
    INSERT INTO tollgate_credit_ledger
        (org, at_ms, kind, delta_plan, delta_topup, balance_after)
    VALUES
        (p_org, p_now, 'plan_change', fresh - acct.plan_credits, 0,
         tollgate_credit_balance(fresh, acct.topup_credits));
    UPDATE tollgate_credit_accounts
       SET plan = p_plan,
           plan_monthly = p_monthly,
           plan_credits = fresh,
           period_start_ms = p_now,
           period_end_ms = tollgate_credit_add_month(p_now)
     WHERE org = p_org
    RETURNING * INTO acct;
    RETURN NEXT acct;
END
$$;

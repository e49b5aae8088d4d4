-- What a commit took, and subscriptions that are safe to retry.
--
-- tollgate_credit_commit (V1) stays for replicas still running the previous release; this
-- version also returns `charged`, the credits actually taken (less than the hold when
-- support lowered the balance while it was open, 0 on an unlimited plan), so the receipt,
-- the request log and the usage figures report what the ledger took.
CREATE FUNCTION tollgate_credit_commit_charged(
    p_org uuid, p_hold bigint, p_now bigint,
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
    DELETE FROM tollgate_credit_holds
     WHERE id = p_hold AND org = p_org
    RETURNING amount, request_id, forget_at_ms INTO h;
    IF NOT FOUND THEN
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
            outcome := 'unlimited';
            RETURN;
        END IF;
        IF tollgate_credit_balance(acct.plan_credits, acct.topup_credits) - acct.held
               < h.amount THEN
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

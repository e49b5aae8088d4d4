-- The PostgreSQL ledger (tollgate-credit-meter, feature `postgres`).
--
-- Times are milliseconds since the Unix epoch (bigint), as in the Rust API; the largest
-- bigint (9223372036854775807) as a period end means "no next period" (past the end of the
-- calendar). Every operation of the ledger is ONE statement sent by the client: either a
-- single SQL statement (release, sweep) or a call of one of the functions below, which runs
-- atomically in the statement's own transaction. Operations of one org are ordered by the
-- lock on its account row (the per-org mutex of the memory ledger); orgs never contend.

-- One row per org that ever subscribed.
CREATE TABLE tollgate_credit_accounts (
    org             uuid    PRIMARY KEY,
    -- The active plan's name; NULL when the org cancelled (or never subscribed).
    plan            text,
    -- The plan's monthly credits; NULL on an unlimited plan (or without a plan). Stored so
    -- renewals need no knowledge of the plans here.
    plan_monthly    bigint  CHECK (plan_monthly >= 0),
    plan_credits    bigint  NOT NULL DEFAULT 0 CHECK (plan_credits >= 0),
    topup_credits   bigint  NOT NULL DEFAULT 0 CHECK (topup_credits >= 0),
    -- Sum of the open (not swept) holds' amounts.
    held            bigint  NOT NULL DEFAULT 0 CHECK (held >= 0),
    period_start_ms bigint  NOT NULL DEFAULT 0,
    period_end_ms   bigint  NOT NULL DEFAULT 0
);

-- The periodic renewal job looks for subscribed accounts whose period is over.
CREATE INDEX tollgate_credit_accounts_due
    ON tollgate_credit_accounts (period_end_ms) WHERE plan IS NOT NULL;

-- Credits set aside for requests in flight.
CREATE TABLE tollgate_credit_holds (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    org           uuid   NOT NULL,
    amount        bigint NOT NULL CHECK (amount >= 0),
    request_id    text,
    expires_at_ms bigint NOT NULL,
    -- NULL while the hold is open. Set by the sweeper when it released the expired hold: the
    -- row is kept until then so a late commit can still be charged (after re-checking the
    -- balance) and is never charged twice.
    forget_at_ms  bigint
);

CREATE INDEX tollgate_credit_holds_expiry
    ON tollgate_credit_holds (expires_at_ms) WHERE forget_at_ms IS NULL;
CREATE INDEX tollgate_credit_holds_swept
    ON tollgate_credit_holds (forget_at_ms) WHERE forget_at_ms IS NOT NULL;

-- Append-only: one row for every change of a balance. Rows of one org are ordered by id.
CREATE TABLE tollgate_credit_ledger (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    org           uuid   NOT NULL,
    at_ms         bigint NOT NULL,
    kind          text   NOT NULL CHECK (kind IN
                      ('charge', 'top_up', 'renewal', 'plan_change', 'adjustment', 'cancel')),
    delta_plan    bigint NOT NULL,
    delta_topup   bigint NOT NULL,
    balance_after bigint NOT NULL CHECK (balance_after >= 0),
    request_id    text
);

CREATE INDEX tollgate_credit_ledger_org ON tollgate_credit_ledger (org, id);

-- plan credits + top-up credits, saturating at the largest bigint (as the Rust side does).
CREATE FUNCTION tollgate_credit_balance(plan_credits bigint, topup_credits bigint)
RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT least(plan_credits::numeric + topup_credits, 9223372036854775807)::bigint
$$;

-- One calendar month after `ms` in UTC, clamped to the end of shorter months (Jan 31 -> Feb
-- 28/29): tollgate_core::time::add_one_month_ms, including its behaviour at the end of
-- chrono's calendar (8210266876799999 = +262142-12-31T23:59:59.999Z), where there is no next
-- month and the input (or that last instant) comes back.
CREATE FUNCTION tollgate_credit_add_month(ms bigint)
RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE
        WHEN ms > 8210266876799999 THEN 8210266876799999
        ELSE (
            SELECT CASE WHEN next_ms > 8210266876799999 THEN ms ELSE next_ms END
            FROM (
                SELECT extract(epoch FROM (to_timestamp(ms / 1000) AT TIME ZONE 'UTC')
                                          + interval '1 month')::bigint * 1000
                       + ms % 1000 AS next_ms
            ) AS next
        )
    END
$$;

-- Starts every period of `p_org` that has ended by `p_now`, one renewal row each (dated at
-- its boundary), and returns how many. Plan credits are reset to the plan's monthly credits
-- (no roll-over), top-ups are kept. After 1,200 periods (a century of idling, i.e. a clock
-- jump) the period restarts at `p_now` instead of replaying every month.
CREATE FUNCTION tollgate_credit_renew(p_org uuid, p_now bigint)
RETURNS integer
LANGUAGE plpgsql
AS $$
DECLARE
    acct     record;
    fresh    bigint;
    credits  bigint;
    start_ms bigint;
    end_ms   bigint;
    next_ms  bigint;
    renewed  integer := 0;
BEGIN
    -- Locks the row only when a renewal is due; a concurrent renewer that got there first
    -- moved period_end_ms, and the re-checked condition then finds nothing.
    SELECT a.plan_monthly, a.plan_credits, a.topup_credits, a.period_end_ms
      INTO acct
      FROM tollgate_credit_accounts a
     WHERE a.org = p_org
       AND a.plan IS NOT NULL
       AND a.period_end_ms <> 9223372036854775807
       AND a.period_end_ms <= p_now
       FOR UPDATE;
    IF NOT FOUND THEN
        RETURN 0;
    END IF;

    fresh := coalesce(acct.plan_monthly, 0);
    credits := acct.plan_credits;
    end_ms := acct.period_end_ms;
    WHILE end_ms <> 9223372036854775807 AND p_now >= end_ms LOOP
        IF renewed < 1200 THEN
            start_ms := end_ms;
        ELSE
            RAISE WARNING 'org %: clock jumped far ahead; billing period restarted now', p_org;
            start_ms := p_now;
        END IF;
        next_ms := tollgate_credit_add_month(start_ms);
        INSERT INTO tollgate_credit_ledger
            (org, at_ms, kind, delta_plan, delta_topup, balance_after)
        VALUES
            (p_org, start_ms, 'renewal', fresh - credits, 0,
             tollgate_credit_balance(fresh, acct.topup_credits));
        credits := fresh;
        renewed := renewed + 1;
        IF next_ms <= start_ms THEN
            -- Past the end of the calendar: there is no next period.
            end_ms := 9223372036854775807;
        ELSE
            end_ms := next_ms;
        END IF;
    END LOOP;

    UPDATE tollgate_credit_accounts
       SET plan_credits = fresh, period_start_ms = start_ms, period_end_ms = end_ms
     WHERE org = p_org;
    RETURN renewed;
END
$$;

-- Holds `p_amount` credits of `p_org` (renewing first if due). The availability check and
-- the increment of `held` are one conditional UPDATE: two holds racing for the last credits
-- cannot both pass it.
--
-- outcome: 'held' (hold_id set), 'unlimited', 'no_subscription' or 'insufficient'
-- (available set).
CREATE FUNCTION tollgate_credit_hold(
    p_org uuid, p_amount bigint, p_request_id text, p_now bigint, p_expires_at bigint,
    OUT outcome text, OUT hold_id bigint, OUT available bigint)
LANGUAGE plpgsql
AS $$
DECLARE
    acct record;
BEGIN
    PERFORM tollgate_credit_renew(p_org, p_now);
    LOOP
        UPDATE tollgate_credit_accounts
           SET held = held + p_amount
         WHERE org = p_org
           AND plan IS NOT NULL
           AND plan_monthly IS NOT NULL
           AND greatest(tollgate_credit_balance(plan_credits, topup_credits) - held, 0)
               >= p_amount;
        IF FOUND THEN
            INSERT INTO tollgate_credit_holds (org, amount, request_id, expires_at_ms)
            VALUES (p_org, p_amount, p_request_id, p_expires_at)
            RETURNING id INTO hold_id;
            outcome := 'held';
            RETURN;
        END IF;

        -- Refused: say why.
        SELECT a.plan, a.plan_monthly,
               greatest(tollgate_credit_balance(a.plan_credits, a.topup_credits) - a.held, 0)
                   AS available
          INTO acct
          FROM tollgate_credit_accounts a
         WHERE a.org = p_org;
        IF NOT FOUND OR acct.plan IS NULL THEN
            outcome := 'no_subscription';
            RETURN;
        ELSIF acct.plan_monthly IS NULL THEN
            outcome := 'unlimited';
            RETURN;
        ELSIF acct.available < p_amount THEN
            outcome := 'insufficient';
            available := acct.available;
            RETURN;
        END IF;
        -- Credits were given back between the two statements: try again.
    END LOOP;
END
$$;

-- Charges a hold: plan credits first, then top-ups, never more than the balance.
--
-- outcome: 'charged' (balance = balance after), 'unlimited' (the org is on an unlimited
-- plan now: nothing charged), 'unknown' (no such hold: never held, already settled, or swept
-- and forgotten) or 'expired' (the hold was swept and its credits are no longer available:
-- nothing charged). note: 'swept' when the hold had been released by the sweeper before
-- (its credits no longer counted in `held`; charged only after re-checking the balance),
-- 'lowered' when the balance had dropped below an open hold (what was left was charged).
CREATE FUNCTION tollgate_credit_commit(
    p_org uuid, p_hold bigint, p_now bigint,
    OUT outcome text, OUT balance bigint, OUT note text)
LANGUAGE plpgsql
AS $$
DECLARE
    h           record;
    acct        tollgate_credit_accounts;
    v_amount    bigint;
    v_from_plan bigint;
BEGIN
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
    balance := tollgate_credit_balance(acct.plan_credits, acct.topup_credits);
END
$$;

-- Subscribes `p_org` to a plan or changes its plan: a new period [p_now, p_end) starts with
-- the plan's monthly credits (0 on an unlimited plan); top-ups are kept.
CREATE FUNCTION tollgate_credit_subscribe(
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

-- Cancels the subscription: plan credits are dropped, top-ups kept. False when the org is
-- unknown or had no active subscription.
CREATE FUNCTION tollgate_credit_cancel(p_org uuid, p_now bigint)
RETURNS boolean
LANGUAGE plpgsql
AS $$
DECLARE
    acct tollgate_credit_accounts;
BEGIN
    PERFORM tollgate_credit_renew(p_org, p_now);
    SELECT * INTO acct FROM tollgate_credit_accounts WHERE org = p_org FOR UPDATE;
    IF NOT FOUND OR acct.plan IS NULL THEN
        RETURN false;
    END IF;
    UPDATE tollgate_credit_accounts
       SET plan = NULL, plan_monthly = NULL, plan_credits = 0
     WHERE org = p_org;
    INSERT INTO tollgate_credit_ledger
        (org, at_ms, kind, delta_plan, delta_topup, balance_after)
    VALUES
        (p_org, p_now, 'cancel', -acct.plan_credits, 0, acct.topup_credits);
    RETURN true;
END
$$;

-- Adds top-up credits. No row: unknown org. Raises 'out_of_range' (SQLSTATE 22003) when
-- the balance would pass the largest bigint.
CREATE FUNCTION tollgate_credit_top_up(p_org uuid, p_amount bigint, p_now bigint)
RETURNS SETOF tollgate_credit_accounts
LANGUAGE plpgsql
AS $$
DECLARE
    acct tollgate_credit_accounts;
BEGIN
    PERFORM tollgate_credit_renew(p_org, p_now);
    SELECT * INTO acct FROM tollgate_credit_accounts WHERE org = p_org FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF acct.plan_credits::numeric + acct.topup_credits + p_amount > 9223372036854775807 THEN
        RAISE EXCEPTION 'top-up of % is out of range: balances are limited to % credits',
                        p_amount, 9223372036854775807
              USING ERRCODE = 'numeric_value_out_of_range';
    END IF;
    IF p_amount > 0 THEN
        acct.topup_credits := acct.topup_credits + p_amount;
        UPDATE tollgate_credit_accounts SET topup_credits = acct.topup_credits
         WHERE org = p_org;
        INSERT INTO tollgate_credit_ledger
            (org, at_ms, kind, delta_plan, delta_topup, balance_after)
        VALUES
            (p_org, p_now, 'top_up', 0, p_amount,
             tollgate_credit_balance(acct.plan_credits, acct.topup_credits));
    END IF;
    RETURN NEXT acct;
END
$$;

-- Support adjustment: plan credits = p_balance, top-ups = 0. No row: unknown org.
CREATE FUNCTION tollgate_credit_set_balance(p_org uuid, p_balance bigint, p_now bigint)
RETURNS SETOF tollgate_credit_accounts
LANGUAGE plpgsql
AS $$
DECLARE
    acct tollgate_credit_accounts;
BEGIN
    PERFORM tollgate_credit_renew(p_org, p_now);
    SELECT * INTO acct FROM tollgate_credit_accounts WHERE org = p_org FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    INSERT INTO tollgate_credit_ledger
        (org, at_ms, kind, delta_plan, delta_topup, balance_after)
    VALUES
        (p_org, p_now, 'adjustment', p_balance - acct.plan_credits, -acct.topup_credits,
         p_balance);
    UPDATE tollgate_credit_accounts
       SET plan_credits = p_balance, topup_credits = 0
     WHERE org = p_org
    RETURNING * INTO acct;
    RETURN NEXT acct;
END
$$;

-- The account, renewed first if its period is over. No row: unknown org.
CREATE FUNCTION tollgate_credit_account(p_org uuid, p_now bigint)
RETURNS SETOF tollgate_credit_accounts
LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM tollgate_credit_renew(p_org, p_now);
    RETURN QUERY SELECT * FROM tollgate_credit_accounts WHERE org = p_org;
END
$$;

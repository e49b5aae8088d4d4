-- Top-ups applied once per reference (Ledger::top_up_once): a billing request approved twice
-- after its first application's answer was lost adds its credits once.

CREATE TABLE tollgate_credit_references (
    org       uuid   NOT NULL,
    reference text   NOT NULL,
    at_ms     bigint NOT NULL,
    PRIMARY KEY (org, reference)
);

-- As tollgate_credit_top_up (V1), once per p_reference: a reference applied already changes
-- nothing and returns the account as it is. No row: unknown org.
CREATE FUNCTION tollgate_credit_top_up_once(
    p_org uuid, p_amount bigint, p_now bigint, p_reference text)
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
    INSERT INTO tollgate_credit_references (org, reference, at_ms)
    VALUES (p_org, p_reference, p_now)
    ON CONFLICT (org, reference) DO NOTHING;
    IF NOT FOUND THEN
        RETURN NEXT acct;
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
            (org, at_ms, kind, delta_plan, delta_topup, balance_after, request_id)
        VALUES
            (p_org, p_now, 'top_up', 0, p_amount,
             tollgate_credit_balance(acct.plan_credits, acct.topup_credits), p_reference);
    END IF;
    RETURN NEXT acct;
END
$$;

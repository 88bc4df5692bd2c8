"""buy_stamps function: one distributor purchase, callable many times in one statement

Revision ID: 3b1f0c2d9e41
Revises: 6ccd4c4cf133
Create Date: 2026-11-29 19:10:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "3b1f0c2d9e41"
down_revision: str | None = "6ccd4c4cf133"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# One distributor purchase, all or nothing: take `quantity` available serials (SKIP LOCKED),
# debit the balance if it covers them, record the purchase, sell the serials and book both
# ledger movements. A refusal is a result ('sold_out' or 'insufficient_balance'), not an
# error, so that many purchases can run in one statement (and one commit) and a refused one
# leaves the others alone. Volatile, so each call sees what the calls before it did.
BUY_STAMPS = """
CREATE FUNCTION buy_stamps(
    p_purchase_id uuid,
    p_distributor_id uuid,
    p_quantity integer,
    p_unit_price bigint,
    p_txn_id uuid,
    p_owner varchar,
    p_money_account varchar,
    p_stamps_account varchar
) RETURNS TABLE (
    outcome text,
    available integer,
    created_at timestamptz,
    paid_at timestamptz,
    serials varchar[]
)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_amount bigint := p_quantity * p_unit_price;
    v_picked varchar[];
    v_taken integer;
    v_created timestamptz;
    v_paid timestamptz;
BEGIN
    SELECT coalesce(array_agg(picked.serial ORDER BY picked.serial), '{}') INTO v_picked
    FROM (
        SELECT s.serial FROM serials AS s WHERE s.state = 'available'
        LIMIT p_quantity FOR UPDATE SKIP LOCKED
    ) AS picked;
    v_taken := cardinality(v_picked);
    IF v_taken < p_quantity THEN
        RETURN QUERY SELECT 'sold_out'::text, v_taken, NULL::timestamptz, NULL::timestamptz,
            NULL::varchar[];
        RETURN;
    END IF;
    UPDATE distributors AS d SET balance = d.balance - v_amount
    WHERE d.id = p_distributor_id AND d.balance >= v_amount;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'insufficient_balance'::text, v_taken, NULL::timestamptz,
            NULL::timestamptz, NULL::varchar[];
        RETURN;
    END IF;
    INSERT INTO purchases AS p (id, owner, quantity, unit_price, amount, status, paid_at)
    VALUES (p_purchase_id, p_owner, p_quantity, p_unit_price, v_amount, 'paid', now())
    RETURNING p.created_at, p.paid_at INTO v_created, v_paid;
    UPDATE serials AS s SET state = 'sold', owner = p_owner, purchase_id = p_purchase_id,
        sold_at = now()
    WHERE s.serial = ANY (v_picked);
    INSERT INTO ledger_entries (txn_id, account, unit, amount, memo)
    VALUES
        (p_txn_id, p_money_account, 'IDR', -v_amount, 'purchase ' || p_purchase_id),
        (p_txn_id, 'revenue:stamps', 'IDR', v_amount, 'purchase ' || p_purchase_id),
        (p_txn_id, 'stamps:pool', 'STAMP', -p_quantity, 'purchase ' || p_purchase_id),
        (p_txn_id, p_stamps_account, 'STAMP', p_quantity, 'purchase ' || p_purchase_id);
    RETURN QUERY SELECT 'ok'::text, v_taken, v_created, v_paid, v_picked;
END
$$
"""


def upgrade() -> None:
    op.execute(BUY_STAMPS)


def downgrade() -> None:
    op.execute(
        "DROP FUNCTION buy_stamps(uuid, uuid, integer, bigint, uuid, varchar, varchar, varchar)"
    )

"""stepup: auth_time, accounts without a password, challenge address, mail owner,
sign-ins in flight

Revision ID: 185a068ce528
Revises: 43923d43b843
Create Date: 2026-12-06 00:10:12.437091

"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

# revision identifiers, used by Alembic.
revision: str = "185a068ce528"
down_revision: str | Sequence[str] | None = "43923d43b843"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    # The address an emailed code was opened for (wrong codes count per account and
    # client, an unknown address like a known one). Pending ones get their user's.
    with op.batch_alter_table("challenges", schema=None) as batch_op:
        batch_op.add_column(sa.Column("email", sa.String(length=254), nullable=True))
        # Asked for by the account's own client (exempt from the address's code lockout).
        batch_op.add_column(
            sa.Column("owner_client", sa.Boolean(), server_default=sa.false(), nullable=False)
        )
    op.execute(
        "UPDATE challenges SET email = (SELECT users.email_normalized FROM users"
        " WHERE users.id = challenges.user_id) WHERE user_id IS NOT NULL"
    )

    # Mail belongs to the account that caused it. Rows already queued are given to the
    # account that holds their address now (the best the data can tell).
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.add_column(sa.Column("user_id", sa.Uuid(), nullable=True))
        batch_op.create_index(batch_op.f("ix_outbox_user_id"), ["user_id"], unique=False)
    op.execute(
        "UPDATE outbox SET user_id = (SELECT users.id FROM users"
        " WHERE users.email = outbox.recipient)"
    )

    # When the user last proved a credential on the session: its sign-in, for the
    # sessions there are.
    with op.batch_alter_table("sessions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("auth_time", sa.DateTime(timezone=True), nullable=True))
    op.execute("UPDATE sessions SET auth_time = created_at")
    with op.batch_alter_table("sessions", schema=None) as batch_op:
        batch_op.alter_column("auth_time", existing_type=sa.DateTime(timezone=True), nullable=False)

    # Accounts without a password: NULL. A discarded password ("!" and random text, which
    # no password matched) was already that.
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.alter_column("password_hash", existing_type=sa.String(length=255), nullable=True)
    op.execute("UPDATE users SET password_hash = NULL WHERE password_hash LIKE '!%'")

    # Sign-ins being checked per address: reserved before the hash (the lockout holds
    # against parallel guesses).
    with op.batch_alter_table("login_throttles", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("in_flight", sa.Integer(), server_default="0", nullable=False)
        )
        batch_op.add_column(sa.Column("in_flight_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table("login_throttles", schema=None) as batch_op:
        batch_op.drop_column("in_flight_at")
        batch_op.drop_column("in_flight")

    # An account without a password gets one nobody knows (what the old code wrote).
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "UPDATE users SET password_hash = '!' || md5(random()::text)"
            " WHERE password_hash IS NULL"
        )
    else:
        op.execute(
            "UPDATE users SET password_hash = '!' || lower(hex(randomblob(16)))"
            " WHERE password_hash IS NULL"
        )
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.alter_column("password_hash", existing_type=sa.String(length=255), nullable=False)

    with op.batch_alter_table("sessions", schema=None) as batch_op:
        batch_op.drop_column("auth_time")

    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_outbox_user_id"))
        batch_op.drop_column("user_id")

    with op.batch_alter_table("challenges", schema=None) as batch_op:
        batch_op.drop_column("owner_client")
        batch_op.drop_column("email")

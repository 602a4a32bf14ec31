"""passkeys: the passkeys table and the users' WebAuthn user handle

Revision ID: 5b7e2f9c1d3a
Revises: 185a068ce528
Create Date: 2026-12-06 04:45:00.000000

"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

# revision identifiers, used by Alembic.
revision: str = "5b7e2f9c1d3a"
down_revision: str | Sequence[str] | None = "185a068ce528"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    # 64 random bytes per user, given at the first passkey registration.
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("webauthn_user_handle", sa.LargeBinary(length=64), nullable=True)
        )
        batch_op.create_unique_constraint(
            batch_op.f("uq_users_webauthn_user_handle"), ["webauthn_user_handle"]
        )

    op.create_table(
        "passkeys",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("credential_id", sa.LargeBinary(length=1023), nullable=False),
        sa.Column("public_key", sa.LargeBinary(), nullable=False),
        sa.Column("sign_count", sa.BigInteger(), nullable=False),
        sa.Column("aaguid", sa.String(length=36), nullable=False),
        sa.Column("transports", sa.String(length=255), nullable=True),
        sa.Column("backup_eligible", sa.Boolean(), nullable=False),
        sa.Column("backed_up", sa.Boolean(), nullable=False),
        sa.Column("attachment", sa.String(length=16), nullable=True),
        sa.Column("user_verified", sa.Boolean(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
            name=op.f("fk_passkeys_user_id_users"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_passkeys")),
        sa.UniqueConstraint("credential_id", name=op.f("uq_passkeys_credential_id")),
    )
    with op.batch_alter_table("passkeys", schema=None) as batch_op:
        batch_op.create_index(
            "ix_passkeys_user_id_created_at", ["user_id", "created_at"], unique=False
        )


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table("passkeys", schema=None) as batch_op:
        batch_op.drop_index("ix_passkeys_user_id_created_at")
    op.drop_table("passkeys")

    # Registration ceremonies in flight (challenges) end with the passkeys.
    op.execute("DELETE FROM challenges WHERE method = 'PASSKEY'")
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("uq_users_webauthn_user_handle"), type_="unique")
        batch_op.drop_column("webauthn_user_handle")

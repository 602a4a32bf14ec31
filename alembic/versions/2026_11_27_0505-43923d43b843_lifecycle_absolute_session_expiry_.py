"""lifecycle: absolute session expiry, change-of-address challenges

Revision ID: 43923d43b843
Revises: 8f255ede1df0
Create Date: 2026-11-27 05:05:29.611290

"""

from collections.abc import Sequence
from datetime import timedelta

import sqlalchemy as sa

from alembic import op
from db.base import UTCDateTime

# revision identifiers, used by Alembic.
revision: str = "43923d43b843"
down_revision: str | Sequence[str] | None = "8f255ede1df0"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


# The default SESSION_IDLE_TIMEOUT: sessions idle longer than this end at the upgrade.
IDLE_TIMEOUT = timedelta(days=14)

_sessions = sa.table(
    "sessions",
    sa.column("id", sa.Uuid()),
    sa.column("last_used_at", UTCDateTime()),
    sa.column("expires_at", UTCDateTime()),
    sa.column("revoked_at", UTCDateTime()),
)


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table("challenges", schema=None) as batch_op:
        batch_op.add_column(sa.Column("new_email", sa.String(length=254), nullable=True))
        # A change of address is bound to the session that asked for it.
        batch_op.add_column(sa.Column("session_id", sa.Uuid(), nullable=True))

    # A session's absolute end: until now expires_at was that; idle timeouts now bring
    # expires_at closer. Existing sessions keep their end as their absolute one.
    with op.batch_alter_table("sessions", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("absolute_expires_at", sa.DateTime(timezone=True), nullable=True)
        )
    op.execute("UPDATE sessions SET absolute_expires_at = expires_at")
    with op.batch_alter_table("sessions", schema=None) as batch_op:
        batch_op.alter_column(
            "absolute_expires_at", existing_type=sa.DateTime(timezone=True), nullable=False
        )
    _apply_idle_timeout()


def _apply_idle_timeout() -> None:
    """The default idle timeout applies to the sessions there are: one idle longer than
    it ends now, not at its next refresh."""
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        op.execute(
            "UPDATE sessions SET expires_at = LEAST(expires_at, last_used_at + interval '14 days')"
            " WHERE revoked_at IS NULL"
        )
        return
    # SQLite (the embedded development database): row by row, through the UTC type.
    rows = bind.execute(
        sa.select(_sessions.c.id, _sessions.c.last_used_at, _sessions.c.expires_at).where(
            _sessions.c.revoked_at.is_(None)
        )
    ).all()
    for session_id, last_used_at, expires_at in rows:
        idle_end = last_used_at + IDLE_TIMEOUT
        if idle_end < expires_at:
            bind.execute(
                sa.update(_sessions).where(_sessions.c.id == session_id).values(expires_at=idle_end)
            )


def downgrade() -> None:
    """Downgrade schema."""
    # Back to one end per session. expires_at keeps the idle end it has (the older code
    # never extends it): a session ends at most the idle timeout after its last use,
    # never later than it would have here, and no ended session comes back.
    with op.batch_alter_table("sessions", schema=None) as batch_op:
        batch_op.drop_column("absolute_expires_at")

    with op.batch_alter_table("challenges", schema=None) as batch_op:
        batch_op.drop_column("session_id")
        batch_op.drop_column("new_email")

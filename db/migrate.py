"""Alembic, driven from code: `strawgate migrate`, auto-migration of the embedded default."""

from __future__ import annotations

import asyncio
import functools
from importlib import resources
from pathlib import Path
from typing import Any

from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import pool
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from alembic import command

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def scripts_folder() -> Path:
    """The migration scripts: the repository's alembic/ in a checkout, or the package
    data they are installed as (`db.migrations`) from a wheel, where a top-level
    `alembic` package would shadow the Alembic library."""
    checkout = PROJECT_ROOT / "alembic"
    if (checkout / "env.py").is_file():
        return checkout
    return Path(str(resources.files("db") / "migrations"))


def alembic_config(database_url: str) -> Config:
    ini = PROJECT_ROOT / "alembic.ini"
    config = Config(str(ini)) if ini.is_file() else Config()
    config.set_main_option("script_location", str(scripts_folder()))
    # ConfigParser interpolates "%": a password in the URL may hold one.
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


# The migration scripts are part of the code: read once a process (some 15 ms, which every
# app made in it would pay again: the test suite makes about a thousand).
@functools.cache
def head_revision() -> str:
    """The revision the code's models are at."""
    head = ScriptDirectory.from_config(alembic_config("")).get_current_head()
    if head is None:  # pragma: no cover - the project always has migrations
        raise RuntimeError("no Alembic revisions found")
    return head


@functools.cache
def known_revisions() -> frozenset[str]:
    """Every revision this code's migrations know (a database at another one was migrated
    by a newer release)."""
    script = ScriptDirectory.from_config(alembic_config(""))
    return frozenset(revision.revision for revision in script.walk_revisions())


class UnknownRevision(RuntimeError):
    """The database is at a revision this code does not know (a newer release migrated it)."""


def current_revision(database_url: str, *, timeout: float = 5.0) -> str | None:
    """The database's revision (None: never migrated); runs its own loop, like upgrade_head."""
    options: dict[str, Any] = {"poolclass": pool.NullPool}
    if make_url(database_url).get_backend_name() == "postgresql":
        options["connect_args"] = {"timeout": timeout, "command_timeout": timeout}

    async def read() -> str | None:
        engine = create_async_engine(database_url, **options)
        try:
            async with engine.connect() as conn:
                return await conn.run_sync(
                    lambda sync: MigrationContext.configure(sync).get_current_revision()
                )
        finally:
            await engine.dispose()

    return asyncio.run(read())


def migrate(database_url: str, *, timeout: float = 5.0) -> tuple[str | None, str]:
    """Bring the database to head, if it is not there: (the revision it was at, head)."""
    before = current_revision(database_url, timeout=timeout)
    head = head_revision()
    if before == head:
        return before, head
    config = alembic_config(database_url)
    if before is not None:
        try:
            ScriptDirectory.from_config(config).get_revision(before)
        except CommandError:
            raise UnknownRevision(
                f"the database is at revision {before}, which this version of Strawgate does"
                f" not know (its newest is {head}): was it migrated by a newer release?"
            ) from None
    command.upgrade(config, "head")
    return before, head


def upgrade_head(database_url: str) -> None:
    """Apply every pending migration. Runs its own event loop: call it from a worker
    thread (or a CLI), never from inside a running loop. Leaves logging as the caller
    set it up (a server's JSON lines stay JSON: alembic.ini's text handlers are not
    installed)."""
    config = alembic_config(database_url)
    config.attributes["configure_logger"] = False
    command.upgrade(config, "head")


def downgrade_base(database_url: str) -> None:
    command.downgrade(alembic_config(database_url), "base")

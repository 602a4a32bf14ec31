"""Alembic, driven from code: `strawgate migrate`, auto-migration of the embedded default."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from alembic.config import Config
from alembic.script import ScriptDirectory

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


def head_revision() -> str:
    """The revision the code's models are at."""
    head = ScriptDirectory.from_config(alembic_config("")).get_current_head()
    if head is None:  # pragma: no cover - the project always has migrations
        raise RuntimeError("no Alembic revisions found")
    return head


def upgrade_head(database_url: str) -> None:
    """Apply every pending migration. Runs its own event loop: call it from a worker
    thread (or a CLI), never from inside a running loop."""
    command.upgrade(alembic_config(database_url), "head")


def downgrade_base(database_url: str) -> None:
    command.downgrade(alembic_config(database_url), "base")

"""The strawgate command, run as a user runs it: the installed console script, or (where a
test says so) graph.cli.main in the tests' own process (tests/cli.py: a process costs about
a second)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from sqlalchemy import inspect
from sqlalchemy.ext.asyncio import create_async_engine

from db.migrate import upgrade_head
from graph.schema import schema_sdl
from tests.cli import run_strawgate

STRAWGATE = str(Path(sys.executable).with_name("strawgate"))


def run(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL",)}
    environment.update(env)
    return subprocess.run(
        [STRAWGATE, *args], cwd=cwd, env=environment, capture_output=True, text=True, timeout=60
    )


def run_here(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """`strawgate ARGS` in this process (tests/cli.py), with no setting but `env`: its exit
    status and output as `run` gives them."""
    code, out, err = run_strawgate(*args, cwd=cwd, **env)
    return subprocess.CompletedProcess([STRAWGATE, *args], code, out, err)


def test_export_schema_writes_the_schema(tmp_path: Path) -> None:
    done = run("export-schema", "--output", "out.graphql", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out.graphql").read_text(encoding="utf-8") == schema_sdl()
    printed = run_here("export-schema", "-o", "-", cwd=tmp_path)
    assert printed.stdout == schema_sdl()


async def test_migrate_creates_the_tables(tmp_path: Path) -> None:
    import asyncio

    url = f"sqlite+aiosqlite:///{tmp_path}/data/strawgate.db"
    done = await asyncio.to_thread(run, "migrate", cwd=tmp_path, DATABASE_URL=url)
    assert done.returncode == 0, done.stderr
    engine = create_async_engine(url)
    async with engine.connect() as conn:
        names = await conn.run_sync(lambda sync: set(inspect(sync).get_table_names()))
    await engine.dispose()
    assert {"users", "sessions", "refresh_tokens", "alembic_version"} <= names


def test_serve_refuses_workers_on_sqlite(tmp_path: Path) -> None:
    done = run("serve", "--workers", "2", cwd=tmp_path, ENVIRONMENT="development")
    assert done.returncode == 2
    assert "SQLite" in done.stderr


def test_serve_refuses_workers_without_redis(tmp_path: Path, database_url: str) -> None:
    """Each process would keep its own counters: every budget times the workers."""
    done = run(
        "serve",
        "--workers",
        "2",
        cwd=tmp_path,
        ENVIRONMENT="development",
        DATABASE_URL=database_url,
    )
    assert done.returncode == 2
    assert "REDIS_URL" in done.stderr


async def test_rotate_keys_reencrypts_every_secret(tmp_path: Path) -> None:
    """Old key A encrypted the secrets; with "B,A" configured, rotate-keys re-encrypts them
    under B, after which B alone opens them and A alone does not."""
    import asyncio
    import uuid
    from datetime import UTC, datetime

    from cryptography.fernet import Fernet
    from sqlalchemy import select

    from db.models import TotpCredential, User
    from db.security.box import SecretBox

    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    url = f"sqlite+aiosqlite:///{tmp_path}/strawgate.db"
    await asyncio.to_thread(upgrade_head, url)  # `strawgate migrate`: its own test, above
    engine = create_async_engine(url)
    now = datetime.now(UTC)
    user_id = uuid.uuid4()
    async with engine.begin() as conn:
        await conn.execute(
            User.__table__.insert().values(  # type: ignore[attr-defined]
                id=user_id,
                email="a@example.com",
                email_normalized="a@example.com",
                password_hash="x",
                is_active=True,
                created_at=now,
                updated_at=now,
            )
        )
        await conn.execute(
            TotpCredential.__table__.insert().values(  # type: ignore[attr-defined]
                user_id=user_id,
                secret_sealed=SecretBox([old]).seal("JBSWY3DPEHPK3PXP"),
                created_at=now,
            )
        )
    done = await asyncio.to_thread(
        run_here,
        "rotate-keys",
        cwd=tmp_path,
        DATABASE_URL=url,
        ENVIRONMENT="development",
        SECRET_KEY="k" * 40,
        ENCRYPTION_KEYS=f"{new},{old}",
    )
    assert done.returncode == 0, done.stderr
    assert "re-encrypted 1 secret" in done.stdout
    async with engine.connect() as conn:
        sealed = (await conn.execute(select(TotpCredential.secret_sealed))).scalar_one()
    await engine.dispose()
    assert SecretBox([new]).open(sealed) == "JBSWY3DPEHPK3PXP"
    try:
        SecretBox([old]).open(sealed)
    except ValueError:
        pass
    else:
        raise AssertionError("the old key still opens the re-encrypted secret")


async def test_rotate_keys_reencrypts_queued_mails(tmp_path: Path) -> None:
    """A queued mail's secrets (its code) are covered too: re-encrypted under the new key;
    one that no configured key opens is left alone and reported with exit status 1."""
    import asyncio
    import uuid
    from datetime import UTC, datetime, timedelta

    from cryptography.fernet import Fernet
    from sqlalchemy import select

    from db.models import OutboxMail
    from db.security.box import SecretBox

    old, new, lost = (Fernet.generate_key().decode() for _ in range(3))
    url = f"sqlite+aiosqlite:///{tmp_path}/strawgate.db"
    await asyncio.to_thread(upgrade_head, url)  # `strawgate migrate`: its own test, above
    engine = create_async_engine(url)
    now = datetime.now(UTC)
    readable, unreadable = uuid.uuid4(), uuid.uuid4()

    async def queue(mail_id: uuid.UUID, sealed: str) -> None:
        async with engine.begin() as conn:
            await conn.execute(
                OutboxMail.__table__.insert().values(  # type: ignore[attr-defined]
                    id=mail_id,
                    recipient="a@example.com",
                    template="code",
                    context="{}",
                    secrets_sealed=sealed,
                    secrets_expire_at=now + timedelta(minutes=10),
                    created_at=now,
                    next_attempt_at=now,
                    attempts=0,
                )
            )

    async def sealed_of(mail_id: uuid.UUID) -> str:
        async with engine.connect() as conn:
            found = await conn.execute(
                select(OutboxMail.secrets_sealed).where(OutboxMail.id == mail_id)
            )
            return str(found.scalar_one())

    def rotate() -> subprocess.CompletedProcess[str]:
        return run_here(
            "rotate-keys",
            cwd=tmp_path,
            DATABASE_URL=url,
            ENVIRONMENT="development",
            SECRET_KEY="k" * 40,
            ENCRYPTION_KEYS=f"{new},{old}",
        )

    try:
        await queue(readable, SecretBox([old]).seal('{"code": "123456"}'))
        done = await asyncio.to_thread(rotate)
        assert done.returncode == 0, done.stderr
        assert "re-encrypted 1 queued mail" in done.stdout
        sealed = await sealed_of(readable)
        assert SecretBox([new]).open(sealed) == '{"code": "123456"}'
        try:
            SecretBox([old]).open(sealed)
        except ValueError:
            pass
        else:
            raise AssertionError("the old key still opens the re-encrypted mail")

        await queue(unreadable, SecretBox([lost]).seal('{"code": "654321"}'))
        before = await sealed_of(unreadable)
        done = await asyncio.to_thread(rotate)
        assert done.returncode == 1
        assert "1 queued mail(s) could not be decrypted" in done.stderr
        assert "re-encrypted 1 queued mail" in done.stdout  # the readable one, again
        assert await sealed_of(unreadable) == before
    finally:
        await engine.dispose()

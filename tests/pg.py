"""PostgreSQL for the tests: the one configured, the machine's own, or a throwaway cluster.

Order: TEST_DATABASE_URL (an admin URL of a server the tests may create databases on);
else PostgreSQL on 127.0.0.1:5432 (user postgres); else a private cluster started from
local binaries (initdb + pg_ctl, as a non-root user: PostgreSQL refuses to run as root).
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg

NO_POSTGRES = (
    "No PostgreSQL for the tests: set TEST_DATABASE_URL to an admin URL "
    "(postgresql://user@host:port/db), run a server on 127.0.0.1:5432 that user postgres "
    "can reach, or install the PostgreSQL server binaries (initdb, pg_ctl; Debian: "
    "apt-get install postgresql) so the tests can start a throwaway cluster."
)


def find_pg_bin() -> Path | None:
    """The folder with initdb and pg_ctl, newest version first."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).parent
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if Path(folder, "initdb").exists() and Path(folder, "pg_ctl").exists():
            return Path(folder)
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def can_connect(dsn: str, wait: float = 2.0) -> bool:
    try:
        conn = await asyncpg.connect(dsn, timeout=wait)
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return False
    await conn.close()
    return True


@dataclass
class PrivateCluster:
    """A PostgreSQL cluster of the tests' own, in a temporary folder, on a free port."""

    bin_dir: Path
    root: Path
    port: int
    user: str | None  # run as this OS user (when the tests run as root)

    @classmethod
    def create(cls) -> PrivateCluster:
        bin_dir = find_pg_bin()
        if bin_dir is None:
            raise RuntimeError(NO_POSTGRES)
        user = None
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgres")
            except KeyError as exc:
                raise RuntimeError(
                    "Running as root and there is no 'postgres' user to run a throwaway "
                    "PostgreSQL cluster as (PostgreSQL refuses to run as root)."
                ) from exc
            user = "postgres"
        root = Path(tempfile.mkdtemp(prefix="strawgate-pg-"))
        if user is not None:
            entry = pwd.getpwnam(user)
            os.chown(root, entry.pw_uid, entry.pw_gid)
        cluster = cls(bin_dir=bin_dir, root=root, port=free_port(), user=user)
        cluster._run(
            "initdb",
            "-D",
            str(cluster.data),
            "-U",
            "postgres",
            "-A",
            "trust",
            "--no-sync",
            "-E",
            "UTF8",
            "--locale",
            "C",
        )
        return cluster

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        command = [str(self.bin_dir / tool), *args]
        if self.user is not None:
            command = ["runuser", "-u", self.user, "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=60)

    def start(self) -> None:
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.root / "log"),
            "-o",
            options,
            "-w",
            "-t",
            "30",
            "start",
        )

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "30", "stop")

    def destroy(self) -> None:
        try:
            self.stop()
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.root, ignore_errors=True)


def wait_until(predicate: object, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


LOCAL = "postgresql://postgres@127.0.0.1:5432/postgres"


def choose() -> tuple[str, str | None]:
    """Which PostgreSQL the tests use, in the order above: ("TEST_DATABASE_URL", its URL),
    ("local", LOCAL) or ("cluster", None)."""
    configured = os.environ.get("TEST_DATABASE_URL")
    if configured:
        return "TEST_DATABASE_URL", configured
    if asyncio.run(can_connect(LOCAL)):
        return "local", LOCAL
    return "cluster", None


def provision() -> tuple[str, PrivateCluster | None]:
    """An admin URL (asyncpg form) of a server the tests may create databases on."""
    kind, url = choose()
    if url is not None:
        if kind == "TEST_DATABASE_URL" and not asyncio.run(can_connect(url)):
            raise RuntimeError(f"TEST_DATABASE_URL is set but cannot be reached. {NO_POSTGRES}")
        return url, None
    cluster = PrivateCluster.create()
    cluster.start()
    return cluster.admin_url, cluster


def describe() -> str:
    """One line naming the PostgreSQL the tests use (a password shown as ***), for the
    start of a test run."""
    kind, url = choose()
    if kind == "TEST_DATABASE_URL" and url is not None:
        reached = asyncio.run(can_connect(url))
        state = "" if reached else " (CANNOT BE REACHED: the tests that need it stop the run)"
        return f"PostgreSQL: TEST_DATABASE_URL, {masked(url)}{state}"
    if kind == "local":
        return f"PostgreSQL: the local server, {LOCAL}"
    bin_dir = find_pg_bin()
    if bin_dir is None:
        return f"PostgreSQL: NONE. {NO_POSTGRES}"
    return (
        f"PostgreSQL: a throwaway cluster (initdb and pg_ctl from {bin_dir}), started "
        "when a test first needs it"
    )


def masked(url: str) -> str:
    """`url` with its password as ***."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "(a URL that does not parse)"


async def admin_execute(admin_url: str, sql: str) -> None:
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@contextlib.contextmanager
def scratch_database(admin_url: str, prefix: str) -> Iterator[str]:
    """A new, empty database on the server of `admin_url` (its SQLAlchemy URL), dropped after."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    asyncio.run(admin_execute(admin_url, f'CREATE DATABASE "{name}"'))
    try:
        yield sqlalchemy_url(admin_url, name)
    finally:
        asyncio.run(admin_execute(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def sqlalchemy_url(dsn: str, database: str) -> str:
    """The asyncpg URL SQLAlchemy takes, for `database` on the server of `dsn`."""
    from sqlalchemy.engine import make_url

    url = make_url(dsn).set(drivername="postgresql+asyncpg", database=database)
    return url.render_as_string(hide_password=False)

"""The engine factory (with the SQLite settings that make it safe to share) and the
statement runner of the request path."""

from __future__ import annotations

import contextlib
import errno
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Protocol

import asyncpg
from sqlalchemy import event, func, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError, IntegrityError
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    create_async_engine,
)
from sqlalchemy.sql import Executable, Select
from sqlalchemy.sql.dml import UpdateBase

from db.errors import UniqueViolation
from db.settings import Settings

SQLALCHEMY_POOL_SIZE = 5
READ_ONLY = "strawgate_read_only"  # an execution option: see _make_sqlite_transactional
# URL options SQLAlchemy's asyncpg dialect takes for itself rather than passing on.
_SQLALCHEMY_ONLY_OPTIONS = (
    "prepared_statement_cache_size",
    "prepared_statement_name_func",
    "async_creator_fn",
)


class DatabaseUnreachable(RuntimeError):
    """No connection to DATABASE_URL's database; the message says where and why."""


def describe_database(database_url: str) -> str:
    """Where DATABASE_URL points, without its password: "host h, port 5432, database d, role r"."""
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        if not url.database or url.database == ":memory:":
            return "SQLite in memory"
        return f"SQLite file {url.database}"
    hosts = url.query.get("host")
    if hosts:
        host = ", ".join(hosts) if isinstance(hosts, tuple) else hosts
        where = f"hosts {host}" if isinstance(hosts, tuple) else f"host {host}"
    else:
        where = f"host {url.host or '(local socket)'}, port {url.port or 5432}"
    role = url.username or "(PGUSER or the system user)"
    return f"{where}, database {url.database or url.username or '(same as role)'}, role {role}"


_REFUSED_TEXT = f"[Errno {errno.ECONNREFUSED}]"
_POSTGRES_REASONS: tuple[tuple[type[BaseException], str], ...] = (
    (asyncpg.InvalidCatalogNameError, "database does not exist"),
    (asyncpg.InvalidAuthorizationSpecificationError, "authentication failed"),
    (asyncpg.TooManyConnectionsError, "too many connections"),
    (asyncpg.CannotConnectNowError, "server not accepting connections"),
    (asyncpg.AdminShutdownError, "server not accepting connections"),
    (asyncpg.PostgresConnectionError, "connection failed"),
    (asyncpg.ClientConfigurationError, "client configuration"),
)


def connection_problem(exc: BaseException | None) -> tuple[str, str] | None:
    """(short reason, the driver's words) when `exc` comes of a failed connection, else None."""
    seen = 0
    while exc is not None and seen < 8:
        found = _connection_reason(exc)
        if found is not None:
            return found
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


def _connection_reason(exc: BaseException) -> tuple[str, str] | None:
    text = " ".join(str(exc).split()) or type(exc).__name__
    for kind, reason in _POSTGRES_REASONS:
        if isinstance(exc, kind):
            return reason, text
    if isinstance(exc, TimeoutError):
        return "timed out", "no answer within DB_TIMEOUT"
    if isinstance(exc, socket.gaierror):
        return "host not found", f"host not found ({exc.strerror or text})"
    if isinstance(exc, ssl.SSLError):
        return "TLS failed", f"TLS failed ({text})"
    if isinstance(exc, ConnectionRefusedError) or (
        isinstance(exc, OSError) and _REFUSED_TEXT in text
    ):
        return "connection refused", "connection refused (nothing accepts connections there)"
    if isinstance(exc, OSError):
        return "cannot connect", text
    if isinstance(exc, DBAPIError) and "unable to open database file" in text:
        return "cannot open the file", "unable to open database file"
    return None


def database_unreachable(database_url: str, exc: BaseException) -> DatabaseUnreachable | None:
    """The one-line error for a failure to connect (see connection_problem), else None."""
    found = connection_problem(exc)
    if found is None:
        return None
    return DatabaseUnreachable(
        f"cannot reach the database ({describe_database(database_url)}): {found[1]}"
    )


def create_engine(settings: Settings, **overrides: Any) -> AsyncEngine:
    url = make_url(settings.database_url)
    if url.get_backend_name() == "sqlite":
        path = settings.sqlite_path()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(
            url,
            connect_args={"timeout": settings.db_timeout},
            hide_parameters=True,
            pool_timeout=settings.db_timeout,
            **overrides,
        )
        _make_sqlite_transactional(engine, busy_timeout_ms=int(settings.db_timeout * 1000))
        return engine
    options: dict[str, Any] = {
        # Statement parameters hold digests and hashes: keep them out of error messages.
        "hide_parameters": True,
        # The request path runs on Statements' own pool; SQLAlchemy's serves the rest
        # (readiness aside, nothing on the hot path), so it stays small.
        "pool_size": SQLALCHEMY_POOL_SIZE,
        "max_overflow": SQLALCHEMY_POOL_SIZE,
        "pool_timeout": settings.db_timeout,
        "connect_args": {
            "timeout": settings.db_timeout,
            "command_timeout": settings.db_timeout,
            "server_settings": {"application_name": "strawgate"},
        },
    }
    options.update(overrides)
    engine = create_async_engine(url, **options)
    _ping_on_checkout(engine)
    return engine


def _ping_on_checkout(engine: AsyncEngine) -> None:
    """A pre-ping without a round trip: a connection whose socket the server closed (a
    restart, a failover) is replaced on checkout, so the process recovers by itself when
    PostgreSQL comes back. SQLAlchemy's pool_pre_ping would cost a round trip on every
    request; a connection that dies unnoticed still fails one query, which SQLAlchemy
    recognises as a disconnect and answers by refreshing the whole pool."""

    @event.listens_for(engine.sync_engine, "checkout")
    def _on_checkout(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
        if dbapi_connection.driver_connection.is_closed():
            raise DisconnectionError("connection closed by the server")


class Runner(Protocol):
    """Runs fixed Core statements inside one connection (and transaction, if begun)."""

    async def first(
        self, statement: Executable, params: Mapping[str, Any]
    ) -> Mapping[str, Any] | None: ...

    async def execute(self, statement: Executable, params: Mapping[str, Any]) -> int:
        """Runs a write; the number of rows it touched. A unique constraint that stops it
        raises UniqueViolation."""
        ...

    async def scalars(self, statement: Executable, params: Mapping[str, Any]) -> list[Any]:
        """The first column of every row."""
        ...

    async def all(
        self, statement: Executable, params: Mapping[str, Any]
    ) -> list[Mapping[str, Any]]: ...

    async def execute_together(
        self, writes: Writes, params: Mapping[str, Any]
    ) -> Mapping[str, Any] | None:
        """Runs `writes` (see Writes) with `params`, in one round trip on PostgreSQL; the
        row its `before` read found, or the writes' row counts where they are `counted`
        (None otherwise)."""
        ...


class Writes:
    """Writes that go together on a hot path, run in one round trip on PostgreSQL: as one
    statement, the first ones as data-modifying WITH queries of the last. SQLite, which
    has no such queries, runs them one after another. Parameters are shared by name.

    Only for writes that are independent of each other: in one PostgreSQL statement they
    all see the database as it was before any of them (none sees another's rows), their
    order is not defined, and no two may touch the same row. Like every statement here,
    a module-level constant (the combined form is compiled once).

    `before`: a read that goes with them and sees the database as it was before them (on
    PostgreSQL the statement itself, the writes its WITH queries; on SQLite it runs
    first); execute_together answers its first row.

    `counted`: execute_together answers how many rows each write touched, as `write_1`,
    `write_2`, ... in the order given (each must have a RETURNING clause), for writes that
    must all have found their row: a caller that finds one short rolls back.
    """

    def __init__(
        self,
        *statements: UpdateBase,
        before: Select[Any] | None = None,
        counted: bool = False,
    ) -> None:
        if len(statements) < (1 if before is not None else 2):
            raise ValueError("Writes needs two statements or more, or one and a read")
        if counted and before is not None:
            raise ValueError("Writes answers a read or the writes' counts, not both")
        if counted and not all(s.returning_column_descriptions for s in statements):
            raise ValueError("counted Writes need a RETURNING clause on every statement")
        # Each with the names of its own parameters: SQLAlchemy would take another
        # statement's parameter named like a column of this one's table as a value to set.
        self.statements = [
            (statement, frozenset(statement.compile().params)) for statement in statements
        ]
        self.before = None if before is None else (before, frozenset(before.compile().params))
        self.counted = counted
        if counted:
            written = [statement.cte(f"write_{n}") for n, statement in enumerate(statements, 1)]
            self.combined: Executable = select(
                *(
                    select(func.count()).select_from(cte).scalar_subquery().label(cte.name)
                    for cte in written
                )
            )
        elif before is not None:
            self.combined = before.add_cte(
                *(statement.cte(f"write_{n}") for n, statement in enumerate(statements, 1))
            )
        else:
            *first, last = statements
            self.combined = last.add_cte(
                *(statement.cte(f"write_{n}") for n, statement in enumerate(first, 1))
            )


class Statements:
    """Fixed SQLAlchemy Core statements on the request path, run as lean as each database
    allows: every authenticated request runs one, every refresh a handful.

    On PostgreSQL each statement is compiled once (SQLAlchemy's own SQL) and run as a
    prepared statement on a connection of an asyncpg pool of its own, with the
    parameters bound by asyncpg: SQLAlchemy's per-execution parameter and result
    processing, and its pool's checkout, cost more than the queries themselves (see
    bench/README.md). The values involved are driver-native (aware datetimes, UUIDs,
    bytes, text), so nothing is lost by skipping the type processors. A read outside a
    transaction runs without BEGIN and ROLLBACK round trips. SQLite runs the same
    statements through SQLAlchemy (its BEGIN IMMEDIATE is what orders them behind
    writers).

    Statements must be module-level constants with bindparam() placeholders: compiled
    forms are kept per statement object. `start()` and `close()` bracket its use.
    """

    def __init__(self, engine: AsyncEngine, *, pool_size: int = 10, timeout: float = 5.0) -> None:
        self.engine = engine
        self._native = engine.dialect.name == "postgresql"
        self._compiled: dict[Executable, tuple[str, list[str], dict[str, Any]]] = {}
        self._pool_size = pool_size
        self._timeout = timeout
        self._pool: asyncpg.Pool | None = None

    async def start(self) -> None:
        """Opens the PostgreSQL pool (lazily connecting: the server may be down now)."""
        if self._native and self._pool is None:
            # DATABASE_URL read the way SQLAlchemy reads it (?ssl=require and the like).
            args, options = self.engine.dialect.create_connect_args(self.engine.url)
            for sqlalchemy_only in _SQLALCHEMY_ONLY_OPTIONS:
                options.pop(sqlalchemy_only, None)
            self._pool = await asyncpg.create_pool(
                *args,
                **options,
                min_size=0,
                max_size=self._pool_size,
                timeout=self._timeout,  # to connect
                command_timeout=self._timeout,
                reset=_rollback_if_needed,
                server_settings={"application_name": "strawgate"},
            )

    @contextlib.asynccontextmanager
    async def listen(self, channel: str, callback: Callable[[], None]) -> AsyncIterator[Listening]:
        """PostgreSQL LISTEN on a connection of its own (outside the pool, which hands
        connections around): `callback` runs on every notification on `channel`, and once
        more if the connection drops. Reconnecting is the caller's job (`alive` tells).
        Raises NotImplementedError on SQLite, which has no notifications."""
        if not self._native:
            raise NotImplementedError("LISTEN/NOTIFY needs PostgreSQL")
        args, options = self.engine.dialect.create_connect_args(self.engine.url)
        for sqlalchemy_only in _SQLALCHEMY_ONLY_OPTIONS:
            options.pop(sqlalchemy_only, None)
        driver = await asyncpg.connect(
            *args,
            **options,
            timeout=self._timeout,
            command_timeout=self._timeout,
            server_settings={"application_name": "strawgate"},
        )

        def notified(*_args: object) -> None:
            callback()

        try:
            driver.add_termination_listener(notified)
            await driver.add_listener(channel, notified)
            yield Listening(driver)
        finally:
            driver.remove_termination_listener(notified)  # a close on purpose is no drop
            if not driver.is_closed():
                try:
                    await driver.close(timeout=self._timeout)
                except (OSError, asyncpg.PostgresError, TimeoutError):
                    driver.terminate()

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    def pool_use(self) -> tuple[int, int]:
        """(open, idle) connections of the request path's pool (0, 0 on SQLite)."""
        if self._pool is None:
            return 0, 0
        return self._pool.get_size(), self._pool.get_idle_size()

    def _require_pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("Statements.start() was not awaited")
        return self._pool

    def bind(self, statement: Executable, params: Mapping[str, Any]) -> tuple[str, list[Any]]:
        """The statement's SQL and its positional arguments: `params`, and the values the
        statement carries itself (a LIMIT, say)."""
        found = self._compiled.get(statement)
        if found is None:
            compiled = statement.compile(dialect=self.engine.dialect)  # type: ignore[attr-defined]
            prefetch = [*compiled.insert_prefetch, *compiled.update_prefetch]
            if prefetch:
                # Python-side column defaults are computed by SQLAlchemy's execution, which
                # this path skips: give such columns in the statement, or a server default.
                columns = ", ".join(sorted(str(column) for column in prefetch))
                raise ValueError(f"the statement relies on Python-side defaults: {columns}")
            own = {
                name: bind.effective_value
                for name, bind in compiled.binds.items()
                if not bind.required  # a bindparam() without a value must be given
            }
            found = (str(compiled), list(compiled.positiontup or ()), own)
            self._compiled[statement] = found
        sql, names, own = found
        return sql, [params[name] if name in params else own[name] for name in names]

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[Runner]:
        """For reads only: no transaction on PostgreSQL, a read transaction on SQLite
        (rolled back at the end: a write made here would be lost)."""
        if self._native:
            async with self._require_pool().acquire(timeout=self._timeout) as driver:
                yield _NativeRunner(self, driver)
        else:
            async with self.engine.connect() as conn:
                await conn.execution_options(**{READ_ONLY: True})
                yield _SqlalchemyRunner(conn)

    @contextlib.asynccontextmanager
    async def standalone(self) -> AsyncIterator[Runner]:
        """For one write that needs no transaction around it: on PostgreSQL a statement
        outside a transaction commits by itself (atomic, and no BEGIN and COMMIT round
        trips); on SQLite a write transaction, as `transaction()`. Each statement run
        here commits on its own: never for two that must go together."""
        if self._native:
            async with self._require_pool().acquire(timeout=self._timeout) as driver:
                yield _NativeRunner(self, driver)
        else:
            async with self.engine.begin() as conn:
                yield _SqlalchemyRunner(conn)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Runner]:
        """Committed when the block ends, rolled back when it raises."""
        if self._native:
            async with self._require_pool().acquire(timeout=self._timeout) as driver:
                async with driver.transaction():
                    yield _NativeRunner(self, driver)
        else:
            async with self.engine.begin() as conn:
                yield _SqlalchemyRunner(conn)


class Listening:
    """A LISTEN in place (see Statements.listen)."""

    def __init__(self, driver: asyncpg.Connection) -> None:
        self._driver = driver

    @property
    def alive(self) -> bool:
        """False once the connection is gone: notifications no longer arrive."""
        return not self._driver.is_closed()


async def _rollback_if_needed(connection: asyncpg.Connection) -> None:
    """What a connection needs before it goes back to the pool. asyncpg's default reset
    costs a round trip on every release (it clears session state that this code never
    sets); a transaction left open by a cancelled request is all there can be."""
    if connection.is_in_transaction():
        await connection.execute("ROLLBACK")


class _NativeRunner:
    def __init__(self, statements: Statements, driver: Any) -> None:
        self._statements = statements
        self._driver = driver

    async def first(
        self, statement: Executable, params: Mapping[str, Any]
    ) -> Mapping[str, Any] | None:
        sql, args = self._statements.bind(statement, params)
        row = await self._driver.fetchrow(sql, *args)
        return None if row is None else dict(row.items())

    async def scalars(self, statement: Executable, params: Mapping[str, Any]) -> list[Any]:
        sql, args = self._statements.bind(statement, params)
        return [row[0] for row in await self._driver.fetch(sql, *args)]

    async def all(
        self, statement: Executable, params: Mapping[str, Any]
    ) -> list[Mapping[str, Any]]:
        sql, args = self._statements.bind(statement, params)
        return [dict(row.items()) for row in await self._driver.fetch(sql, *args)]

    async def execute(self, statement: Executable, params: Mapping[str, Any]) -> int:
        sql, args = self._statements.bind(statement, params)
        try:
            status: str = await self._driver.execute(sql, *args)
        except asyncpg.UniqueViolationError as exc:
            raise UniqueViolation(exc.constraint_name) from exc
        # The command tag: "UPDATE 3", "INSERT 0 1", "DELETE 0".
        return int(status.rsplit(" ", 1)[-1]) if status[-1:].isdigit() else 0

    async def execute_together(
        self, writes: Writes, params: Mapping[str, Any]
    ) -> Mapping[str, Any] | None:
        if writes.before is None and not writes.counted:
            await self.execute(writes.combined, params)
            return None
        try:
            return await self.first(writes.combined, params)
        except asyncpg.UniqueViolationError as exc:  # as execute() says it
            raise UniqueViolation(exc.constraint_name) from exc


class _SqlalchemyRunner:
    def __init__(self, conn: AsyncConnection) -> None:
        self._conn = conn

    async def first(
        self, statement: Executable, params: Mapping[str, Any]
    ) -> Mapping[str, Any] | None:
        found = (await self._conn.execute(statement, dict(params))).mappings().first()
        return None if found is None else dict(found)

    async def scalars(self, statement: Executable, params: Mapping[str, Any]) -> list[Any]:
        return list((await self._conn.execute(statement, dict(params))).scalars().all())

    async def all(
        self, statement: Executable, params: Mapping[str, Any]
    ) -> list[Mapping[str, Any]]:
        result = await self._conn.execute(statement, dict(params))
        return [dict(row) for row in result.mappings().all()]

    async def execute(self, statement: Executable, params: Mapping[str, Any]) -> int:
        try:
            result = await self._conn.execute(statement, dict(params))
        except IntegrityError as exc:
            if "unique" in str(exc.orig).lower():
                raise UniqueViolation(str(exc.orig)) from exc
            raise
        return int(result.rowcount)

    async def execute_together(
        self, writes: Writes, params: Mapping[str, Any]
    ) -> Mapping[str, Any] | None:
        found: dict[str, Any] | None = None
        if writes.before is not None:
            read, names = writes.before
            row = await self.first(read, {n: params[n] for n in names if n in params})
            found = None if row is None else dict(row)
        elif writes.counted:
            found = {}
        for n, (statement, names) in enumerate(writes.statements, 1):
            own = {name: params[name] for name in names if name in params}
            if writes.counted:
                assert found is not None  # noqa: S101 - set above
                try:
                    found[f"write_{n}"] = len(await self.all(statement, own))
                except IntegrityError as exc:  # as execute() says it
                    if "unique" in str(exc.orig).lower():
                        raise UniqueViolation(str(exc.orig)) from exc
                    raise
            else:
                await self.execute(statement, own)
        return found


def _make_sqlite_transactional(engine: AsyncEngine, *, busy_timeout_ms: int) -> None:
    """SQLite drops FOR UPDATE silently: without a write lock taken at BEGIN, two
    concurrent read-modify-write transactions lose an update. SQLAlchemy's pysqlite
    recipe: let SQLAlchemy emit BEGIN itself, and make it BEGIN IMMEDIATE."""

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # the driver emits no BEGIN of its own
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {busy_timeout_ms}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        # A read-only connection (Statements.connection) takes no write lock: in WAL mode
        # readers then neither wait for writers nor hold them up.
        read_only = conn.get_execution_options().get(READ_ONLY, False)
        conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

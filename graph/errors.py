"""What a client sees of a failure: expected ones are data, the rest are masked and logged."""

from __future__ import annotations

import logging

from graphql import GraphQLError
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from db.security.box import UndecryptableSecret
from db.security.claims_hook import ClaimsHookFailed
from db.session import connection_problem, describe_database

log = logging.getLogger("strawgate.errors")

SERVICE_UNAVAILABLE = "SERVICE_UNAVAILABLE"
INTERNAL_SERVER_ERROR = "INTERNAL_SERVER_ERROR"

try:  # asyncpg is the production driver; its connection errors mean "database away"
    import asyncpg

    _ASYNCPG_UNAVAILABLE: tuple[type[BaseException], ...] = (
        asyncpg.PostgresConnectionError,
        asyncpg.CannotConnectNowError,
        asyncpg.InterfaceError,
    )
except ImportError:  # pragma: no cover
    _ASYNCPG_UNAVAILABLE = ()

_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OperationalError,
    InterfaceError,
    PoolTimeoutError,
    TimeoutError,
    OSError,  # ConnectionRefusedError and friends
    *_ASYNCPG_UNAVAILABLE,
)


# PostgreSQL's error codes that mean "cannot serve this now, try again": connection
# exceptions (class 08), a refused sign-in (class 28: unknown role, wrong password) or an
# unknown database (3D000), both of a DATABASE_URL the operator fixes, insufficient
# resources (class 53: too many connections, out of memory or disk), shutdowns and
# start-ups (57P01-57P03), a read-only standby after a failover (25006), and the
# transaction conflicts a retry resolves (40001, 40P01).
_RETRYABLE_SQLSTATE_CLASSES = ("08", "28", "53")
_RETRYABLE_SQLSTATES = {"3D000", "57P01", "57P02", "57P03", "25006", "40001", "40P01"}


def is_database_unavailable(exc: BaseException | None) -> bool:
    """True for failures that mean the database cannot serve the request right now."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, _UNAVAILABLE):
            return True
        if isinstance(exc, DBAPIError) and exc.connection_invalidated:
            return True
        sqlstate = getattr(exc, "sqlstate", None)
        if isinstance(sqlstate, str) and (
            sqlstate[:2] in _RETRYABLE_SQLSTATE_CLASSES or sqlstate in _RETRYABLE_SQLSTATES
        ):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def is_missing_table(exc: BaseException | None) -> bool:
    """True when a statement failed because its table does not exist (a schema never migrated)."""
    seen = 0
    while exc is not None and seen < 8:
        if getattr(exc, "sqlstate", None) == "42P01" or "no such table" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


class DatabaseWatch:
    """The database as the last look found it, logged (without a password) when that changes."""

    def __init__(self, database_url: str) -> None:
        self.where = describe_database(database_url)
        self._state: str | None = None  # None: reachable and at the code's schema
        # The database's revision when a newer release migrated it (ready all the same).
        self.ahead: str | None = None

    def unreachable(self, exc: BaseException) -> str:
        """Logs a failure to reach the database; its short reason, for /readyz."""
        problem = connection_problem(exc)
        reason, words = problem if problem else ("unavailable", type(exc).__name__)
        if self._state != f"unreachable: {words}":
            self._state = f"unreachable: {words}"
            log.error(
                "Database unreachable (%s): %s; not ready until it answers (/readyz answers"
                " 503; every /readyz and request tries again)",
                self.where,
                words,
            )
        return reason

    def behind(self, head: str) -> None:
        """Logs a schema that is not the code's."""
        if self._state != "behind":
            self._state = "behind"
            log.warning(
                "Not ready: the database schema is not at %s (%s); run strawgate migrate",
                head,
                self.where,
            )

    def newer(self, revision: str, head: str) -> None:
        """Logs a schema newer than the code's: a newer release migrated the database while
        this process still serves (a rolling deploy). Ready: migrations keep the previous
        release working (docs/operating/deploying.md)."""
        self.ahead = revision
        if self._state != f"ahead: {revision}":
            self._state = f"ahead: {revision}"
            log.warning(
                "The database schema (%s) is newer than this build's (%s): a newer release"
                " migrated it; serving on (%s); replace this process with the newer release",
                revision,
                head,
                self.where,
            )

    def ready(self) -> None:
        """Logs the database's return when it was unreachable or behind."""
        self.ahead = None
        if self._state is not None:
            self._state = None
            log.info("Database ready again (%s)", self.where)


def is_undecryptable(exc: BaseException | None) -> bool:
    """True when a secret at rest could not be decrypted with any of ENCRYPTION_KEYS."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, UndecryptableSecret):
            return True
        exc = exc.__cause__
        seen += 1
    return False


def present_errors(errors: list[GraphQLError], *, request_id: str) -> list[object]:
    """The errors as the client gets them. Validation, permission and other deliberate
    GraphQL errors pass as they are; database outages and secrets that ENCRYPTION_KEYS
    cannot decrypt become SERVICE_UNAVAILABLE; every other exception is logged with its
    traceback and shown only as a request id."""
    out: list[object] = []
    for error in errors:
        original = error.original_error
        if original is None or isinstance(original, GraphQLError):
            out.append(error.formatted)
            continue
        if is_undecryptable(original):
            # A process without the key list that encrypted the secret (a rotation that
            # reached some processes only): nothing of the secret is logged.
            log.error(
                "a secret cannot be decrypted with ENCRYPTION_KEYS (request %s): deploy the"
                " key list that encrypted it to every process, then run strawgate rotate-keys",
                request_id,
            )
            message = "The service is temporarily unavailable; try again shortly."
            code = SERVICE_UNAVAILABLE
        elif isinstance(original, ClaimsHookFailed):
            # Logged where it failed, with why; the change it would have finished rolled back.
            log.warning("request %s failed closed: %s", request_id, original)
            message = "The service is temporarily unavailable; try again shortly."
            code = SERVICE_UNAVAILABLE
        elif is_database_unavailable(original):
            problem = connection_problem(original)
            log.warning(
                "database unavailable (request %s): %s",
                request_id,
                problem[1] if problem else type(original).__name__,
            )
            message = "The service is temporarily unavailable; try again shortly."
            code = SERVICE_UNAVAILABLE
        else:
            log.error("unexpected error (request %s)", request_id, exc_info=original)
            # Masked in every environment: no traceback, SQL or driver name reaches a client.
            message = "Internal server error."
            code = INTERNAL_SERVER_ERROR
        formatted = GraphQLError(
            message,
            nodes=error.nodes,
            path=error.path,
            extensions={"code": code, "requestId": request_id},
        ).formatted
        out.append(formatted)
    return out

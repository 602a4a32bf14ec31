"""What a client sees of a failure: expected ones are data, the rest are masked and logged."""

from __future__ import annotations

import logging

from graphql import GraphQLError
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from db.security.box import UndecryptableSecret

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
# exceptions (class 08), insufficient resources (class 53: too many connections, out of
# memory or disk), shutdowns and start-ups (57P01-57P03), a read-only standby after a
# failover (25006), and the transaction conflicts a retry resolves (40001, 40P01).
_RETRYABLE_SQLSTATE_CLASSES = ("08", "53")
_RETRYABLE_SQLSTATES = {"57P01", "57P02", "57P03", "25006", "40001", "40P01"}


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
        elif is_database_unavailable(original):
            log.warning(
                "database unavailable (request %s): %s", request_id, type(original).__name__
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

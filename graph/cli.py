"""The `strawgate` command: serve, migrate, export-schema, and operator commands."""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from db.settings import ConfigError, Settings

if TYPE_CHECKING:
    from db.services.operator import AccountReport, Outcome, RoleList
    from db.webhooks.operator import QueueReport


class DatabaseFailed(RuntimeError):
    """A database failure other than an unreachable database; exit status 1."""


@contextlib.contextmanager
def _on_the_database(settings: Settings) -> Iterator[None]:
    """Failures of the database as one line each: DatabaseUnreachable (exit status 2) when
    it cannot be reached, DatabaseFailed (1) for the rest."""
    import asyncpg
    from sqlalchemy.exc import SQLAlchemyError

    from db.session import database_unreachable
    from graph.errors import is_missing_table

    try:
        yield
    except (SQLAlchemyError, asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
        unreachable = database_unreachable(settings.database_url, exc)
        if unreachable is not None:
            raise unreachable from None
        if is_missing_table(exc):
            raise DatabaseFailed(
                "the database has no Strawgate tables: run strawgate migrate first"
            ) from None
        first_line = (str(exc).strip().splitlines() or [""])[0]
        raise DatabaseFailed(
            f"the database failed: {type(exc).__name__}: {first_line}".rstrip(": ")
        ) from None


def _no_sqlite_file(settings: Settings) -> bool:
    """True (and said) when DATABASE_URL names a SQLite file that does not exist."""
    if (path := settings.sqlite_path()) is not None and not path.exists():
        print(
            f"strawgate: no database at {path} (check DATABASE_URL, or run `strawgate migrate`)",
            file=sys.stderr,
        )
        return True
    return False


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from graph.logs import uvicorn_log_config
    from graph.protocols import HeaderTimeoutProtocol

    settings = Settings()
    if args.workers > 1 and settings.is_sqlite:
        print(
            "strawgate: SQLite serves one worker; set DATABASE_URL to PostgreSQL for more.",
            file=sys.stderr,
        )
        return 2
    if args.workers > 1 and settings.redis_url is None:
        print(
            "strawgate: more than one worker needs REDIS_URL: without it each process keeps"
            " its own rate-limit counters, which multiplies every budget by the number of"
            " workers.",
            file=sys.stderr,
        )
        return 2
    if args.workers > 1:
        settings.prepare()
        _prepare_multiprocess_metrics()
    # Only arguments are parsed here; the app reads its settings itself (graph.app:app),
    # exactly as under `uvicorn graph.app:app`.
    uvicorn.run(
        "graph.app:app",
        host=args.host,
        port=args.port,
        workers=args.workers,
        proxy_headers=True,  # trusted only from FORWARDED_ALLOW_IPS (uvicorn's default: 127.0.0.1)
        lifespan="on",
        ws="none",
        server_header=False,
        # A request's line and headers must arrive within HTTP_HEADER_TIMEOUT: without
        # it, connections that never finish a request stay open for ever.
        http=HeaderTimeoutProtocol,
        # On SIGTERM, requests in flight get this long; then the lifespan still stops the
        # background work cleanly before the process manager's SIGKILL (Kubernetes
        # sends it 30 s after SIGTERM by default).
        timeout_graceful_shutdown=args.graceful_timeout,
        log_config=uvicorn_log_config(json_lines=settings.json_logs, level=settings.log_level),
    )
    return 0


def _prepare_multiprocess_metrics() -> None:
    """Workers write their metrics to files in one folder that /metrics reads whole
    (prometheus-client's multiprocess mode): an empty folder of this server's own, unless
    PROMETHEUS_MULTIPROC_DIR names one (then it is emptied: old values would add up)."""
    import os
    import tempfile

    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if folder:
        path = Path(folder)
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob("*.db"):
            stale.unlink()
    else:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="strawgate-metrics-")


def _migrate(args: argparse.Namespace) -> int:
    from db.migrate import UnknownRevision, migrate

    settings = Settings()
    if (path := settings.sqlite_path()) is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with _on_the_database(settings):
            before, head = migrate(settings.database_url, timeout=settings.db_timeout)
    except UnknownRevision as exc:
        print(f"strawgate: {exc}", file=sys.stderr)
        return 1
    if before == head:
        print(f"Database is at head ({head}); nothing to do")
    else:
        print(f"Migrated the database from {before or 'empty'} to head ({head})")
    return 0


def _rotate_keys(args: argparse.Namespace) -> int:
    import asyncio

    from db.mail.outbox import reseal_outbox
    from db.security.box import SecretBox
    from db.services.mfa import reseal_all
    from db.session import Statements, create_engine
    from db.settings import parse_fernet_keys

    settings = Settings()
    if settings.encryption_keys is None or not settings.encryption_keys.get_secret_value().strip():
        raise ConfigError(
            "rotate-keys needs ENCRYPTION_KEYS: the new key first, then every key still in use"
            " (make one with: strawgate keys generate --encryption-key)"
        )
    try:
        keys = parse_fernet_keys(settings.encryption_keys.get_secret_value())
    except ValueError as exc:
        raise ConfigError(f"ENCRYPTION_KEYS: {exc}") from None
    if _no_sqlite_file(settings):
        return 1

    async def rotate() -> tuple[tuple[int, int], tuple[int, int]]:
        engine = create_engine(settings)
        statements = Statements(engine, pool_size=2, timeout=settings.db_timeout)
        await statements.start()
        try:
            box = SecretBox(keys)
            return await reseal_all(statements, box), await reseal_outbox(statements, box)
        finally:
            await statements.close()
            await engine.dispose()

    with _on_the_database(settings):
        (done, failed), (mails_done, mails_failed) = asyncio.run(rotate())
    print(f"re-encrypted {done} secret(s) under the first of ENCRYPTION_KEYS")
    print(f"re-encrypted {mails_done} queued mail(s) under the first of ENCRYPTION_KEYS")
    if failed or mails_failed:
        print(
            f"strawgate: {failed} secret(s) and {mails_failed} queued mail(s) could not be"
            " decrypted with any of ENCRYPTION_KEYS; they were left as they are (was a key"
            " dropped too early?)",
            file=sys.stderr,
        )
        return 1
    return 0


def _users(args: argparse.Namespace) -> int:
    """`strawgate users show|disable|enable|unlock|logout EMAIL` and `strawgate users
    passkeys remove EMAIL ID`: see db/services/operator.py."""
    import asyncio
    import json

    from db.clock import SystemClock
    from db.services.events import SecurityEvents
    from db.services.operator import (
        AccountReport,
        BadRoleName,
        InvalidEmail,
        Operator,
        RoleList,
        UnknownAccount,
        UnknownPasskey,
        normalized_email,
    )
    from db.session import Statements, create_engine
    from db.webhooks.events import WebhookEvents

    try:
        normalized_email(args.email)
    except InvalidEmail as exc:
        shown = args.email if len(args.email) <= 80 else args.email[:80] + "…"
        print(f"strawgate: {shown!r} is not an email address: {exc}", file=sys.stderr)
        return 2
    # No prepare(): these commands read no key and send no mail, so they neither need
    # the secrets production checks for nor write a development key; only the database
    # (and, for unlock, REDIS_URL) is used.
    settings = Settings()
    if _no_sqlite_file(settings):
        return 1

    async def act() -> AccountReport | Outcome | RoleList:
        engine = create_engine(settings)
        statements = Statements(engine, pool_size=2, timeout=settings.db_timeout)
        # unlock also clears the shared sign-in counter (Redis); memory counters are
        # the server processes' own, out of reach here.
        limiter = None
        if args.action == "unlock" and settings.redis_url is not None:
            from db.security.limiter import RateLimiter

            limiter = RateLimiter.from_settings(settings)
        try:
            if limiter is not None:
                await limiter.start()
            await statements.start()
            clock = SystemClock()
            operator = Operator(
                statements=statements,
                clock=clock,
                # The commands' changes are webhook events too (user.disabled, ...).
                events=SecurityEvents(
                    clock=clock, webhooks=WebhookEvents.from_settings(settings, clock=clock)
                ),
                limiter=limiter,
            )
            if args.action == "show":
                return await operator.show(args.email)
            if args.action == "disable":
                return await operator.disable(args.email)
            if args.action == "enable":
                return await operator.enable(args.email)
            if args.action == "unlock":
                return await operator.unlock(args.email)
            if args.action == "passkeys remove":
                return await operator.remove_passkey(args.email, args.passkey_id)
            if args.action == "roles list":
                return RoleList(normalized_email(args.email), await operator.roles(args.email))
            if args.action in ("roles add", "roles remove"):
                return await operator.change_role(
                    args.email, args.role, grant=args.action == "roles add"
                )
            return await operator.logout(args.email)
        finally:
            await statements.close()
            await engine.dispose()
            if limiter is not None:
                await limiter.close()

    try:
        with _on_the_database(settings):
            result = asyncio.run(act())
    except UnknownAccount as exc:
        print(f"strawgate: no account with the email {exc.email}", file=sys.stderr)
        return 1
    except BadRoleName as exc:
        print(
            f"strawgate: {_printable(str(exc)[:80])!r} is not a role name: 1 to 64 letters,"
            " digits and . _ : / - (starting with a letter or digit)",
            file=sys.stderr,
        )
        return 2
    except UnknownPasskey as exc:
        shown = _printable(exc.passkey_id[:80])
        print(f"strawgate: {args.email} has no passkey {shown}", file=sys.stderr)
        return 1
    if args.json:
        sys.stdout.write(json.dumps(result.to_json(), indent=2, ensure_ascii=False) + "\n")
    elif isinstance(result, AccountReport):
        sys.stdout.write(_account_text(result))
    elif isinstance(result, RoleList):
        sys.stdout.write("".join(f"{_printable(role)}\n" for role in result.roles))
    else:
        for line in _outcome_lines(result):
            print(line)
    if not isinstance(result, AccountReport | RoleList) and result.rate_limit_cleared is False:
        return 3  # unlocked in the database; Redis did not answer for the rate limit
    return 0


def _webhooks(args: argparse.Namespace) -> int:
    """`strawgate webhooks list|replay`: see db/webhooks/operator.py."""
    import asyncio
    import json

    from db.clock import SystemClock
    from db.session import Statements, create_engine
    from db.webhooks.operator import queue_report, replay

    settings = Settings()  # no prepare(): only the database and WEBHOOK_ENDPOINTS are read
    event_id = since = None
    if args.action == "replay":
        filters = (args.event, args.endpoint, args.since)
        if not args.all and all(value is None for value in filters):
            print(
                "strawgate: say which dead letters to replay: --event, --endpoint, --since,"
                " or --all",
                file=sys.stderr,
            )
            return 2
        try:
            event_id = None if args.event is None else _event_id(args.event)
            since = None if args.since is None else _since(args.since, SystemClock().now())
        except ValueError as exc:
            print(f"strawgate: {exc}", file=sys.stderr)
            return 2
    if _no_sqlite_file(settings):
        return 1

    async def act() -> QueueReport | int:
        engine = create_engine(settings)
        statements = Statements(engine, pool_size=2, timeout=settings.db_timeout)
        try:
            await statements.start()
            now = SystemClock().now()
            if args.action == "list":
                return await queue_report(
                    statements,
                    configured=[endpoint.url for endpoint in settings.webhook_endpoints],
                    now=now,
                    recent=args.recent,
                )
            return await replay(
                statements, now=now, event_id=event_id, endpoint=args.endpoint, since=since
            )
        finally:
            await statements.close()
            await engine.dispose()

    with _on_the_database(settings):
        result = asyncio.run(act())
    if isinstance(result, int):
        print(
            f"queued {result} dead letter(s) again: running servers deliver them now, each"
            " endpoint's after the events it already waits for"
            if result
            else "no dead letter matched; nothing queued"
        )
        return 0
    if args.json:
        sys.stdout.write(json.dumps(result.to_json(), indent=2, ensure_ascii=False) + "\n")
    else:
        sys.stdout.write(_queue_text(result))
    return 0


def _event_id(value: str) -> uuid.UUID:
    """An event by its id or its webhook-id (msg_ and the id's hex)."""
    try:
        return uuid.UUID(value.removeprefix("msg_"))
    except ValueError:
        raise ValueError(
            f"{_printable(value[:80])!r} is no event id (a UUID, or a webhook-id: msg_...)"
        ) from None


def _since(value: str, now: datetime) -> datetime:
    """A moment: ISO 8601 (UTC unless it says otherwise) or an age: 30m, 2h, 7d."""
    found = re.fullmatch(r"(\d+)\s*([smhd])", value.strip())
    if found:
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[found.group(2)]
        return now - timedelta(**{unit: int(found.group(1))})
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(
            f"--since {_printable(value[:80])!r}: give a time (2026-12-06T10:00, UTC unless it"
            " says otherwise) or an age (30m, 2h, 7d)"
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    if seconds < 172800:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    return f"{seconds // 86400} d {seconds % 86400 // 3600} h"


def _queue_text(report: QueueReport) -> str:
    if not report.endpoints:
        return "no webhook endpoints (WEBHOOK_ENDPOINTS) and no deliveries\n"
    rows = [("endpoint", "pending", "delivered", "dead", "oldest pending")]
    for counts in report.endpoints:
        name = counts.endpoint if counts.configured else f"{counts.endpoint} (not configured here)"
        oldest = (
            "-"
            if counts.oldest_pending is None
            else _age((report.at - counts.oldest_pending).total_seconds())
        )
        rows.append(
            (_printable(name), str(counts.pending), str(counts.delivered), str(counts.dead), oldest)
        )
    width = max(len(row[0]) for row in rows)
    lines = [
        f"{row[0]:<{width}}  {row[1]:>7}  {row[2]:>9}  {row[3]:>5}  {row[4]}".rstrip()
        for row in rows
    ]
    if report.dead_letters:
        lines.append("")
        lines.append(
            "recent dead letters, newest first (strawgate webhooks replay queues them again)"
        )
        for letter in report.dead_letters:
            lines.append(
                f"  {_when(letter.failed_at)}  {letter.webhook_id}  {_printable(letter.type)}"
                f"  {_printable(letter.endpoint)}"
            )
            error = _printable(letter.last_error or "-")
            if not letter.attempts:
                lines.append(f"    {error}")
            elif letter.last_status is None:
                lines.append(f"    {letter.attempts} attempt(s), the last failed: {error}")
            else:
                answered = f"HTTP {letter.last_status}"
                more = "" if error == answered else f": {error}"
                attempts = f"{letter.attempts} attempt(s)"
                lines.append(f"    {attempts}, the last answered {answered}{more}")
    else:
        lines.append("")
        lines.append("no dead letters")
    return "\n".join(lines) + "\n"


def _printable(value: object) -> str:
    """Text from the database (a user agent, say) without control characters: nothing
    a client sent can move the terminal's cursor or colour."""
    return "".join(ch if ch.isprintable() else "?" for ch in str(value))


def _when(value: datetime | None) -> str:
    return "-" if value is None else value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _account_text(report: AccountReport) -> str:
    lockout = report.lockout
    if lockout.locked:
        locked = f"LOCKED until {_when(lockout.locked_until)}"
    else:
        locked = "not locked"
    if lockout.failures:
        locked += f" ({lockout.failures} failed sign-in(s), last {_when(lockout.last_failure_at)})"
    if lockout.code_failures:
        locked += f"; {lockout.code_failures} wrong code(s) counted"
    if report.two_factor == "on":
        two_factor = f"on (since {_when(report.two_factor_since)})"
    elif report.two_factor == "pending":
        two_factor = "off (set up, not confirmed)"
    else:
        two_factor = "off"
    verified = f"yes ({_when(report.email_verified_at)})" if report.email_verified_at else "no"
    lines = [
        f"account         {_printable(report.email)}",
        f"id              {report.id}",
        f"status          {'active' if report.active else 'DISABLED'}",
        f"created         {_when(report.created_at)}",
        f"email verified  {verified}",
        f"two-factor      {two_factor}",
        f"passkeys        {len(report.passkeys)}",
    ]
    for passkey in report.passkeys:
        synced = ", synced" if passkey.backed_up else ""
        lines.append(f"  {passkey.id}  {_printable(passkey.name)}")
        lines.append(
            f"    added {_when(passkey.created_at)}, last used {_when(passkey.last_used_at)}"
            + synced
        )
    lines.append(f"identities      {len(report.identities)}")
    for identity in report.identities:
        lines.append(
            f"  {_printable(identity.provider)}  {_printable(identity.email or '-')}, linked"
            f" {_when(identity.linked_at)}, last used {_when(identity.last_used_at)}"
        )
    lines += [
        f"lockout         {locked}",
        f"live sessions   {len(report.sessions)}",
    ]
    for session in report.sessions:
        lines.append(f"  {session.id}")
        lines.append(
            f"    created {_when(session.created_at)}, last used {_when(session.last_used_at)},"
            f" ip {_printable(session.ip or '-')}"
        )
        lines.append(f"    {_printable(session.user_agent or '(no user agent)')}")
    lines.append(f"recent events   {'newest first' if report.events else 'none'}")
    for event in report.events:
        details = ", ".join(f"{key}={value}" for key, value in sorted(event.details.items()))
        line = f"  {_when(event.at)}  {event.kind:<20} ip {event.ip or '-'}"
        lines.append(_printable(f"{line}  {details}" if details else line))
    return "\n".join(lines) + "\n"


def _outcome_lines(outcome: Outcome) -> list[str]:
    email = _printable(outcome.email)
    lines: list[str] = []
    if outcome.action == "disable":
        if outcome.changed:
            lines.append(
                f"disabled {email}: ended {outcome.sessions_ended} session(s) and its device"
                f" tokens, voided {outcome.challenges_voided} pending challenge(s)"
            )
        else:
            lines.append(f"{email} was already disabled; nothing changed")
    elif outcome.action == "enable":
        lines.append(
            f"enabled {email}"
            if outcome.changed
            else f"{email} was already active; nothing changed"
        )
    elif outcome.action == "unlock":
        if outcome.changed:
            lines.append(
                f"unlocked {email}: cleared {outcome.failures_cleared} failed sign-in(s) and"
                f" {outcome.code_failures_cleared} wrong code(s)"
            )
        else:
            lines.append(f"{email} had no failed sign-ins or wrong codes counted; nothing changed")
        if outcome.rate_limit_cleared is True:
            lines.append("cleared its sign-in rate limit in Redis")
        elif outcome.rate_limit_cleared is False:
            lines.append(
                "could not clear its sign-in rate limit: Redis did not answer (it lapses"
                " within the limit's window)"
            )
    elif outcome.action in ("roles add", "roles remove"):
        role, change = _printable(str(outcome.details["role"])), outcome.details["change"]
        if outcome.changed:
            lines.append(
                f"{change} the role {role} {'to' if change == 'added' else 'from'} {email}:"
                " its access tokens carry it from its next sign-in or refresh"
            )
        else:
            held = "already has" if change == "added" else "does not have"
            lines.append(f"{email} {held} the role {role}; nothing changed")
    elif outcome.action == "passkeys remove":
        lines.append(
            f"removed the passkey {outcome.details['passkey']}"
            f" ({_printable(outcome.details['name'])}) of {email}; its sessions go on (end them"
            " with `strawgate users logout`)"
        )
    else:
        lines.append(
            f"logged {email} out everywhere: ended {outcome.sessions_ended} session(s) and"
            " its device tokens"
        )
    if not outcome.active and outcome.action != "disable":
        lines.append(f"note: {email} is disabled")
    return lines


def _keys_generate(args: argparse.Namespace) -> int:
    import json

    from db.security.jwks import generate
    from db.settings import generate_encryption_key, generate_secret_key

    # Private keys: they go into a secret store or a private .env, never into a log.
    if args.kind in ("secret-key", "encryption-key") and args.alg is not None:
        print(
            f"strawgate: --alg makes a JWK: give it alone or with --env, not with --{args.kind}",
            file=sys.stderr,
        )
        return 2
    if args.kind == "secret-key":
        sys.stdout.write(generate_secret_key() + "\n")
    elif args.kind == "encryption-key":
        sys.stdout.write(generate_encryption_key() + "\n")
    elif args.kind == "env":
        lines = [
            "# Made by strawgate keys generate --env: keep this private (mode 0600).",
            f"SECRET_KEY={generate_secret_key()}",
            f"ENCRYPTION_KEYS={generate_encryption_key()}",
        ]
        if args.alg is not None:
            key_set = json.dumps({"keys": [generate(args.alg)]}, separators=(",", ":"))
            lines += [f"ALGORITHM={args.alg}", f"JWT_KEYS='{key_set}'"]
        sys.stdout.write("\n".join(lines) + "\n")
    else:
        sys.stdout.write(json.dumps(generate(args.alg or "ES256")) + "\n")
    return 0


def _export_schema(args: argparse.Namespace) -> int:
    from graph.schema import schema_sdl

    text = schema_sdl()
    if args.output == "-":
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text, encoding="utf-8")
        print(f"wrote {args.output}")
    return 0


_USERS_HELP = (
    "Operator commands on one account, on the configured database (DATABASE_URL). Exit"
    " status 1 when no account has the email, 2 when it is no email address. Every change"
    " is written to the account's security events."
)


_WEBHOOKS_HELP = (
    "The webhook deliveries on the configured database (DATABASE_URL), to the endpoints of"
    " WEBHOOK_ENDPOINTS: what waits, what was delivered, what was given up (dead letters),"
    " and replaying those. No payload is shown; an endpoint is shown by its scheme, host and"
    " port and a short hash of its path and query string (https://hooks.example.com/…#a1b2c3d4)."
)


def build_parser() -> argparse.ArgumentParser:
    """The command line; docs/reference/cli.md is generated from it (graph/reference.py)."""
    parser = argparse.ArgumentParser(prog="strawgate", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the server (uvicorn)")
    serve.add_argument("--host", default="127.0.0.1", help="the address to listen on")
    serve.add_argument("--port", type=int, default=8000, help="the port to listen on")
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        help="server processes; more than 1 needs PostgreSQL and REDIS_URL",
    )
    serve.add_argument(
        "--graceful-timeout",
        type=float,
        default=20.0,
        metavar="SECONDS",
        help="on SIGTERM, how long requests in flight may take to finish (default 20)",
    )
    serve.set_defaults(run=_serve)

    migrate = commands.add_parser("migrate", help="apply pending migrations (upgrade head)")
    migrate.set_defaults(run=_migrate)

    rotate = commands.add_parser(
        "rotate-keys", help="re-encrypt stored secrets under the first of ENCRYPTION_KEYS"
    )
    rotate.set_defaults(run=_rotate_keys)

    keys = commands.add_parser(
        "keys", help="new keys: SECRET_KEY, ENCRYPTION_KEYS, JWT_KEYS (ES256, RS256)"
    )
    keys_commands = keys.add_subparsers(dest="keys_command", required=True)
    generate = keys_commands.add_parser(
        "generate",
        help="print a new key: a private JWK for JWT_KEYS (the default), a SECRET_KEY, an"
        " ENCRYPTION_KEYS key, or a .env block of them",
        description="Print a new key on stdout. Without an option: a private JWK to add to"
        " JWT_KEYS (ES256 unless --alg says otherwise).",
    )
    kind = generate.add_mutually_exclusive_group()
    kind.add_argument(
        "--secret-key",
        dest="kind",
        action="store_const",
        const="secret-key",
        help="a SECRET_KEY (64 random url-safe characters)",
    )
    kind.add_argument(
        "--encryption-key",
        dest="kind",
        action="store_const",
        const="encryption-key",
        help="a Fernet key for ENCRYPTION_KEYS",
    )
    kind.add_argument(
        "--env",
        dest="kind",
        action="store_const",
        const="env",
        help="SECRET_KEY and ENCRYPTION_KEYS lines for a .env file (with --alg, ALGORITHM"
        " and JWT_KEYS too)",
    )
    generate.add_argument(
        "--alg",
        choices=["ES256", "RS256"],
        default=None,
        help="the algorithm of the JWK (default ES256)",
    )
    generate.set_defaults(run=_keys_generate, kind=None)

    users = commands.add_parser(
        "users", help="operator commands on one account (by email)", description=_USERS_HELP
    )
    users_commands = users.add_subparsers(dest="users_command", required=True)
    for action, text in (
        ("show", "status, lockout, live sessions and recent security events"),
        ("disable", "disable the account and end its sessions, device tokens and challenges"),
        ("enable", "let a disabled account sign in again"),
        ("unlock", "clear the account's lockout (failed sign-ins and wrong codes)"),
        ("logout", "end every session and device token of the account"),
    ):
        command = users_commands.add_parser(action, help=text, description=text)
        command.add_argument("email", help="the account's email address (any case)")
        command.add_argument("--json", action="store_true", help="print JSON")
        command.set_defaults(run=_users, action=action)
    passkeys = users_commands.add_parser(
        "passkeys",
        help="the account's passkeys (listed by `users show`)",
        description="The account's passkeys; `users show` lists them with their ids.",
    )
    passkeys_commands = passkeys.add_subparsers(dest="passkeys_command", required=True)
    text = "remove one passkey (a lost or compromised authenticator); its sessions go on"
    remove = passkeys_commands.add_parser("remove", help=text, description=text)
    remove.add_argument("email", help="the account's email address (any case)")
    remove.add_argument("passkey_id", help="the passkey's id, as `users show` prints it")
    remove.add_argument("--json", action="store_true", help="print JSON")
    remove.set_defaults(run=_users, action="passkeys remove")

    roles = users_commands.add_parser(
        "roles",
        help="the account's roles (carried in its access tokens as the roles claim)",
        description=(
            "Roles an operator grants: access tokens carry them as the roles claim from the"
            " user's next sign-in or refresh (resource servers see a change within"
            " ACCESS_TOKEN_EXPIRE_MINUTES). Each change is a ROLES_CHANGED event naming"
            " the operator."
        ),
    )
    roles_commands = roles.add_subparsers(dest="roles_command", required=True)
    for action, text in (("add", "grant a role"), ("remove", "take a role away")):
        command = roles_commands.add_parser(action, help=text, description=text)
        command.add_argument("email", help="the account's email address (any case)")
        command.add_argument("role", help="the role's name (e.g. admin, billing:read)")
        command.add_argument("--json", action="store_true", help="print JSON")
        command.set_defaults(run=_users, action=f"roles {action}")
    text = "list the account's roles, one a line"
    listing = roles_commands.add_parser("list", help=text, description=text)
    listing.add_argument("email", help="the account's email address (any case)")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(run=_users, action="roles list")

    webhooks = commands.add_parser(
        "webhooks",
        help="webhook deliveries: the queue per endpoint, and replaying dead letters",
        description=_WEBHOOKS_HELP,
    )
    webhooks_commands = webhooks.add_subparsers(dest="webhooks_command", required=True)
    text = (
        "per endpoint: deliveries pending, delivered and dead (given up), the age of the"
        " oldest pending; the most recent dead letters with their last error"
    )
    listing = webhooks_commands.add_parser("list", help=text, description=text)
    listing.add_argument(
        "--recent", type=int, default=10, metavar="N", help="dead letters shown (default 10)"
    )
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(run=_webhooks, action="list")
    text = (
        "queue dead letters again as new deliveries (no attempts yet, due now; given up again"
        " WEBHOOK_GIVE_UP_HOURS from now): those that match every filter given, or --all"
    )
    replaying = webhooks_commands.add_parser("replay", help=text, description=text)
    replaying.add_argument("--all", action="store_true", help="every dead letter")
    replaying.add_argument(
        "--event", metavar="ID", help="one event: its id or webhook-id (msg_...)"
    )
    replaying.add_argument(
        "--endpoint", metavar="URL", help="one endpoint: its URL, or as list shows it"
    )
    replaying.add_argument(
        "--since",
        metavar="WHEN",
        help="given up since: a time (2026-12-06T10:00, UTC unless it says otherwise) or an"
        " age (30m, 2h, 7d)",
    )
    replaying.set_defaults(run=_webhooks, action="replay")

    export = commands.add_parser("export-schema", help="write the GraphQL schema (SDL)")
    export.add_argument("--output", "-o", default="schema.graphql", help='a path, or "-"')
    export.set_defaults(run=_export_schema)

    return parser


def main(argv: list[str] | None = None) -> int:
    from db.session import DatabaseUnreachable

    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except (ConfigError, DatabaseUnreachable) as exc:
        print(f"strawgate: {exc}", file=sys.stderr)
        return 2
    except DatabaseFailed as exc:
        print(f"strawgate: {exc}", file=sys.stderr)
        return 1
    except ValidationError as exc:
        # A setting that does not parse: which one and why, never its value.
        for error in exc.errors():
            name = "__".join(str(part) for part in error["loc"]).upper()
            message = error["msg"].removeprefix("Value error, ")
            shown = message if message.startswith(name) else f"{name}: {message}"
            print(f"strawgate: {shown}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""The ASGI application. `uvicorn graph.app:app` with only environment variables is a
complete server: everything that holds a client or runs in the background starts and
stops in the lifespan."""

from __future__ import annotations

import contextlib
import fcntl
import gc
import importlib.resources
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import anyio
import anyio.to_thread
import orjson
from cross_web import AsyncHTTPRequestAdapter, HTTPException
from graphql import GraphQLError
from sqlalchemy import column, select, table
from sqlalchemy.sql import Executable
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from strawberry.asgi import GraphQL
from strawberry.http import GraphQLHTTPResponse, GraphQLRequestData
from strawberry.types import ExecutionResult

from db.clock import Clock, SystemClock
from db.mail.outbox import MailSender, Outbox
from db.mail.render import MailRenderer
from db.mail.transport import make_transport
from db.migrate import head_revision, known_revisions, upgrade_head
from db.providers.registry import IdentityProviders
from db.security.access import AccessTokenCodec
from db.security.box import SecretBox
from db.security.claims_hook import claims_source_from_settings
from db.security.device import DeviceTokens
from db.security.limiter import RateLimiter
from db.security.passwords import PasswordHasher
from db.security.tokens import derive_key
from db.services.account import AccountService
from db.services.auth import AuthService
from db.services.challenges import Challenges, MailBudget
from db.services.device_trust import DeviceTrust
from db.services.events import SecurityEvents
from db.services.housekeeping import Housekeeper
from db.services.lifecycle import LifecycleService
from db.services.lockout import (
    CODE_LOCKOUT_RESET,
    CODE_REFUSAL,
    SIGN_IN_REFUSAL,
    CodeChecks,
    Lockout,
)
from db.services.mfa import TwoFactor
from db.services.notices import Notices
from db.services.passkeys import PasskeyService
from db.session import Statements, connection_problem, create_engine
from db.settings import ConfigError, Settings
from db.webhooks.delivery import WebhookDispatcher
from db.webhooks.events import WebhookEvents
from graph import identity_routes, wellknown
from graph.context import AppServices, Context
from graph.errors import DatabaseWatch, is_missing_table, present_errors
from graph.graphiql import PREFIX, IdePage, asset_endpoint, ide_page
from graph.http import JWKS_PATH, edge_middleware
from graph.logs import REQUEST_ID
from graph.logs import handler as log_handler
from graph.metrics import Metrics, metrics_endpoint
from graph.schema import build_schema

log = logging.getLogger("strawgate")

# Ready means: the request path's pool answers, and the schema is the code's.
_SCHEMA_VERSION: Executable = select(column("version_num")).select_from(table("alembic_version"))
# Routes counted by name in metrics; any other path is "other" (no unbounded labels).
_ROUTES = frozenset(
    {"/graphql", "/healthz", "/readyz", "/metrics", "/.well-known/jwks.json", "/demo"}
    | wellknown.PATHS
)
# The development-only demo page (docs/getting-started.md, "The demo page").
DEMO_PAGE = importlib.resources.files("graph") / "static" / "demo.html"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class GraphQLView(GraphQL[Context, None]):
    """POST /graphql (JSON; a JSON array of operations where BATCHING is on) and, in
    development, GraphiQL on GET. No operation runs over GET (a mutation there would be
    a CSRF hole). No WebSocket."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(
            build_schema(settings),
            graphql_ide="graphiql" if settings.graphiql_enabled else None,
            allow_queries_via_get=False,
            subscription_protocols=(),
            multipart_uploads_enabled=False,
        )
        self.max_batch_size = settings.max_batch_size if settings.batching else 0
        # Strawberry's page, or its copy that loads GraphiQL from this server where
        # bootstrap fetched its files (graph/graphiql.py).
        self.ide_page: IdePage | None = (
            ide_page(super().graphql_ide_html) if self.graphql_ide else None
        )

    @property
    def graphql_ide_html(self) -> str:
        return self.ide_page.html if self.ide_page else super().graphql_ide_html

    async def get_context(self, request: Any, response: Any) -> Context:
        return Context(
            request=request,
            response=response,
            services=request.app.state.services,
            request_id=request.scope["state"]["request_id"],
        )

    def decode_json(self, data: str | bytes) -> object:
        try:
            decoded = orjson.loads(data)
        except orjson.JSONDecodeError as exc:  # a ValueError, as Strawberry expects
            raise HTTPException(400, "Unable to parse request body as JSON") from exc
        # Strawberry answers a JSON scalar body with a 500, and takes a batch's items
        # unchecked: every operation must be an object of the right shape.
        if isinstance(decoded, list):
            if not self.max_batch_size:
                raise HTTPException(
                    400, "Batching is not enabled: send one operation as a JSON object."
                )
            if not decoded:
                raise HTTPException(400, "The batch is empty.")
            if len(decoded) > self.max_batch_size:
                # Refused whole, before any operation runs.
                raise HTTPException(400, f"A batch holds at most {self.max_batch_size} operations.")
            for item in decoded:
                _check_batched_operation(item)
            return decoded
        if not isinstance(decoded, dict):
            raise HTTPException(400, "The request body must be a JSON object.")
        return decoded

    async def execute_operation(
        self,
        request: Request,
        request_adapter: AsyncHTTPRequestAdapter,
        request_data: GraphQLRequestData | list[GraphQLRequestData],
        context: Context,
        root_value: None,
        sub_response: Response,
    ) -> Any:
        if not isinstance(request_data, list):
            return await super().execute_operation(
                request, request_adapter, request_data, context, root_value, sub_response
            )
        # Strawberry runs a batch's operations concurrently, on one context. Here they
        # run one after another, in order (a batch's mutations mean their order), each
        # on a context of its own; an operation refused on its own (its operation name,
        # its type) answers with an error in its place, as the others have run.
        results: list[ExecutionResult] = []
        for index, data in enumerate(request_data):
            try:
                results.append(
                    await self.execute_single(
                        request=request,
                        request_adapter=request_adapter,
                        sub_response=sub_response,
                        context=context
                        if index == 0
                        else await self.get_context(request, sub_response),
                        root_value=root_value,
                        request_data=data,
                    )
                )
            except HTTPException as exc:
                results.append(ExecutionResult(data=None, errors=[GraphQLError(exc.reason)]))
        return results

    def encode_json(self, data: object) -> bytes:
        return orjson.dumps(data)

    async def process_result(
        self, request: Request, result: ExecutionResult
    ) -> GraphQLHTTPResponse:
        answer: GraphQLHTTPResponse = {"data": result.data}
        if result.errors:
            answer["errors"] = present_errors(
                result.errors, request_id=request.scope["state"]["request_id"]
            )
        if result.extensions:
            answer["extensions"] = result.extensions
        return answer


class RequestGuard:
    """Gives each request an id (echoed as X-Request-ID), caps the body, and bounds the
    time the whole body takes to arrive (`body_timeout` seconds from the end of the
    headers; then 408 and the connection is closed): nothing in Starlette, uvicorn or h11
    does, so a client could otherwise stream without end, or stop half-way and hold its
    connection for ever."""

    def __init__(
        self, app: ASGIApp, *, max_body_bytes: int, body_timeout: float, metrics: Metrics
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = _header(scope, b"x-request-id")
        request_id = incoming if incoming and _REQUEST_ID.match(incoming) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        REQUEST_ID.set(request_id)  # every log line of this request carries it

        started = time.perf_counter()
        route = scope["path"] if scope["path"] in _ROUTES else "other"

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.http_requests.labels(route=route, status=message["status"]).inc()
                self.metrics.http_seconds.labels(route=route).observe(time.perf_counter() - started)
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        declared = _header(scope, b"content-length")
        if declared is not None:
            if not (declared.isascii() and declared.isdigit()):
                await _refuse(scope, receive, send_with_id, 400, "Invalid Content-Length.")
                return
            if int(declared) > self.max_body_bytes:
                await _refuse(scope, receive, send_with_id, 413, "The request body is too large.")
                return
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send_with_id)
            return
        chunks: list[bytes] = []
        size = 0
        whole = too_large = gone = False
        with anyio.move_on_after(self.body_timeout):
            while not (whole or too_large or gone):
                message = await receive()
                if message["type"] == "http.disconnect":
                    gone = True
                    continue
                chunk = message.get("body", b"")
                size += len(chunk)
                too_large = size > self.max_body_bytes
                chunks.append(chunk)
                whole = not message.get("more_body", False)
        if gone:
            return
        if too_large:
            await _refuse(scope, receive, send_with_id, 413, "The request body is too large.")
            return
        if not whole:
            late = JSONResponse(
                {"errors": [{"message": "The request body did not arrive in time."}]},
                408,
                headers={"connection": "close"},
            )
            await late(scope, receive, send_with_id)
            return
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send_with_id)


def _check_batched_operation(item: object) -> None:
    """What Strawberry checks of a single operation (and more), for each one of a batch:
    a malformed item refuses the whole batch before anything runs."""
    if not isinstance(item, dict):
        raise HTTPException(400, "Each operation of a batch must be a JSON object.")
    query = item.get("query")
    if not isinstance(query, str) or not query:
        raise HTTPException(400, "Each operation of a batch needs a `query` string.")
    for key in ("variables", "extensions"):
        if not isinstance(item.get(key), dict | None):
            raise HTTPException(400, f"An operation's `{key}` must be an object or null.")
    if not isinstance(item.get("operationName"), str | None):
        raise HTTPException(400, "An operation's `operationName` must be a string or null.")


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


async def _refuse(scope: Scope, receive: Receive, send: Send, status: int, message: str) -> None:
    await JSONResponse({"errors": [{"message": message}]}, status)(scope, receive, send)


def configure_logging(settings: Settings) -> None:
    """Strawgate's own loggers at LOG_LEVEL. Where nobody configured logging, they get a
    handler of their own; other libraries' loggers are left as they are."""
    ours = logging.getLogger("strawgate")
    ours.setLevel(settings.log_level.upper())
    if not logging.getLogger().handlers and not ours.handlers:
        ours.addHandler(log_handler(json_lines=settings.json_logs))
        ours.propagate = False


def create_app(settings: Settings | None = None, *, clock: Clock | None = None) -> Starlette:
    """The one place settings are read (from the environment and `.env`) when none are given."""
    settings = settings or Settings()
    configure_logging(settings)  # first, so that prepare() can say where a dev key lives
    settings.prepare()
    clock = clock or SystemClock()
    view = GraphQLView(settings)
    schema_head = head_revision()
    schema_known = known_revisions()
    transport = make_transport(settings)  # refuses the console backend in production
    metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        with _single_process_on_sqlite(settings):
            app.state.database_watch = watch = DatabaseWatch(settings.database_url)
            if settings.migrates_on_start:
                # Alembic's async env runs its own loop: keep it off the server's loop.
                try:
                    await anyio.to_thread.run_sync(upgrade_head, settings.database_url)
                except Exception as exc:
                    if connection_problem(exc) is None:
                        raise
                    watch.unreachable(exc)
                    log.error(
                        "AUTO_MIGRATE: the migrations were not applied; once the database"
                        " answers, restart the server or run strawgate migrate"
                    )
            engine = create_engine(settings)
            statements = Statements(
                engine, pool_size=settings.db_pool_size, timeout=settings.db_timeout
            )
            await statements.start()
            unready = await _look_at_database(
                statements, settings.db_timeout, watch, schema_head, schema_known
            )
            hasher = await anyio.to_thread.run_sync(_make_hasher, settings)
            outbox = Outbox.from_settings(settings, clock=clock)
            sender = MailSender.from_settings(
                settings,
                statements=statements,
                outbox=outbox,
                renderer=MailRenderer.from_settings(settings),
                transport=transport,
                clock=clock,
            )
            limiter = RateLimiter.from_settings(settings)
            limiter.on_refusal = lambda name: metrics.rate_limited.labels(limit=name).inc()
            sender.on_failure = lambda reason: metrics.mail_failures.labels(reason=reason).inc()
            await limiter.start()
            auth = make_auth(settings, statements, hasher, outbox, clock, limiter)
            dispatcher = WebhookDispatcher.from_settings(
                settings, statements=statements, events=auth.events.webhooks, clock=clock
            )
            dispatcher.on_outcome = metrics.webhook_outcome
            housekeeper = Housekeeper(
                statements=statements,
                clock=clock,
                interval=settings.housekeeping_seconds,
                unverified_account_age=timedelta(days=settings.unverified_account_days)
                if settings.require_email_verification
                else None,
                outbox_retention=timedelta(days=settings.outbox_retention_days),
                event_retention=timedelta(days=settings.security_event_retention_days),
                session_retention=timedelta(days=settings.session_retention_days),
                challenge_retention=timedelta(days=settings.challenge_retention_days),
                webhook_retention=timedelta(days=settings.webhook_retention_days),
                lockout=auth.lockout,
                sweep_every=timedelta(seconds=settings.housekeeping_sweep_seconds),
                events=auth.events,
            )
            account = AccountService(auth=auth)
            app.state.services = AppServices(
                settings=settings,
                auth=auth,
                account=account,
                lifecycle=LifecycleService(account=account),
                events=auth.events,
                metrics=metrics,
                passkeys=PasskeyService(auth=auth, relying_party=settings.relying_party()),
            )
            app.state.mail_sender = sender
            app.state.housekeeper = housekeeper
            app.state.webhook_dispatcher = dispatcher
            await sender.start()
            await dispatcher.start()
            await housekeeper.start()
            # Everything made so far lives as long as the process: keep it out of the
            # cyclic collector's full passes, which otherwise walk every module, schema
            # and mapper on the request path (hundreds of thousands of objects).
            gc.collect()
            gc.freeze()
            if unready is None:
                log.info("Strawgate is up (%s, %s)", settings.environment, engine.dialect.name)
            else:
                log.warning(
                    "Strawgate is up (%s, %s), not ready: %s",
                    settings.environment,
                    engine.dialect.name,
                    unready["status"],
                )
            try:
                yield
            finally:
                await housekeeper.stop()
                await dispatcher.stop()  # finishes or releases the deliveries it holds
                await sender.stop()  # finishes or releases the mails it holds
                await transport.close()
                await auth.identities.providers.aclose()
                if auth.sessions.claims_hook is not None:
                    await auth.sessions.claims_hook.aclose()
                await limiter.close()
                hasher.close()
                await statements.close()
                await engine.dispose()
                log.info("Strawgate stopped: background work ended, connections closed")

    async def jwks(request: Request) -> Response:
        """The public keys of the access tokens (ES256/RS256); nothing under HS*."""
        published = request.app.state.services.auth.access_tokens.public_jwks()
        if published is None:
            return JSONResponse({"errors": [{"message": "Not Found"}]}, status_code=404)
        return JSONResponse(published)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        services: AppServices = request.app.state.services
        unready = await _look_at_database(
            services.auth.statements,
            settings.db_timeout,
            request.app.state.database_watch,
            schema_head,
            schema_known,
        )
        if unready is not None:
            return JSONResponse(unready, status_code=503)
        # Still ready when Redis is away (the limits run on this process's memory), but
        # said so: an operator sees the degraded state here, and an ERROR in the log.
        limiter = services.auth.limiter
        body = {"status": "ready", "rate_limits": limiter.status}
        ahead = request.app.state.database_watch.ahead
        if ahead is not None:
            body["schema"] = f"newer than this build ({ahead})"
        if limiter.degraded:
            body["status"] = "ready (degraded)"
        mail = request.app.state.mail_sender.degraded
        body["mail"] = "ok" if mail is None else f"degraded: {mail}"
        if mail is not None:
            body["status"] = "ready (degraded)"
        return JSONResponse(body)

    pages: dict[str, str] = {}
    if view.graphql_ide:
        pages["/graphql"] = view.graphql_ide_html
    routes = [
        Route("/graphql", view),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route(JWKS_PATH, jwks),
        Route(
            "/metrics",
            metrics_endpoint(
                settings,
                lambda request: (metrics, request.app.state.services.auth.limiter),
            ),
        ),
    ]
    routes += wellknown.routes(settings.relying_party())
    routes += identity_routes.routes(
        secure_cookies=(settings.public_url or "").strip().lower().startswith("https://")
    )
    if view.ide_page is not None and view.ide_page.local:
        routes.append(Route(PREFIX + "{name:path}", asset_endpoint(view.ide_page.files)))
    if not settings.is_production:
        pages["/demo"] = demo = DEMO_PAGE.read_text(encoding="utf-8")

        async def demo_page(request: Request) -> Response:
            return HTMLResponse(demo)

        routes.append(Route("/demo", demo_page))

    app = Starlette(
        middleware=[
            # Outermost, so that the guard's own refusals carry the security headers
            # (and, for listed origins, CORS headers a browser can read them by).
            *edge_middleware(settings, pages=pages, immutable=PREFIX),
            Middleware(
                RequestGuard,
                max_body_bytes=settings.max_body_bytes,
                body_timeout=settings.http_body_timeout.total_seconds(),
                metrics=metrics,
            ),
        ],
        routes=routes,
        lifespan=lifespan,
    )
    app.state.settings = settings
    return app


def make_auth(
    settings: Settings,
    statements: Statements,
    hasher: PasswordHasher,
    outbox: Outbox,
    clock: Clock,
    limiter: RateLimiter,
) -> AuthService:
    secret = settings.secret()
    notices = Notices(outbox=outbox, clock=clock)
    events = SecurityEvents(
        clock=clock, webhooks=WebhookEvents.from_settings(settings, clock=clock)
    )
    devices = DeviceTokens(
        key=derive_key(secret, "device-token"),
        lifetime=timedelta(days=settings.device_token_days),
        clock=clock,
    )
    code_checks = CodeChecks(statements=statements, clock=clock)
    trust = DeviceTrust(statements=statements, tokens=devices, clock=clock)
    return AuthService(
        statements=statements,
        hasher=hasher,
        access_tokens=AccessTokenCodec(
            key=secret,
            algorithm=settings.algorithm,
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
            lifetime=timedelta(minutes=settings.access_token_expire_minutes),
            clock=clock,
            keys=settings.signing_keys(),
        ),
        refresh_key=derive_key(secret, "refresh-successor"),
        clock=clock,
        refresh_lifetime=timedelta(days=settings.refresh_token_expire_days),
        reuse_interval=timedelta(seconds=settings.refresh_token_reuse_interval),
        password_min_length=settings.password_min_length,
        two_factor=TwoFactor(
            statements=statements,
            box=SecretBox(settings.fernet_keys()),
            hasher=hasher,
            clock=clock,
            issuer=settings.totp_issuer,
            recovery_key=derive_key(secret, "recovery-code-lookup"),
            notices=notices,
            limiter=limiter,
            code_checks=code_checks,
            events=events,
        ),
        challenges=Challenges(
            statements=statements,
            outbox=outbox,
            clock=clock,
            secret=secret,
            email_lifetime=timedelta(minutes=settings.email_code_minutes),
            totp_lifetime=timedelta(minutes=settings.otp_challenge_minutes),
            mail_budget=MailBudget(limiter, trust),
        ),
        outbox=outbox,
        notices=notices,
        require_email_verification=settings.require_email_verification,
        devices=devices,
        trust=trust,
        code_checks=code_checks,
        lockout=_lockout(
            settings,
            statements,
            clock,
            settings.lockout_threshold,
            SIGN_IN_REFUSAL,
            timedelta(seconds=settings.lockout_reset_seconds),
        ),
        code_lockout=_lockout(
            settings,
            statements,
            clock,
            settings.code_lockout_threshold,
            CODE_REFUSAL,
            max(CODE_LOCKOUT_RESET, timedelta(seconds=settings.lockout_reset_seconds)),
        ),
        limiter=limiter,
        events=events,
        idle_timeout=settings.session_idle_timeout,
        max_sessions=settings.max_sessions_per_user,
        reauth_window=settings.reauth_window,
        relying_party=settings.relying_party(),
        passkey_decoy_key=derive_key(secret, "passkey-decoy-credentials"),
        identity_providers=IdentityProviders.from_settings(settings, clock),
        identity_flow_key=derive_key(secret, "identity-flows"),
        claims_hook=claims_source_from_settings(settings, clock=clock),
    )


def _lockout(
    settings: Settings,
    statements: Statements,
    clock: Clock,
    threshold: int,
    refusal: str,
    reset_after: timedelta,
) -> Lockout:
    """A lockout on the LOCKOUT_* steps: of passwords, or of emailed codes."""
    return Lockout(
        statements=statements,
        clock=clock,
        threshold=threshold,
        base=timedelta(seconds=settings.lockout_base_seconds),
        cap=timedelta(seconds=settings.lockout_max_seconds),
        reset_after=reset_after,
        refusal=refusal,
    )


async def _look_at_database(
    statements: Statements, wait: float, watch: DatabaseWatch, head: str, known: frozenset[str]
) -> dict[str, str] | None:
    """None when the database answers at the code's schema, or at a newer one (a revision
    this code does not know: a newer release migrated it); else /readyz's answer:
    "database unreachable" (with a short reason) or "migrations pending"."""
    try:
        with anyio.fail_after(wait):
            async with statements.connection() as conn:
                version = await conn.first(_SCHEMA_VERSION, {})
    except Exception as exc:
        if not is_missing_table(exc):  # no alembic_version table: never migrated
            return {"status": "database unreachable", "reason": watch.unreachable(exc)}
        version = None
    revision = None if version is None else version["version_num"]
    if revision is not None and revision != head and revision not in known:
        watch.newer(revision, head)  # ready: a newer release's rolling deploy
        return None
    if revision != head:
        watch.behind(head)
        return {"status": "migrations pending"}
    watch.ready()
    return None


def _make_hasher(settings: Settings) -> PasswordHasher:
    return PasswordHasher(
        memory_cost=settings.argon2_memory_cost,
        time_cost=settings.argon2_time_cost,
        parallelism=settings.argon2_parallelism,
        workers=settings.password_hash_workers,
    )


@contextlib.contextmanager
def _single_process_on_sqlite(settings: Settings) -> Any:
    """SQLite serialises writers within one process only as far as BEGIN IMMEDIATE goes;
    one server process per database file keeps it simple and safe."""
    path = settings.sqlite_path()
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(
                f"{path} is already served by another process: SQLite runs one worker; "
                "use PostgreSQL (DATABASE_URL) for more"
            ) from None
        yield


app = create_app()

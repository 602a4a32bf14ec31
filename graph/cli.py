"""The `strawgate` command: serve, migrate, export-schema."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from db.settings import ConfigError, Settings


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

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
    from db.migrate import upgrade_head

    settings = Settings()
    if (path := settings.sqlite_path()) is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    upgrade_head(settings.database_url)
    return 0


def _rotate_keys(args: argparse.Namespace) -> int:
    import asyncio

    from db.mail.outbox import reseal_outbox
    from db.security.box import SecretBox
    from db.services.mfa import reseal_all
    from db.session import Statements, create_engine

    settings = Settings().prepare()

    async def rotate() -> tuple[tuple[int, int], tuple[int, int]]:
        engine = create_engine(settings)
        statements = Statements(engine, pool_size=2, timeout=settings.db_timeout)
        await statements.start()
        try:
            box = SecretBox(settings.fernet_keys())
            return await reseal_all(statements, box), await reseal_outbox(statements, box)
        finally:
            await statements.close()
            await engine.dispose()

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


def _keys_generate(args: argparse.Namespace) -> int:
    import json

    from db.security.jwks import generate

    # A private key: it goes into JWT_KEYS (a secret store), never into a log.
    sys.stdout.write(json.dumps(generate(args.alg)) + "\n")
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="strawgate", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the server (uvicorn)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--workers", type=int, default=1)
    serve.set_defaults(run=_serve)

    migrate = commands.add_parser("migrate", help="apply pending migrations (upgrade head)")
    migrate.set_defaults(run=_migrate)

    rotate = commands.add_parser(
        "rotate-keys", help="re-encrypt stored secrets under the first of ENCRYPTION_KEYS"
    )
    rotate.set_defaults(run=_rotate_keys)

    keys = commands.add_parser("keys", help="access-token signing keys (ES256, RS256)")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True)
    generate = keys_commands.add_parser(
        "generate", help="print a new private JWK to add to JWT_KEYS"
    )
    generate.add_argument("--alg", choices=["ES256", "RS256"], default="ES256")
    generate.set_defaults(run=_keys_generate)

    export = commands.add_parser("export-schema", help="write the GraphQL schema (SDL)")
    export.add_argument("--output", "-o", default="schema.graphql", help='a path, or "-"')
    export.set_defaults(run=_export_schema)

    args = parser.parse_args(argv)
    try:
        return int(args.run(args))
    except ConfigError as exc:
        print(f"strawgate: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""Strawgate's log lines: structured JSON (one object a line) in production, readable
text in development; each carries the id of the request it belongs to (the X-Request-ID
response header), so an operator finds every line of one request. Nothing secret is ever
passed to a logger (the one exception, development's console mail backend, is text)."""

from __future__ import annotations

import json
import logging
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

# The request being served by this task (set by the app's RequestGuard).
REQUEST_ID: ContextVar[str | None] = ContextVar("strawgate_request_id", default=None)

SECURITY_EVENT = "security_event"
ACCESS_LOGGER = "uvicorn.access"


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        request_id = REQUEST_ID.get()
        record.request_id = request_id
        record.request_tag = request_id or "-"  # for text lines
        return True


class AccessLineFilter(logging.Filter):
    """Gives uvicorn's access lines an `http` object, and drops their query strings."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == ACCESS_LOGGER and isinstance(record.args, tuple):
            if len(record.args) == 5 and not hasattr(record, "http"):
                client, method, path, version, status = record.args
                # A query string may carry anything a client put there, a token included;
                # no route of this server reads one.
                path = str(path).partition("?")[0]
                record.args = (client, method, path, version, status)
                record.http = {
                    "client": client,
                    "method": method,
                    "path": path,
                    "version": version,
                    "status": status,
                }
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "at": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
        }
        for key in (SECURITY_EVENT, "http"):
            value = getattr(record, key, None)
            if isinstance(value, dict):
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        text = json.dumps(line, separators=(",", ":"), ensure_ascii=False, default=str)
        # Characters that some readers take for line breaks cannot forge a line of their own.
        return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_tag)s]: %(message)s"


class TextFormatter(logging.Formatter):
    """TEXT_FORMAT, and a security event's fields after its message as key=value."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        fields = getattr(record, SECURITY_EVENT, None)
        if isinstance(fields, dict):
            shown = [
                f"{key}={json.dumps(value, separators=(',', ':'), default=str)}"
                for key, value in fields.items()
                if key != "event" and value not in (None, {})
            ]
            line = " ".join([line, *shown])
        return line


def handler(json_lines: bool) -> logging.Handler:
    stream = logging.StreamHandler()
    stream.addFilter(RequestIdFilter())
    stream.addFilter(AccessLineFilter())
    stream.setFormatter(JsonFormatter() if json_lines else TextFormatter())
    return stream


def uvicorn_log_config(*, json_lines: bool, level: str) -> dict[str, Any]:
    """uvicorn's `log_config`: its loggers, Strawgate's and the root all on one handler."""
    formatter = "graph.logs.JsonFormatter" if json_lines else "graph.logs.TextFormatter"
    level = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {
            "request_id": {"()": "graph.logs.RequestIdFilter"},
            "access": {"()": "graph.logs.AccessLineFilter"},
        },
        "formatters": {"strawgate": {"()": formatter}},
        "handlers": {
            "strawgate": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
                "formatter": "strawgate",
                "filters": ["request_id", "access"],
            }
        },
        "root": {"level": "WARNING", "handlers": ["strawgate"]},
        "loggers": {
            name: {"level": level, "handlers": ["strawgate"], "propagate": False}
            for name in ("strawgate", "uvicorn")
        },
    }

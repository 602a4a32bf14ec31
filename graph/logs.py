"""Strawgate's log lines: structured JSON (one object a line) in production, readable
text in development; each carries the id of the request it belongs to (the X-Request-ID
response header), so an operator finds every line of one request. Nothing secret is ever
passed to a logger (the one exception, development's console mail backend, is text)."""

from __future__ import annotations

import json
import logging
from contextvars import ContextVar
from datetime import UTC, datetime

# The request being served by this task (set by the app's RequestGuard).
REQUEST_ID: ContextVar[str | None] = ContextVar("strawgate_request_id", default=None)


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        request_id = REQUEST_ID.get()
        record.request_id = request_id
        record.request_tag = request_id or "-"  # for text lines
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "at": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, separators=(",", ":"), ensure_ascii=False)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_tag)s]: %(message)s"


def handler(json_lines: bool) -> logging.Handler:
    stream = logging.StreamHandler()
    stream.addFilter(RequestIdFilter())
    stream.setFormatter(JsonFormatter() if json_lines else logging.Formatter(TEXT_FORMAT))
    return stream

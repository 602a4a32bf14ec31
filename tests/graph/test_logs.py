"""The log formatters: a security event's fields and uvicorn's access lines as fields."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

from graph.logs import (
    REQUEST_ID,
    AccessLineFilter,
    JsonFormatter,
    RequestIdFilter,
    TextFormatter,
    uvicorn_log_config,
)

EVENT: dict[str, Any] = {
    "event": "LOGIN_FAILED",
    "id": 7,
    "at": "2026-01-02T03:04:05+00:00",
    "user_id": None,
    "session_id": None,
    "ip": "203.0.113.7",
    "user_agent": 'evil\u2028{"forged":true}',
    "email": "alice@example.com",
    "details": {"reason": "wrong_password"},
}


def record(name: str, message: str, *args: Any, **extra: Any) -> logging.LogRecord:
    made = logging.LogRecord(name, logging.INFO, __file__, 1, message, args, None)
    made.__dict__.update(extra)
    for check in (RequestIdFilter(), AccessLineFilter()):
        check.filter(made)
    return made


def test_a_security_event_is_an_object_of_the_json_line() -> None:
    token = REQUEST_ID.set("trace-1")
    try:
        event = record(
            "strawgate.security", "security event %s", "LOGIN_FAILED", security_event=EVENT
        )
    finally:
        REQUEST_ID.reset(token)
    text = JsonFormatter().format(event)

    assert len(text.splitlines()) == 1 and "\u2028" not in text
    line = json.loads(text)
    assert line["message"] == "security event LOGIN_FAILED"
    assert line["request_id"] == "trace-1"
    assert line["security_event"] == EVENT
    assert line["logger"] == "strawgate.security" and line["level"] == "INFO"


def test_an_access_line_has_http_fields_and_no_query_string() -> None:
    access = record(
        "uvicorn.access",
        '%s - "%s %s HTTP/%s" %d',
        "127.0.0.1:5000",
        "GET",
        "/graphql?token=s3cr3t",
        "1.1",
        405,
    )
    json_line = json.loads(JsonFormatter().format(access))
    text_line = TextFormatter().format(access)

    assert json_line["http"] == {
        "client": "127.0.0.1:5000",
        "method": "GET",
        "path": "/graphql",
        "version": "1.1",
        "status": 405,
    }
    assert json_line["message"] == '127.0.0.1:5000 - "GET /graphql HTTP/1.1" 405'
    assert text_line.endswith(
        'INFO uvicorn.access [-]: 127.0.0.1:5000 - "GET /graphql HTTP/1.1" 405'
    )
    assert "s3cr3t" not in json.dumps(json_line) + text_line


def test_a_security_event_is_one_readable_text_line() -> None:
    event = record("strawgate.security", "security event %s", "LOGIN_FAILED", security_event=EVENT)
    text = TextFormatter().format(event)

    assert len(text.splitlines()) == 1
    assert "strawgate.security [-]: security event LOGIN_FAILED id=7 " in text
    assert 'ip="203.0.113.7"' in text and 'email="alice@example.com"' in text
    assert 'details={"reason":"wrong_password"}' in text
    assert "user_id" not in text


def test_other_lines_keep_their_shape() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        failed = logging.LogRecord(
            "x", logging.ERROR, __file__, 1, "it %s", ("broke",), sys.exc_info()
        )
    RequestIdFilter().filter(failed)
    line = json.loads(JsonFormatter().format(failed))
    assert set(line) == {"at", "level", "logger", "message", "request_id", "exception"}
    assert line["message"] == "it broke" and "ValueError: boom" in line["exception"]


def test_uvicorns_loggers_share_strawgates_handler() -> None:
    config = uvicorn_log_config(json_lines=True, level="debug")
    assert config["formatters"]["strawgate"]["()"] == "graph.logs.JsonFormatter"
    assert config["root"]["handlers"] == ["strawgate"]
    for name in ("strawgate", "uvicorn"):
        assert config["loggers"][name] == {
            "level": "DEBUG",
            "handlers": ["strawgate"],
            "propagate": False,
        }
    text = uvicorn_log_config(json_lines=False, level="INFO")
    assert text["formatters"]["strawgate"]["()"] == "graph.logs.TextFormatter"

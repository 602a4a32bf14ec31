"""`strawgate webhooks list|replay`, run as an operator runs it (on the configured database,
in a folder without a .env), over deliveries a real dispatcher made to a real receiver: in
the tests' own process (tests/cli.py: a process costs about a second), and once as the
installed console script (`process=True`)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

from db.session import Statements
from db.webhooks.events import webhook_id
from db.webhooks.outbound import shown
from tests.cli import strawgate as in_process
from tests.conftest import MutableClock
from tests.servers import server_env, strawgate_script
from tests.webhooks.helpers import (
    SECRET,
    MakeDispatcher,
    delivery,
    emit,
    emitter,
    endpoint,
    settled,
)
from tests.webhooks.receiver import receiving

TIMEOUT = 30.0
GIVE_UP = timedelta(minutes=2)


async def strawgate(
    cwd: Path, database_url: str, endpoints: Sequence[str], *args: str, process: bool = False
) -> tuple[int, str, str]:
    """`strawgate webhooks ARGS` with DATABASE_URL and WEBHOOK_ENDPOINTS set, in a folder
    without a .env: (exit status, stdout, stderr). In this process unless `process`: then
    the installed console script runs it."""
    configured = json.dumps([{"url": url, "secrets": [SECRET]} for url in endpoints])
    settings = {
        "ENVIRONMENT": "development",
        "DATABASE_URL": database_url,
        "WEBHOOK_ENDPOINTS": configured,
        "WEBHOOK_ALLOW_PRIVATE": "true",
    }
    if not process:
        return await in_process("webhooks", *args, cwd=cwd, **settings)
    child = await asyncio.create_subprocess_exec(
        strawgate_script(),
        "webhooks",
        *args,
        cwd=cwd,
        env=server_env(**settings),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(child.communicate(), TIMEOUT)
    except TimeoutError:
        child.kill()
        await child.wait()
        raise
    return int(child.returncode or 0), out.decode(), err.decode()


async def test_a_dead_letter_is_listed_and_delivered_once_replayed(
    statements: Statements,
    clock: MutableClock,
    make_dispatcher: MakeDispatcher,
    database_url: str,
    tmp_path: Path,
) -> None:
    async with receiving([SECRET]) as receiver, receiving([SECRET]) as healthy:
        receiver.default = 500
        hooks = [
            endpoint(receiver.url + "/path-not-for-eyes"),
            endpoint(healthy.url + "/T0001/not-for-eyes-either?token=nor-this"),
        ]
        failing, working = (shown(hook.url) for hook in hooks)
        dispatcher = make_dispatcher(statements, hooks, give_up_after=GIVE_UP)
        first = await emit(statements, dispatcher.events, "user.created")
        second = await emit(statements, dispatcher.events, "user.deleted")
        assert await settled(dispatcher, 2) == 2
        clock.advance(seconds=61)
        assert await settled(dispatcher, 2) == 2
        clock.advance(seconds=61)
        assert await settled(dispatcher, 1) == 1  # too old now: given up, and the second too
        assert await dispatcher.run_once() == 0
        assert [item.status for item in receiver.received] == [500, 500, 500]
        assert healthy.ids == [webhook_id(first), webhook_id(second)]
        urls = [hook.url for hook in hooks]
        # Queued by a process configured with another endpoint, which this one lacks.
        elsewhere = "https://elsewhere.example.com/hook/not-for-eyes-elsewhere"
        await emit(statements, emitter(statements, [endpoint(elsewhere)], clock))

        # The installed console script, as an operator runs it.
        code, out, err = await strawgate(tmp_path, database_url, urls, "list", process=True)
        assert code == 0, (out, err)
        lines = out.splitlines()
        assert lines[0].split() == ["endpoint", "pending", "delivered", "dead", "oldest", "pending"]
        assert lines[1].split() == [failing, "0", "0", "2", "-"]
        assert lines[2].split() == [working, "0", "2", "0", "-"]
        assert lines[3].split()[:7] == [
            shown(elsewhere),
            "(not",
            "configured",
            "here)",
            "1",
            "0",
            "0",
        ]
        assert failing.startswith(f"http://127.0.0.1:{receiver.port}/…#")
        assert "recent dead letters" in out
        assert f"{webhook_id(first)}  user.created  {failing}" in out
        assert "    3 attempt(s), the last answered HTTP 500\n" in out
        assert f"{webhook_id(second)}  user.deleted  {failing}" in out
        assert "    not sent: queued more than WEBHOOK_GIVE_UP_HOURS ago, behind event" in out
        for hidden in ("not-for-eyes", "T0001", "nor-this", "ada@example.com"):
            assert hidden not in out

        code, out, err = await strawgate(tmp_path, database_url, urls, "list", "--json")
        assert code == 0, (out, err)
        report = json.loads(out)
        assert [e["dead"] for e in report["endpoints"]] == [2, 0, 0]
        assert [e["endpoint"] for e in report["endpoints"]] == [failing, working, shown(elsewhere)]
        assert [e["configured"] for e in report["endpoints"]] == [True, True, False]
        assert "not-for-eyes" not in out and "nor-this" not in out
        assert {letter["webhook_id"] for letter in report["dead_letters"]} == {
            webhook_id(first),
            webhook_id(second),
        }

        # Replay: nothing without a filter; one event by its webhook-id and its endpoint's
        # URL; then the rest by the endpoint as list shows it.
        code, out, err = await strawgate(tmp_path, database_url, urls, "replay")
        assert code == 2 and "--all" in err
        receiver.default = 200
        code, out, err = await strawgate(
            tmp_path,
            database_url,
            urls,
            "replay",
            "--event",
            webhook_id(first),
            "--endpoint",
            urls[0],
        )
        assert (code, out.strip().split(":")[0]) == (0, "queued 1 dead letter(s) again")
        row = await delivery(statements, first, urls[0])
        assert (row["attempts"], row["failed_at"], row["last_error"]) == (0, None, None)
        code, out, err = await strawgate(
            tmp_path, database_url, urls, "replay", "--endpoint", failing, "--since", "1h"
        )
        assert (code, out.strip().split(":")[0]) == (0, "queued 1 dead letter(s) again")
        code, out, err = await strawgate(tmp_path, database_url, urls, "replay", "--all")
        assert (code, out.strip()) == (0, "no dead letter matched; nothing queued")

        assert await settled(dispatcher, 1) == 1
        assert await settled(dispatcher, 1) == 1
        assert await dispatcher.run_once() == 0
    assert receiver.ids[-2:] == [webhook_id(first), webhook_id(second)]
    assert [item.status for item in receiver.received] == [500, 500, 500, 200, 200]
    for event in (first, second):
        row = await delivery(statements, event, urls[0])
        assert row["delivered_at"] is not None and row["attempts"] == 1


async def test_replay_refuses_what_it_cannot_read(database_url: str, tmp_path: Path) -> None:
    code, _out, err = await strawgate(tmp_path, database_url, [], "replay", "--event", "nope")
    assert code == 2 and "is no event id" in err
    code, _out, err = await strawgate(tmp_path, database_url, [], "replay", "--since", "soon")
    assert code == 2 and "--since 'soon'" in err

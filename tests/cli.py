"""The `strawgate` command run in the tests' own process: graph.cli.main with the arguments,
environment and working folder a process of its own would have, its output captured. A
command run this way costs milliseconds where a process costs about a second (most of it
Python starting and importing); a few tests per command family still run the installed
console script itself (tests/servers.py's strawgate_script).

Not for `strawgate serve` (it runs uvicorn) nor `strawgate migrate` (alembic.ini's
logging would stay installed in this process): those run as processes."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import threading
import traceback
from pathlib import Path

from graph.cli import main
from tests.servers import server_env

# One command at a time: the environment, the working folder and sys.stdout/sys.stderr
# are the whole process's.
_one_at_a_time = threading.Lock()


def run_strawgate(*args: str, cwd: Path, **env: str) -> tuple[int, str, str]:
    """`strawgate ARGS` in this process, with the environment `server_env(**env)` (none
    of the settings the test runner has, so `env` alone configures it) and `cwd` as the
    working folder (for .env and relative paths): (exit status, stdout, stderr), the exit
    status as the console script's process would have it (main's value; SystemExit's code,
    as argparse raises it; 1 and the traceback on stderr for any other exception).

    main calls asyncio.run: call this from a thread when a loop is running (strawgate)."""
    with _one_at_a_time:
        environment = server_env(**env)
        saved_environment = dict(os.environ)
        saved_cwd = Path.cwd()
        out, err = io.StringIO(), io.StringIO()
        try:
            _set_environment(environment)
            os.chdir(cwd)
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    code = main(list(args))
                except SystemExit as exc:  # as sys.exit ends a process
                    if exc.code is None or isinstance(exc.code, int):
                        code = exc.code or 0
                    else:
                        print(exc.code, file=err)
                        code = 1
                except Exception:
                    traceback.print_exc(file=err)
                    code = 1
        finally:
            os.chdir(saved_cwd)
            _set_environment(saved_environment)
        return code, out.getvalue(), err.getvalue()


def _set_environment(wanted: dict[str, str]) -> None:
    """os.environ made `wanted`, variable by variable (never empty meanwhile: the tests'
    event loop runs on in the main thread)."""
    for name in [name for name in os.environ if name not in wanted]:
        del os.environ[name]
    for name, value in wanted.items():
        if os.environ.get(name) != value:
            os.environ[name] = value


async def strawgate(*args: str, cwd: Path, **env: str) -> tuple[int, str, str]:
    """run_strawgate in a worker thread, for tests running on an event loop."""
    return await asyncio.to_thread(run_strawgate, *args, cwd=cwd, **env)

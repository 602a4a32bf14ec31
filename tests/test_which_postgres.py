"""A test run says, in its first lines, which PostgreSQL it uses (tests/pg.py): the one
of TEST_DATABASE_URL (its password masked), the local server, or a throwaway cluster."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

from tests.pg import LOCAL, can_connect, find_pg_bin, masked

ROOT = Path(__file__).resolve().parents[1]


def first_lines(extra_env: dict[str, str]) -> list[str]:
    """The output of a run that only collects this file, quietly (-q: pytest's own header
    is not shown, this line is)."""
    env = {k: v for k, v in os.environ.items() if k != "TEST_DATABASE_URL"} | extra_env
    this_file = str(Path(__file__).relative_to(ROOT))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--collect-only",
            "-q",
            "-p",
            "no:cacheprovider",
            this_file,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.splitlines()


def test_a_configured_url_is_named_with_its_password_masked() -> None:
    url = "postgresql://tester:s3cr3t-pw@127.0.0.1:9/postgres"  # nothing listens on 9
    lines = first_lines({"TEST_DATABASE_URL": url})
    assert lines[0] == (
        "PostgreSQL: TEST_DATABASE_URL, postgresql://tester:***@127.0.0.1:9/postgres "
        "(CANNOT BE REACHED: the tests that need it stop the run)"
    )
    assert "s3cr3t-pw" not in "\n".join(lines)


def test_without_one_the_local_server_or_a_throwaway_cluster_is_named() -> None:
    (line,) = [line for line in first_lines({}) if line.startswith("PostgreSQL:")]
    if asyncio.run(can_connect(LOCAL)):
        assert line == f"PostgreSQL: the local server, {LOCAL}"
    elif find_pg_bin() is not None:
        assert line.startswith("PostgreSQL: a throwaway cluster (initdb and pg_ctl from ")
    else:
        assert line.startswith("PostgreSQL: NONE.")


def test_masking() -> None:
    assert masked("postgresql://a:b@h:1/d") == "postgresql://a:***@h:1/d"
    assert masked("postgresql://a@h/d") == "postgresql://a@h/d"
    assert masked("not a url") == "(a URL that does not parse)"

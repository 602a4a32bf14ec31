"""clients/typescript: a front-end team's typed code, generated from schema.graphql by
graphql-codegen (pinned in package-lock.json, installed here with `npm ci`), type-checks
with tsc; and a schema change that breaks the client breaks this test.

Where npm cannot reach its registry (asked first, in seconds), the packages come from
npm's cache alone, and where they are not all there the test skips, saying so: it does
not fail after minutes of npm's retries."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLIENT = ROOT / "clients" / "typescript"
# npm's own defaults retry for minutes; a registry that answers needs none of that.
NPM_NETWORK = (
    "--fetch-retries=1",
    "--fetch-retry-mintimeout=1000",
    "--fetch-retry-maxtimeout=5000",
    "--fetch-timeout=60000",
)


@pytest.fixture(scope="module")
def npm() -> str:
    found = shutil.which("npm")
    if found is None or shutil.which("node") is None:
        pytest.skip(
            "Node.js and npm are not installed: the TypeScript client is NOT being checked "
            "(install nodejs and npm to run this test)"
        )
    install(found, CLIENT)
    return found


def registry_problem(npm: str) -> str | None:
    """Why npm cannot reach its configured registry (None: it can), found in seconds
    (`npm ping`, no retry)."""
    command = [npm, "ping", "--json", "--fetch-retries=0", "--fetch-timeout=5000"]
    try:
        done = subprocess.run(
            [*command, "--loglevel=error", "--no-update-notifier"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except subprocess.TimeoutExpired:
        return "npm ping had no answer in 30 s"
    if done.returncode == 0:
        return None
    try:
        return str(json.loads(done.stdout)["error"]["summary"])
    except (ValueError, TypeError, KeyError):
        return (done.stderr.strip().splitlines() or [f"npm ping: exit {done.returncode}"])[0]


def install(npm: str, client: Path) -> None:
    """`npm ci` in `client`; from npm's cache alone where the registry is unreachable,
    and a loud skip where that cache lacks a package."""
    problem = registry_problem(npm)
    offline = () if problem is None else ("--offline",)
    command = [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error", *NPM_NETWORK]
    done = run([*command, *offline, "--no-update-notifier"], client)
    if done.returncode != 0 and problem is not None:
        pytest.skip(
            f"NPM REGISTRY UNREACHABLE ({problem}) and npm's cache lacks the client's "
            "packages: the TypeScript client's check DID NOT RUN (it needs the registry "
            "npm is configured with, once)"
        )
    assert done.returncode == 0, done.stdout + done.stderr


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)


def generate_and_check(client: Path) -> subprocess.CompletedProcess[str]:
    bin_dir = client / "node_modules" / ".bin"
    generated = run([str(bin_dir / "graphql-codegen"), "--config", "codegen.yml"], client)
    if generated.returncode != 0:
        return generated
    return run([str(bin_dir / "tsc"), "--noEmit", "-p", "."], client)


def test_the_generated_types_check(npm: str) -> None:
    done = generate_and_check(CLIENT)
    assert done.returncode == 0, done.stdout + done.stderr
    generated = (CLIENT / "src" / "generated" / "graphql.ts").read_text()
    assert "export type LoginMutation" in generated
    assert "deviceToken" in generated
    assert "export type StartPasskeyRegistrationMutation" in generated
    assert "export type PasskeysQuery" in generated
    assert "export type FinishPasskeyLoginMutation" in generated
    for operation in (
        "IdentityProvidersQuery",
        "IdentitiesQuery",
        "SignInWithIdTokenMutation",
        "ExchangeSignInCodeMutation",
        "StartIdentityLinkMutation",
        "UnlinkIdentityMutation",
    ):
        assert f"export type {operation} " in generated, operation


def test_a_schema_change_that_breaks_the_client_breaks_the_check(npm: str, tmp_path: Path) -> None:
    """The same client against a schema where AuthSession.expiresIn may be null: every
    operation is still valid, but the app's code no longer type-checks."""
    client = tmp_path / "client"
    client.mkdir()
    for name in ("operations", "src"):
        shutil.copytree(CLIENT / name, client / name, ignore=shutil.ignore_patterns("generated"))
    shutil.copy(CLIENT / "tsconfig.json", client)
    (client / "node_modules").symlink_to(CLIENT / "node_modules")
    schema = (ROOT / "schema.graphql").read_text()
    marker = '"""Seconds until accessToken expires."""\n  expiresIn: Int!'
    assert marker in schema, "schema.graphql changed: update this test's breaking edit"
    (tmp_path / "schema.graphql").write_text(
        schema.replace(marker, marker.removesuffix("Int!") + "Int")
    )
    config = (CLIENT / "codegen.yml").read_text()
    (client / "codegen.yml").write_text(
        config.replace("../../schema.graphql", str(tmp_path / "schema.graphql"))
    )
    done = generate_and_check(client)
    assert done.returncode != 0
    assert "expiresIn" in done.stdout + done.stderr


def test_an_unreachable_registry_skips_in_seconds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The skip path: npm pointed at a port nothing listens on, with an empty cache, on a
    copy of the client's package files (`npm ci` empties node_modules first)."""
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("npm is not installed: the skip path of the TypeScript check DID NOT RUN")
    for name in ("package.json", "package-lock.json"):
        shutil.copy(CLIENT / name, tmp_path / name)
    monkeypatch.setenv("npm_config_registry", "http://127.0.0.1:9/")
    monkeypatch.setenv("npm_config_cache", str(tmp_path / "empty-cache"))
    assert "ECONNREFUSED" in (registry_problem(npm) or "")
    started = time.monotonic()
    with pytest.raises(pytest.skip.Exception) as skipped:
        install(npm, tmp_path)
    assert time.monotonic() - started < 30
    message = str(skipped.value)
    assert message.startswith(
        "NPM REGISTRY UNREACHABLE (FetchError: request to http://127.0.0.1:9/"
    )
    assert "DID NOT RUN" in message
    assert not (tmp_path / "node_modules" / ".bin" / "tsc").exists()

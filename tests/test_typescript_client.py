"""clients/typescript: a front-end team's typed code, generated from schema.graphql by
graphql-codegen (pinned in package-lock.json, installed here with `npm ci`), type-checks
with tsc; and a schema change that breaks the client breaks this test."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLIENT = ROOT / "clients" / "typescript"


@pytest.fixture(scope="module")
def npm() -> str:
    found = shutil.which("npm")
    if found is None or shutil.which("node") is None:
        pytest.skip(
            "Node.js and npm are not installed: the TypeScript client is NOT being checked "
            "(install nodejs and npm to run this test)"
        )
    done = run([found, "ci", "--no-audit", "--no-fund", "--loglevel=error"], CLIENT)
    assert done.returncode == 0, done.stdout + done.stderr
    return found


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

"""The Dockerfile and compose.yaml an operator starts from. No Docker engine runs here, so
these tests hold the image to what the test suite covers: the same install commands as
scripts/bootstrap (and the wheel test), a non-root user, liveness on /healthz."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def lock(name: str) -> dict[str, str]:
    """A lock file's pins, by normalized name (its `-r` includes left out)."""
    pins = {}
    for line in (ROOT / "requirements" / name).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "-r")):
            package, _, version = line.partition("==")
            pins[re.sub(r"[-_.]+", "-", package).lower()] = version
    return pins


def test_the_image_installs_the_runtime_the_tests_run_on() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    bootstrap = (ROOT / "scripts" / "bootstrap").read_text()
    # The runtime's pins, then Strawgate itself without dependencies; the tests' venv is
    # the runtime's pins and the tools on top of them.
    assert "COPY requirements/runtime.lock" in dockerfile
    assert "pip install -r runtime.lock" in dockerfile
    assert "-r requirements/dev.lock" in bootstrap
    dev = (ROOT / "requirements" / "dev.lock").read_text()
    assert "\n-r runtime.lock\n" in f"\n{dev}"
    assert "pip install --no-deps ." in dockerfile
    assert "--no-deps" in bootstrap and "-e ." in bootstrap
    assert len(re.findall(r"^FROM ", dockerfile, re.MULTILINE)) == 2  # multi-stage


def test_the_runtime_lock_holds_no_development_tool() -> None:
    runtime, tools = lock("runtime.lock"), lock("dev.lock")
    for tool in ("pytest", "pytest-asyncio", "mypy", "ruff", "playwright", "aiosmtpd", "pillow"):
        assert tool not in runtime, tool
        assert tool in tools, tool
    assert not set(runtime) & set(tools), "a package pinned twice"
    # Every dependency pyproject.toml names is pinned for the runtime.
    pyproject = (ROOT / "pyproject.toml").read_text()
    block = pyproject[pyproject.index("dependencies = [") : pyproject.index("]\n\n[project.")]
    for requirement in re.findall(r'"([A-Za-z0-9_.-]+)', block):
        assert re.sub(r"[-_.]+", "-", requirement).lower() in runtime, requirement


def test_the_build_context_leaves_out_what_the_image_does_not_need() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".git", ".venv", "var", "tests", "bench", "clients", "docs", "build"):
        assert entry in ignored, entry


def test_the_image_runs_as_nobody_special_and_checks_liveness_only() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    user = re.search(r"^USER (\S+)$", dockerfile, re.MULTILINE)
    assert user and user.group(1) not in ("root", "0")
    healthcheck = dockerfile[dockerfile.index("HEALTHCHECK") :]
    assert (
        "/healthz" in healthcheck.split("\n\n")[0] and "/readyz" not in healthcheck.split("CMD")[1]
    )
    assert "strawgate serve" in dockerfile and "ENVIRONMENT=production" in dockerfile


def test_compose_pins_its_images() -> None:
    compose = (ROOT / "compose.yaml").read_text()
    images = re.findall(r"^\s*image:\s*(\S+)", compose, re.MULTILINE)
    assert images
    for image in images:
        name, _, tag = image.rpartition(":")
        assert name and tag and tag != "latest", image
        assert re.fullmatch(r"\d+(\.\d+)*(-\w+)?|v\d+(\.\d+)+", tag), image


def test_compose_brings_the_production_companions() -> None:
    compose = (ROOT / "compose.yaml").read_text()
    for service in ("postgres:", "redis:", "mail:", "migrate:", "strawgate:"):
        assert f"\n  {service}" in compose, service
    assert "strawgate migrate" in compose.replace('["strawgate", "migrate"]', "strawgate migrate")


def test_compose_carries_no_key_of_its_own() -> None:
    """Production refuses example keys and a PRODUCT_URL on this machine: compose takes
    them from the operator's .env and stops, saying so, without them."""
    compose = (ROOT / "compose.yaml").read_text()
    for name in ("SECRET_KEY", "ENCRYPTION_KEYS", "PRODUCT_URL"):
        (value,) = re.findall(rf"^\s*{name}:\s*(.+)$", compose, re.MULTILINE)
        assert value.startswith(f"${{{name}:?"), (name, value)

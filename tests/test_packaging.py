"""The Dockerfile and compose.yaml an operator starts from. No Docker engine runs here, so
these tests hold the image to what the test suite covers: the same install commands as
scripts/bootstrap (and the wheel test), a non-root user, liveness on /healthz."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_image_installs_what_the_tests_install() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    bootstrap = (ROOT / "scripts" / "bootstrap").read_text()
    # The pinned dependencies, then Strawgate itself without dependencies: as bootstrap.
    assert "pip install -r requirements.lock" in dockerfile
    assert "-r requirements.lock" in bootstrap
    assert "pip install --no-deps ." in dockerfile
    assert "--no-deps -e ." in bootstrap
    assert len(re.findall(r"^FROM ", dockerfile, re.MULTILINE)) == 2  # multi-stage


def test_the_image_runs_as_nobody_special_and_checks_liveness_only() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    user = re.search(r"^USER (\S+)$", dockerfile, re.MULTILINE)
    assert user and user.group(1) not in ("root", "0")
    healthcheck = dockerfile[dockerfile.index("HEALTHCHECK") :]
    assert (
        "/healthz" in healthcheck.split("\n\n")[0] and "/readyz" not in healthcheck.split("CMD")[1]
    )
    assert "strawgate serve" in dockerfile and "ENVIRONMENT=production" in dockerfile


def test_compose_brings_the_production_companions() -> None:
    compose = (ROOT / "compose.yaml").read_text()
    for service in ("postgres:", "redis:", "mail:", "migrate:", "strawgate:"):
        assert f"\n  {service}" in compose, service
    assert "strawgate migrate" in compose.replace('["strawgate", "migrate"]', "strawgate migrate")

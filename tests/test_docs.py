"""The docs cannot drift: the reference pages are what graph/reference.py makes from the
code now, the site builds with `mkdocs build --strict` (no broken link or anchor, no page
left out of the nav), the GraphQL they show is valid against schema.graphql, and the
README stays a short front door whose links land on pages."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from graphql import build_schema, parse, validate
from pydantic import ValidationError

from db.settings import MAX_DURATION, RateLimits, Settings
from graph import reference

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site, built once with --strict into a temporary folder."""
    folder = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    built = subprocess.run(
        [
            # Not --quiet: it hides the warnings, and --strict then fails on none.
            *(sys.executable, "-m", "mkdocs", "build", "--strict"),
            *("--config-file", str(ROOT / "mkdocs.yml"), "--site-dir", str(folder)),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert built.returncode == 0, (
        "mkdocs build --strict failed (a broken link or anchor, or a page missing from the"
        f" nav in mkdocs.yml):\n{built.stdout}{built.stderr}"
    )
    return folder


def _page_html(site: Path, target: str) -> Path:
    relative = Path(target).relative_to("docs").with_suffix("")
    folder = site / relative.parent if relative.name == "index" else site / relative
    return folder / "index.html"


def test_the_reference_pages_are_what_the_code_makes_now() -> None:
    stale = [
        str(path.relative_to(ROOT))
        for path, text in reference.render().items()
        if not path.exists() or path.read_text(encoding="utf-8") != text
    ]
    assert not stale, f"stale: {', '.join(stale)}; regenerate with {reference.REGENERATE}"


def test_every_setting_describes_itself() -> None:
    for model in (Settings, RateLimits):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name}: write a docstring under it"
    page = (DOCS / "reference" / "settings.md").read_text(encoding="utf-8")
    for name in Settings.model_fields:
        if name != "rate_limits":
            assert f"### `{name.upper()}` {{ #{name} }}" in page, name
    for name in RateLimits.model_fields:
        assert f"`RATE_LIMITS__{name.upper()}`" in page, name


def test_the_bounds_the_reference_states_from_validators_hold() -> None:
    """graph/reference.py states some bounds in words (validators, not Field constraints):
    each must still be what Settings enforces."""

    def accepts(**values: object) -> bool:
        try:
            Settings(_env_file=None, **values)  # type: ignore[arg-type]
        except ValidationError:
            return False
        return True

    assert accepts(reauth_window="1s") and accepts(reauth_window="1d")
    assert not accepts(reauth_window="0.5s") and not accepts(reauth_window="86401")
    days = MAX_DURATION // timedelta(days=1)
    assert accepts(session_idle_timeout="0") and accepts(session_idle_timeout=f"{days}d")
    assert not accepts(session_idle_timeout=f"{days + 1}d")
    page = (DOCS / "reference" / "settings.md").read_text(encoding="utf-8")
    for algorithm in ("HS256", "HS384", "HS512", "ES256", "RS256"):
        assert f"`{algorithm}`" in page
    assert not accepts(algorithm="none")


def test_the_site_builds_strictly(site: Path) -> None:
    for page in DOCS.rglob("*.md"):
        target = str(page.relative_to(ROOT))
        assert _page_html(site, target).is_file(), f"{target} was not built"


# ------------------------------------------------------------------------------ README


def test_the_readme_is_a_short_front_door() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines; the rest belongs in docs/"


def test_the_readme_names_the_two_commands() -> None:
    blocks = re.findall(r"```sh\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    commands = {line.strip() for block in blocks for line in block.splitlines()}
    assert "./scripts/run" in commands
    assert "./scripts/test" in commands


def test_every_link_of_the_readme_lands(site: Path) -> None:
    text = README.read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    docs_links = [link for link in links if link.startswith("docs/")]
    assert docs_links, "the README links into the docs"
    for link in links:
        if re.match(r"[a-z]+:", link):
            continue  # http(s), mailto
        target, _, anchor = link.partition("#")
        if not target:
            continue
        assert (ROOT / target).exists(), f"README links to {link}: no such file"
        if target.startswith("docs/") and target.endswith(".md"):
            html = _page_html(site, target)
            assert html.is_file(), f"README links to {link}: not a page of the site"
            if anchor:
                assert f'id="{anchor}"' in html.read_text(encoding="utf-8"), (
                    f"README links to {link}: the page has no such anchor"
                )


# ------------------------------------------------------------------------------ GraphQL


def _schema_errors(document: str) -> list[str]:
    schema = build_schema((ROOT / "schema.graphql").read_text(encoding="utf-8"))
    return [error.message for error in validate(schema, parse(document))]


def test_the_readme_first_session_is_valid_graphql() -> None:
    text = README.read_text(encoding="utf-8")
    queries = [json.loads(f'"{raw}"') for raw in re.findall(r'"query": "((?:[^"\\]|\\.)*)"', text)]
    fields = set()
    for query in queries:
        assert not _schema_errors(query), (query, _schema_errors(query))
        fields.update(re.findall(r"\b(signup|verifyOtp|me|refresh|logout)\b", query))
    assert fields == {"signup", "verifyOtp", "me", "refresh", "logout"}


def test_the_graphql_in_the_docs_is_valid() -> None:
    for page in sorted(DOCS.rglob("*.md")):
        text = page.read_text(encoding="utf-8")
        for block in re.findall(r"```graphql\n(.*?)```", text, re.S):
            errors = _schema_errors(block)
            assert not errors, f"{page.relative_to(ROOT)}: {errors}\n{block}"
        for raw in re.findall(r'"query": "((?:[^"\\]|\\.)*)"', text):
            query = json.loads(f'"{raw}"')
            assert not _schema_errors(query), f"{page.relative_to(ROOT)}: {query}"

"""The docs cannot drift: the reference pages are what graph/reference.py makes from the
code now."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from pydantic import ValidationError

from db.settings import MAX_DURATION, RateLimits, Settings
from graph import reference

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


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

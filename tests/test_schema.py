"""schema.graphql is the export of the Strawberry schema and keeps the client contract."""

from __future__ import annotations

from pathlib import Path

import pytest
from graphql import build_schema, find_breaking_changes, find_dangerous_changes

from graph.schema import schema_sdl

ROOT = Path(__file__).resolve().parents[1]
CONTRACT = ROOT / "tests" / "contract"
SHARED = ROOT.parent / "shared" / "contract"
# A changed default silently changes what an existing client's request does.
DEFAULT_CHANGES = {"ARG_DEFAULT_VALUE_CHANGE", "INPUT_FIELD_DEFAULT_VALUE_CHANGE"}
# Read in this order, as one document (later files may `extend` earlier ones).
CONTRACT_ORDER = [
    "core.graphql",
    "mfa.graphql",
    "account.graphql",
    "abuse.graphql",
    "lifecycle.graphql",
    "stepup.graphql",
]


def contract_files() -> list[Path]:
    present = {path.name: path for path in CONTRACT.glob("*.graphql")}
    ordered = [present.pop(name) for name in CONTRACT_ORDER if name in present]
    return ordered + sorted(present.values())


def test_schema_file_is_the_export() -> None:
    assert (ROOT / "schema.graphql").read_text(encoding="utf-8") == schema_sdl(), (
        "schema.graphql drifted: run `strawgate export-schema`"
    )


def test_schema_keeps_the_contract() -> None:
    files = contract_files()
    assert files and files[0].name == "core.graphql"
    ours = build_schema((ROOT / "schema.graphql").read_text(encoding="utf-8"))
    contract = build_schema("\n".join(path.read_text(encoding="utf-8") for path in files))
    failing = [str(change.description) for change in find_breaking_changes(contract, ours)]
    failing += [
        str(change.description)
        for change in find_dangerous_changes(contract, ours)
        if change.type.name in DEFAULT_CHANGES
    ]
    assert failing == []


@pytest.mark.skipif(not SHARED.is_dir(), reason="no ../shared/contract beside this clone")
def test_contract_copies_match_the_shared_contract() -> None:
    for path in contract_files():
        assert path.read_bytes() == (SHARED / path.name).read_bytes(), path.name

"""Signup's address rules are fastapi-mail's: what signup accepts can be mailed, and what
fastapi-mail refuses, signup refuses."""

from __future__ import annotations

import pytest
from fastapi_mail import MessageSchema, MessageType
from pydantic import ValidationError

from db.errors import AuthFailure
from db.validation import parse_email

ADDRESSES = [
    "ada@example.com",
    "  Ada.Lovelace+tag@Example.COM ",
    "用户@例子.广告",
    "STRASSE@xn--mnchen-3ya.example",
    "o'brien@example.org",
    "user@localhost",
    "user@example.test",
    "user@printer.local",
    "user@invalid",
    "not-an-email",
    "a@b",
    "two@@example.com",
    '"quoted"@example.com',
    "user@[127.0.0.1]",
    "x" * 65 + "@example.com",
]


def fastapi_mail_accepts(address: str) -> bool:
    try:
        MessageSchema(recipients=[address], subject="s", body="b", subtype=MessageType.plain)
    except ValidationError:
        return False
    return True


@pytest.mark.parametrize("address", ADDRESSES)
def test_signup_accepts_exactly_what_fastapi_mail_can_send_to(address: str) -> None:
    try:
        parsed = parse_email(address)
    except AuthFailure as failure:
        assert failure.field == "email"
        assert not fastapi_mail_accepts(address.strip())
    else:
        assert fastapi_mail_accepts(parsed.address)


def test_control_characters_are_exactly_unicodes_cc() -> None:
    """has_control_characters (a regex, on every input string of every request) finds
    exactly the characters of Unicode's general category Cc, across all of Unicode."""
    import unicodedata

    from db.validation import has_control_characters

    for code_point in range(0x110000):
        char = chr(code_point)
        assert has_control_characters(f"a{char}b") is (unicodedata.category(char) == "Cc"), hex(
            code_point
        )
    assert not has_control_characters("")

"""Addresses and URLs are shown exactly as they are, six digits in a row or not (issue 12:
`moved-8c176159@example.org` was shown as `moved-8c176 159@example.org`); every other
value still never shows a number a reader could take for the code."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from markupsafe import escape

from db.mail.message import RenderedMail
from db.mail.render import CODE_MAILS, MAIL_TEMPLATES, NOTICE_MAILS, MailRenderer
from db.settings import ConfigError
from tests.mail.test_render import AT, CODE, SUPPORT_NOTICES
from tests.smtp import CODE_LINE, SIX_DIGITS

PRODUCT_URL = "https://example.com/r/123456"
SECURITY_URL = "https://example.com/r/654321/security?user=000000&x=1"
SUPPORT = "help-000000-999999@example.org"
ADDRESSES = ("moved-8c176159@example.org", "123456@example.com", "user-000000-999999@example.org")
DEVICE = "Pixel 7 Build/135790"


def renderer(template_folder: Path | None = None) -> MailRenderer:
    return MailRenderer(
        product_name="Strawgate",
        product_url=PRODUCT_URL,
        security_url=SECURITY_URL,
        support=SUPPORT,
        template_folder=template_folder,
    )


def render(
    name: str, new_email: str = ADDRESSES[0], folder: Path | None = None, **overrides: Any
) -> RenderedMail:
    if name in CODE_MAILS:
        return renderer(folder).render(name, {"minutes": 10, **overrides}, {"code": CODE})
    context: dict[str, Any] = {"at": AT, "ip": "203.0.113.7", "device": DEVICE}
    if name == "recovery_code_used":
        context["remaining"] = 2
    if name == "email_changed":
        context["new_email"] = new_email
    if name in ("passkey_added", "passkey_removed"):
        context["name"] = "Work key"
    if name in ("identity_linked", "identity_unlinked"):
        context["provider"] = "Google"
    if name == "identity_linked":
        context["account"] = "ada@gmail.example"
    return renderer(folder).render(name, {**context, **overrides}, None)


def outside(part: str, *verbatim: str) -> list[str]:
    """The six-digit runs of `part` outside the given addresses and URLs."""
    for value in verbatim:
        part = part.replace(value, " ")
    return SIX_DIGITS.findall(part)


def shown(name: str, new_email: str) -> list[str]:
    """What mail `name` must show as is."""
    values = [PRODUCT_URL]
    if name in NOTICE_MAILS and name not in SUPPORT_NOTICES:
        values.append(SECURITY_URL)
    if name in SUPPORT_NOTICES:
        values.append(SUPPORT)
    if name == "email_changed":
        values.append(new_email)
    return values


@pytest.mark.parametrize("new_email", ADDRESSES)
@pytest.mark.parametrize("name", MAIL_TEMPLATES)
def test_addresses_and_urls_are_shown_as_they_are(name: str, new_email: str) -> None:
    mail = render(name, new_email)
    values = shown(name, new_email)

    for value in values:
        assert value in mail.text, (name, value)
        assert str(escape(value)) in mail.html, (name, value)
    assert f'href="{escape(PRODUCT_URL)}"' in mail.html
    if SECURITY_URL in values:
        assert f'href="{escape(SECURITY_URL)}"' in mail.html
    # The code, alone on its line, is still the only other six digits in a row.
    html_values = [str(escape(value)) for value in values]
    expected = [CODE] if name in CODE_MAILS else []
    assert CODE_LINE.findall(mail.text) == expected
    assert outside(mail.subject, *values) == []
    assert outside(mail.text, *values) == expected
    assert outside(mail.html, *html_values) == expected


@pytest.mark.parametrize("name", NOTICE_MAILS)
def test_other_values_are_still_broken_up_beside_an_address(name: str) -> None:
    mail = render(name, device="Build/123456", ip="654321")
    values = shown(name, ADDRESSES[0])

    for part in (mail.text, mail.html):
        assert "Build/123 456" in part
        assert "654 321" in part
    assert outside(mail.text, *values) == []
    assert outside(mail.html, *(str(escape(value)) for value in values)) == []


@pytest.mark.parametrize("address", ADDRESSES)
def test_the_new_address_is_shown_in_the_change_of_address_notice(address: str) -> None:
    plain = MailRenderer(
        product_name="Strawgate",
        product_url="https://auth.example.com",
        security_url="https://auth.example.com/security",
        template_folder=None,
    )
    context = {"at": AT, "ip": "203.0.113.7", "device": None, "new_email": address}

    mail = plain.render("email_changed", context)

    assert f"changed to {address}.\n" in mail.text
    assert f"<strong>{address}</strong>" in mail.html
    assert f"\n{SUPPORT}\n" in render("email_changed", address).text


def test_a_code_mail_with_six_digits_in_its_urls_keeps_the_code_on_its_own_line() -> None:
    mail = render("login_code")

    assert f"\n{CODE}\n" in mail.text
    assert CODE_LINE.findall(mail.text) == [CODE]
    assert mail.text.endswith(f"\n{PRODUCT_URL}\n")
    # Even when the URL holds the code's digits.
    same = MailRenderer(
        product_name="Strawgate",
        product_url=f"https://example.com/r/{CODE}",
        security_url=SECURITY_URL,
        template_folder=None,
    ).render("login_code", {"minutes": 10}, {"code": CODE})
    assert CODE_LINE.findall(same.text) == [CODE]


def test_a_macro_prints_a_url_as_it_is(tmp_path: Path) -> None:
    (tmp_path / "totp_enabled.html").write_text(
        '{% macro link(url) %}<a href="{{ url }}">{{ url }}</a>{% endmacro %}'
        "{{ link(security_url) }} {{ link('Build/987654') }}\n",
        encoding="utf-8",
    )
    (tmp_path / "totp_enabled.txt").write_text(
        "{% macro line(value) %}    {{ value }}{% endmacro %}"
        "{{ line(security_url) }}\n{{ line('Build/987654') }}\n",
        encoding="utf-8",
    )

    mail = render("totp_enabled", folder=tmp_path)

    url = escape(SECURITY_URL)
    assert mail.html == f'<a href="{url}">{url}</a> <a href="Build/987 654">Build/987 654</a>\n'
    assert mail.text == f"    {SECURITY_URL}\n    Build/987 654\n"


def test_a_number_only_partly_inside_an_address_is_refused(tmp_path: Path) -> None:
    (tmp_path / "email_changed.txt").write_text("{{ ip }}{{ new_email }}\n", encoding="utf-8")

    with pytest.raises(ValueError, match="six-digit number"):
        render("email_changed", "56-000000@example.org", tmp_path, ip="1234")
    # The address alone is fine.
    assert render("email_changed", "56-000000@example.org", tmp_path, ip="x").text == (
        "x56-000000@example.org\n"
    )


def test_a_stray_number_in_a_template_is_refused_beside_an_address(tmp_path: Path) -> None:
    (tmp_path / "email_changed.txt").write_text(
        "{{ new_email }} (ticket 123456)\n", encoding="utf-8"
    )

    with pytest.raises(ValueError, match="six-digit number"):
        render("email_changed", "123456@example.com", tmp_path)


def test_an_address_with_six_digits_standing_alone_is_refused() -> None:
    with pytest.raises(ValueError, match="standing alone"):
        render("email_changed", "123456")
    with pytest.raises(ValueError, match="standing alone"):
        render("email_changed", "code 123456 x@example.com")


@pytest.mark.parametrize(
    ("setting", "value"),
    [("product_url", "https://example.com/ 123456"), ("support", "123456")],
)
def test_a_setting_with_six_digits_standing_alone_is_refused(setting: str, value: str) -> None:
    values = {"product_url": PRODUCT_URL, "security_url": SECURITY_URL, "support": SUPPORT}
    values[setting] = value
    with pytest.raises(ConfigError, match="standing alone"):
        MailRenderer(product_name="Strawgate", template_folder=None, **values)

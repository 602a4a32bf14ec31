from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from jinja2 import TemplateNotFound, UndefinedError

from db.mail.message import RenderedMail
from db.mail.render import CODE_MAILS, MAIL_TEMPLATES, NOTICE_MAILS, MailRenderer, format_time
from db.settings import ConfigError, Settings
from tests.smtp import CODE_LINE, SIX_DIGITS

CODE = "042917"
AT = "27 Nov 2026, 02:15 UTC"
NEW_EMAIL = "moved-8c176159@example.org"  # "176159": six digits in a row, always
# The notices that send the reader to the security page; the others, to support.
SUPPORT_NOTICES = ("email_changed", "account_deleted")


def make_renderer(template_folder: Path | None = None, **overrides: str) -> MailRenderer:
    values = {
        "product_name": "Strawgate",
        "product_url": "https://auth.example.com",
        "security_url": "https://auth.example.com/security",
    }
    values.update(overrides)
    return MailRenderer(template_folder=template_folder, **values)


def context_for(name: str, **overrides: Any) -> dict[str, Any]:
    if name in CODE_MAILS:
        values: dict[str, Any] = {"minutes": 10}
    else:
        values = {"at": AT, "ip": "203.0.113.7", "device": "Firefox on Linux"}
        if name == "recovery_code_used":
            values["remaining"] = 7
        if name == "email_changed":
            values["new_email"] = NEW_EMAIL
        if name in ("passkey_added", "passkey_removed"):
            values["name"] = "YubiKey 5 Series"
    if name in ("identity_linked", "identity_unlinked"):
        values["provider"] = "Google"
    if name == "identity_linked":
        values["account"] = "ada@gmail.example"
    values.update(overrides)
    return values


def render(name: str, renderer: MailRenderer | None = None, **overrides: Any) -> RenderedMail:
    secrets = {"code": CODE} if name in CODE_MAILS else None
    return (renderer or make_renderer()).render(name, context_for(name, **overrides), secrets)


def other_six_digit_numbers(mail: RenderedMail, *verbatim: str) -> list[str]:
    """Six-digit numbers besides the code, outside the addresses and URLs shown as is."""
    content = f"{mail.subject}\n{mail.text}\n{mail.html}"
    for value in verbatim:
        content = content.replace(value, " ")
    return [number for number in SIX_DIGITS.findall(content) if number != CODE]


def test_the_built_in_mails_are_the_listed_ones() -> None:
    assert set(MAIL_TEMPLATES) == set(CODE_MAILS) | set(NOTICE_MAILS)
    folder = Path(__file__).parents[2] / "db" / "mail" / "templates" / "en"
    for name in MAIL_TEMPLATES:
        for suffix in (".subject.txt", ".txt", ".html"):
            assert (folder / f"{name}{suffix}").is_file()


@pytest.mark.parametrize("name", MAIL_TEMPLATES)
def test_every_mail_renders(name: str) -> None:
    mail = render(name)

    assert mail.subject.strip() == mail.subject
    assert mail.subject
    assert "\n" not in mail.subject
    assert "Strawgate" in mail.text
    assert "https://auth.example.com" in mail.text
    assert mail.html.startswith("<!DOCTYPE html>")
    assert '<a href="https://auth.example.com"' in mail.html
    assert "{{" not in mail.text + mail.html  # nothing left unrendered
    assert other_six_digit_numbers(mail, NEW_EMAIL) == []


@pytest.mark.parametrize("name", CODE_MAILS)
def test_a_code_mail_shows_the_code_on_a_line_of_its_own(name: str) -> None:
    mail = render(name)

    assert CODE_LINE.findall(mail.text) == [CODE]
    # Nothing else on the line, not even indentation: `^\d{6}$` finds it.
    assert f"\n{CODE}\n" in mail.text
    assert f">{CODE}</p>" in mail.html
    assert "monospace" in mail.html
    assert CODE not in mail.subject  # subjects show on lock screens
    assert "10 minutes" in mail.text
    assert "10 minutes" in mail.html


def test_one_minute_is_singular() -> None:
    mail = render("login_code", minutes=1)
    assert "expires in 1 minute." in mail.text


@pytest.mark.parametrize("name", NOTICE_MAILS)
def test_a_notice_shows_when_where_and_what_to_do(name: str) -> None:
    mail = render(name)

    for part in (mail.text, mail.html):
        assert AT in part
        assert "Firefox on Linux" in part
        assert "203.0.113.7" in part
        if name in SUPPORT_NOTICES:
            assert "replying to this mail" in part
        else:
            assert "https://auth.example.com/security" in part
    assert CODE_LINE.findall(mail.text) == []


@pytest.mark.parametrize("name", NOTICE_MAILS)
def test_a_notice_leaves_out_what_is_unknown(name: str) -> None:
    mail = render(name, ip=None, device=None)

    for part in (mail.text, mail.html):
        assert AT in part
        assert "None" not in part
        assert "Device" not in part
        assert "IP address" not in part


@pytest.mark.parametrize("template", ["passkey_added", "passkey_removed"])
def test_a_passkey_notice_names_the_passkey_escaped(template: str) -> None:
    context = {**context_for(template), "name": "<b>Work key</b>"}
    mail = make_renderer().render(template, context, None)

    assert '"<b>Work key</b>"' in mail.text
    assert "&ldquo;&lt;b&gt;Work key&lt;/b&gt;&rdquo;" in mail.html


def test_new_device_names_the_device_and_network() -> None:
    assert "from Firefox on Linux (203.0.113.7) at 27 Nov" in render("new_device").text
    assert "from 203.0.113.7 at" in render("new_device", device=None).text
    assert "account at 27 Nov" in render("new_device", device=None, ip=None).text


@pytest.mark.parametrize(("remaining", "advice"), [(7, False), (3, True), (1, True), (0, True)])
def test_recovery_code_used_advises_new_codes_when_few_remain(remaining: int, advice: bool) -> None:
    mail = render("recovery_code_used", remaining=remaining)

    assert ("Create a new set" in mail.text) is advice
    assert ("Create a new set" in mail.html) is advice
    if remaining > 1:
        assert f"You have {remaining} recovery codes left." in mail.text
    assert "1 recovery code left." in render("recovery_code_used", remaining=1).text
    assert "no recovery codes left" in render("recovery_code_used", remaining=0).text


HOSTILE: dict[str, Any] = {
    "device": "Pixel 7 Build/123456 (mail 654321@example.com)",
    "ip": "2001:db8::123456",
    "at": "27 Nov 2026 (987654)",
    "minutes": 100000,
    "remaining": 111111,
    "new_email": "user-000000-999999@example.org",
    "name": "Key 123456",
    "provider": "Provider 123456",
    "account": "user-000000-999999@example.org",
}


@pytest.mark.parametrize("name", MAIL_TEMPLATES)
def test_no_mail_shows_another_six_digit_number_whatever_the_values(name: str) -> None:
    context = {key: HOSTILE[key] for key in context_for(name)}
    secrets = {"code": CODE} if name in CODE_MAILS else None

    mail = make_renderer().render(name, context, secrets)

    assert other_six_digit_numbers(mail, HOSTILE["new_email"]) == []
    if name in CODE_MAILS:
        assert CODE_LINE.findall(mail.text) == [CODE]
    else:
        assert CODE_LINE.findall(mail.text) == []


def test_a_six_digit_run_in_a_value_is_broken_up_not_dropped() -> None:
    mail = render("password_changed", device="Build/123456", ip="654321")

    for part in (mail.text, mail.html):
        assert "Build/123 456" in part
        assert "654 321" in part
    # Longer runs are no code and stay as they are.
    assert "Build/1234567" in render("password_changed", device="Build/1234567").text


def test_html_is_escaped_in_the_html_part_only(tmp_path: Path) -> None:
    (tmp_path / "new_device.subject.txt").write_text("Sign-in from {{ device }}\n")
    renderer = make_renderer(tmp_path, product_name='Straw<b>&"gate')

    mail = renderer.render("new_device", context_for("new_device", device='<script>&"'))

    assert mail.subject == 'Sign-in from <script>&"'
    assert '<script>&"' in mail.text
    assert 'Straw<b>&"gate' in mail.text
    assert "<script>" not in mail.html
    assert "&lt;script&gt;&amp;&#34;" in mail.html
    assert "Straw&lt;b&gt;&amp;&#34;gate" in mail.html


def test_the_subject_is_one_line_whatever_the_values(tmp_path: Path) -> None:
    (tmp_path / "new_device.subject.txt").write_text(
        "Sign-in\nfrom   {{ device }}\n\n", encoding="utf-8"
    )
    renderer = make_renderer(tmp_path, product_name="Straw\ngate")

    mail = renderer.render(
        "new_device", context_for("new_device", device="Firefox\r\nBcc: someone@example.com")
    )
    assert mail.subject == "Sign-in from Firefox Bcc: someone@example.com"
    assert render("password_changed", make_renderer(product_name="Straw\r\ngate")).subject == (
        "Your Straw gate password was changed"
    )


def test_an_operator_template_replaces_one_file(tmp_path: Path) -> None:
    (tmp_path / "login_code.txt").write_text(
        "Your {{ product_name }} code, valid for {{ minutes }} minutes:\n\n{{ code }}\n",
        encoding="utf-8",
    )
    renderer = make_renderer(tmp_path)

    mail = renderer.render("login_code", {"minutes": 10}, {"code": CODE})

    assert mail.text == f"Your Strawgate code, valid for 10 minutes:\n\n{CODE}\n"
    assert mail.subject == "Your sign-in code for Strawgate"  # built-in
    assert "Use this code to sign in to Strawgate" in mail.html  # built-in
    assert "confirm your email address" in render("verify_email", renderer).text  # built-in


def test_an_operator_layout_applies_to_every_mail(tmp_path: Path) -> None:
    (tmp_path / "_layout.txt").write_text(
        "Dear customer,\n\n{% block body %}{% endblock %}\nThe {{ product_name }} team\n",
        encoding="utf-8",
    )
    renderer = make_renderer(tmp_path)

    for name in ("login_code", "password_changed"):
        mail = render(name, renderer)
        assert mail.text.startswith("Dear customer,\n\n")
        assert mail.text.endswith("The Strawgate team\n")
    assert CODE_LINE.findall(render("login_code", renderer).text) == [CODE]


@pytest.mark.parametrize(
    ("file", "content"),
    [
        ("login_code.txt", "Questions? Call 555123.\n\n{{ code }}\n"),
        ("password_changed.txt", "Support ticket 100200: {{ at }} {{ ip }} {{ device }}\n"),
        (
            "_layout.html",
            '<p style="color:#123456">{{ product_name }}</p>{% block body %}{% endblock %}',
        ),
        ("password_changed.subject.txt", "Password changed (case 424242)"),
    ],
)
def test_an_operator_template_with_a_stray_six_digit_number_is_refused(
    tmp_path: Path, file: str, content: str
) -> None:
    (tmp_path / file).write_text(content, encoding="utf-8")
    name = file.split(".")[0] if not file.startswith("_") else "login_code"

    with pytest.raises(ValueError, match="six-digit number"):
        render(name, make_renderer(tmp_path))


def test_values_printed_side_by_side_cannot_make_a_six_digit_number(tmp_path: Path) -> None:
    (tmp_path / "password_changed.txt").write_text("{{ ip }}{{ device }}\n", encoding="utf-8")

    with pytest.raises(ValueError, match="six-digit number"):
        render("password_changed", make_renderer(tmp_path), ip="123", device="456")


def test_a_code_mail_must_show_the_code_on_a_line_of_its_own(tmp_path: Path) -> None:
    (tmp_path / "login_code.txt").write_text("Your code is {{ code }}.\n", encoding="utf-8")

    with pytest.raises(ValueError, match="line of its own"):
        render("login_code", make_renderer(tmp_path))


def test_markup_output_keeps_the_code_and_breaks_other_numbers(tmp_path: Path) -> None:
    (tmp_path / "login_code.html").write_text(
        "{% macro big(value) %}<b>{{ value }}</b>{% endmacro %}"
        '{{ big(code) }} {{ "654321"|safe }} {{ big("Build/987654") }}\n',
        encoding="utf-8",
    )

    mail = render("login_code", make_renderer(tmp_path))

    assert mail.html == f"<b>{CODE}</b> 654 321 <b>Build/987 654</b>\n"


def test_a_macro_in_a_text_template_keeps_the_code(tmp_path: Path) -> None:
    (tmp_path / "login_code.txt").write_text(
        "{% macro line(value) %}    {{ value }}{% endmacro %}"
        "Your code:\n\n{{ line(code) }}\n{{ line('Build/987654') }}\n",
        encoding="utf-8",
    )

    mail = render("login_code", make_renderer(tmp_path))

    assert mail.text == f"Your code:\n\n    {CODE}\n    Build/987 654\n"


def test_a_missing_context_value_is_an_error() -> None:
    renderer = make_renderer()
    with pytest.raises(UndefinedError):
        renderer.render("login_code", {}, {"code": CODE})
    with pytest.raises(UndefinedError):
        renderer.render("login_code", {"minutes": 10})
    with pytest.raises(UndefinedError):
        renderer.render("password_changed", {"at": AT})  # ip and device: None, not absent


def test_context_cannot_shadow_a_secret_or_a_setting() -> None:
    renderer = make_renderer()
    with pytest.raises(ValueError, match="clash"):
        renderer.render("login_code", {"minutes": 10, "code": "111111"}, {"code": CODE})
    with pytest.raises(ValueError, match="clash"):
        renderer.render(
            "password_changed", {**context_for("password_changed"), "security_url": "x"}
        )


def test_an_unknown_mail_is_an_error() -> None:
    with pytest.raises(TemplateNotFound):
        make_renderer().render("no_such_mail", {})


def test_settings_that_would_show_a_code_shaped_number_are_refused() -> None:
    # The name is no address or URL: it would be broken up in every mail.
    with pytest.raises(ConfigError, match="PRODUCT_NAME"):
        make_renderer(product_name="Acme 123456")
    # An address or URL is shown as is, so six digits may be part of one, but not stand
    # alone like a code.
    with pytest.raises(ConfigError, match="PRODUCT_URL"):
        make_renderer(product_url="123456")
    with pytest.raises(ConfigError, match="SECURITY_URL"):
        make_renderer(security_url="https://example.com/security 123456")
    with pytest.raises(ConfigError, match="SUPPORT_CONTACT"):
        make_renderer(support="call 123456")
    make_renderer(
        product_url="https://example.com/r/123456",
        security_url="https://example.com/123456/security",
        support="help-000000@example.com",
    )


def test_a_template_folder_that_is_not_a_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="MAIL_TEMPLATE_FOLDER"):
        make_renderer(tmp_path / "missing")


def test_from_settings(tmp_path: Path) -> None:
    (tmp_path / "login_code.subject.txt").write_text("Code for {{ security_url }}\n")
    settings = Settings(
        _env_file=None,
        product_name="Acme",
        product_url="https://acme.example.com",
        security_url=None,
        mail_template_folder=tmp_path,
    )

    mail = MailRenderer.from_settings(settings).render("login_code", {"minutes": 3}, {"code": CODE})

    assert mail.subject == "Code for https://acme.example.com"
    assert "Use this code to sign in to Acme" in mail.text

    settings.security_url = "https://acme.example.com/account"
    mail = MailRenderer.from_settings(settings).render("login_code", {"minutes": 3}, {"code": CODE})
    assert mail.subject == "Code for https://acme.example.com/account"


def test_format_time() -> None:
    moment = datetime(2026, 11, 27, 2, 15, 59, tzinfo=UTC)
    assert format_time(moment) == "27 Nov 2026, 02:15 UTC"
    assert format_time(datetime(2026, 3, 5, 23, 30, tzinfo=timezone(timedelta(hours=-2)))) == (
        "6 Mar 2026, 01:30 UTC"
    )
    with pytest.raises(ValueError, match="aware"):
        format_time(datetime(2026, 11, 27, 2, 15))


def test_a_datetime_value_is_printed_in_utc() -> None:
    moment = datetime(2026, 11, 27, 2, 15, tzinfo=UTC)
    assert "When: 27 Nov 2026, 02:15 UTC" in render("password_changed", at=moment).text

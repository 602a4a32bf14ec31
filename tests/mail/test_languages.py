"""Mails in the user's language: every built-in mail in every mail language, with the same
placeholders as the English one and none missing; the operator's files per language and
for all; the language an outbox row is written in; how a request's Accept-Language picks
one; DEFAULT_LOCALE."""

from __future__ import annotations

import shutil
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from jinja2 import TemplateNotFound, meta
from sqlalchemy import insert, select

from db.mail import render as render_module
from db.mail.languages import (
    ACCEPT_LANGUAGE_MAX,
    MAIL_LANGUAGES,
    bounded_accept_language,
    mail_language,
    preferred_language,
)
from db.mail.outbox import Outbox
from db.mail.render import (
    BUILTIN_TEMPLATES,
    CODE_MAILS,
    MAIL_TEMPLATES,
    MailRenderer,
    format_time,
)
from db.models import OutboxMail, User
from db.session import Statements
from db.settings import ConfigError, Settings
from tests.conftest import MutableClock, unique_email
from tests.mail.test_outbox import BOX
from tests.mail.test_render import CODE, HOSTILE, context_for, make_renderer
from tests.smtp import CODE_LINE, SIX_DIGITS

OTHERS = tuple(language for language in MAIL_LANGUAGES if language != "en")
PARTS = (".subject.txt", ".txt", ".html")
MOMENT = datetime(2026, 12, 1, 2, 15, tzinfo=UTC)


def files_of(language: str) -> set[str]:
    return {path.name for path in (BUILTIN_TEMPLATES / language).iterdir()}


def placeholders(language: str, name: str) -> set[str]:
    """The variables a built-in file uses (its own, not its layout's)."""
    source = (BUILTIN_TEMPLATES / language / name).read_text(encoding="utf-8")
    return meta.find_undeclared_variables(make_renderer().envs[language].parse(source))


def render_in(
    language: str, name: str, renderer: MailRenderer | None = None, **overrides: Any
) -> Any:
    secrets = {"code": CODE} if name in CODE_MAILS else None
    return (renderer or make_renderer()).render(
        name, context_for(name, **overrides), secrets, language=language
    )


def test_the_mail_languages() -> None:
    assert MAIL_LANGUAGES == ("en", "de", "fr", "es")
    assert {path.name for path in BUILTIN_TEMPLATES.iterdir()} == set(MAIL_LANGUAGES)


@pytest.mark.parametrize("language", MAIL_LANGUAGES)
def test_every_language_has_every_file(language: str) -> None:
    wanted = {f"{name}{part}" for name in MAIL_TEMPLATES for part in PARTS}
    wanted |= {
        f"_{layout}.{ext}" for layout in ("layout", "code", "notice") for ext in ("txt", "html")
    }
    assert files_of(language) == wanted


@pytest.mark.parametrize("language", OTHERS)
def test_every_file_uses_the_placeholders_of_the_english_one(language: str) -> None:
    # StrictUndefined finds a misspelled one when rendering; this finds one left out.
    for name in sorted(files_of("en")):
        assert placeholders(language, name) == placeholders("en", name), (language, name)


@pytest.mark.parametrize("language", MAIL_LANGUAGES)
@pytest.mark.parametrize("name", MAIL_TEMPLATES)
def test_every_mail_renders_in_every_language(language: str, name: str) -> None:
    mail = render_in(language, name, at=MOMENT.isoformat())

    assert mail.subject and "\n" not in mail.subject
    assert "Strawgate" in mail.text and "https://auth.example.com" in mail.text
    assert mail.html.startswith("<!DOCTYPE html>")
    assert f'<html lang="{language}">' in mail.html
    assert "{{" not in mail.text + mail.html and "{%" not in mail.text + mail.html
    if name in CODE_MAILS:
        assert CODE_LINE.findall(mail.text) == [CODE]
        assert f">{CODE}</p>" in mail.html
        assert CODE not in mail.subject
        assert "10" in mail.text and "10" in mail.html  # the code's lifetime
    else:
        assert CODE_LINE.findall(mail.text) == []
        for part in (mail.text, mail.html):
            assert format_time(MOMENT, language) in part
            assert "Firefox on Linux" in part and "203.0.113.7" in part


@pytest.mark.parametrize("language", OTHERS)
@pytest.mark.parametrize("name", MAIL_TEMPLATES)
def test_no_language_is_english_in_disguise(language: str, name: str) -> None:
    english, translated = render_in("en", name), render_in(language, name)

    assert translated.subject != english.subject
    assert translated.text.splitlines()[0] != english.text.splitlines()[0]  # the greeting
    body = [line for line in translated.text.splitlines() if line not in english.text]
    assert len(body) >= 3, body  # more than the greeting: the mail's own words


@pytest.mark.parametrize("language", MAIL_LANGUAGES)
@pytest.mark.parametrize("name", MAIL_TEMPLATES)
def test_no_language_shows_another_six_digit_number(language: str, name: str) -> None:
    context = {key: HOSTILE[key] for key in context_for(name)}
    secrets = {"code": CODE} if name in CODE_MAILS else None

    mail = make_renderer().render(name, context, secrets, language=language)

    content = f"{mail.subject}\n{mail.text}\n{mail.html}".replace(HOSTILE["new_email"], " ")
    assert [number for number in SIX_DIGITS.findall(content) if number != CODE] == []
    assert CODE_LINE.findall(mail.text) == ([CODE] if name in CODE_MAILS else [])


@pytest.mark.parametrize("language", MAIL_LANGUAGES)
def test_addresses_and_urls_are_shown_as_they_are_in_every_language(language: str) -> None:
    renderer = make_renderer(
        product_url="https://example.com/r/123456",
        security_url="https://example.com/r/654321/security",
        support="help-000000@example.org",
    )
    changed = render_in(language, "email_changed", renderer, new_email="moved-8c176159@example.org")
    for part in (changed.text, changed.html):
        assert "moved-8c176159@example.org" in part
        assert "help-000000@example.org" in part
        assert "https://example.com/r/123456" in part
    linked = render_in(language, "identity_linked", renderer)
    assert "https://example.com/r/654321/security" in linked.text


@pytest.mark.parametrize(
    ("language", "one", "many"),
    [
        ("en", "1 minute.", "10 minutes."),
        ("de", "1 Minute gültig.", "10 Minuten gültig."),
        ("fr", "1 minute.", "10 minutes."),
        ("es", "1 minuto.", "10 minutos."),
    ],
)
def test_the_code_lifetime_agrees_with_its_number(language: str, one: str, many: str) -> None:
    assert one in render_in(language, "login_code", minutes=1).text
    assert many in render_in(language, "login_code", minutes=10).html


@pytest.mark.parametrize(
    ("language", "none", "one", "some"),
    [
        ("en", "no recovery codes left", "1 recovery code left", "7 recovery codes left"),
        ("de", "keine Wiederherstellungscodes mehr", "noch 1 Wiederherstellungscode.", "noch 7"),
        ("fr", "aucun code de récupération", "reste 1 code de récupération", "reste 7 codes"),
        ("es", "No te quedan códigos", "Te queda 1 código", "Te quedan 7 códigos"),
    ],
)
def test_the_recovery_codes_left_agree_with_their_number(
    language: str, none: str, one: str, some: str
) -> None:
    assert none in render_in(language, "recovery_code_used", remaining=0).text
    assert one in render_in(language, "recovery_code_used", remaining=1).html
    assert some in render_in(language, "recovery_code_used", remaining=7).text


@pytest.mark.parametrize("language", MAIL_LANGUAGES)
def test_a_notice_leaves_out_what_is_unknown_in_every_language(language: str) -> None:
    mail = render_in(language, "password_changed", ip=None, device=None)
    known = render_in(language, "password_changed")
    for part, full in ((mail.text, known.text), (mail.html, known.html)):
        assert "None" not in part
        assert len(part.splitlines()) < len(full.splitlines())


def test_a_moment_is_shown_in_the_mails_language() -> None:
    assert format_time(MOMENT) == "1 Dec 2026, 02:15 UTC"
    assert format_time(MOMENT, "de") == "1. Dezember 2026 um 02:15 UTC"
    assert format_time(MOMENT, "fr") == "1er décembre 2026 à 02:15 UTC"
    assert format_time(MOMENT.replace(day=27), "fr") == "27 décembre 2026 à 02:15 UTC"
    assert format_time(MOMENT, "es") == "1 de diciembre de 2026, 02:15 UTC"
    assert format_time(MOMENT, "xx") == "1 Dec 2026, 02:15 UTC"

    # The outbox keeps `at` as ISO 8601; a moment already written out is shown as it is.
    at = MOMENT.isoformat()
    assert "Zeitpunkt: 1. Dezember 2026 um 02:15 UTC" in render_in("de", "totp_enabled", at=at).text
    assert "When: 1 Dec 2026, 02:15 UTC" in render_in("en", "totp_enabled", at=at).text
    kept = render_in("de", "totp_enabled", at="27 Nov 2026, 02:15 UTC").text
    assert "Zeitpunkt: 27 Nov 2026, 02:15 UTC" in kept
    naive = render_in("en", "totp_enabled", at="2026-12-01T02:15:00").text
    assert "When: 2026-12-01T02:15:00" in naive  # no zone: not taken for a moment


def test_a_built_in_language_never_borrows_english(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copy = tmp_path / "templates"
    shutil.copytree(BUILTIN_TEMPLATES, copy)
    (copy / "de" / "login_code.txt").unlink()
    (copy / "fr" / "_layout.html").unlink()
    monkeypatch.setattr(render_module, "BUILTIN_TEMPLATES", copy)
    renderer = make_renderer()

    with pytest.raises(TemplateNotFound, match=r"login_code\.txt"):
        render_in("de", "login_code", renderer)
    with pytest.raises(TemplateNotFound, match=r"_layout\.html"):
        render_in("fr", "password_changed", renderer)
    assert render_in("en", "login_code", renderer).subject.startswith("Your sign-in code")
    assert render_in("es", "login_code", renderer).subject.startswith("Tu código")


def test_an_operator_file_for_one_language_and_for_all(tmp_path: Path) -> None:
    (tmp_path / "de").mkdir()
    (tmp_path / "login_code.subject.txt").write_text("{{ product_name }}: code ({{ language }})\n")
    (tmp_path / "de" / "login_code.subject.txt").write_text("Ihr Code für {{ product_name }}\n")
    (tmp_path / "de" / "_layout.txt").write_text(
        "Guten Tag,\n\n{% block body %}{% endblock %}\nIhr {{ product_name }}-Team\n"
    )
    renderer = make_renderer(tmp_path)

    german = render_in("de", "login_code", renderer)
    assert german.subject == "Ihr Code für Strawgate"
    assert german.text.startswith("Guten Tag,\n\nMit diesem Code melden Sie sich")  # built-in
    assert german.text.endswith("Ihr Strawgate-Team\n")
    assert CODE_LINE.findall(german.text) == [CODE]
    # The file at the top serves every language without one of its own.
    assert render_in("fr", "login_code", renderer).subject == "Strawgate: code (fr)"
    assert render_in("en", "login_code", renderer).subject == "Strawgate: code (en)"
    french = render_in("fr", "login_code", renderer)
    assert french.text.startswith("Bonjour,\n\nUtilisez ce code")  # the German layout is German
    assert render_in("es", "password_changed", renderer).subject.startswith("Se ha cambiado")


def test_a_flat_operator_layout_serves_every_language(tmp_path: Path) -> None:
    (tmp_path / "_layout.txt").write_text(
        '{{ {"de": "Hallo", "fr": "Bonjour"}.get(language, "Hello") }} from Acme,\n\n'
        "{% block body %}{% endblock %}\n"
    )
    renderer = make_renderer(tmp_path)

    assert render_in("de", "password_changed", renderer).text.startswith("Hallo from Acme,\n\n")
    assert render_in("fr", "login_code", renderer).text.startswith("Bonjour from Acme,\n\n")
    assert render_in("es", "login_code", renderer).text.startswith("Hello from Acme,\n\nUsa")


def test_the_mails_language_is_the_rows_else_the_default() -> None:
    renderer = make_renderer()
    assert renderer.language(None) == "en"
    assert renderer.language("de") == "de"
    assert renderer.language("de-AT") == "de"
    assert renderer.language("ja") == "en"
    spanish = MailRenderer(
        product_name="Strawgate",
        product_url="https://auth.example.com",
        security_url="https://auth.example.com/security",
        template_folder=None,
        default_language="es",
    )
    assert spanish.language(None) == "es"
    assert spanish.render("login_code", {"minutes": 5}, {"code": CODE}).subject.startswith("Tu")
    assert render_in("en", "login_code", spanish).subject.startswith("Your")


def test_the_language_is_no_context_value() -> None:
    with pytest.raises(ValueError, match="clash"):
        make_renderer().render("login_code", {"minutes": 5, "language": "de"}, {"code": CODE})


def test_default_locale_must_be_a_mail_language(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"DEFAULT_LOCALE must be one of the mail languages"):
        MailRenderer(
            product_name="Strawgate",
            product_url="https://auth.example.com",
            security_url="https://auth.example.com",
            template_folder=None,
            default_language="it",
        )
    for wrong in ("it", "de-AT", "EN", ""):
        settings = Settings(_env_file=None, secret_key="x" * 40, default_locale=wrong)
        with pytest.raises(ConfigError, match=r"DEFAULT_LOCALE must be one of .*en, de, fr, es"):
            settings.prepare()
    for right in MAIL_LANGUAGES:
        Settings(_env_file=None, secret_key="x" * 40, default_locale=right).prepare()
    settings = Settings(_env_file=None, default_locale="fr", mail_template_folder=tmp_path)
    assert MailRenderer.from_settings(settings).default_language == "fr"


# -- choosing the language ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "language"),
    [
        ("fr-CH, de;q=0.5", "fr"),
        ("de;q=0.5, fr-CH", "fr"),  # by weight, not by place
        ("de-AT,de;q=0.9,en;q=0.8", "de"),
        ("ja, es-419;q=0.3", "es"),  # the best of the mail languages
        ("en;q=0.5, es;q=0.5", "en"),  # the first of equals
        ("ES-mx", "es"),
        ("de ; q=0.7, fr;q=0.6", "de"),
        ("fr;q=0, fr-CA, de;q=0.1", "de"),  # q=0: not French, whatever else says so
        ("ja", None),
        ("*", None),
        ("", None),
        (None, None),
        ("de;q=2, fr;q=x, es;level=1", None),  # malformed entries say nothing
        ("deutsch, x-klingon", None),
    ],
)
def test_accept_language_picks_the_best_mail_language(header: str | None, language: str) -> None:
    assert preferred_language(header) == language


def test_accept_language_is_kept_to_whole_entries() -> None:
    long = ", ".join(["ja;q=0.9"] * 60 + ["fr"])
    kept = bounded_accept_language(long)
    assert kept is not None and len(kept) <= ACCEPT_LANGUAGE_MAX
    assert kept.endswith("ja;q=0.9")  # never "ja;q=0." or "j"
    assert bounded_accept_language("x" * (ACCEPT_LANGUAGE_MAX + 1)) is None
    assert bounded_accept_language("  de  ") == "de"
    assert bounded_accept_language(None) is None


def test_a_locale_maps_to_its_mail_language() -> None:
    assert [mail_language(tag) for tag in ("de-AT", "fr", "es-419", "zh-Hant-TW", "", None)] == [
        "de",
        "fr",
        "es",
        None,
        None,
        None,
    ]


# -- the outbox row's language -----------------------------------------------------------------


async def add_user(statements: Statements, *, locale: str | None, signup: str | None) -> uuid.UUID:
    user_id = uuid.uuid4()
    email = unique_email()
    now = datetime.now(UTC)
    async with statements.engine.begin() as conn:
        await conn.execute(
            insert(User).values(
                id=user_id,
                email=email,
                email_normalized=email,
                is_active=True,
                created_at=now,
                updated_at=now,
                locale=locale,
                signup_locale=signup,
            )
        )
    return user_id


async def queued_language(
    statements: Statements, clock: MutableClock, user_id: uuid.UUID | None, **more: Any
) -> str | None:
    outbox = Outbox(box=BOX, clock=clock, postgres=True)
    async with statements.transaction() as tx:
        mail_id = await outbox.enqueue(
            tx, user_id=user_id, recipient=unique_email(), template="x", context={}, **more
        )
    async with statements.engine.connect() as conn:
        found = await conn.execute(select(OutboxMail.language).where(OutboxMail.id == mail_id))
        language: str | None = found.scalar_one()
    return language


async def test_a_mail_is_queued_in_its_owners_language(
    statements: Statements, clock: MutableClock
) -> None:
    cases: list[tuple[str | None, str | None, str | None]] = [
        # (users.locale, users.signup_locale): the mail's language
        ("de-AT", "fr", "de"),
        ("es", None, "es"),
        (None, "fr", "fr"),
        (None, None, None),
        # A locale of no mail language (none is stored so) gives way to the signup's.
        ("ja", "fr", "fr"),
    ]
    for locale, signup, language in cases:
        user_id = await add_user(statements, locale=locale, signup=signup)
        assert await queued_language(statements, clock, user_id) == language, (locale, signup)
        outbox = Outbox(box=BOX, clock=clock, postgres=True)
        async with statements.transaction() as tx:
            assert await outbox.language_of(tx, user_id) == language


async def test_a_mail_without_an_owner_is_in_the_language_given_else_the_default(
    statements: Statements, clock: MutableClock
) -> None:
    assert await queued_language(statements, clock, None) is None
    assert await queued_language(statements, clock, None, language="de-AT") == "de"
    assert await queued_language(statements, clock, None, language="ja") is None
    # Given, it wins over the owner's.
    owner = await add_user(statements, locale="fr", signup=None)
    assert await queued_language(statements, clock, owner, language="es") == "es"
    outbox = Outbox(box=BOX, clock=clock, postgres=True)
    async with statements.transaction() as tx:
        assert await outbox.language_of(tx, uuid.uuid4()) is None  # no such user

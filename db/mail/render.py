"""Mails from Jinja2 templates: a subject, a plain-text part and an HTML part per mail,
in each of the mail languages.

Each mail N has three files, N.subject.txt, N.txt and N.html, per language L. They are
looked up, as are the layouts they extend (`_layout.*`, `_code.*`, `_notice.*`), in
MAIL_TEMPLATE_FOLDER/L/, then MAIL_TEMPLATE_FOLDER/ (a file there serves every language),
then the built-in db/mail/templates/L/: an operator replaces any single file, for one
language or for all. A built-in language never borrows another's files: each folder is
complete (tests/mail/test_languages.py).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jinja2 import (
    ChoiceLoader,
    Environment,
    FileSystemLoader,
    StrictUndefined,
    pass_context,
    select_autoescape,
)
from jinja2.runtime import Context
from markupsafe import Markup, escape

from db.mail.languages import MAIL_LANGUAGES as MAIL_LANGUAGES
from db.mail.languages import mail_language
from db.mail.message import RenderedMail
from db.settings import ConfigError

if TYPE_CHECKING:
    from db.settings import Settings

BUILTIN_TEMPLATES = Path(__file__).parent / "templates"

# The built-in mails; the ones that carry a code get secrets={"code": ...}.
CODE_MAILS = (
    "verify_email",
    "login_code",
    "password_reset_code",
    "change_email_code",
    "reauthenticate_code",
)
NOTICE_MAILS = (
    "password_changed",
    "password_reset",
    "totp_enabled",
    "totp_disabled",
    "recovery_code_used",
    "new_device",
    "email_changed",
    "account_deleted",
    "passkey_added",
    "passkey_removed",
    "identity_linked",
    "identity_unlinked",
)
MAIL_TEMPLATES = CODE_MAILS + NOTICE_MAILS
# MAIL_LANGUAGES (db/mail/languages.py): the languages the mails are written in.

# A standalone run of exactly six digits: what a reader (or a mail client's "copy code"
# button) takes for a code.
SIX_DIGITS = re.compile(r"(?<!\d)\d{6}(?!\d)")
# Six digits with nothing attached on either side: a code to a reader, even in a value
# shown as is (an address or a URL never has one).
LONE_SIX_DIGITS = re.compile(r"(?<!\S)\d{6}(?!\S)")

# The values shown exactly as they are, by name (the context comes back from the outbox
# as JSON, so the name is what survives): addresses and URLs. Altering one would show the
# user a wrong address or break a link; a six-digit run inside one is part of it.
VERBATIM_KEYS = frozenset(
    {"email", "new_email", "account", "product_url", "security_url", "support"}
)

# The values that are a moment, by name: a notice's `at` comes from the outbox as ISO 8601
# text and is shown in the mail's language (see format_time).
TIME_KEYS = frozenset({"at"})

_MONTHS = {
    "en": ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"),
    "de": (
        "Januar", "Februar", "März", "April", "Mai", "Juni",
        "Juli", "August", "September", "Oktober", "November", "Dezember",
    ),
    "fr": (
        "janvier", "février", "mars", "avril", "mai", "juin",
        "juillet", "août", "septembre", "octobre", "novembre", "décembre",
    ),
    "es": (
        "enero", "febrero", "marzo", "abril", "mayo", "junio",
        "julio", "agosto", "septiembre", "octubre", "noviembre", "diciembre",
    ),
}  # fmt: skip


class Code(str):
    """The one value a mail may print as six digits in a row."""

    __slots__ = ()


class Verbatim(str):
    """An address or a URL: printed exactly as it is, six-digit runs and all."""

    __slots__ = ()


def _verbatim(name: str, value: str) -> Verbatim:
    if LONE_SIX_DIGITS.search(value):
        raise ValueError(f"{name} shows six digits standing alone, like a code")
    return Verbatim(value)


def format_time(dt: datetime, language: str = "en") -> str:
    """`dt` in UTC for a mail in `language`: "27 Nov 2026, 02:15 UTC", "27. November 2026
    um 02:15 UTC", "27 novembre 2026 à 02:15 UTC", "27 de noviembre de 2026, 02:15 UTC"
    (English for a language it does not know)."""
    if dt.tzinfo is None:
        raise ValueError("format_time needs an aware datetime")
    utc = dt.astimezone(UTC)
    month = _MONTHS.get(language, _MONTHS["en"])[utc.month - 1]
    if language == "de":
        return f"{utc.day}. {month} {utc.year} um {utc:%H:%M} UTC"
    if language == "fr":
        day = "1er" if utc.day == 1 else str(utc.day)
        return f"{day} {month} {utc.year} à {utc:%H:%M} UTC"
    if language == "es":
        return f"{utc.day} de {month} de {utc.year}, {utc:%H:%M} UTC"
    return f"{utc.day} {month} {utc.year}, {utc:%H:%M} UTC"


def _moment(value: Any) -> Any:
    """An aware ISO 8601 timestamp as a datetime (format_time shows it); anything else as
    it is (a moment written as text already, by a mail queued before the outbox kept
    timestamps)."""
    if not isinstance(value, str):
        return value
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return value
    return moment if moment.tzinfo is not None else value


def _stray_six_digits(text: str, keep: Iterable[str]) -> list[re.Match[str]]:
    """The six-digit runs of `text` that lie inside no occurrence of a `keep` string."""
    spans: list[tuple[int, int]] = []
    for value in {value for value in keep if value}:
        start = text.find(value)
        while start != -1:
            spans.append((start, start + len(value)))
            start = text.find(value, start + 1)
    return [
        match
        for match in SIX_DIGITS.finditer(text)
        if not any(start <= match.start() and match.end() <= end for start, end in spans)
    ]


def _break_six_digits(text: str, keep: Iterable[str] = ()) -> str:
    # "123456" becomes "123 456": still readable, no longer a code-shaped number.
    pieces: list[str] = []
    done = 0
    for match in _stray_six_digits(text, keep):
        run = match.group()
        pieces += [text[done : match.start()], run[:3], " ", run[3:]]
        done = match.end()
    return "".join([*pieces, text[done:]])


def _kept(variables: Mapping[str, Any]) -> list[str]:
    """What may show six digits in a row: the code and the verbatim values, text and HTML."""
    kept = [value for value in variables.values() if isinstance(value, Code | Verbatim)]
    return [*kept, *(str(escape(value)) for value in kept)]


@pass_context
def _finalize(context: Context, value: Any) -> Any:
    """Every printed value passes here: no other value may show a code-shaped number."""
    if isinstance(value, Code | Verbatim):
        return value
    # A macro's or super()'s output holds the code and the addresses it printed already:
    # keep those, break any other run.
    keep = _kept({key: context.get(key) for key in ("code", *VERBATIM_KEYS)})
    if isinstance(value, Markup):
        return Markup(_break_six_digits(str(value), keep))  # noqa: S704 - was Markup already
    if isinstance(value, datetime):
        value = format_time(value, context.get("language", "en"))
    return _break_six_digits(str(value), keep)


def _environment(template_folder: Path | None, language: str) -> Environment:
    """The templates of `language`: the operator's for it, the operator's for every
    language, the built-in ones of that language (never another language's)."""
    folders: list[Path] = []
    if template_folder is not None:
        folders += [template_folder / language, template_folder]
    folders.append(BUILTIN_TEMPLATES / language)
    return Environment(
        loader=ChoiceLoader([FileSystemLoader(folder) for folder in folders if folder.is_dir()]),
        undefined=StrictUndefined,
        # HTML-escape the HTML part only: plain text and subjects are shown as is.
        autoescape=select_autoescape(
            enabled_extensions=("html",), default_for_string=False, default=False
        ),
        finalize=_finalize,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )


class MailRenderer:
    def __init__(
        self,
        *,
        product_name: str,
        product_url: str,
        security_url: str,
        template_folder: Path | None,
        support: str = "",
        default_language: str = "en",
    ) -> None:
        if default_language not in MAIL_LANGUAGES:
            raise ConfigError(
                f"DEFAULT_LOCALE must be one of the mail languages ({', '.join(MAIL_LANGUAGES)})"
            )
        self.default_language = default_language
        if SIX_DIGITS.search(product_name):
            # It would be broken up in every mail, subjects included.
            raise ConfigError(
                "PRODUCT_NAME contains six digits in a row; mails show no such number "
                "besides the code"
            )
        verbatim: dict[str, Verbatim] = {}
        for setting, key, value in (
            ("PRODUCT_URL", "product_url", product_url),
            ("SECURITY_URL", "security_url", security_url),
            ("SUPPORT_CONTACT", "support", support),
        ):
            # Shown as is: a run inside the address or URL is part of it, but six digits
            # standing alone would read as a code in every mail.
            try:
                verbatim[key] = _verbatim(setting, value)
            except ValueError as exc:
                raise ConfigError(f"{exc}; mails show no such number besides the code") from None
        if template_folder is not None and not template_folder.is_dir():
            raise ConfigError(f"MAIL_TEMPLATE_FOLDER {template_folder} is not a folder")
        self.globals: dict[str, str] = {
            "product_name": product_name,
            "product_url": verbatim["product_url"],
            "security_url": verbatim["security_url"],
            # Where users get help: SUPPORT_CONTACT, else MAIL_FROM (empty: a reply).
            "support": verbatim["support"],
        }
        # One environment per language: a template's `extends` finds the layout of its
        # own language, by the same lookup order.
        self.envs = {
            language: _environment(template_folder, language) for language in MAIL_LANGUAGES
        }

    def language(self, tag: str | None) -> str:
        """The language a mail is rendered in: `tag`'s (an outbox row's), else the default."""
        return mail_language(tag) or self.default_language

    @classmethod
    def from_settings(cls, settings: Settings) -> MailRenderer:
        return cls(
            product_name=settings.product_name,
            product_url=settings.product_url,
            security_url=settings.security_url or settings.product_url,
            template_folder=settings.mail_template_folder,
            support=settings.support_contact or settings.mail_from or "",
            default_language=settings.default_locale,
        )

    def render(
        self,
        template: str,
        context: Mapping[str, Any],
        secrets: Mapping[str, str] | None = None,
        language: str | None = None,
    ) -> RenderedMail:
        """Renders mail `template` in `language` (None: the default language); `secrets`
        holds what must never be logged (the code)."""
        language = self.language(language)
        env = self.envs[language]
        hidden = {key: str(value) for key, value in (secrets or {}).items()}
        code = Code(hidden["code"]) if "code" in hidden else None
        if code is not None:
            hidden["code"] = code
        reserved = {*self.globals, "language"}
        clash = (set(context) & set(hidden)) | ((set(context) | set(hidden)) & reserved)
        if clash:
            raise ValueError(f"mail {template}: context keys clash: {sorted(clash)}")
        shown = {
            key: _verbatim(f"mail {template}: {key}", value)
            if key in VERBATIM_KEYS and isinstance(value, str)
            else _moment(value)
            if key in TIME_KEYS
            else value
            for key, value in context.items()
        }
        # `language`: for an operator's template that serves every language.
        variables = {**self.globals, "language": language, **shown, **hidden}
        keep = _kept(variables)

        subject = env.get_template(f"{template}.subject.txt").render(variables)
        # One line, whatever a value held: a newline in a header would start a new one.
        subject = " ".join(subject.split())
        text = env.get_template(f"{template}.txt").render(variables)
        html = env.get_template(f"{template}.html").render(variables)

        # The safety net behind finalize: a number written into a template itself, or
        # two values printed side by side (a run only partly inside an address counts).
        for part, content in (("subject", subject), ("text", text), ("html", html)):
            if _stray_six_digits(content, keep):
                raise ValueError(
                    f"mail {template}: the {part} shows a six-digit number that is not the code"
                )
        if code is not None:
            lines = [line.strip() for line in text.splitlines()]
            if lines.count(code) != 1:
                raise ValueError(
                    f"mail {template}: the plain-text part must show the code once, "
                    "on a line of its own"
                )
        if not subject or not text.strip() or not html.strip():
            raise ValueError(f"mail {template}: empty subject or body")
        return RenderedMail(subject=subject, text=text, html=html)

"""Mails from Jinja2 templates: a subject, a plain-text part and an HTML part per mail.

Each mail N has three files, N.subject.txt, N.txt and N.html, looked up first in the
operator's MAIL_TEMPLATE_FOLDER and then in the built-in folder, so an operator can
replace any single file (the shared layouts `_layout.*` too).
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
# The languages the mails are written in (a user's `locale` must be one of them).
MAIL_LANGUAGES = ("en",)

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

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


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


def format_time(dt: datetime) -> str:
    """`dt` in UTC for a mail, e.g. "27 Nov 2026, 02:15 UTC" (month names never localised)."""
    if dt.tzinfo is None:
        raise ValueError("format_time needs an aware datetime")
    utc = dt.astimezone(UTC)
    return f"{utc.day} {_MONTHS[utc.month - 1]} {utc.year}, {utc:%H:%M} UTC"


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
        value = format_time(value)
    return _break_six_digits(str(value), keep)


class MailRenderer:
    def __init__(
        self,
        *,
        product_name: str,
        product_url: str,
        security_url: str,
        template_folder: Path | None,
        support: str = "",
    ) -> None:
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
        loaders = []
        if template_folder is not None:
            if not template_folder.is_dir():
                raise ConfigError(f"MAIL_TEMPLATE_FOLDER {template_folder} is not a folder")
            loaders.append(FileSystemLoader(template_folder))
        loaders.append(FileSystemLoader(BUILTIN_TEMPLATES))
        self.globals: dict[str, str] = {
            "product_name": product_name,
            "product_url": verbatim["product_url"],
            "security_url": verbatim["security_url"],
            # Where users get help: SUPPORT_CONTACT, else MAIL_FROM (empty: a reply).
            "support": verbatim["support"],
        }
        self.env = Environment(
            loader=ChoiceLoader(loaders),
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

    @classmethod
    def from_settings(cls, settings: Settings) -> MailRenderer:
        return cls(
            product_name=settings.product_name,
            product_url=settings.product_url,
            security_url=settings.security_url or settings.product_url,
            template_folder=settings.mail_template_folder,
            support=settings.support_contact or settings.mail_from or "",
        )

    def render(
        self,
        template: str,
        context: Mapping[str, Any],
        secrets: Mapping[str, str] | None = None,
    ) -> RenderedMail:
        """Renders mail `template`; `secrets` holds what must never be logged (the code)."""
        hidden = {key: str(value) for key, value in (secrets or {}).items()}
        code = Code(hidden["code"]) if "code" in hidden else None
        if code is not None:
            hidden["code"] = code
        clash = (set(context) & set(hidden)) | ((set(context) | set(hidden)) & set(self.globals))
        if clash:
            raise ValueError(f"mail {template}: context keys clash: {sorted(clash)}")
        shown = {
            key: _verbatim(f"mail {template}: {key}", value)
            if key in VERBATIM_KEYS and isinstance(value, str)
            else value
            for key, value in context.items()
        }
        variables = {**self.globals, **shown, **hidden}
        keep = _kept(variables)

        subject = self.env.get_template(f"{template}.subject.txt").render(variables)
        # One line, whatever a value held: a newline in a header would start a new one.
        subject = " ".join(subject.split())
        text = self.env.get_template(f"{template}.txt").render(variables)
        html = self.env.get_template(f"{template}.html").render(variables)

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

"""The languages mails are written in, and how a mail's language is chosen: the user's
`locale` (updateProfile), else the language their signup request asked for (its
Accept-Language), else DEFAULT_LOCALE."""

from __future__ import annotations

import re

# The languages every built-in mail is written in (db/mail/templates/<language>/); a
# user's `locale` must be one of them, as DEFAULT_LOCALE must.
MAIL_LANGUAGES = ("en", "de", "fr", "es")

# What a request's Accept-Language is kept to (ClientInfo): a browser sends a few dozen
# characters; nobody's preferences need more.
ACCEPT_LANGUAGE_MAX = 256

# One language range of Accept-Language (RFC 9110 12.5.4, RFC 4647 2.1), with its weight.
_RANGE = re.compile(r"([A-Za-z]{1,8}(?:-[A-Za-z0-9]{1,8})*|\*)")
_WEIGHT = re.compile(r"[qQ]=(0(?:\.[0-9]{0,3})?|1(?:\.0{0,3})?)")


def mail_language(tag: str | None) -> str | None:
    """The mail language of a language tag ("de-AT" is "de"); None for one of no mail
    language."""
    if not tag:
        return None
    language = tag.strip().split("-", 1)[0].lower()
    return language if language in MAIL_LANGUAGES else None


def bounded_accept_language(header: str | None) -> str | None:
    """An Accept-Language header as a request's client facts keep it: at most
    ACCEPT_LANGUAGE_MAX characters, cut after a whole entry (a range cut in two, or cut
    from its weight, would ask for something else)."""
    if not header:
        return None
    if len(header) > ACCEPT_LANGUAGE_MAX:
        header = header[: header.rfind(",", 0, ACCEPT_LANGUAGE_MAX + 1) + 1].rstrip(",")
    return header.strip() or None


def preferred_language(
    header: str | None, languages: tuple[str, ...] = MAIL_LANGUAGES
) -> str | None:
    """The best of `languages` for an Accept-Language header (the highest weight; the
    first listed among equals); None when it asks for none of them. A range counts by its
    primary language ("fr-CH" asks for "fr"); "*" and malformed entries ask for nothing,
    and a weight of 0 refuses a language."""
    if not header:
        return None
    wanted: list[tuple[float, str]] = []
    refused: set[str] = set()
    for entry in header.split(","):
        name, *parameters = (part.strip() for part in entry.split(";"))
        if name == "*" or _RANGE.fullmatch(name) is None:
            continue
        weight = 1.0
        for parameter in parameters:
            given = _WEIGHT.fullmatch(parameter.replace(" ", ""))
            if given is None:
                weight = -1.0  # a malformed parameter: the entry says nothing
                break
            weight = float(given.group(1))
        language = name.split("-", 1)[0].lower()
        if language not in languages or weight < 0:
            continue
        if weight == 0:
            refused.add(language)
        else:
            wanted.append((weight, language))
    best: tuple[float, str] | None = None
    for weight, language in wanted:
        if language not in refused and (best is None or weight > best[0]):
            best = (weight, language)
    return best[1] if best is not None else None

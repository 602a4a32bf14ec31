"""The language of a user's mails, through the API and a real SMTP server: the locale the
user set (updateProfile), else what the signup request's Accept-Language asked for, else
DEFAULT_LOCALE; a deletion's last notice in it too. AuthError messages stay English
(clients translate by code)."""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import create_async_engine

from db.models import User
from db.settings import Settings
from graph.app import create_app
from tests.conftest import PASSWORD, MutableClock, client_for, unique_email
from tests.gql import LOGIN, REQUEST_LOGIN_CODE, SIGNUP, gql, verify_otp
from tests.identities import ID_TOKEN, provider_settings, user_claims
from tests.identity_provider import LocalProvider
from tests.smtp import SmtpSink

UPDATE_PROFILE = """mutation($i: UpdateProfileInput!) { updateProfile(input: $i) {
  __typename ... on User { locale } ... on AuthError { code message field } } }"""
DELETE_ACCOUNT = """mutation($i: DeleteAccountInput!) { deleteAccount(input: $i) {
  __typename ... on AuthError { code message } } }"""

# The subjects of the verification and sign-in code mails (PRODUCT_NAME "Strawgate").
VERIFY = {
    "en": "Confirm your email address for Strawgate",
    "de": "Bestätigen Sie Ihre E-Mail-Adresse für Strawgate",
    "fr": "Confirmez votre adresse e-mail pour Strawgate",
    "es": "Confirma tu dirección de correo electrónico para Strawgate",
}
LOGIN_CODE = {
    "en": "Your sign-in code for Strawgate",
    "de": "Ihr Anmeldecode für Strawgate",
    "fr": "Votre code de connexion à Strawgate",
    "es": "Tu código de inicio de sesión para Strawgate",
}

MailApp = Callable[..., Any]


@pytest.fixture
def mail_app_with(
    make_settings: Callable[..., Settings], clock: MutableClock, clean_db: None, smtp: SmtpSink
) -> MailApp:
    """An app with email verification on and mail going to `smtp`, with `overrides`."""

    @asynccontextmanager
    async def running(**overrides: Any) -> AsyncIterator[httpx.AsyncClient]:
        settings = make_settings(require_email_verification=True, **smtp.settings(), **overrides)
        app = create_app(settings, clock=clock)
        async with app.router.lifespan_context(app), client_for(app) as client:
            yield client

    return running


def language_header(accept_language: str | None) -> dict[str, str]:
    return {"accept-language": accept_language} if accept_language is not None else {}


async def sign_up(
    client: httpx.AsyncClient, smtp: SmtpSink, accept_language: str | None
) -> tuple[str, str, str]:
    """A signup sent with `accept_language`: (address, verification mail's subject, access
    token once the mailed code is given back)."""
    email = unique_email()
    body = await gql(
        client,
        SIGNUP,
        {"i": {"email": email, "password": PASSWORD}},
        headers=language_header(accept_language),
    )
    challenge = body["data"]["signup"]
    assert challenge["__typename"] == "OtpChallenge", challenge
    mail = await smtp.wait_for(email)
    session = await verify_otp(client, challenge["challengeToken"], mail.code())
    assert session["__typename"] == "AuthSession", session
    return email, mail.subject, session["accessToken"]


async def next_mail_subject(
    client: httpx.AsyncClient, smtp: SmtpSink, email: str, accept_language: str | None = None
) -> str:
    """The subject of a sign-in code mail asked for now (by a request sending
    `accept_language`: it has no say, the account's language decides)."""
    count = len(smtp.mails(email)) + 1
    body = await gql(
        client,
        REQUEST_LOGIN_CODE,
        {"i": {"email": email}},
        headers=language_header(accept_language),
    )
    assert body["data"]["requestLoginCode"]["__typename"] == "OtpChallenge", body
    return (await smtp.wait_for(email, count=count)).subject


async def set_locale(client: httpx.AsyncClient, token: str, locale: str) -> str | None:
    body = await gql(client, UPDATE_PROFILE, {"i": {"locale": locale}}, token=token)
    answer = body["data"]["updateProfile"]
    assert answer["__typename"] == "User", answer
    value: str | None = answer["locale"]
    return value


async def test_signup_then_locale_then_cleared(
    mail_app_with: MailApp, smtp: SmtpSink, database_url: str
) -> None:
    async with mail_app_with() as client:
        email, subject, token = await sign_up(client, smtp, "fr-CH, de;q=0.5")
        # The signup asked for Swiss French first: the verification mail is French.
        assert subject == VERIFY["fr"]
        assert await signup_locale(database_url, email) == "fr"
        assert await next_mail_subject(client, smtp, email, "es") == LOGIN_CODE["fr"]

        assert await set_locale(client, token, "de") == "de"
        assert await next_mail_subject(client, smtp, email) == LOGIN_CODE["de"]

        # A region of a mail language is that language.
        assert await set_locale(client, token, "es-MX") == "es-MX"
        assert await next_mail_subject(client, smtp, email, "de") == LOGIN_CODE["es"]

        # Cleared: back to what the signup asked for.
        assert await set_locale(client, token, "") is None
        assert await next_mail_subject(client, smtp, email) == LOGIN_CODE["fr"]

    french = smtp.mails(email)[-1]
    assert french.text().startswith("Bonjour,\n\nUtilisez ce code pour vous connecter")
    assert '<html lang="fr">' in french.html()


@pytest.mark.parametrize("default", ["en", "es"])
@pytest.mark.parametrize("accept_language", [None, "ja", "ja, zh;q=0.8", "*"])
async def test_without_a_mail_language_asked_for_mails_are_in_the_default(
    mail_app_with: MailApp,
    smtp: SmtpSink,
    database_url: str,
    default: str,
    accept_language: str | None,
) -> None:
    async with mail_app_with(default_locale=default) as client:
        email, subject, token = await sign_up(client, smtp, accept_language)
        assert subject == VERIFY[default]
        assert await signup_locale(database_url, email) is None
        assert await next_mail_subject(client, smtp, email, "fr") == LOGIN_CODE[default]
        # A locale set wins over the default, as over the signup's language.
        await set_locale(client, token, "de-AT")
        assert await next_mail_subject(client, smtp, email) == LOGIN_CODE["de"]


async def test_the_default_applies_when_the_mail_is_sent(
    mail_app_with: MailApp, smtp: SmtpSink
) -> None:
    """A mail queued with no language is rendered in the DEFAULT_LOCALE of the process that
    sends it: changing the setting changes the mails of users who never chose."""
    async with mail_app_with(default_locale="en") as client:
        email, subject, _token = await sign_up(client, smtp, None)
        assert subject == VERIFY["en"]
    async with mail_app_with(default_locale="de") as client:
        assert await next_mail_subject(client, smtp, email) == LOGIN_CODE["de"]


async def test_the_last_notice_of_a_deleted_account_is_in_its_language(
    mail_app_with: MailApp, smtp: SmtpSink
) -> None:
    async with mail_app_with() as client:
        email, subject, token = await sign_up(client, smtp, "es-ES,es;q=0.9,en;q=0.8")
        assert subject == VERIFY["es"]
        body = await gql(client, DELETE_ACCOUNT, {"i": {}}, token=token)
        assert body["data"]["deleteAccount"]["__typename"] == "DeleteAccountResult", body
        notice = await smtp.wait_for(email, count=2)

    assert notice.subject == "Se ha eliminado tu cuenta de Strawgate"
    assert "Fecha: " in notice.text() and " UTC" in notice.text()


async def test_auth_errors_stay_english(mail_app_with: MailApp, smtp: SmtpSink) -> None:
    async with mail_app_with() as client:
        email, _subject, token = await sign_up(client, smtp, "de")
        await set_locale(client, token, "de")
        answers = []
        for header in ({}, {"accept-language": "de"}):
            body = await gql(
                client,
                LOGIN,
                {"i": {"email": email, "password": "wrong " + PASSWORD}},
                headers=header,
            )
            answers.append(body["data"]["login"])
        refused = await gql(client, UPDATE_PROFILE, {"i": {"locale": "ja"}}, token=token)

    assert answers[0] == answers[1]
    assert answers[0]["code"] == "INVALID_CREDENTIALS"
    assert answers[0]["message"].isascii()
    invalid = refused["data"]["updateProfile"]
    assert invalid["code"] == "INVALID_INPUT"
    assert invalid["message"].startswith("locale must be a language tag of one of the server's")
    assert "en, de, fr, es" in invalid["message"]


async def test_an_export_shows_the_signups_language(mail_app_with: MailApp, smtp: SmtpSink) -> None:
    async with mail_app_with() as client:
        _email, _subject, token = await sign_up(client, smtp, "de-CH")
        body = await gql(client, "{ exportAccount { json } }", token=token)

    profile = json.loads(body["data"]["exportAccount"]["json"])["profile"]
    assert (profile["locale"], profile["signupLocale"]) == (None, "de")


async def signup_locale(database_url: str, email: str) -> str | None:
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as conn:
            found = await conn.execute(select(User.signup_locale).where(User.email == email))
            value: str | None = found.scalar_one()
            return value
    finally:
        await engine.dispose()


# -- an account made by a provider sign-in -----------------------------------------------------


@pytest.fixture(scope="module")
def local_provider() -> Iterator[LocalProvider]:
    with LocalProvider() as provider:
        yield provider


@pytest.mark.parametrize(("accept_language", "language"), [("de-DE,de", "de"), (None, "en")])
async def test_a_provider_sign_in_that_makes_an_account_keeps_its_language(
    mail_app_with: MailApp,
    smtp: SmtpSink,
    local_provider: LocalProvider,
    clock: MutableClock,
    database_url: str,
    accept_language: str | None,
    language: str,
) -> None:
    local_provider.reset()
    email = unique_email()
    # An address the provider does not vouch for: proven by a mailed code, at once.
    token = local_provider.mint_id_token(
        {**user_claims(email, verified=False), "jti": secrets.token_hex(8)}, now=clock.now()
    )
    async with mail_app_with(**provider_settings(local_provider)) as client:
        body = await gql(
            client,
            ID_TOKEN,
            {"i": {"provider": "acme", "idToken": token}},
            headers=language_header(accept_language),
        )
        assert body["data"]["signInWithIdToken"]["__typename"] == "OtpChallenge", body
        mail = await smtp.wait_for(email)

    assert mail.subject == VERIFY[language]
    assert await signup_locale(database_url, email) == (language if accept_language else None)

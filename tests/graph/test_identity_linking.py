"""The account decisions of a provider sign-in and linking from the account: every rule of
db/services/signin/identity.py, through the API, with a real provider on loopback, real
mail and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from jose import jwt
from sqlalchemy import bindparam, select, update
from starlette.applications import Starlette

from db.models import Identity, User
from db.settings import Settings
from tests.conftest import LOCKS_WAITING_HERE, MutableClock, unique_email
from tests.gql import (
    LOGIN,
    PASSWORD,
    REQUEST_LOGIN_CODE,
    gql,
    mutate,
    signed_up_and_proven,
    signup,
    verify_otp,
)
from tests.graph.test_mfa import code_at, enrolled, verify
from tests.identities import (
    IDENTITIES,
    REDIRECT,
    START_LINK,
    UNLINK,
    at_provider,
    come_back,
    exchange,
    id_token_sign_in,
    provider_settings,
    sign_in_by_redirect,
    user_claims,
)
from tests.identity_provider import LocalProvider, pkce_pair
from tests.smtp import SmtpSink

EXPORT = "{ exportAccount { json } }"
EVENT_KINDS = "{ securityEvents(first: 50) { edges { node { kind } } } }"
DELETE_ACCOUNT = """mutation($i: DeleteAccountInput!) { deleteAccount(input: $i) {
  __typename ... on AuthError { code } } }"""


@pytest.fixture(scope="module")
def local_provider() -> Iterator[LocalProvider]:
    with LocalProvider() as provider:
        yield provider


@pytest.fixture
def provider(local_provider: LocalProvider) -> LocalProvider:
    local_provider.reset()
    return local_provider


@pytest.fixture
def settings(
    make_settings: Callable[..., Settings], provider: LocalProvider, smtp: SmtpSink
) -> Settings:
    return make_settings(**provider_settings(provider), **smtp.settings())


def services(client: httpx.AsyncClient) -> Any:
    app: Starlette = client._transport.app  # type: ignore[attr-defined]
    return app.state.services


async def identities_in_db(client: httpx.AsyncClient, email: str) -> list[str]:
    statement = (
        select(Identity.provider)
        .join(User, User.id == Identity.user_id)
        .where(User.email_normalized == bindparam("email"))
    )
    async with services(client).auth.statements.connection() as conn:
        return list(await conn.scalars(statement, {"email": email.lower()}))


async def redirect_sign_in(
    client: httpx.AsyncClient, provider: LocalProvider, claims: dict[str, Any]
) -> dict[str, Any]:
    provider.next_user = claims
    return await exchange(client, await sign_in_by_redirect(client))


async def kinds(client: httpx.AsyncClient, token: str) -> list[str]:
    body = await gql(client, EVENT_KINDS, token=token)
    return [edge["node"]["kind"] for edge in body["data"]["securityEvents"]["edges"]]


# -- signing in: the account decisions --------------------------------------------------


async def test_a_verified_address_of_a_verified_account_links_and_says_so(
    client: httpx.AsyncClient, provider: LocalProvider, smtp: SmtpSink
) -> None:
    email = unique_email()
    owner = await signed_up_and_proven(client, email)

    session = await redirect_sign_in(client, provider, user_claims(email))

    assert session["__typename"] == "AuthSession", session
    assert session["user"]["id"] == owner["user"]["id"]
    notice = await smtp.wait_for(email, where=lambda m: "linked" in m.subject)
    assert f"Acme ID account ({email}) was linked" in " ".join(notice.text().split())
    assert "IDENTITY_LINKED" in await kinds(client, session["accessToken"])
    # Next time the identity itself finds the account: no second link, no second notice.
    again = await redirect_sign_in(client, provider, user_claims(email))
    assert again["user"]["id"] == owner["user"]["id"]
    await asyncio.sleep(0.2)
    assert len([m for m in smtp.mails(email) if "linked" in m.subject]) == 1


async def test_an_address_the_provider_did_not_verify_never_joins_an_account(
    client: httpx.AsyncClient, provider: LocalProvider
) -> None:
    email = unique_email()
    await signed_up_and_proven(client, email)

    answer = await redirect_sign_in(client, provider, user_claims(email, verified=False))

    assert answer["code"] == "EMAIL_TAKEN"
    assert "link" in answer["message"]
    assert await identities_in_db(client, email) == []


async def test_an_untrusted_provider_never_joins_an_account(
    make_settings: Callable[..., Settings],
    provider: LocalProvider,
    clock: MutableClock,
    clean_db: None,
) -> None:
    from graph.app import create_app
    from tests.conftest import client_for

    settings = make_settings(**provider_settings(provider, acme={"trust_email_verified": False}))
    app = create_app(settings, clock=clock)
    async with app.router.lifespan_context(app), client_for(app) as client:
        email = unique_email()
        await signed_up_and_proven(client, email)
        answer = await redirect_sign_in(client, provider, user_claims(email, verified=True))
        assert answer["code"] == "EMAIL_TAKEN"
        assert await identities_in_db(client, email) == []


async def test_an_unverified_account_is_never_joined(
    client: httpx.AsyncClient, provider: LocalProvider
) -> None:
    email = unique_email()
    await signup(client, email, PASSWORD)  # signed in at once (verification off), unproven

    answer = await redirect_sign_in(client, provider, user_claims(email))

    assert answer["code"] == "EMAIL_TAKEN"
    assert await identities_in_db(client, email) == []


async def test_an_unverified_address_makes_an_account_only_once_the_code_proves_it(
    client: httpx.AsyncClient, provider: LocalProvider, smtp: SmtpSink
) -> None:
    email = unique_email()

    step = await redirect_sign_in(client, provider, user_claims(email, verified=False))

    # Verification is off in these settings: the provider's word alone is still not enough.
    assert (step["__typename"], step["purpose"]) == ("OtpChallenge", "VERIFY_EMAIL"), step
    mail = await smtp.wait_for(email)
    session = await verify_otp(client, step["challengeToken"], mail.code())
    assert session["__typename"] == "AuthSession"
    me = (await gql(client, IDENTITIES, token=session["accessToken"]))["data"]["me"]
    assert me["emailVerified"] is True
    assert [i["provider"] for i in me["identities"]] == ["acme"]


async def test_the_addresss_owner_proving_it_first_drops_what_a_stranger_linked(
    client: httpx.AsyncClient, provider: LocalProvider, smtp: SmtpSink
) -> None:
    """Pre-hijacking: a stranger's provider account claims the victim's address (unverified);
    the victim signs in by emailed code: the stranger's identity is gone."""
    email = unique_email()
    stranger = user_claims(email, verified=False, sub="stranger")
    step = await redirect_sign_in(client, provider, stranger)
    assert step["purpose"] == "VERIFY_EMAIL"
    assert await identities_in_db(client, email) == ["acme"]

    asked = await mutate(client, REQUEST_LOGIN_CODE, {"i": {"email": email}})
    mail = await smtp.wait_for(email, count=2)
    owner = await verify_otp(client, asked["challengeToken"], mail.code())

    assert owner["__typename"] == "AuthSession"
    assert await identities_in_db(client, email) == []
    again = await redirect_sign_in(client, provider, stranger)
    assert again["code"] == "EMAIL_TAKEN"


async def test_a_provider_without_an_address_is_refused(
    client: httpx.AsyncClient, provider: LocalProvider
) -> None:
    answer = await redirect_sign_in(client, provider, {"sub": "no-mail", "name": "Nobody"})
    assert answer["code"] == "PROVIDER_ERROR"


async def test_two_factor_still_asks_its_step(
    client: httpx.AsyncClient, provider: LocalProvider, clock: MutableClock
) -> None:
    email, _token, secret, _codes = await enrolled(client, clock)

    step = await redirect_sign_in(client, provider, user_claims(email))

    assert (step["__typename"], step["method"]) == ("OtpChallenge", "TOTP"), step
    session = await verify(client, step["challengeToken"], code_at(secret, clock))
    assert session["__typename"] == "AuthSession"


async def test_a_disabled_account_stays_disabled(
    client: httpx.AsyncClient, provider: LocalProvider
) -> None:
    email = unique_email()
    await redirect_sign_in(client, provider, user_claims(email))
    async with services(client).auth.statements.transaction() as tx:
        await tx.execute(
            update(User).where(User.email_normalized == bindparam("e")).values(is_active=False),
            {"e": email.lower()},
        )

    answer = await redirect_sign_in(client, provider, user_claims(email))

    assert answer["code"] == "ACCOUNT_DISABLED"


async def test_parallel_first_sign_ins_make_one_account(
    client: httpx.AsyncClient, provider: LocalProvider, clock: MutableClock
) -> None:
    email = unique_email()
    claims = user_claims(email)
    tokens = [provider.mint_id_token({**claims, "jti": str(n)}, now=clock.now()) for n in range(5)]

    answers = await asyncio.gather(*(id_token_sign_in(client, token) for token in tokens))

    assert {a["__typename"] for a in answers} == {"AuthSession"}, answers
    assert len({a["user"]["id"] for a in answers}) == 1
    assert await identities_in_db(client, email) == ["acme"]


async def test_a_deleted_account_takes_its_identities_along(
    client: httpx.AsyncClient, provider: LocalProvider
) -> None:
    email = unique_email()
    first = await redirect_sign_in(client, provider, user_claims(email))
    deleted = await gql(client, DELETE_ACCOUNT, {"i": {}}, token=first["accessToken"])
    assert deleted["data"]["deleteAccount"]["__typename"] == "DeleteAccountResult", deleted

    again = await redirect_sign_in(client, provider, user_claims(email))

    assert again["__typename"] == "AuthSession"
    assert again["user"]["id"] != first["user"]["id"]


async def test_export_lists_the_identities(
    client: httpx.AsyncClient, provider: LocalProvider
) -> None:
    email = unique_email()
    session = await redirect_sign_in(client, provider, user_claims(email, sub="subject-1"))

    body = await gql(client, EXPORT, token=session["accessToken"])

    exported = json.loads(body["data"]["exportAccount"]["json"])
    assert [(i["provider"], i["subject"], i["email"]) for i in exported["identities"]] == [
        ("acme", "subject-1", email)
    ]


# -- linking from the account ------------------------------------------------------------


async def link(
    client: httpx.AsyncClient, provider: LocalProvider, token: str, claims: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """startIdentityLink, the browser through the provider, exchangeSignInCode with the
    bearer: (the start's answer, the exchange's answer)."""
    verifier, challenge = pkce_pair()
    started = await gql(
        client,
        START_LINK,
        {"i": {"provider": "acme", "redirectTo": REDIRECT, "codeChallenge": challenge}},
        token=token,
    )
    start = started["data"]["startIdentityLink"]
    if start["__typename"] != "IdentityLinkStart":
        return start, {}
    provider.next_user = claims
    opened = await client.get(start["authorizeUrl"])
    assert opened.status_code == 302, opened.text
    back = await come_back(client, await at_provider(opened.headers["location"]))
    query = parse_qs(urlsplit(back.headers["location"]).query)
    assert "code" in query, back.headers["location"]
    answer = await gql(
        client,
        """mutation($i: ExchangeSignInCodeInput!) { exchangeSignInCode(input: $i) {
          __typename ... on AuthSession { accessToken user { id } }
          ... on AuthError { code message } } }""",
        {"i": {"code": query["code"][0], "codeVerifier": verifier}},
        token=token,
    )
    return start, answer["data"]["exchangeSignInCode"]


async def test_a_signed_in_user_links_another_address_by_redirect(
    client: httpx.AsyncClient, provider: LocalProvider, smtp: SmtpSink
) -> None:
    email = unique_email()
    owner = await signed_up_and_proven(client, email)
    token = owner["accessToken"]

    _start, linked = await link(client, provider, token, user_claims("other@example.org", sub="x1"))

    assert linked["__typename"] == "AuthSession", linked
    me = (await gql(client, IDENTITIES, token=linked["accessToken"]))["data"]["me"]
    assert [(i["provider"], i["email"]) for i in me["identities"]] == [
        ("acme", "other@example.org")
    ]
    # The same session, re-issued: its refresh token changed, its id did not.
    sessions = await gql(client, "{ sessions { id current } }", token=linked["accessToken"])
    assert len(sessions["data"]["sessions"]) == 1
    await smtp.wait_for(email, where=lambda m: "linked" in m.subject)
    # Signing in with that provider account now signs in here.
    provider.next_user = user_claims("other@example.org", sub="x1")
    again = await exchange(client, await sign_in_by_redirect(client))
    assert again["user"]["id"] == owner["user"]["id"]


async def test_linking_needs_a_recent_sign_in(
    client: httpx.AsyncClient, provider: LocalProvider, clock: MutableClock
) -> None:
    owner = await signed_up_and_proven(client, unique_email())
    clock.advance(minutes=11)

    start, _ = await link(client, provider, owner["accessToken"], user_claims(unique_email()))

    assert start["code"] == "REAUTHENTICATION_REQUIRED"


async def test_a_provider_account_linked_elsewhere_is_refused(
    client: httpx.AsyncClient, provider: LocalProvider
) -> None:
    theirs = user_claims(unique_email(), sub="taken")
    await redirect_sign_in(client, provider, theirs)
    mine = await signed_up_and_proven(client, unique_email())

    _start, answer = await link(client, provider, mine["accessToken"], theirs)

    assert answer["code"] == "IDENTITY_ALREADY_LINKED"


async def test_a_link_code_needs_the_session_that_started_it(
    client: httpx.AsyncClient, provider: LocalProvider
) -> None:
    owner = await signed_up_and_proven(client, unique_email())
    other = await signed_up_and_proven(client, unique_email())
    verifier, challenge = pkce_pair()
    started = await gql(
        client,
        START_LINK,
        {"i": {"provider": "acme", "redirectTo": REDIRECT, "codeChallenge": challenge}},
        token=owner["accessToken"],
    )
    provider.next_user = user_claims(unique_email())
    opened = await client.get(started["data"]["startIdentityLink"]["authorizeUrl"])
    back = await come_back(client, await at_provider(opened.headers["location"]))
    code = parse_qs(urlsplit(back.headers["location"]).query)["code"][0]
    document = """mutation($i: ExchangeSignInCodeInput!) { exchangeSignInCode(input: $i) {
      __typename ... on AuthError { code } } }"""
    variables = {"i": {"code": code, "codeVerifier": verifier}}

    without = await gql(client, document, variables)
    another = await gql(client, document, variables, token=other["accessToken"])

    assert without["data"]["exchangeSignInCode"]["code"] == "INVALID_TOKEN"
    assert another["data"]["exchangeSignInCode"]["code"] == "INVALID_TOKEN"
    # Nothing was spent by the refusals: the right session still links.
    right = await gql(client, document, variables, token=owner["accessToken"])
    assert right["data"]["exchangeSignInCode"]["__typename"] == "AuthSession"


async def start_link_url(client: httpx.AsyncClient, token: str) -> str:
    """startIdentityLink's authorizeUrl (the verifier is not needed: nothing is exchanged)."""
    _verifier, challenge = pkce_pair()
    started = await gql(
        client,
        START_LINK,
        {"i": {"provider": "acme", "redirectTo": REDIRECT, "codeChallenge": challenge}},
        token=token,
    )
    return str(started["data"]["startIdentityLink"]["authorizeUrl"])


async def test_a_link_url_binds_the_first_browser_only(
    client: httpx.AsyncClient, provider: LocalProvider
) -> None:
    owner = await signed_up_and_proven(client, unique_email())
    url = await start_link_url(client, owner["accessToken"])
    assert (await client.get(url)).status_code == 302
    assert (await client.get(url)).status_code == 400


async def test_unlinking_says_so_and_needs_a_recent_sign_in(
    client: httpx.AsyncClient, provider: LocalProvider, clock: MutableClock, smtp: SmtpSink
) -> None:
    email = unique_email()
    session = await redirect_sign_in(client, provider, user_claims(email))
    token = session["accessToken"]

    unlinked = await gql(client, UNLINK, {"i": {"provider": "acme"}}, token=token)

    assert unlinked["data"]["unlinkIdentity"]["identities"] == []
    assert "IDENTITY_UNLINKED" in await kinds(client, token)
    await smtp.wait_for(email, where=lambda m: "unlinked" in m.subject)
    missing = await gql(client, UNLINK, {"i": {"provider": "acme"}}, token=token)
    assert missing["data"]["unlinkIdentity"]["code"] == "INVALID_INPUT"
    clock.advance(minutes=11)
    late = await gql(client, UNLINK, {"i": {"provider": "acme"}}, token=token)
    assert late["data"]["unlinkIdentity"]["code"] == "REAUTHENTICATION_REQUIRED"


async def test_unlinking_the_only_way_in_is_refused(
    client: httpx.AsyncClient, provider: LocalProvider
) -> None:
    email = unique_email()
    session = await redirect_sign_in(client, provider, user_claims(email))
    # No password, no passkey, no other identity, and an address nobody proved (as after
    # an operator's change of address): the identity is the only way in.
    async with services(client).auth.statements.transaction() as tx:
        await tx.execute(
            update(User)
            .where(User.email_normalized == bindparam("e"))
            .values(email_verified_at=None),
            {"e": email.lower()},
        )

    answer = await gql(client, UNLINK, {"i": {"provider": "acme"}}, token=session["accessToken"])

    assert answer["data"]["unlinkIdentity"]["code"] == "INVALID_INPUT"
    assert await identities_in_db(client, email) == ["acme"]


async def test_an_account_with_a_password_signs_in_either_way(
    client: httpx.AsyncClient, provider: LocalProvider
) -> None:
    email = unique_email()
    await signed_up_and_proven(client, email)
    await redirect_sign_in(client, provider, user_claims(email))

    by_password = await gql(client, LOGIN, {"i": {"email": email, "password": PASSWORD}})

    assert by_password["data"]["login"]["__typename"] == "AuthSession"


async def test_a_pending_signup_is_not_told_to_an_unvouched_address(
    make_settings: Callable[..., Settings],
    provider: LocalProvider,
    clock: MutableClock,
    clean_db: None,
    smtp: SmtpSink,
) -> None:
    """A signup waiting for its code (verification on): an identity whose address no
    provider vouched for gets the answer any new unvouched address gets, and no mail;
    one the provider vouches for (the address's owner) is told to sign in."""
    from graph.app import create_app
    from tests.conftest import client_for

    settings = make_settings(
        **provider_settings(provider), **smtp.settings(), require_email_verification=True
    )
    app = create_app(settings, clock=clock)
    async with app.router.lifespan_context(app), client_for(app) as client:
        email = unique_email()
        pending = await signup(client, email, PASSWORD)
        assert pending["purpose"] == "VERIFY_EMAIL"
        await smtp.wait_for(email)

        unvouched = await redirect_sign_in(client, provider, user_claims(email, verified=False))
        fresh = await redirect_sign_in(
            client, provider, user_claims(unique_email(), verified=False)
        )
        vouched = await redirect_sign_in(client, provider, user_claims(email))

        assert (unvouched["__typename"], unvouched["purpose"]) == ("OtpChallenge", "VERIFY_EMAIL")
        assert set(unvouched) == set(fresh)
        await asyncio.sleep(0.3)
        assert len(smtp.mails(email)) == 1  # the signup's code only
        assert vouched["code"] == "EMAIL_TAKEN"
        assert await identities_in_db(client, email) == []


async def test_a_link_opened_while_the_provider_is_down_goes_back_and_stays_usable(
    client: httpx.AsyncClient, provider: LocalProvider
) -> None:
    owner = await signed_up_and_proven(client, unique_email())
    url = await start_link_url(client, owner["accessToken"])
    provider.fail("discovery", "error")

    down = await client.get(url)

    assert down.status_code == 302
    assert down.headers["location"].startswith(REDIRECT + "?")
    assert parse_qs(urlsplit(down.headers["location"]).query)["error"] == ["PROVIDER_ERROR"]
    provider.heal()
    assert (await client.get(url)).status_code == 302


async def test_a_passkey_answers_the_totp_step_after_a_provider(
    make_settings: Callable[..., Settings],
    provider: LocalProvider,
    clock: MutableClock,
    clean_db: None,
) -> None:
    from graph.app import create_app
    from tests.conftest import client_for
    from tests.graph.test_passkeys import register
    from tests.webauthn_authenticator import SoftAuthenticator

    settings = make_settings(
        **provider_settings(provider),
        webauthn_rp_id="example.com",
        webauthn_origins="https://example.com",
    )
    app = create_app(settings, clock=clock)
    async with app.router.lifespan_context(app), client_for(app) as client:
        email, token, _secret, _codes = await enrolled(client, clock)
        authenticator = SoftAuthenticator()
        await register(client, token, authenticator)
        id_token = provider.mint_id_token(user_claims(email), now=clock.now())

        body = await gql(
            client,
            """mutation($i: SignInWithIdTokenInput!) { signInWithIdToken(input: $i) {
              __typename ... on OtpChallenge { challengeToken method passkeyOptionsJson } } }""",
            {"i": {"provider": "acme", "idToken": id_token}},
        )
        step = body["data"]["signInWithIdToken"]
        assert (step["__typename"], step["method"]) == ("OtpChallenge", "TOTP"), step
        assert step["passkeyOptionsJson"] is not None
        finished = await gql(
            client,
            """mutation($i: FinishPasskeyLoginInput!) { finishPasskeyLogin(input: $i) {
              __typename ... on AuthSession { accessToken } ... on AuthError { code } } }""",
            {
                "i": {
                    "challengeToken": step["challengeToken"],
                    "credentialJson": authenticator.assertion(step["passkeyOptionsJson"]),
                }
            },
        )
        session = finished["data"]["finishPasskeyLogin"]
        assert session["__typename"] == "AuthSession", session
        amr = jwt.get_unverified_claims(session["accessToken"])["amr"]
        assert "fed" in amr and "mfa" in amr


async def test_unlinking_ends_the_other_sessions_a_provider_opened(
    client: httpx.AsyncClient, provider: LocalProvider
) -> None:
    """A provider account taken over: its intruder's session ends when the owner unlinks."""
    email = unique_email()
    owner = await signed_up_and_proven(client, email)
    provider.sticky_user = True
    intruder = await redirect_sign_in(client, provider, user_claims(email))
    by_provider = await redirect_sign_in(client, provider, user_claims(email))
    provider.sticky_user = False
    by_password = await gql(client, LOGIN, {"i": {"email": email, "password": PASSWORD}})

    unlinked = await gql(
        client, UNLINK, {"i": {"provider": "acme"}}, token=by_provider["accessToken"]
    )

    assert unlinked["data"]["unlinkIdentity"]["__typename"] == "User"
    me = "{ me { id } }"
    gone = await gql(client, me, token=intruder["accessToken"])
    assert gone["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"
    for kept in (by_provider, owner, by_password["data"]["login"]):
        assert (await gql(client, me, token=kept["accessToken"]))["data"]["me"] is not None


async def test_a_link_re_issues_the_same_session_and_its_old_refresh_token_stops(
    client: httpx.AsyncClient, provider: LocalProvider
) -> None:
    owner = await signed_up_and_proven(client, unique_email())

    _start, linked = await link(
        client, provider, owner["accessToken"], user_claims("x@example.org")
    )

    old = jwt.get_unverified_claims(owner["accessToken"])
    new = jwt.get_unverified_claims(linked["accessToken"])
    assert new["sid"] == old["sid"]
    refreshed = await gql(
        client,
        """mutation($i: RefreshInput!) { refresh(input: $i) { __typename
          ... on AuthError { code } } }""",
        {"i": {"refreshToken": owner["refreshToken"]}},
    )
    assert refreshed["data"]["refresh"]["code"] == "INVALID_TOKEN"


async def test_a_second_account_of_the_same_provider_is_not_linked(
    client: httpx.AsyncClient, provider: LocalProvider
) -> None:
    owner = await signed_up_and_proven(client, unique_email())
    await link(client, provider, owner["accessToken"], user_claims("a@example.org"))
    _start, answer = await link(
        client, provider, owner["accessToken"], user_claims("b@example.org", sub="other")
    )

    assert answer["code"] == "INVALID_INPUT"


async def test_a_sign_in_racing_the_deletion_of_its_account_makes_a_new_one(
    client: httpx.AsyncClient, provider: LocalProvider, database_url: str, clock: MutableClock
) -> None:
    """The link found, then the account deleted (committed while the sign-in waited for the
    account's lock): decided again, on what is there now."""
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    email = unique_email()
    first = await redirect_sign_in(client, provider, user_claims(email))
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as holder:
            transaction = await holder.begin()
            await holder.execute(
                text("SELECT id FROM users WHERE id = :u FOR UPDATE"), {"u": first["user"]["id"]}
            )
            token = provider.mint_id_token(user_claims(email), now=clock.now())
            racing = asyncio.create_task(id_token_sign_in(client, token))
            async with engine.connect() as watcher:
                for _ in range(500):  # until the sign-in waits for the lock (bounded)
                    waiting = await watcher.scalar(text(LOCKS_WAITING_HERE))
                    if waiting:
                        break
                    await asyncio.sleep(0.01)
            await holder.execute(
                text("DELETE FROM users WHERE id = :u"), {"u": first["user"]["id"]}
            )
            await transaction.commit()
        answer = await racing
    finally:
        await engine.dispose()

    assert answer["__typename"] == "AuthSession", answer
    assert answer["user"]["id"] != first["user"]["id"]


async def test_parallel_first_sign_ins_to_an_existing_account_link_once_and_all_sign_in(
    client: httpx.AsyncClient, provider: LocalProvider, clock: MutableClock
) -> None:
    email = unique_email()
    owner = await signed_up_and_proven(client, email)
    claims = user_claims(email)
    tokens = [provider.mint_id_token({**claims, "jti": str(n)}, now=clock.now()) for n in range(6)]

    answers = await asyncio.gather(*(id_token_sign_in(client, token) for token in tokens))

    assert {a["__typename"] for a in answers} == {"AuthSession"}, answers
    assert {a["user"]["id"] for a in answers} == {owner["user"]["id"]}
    assert await identities_in_db(client, email) == ["acme"]

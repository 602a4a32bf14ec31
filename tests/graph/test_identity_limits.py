"""Provider sign-ins count like other sign-ins: per client address (starts, exchanges and ID
tokens) and per provider account, which a stranger cannot spend."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import httpx
import pytest

from db.settings import Settings
from tests.conftest import UNLIMITED, MutableClock, unique_email
from tests.gql import LOGIN, gql, signed_up_and_proven
from tests.identities import authorize, id_token_sign_in, provider_settings, user_claims
from tests.identity_provider import LocalProvider


@pytest.fixture(scope="module")
def local_provider() -> Iterator[LocalProvider]:
    with LocalProvider() as provider:
        yield provider


@pytest.fixture
def provider(local_provider: LocalProvider) -> LocalProvider:
    local_provider.reset()
    return local_provider


@pytest.fixture
def settings(make_settings: Callable[..., Settings], provider: LocalProvider) -> Settings:
    limits = UNLIMITED.model_copy(
        update={
            "start_identity_sign_in_ip": "3/minute",
            "login_ip": "4/minute",
            "login_account": "2/minute",
        }
    )
    return make_settings(**provider_settings(provider), rate_limits=limits)


async def test_starts_are_limited_per_client_address(client: httpx.AsyncClient) -> None:
    answers = [(await authorize(client))[0] for _ in range(4)]

    assert [a.status_code for a in answers] == [302, 302, 302, 429]
    assert int(answers[-1].headers["retry-after"]) > 0


async def test_id_tokens_count_against_the_client_address(
    client: httpx.AsyncClient, provider: LocalProvider, clock: MutableClock
) -> None:
    answers = []
    for n in range(5):
        token = provider.mint_id_token(user_claims(unique_email(), sub=f"s{n}"), now=clock.now())
        answers.append(await id_token_sign_in(client, token))

    assert [a.get("code") for a in answers][-1] == "RATE_LIMITED"
    assert [a["__typename"] for a in answers[:4]] == ["AuthSession"] * 4


async def test_a_strangers_wrong_passwords_never_hold_up_the_owners_provider_sign_in(
    client: httpx.AsyncClient, provider: LocalProvider, clock: MutableClock
) -> None:
    email = unique_email()
    await signed_up_and_proven(client, email)
    stranger = httpx.AsyncClient(transport=client._transport, base_url="http://testserver")
    for _ in range(3):  # the address's login_account budget spent by a stranger
        await gql(stranger, LOGIN, {"i": {"email": email, "password": "wrong password!"}})

    token = provider.mint_id_token(user_claims(email), now=clock.now())
    answer = await id_token_sign_in(client, token)

    assert answer["__typename"] == "AuthSession", answer


async def test_sign_ins_of_one_provider_account_are_limited(
    client: httpx.AsyncClient, provider: LocalProvider, clock: MutableClock
) -> None:
    claims = user_claims(unique_email(), sub="one")
    answers = []
    for n in range(3):
        token = provider.mint_id_token({**claims, "jti": str(n)}, now=clock.now())
        answers.append(await id_token_sign_in(client, token))

    assert [a["__typename"] for a in answers] == ["AuthSession", "AuthSession", "AuthError"]
    assert answers[-1]["code"] == "RATE_LIMITED"


async def test_a_refused_exchange_leaves_its_code_for_a_retry(
    client: httpx.AsyncClient, provider: LocalProvider, database_url: str
) -> None:
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    from tests.identities import exchange, sign_in_by_redirect

    claims = user_claims(unique_email(), sub="busy")
    provider.sticky_user = True
    provider.next_user = claims
    for _ in range(2):  # the provider account's login_account budget (2/minute) spent
        assert (await exchange(client, await sign_in_by_redirect(client)))["__typename"] == (
            "AuthSession"
        )
    refused = await exchange(client, await sign_in_by_redirect(client))

    assert refused["code"] == "RATE_LIMITED"
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as conn:
            waiting = await conn.scalar(
                text(
                    "SELECT count(*) FROM identity_flows"
                    " WHERE code_hash IS NOT NULL AND exchanged_at IS NULL"
                )
            )
    finally:
        await engine.dispose()
    assert waiting == 1

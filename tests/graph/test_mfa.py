"""Two-factor sign-in: enrolment, TOTP (RFC 6238) checks, recovery codes, attempt caps."""

from __future__ import annotations

import asyncio
import re
import xml.etree.ElementTree as ET
from datetime import timedelta
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import httpx
import pyotp
import pytest
import zxingcpp
from jose import jwt
from PIL import Image, ImageDraw
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import create_async_engine

from db.models import RecoveryCode, TotpCredential
from tests.conftest import PASSWORD, MutableClock, unique_email
from tests.gql import LOGIN, ME, VERIFY_OTP, gql, login, signed_up_and_proven, signup

SETUP = """mutation { setupTotp { __typename
    ... on TotpSetup { secret otpauthUri qrCodeSvg }
    ... on AuthError { code message field retryAfter } } }"""
CONFIRM = """mutation($i: ConfirmTotpInput!) { confirmTotp(input: $i) { __typename
    ... on RecoveryCodes { codes } ... on AuthError { code message field retryAfter } } }"""
DISABLE = """mutation($i: DisableTotpInput!) { disableTotp(input: $i) { __typename
    ... on User { id otpEnabled } ... on AuthError { code message field retryAfter } } }"""
REGENERATE = """mutation($i: RegenerateRecoveryCodesInput!) { regenerateRecoveryCodes(input: $i) {
    __typename ... on RecoveryCodes { codes } ... on AuthError { code message retryAfter } } }"""


def code_at(secret: str, clock: MutableClock, steps: int = 0) -> str:
    """What an authenticator app shows, `steps` time steps from the server's now."""
    return pyotp.TOTP(secret).at(clock.now() + timedelta(seconds=30 * steps))


async def enrolled(
    client: httpx.AsyncClient, clock: MutableClock
) -> tuple[str, str, str, list[str]]:
    """A signed-up user with two-factor on: (email, access token, secret, recovery codes)."""
    email = unique_email()
    session = await signed_up_and_proven(client, email)
    token = session["accessToken"]
    setup = (await gql(client, SETUP, token=token))["data"]["setupTotp"]
    secret = setup["secret"]
    confirmed = await gql(client, CONFIRM, {"i": {"code": code_at(secret, clock)}}, token=token)
    codes = confirmed["data"]["confirmTotp"]["codes"]
    # The confirming step is spent; three steps on, the whole window is fresh again.
    clock.advance(seconds=90)
    return email, token, secret, codes


async def challenge(client: httpx.AsyncClient, email: str) -> str:
    answer = await login(client, email, PASSWORD)
    assert answer["__typename"] == "OtpChallenge", answer
    return str(answer["challengeToken"])


async def verify(client: httpx.AsyncClient, token: str, code: str) -> dict[str, Any]:
    body = await gql(client, VERIFY_OTP, {"i": {"challengeToken": token, "code": code}})
    result: dict[str, Any] = body["data"]["verifyOtp"]
    return result


def rasterize(svg: str) -> Image.Image:
    """Draws segno's SVG path ("M x y h n m dx dy ...", one-unit strokes) onto an image,
    so the QR code can be read back the way a camera would."""
    root = ET.fromstring(svg)  # noqa: S314 - our own output
    width = int(float(root.attrib["width"]))
    height = int(float(root.attrib["height"]))
    path = next(e for e in root.iter() if e.tag.endswith("path"))
    scale_match = re.search(r"scale\(([\d.]+)\)", path.attrib.get("transform", ""))
    scale = float(scale_match.group(1)) if scale_match else 1.0
    image = Image.new("L", (width, height), 255)
    draw = ImageDraw.Draw(image)
    x = y = 0.0
    for command, a, b in re.findall(r"([MmHh])\s*(-?[\d.]+)\s*(-?[\d.]*)", path.attrib["d"]):
        if command == "M":
            x, y = float(a), float(b)
        elif command == "m":
            x, y = x + float(a), y + float(b)
        else:  # h: a horizontal run of dark modules on the row around y
            length = float(a)
            top = (y - 0.5) * scale
            draw.rectangle([x * scale, top, (x + length) * scale - 1, top + scale - 1], fill=0)
            x += length
    return image.resize((width * 4, height * 4), Image.Resampling.NEAREST)


# -- enrolment ------------------------------------------------------------------------------


async def test_enrolment_needs_a_signed_in_user(client: httpx.AsyncClient) -> None:
    for headers in ({}, {"authorization": "Bearer not-a-token"}):
        body = await gql(client, SETUP, headers=headers)
        assert body["data"] is None
        assert body["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"


async def test_setup_answers_secret_uri_and_a_scannable_qr_code(
    client: httpx.AsyncClient, clock: MutableClock
) -> None:
    email = unique_email()
    token = (await signed_up_and_proven(client, email))["accessToken"]
    setup = (await gql(client, SETUP, token=token))["data"]["setupTotp"]
    secret = setup["secret"]
    assert re.fullmatch(r"[A-Z2-7]{32}", secret)  # 160 bits of base32
    uri = urlsplit(setup["otpauthUri"])
    assert (uri.scheme, uri.netloc) == ("otpauth", "totp")
    assert unquote(uri.path) == f"/Strawgate:{email}"
    query = parse_qs(uri.query)
    assert query["secret"] == [secret] and query["issuer"] == ["Strawgate"]
    decoded = [r.text for r in zxingcpp.read_barcodes(rasterize(setup["qrCodeSvg"]))]
    assert decoded == [setup["otpauthUri"]]
    # A standalone document: without its namespace an <img> or a saved file shows nothing.
    root = ET.fromstring(setup["qrCodeSvg"])  # noqa: S314 - our own output
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    assert (await gql(client, ME, token=token))["data"]["me"]["otpEnabled"] is False


async def test_setup_again_replaces_a_pending_secret(
    client: httpx.AsyncClient, clock: MutableClock
) -> None:
    token = (await signed_up_and_proven(client, unique_email()))["accessToken"]
    first = (await gql(client, SETUP, token=token))["data"]["setupTotp"]["secret"]
    second = (await gql(client, SETUP, token=token))["data"]["setupTotp"]["secret"]
    assert first != second
    stale = await gql(client, CONFIRM, {"i": {"code": code_at(first, clock)}}, token=token)
    assert stale["data"]["confirmTotp"]["code"] == "INVALID_OTP"
    fresh = await gql(client, CONFIRM, {"i": {"code": code_at(second, clock)}}, token=token)
    assert fresh["data"]["confirmTotp"]["__typename"] == "RecoveryCodes"


async def test_confirm_turns_two_factor_on_with_recovery_codes(
    client: httpx.AsyncClient, clock: MutableClock, database_url: str
) -> None:
    _email, token, secret, codes = await enrolled(client, clock)
    assert len(codes) == 10 and len(set(codes)) == 10
    assert all(re.fullmatch(r"[0-9a-hjkmnp-tv-z]{5}-[0-9a-hjkmnp-tv-z]{5}", c) for c in codes)
    assert (await gql(client, ME, token=token))["data"]["me"]["otpEnabled"] is True
    again = (await gql(client, SETUP, token=token))["data"]["setupTotp"]
    assert again["code"] == "INVALID_INPUT"
    engine = create_async_engine(database_url)
    async with engine.connect() as conn:
        hashes = (await conn.execute(select(RecoveryCode.code_hash))).scalars().all()
        sealed = (await conn.execute(select(TotpCredential.secret_sealed))).scalar_one()
    await engine.dispose()
    assert len(hashes) == 10 and all(h.startswith("$argon2id$") for h in hashes)
    dump = " ".join(hashes) + sealed
    assert secret not in dump and not any(c.replace("-", "") in dump for c in codes)


async def test_confirm_refuses_a_wrong_code(client: httpx.AsyncClient, clock: MutableClock) -> None:
    token = (await signed_up_and_proven(client, unique_email()))["accessToken"]
    secret = (await gql(client, SETUP, token=token))["data"]["setupTotp"]["secret"]
    wrong = f"{(int(code_at(secret, clock)) + 1) % 1_000_000:06d}"
    answer = await gql(client, CONFIRM, {"i": {"code": wrong}}, token=token)
    assert answer["data"]["confirmTotp"]["code"] == "INVALID_OTP"
    assert (await gql(client, ME, token=token))["data"]["me"]["otpEnabled"] is False


# -- signing in ------------------------------------------------------------------------------


async def test_login_with_two_factor_needs_the_code(
    client: httpx.AsyncClient, clock: MutableClock
) -> None:
    email, _token, secret, _codes = await enrolled(client, clock)
    answer = await login(client, email, PASSWORD)
    assert answer["__typename"] == "OtpChallenge"
    assert (answer["method"], answer["purpose"], answer["expiresIn"]) == ("TOTP", "LOGIN", 300)
    # A challenge token is not an access token.
    body = await gql(client, ME, token=answer["challengeToken"])
    assert body["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"
    session = await verify(client, answer["challengeToken"], code_at(secret, clock))
    assert session["__typename"] == "AuthSession"
    assert session["user"]["otpEnabled"] is True
    assert jwt.get_unverified_claims(session["accessToken"])["amr"] == ["pwd", "otp", "mfa"]
    # The challenge is spent.
    again = await verify(client, answer["challengeToken"], code_at(secret, clock, 1))
    assert again["code"] == "INVALID_TOKEN"


@pytest.mark.parametrize(("steps", "accepted"), [(-2, False), (-1, True), (1, True), (2, False)])
async def test_one_step_either_side_and_nothing_wider(
    client: httpx.AsyncClient, clock: MutableClock, steps: int, accepted: bool
) -> None:
    email, _token, secret, _codes = await enrolled(client, clock)
    result = await verify(client, await challenge(client, email), code_at(secret, clock, steps))
    assert (result["__typename"] == "AuthSession") is accepted, result
    if not accepted:
        assert result["code"] == "INVALID_OTP"


async def test_a_code_is_accepted_once(client: httpx.AsyncClient, clock: MutableClock) -> None:
    email, _token, secret, _codes = await enrolled(client, clock)
    code = code_at(secret, clock)
    assert (await verify(client, await challenge(client, email), code))[
        "__typename"
    ] == "AuthSession"
    replay = await verify(client, await challenge(client, email), code)
    assert replay["code"] == "INVALID_OTP"
    # An older step is refused too, once a newer one was accepted.
    clock.advance(seconds=30)
    newer = code_at(secret, clock)
    assert (await verify(client, await challenge(client, email), newer))[
        "__typename"
    ] == "AuthSession"
    older = await verify(client, await challenge(client, email), code_at(secret, clock, -1))
    assert older["code"] == "INVALID_OTP"


async def test_concurrent_replays_give_one_session(
    client: httpx.AsyncClient, clock: MutableClock
) -> None:
    email, _token, secret, _codes = await enrolled(client, clock)
    tokens = [await challenge(client, email) for _ in range(6)]
    code = code_at(secret, clock)
    results = await asyncio.gather(*(verify(client, t, code) for t in tokens))
    kinds = sorted(r.get("code") or r["__typename"] for r in results)
    assert kinds == ["AuthSession"] + ["INVALID_OTP"] * 5


async def test_five_wrong_codes_kill_the_challenge(
    client: httpx.AsyncClient, clock: MutableClock
) -> None:
    email, _token, secret, _codes = await enrolled(client, clock)
    token = await challenge(client, email)
    for _ in range(5):
        assert (await verify(client, token, "000000"))["code"] == "INVALID_OTP"
    assert (await verify(client, token, code_at(secret, clock)))["code"] == "INVALID_TOKEN"


async def test_aliased_guesses_each_count(client: httpx.AsyncClient, clock: MutableClock) -> None:
    email, _token, secret, _codes = await enrolled(client, clock)
    token = await challenge(client, email)
    fields = " ".join(
        f'g{i}: verifyOtp(input: {{challengeToken: "{token}", code: "{i:06d}"}}) '
        "{ __typename ... on AuthError { code } }"
        for i in range(7)
    )
    body = await gql(client, f"mutation {{ {fields} }}")
    answers = [body["data"][f"g{i}"] for i in range(7)]
    assert sum(a.get("code") == "INVALID_OTP" for a in answers) == 5
    assert sum(a.get("code") == "INVALID_TOKEN" for a in answers) == 2
    assert (await verify(client, token, code_at(secret, clock)))["code"] == "INVALID_TOKEN"


async def test_wrong_codes_are_limited_per_account(
    client: httpx.AsyncClient, clock: MutableClock
) -> None:
    email, token, secret, _codes = await enrolled(client, clock)
    for _ in range(2):
        challenge_token = await challenge(client, email)
        for _ in range(5):
            assert (await verify(client, challenge_token, "000000"))["code"] == "INVALID_OTP"
    fresh = await challenge(client, email)
    limited = await verify(client, fresh, code_at(secret, clock))
    assert limited["code"] == "RATE_LIMITED" and 0 < limited["retryAfter"] <= 15 * 60
    # The other code checks of the account are limited too.
    regen = await gql(client, REGENERATE, {"i": {"code": code_at(secret, clock)}}, token=token)
    assert regen["data"]["regenerateRecoveryCodes"]["code"] == "RATE_LIMITED"
    clock.advance(minutes=15, seconds=1)
    later = await verify(client, await challenge(client, email), code_at(secret, clock))
    assert later["__typename"] == "AuthSession"


async def test_challenges_expire(client: httpx.AsyncClient, clock: MutableClock) -> None:
    email, _token, secret, _codes = await enrolled(client, clock)
    token = await challenge(client, email)
    clock.advance(minutes=5, seconds=1)
    assert (await verify(client, token, code_at(secret, clock)))["code"] == "INVALID_TOKEN"


async def test_a_recovery_code_signs_in_once(
    client: httpx.AsyncClient, clock: MutableClock
) -> None:
    email, _token, _secret, codes = await enrolled(client, clock)
    session = await verify(client, await challenge(client, email), codes[3].upper())
    assert session["__typename"] == "AuthSession"
    assert jwt.get_unverified_claims(session["accessToken"])["amr"] == ["pwd", "mfa"]
    again = await verify(client, await challenge(client, email), codes[3])
    assert again["code"] == "INVALID_OTP"
    other = await verify(client, await challenge(client, email), codes[4].replace("-", " "))
    assert other["__typename"] == "AuthSession"


async def test_regenerating_replaces_every_recovery_code(
    client: httpx.AsyncClient, clock: MutableClock
) -> None:
    email, token, secret, old = await enrolled(client, clock)
    recovery_only = await gql(client, REGENERATE, {"i": {"code": old[0]}}, token=token)
    assert recovery_only["data"]["regenerateRecoveryCodes"]["code"] == "INVALID_OTP"
    answer = await gql(client, REGENERATE, {"i": {"code": code_at(secret, clock)}}, token=token)
    new = answer["data"]["regenerateRecoveryCodes"]["codes"]
    assert len(new) == 10 and not set(new) & set(old)
    assert (await verify(client, await challenge(client, email), old[1]))["code"] == "INVALID_OTP"
    session = await verify(client, await challenge(client, email), new[1])
    assert session["__typename"] == "AuthSession"


async def test_disable_needs_password_and_code(
    client: httpx.AsyncClient, clock: MutableClock, database_url: str
) -> None:
    email, token, secret, codes = await enrolled(client, clock)
    wrong_password = await gql(
        client,
        DISABLE,
        {"i": {"password": "wrong password!", "code": code_at(secret, clock)}},
        token=token,
    )
    assert wrong_password["data"]["disableTotp"]["code"] == "INVALID_CREDENTIALS"
    wrong_code = await gql(
        client, DISABLE, {"i": {"password": PASSWORD, "code": "123-456"}}, token=token
    )
    assert wrong_code["data"]["disableTotp"]["code"] == "INVALID_OTP"
    assert (await gql(client, ME, token=token))["data"]["me"]["otpEnabled"] is True
    done = await gql(client, DISABLE, {"i": {"password": PASSWORD, "code": codes[0]}}, token=token)
    assert done["data"]["disableTotp"] == {
        "__typename": "User",
        "id": done["data"]["disableTotp"]["id"],
        "otpEnabled": False,
    }
    assert (await gql(client, ME, token=token))["data"]["me"]["otpEnabled"] is False
    assert (await login(client, email, PASSWORD))["__typename"] == "AuthSession"
    engine = create_async_engine(database_url)
    async with engine.connect() as conn:
        left = (await conn.execute(text("SELECT count(*) FROM recovery_codes"))).scalar_one()
        left += (await conn.execute(text("SELECT count(*) FROM totp_credentials"))).scalar_one()
    await engine.dispose()
    assert left == 0


async def test_login_document_still_works_for_users_without_two_factor(
    client: httpx.AsyncClient,
) -> None:
    email = unique_email()
    await signup(client, email, PASSWORD)
    body = await gql(client, LOGIN, {"i": {"email": email, "password": PASSWORD}})
    assert body["data"]["login"]["__typename"] == "AuthSession"


async def test_codes_typed_as_apps_show_them(
    client: httpx.AsyncClient, clock: MutableClock
) -> None:
    email, _token, secret, _codes = await enrolled(client, clock)
    code = code_at(secret, clock)
    spaced = f" {code[:3]} {code[3:]} "
    assert (await verify(client, await challenge(client, email), spaced))[
        "__typename"
    ] == "AuthSession"


async def test_two_factor_operations_need_two_factor_on(
    client: httpx.AsyncClient, clock: MutableClock
) -> None:
    token = (await signed_up_and_proven(client, unique_email()))["accessToken"]
    regen = await gql(client, REGENERATE, {"i": {"code": "123456"}}, token=token)
    assert regen["data"]["regenerateRecoveryCodes"]["code"] == "INVALID_INPUT"
    disable = await gql(
        client, DISABLE, {"i": {"password": PASSWORD, "code": "123456"}}, token=token
    )
    assert disable["data"]["disableTotp"]["code"] == "INVALID_INPUT"
    confirm = await gql(client, CONFIRM, {"i": {"code": "123456"}}, token=token)
    assert confirm["data"]["confirmTotp"]["code"] == "INVALID_INPUT"
    bad = await gql(client, CONFIRM, {"i": {"code": "12\x003456"}}, token=token)
    assert bad["data"]["confirmTotp"]["code"] == "INVALID_INPUT"


async def test_a_right_code_opens_no_failure_window(
    client: httpx.AsyncClient, clock: MutableClock
) -> None:
    """The account's 15 minutes start with the first wrong code, not with a right one: ten
    wrong codes either side of "15 minutes after a right code" are still one window."""
    email, _token, secret, _codes = await enrolled(client, clock)
    clock.advance(minutes=14)
    for _ in range(2):
        token = await challenge(client, email)
        for _ in range(5):
            assert (await verify(client, token, "000000"))["code"] == "INVALID_OTP"
    clock.advance(minutes=1, seconds=30)
    late = await verify(client, await challenge(client, email), code_at(secret, clock))
    assert late["code"] == "RATE_LIMITED"
    assert late["retryAfter"] > 10 * 60


async def test_a_pending_secret_signs_nobody_in(
    client: httpx.AsyncClient, clock: MutableClock
) -> None:
    email, token, _secret, codes = await enrolled(client, clock)
    earlier = await challenge(client, email)  # issued while two-factor was on
    done = await gql(client, DISABLE, {"i": {"password": PASSWORD, "code": codes[0]}}, token=token)
    assert done["data"]["disableTotp"]["otpEnabled"] is False
    pending = (await gql(client, SETUP, token=token))["data"]["setupTotp"]["secret"]
    answer = await verify(client, earlier, code_at(pending, clock))
    assert answer["code"] == "INVALID_OTP"


async def test_the_loser_of_a_race_on_one_challenge_keeps_its_code(
    client: httpx.AsyncClient, clock: MutableClock
) -> None:
    """A TOTP code and a recovery code sent at once for one challenge: one session, and
    the code that lost is not spent."""
    email, _token, secret, codes = await enrolled(client, clock)
    token = await challenge(client, email)
    totp, recovery = code_at(secret, clock), codes[0]
    results = await asyncio.gather(verify(client, token, totp), verify(client, token, recovery))
    won = [r["__typename"] == "AuthSession" for r in results]
    assert sorted(won) == [False, True]
    assert results[won.index(False)]["code"] == "INVALID_TOKEN"
    loser = recovery if won[0] else totp
    again = await verify(client, await challenge(client, email), loser)
    assert again["__typename"] == "AuthSession"

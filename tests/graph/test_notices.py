"""Security notices by mail: password changed or reset, two-factor on or off, a recovery
code used, and a sign-in from a new device (a user-agent family and network, IPv4 /24 or
IPv6 /48, without a session of the user in the last 90 days)."""

from __future__ import annotations

import secrets
import string
from collections.abc import AsyncIterator, Callable

import httpx
import pytest
from starlette.applications import Starlette

from db.settings import Settings
from graph.app import create_app
from tests.conftest import PASSWORD, MutableClock, client_for
from tests.gql import (
    CHANGE_PASSWORD,
    REQUEST_LOGIN_CODE,
    REQUEST_PASSWORD_RESET,
    RESET_PASSWORD,
    gql,
    login,
    mutate,
    refresh,
    signed_in,
    signed_up,
    verify_otp,
)
from tests.graph.test_lifecycle import change_email
from tests.graph.test_mfa import CONFIRM, DISABLE, SETUP, code_at
from tests.smtp import CODE_LINE, SIX_DIGITS, Delivered, SmtpSink

FIREFOX_128 = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
FIREFOX_129 = "Mozilla/5.0 (X11; Linux x86_64; rv:129.0) Gecko/20100101 Firefox/129.0"
CHROME_WINDOWS = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko)"
    " Chrome/126.0.0.0 Safari/537.36"
)
DIGITS_APP = "MyApp/123456 (Linux; Android 14)"
HOME = "203.0.113.7"

NEW_DEVICE = "New sign-in to your Strawgate account"
# The mails that carry a code; every other mail is a notice.
CODE_SUBJECTS = ("Confirm your email address", "Your sign-in code", "Reset your ")

Device = Callable[..., httpx.AsyncClient]


@pytest.fixture
async def device(mail_app: Starlette) -> AsyncIterator[Device]:
    """Makes clients of the app from a given address with a given user agent."""
    opened: list[httpx.AsyncClient] = []

    def make(ip: str = HOME, user_agent: str = FIREFOX_128) -> httpx.AsyncClient:
        http = client_for(mail_app, ip=ip)
        http.headers["user-agent"] = user_agent
        opened.append(http)
        return http

    yield make
    for http in opened:
        await http.aclose()


def is_notice(mail: Delivered) -> bool:
    return not mail.subject.startswith(CODE_SUBJECTS)


def is_sign_in_code(mail: Delivered) -> bool:
    return mail.subject.startswith("Your sign-in code")


async def notices_so_far(http: httpx.AsyncClient, smtp: SmtpSink, email: str) -> list[Delivered]:
    """Every notice to `email` queued before now: a sign-in code requested now is sent
    after them, so once it has arrived they have had their turn."""
    sent = len([m for m in smtp.mails(email) if is_sign_in_code(m)])
    marker = await mutate(http, REQUEST_LOGIN_CODE, {"i": {"email": email}})
    assert marker["__typename"] == "OtpChallenge", marker
    await smtp.wait_for(email, count=sent + 1, where=is_sign_in_code)
    return [m for m in smtp.mails(email) if is_notice(m)]


async def new_device_notice(smtp: SmtpSink, email: str, count: int = 1) -> Delivered:
    return await smtp.wait_for(email, count=count, where=lambda m: m.subject == NEW_DEVICE)


async def enrolled(
    http: httpx.AsyncClient, smtp: SmtpSink, email: str, token: str, clock: MutableClock
) -> tuple[str, list[str]]:
    """Turns two-factor on: (secret, recovery codes), once its notice has arrived."""
    setup = (await gql(http, SETUP, token=token))["data"]["setupTotp"]
    secret = setup["secret"]
    confirmed = await gql(http, CONFIRM, {"i": {"code": code_at(secret, clock)}}, token=token)
    codes: list[str] = confirmed["data"]["confirmTotp"]["codes"]
    await smtp.wait_for(email, where=lambda m: "Two-factor" in m.subject)
    return secret, codes


def letters_only_email() -> str:
    """An address with no digits, so any six digits in a mail come from elsewhere."""
    name = "".join(secrets.choice(string.ascii_lowercase) for _ in range(12))
    return f"{name}@example.com"


# -- new devices --------------------------------------------------------------------------


async def test_the_first_session_sends_no_notice(device: Device, smtp: SmtpSink) -> None:
    email, _session = await signed_up(device(), smtp)
    assert await notices_so_far(device(), smtp, email) == []
    assert [m.subject for m in smtp.mails(email)] == [
        "Confirm your email address for Strawgate",
        "Your sign-in code for Strawgate",
    ]


async def test_the_same_browser_family_and_network_is_no_new_device(
    device: Device, smtp: SmtpSink
) -> None:
    email, _session = await signed_up(device(HOME, FIREFOX_128), smtp)
    await signed_in(device("203.0.113.99", FIREFOX_129), email)
    await signed_in(device("203.0.113.7", FIREFOX_128), email)
    assert await notices_so_far(device(), smtp, email) == []


async def test_another_browser_family_is_a_new_device(device: Device, smtp: SmtpSink) -> None:
    email, _session = await signed_up(device(HOME, FIREFOX_128), smtp)
    await signed_in(device(HOME, CHROME_WINDOWS), email)
    notice = await new_device_notice(smtp, email)
    text, html = notice.text(), notice.html()
    assert f"from Chrome on Windows ({HOME})" in text
    assert "Chrome on Windows" in html and HOME in html
    for raw in ("Mozilla", "Win64", "126.0"):
        assert raw not in text + html
    assert not CODE_LINE.search(text)
    # Known from now on: a second sign-in from it is not news.
    await signed_in(device("203.0.113.200", CHROME_WINDOWS), email)
    assert [m.subject for m in await notices_so_far(device(), smtp, email)] == [NEW_DEVICE]


async def test_another_network_is_a_new_device(device: Device, smtp: SmtpSink) -> None:
    email, _session = await signed_up(device(HOME, FIREFOX_128), smtp)
    await signed_in(device("203.0.114.7", FIREFOX_128), email)
    notice = await new_device_notice(smtp, email)
    assert "from Firefox on Linux (203.0.114.7)" in notice.text()
    assert [m.subject for m in await notices_so_far(device(), smtp, email)] == [NEW_DEVICE]


async def test_ipv6_networks_are_48_bit_prefixes(device: Device, smtp: SmtpSink) -> None:
    email, _session = await signed_up(device("2001:db8:1:2::5", FIREFOX_128), smtp)
    await signed_in(device("2001:db8:1:ffff::9", FIREFOX_129), email)
    assert await notices_so_far(device(), smtp, email) == []
    await signed_in(device("2001:db8:2:2::5", FIREFOX_128), email)
    notice = await new_device_notice(smtp, email)
    assert "from Firefox on Linux (2001:db8:2:2::5)" in notice.text()
    assert [m.subject for m in await notices_so_far(device(), smtp, email)] == [NEW_DEVICE]


async def test_an_ipv4_mapped_address_counts_as_its_ipv4_network(
    device: Device, smtp: SmtpSink
) -> None:
    email, _session = await signed_up(device(HOME, FIREFOX_128), smtp)
    await signed_in(device("::ffff:203.0.113.50", FIREFOX_128), email)
    assert await notices_so_far(device(), smtp, email) == []


async def test_a_device_unseen_for_90_days_is_new_again(
    device: Device, smtp: SmtpSink, clock: MutableClock
) -> None:
    email, _session = await signed_up(device(), smtp)
    clock.advance(days=89)
    await signed_in(device(), email)
    assert await notices_so_far(device(), smtp, email) == []
    clock.advance(days=91)
    await signed_in(device(), email)
    notice = await new_device_notice(smtp, email)
    assert "from Firefox on Linux (203.0.113.7)" in notice.text()
    assert [m.subject for m in await notices_so_far(device(), smtp, email)] == [NEW_DEVICE]


async def test_last_use_not_creation_makes_a_device_known(
    device: Device, smtp: SmtpSink, clock: MutableClock
) -> None:
    """A session created 100 days ago but refreshed 75 days ago still vouches for its
    device; 91 days after that last use it no longer does."""
    email, session = await signed_up(device(), smtp)
    token = session["refreshToken"]
    for days in (10, 10, 5):  # used often enough for the idle timeout, last on day 25
        clock.advance(days=days)
        rotated = await refresh(device(), token)
        assert rotated["__typename"] == "AuthSession"
        token = rotated["refreshToken"]
    clock.advance(days=75)
    await signed_in(device(), email)
    assert await notices_so_far(device(), smtp, email) == []
    clock.advance(days=91)
    await signed_in(device("203.0.113.8", FIREFOX_129), email)
    await new_device_notice(smtp, email)
    assert [m.subject for m in await notices_so_far(device(), smtp, email)] == [NEW_DEVICE]


# -- two-factor, recovery codes, passwords --------------------------------------------------


async def test_turning_two_factor_on_and_off_is_mailed(
    device: Device, smtp: SmtpSink, clock: MutableClock
) -> None:
    http = device()
    email, session = await signed_up(http, smtp)
    token = session["accessToken"]
    secret, _codes = await enrolled(http, smtp, email, token, clock)
    on = await smtp.wait_for(email, where=lambda m: "Two-factor" in m.subject)
    assert on.subject == "Two-factor sign-in is on for your Strawgate account"
    assert "Two-factor sign-in was turned on" in on.text()
    assert not CODE_LINE.search(on.text())
    assert secret not in on.text() + on.html()

    clock.advance(seconds=90)  # the confirming code is spent; a fresh step
    disabled = await gql(
        http, DISABLE, {"i": {"password": PASSWORD, "code": code_at(secret, clock)}}, token=token
    )
    assert disabled["data"]["disableTotp"]["__typename"] == "User", disabled
    off = await smtp.wait_for(email, count=2, where=lambda m: "Two-factor" in m.subject)
    assert off.subject == "Two-factor sign-in is off for your Strawgate account"
    assert "Two-factor sign-in was turned off" in off.text()
    assert not CODE_LINE.search(off.text())


async def test_a_recovery_code_used_says_how_many_remain(
    device: Device, smtp: SmtpSink, clock: MutableClock
) -> None:
    http = device()
    email, session = await signed_up(http, smtp)
    _secret, codes = await enrolled(http, smtp, email, session["accessToken"], clock)
    assert len(codes) == 10

    def recovery(m: Delivered) -> bool:
        return "recovery code" in m.subject

    for used, remaining in ((codes[0], 9), (codes[1], 8)):
        challenge = await login(http, email, PASSWORD)
        assert challenge["__typename"] == "OtpChallenge", challenge
        signed = await verify_otp(http, challenge["challengeToken"], used)
        assert signed["__typename"] == "AuthSession", signed
        notice = await smtp.wait_for(email, count=10 - remaining, where=recovery)
        assert notice.subject == "A recovery code was used to sign in to Strawgate"
        text = notice.text()
        assert f"You have {remaining} recovery codes left." in text
        assert f"You have {remaining} recovery codes left." in notice.html()
        assert used not in text + notice.html()
        assert not CODE_LINE.search(text)


async def test_a_password_reset_is_mailed(device: Device, smtp: SmtpSink) -> None:
    http = device()
    email, _session = await signed_up(http, smtp)
    reset = await mutate(http, REQUEST_PASSWORD_RESET, {"i": {"email": email}})
    code = (await smtp.wait_for(email, where=lambda m: m.subject.startswith("Reset"))).code()
    new_password = "a brand new horse and staple"
    body = await gql(
        http,
        RESET_PASSWORD,
        {
            "i": {
                "challengeToken": reset["challengeToken"],
                "code": code,
                "newPassword": new_password,
            }
        },
    )
    assert body["data"]["resetPassword"]["__typename"] == "AuthSession", body
    notice = await smtp.wait_for(email, where=lambda m: "was reset" in m.subject)
    assert notice.subject == "Your Strawgate password was reset"
    assert "Your password was reset" in notice.text()
    assert not CODE_LINE.search(notice.text())
    assert code not in notice.text() + notice.html()


async def test_a_password_change_is_mailed(device: Device, smtp: SmtpSink) -> None:
    http = device()
    email, session = await signed_up(http, smtp)
    new_password = "a brand new horse and staple"
    changed = await gql(
        http,
        CHANGE_PASSWORD,
        {"i": {"currentPassword": PASSWORD, "newPassword": new_password}},
        token=session["accessToken"],
    )
    assert changed["data"]["changePassword"]["__typename"] == "AuthSession", changed
    notice = await smtp.wait_for(email, where=lambda m: "was changed" in m.subject)
    assert notice.subject == "Your Strawgate password was changed"
    assert "Your password was changed." in notice.text()
    assert not CODE_LINE.search(notice.text())


# -- what a notice never shows --------------------------------------------------------------


async def test_no_notice_shows_six_digits_or_the_raw_user_agent(
    device: Device, smtp: SmtpSink, clock: MutableClock
) -> None:
    """Every kind of notice, caused from a client whose user agent carries six digits: a
    reader must never find something that looks like a code in them."""
    email = letters_only_email()
    await signed_up(device(HOME, FIREFOX_128), smtp, email)
    http = device(HOME, DIGITS_APP)
    token = (await signed_in(http, email))["accessToken"]  # a new device
    new_device = await new_device_notice(smtp, email)
    assert "from Android (203.0.113.7)" in new_device.text()

    _secret, codes = await enrolled(http, smtp, email, token, clock)
    challenge = await login(http, email, PASSWORD)
    signed = await verify_otp(http, challenge["challengeToken"], codes[0])
    assert signed["__typename"] == "AuthSession", signed
    disabled = await gql(
        http, DISABLE, {"i": {"password": PASSWORD, "code": codes[1]}}, token=token
    )
    assert disabled["data"]["disableTotp"]["__typename"] == "User", disabled
    new_password = "a brand new horse and staple"
    changed = await gql(
        http,
        CHANGE_PASSWORD,
        {"i": {"currentPassword": PASSWORD, "newPassword": new_password}},
        token=token,
    )
    assert changed["data"]["changePassword"]["__typename"] == "AuthSession", changed
    reset = await mutate(http, REQUEST_PASSWORD_RESET, {"i": {"email": email}})
    code = (await smtp.wait_for(email, where=lambda m: m.subject.startswith("Reset"))).code()
    body = await gql(
        http,
        RESET_PASSWORD,
        {"i": {"challengeToken": reset["challengeToken"], "code": code, "newPassword": PASSWORD}},
    )
    assert body["data"]["resetPassword"]["__typename"] == "AuthSession", body

    notices = await notices_so_far(http, smtp, email)
    assert sorted(m.subject for m in notices) == sorted(
        [
            NEW_DEVICE,
            "Two-factor sign-in is on for your Strawgate account",
            "A recovery code was used to sign in to Strawgate",
            "Two-factor sign-in is off for your Strawgate account",
            "Your Strawgate password was changed",
            "Your Strawgate password was reset",
        ]
    )
    for notice in notices:
        for part in (notice.subject, notice.text(), notice.html()):
            assert not SIX_DIGITS.search(part), (notice.subject, SIX_DIGITS.findall(part))
            assert "MyApp" not in part
        assert not CODE_LINE.search(notice.text())
        assert "Android" in notice.text(), notice.subject


# -- addresses and URLs are shown as they are ----------------------------------------------

OWNER = "123456@example.com"
MOVED = "moved-8c176159@example.org"
# Every address and URL a mail shows carries six digits in a row.
DIGITS_SETTINGS = {
    "product_url": "https://example.com/r/123456",
    "security_url": "https://example.com/r/654321/security",
    "support_contact": "help-000000-999999@example.org",
}


@pytest.fixture
async def digits_app(
    make_settings: Callable[..., Settings], clock: MutableClock, clean_db: None, smtp: SmtpSink
) -> AsyncIterator[Starlette]:
    settings = make_settings(require_email_verification=True, **smtp.settings(), **DIGITS_SETTINGS)
    application = create_app(settings, clock=clock)
    async with application.router.lifespan_context(application):
        yield application


def assert_shown_as_is(mail: Delivered, *values: str, code: str | None = None) -> None:
    """`values` appear unaltered in both parts; no other six digits in a row but `code`."""
    text, html = mail.text(), mail.html()
    for value in values:
        assert value in text, (mail.subject, value)
        assert value in html, (mail.subject, value)
    expected = [code] if code else []
    for part, shows in ((mail.subject, []), (text, expected), (html, expected)):
        for value in values:
            part = part.replace(value, " ")
        assert SIX_DIGITS.findall(part) == shows, mail.subject
    assert CODE_LINE.findall(text) == expected


async def test_addresses_and_urls_with_six_digits_reach_the_reader_as_they_are(
    digits_app: Starlette, smtp: SmtpSink
) -> None:
    """Issue 12: the new address in a change-of-address notice was shown with a space in
    it; the user's own address, the product and security URLs and the support address
    hold six digits in a row here, and every mail shows them exactly."""
    product, security, support = DIGITS_SETTINGS.values()
    async with client_for(digits_app) as http, client_for(digits_app, ip="198.51.100.9") as away:
        http.headers["user-agent"] = FIREFOX_128
        away.headers["user-agent"] = DIGITS_APP
        _email, session = await signed_up(http, smtp, OWNER)
        verify = await smtp.wait_for(OWNER)
        assert_shown_as_is(verify, product, code=verify.code())

        await signed_in(away, OWNER)
        notice = await new_device_notice(smtp, OWNER)
        assert_shown_as_is(notice, product, security)
        assert f'href="{security}"' in notice.html()

        challenge = await change_email(http, session["accessToken"], MOVED)
        assert challenge["__typename"] == "OtpChallenge", challenge
        code_mail = await smtp.wait_for(MOVED)
        assert_shown_as_is(code_mail, product, code=code_mail.code())
        moved = await verify_otp(http, challenge["challengeToken"], code_mail.code())
        assert moved["__typename"] == "AuthSession", moved

        changed = await smtp.wait_for(OWNER, where=lambda m: "address was changed" in m.subject)
        assert_shown_as_is(changed, product, MOVED, support)
        assert f"changed to {MOVED}." in changed.text()
        assert f"<strong>{MOVED}</strong>" in changed.html()

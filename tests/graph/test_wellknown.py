"""The documents that let other sites and native apps use the RP ID's passkeys
(graph/wellknown.py): /.well-known/webauthn (related origins), assetlinks.json (Android)
and apple-app-site-association (iOS, macOS), from WEBAUTHN_* settings; and the origins
they allow are accepted in the ceremonies."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import AsyncIterator, Callable

import httpx
import pytest
from starlette.applications import Starlette

from db.settings import ConfigError, Settings
from graph.app import create_app
from tests.conftest import MutableClock, client_for
from tests.graph.test_passkeys import finish, new_user, register, start
from tests.smtp import SmtpSink
from tests.webauthn_authenticator import SoftAuthenticator

RP_ID = "example.com"
SHOP = "https://shop.example.net"  # another site of the same owner
FINGERPRINT = ":".join(f"{byte:02X}" for byte in hashlib.sha256(b"signing cert").digest())
APK_ORIGIN = "android:apk-key-hash:" + base64.urlsafe_b64encode(
    hashlib.sha256(b"signing cert").digest()
).rstrip(b"=").decode("ascii")
OTHER_FINGERPRINT = ":".join(["0A"] * 32)
APPS = (
    f"com.example.app:{FINGERPRINT},com.example.app:{OTHER_FINGERPRINT},org.example.b:{FINGERPRINT}"
)
APPLE = "ABCDE12345.com.example.app,ABCDE12345.com.example.app.beta"


@pytest.fixture
async def app(
    make_settings: Callable[..., Settings], clock: MutableClock, clean_db: None, smtp: SmtpSink
) -> AsyncIterator[Starlette]:
    settings = make_settings(
        webauthn_rp_id=RP_ID,
        webauthn_related_origins=SHOP,
        webauthn_android_apps=APPS,
        webauthn_apple_app_ids=APPLE,
        **smtp.settings(),
    )
    application = create_app(settings, clock=clock)
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
async def client(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(app) as http:
        yield http


async def test_the_documents_list_the_configured_sites_and_apps(
    client: httpx.AsyncClient,
) -> None:
    related = await client.get("/.well-known/webauthn")
    assert related.status_code == 200
    assert related.headers["content-type"] == "application/json"
    assert related.headers["cache-control"] == "public, max-age=300"
    # The RP's own web origin (WEBAUTHN_ORIGINS' default) and the related one; never an app.
    assert related.json() == {"origins": ["https://example.com", SHOP]}

    links = await client.get("/.well-known/assetlinks.json")
    assert links.status_code == 200 and links.headers["cache-control"] == "public, max-age=300"
    relation = [
        "delegate_permission/common.handle_all_urls",
        "delegate_permission/common.get_login_creds",
    ]
    assert links.json() == [
        {
            "relation": relation,
            "target": {
                "namespace": "android_app",
                "package_name": "com.example.app",
                "sha256_cert_fingerprints": [FINGERPRINT, OTHER_FINGERPRINT],
            },
        },
        {
            "relation": relation,
            "target": {
                "namespace": "android_app",
                "package_name": "org.example.b",
                "sha256_cert_fingerprints": [FINGERPRINT],
            },
        },
    ]

    apple = await client.get("/.well-known/apple-app-site-association")
    assert apple.status_code == 200 and apple.headers["content-type"] == "application/json"
    assert apple.json() == {
        "webcredentials": {
            "apps": ["ABCDE12345.com.example.app", "ABCDE12345.com.example.app.beta"]
        }
    }


async def test_without_the_settings_nothing_is_served(
    make_settings: Callable[..., Settings], clock: MutableClock
) -> None:
    for settings in (make_settings(), make_settings(webauthn_rp_id=RP_ID)):
        application = create_app(settings, clock=clock)
        async with (
            application.router.lifespan_context(application),
            client_for(application) as http,
        ):
            for path in (
                "/.well-known/webauthn",
                "/.well-known/assetlinks.json",
                "/.well-known/apple-app-site-association",
            ):
                answer = await http.get(path)
                assert answer.status_code == 404, path
                assert answer.headers["cache-control"] == "no-store"


async def test_a_related_origin_and_a_listed_app_register_passkeys(
    client: httpx.AsyncClient,
) -> None:
    """The origins the documents allow are the ceremonies' too: the related site, and the
    Android app's apk-key-hash origin derived from its fingerprint (not listed by hand)."""
    _, token = await new_user(client)
    await register(client, token, SoftAuthenticator(rp_id=RP_ID, origin=SHOP))
    await register(client, token, SoftAuthenticator(rp_id=RP_ID, origin=APK_ORIGIN))
    # A site nobody listed is refused.
    ceremony = await start(client, token)
    stranger = SoftAuthenticator(rp_id=RP_ID, origin="https://evil.example.org")
    refused = await finish(
        client, token, ceremony["challengeToken"], stranger.register(ceremony["optionsJson"])
    )
    assert refused["__typename"] == "AuthError", refused


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("webauthn_related_origins", "http://shop.example.net", "must use https"),
        ("webauthn_related_origins", "https://app.example.com", "list it in WEBAUTHN_ORIGINS"),
        ("webauthn_related_origins", "https://shop.example.net/path", "is not an origin"),
        ("webauthn_related_origins", "android:apk-key-hash:" + "x" * 43, "is not an origin"),
        ("webauthn_android_apps", "com.example.app", "package.name:SHA256_FINGERPRINT"),
        ("webauthn_android_apps", "com.example.app:AB:CD", "package.name:SHA256_FINGERPRINT"),
        ("webauthn_android_apps", f"example:{FINGERPRINT}", "package.name:SHA256_FINGERPRINT"),
        ("webauthn_apple_app_ids", "com.example.app", "TEAMID.bundle.id"),
        ("webauthn_apple_app_ids", "abcde12345.com.example.app", "TEAMID.bundle.id"),
    ],
)
def test_a_malformed_entry_stops_the_start_in_one_line(
    make_settings: Callable[..., Settings], setting: str, value: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as refused:
        make_settings(webauthn_rp_id=RP_ID, **{setting: value}).relying_party()
    assert "\n" not in str(refused.value)

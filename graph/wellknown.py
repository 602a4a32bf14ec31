"""The documents that let other origins and native apps use the passkeys of
WEBAUTHN_RP_ID, served where Strawgate answers on the RP ID's host (or a proxy sends
these paths to it). Each is served only when its setting lists something:

- `/.well-known/webauthn` (WebAuthn Level 3 related origin requests): the origins on other
  sites that may use the RP ID (WEBAUTHN_RELATED_ORIGINS, and the RP's own web origins);
- `/.well-known/assetlinks.json` (Digital Asset Links): the Android apps that may use the
  RP ID's credentials (WEBAUTHN_ANDROID_APPS);
- `/.well-known/apple-app-site-association`: the iOS and macOS apps allowed to
  (`webcredentials`, WEBAUTHN_APPLE_APP_IDS).
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from db.settings import RelyingParty

RELATED_ORIGINS_PATH = "/.well-known/webauthn"
ASSET_LINKS_PATH = "/.well-known/assetlinks.json"
APPLE_ASSOCIATION_PATH = "/.well-known/apple-app-site-association"
PATHS = frozenset({RELATED_ORIGINS_PATH, ASSET_LINKS_PATH, APPLE_ASSOCIATION_PATH})

# What an Android app listed may do with the site's credentials: sign in with its saved
# passwords and passkeys (get_login_creds), and open its links (handle_all_urls, which
# Credential Manager also accepts as the association).
_ANDROID_RELATIONS = [
    "delegate_permission/common.handle_all_urls",
    "delegate_permission/common.get_login_creds",
]


def documents(rp: RelyingParty | None) -> dict[str, Any]:
    """Path -> JSON document, for the documents the settings ask for."""
    if rp is None:
        return {}
    found: dict[str, Any] = {}
    if rp.related_origins:
        web = [origin for origin in rp.origins if origin.startswith("https://")]
        found[RELATED_ORIGINS_PATH] = {"origins": list(dict.fromkeys(web))}
    if rp.android_apps:
        found[ASSET_LINKS_PATH] = [
            {
                "relation": _ANDROID_RELATIONS,
                "target": {
                    "namespace": "android_app",
                    "package_name": app.package,
                    "sha256_cert_fingerprints": [
                        other.fingerprint
                        for other in rp.android_apps
                        if other.package == app.package
                    ],
                },
            }
            for app in {app.package: app for app in rp.android_apps}.values()
        ]
    if rp.apple_app_ids:
        found[APPLE_ASSOCIATION_PATH] = {"webcredentials": {"apps": list(rp.apple_app_ids)}}
    return found


def routes(rp: RelyingParty | None) -> list[Route]:
    """A route per document; a path whose setting is empty is not served (404)."""

    def serve(document: Any) -> Any:
        async def endpoint(request: Request) -> Response:
            return JSONResponse(document)

        return endpoint

    return [Route(path, serve(document)) for path, document in documents(rp).items()]

"""The web redirect through an identity provider, plain HTTP outside GraphQL (the contract's
identities.graphql):

    GET /auth/{provider}/authorize?redirect_to=URL&code_challenge=C&code_challenge_method=S256
    GET /auth/{provider}/authorize?link=...          (the URL startIdentityLink answers)
    GET|POST /auth/{provider}/callback               (the provider comes back here)

A request that is not one (an unknown provider, a redirect URL off the list, no S256
challenge) gets a 400 page and never a redirect; a state this server never issued gets a
400 page too (there is no checked place to send it). Everything else goes back to the
redirect URL: with `code` where the provider step succeeded, else with `error` and
`error_description`. The browser that starts a flow gets the `strawgate_oauth` cookie
(HttpOnly, path /auth/, 10 minutes), and only a callback carrying it completes the flow.
A callback's form (Apple's form_post) is read here, as application/x-www-form-urlencoded
only, UTF-8, at most MAX_FORM_FIELDS fields (the body's size is bounded for every route by
the app's request guard); anything else is a 400 page: the route is open to anyone's POST
(it is not behind the CSRF guard), so nothing posted to it is an internal error.
"""

from __future__ import annotations

import html
import logging
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from db.errors import AuthFailure, ErrorCode
from db.services.signin.identity_redirect import (
    FLOW_LIFETIME,
    FlowNotFound,
    IdentityRedirects,
    Redirect,
    with_params,
)
from graph.context import client_of
from graph.logs import REQUEST_ID

log = logging.getLogger("strawgate.identities")

BINDING_COOKIE = "strawgate_oauth"
# The most of a callback form read (Apple's: code, state, id_token, user).
MAX_FORM_FIELDS = 16


def _page(status: int, title: str, message: str) -> HTMLResponse:
    body = (
        "<!doctype html><html lang=en><meta charset=utf-8><title>"
        f"{html.escape(title)}</title><h1>{html.escape(title)}</h1><p>{html.escape(message)}</p>"
    )
    return HTMLResponse(body, status_code=status, headers={"cache-control": "no-store"})


def _redirect(target: Redirect, *, secure: bool, status: int = 302) -> Response:
    response = RedirectResponse(target.url, status_code=status)
    response.headers["cache-control"] = "no-store"
    response.headers["referrer-policy"] = "no-referrer"
    if target.binding is not None:
        response.set_cookie(
            BINDING_COOKIE,
            target.binding,
            max_age=int(FLOW_LIFETIME.total_seconds()),
            path="/auth/",
            httponly=True,
            secure=secure,
            # Apple comes back by a cross-site POST: only SameSite=None (which browsers
            # take with Secure only) carries the cookie there.
            samesite="none" if secure else "lax",
        )
    return response


def routes(secure_cookies: bool) -> list[Route]:
    async def authorize(request: Request) -> Response:
        identities: IdentityRedirects = request.app.state.services.auth.identity_redirects
        provider_id = request.path_params["provider"]
        params = request.query_params
        binding = request.cookies.get(BINDING_COOKIE)
        redirect_to = params.get("redirect_to", "")

        async def start() -> Redirect:
            if "link" in params:
                return await identities.start_linking_browser(
                    provider_id=provider_id,
                    link=params["link"],
                    binding=binding,
                    client=client_of(request),
                )
            return await identities.start(
                provider_id=provider_id,
                redirect_to=redirect_to,
                code_challenge=params.get("code_challenge", ""),
                code_challenge_method=params.get("code_challenge_method", ""),
                binding=binding,
                client=client_of(request),
            )

        return await _answer(
            start,
            secure=secure_cookies,
            # A provider that cannot be reached: back to the (checked) redirect URL.
            back=redirect_to if identities.providers.is_allowed_redirect(redirect_to) else None,
        )

    async def callback(request: Request) -> Response:
        identities: IdentityRedirects = request.app.state.services.auth.identity_redirects
        provider_id = request.path_params["provider"]
        if request.method == "POST":
            form = await _form(request)
            if form is None:
                return _page(
                    400,
                    "This sign-in cannot go on",
                    "The provider's answer could not be read. Go back to the app and start again.",
                )
            params = form
        else:
            params = dict(request.query_params)
        binding = request.cookies.get(BINDING_COOKIE)

        async def finish() -> Redirect:
            return await identities.callback(
                provider_id=provider_id, params=params, binding=binding
            )

        # After a form POST, 303: the browser GETs the app's URL.
        status = 303 if request.method == "POST" else 302
        return await _answer(finish, secure=secure_cookies, status=status)

    return [
        Route("/auth/{provider}/authorize", authorize, methods=["GET"]),
        Route("/auth/{provider}/callback", callback, methods=["GET", "POST"]),
    ]


async def _form(request: Request) -> dict[str, str] | None:
    """The fields of a form posted to the callback, or None where it is not a form this
    route takes: application/x-www-form-urlencoded (what a provider's form_post page
    sends), UTF-8, at most MAX_FORM_FIELDS fields. Read without Starlette's form parser,
    which needs python-multipart (not a dependency) even for this encoding: without it,
    every POST here was an internal error."""
    kind = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        return None
    body = await request.body()  # bounded by the request guard (MAX_BODY_BYTES)
    try:
        fields = parse_qsl(
            body.decode("utf-8"),
            keep_blank_values=True,
            max_num_fields=MAX_FORM_FIELDS,
            errors="strict",
        )
    except (UnicodeDecodeError, ValueError):
        return None
    return dict(fields)


async def _answer(
    step: Callable[[], Awaitable[Redirect]],
    *,
    secure: bool,
    back: str | None = None,
    status: int = 302,
) -> Response:
    try:
        target = await step()
    except FlowNotFound:
        return _page(
            400,
            "This sign-in cannot go on",
            "This sign-in link is invalid, was used already or has expired. Go back to the app"
            " and start again.",
        )
    except AuthFailure as failure:
        return _refusal(failure, secure=secure, back=back)
    except Exception:
        # Never a traceback to the browser: logged (with the request id every log line of
        # the request carries), and a page that says to try again.
        log.exception("a provider sign-in failed unexpectedly")
        return _page(
            503,
            "Sign-in is unavailable",
            f"Something went wrong on our side; try again (request {REQUEST_ID.get() or '-'}).",
        )
    return _redirect(target, secure=secure, status=status)


def _refusal(failure: AuthFailure, *, secure: bool, back: str | None) -> Response:
    if failure.code is ErrorCode.RATE_LIMITED:
        response = _page(429, "Too many sign-ins", failure.message)
        if failure.retry_after is not None:
            response.headers["retry-after"] = str(failure.retry_after)
        return response
    if failure.code is ErrorCode.PROVIDER_ERROR and back is not None:
        target = Redirect(
            url=with_params(back, error="PROVIDER_ERROR", error_description=failure.message)
        )
        return _redirect(target, secure=secure)
    return _page(400, "This sign-in cannot start", failure.message)

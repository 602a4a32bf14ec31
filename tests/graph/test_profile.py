"""updateProfile (the contract's apps.graphql): the user's own JSON profile and the language
of their mails, both in exportAccount, both gone with the account."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.conftest import unique_email
from tests.gql import gql, signed_up_and_proven

UPDATE = """mutation($i: UpdateProfileInput!) { updateProfile(input: $i) {
  __typename ... on User { profileJson locale } ... on AuthError { code message field } } }"""
PROFILE = "{ me { profileJson locale roles } }"


async def update(client: httpx.AsyncClient, token: str, **fields: Any) -> dict[str, Any]:
    body = await gql(client, UPDATE, {"i": fields}, token=token)
    result: dict[str, Any] = body["data"]["updateProfile"]
    return result


async def test_a_profile_and_a_locale_are_set_kept_and_cleared(client: httpx.AsyncClient) -> None:
    token = (await signed_up_and_proven(client, unique_email()))["accessToken"]
    fresh = (await gql(client, PROFILE, token=token))["data"]["me"]
    assert fresh == {"profileJson": "{}", "locale": None, "roles": []}

    pretty = json.dumps({"displayName": "Ada", "theme": {"dark": True}, "tags": ["a"]}, indent=2)
    answer = await update(client, token, profileJson=pretty, locale="EN-gb")
    assert answer["__typename"] == "User"
    assert json.loads(answer["profileJson"]) == json.loads(pretty)
    assert answer["locale"] == "en-GB"

    # null leaves either as it is; "" clears the locale.
    kept = await update(client, token, locale=None)
    assert json.loads(kept["profileJson"])["displayName"] == "Ada" and kept["locale"] == "en-GB"
    cleared = await update(client, token, locale="")
    assert cleared["locale"] is None and json.loads(cleared["profileJson"])["tags"] == ["a"]
    replaced = await update(client, token, profileJson="{}")
    assert replaced["profileJson"] == "{}"

    exported = await gql(client, "{ exportAccount { json } }", token=token)
    document = json.loads(exported["data"]["exportAccount"]["json"])
    assert document["profile"]["profile"] == {} and document["profile"]["locale"] is None


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"profileJson": "not json"}, "profileJson"),
        ({"profileJson": "[1, 2]"}, "profileJson"),
        ({"profileJson": '"text"'}, "profileJson"),
        ({"profileJson": json.dumps({"x": "a" * 5000})}, "profileJson"),
        ({"profileJson": json.dumps({"bell": "\u0007"})}, "profileJson"),
        ({"profileJson": json.dumps({"nul\u0000key": 1})}, "profileJson"),
        # Nested past the limit (small, but deep): refused, not a recursion error.
        ({"profileJson": '{"a": ' + "[" * 1000 + "]" * 1000 + "}"}, "profileJson"),
        ({"profileJson": '{"a": ' + "[" * 40 + "]" * 40 + "}"}, "profileJson"),
        ({"profileJson": "{" + " " * 20000 + "}"}, "profileJson"),
        ({"locale": "ja"}, "locale"),  # not one of the server's languages
        ({"locale": "english"}, "locale"),
        ({"locale": "en\u0000"}, "locale"),
        ({"profileJson": '{"ok": 1}', "locale": "xx"}, "locale"),
    ],
)
async def test_bad_input_is_refused_and_changes_nothing(
    client: httpx.AsyncClient, fields: dict[str, Any], field: str
) -> None:
    token = (await signed_up_and_proven(client, unique_email()))["accessToken"]
    await update(client, token, profileJson='{"kept": true}', locale="en")

    answer = await update(client, token, **fields)

    assert (answer["__typename"], answer["code"], answer["field"]) == (
        "AuthError",
        "INVALID_INPUT",
        field,
    )
    me = (await gql(client, PROFILE, token=token))["data"]["me"]
    assert (json.loads(me["profileJson"]), me["locale"]) == ({"kept": True}, "en")


async def test_update_profile_needs_a_signed_in_user(client: httpx.AsyncClient) -> None:
    body = await gql(client, UPDATE, {"i": {"locale": "en"}})
    assert body["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"


async def test_a_profile_goes_with_the_account(client: httpx.AsyncClient) -> None:
    email = unique_email()
    token = (await signed_up_and_proven(client, email))["accessToken"]
    await update(client, token, profileJson='{"name": "Ada"}')
    deleted = await gql(
        client,
        """mutation($i: DeleteAccountInput!) { deleteAccount(input: $i) { __typename } }""",
        {"i": {}},
        token=token,
    )
    assert deleted["data"]["deleteAccount"]["__typename"] == "DeleteAccountResult"
    again = (await signed_up_and_proven(client, email))["accessToken"]
    assert (await gql(client, PROFILE, token=again))["data"]["me"]["profileJson"] == "{}"

"""securityEvents: the signed-in user's own log, newest first, in cursor pages.

Events are recorded here with SecurityEvents directly; the app records its own as well
(signup, sign-in), so every test compares against what the log held before it."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest

from db.services.events import EventKind, SecurityEvents
from db.services.types import ClientInfo
from db.session import Statements
from tests.conftest import PASSWORD, MutableClock, unique_email
from tests.gql import gql, post, signup

EVENTS = """
query($first: Int, $after: String) {
  securityEvents(first: $first, after: $after) {
    edges { cursor node { id at kind ipAddress userAgent sessionId } }
    pageInfo { hasNextPage endCursor }
  }
}
"""


@pytest.fixture
def events(clock: MutableClock) -> SecurityEvents:
    return SecurityEvents(clock=clock)


async def signed_up(client: httpx.AsyncClient) -> tuple[uuid.UUID, str]:
    """A new account's id and access token."""
    session = await signup(client, unique_email(), PASSWORD)
    assert session["__typename"] == "AuthSession", session
    return uuid.UUID(session["user"]["id"]), session["accessToken"]


async def connection(
    client: httpx.AsyncClient, token: str | None, **variables: Any
) -> dict[str, Any]:
    body = await gql(client, EVENTS, variables, token=token)
    assert "errors" not in body, body
    found: dict[str, Any] = body["data"]["securityEvents"]
    return found


async def everything(client: httpx.AsyncClient, token: str) -> list[dict[str, Any]]:
    """Every event of the user, newest first, walked with the largest pages."""
    nodes: list[dict[str, Any]] = []
    after = None
    while True:
        page = await connection(client, token, first=100, after=after)
        nodes += [edge["node"] for edge in page["edges"]]
        if not page["pageInfo"]["hasNextPage"]:
            return nodes
        after = page["pageInfo"]["endCursor"]


async def record(
    events: SecurityEvents,
    statements: Statements,
    user_id: uuid.UUID,
    kinds: list[EventKind],
    *,
    user_agent: str = "pytest-recorder",
) -> None:
    async with events.transaction(statements) as tx:
        for kind in kinds:
            await events.record(
                tx,
                kind,
                user_id=user_id,
                client=ClientInfo(ip="198.51.100.4", user_agent=user_agent),
            )


async def test_the_users_events_newest_first(
    client: httpx.AsyncClient,
    statements: Statements,
    events: SecurityEvents,
    clock: MutableClock,
) -> None:
    user_id, token = await signed_up(client)
    before = await everything(client, token)
    session_id = uuid.uuid4()
    await record(events, statements, user_id, [EventKind.SIGNUP])
    clock.advance(minutes=1)
    await events.record_now(
        statements,
        EventKind.TOTP_ENABLED,
        user_id=user_id,
        session_id=session_id,
        client=ClientInfo(ip="2001:db8::1", user_agent="Firefox"),
    )
    page = await connection(client, token)
    newest, older = page["edges"][0]["node"], page["edges"][1]["node"]
    assert newest["kind"] == "TOTP_ENABLED" and older["kind"] == "SIGNUP"
    assert newest["ipAddress"] == "2001:db8::1" and newest["userAgent"] == "Firefox"
    assert newest["sessionId"] == str(session_id) and older["sessionId"] is None
    assert newest["at"] > older["at"]
    assert int(newest["id"]) > int(older["id"])
    assert [edge["node"] for edge in page["edges"][2:]] == before
    assert page["pageInfo"] == {"hasNextPage": False, "endCursor": page["edges"][-1]["cursor"]}


async def test_pages_follow_each_other(
    client: httpx.AsyncClient, statements: Statements, events: SecurityEvents
) -> None:
    user_id, token = await signed_up(client)
    await record(events, statements, user_id, list(EventKind))
    whole = await everything(client, token)
    assert len(whole) >= len(EventKind)
    ids = [int(node["id"]) for node in whole]
    assert ids == sorted(ids, reverse=True)

    walked: list[dict[str, Any]] = []
    walked_cursors: list[str] = []
    after = None
    while True:
        page = await connection(client, token, first=4, after=after)
        assert 0 < len(page["edges"]) <= 4
        walked += [edge["node"] for edge in page["edges"]]
        walked_cursors += [edge["cursor"] for edge in page["edges"]]
        info = page["pageInfo"]
        assert info["endCursor"] == page["edges"][-1]["cursor"]
        if not info["hasNextPage"]:
            break
        assert len(page["edges"]) == 4
        after = info["endCursor"]
    assert walked == whole

    # The default page is 20 events; past the last one the page is empty.
    default = await connection(client, token)
    assert default["edges"][0]["node"] == whole[0]
    assert len(default["edges"]) == min(20, len(whole))
    last = await connection(client, token, first=1, after=walked_cursors[-2])
    assert [edge["node"] for edge in last["edges"]] == [whole[-1]]
    empty = await connection(client, token, after=last["pageInfo"]["endCursor"])
    assert empty == {"edges": [], "pageInfo": {"hasNextPage": False, "endCursor": None}}


async def test_first_is_at_most_100(
    client: httpx.AsyncClient, statements: Statements, events: SecurityEvents
) -> None:
    user_id, token = await signed_up(client)
    await record(events, statements, user_id, [EventKind.LOGIN_SUCCEEDED] * 105)
    page = await connection(client, token, first=1000)
    assert len(page["edges"]) == 100 and page["pageInfo"]["hasNextPage"]
    rest = await connection(client, token, first=1000, after=page["pageInfo"]["endCursor"])
    assert len(rest["edges"]) >= 5


async def test_first_zero_is_an_empty_page(client: httpx.AsyncClient) -> None:
    _user_id, token = await signed_up(client)
    page = await connection(client, token, first=0)
    assert page["edges"] == [] and page["pageInfo"]["endCursor"] is None


@pytest.mark.parametrize(
    ("variables", "field"),
    [
        ({"after": "garbage"}, "after"),
        ({"after": ""}, "after"),
        ({"after": "djE6MTI="}, "after"),  # a padded form: not a cursor this server made
        ({"after": "djI6MTI"}, "after"),  # "v2:12"
        ({"after": "x" * 5000}, "after"),
        ({"first": -1}, "first"),
    ],
)
async def test_bad_arguments_are_invalid_input(
    client: httpx.AsyncClient, variables: dict[str, Any], field: str
) -> None:
    _user_id, token = await signed_up(client)
    response = await post(client, EVENTS, variables, token=token)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["data"] is None
    (error,) = body["errors"]
    assert error["extensions"]["code"] == "INVALID_INPUT"
    assert error["extensions"]["field"] == field
    assert error["path"] == ["securityEvents"]


async def test_unauthenticated_without_a_valid_token(client: httpx.AsyncClient) -> None:
    for token in (None, "not-a-token"):
        response = await post(client, EVENTS, {}, token=token)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["data"] is None
        (error,) = body["errors"]
        assert error["extensions"]["code"] == "UNAUTHENTICATED"


async def test_another_users_events_are_never_visible(
    client: httpx.AsyncClient, statements: Statements, events: SecurityEvents
) -> None:
    mine, my_token = await signed_up(client)
    theirs, their_token = await signed_up(client)
    await record(events, statements, mine, [EventKind.LOGOUT], user_agent="mine")
    await record(events, statements, theirs, list(EventKind), user_agent="theirs")
    await record(events, statements, uuid.uuid4(), [EventKind.SIGNUP], user_agent="theirs")
    await record(events, statements, mine, [EventKind.LOGOUT], user_agent="mine")
    my_events = await everything(client, my_token)
    their_events = await everything(client, their_token)
    assert {node["userAgent"] for node in my_events} - {"pytest", None} == {"mine"}
    assert not {node["id"] for node in my_events} & {node["id"] for node in their_events}
    # Their cursor in my hands pages through my own events only.
    their_page = await connection(client, their_token, first=1)
    page = await connection(client, my_token, after=their_page["pageInfo"]["endCursor"])
    assert all(node["node"]["userAgent"] != "theirs" for node in page["edges"])

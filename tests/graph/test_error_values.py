"""Errors about variables and literals name the variable and path, never a value sent."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from graphql import (
    ExecutionResult,
    GraphQLSchema,
    build_schema,
    execute,
    parse,
    specified_rules,
    validate,
)

from db.settings import Settings
from graph.app import create_app
from graph.validation import SafeExecutor, replace_rules
from tests.conftest import PRODUCTION_MAIL, MutableClock, client_for
from tests.gql import post

# A password with the separators a message-scrubbing regex would trip on.
SECRET = "hunter2-s3cret"
PASSWORD = f"{SECRET}; Field 'x' found: {{'a': 1}}"
NUMBER = 987654321
EMAIL = "victim-7f3a@example.com"
LOGIN = "mutation($i: LoginInput!) { login(input: $i) { __typename } }"
SIGNUP = "mutation($i: SignupInput!) { signup(input: $i) { __typename } }"
CHANGE_PASSWORD = "mutation($i: ChangePasswordInput!) { changePassword(input: $i) { __typename } }"

# (query, variables, what the messages must say)
CASES: dict[str, tuple[str, dict[str, Any] | None, list[str]]] = {
    "misspelt key": (
        LOGIN,
        {"i": {"emial": EMAIL, "password": PASSWORD}},
        [
            "Variable '$i' has an unknown field 'emial' at '$i.emial'",
            "Field 'emial' is not defined by type 'LoginInput'",
            "'$i.email': Field 'email' of required type 'String!' was not provided",
        ],
    ),
    "password as a number": (
        LOGIN,
        {"i": {"email": EMAIL, "password": NUMBER}},
        ["Variable '$i' has an invalid value at '$i.password': expected a String."],
    ),
    "password as a list": (
        LOGIN,
        {"i": {"email": EMAIL, "password": [PASSWORD, NUMBER]}},
        ["Variable '$i' has an invalid value at '$i.password': expected a String."],
    ),
    "password as an object": (
        LOGIN,
        {"i": {"email": EMAIL, "password": {"value": PASSWORD, "n": NUMBER}}},
        ["Variable '$i' has an invalid value at '$i.password': expected a String."],
    ),
    "password nested deep in objects and lists": (
        SIGNUP,
        {"i": {"email": EMAIL, "password": {"a": PASSWORD, "b": [{"c": PASSWORD}, [NUMBER]]}}},
        ["Variable '$i' has an invalid value at '$i.password': expected a String."],
    ),
    "missing required field": (
        CHANGE_PASSWORD,
        {"i": {"currentPassword": PASSWORD}},
        [
            "Variable '$i' has an invalid value at '$i.newPassword': "
            "Field 'newPassword' of required type 'String!' was not provided."
        ],
    ),
    "the input as a string": (
        LOGIN,
        {"i": PASSWORD},
        ["Variable '$i' has an invalid value: expected an object of type 'LoginInput'."],
    ),
    "a scalar variable": (
        "mutation($e: String!, $p: String!) "
        "{ login(input: {email: $e, password: $p}) { __typename } }",
        {"e": EMAIL, "p": {"secret": PASSWORD}},
        ["Variable '$p' has an invalid value: expected a String."],
    ),
    "a boolean given a password": (
        "mutation($i: LogoutInput!) { logout(input: $i) { revoked } }",
        {"i": {"refreshToken": EMAIL, "everywhere": PASSWORD}},
        ["Variable '$i' has an invalid value at '$i.everywhere': expected a Boolean."],
    ),
    "an int literal as the password": (
        f'mutation {{ login(input: {{email: "{EMAIL}", password: {NUMBER}}}) {{ __typename }} }}',
        None,
        ["Argument 'input' has an invalid value at 'input.password': expected a String."],
    ),
    "an object literal as the password": (
        f'mutation {{ login(input: {{email: "{EMAIL}", password: {{v: "{SECRET}"}}}})'
        " { __typename } }",
        None,
        ["Argument 'input' has an invalid value at 'input.password': expected a String."],
    ),
    "a list literal as the password": (
        f'mutation {{ login(input: {{email: "{EMAIL}", password: ["{SECRET}", {NUMBER}]}})'
        " { __typename } }",
        None,
        ["Argument 'input' has an invalid value at 'input.password': expected a String."],
    ),
    "an enum literal as the password": (
        f'mutation {{ login(input: {{email: "{EMAIL}", password: {SECRET.replace("-", "_")}}})'
        " { __typename } }",
        None,
        ["Argument 'input' has an invalid value at 'input.password': expected a String."],
    ),
    "a misspelt literal field": (
        f'mutation {{ login(input: {{email: "{EMAIL}", pasword: "{SECRET}"}}) {{ __typename }} }}',
        None,
        [
            "Argument 'input' has an unknown field 'pasword' at 'input.pasword': "
            "Field 'pasword' is not defined by type 'LoginInput'",
            "Argument 'input' has an invalid value at 'input.password': "
            "Field 'password' of required type 'String!' was not provided.",
        ],
    ),
    "a string literal as the input": (
        f'mutation {{ login(input: "{SECRET}") {{ __typename }} }}',
        None,
        ["Argument 'input' has an invalid value: expected an object of type 'LoginInput'."],
    ),
    "a literal as a variable's default": (
        f"mutation($p: String = {NUMBER}) "
        f'{{ login(input: {{email: "{EMAIL}", password: $p}}) {{ __typename }} }}',
        None,
        ["Variable '$p' has an invalid default value: expected a String."],
    ),
    "literals of the wrong type as query arguments": (
        f"{{ securityEvents(first: {SECRET.replace('-', '_')}, after: {NUMBER})"
        " { __typename } }",
        None,
        [
            "Argument 'first' has an invalid value: expected an Int.",
            "Argument 'after' has an invalid value: expected a String.",
        ],
    ),
}


def assert_no_values(response: httpx.Response, *, suggestions: bool) -> list[str]:
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["data"] is None, body
    text = response.text
    for value in (SECRET, str(NUMBER), EMAIL, "hunter2_s3cret"):
        assert value not in text, text
    messages = [error["message"] for error in body["errors"]]
    for error in body["errors"]:
        assert set(error) <= {"message", "locations", "path", "extensions"}, error
        assert error["locations"], error
    if not suggestions:
        assert "did you mean" not in text.lower(), text
    return messages


@pytest.mark.parametrize("case", CASES)
async def test_errors_name_the_field_not_the_value(
    client: httpx.AsyncClient, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    query, variables, expected = CASES[case]
    caplog.set_level(logging.DEBUG)
    response = await post(client, query, variables)
    messages = assert_no_values(response, suggestions=True)
    for part in expected:
        assert any(part in message for message in messages), (part, messages)
    assert SECRET not in caplog.text
    assert str(NUMBER) not in caplog.text


async def test_a_misspelt_key_still_suggests_in_development(client: httpx.AsyncClient) -> None:
    response = await post(client, *CASES["misspelt key"][:2])
    messages = assert_no_values(response, suggestions=True)
    assert any(m.endswith("Did you mean 'email'?") for m in messages), messages


@pytest.fixture
async def production(
    make_settings: Callable[..., Settings], clock: MutableClock, clean_db: None
) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(make_settings(environment="production", **PRODUCTION_MAIL), clock=clock)
    async with app.router.lifespan_context(app), client_for(app) as http:
        yield http


async def test_production_answers_the_same_without_suggestions(
    production: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for query, variables, expected in CASES.values():
        response = await post(production, query, variables)
        messages = assert_no_values(response, suggestions=False)
        for part in expected:
            assert any(part in message for message in messages), (part, messages)
    assert SECRET not in caplog.text
    assert str(NUMBER) not in caplog.text


# The served schema has no enum, nested or list inputs yet: these run a small one through
# the same executor and validation rules.
SDL = """
enum Level { LOW HIGH }
input Inner { secret: String!, level: Level, tags: [String!] }
input Outer { inner: Inner!, inners: [Inner!] }
input Choice @oneOf { a: String, b: Int }
type Query { f(o: Outer, l: Level, c: Choice): String }
"""


@pytest.fixture(scope="module")
def small_schema() -> GraphQLSchema:
    return build_schema(SDL)


def run(schema: GraphQLSchema, query: str, variables: dict[str, Any] | None = None) -> list[str]:
    document = parse(query)
    errors = validate(schema, document, replace_rules(specified_rules))
    if not errors:
        result = execute(schema, document, variable_values=variables, executor_class=SafeExecutor)
        assert isinstance(result, ExecutionResult)
        errors = result.errors or []
    text = repr([error.formatted for error in errors])
    assert SECRET not in text and str(NUMBER) not in text and "HGIH" not in text, text
    return [error.message for error in errors]


@pytest.mark.parametrize(
    ("query", "variables", "expected"),
    [
        (
            "query($o: Outer) { f(o: $o) }",
            {"o": {"inner": {"secret": NUMBER, "level": "HGIH", "tags": [SECRET, NUMBER]}}},
            [
                "Variable '$o' has an invalid value at '$o.inner.secret': expected a String.",
                "Variable '$o' has an invalid value at '$o.inner.level': "
                "expected a value of enum 'Level'. Did you mean the enum value 'HIGH'?",
                "Variable '$o' has an invalid value at '$o.inner.tags[1]': expected a String.",
            ],
        ),
        (
            "query($o: Outer) { f(o: $o) }",
            {"o": {"inner": {"secret": SECRET}, "inners": [{"secret": SECRET, "x": SECRET}, {}]}},
            [
                "Variable '$o' has an unknown field 'x' at '$o.inners[0].x': "
                "Field 'x' is not defined by type 'Inner'.",
                "Variable '$o' has an invalid value at '$o.inners[1].secret': "
                "Field 'secret' of required type 'String!' was not provided.",
            ],
        ),
        (
            "query($o: Outer) { f(o: $o) }",
            {"o": {"inner": None, "inners": [None]}},
            [
                "Variable '$o' has an invalid value at '$o.inner': "
                "a value of non-null type 'Inner!' must not be null.",
                "Variable '$o' has an invalid value at '$o.inners[0]': "
                "a value of non-null type 'Inner!' must not be null.",
            ],
        ),
        (
            "query($l: Level, $c: Choice) { f(l: $l, c: $c) }",
            {"l": SECRET, "c": {"a": SECRET, "b": NUMBER}},
            [
                "Variable '$l' has an invalid value: expected a value of enum 'Level'.",
                "Variable '$c' has an invalid value: exactly one field of OneOf Input Object"
                " type 'Choice' must be given, and its value must not be null.",
            ],
        ),
        (
            f'{{ f(o: {{inner: {{secret: {NUMBER}, level: HGIH, tags: ["a", {NUMBER}]}}}}) }}',
            None,
            [
                "Argument 'o' has an invalid value at 'o.inner.secret': expected a String.",
                "Argument 'o' has an invalid value at 'o.inner.level': "
                "expected a value of enum 'Level'. Did you mean the enum value 'HIGH'?",
                "Argument 'o' has an invalid value at 'o.inner.tags[1]': expected a String.",
            ],
        ),
        (
            f'{{ f(l: "{SECRET}", c: {{a: "{SECRET}", b: {NUMBER}}}) }}',
            None,
            [
                "Argument 'l' has an invalid value: expected a value of enum 'Level'.",
                "Argument 'c' has an invalid value: exactly one field of OneOf Input Object"
                " type 'Choice' must be given, and its value must not be null.",
            ],
        ),
    ],
)
def test_enum_nested_list_and_one_of_inputs(
    small_schema: GraphQLSchema,
    query: str,
    variables: dict[str, Any] | None,
    expected: list[str],
) -> None:
    messages = run(small_schema, query, variables)
    for part in expected:
        assert part in messages, (part, messages)


async def test_a_bad_address_is_refused_without_quoting_it(client: httpx.AsyncClient) -> None:
    """email-validator quotes parts of what it refuses; people type passwords into email
    fields: the answer says what is wrong, never what was typed."""
    secret = "hunter2-s3cret"
    for query, variables in (
        (
            "mutation($i: SignupInput!) { signup(input: $i) {"
            " ... on AuthError { code message } } }",
            {"i": {"email": f"someone@[IPv6:{secret}]", "password": "a long enough passphrase"}},
        ),
        (
            "mutation($i: EmailInput!) { requestLoginCode(input: $i) {"
            " ... on AuthError { code message } } }",
            {"i": {"email": f"someone@[IPv6:{secret}]"}},
        ),
        (
            "mutation($i: EmailInput!) { requestPasswordReset(input: $i) {"
            " ... on AuthError { code message } } }",
            {"i": {"email": f"{secret}@@example.com"}},
        ),
        (
            "mutation($i: EmailInput!) { requestLoginCode(input: $i) {"
            " ... on AuthError { code message } } }",
            # Not even the kind of character it holds (a password typed there would).
            {"i": {"email": f"{secret}\u200b&3@example.com"}},
        ),
    ):
        response = await post(client, query, variables)
        assert response.status_code == 200
        (answer,) = response.json()["data"].values()
        assert answer["code"] == "INVALID_INPUT"
        assert answer["message"].startswith("This email address is not valid")
        assert secret not in response.text
        assert "SPACE" not in answer["message"] and ":" not in answer["message"].split(": ", 1)[1]

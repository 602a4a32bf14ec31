"""The software authenticator the passkey tests use answers as py_webauthn expects: its
registrations and its assertions verify, and what it is told to break fails."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from webauthn import (
    generate_authentication_options,
    generate_registration_options,
    options_to_json,
    verify_authentication_response,
    verify_registration_response,
)
from webauthn.helpers.exceptions import InvalidAuthenticationResponse

from tests.webauthn_authenticator import SoftAuthenticator

RP_ID = "example.com"
ORIGIN = "https://example.com"


def registered(key: SoftAuthenticator) -> bytes:
    options = generate_registration_options(
        rp_id=RP_ID, rp_name="Strawgate", user_name="a@example.com", user_id=b"h" * 64
    )
    verified = verify_registration_response(
        credential=key.register(options_to_json(options)),
        expected_challenge=options.challenge,
        expected_rp_id=RP_ID,
        expected_origin=ORIGIN,
        require_user_verification=True,
    )
    assert verified.credential_id == key.credential_id
    assert verified.aaguid == str(key.aaguid)
    assert verified.credential_backed_up is key.backed_up
    assert key.user_handle == b"h" * 64
    return verified.credential_public_key


def test_an_assertion_verifies_and_counts_up() -> None:
    key = SoftAuthenticator(aaguid=uuid.uuid4(), sign_count=7)
    public_key = registered(key)
    options = generate_authentication_options(rp_id=RP_ID)
    answer = key.assertion(options_to_json(options))

    verified = verify_authentication_response(
        credential=answer,
        expected_challenge=options.challenge,
        expected_rp_id=RP_ID,
        expected_origin=ORIGIN,
        credential_public_key=public_key,
        credential_current_sign_count=7,
        require_user_verification=True,
    )

    assert verified.new_sign_count == 8 and verified.user_verified
    assert verified.credential_id == key.credential_id


@pytest.mark.parametrize(
    "bad",
    [{"origin": "https://evil.example.net"}, {"rp_id": "evil.example.net"}, {"flags": 0x01}],
)
def test_a_broken_assertion_is_refused(bad: dict[str, Any]) -> None:
    key = SoftAuthenticator()
    public_key = registered(key)
    options = generate_authentication_options(rp_id=RP_ID)
    answer = key.assertion(options_to_json(options), **bad)

    with pytest.raises(InvalidAuthenticationResponse):
        verify_authentication_response(
            credential=answer,
            expected_challenge=options.challenge,
            expected_rp_id=RP_ID,
            expected_origin=ORIGIN,
            credential_public_key=public_key,
            credential_current_sign_count=0,
            require_user_verification=True,
        )


def test_a_count_going_backwards_is_refused() -> None:
    key = SoftAuthenticator(sign_count=5)
    public_key = registered(key)
    options = generate_authentication_options(rp_id=RP_ID)

    with pytest.raises(InvalidAuthenticationResponse):
        verify_authentication_response(
            credential=key.assertion(options_to_json(options), count=3),
            expected_challenge=options.challenge,
            expected_rp_id=RP_ID,
            expected_origin=ORIGIN,
            credential_public_key=public_key,
            credential_current_sign_count=5,
            require_user_verification=True,
        )

"""The makes of common passkey providers by AAGUID: a passkey's default name.

From the community list https://github.com/passkeydeveloper/passkey-authenticator-aaguids
(aaguid.json, August 2026) and, for the YubiKey 5 models, the FIDO Metadata Service entries
it combines. Apple's provider is named there "Apple Passwords"; it is called here by the
name its users know it by. An AAGUID missing here is harmless: the passkey is called
"Passkey" until the user renames it.
"""

from __future__ import annotations

AUTHENTICATOR_NAMES: dict[str, str] = {
    "fbfc3007-154e-4ecc-8c0b-6e020557d7bd": "iCloud Keychain",
    "dd4ec289-e01d-41c9-bb89-70fa845d4bf2": "iCloud Keychain (Managed)",
    "ea9b8d66-4d01-1d21-3ce4-b6b48cb575d4": "Google Password Manager",
    "adce0002-35bc-c60a-648b-0b25f1f05503": "Chrome on Mac",
    "08987058-cadc-4b81-b6e1-30de50dcbe96": "Windows Hello",
    "9ddd1817-af5a-4672-a2b9-3e3dd95000a9": "Windows Hello",
    "6028b017-b1d4-4c02-b4b3-afcdafc96bb2": "Windows Hello",
    "bada5566-a7aa-401f-bd96-45619a55120d": "1Password",
    "d548826e-79b4-db40-a3d8-11116f7e8349": "Bitwarden",
    "cb69481e-8ff7-4039-93ec-0a2729a154a8": "YubiKey 5 Series",
    "ee882879-721c-4913-9775-3dfcce97072a": "YubiKey 5 Series",
    "19083c3d-8383-4b18-bc03-8f1c9ab2fd1b": "YubiKey 5 Series",
    "fa2b99dc-9e39-4257-8f92-4a30d23c4118": "YubiKey 5 Series with NFC",
    "2fc0579f-8113-47ea-b116-bb5a8db9202a": "YubiKey 5 Series with NFC",
    "a25342c0-3cdc-4414-8e46-f4807fca511c": "YubiKey 5 Series with NFC",
}


def authenticator_name(aaguid: str) -> str | None:
    """The make behind `aaguid` (8-4-4-4-12 hex), where it is one of the known ones."""
    return AUTHENTICATOR_NAMES.get(aaguid.lower())

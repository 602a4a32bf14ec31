"""Cryptographic building blocks: password hashing, token digests, access tokens."""

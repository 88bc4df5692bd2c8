"""Secrets handed to clients: API keys are random, shown once, and stored only as a hash."""

from __future__ import annotations

import hashlib
import secrets

API_KEY_PREFIX = "mtr_"


def generate_api_key() -> str:
    """A new API key: a recognisable prefix and 256 random bits."""
    return API_KEY_PREFIX + secrets.token_urlsafe(32)


def hash_api_key(api_key: str) -> str:
    """The stored form of an API key. Keys carry 256 bits of entropy, so a plain SHA-256 (fast,
    indexable) is as strong as a slow password hash would be here."""
    return hashlib.sha256(api_key.encode()).hexdigest()


def display_prefix(api_key: str) -> str:
    """The part of a key safe to show in listings and logs."""
    return api_key[: len(API_KEY_PREFIX) + 6]

"""Identifiers that must be unique but need not be secret (request, purchase, job ids).

`uuid.uuid4()` asks the kernel for randomness on every call; on sandboxed kernels that system
call is a measurable share of a request. A per-process generator seeded from the kernel once
gives version-4 UUIDs with the same uniqueness. Anything that must be unguessable (serials,
API keys, payment references) uses `secrets` instead.
"""

from __future__ import annotations

import os
import random
import uuid

_generator = random.Random(os.urandom(32))  # noqa: S311 - uniqueness, not secrecy


def new_id() -> uuid.UUID:
    """A random (version 4) UUID."""
    return uuid.UUID(int=_generator.getrandbits(128), version=4)


def new_hex_id() -> str:
    """32 hexadecimal characters, unique."""
    return f"{_generator.getrandbits(128):032x}"


def _reseed_after_fork() -> None:
    # A forked child must not repeat its parent's sequence.
    _generator.seed(os.urandom(32))


os.register_at_fork(after_in_child=_reseed_after_fork)

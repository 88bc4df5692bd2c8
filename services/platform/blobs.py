"""Where documents live: a small blob-store interface, on the local filesystem by default."""

from __future__ import annotations

import asyncio
import os
import re
import uuid
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlparse

_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,255}$")


class BlobNotFound(KeyError):
    """No blob is stored under the key."""


class BlobStore(Protocol):
    """Immutable-by-convention byte objects addressed by key (e.g. `inputs/<job>.pdf`)."""

    async def put(self, key: str, data: bytes) -> None:
        """Store `data` under `key` atomically (readers see all of it or none)."""

    async def get(self, key: str) -> bytes:
        """The bytes under `key`; raises `BlobNotFound`."""

    async def delete(self, key: str) -> None:
        """Remove `key` if present."""

    async def check(self) -> None:
        """Health check: raise when the store cannot be written."""


class FilesystemBlobStore:
    """Blobs as files under one root; shared by API and workers on one host or a shared volume."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        if not _KEY.match(key) or ".." in key.split("/"):
            raise ValueError(f"invalid blob key {key!r}")
        return self.root / key

    async def put(self, key: str, data: bytes) -> None:
        await asyncio.to_thread(self._put, self._path(key), data)

    @staticmethod
    def _put(path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        # rename is atomic: a crash leaves the old blob or the new one, never half of one.
        os.replace(tmp, path)

    async def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError as exc:
            raise BlobNotFound(key) from exc

    async def delete(self, key: str) -> None:
        await asyncio.to_thread(self._path(key).unlink, True)

    async def check(self) -> None:
        await self.put("health/probe", b"ok")


def blob_store_from_url(url: str) -> BlobStore:
    """`file:///var/lib/meterai/blobs` (or a plain path) → a filesystem store."""
    parsed = urlparse(url)
    if parsed.scheme == "":
        return FilesystemBlobStore(Path(url))
    if parsed.scheme == "file":
        # `file://./blobs` would silently mean `/blobs`: only local, absolute paths.
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"file URLs name a local absolute path, e.g. file:///data: {url!r}")
        return FilesystemBlobStore(Path(unquote(parsed.path)))
    raise ValueError(f"unsupported blob store URL scheme {parsed.scheme!r}")

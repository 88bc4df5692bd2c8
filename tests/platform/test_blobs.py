"""The filesystem blob store: atomic puts, clear misses, keys that cannot leave the root."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.platform.blobs import BlobNotFound, FilesystemBlobStore, blob_store_from_url


def files_under(root: Path) -> list[str]:
    """Every file below `root`, hidden ones included."""
    return sorted(str(path.relative_to(root)) for path in root.rglob("*") if path.is_file())


async def test_put_then_get_returns_the_same_bytes(tmp_path: Path) -> None:
    store = FilesystemBlobStore(tmp_path / "blobs")
    document = bytes(range(256)) * 1000
    await store.put("inputs/job-1.pdf", document)
    assert await store.get("inputs/job-1.pdf") == document
    assert (tmp_path / "blobs" / "inputs" / "job-1.pdf").read_bytes() == document


async def test_put_leaves_no_temporary_files_and_replaces_whole_blobs(tmp_path: Path) -> None:
    root = tmp_path / "blobs"
    store = FilesystemBlobStore(root)
    await store.put("outputs/a.pdf", b"first version, rather long" * 100)
    await store.put("outputs/a.pdf", b"second")
    await store.put("outputs/b.pdf", b"other")
    assert await store.get("outputs/a.pdf") == b"second"
    assert files_under(root) == ["outputs/a.pdf", "outputs/b.pdf"]  # no ".<name>.<hex>.tmp"


async def test_a_missing_blob_raises_blob_not_found(tmp_path: Path) -> None:
    store = FilesystemBlobStore(tmp_path)
    with pytest.raises(BlobNotFound):
        await store.get("inputs/never-written.pdf")
    await store.put("inputs/gone.pdf", b"x")
    await store.delete("inputs/gone.pdf")
    await store.delete("inputs/gone.pdf")  # deleting twice is fine
    with pytest.raises(BlobNotFound) as raised:
        await store.get("inputs/gone.pdf")
    assert isinstance(raised.value, KeyError)


@pytest.mark.parametrize(
    "key",
    [
        "../x",
        "/etc/passwd",
        "inputs/../../x",
        "inputs/..",
        "",
        ".hidden",
        "inputs/with space.pdf",
        "a" * 300,
    ],
)
async def test_invalid_keys_are_refused_for_every_operation(tmp_path: Path, key: str) -> None:
    root = tmp_path / "root"
    store = FilesystemBlobStore(root)
    with pytest.raises(ValueError, match="invalid blob key"):
        await store.put(key, b"x")
    with pytest.raises(ValueError, match="invalid blob key"):
        await store.get(key)
    with pytest.raises(ValueError, match="invalid blob key"):
        await store.delete(key)
    assert files_under(tmp_path) == []


async def test_check_writes_a_probe(tmp_path: Path) -> None:
    store = FilesystemBlobStore(tmp_path / "blobs")
    await store.check()
    assert files_under(tmp_path / "blobs") == ["health/probe"]


async def test_check_fails_when_the_root_cannot_be_written(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_bytes(b"")
    with pytest.raises(OSError):
        await FilesystemBlobStore(blocker).check()


def test_blob_store_from_a_file_url_or_a_plain_path(tmp_path: Path) -> None:
    from_url = blob_store_from_url(f"file://{tmp_path}/blobs")
    from_path = blob_store_from_url(str(tmp_path / "plain"))
    relative = blob_store_from_url("relative/blobs")
    assert isinstance(from_url, FilesystemBlobStore) and from_url.root == tmp_path / "blobs"
    assert isinstance(from_path, FilesystemBlobStore) and from_path.root == tmp_path / "plain"
    assert isinstance(relative, FilesystemBlobStore) and relative.root == Path("relative/blobs")


@pytest.mark.parametrize("url", ["s3://bucket/blobs", "https://example.com/blobs", "gs://b"])
def test_an_unsupported_scheme_is_refused(url: str) -> None:
    with pytest.raises(ValueError, match="unsupported blob store URL scheme"):
        blob_store_from_url(url)

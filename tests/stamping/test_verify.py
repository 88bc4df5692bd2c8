"""Verification through the gateway: a serial's record (`GET /verify/{serial}`, JSON and the
page), and uploaded documents (`POST /api/v1/verify`): a stamped one is valid with the right
serial; copies changed after stamping, stamps by other keys or not on our records, documents
without a stamp, and files that are not PDFs get a clear answer."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.stamping.keys import create_development_keys
from services.stamping.signing import StampRequest, StampSigner
from services.stamping.verify_page import rupiah, wants_html
from tests.harness import Infrastructure, ServiceStack, running_stack, wait_for
from tests.pdfs import changed_page, make_pdf

BROWSER = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
UNSOLD_SERIAL = "NOTONOURRECORDS0000001"


@dataclass(frozen=True)
class Stamped:
    serial: str
    job: dict[str, Any]
    original: bytes
    document: bytes


@pytest.fixture(scope="module")
async def verify_stack(
    infra: Infrastructure, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[ServiceStack]:
    async with running_stack(infra, tmp_path_factory.mktemp("verify")) as started:
        yield started


@pytest.fixture(scope="module")
async def stamped(verify_stack: ServiceStack) -> Stamped:
    """A document stamped through the whole stack, as a distributor gets it."""
    stack = verify_stack
    await stack.mint(1)
    original = make_pdf(2)
    async with stack.client(await stack.create_distributor()) as client:
        (serial,) = (await client.post("/api/v1/purchases", json={"quantity": 1})).json()["serials"]
        upload = await client.post(
            "/api/v1/stampings", files={"file": ("cv.pdf", original, "application/pdf")}
        )
        assert upload.status_code == 202, upload.text

        async def done() -> dict[str, Any] | None:
            job: dict[str, Any] = (
                await client.get(f"/api/v1/stampings/{upload.json()['id']}")
            ).json()
            return job if job["status"] == "done" else None

        job = await wait_for(done, within=60)
        document = (await client.get(f"/api/v1/stampings/{job['id']}/document")).content
    return Stamped(serial=serial, job=job, original=original, document=document)


@pytest.fixture
async def public(verify_stack: ServiceStack) -> AsyncIterator[httpx.AsyncClient]:
    """Anyone: no API key, no admission."""
    async with verify_stack.client() as client:
        yield client


async def verify(client: httpx.AsyncClient, document: bytes, **kwargs: Any) -> httpx.Response:
    return await client.post(
        "/api/v1/verify", files={"file": ("doc.pdf", document, "application/pdf")}, **kwargs
    )


async def test_a_stamped_serial_verifies_as_json_and_as_a_page(
    stamped: Stamped, public: httpx.AsyncClient
) -> None:
    answer = await public.get(f"/verify/{stamped.serial}", headers={"Accept": "application/json"})
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/json"
    assert "accept" in answer.headers["vary"].lower()
    body = answer.json()
    assert body["serial"] == stamped.serial and body["state"] == "stamped"
    assert body["sha256"] == stamped.job["sha256"]
    assert datetime.fromisoformat(body["stamped_at"]) == datetime.fromisoformat(
        stamped.job["finished_at"]
    )
    assert body["tariff"] == {"amount": 10_000, "currency": "IDR"}
    # curl and other programs that accept anything get JSON too; so does a lower-case serial.
    assert (await public.get(f"/verify/{stamped.serial.lower()}")).json() == body

    page = await public.get(f"/verify/{stamped.serial}", headers={"Accept": BROWSER})
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    html = page.text
    assert '<html lang="id">' in html
    for text in (stamped.serial, "Sudah dibubuhkan", "Rp 10.000", stamped.job["sha256"], "WIB"):
        assert text in html, text
    assert 'action="/api/v1/verify"' in html  # the upload form that checks the document itself


async def test_unknown_and_malformed_serials_are_not_found(public: httpx.AsyncClient) -> None:
    for serial in ("ZZZZZZZZZZZZZZZZZZZZZZ", "not-a-serial", "A" * 300):
        answer = await public.get(f"/verify/{serial}", headers={"Accept": "application/json"})
        assert answer.status_code == 404, serial
        assert answer.headers["content-type"] == "application/problem+json"
        problem = answer.json()
        assert problem["code"] == "unknown_serial" and problem["state"] == "unknown"

        page = await public.get(f"/verify/{serial}", headers={"Accept": BROWSER})
        assert page.status_code == 404
        assert page.headers["content-type"].startswith("text/html")
        assert "Nomor seri tidak ditemukan" in page.text
    page = await public.get("/verify/<script>alert(1)</script>", headers={"Accept": BROWSER})
    assert "<script>" not in page.text


async def test_the_stamped_document_verifies_by_upload(
    stamped: Stamped, public: httpx.AsyncClient
) -> None:
    multipart = await verify(public, stamped.document)
    raw = await public.post(
        "/api/v1/verify",
        content=stamped.document,
        headers={"Content-Type": "application/pdf"},
    )
    for answer in (multipart, raw):
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["valid"] is True and body["verdict"] == "valid"
        assert body["serial"] == stamped.serial
        assert body["changed_after_stamping"] is False
        assert body["sha256"] == stamped.job["sha256"]
        assert body["tariff"] == {"amount": 10_000, "currency": "IDR"}
        assert datetime.fromisoformat(body["signed_at"])
        (stamp,) = body["stamps"]
        assert stamp["intact"] and stamp["trusted"] and stamp["coverage"] == "entire_file"
        assert stamp["field_name"] == f"eMeterai-{stamped.serial}"
        assert stamp["record"]["state"] == "stamped" and stamp["record"]["matches"] is True
        assert body["other_signatures"] == 0

    page = await verify(public, stamped.document, headers={"Accept": BROWSER})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "Sah." in page.text and stamped.serial in page.text


async def test_copies_changed_after_stamping_are_flagged(
    stamped: Stamped, public: httpx.AsyncClient
) -> None:
    # Another incremental update that replaces a page's content: the stamp still signs its
    # own revision, but the document shown is not what was stamped.
    answer = (await verify(public, changed_page(stamped.document))).json()
    assert answer["valid"] is False and answer["verdict"] == "modified"
    assert answer["serial"] == stamped.serial and answer["changed_after_stamping"] is True
    (stamp,) = answer["stamps"]
    assert stamp["intact"] and stamp["coverage"] == "entire_revision"
    assert stamp["modification_level"] == "other"
    # Our record still matches the revision the stamp signed.
    assert stamp["record"]["matches"] is True
    assert stamp["signed_revision_sha256"] == stamped.job["sha256"]

    # Bytes appended after the stamp (no change to any object) are a change too.
    appended = (await verify(public, stamped.document + b"\n% appended\n")).json()
    assert appended["verdict"] == "modified" and appended["changed_after_stamping"] is True

    # A change inside the signed bytes breaks the signature.
    at = stamped.document.index(b"Test page 1 of 2")
    edited = stamped.document[:at] + b"Best" + stamped.document[at + 4 :]
    broken = (await verify(public, edited)).json()
    assert broken["valid"] is False and broken["verdict"] == "invalid"
    assert broken["serial"] == stamped.serial
    assert broken["stamps"][0]["intact"] is False

    page = await verify(public, changed_page(stamped.document), headers={"Accept": BROWSER})
    assert "Dokumen diubah" in page.text


async def test_documents_without_a_valid_stamp_of_ours_get_a_clear_answer(
    stamped: Stamped, public: httpx.AsyncClient, verify_stack: ServiceStack, tmp_path: Path
) -> None:
    plain = (await verify(public, make_pdf(1))).json()
    assert plain["valid"] is False and plain["verdict"] == "not_stamped"
    assert plain["serial"] is None and plain["stamps"] == []
    # The document before stamping is just a document.
    assert (await verify(public, stamped.original)).json()["verdict"] == "not_stamped"

    # Our stamp's look, signed by a key of another CA.
    other_keys = await asyncio.to_thread(create_development_keys, tmp_path / "other")
    forger = StampSigner.from_pem_files(
        other_keys.signer_key, other_keys.signer_cert, [other_keys.ca_cert]
    )
    request = StampRequest(serial=stamped.serial, verify_url="http://example.com/verify")
    forged_document = await asyncio.to_thread(forger.stamp, make_pdf(1), request)
    forged = (await verify(public, forged_document)).json()
    assert forged["verdict"] == "untrusted" and forged["stamps"][0]["trusted"] is False

    # Signed with our key, but never stamped by us with that serial (or for that document).
    keys = verify_stack.infra.keys
    ours = StampSigner.from_pem_files(keys.signer_key, keys.signer_cert, [keys.ca_cert])
    for serial, record in ((UNSOLD_SERIAL, "unknown"), (stamped.serial, "stamped")):
        document = await asyncio.to_thread(
            ours.stamp, make_pdf(1), StampRequest(serial=serial, verify_url="http://x")
        )
        answer = (await verify(public, document)).json()
        assert answer["verdict"] == "unrecorded", serial
        assert answer["stamps"][0]["trusted"] is True
        assert answer["stamps"][0]["record"]["state"] == record
        assert answer["stamps"][0]["record"]["matches"] is False


async def test_files_that_cannot_be_verified_are_refused_with_a_stable_code(
    public: httpx.AsyncClient,
) -> None:
    cases = {
        "not_pdf": (b"\x89PNG\r\n\x1a\n" + b"\x00" * 100, 415),
        "invalid_pdf": (b"%PDF-1.7\n" + b"garbage " * 100, 422),
        "encrypted_pdf": (make_pdf(1, user_password="secret"), 422),
    }
    for code, (document, status) in cases.items():
        answer = await verify(public, document)
        assert answer.status_code == status, (code, answer.text)
        assert answer.headers["content-type"] == "application/problem+json"
        assert answer.json()["code"] == code
        page = await verify(public, document, headers={"Accept": BROWSER})
        assert page.status_code == status and page.headers["content-type"].startswith("text/html")

    text = await public.post(
        "/api/v1/verify", content=b"hello", headers={"Content-Type": "text/plain"}
    )
    assert text.status_code == 415 and text.json()["code"] == "unsupported_media_type"
    missing = await public.post("/api/v1/verify", data={"other": "x"}, files={"x": ("a", b"b")})
    assert missing.status_code == 422 and missing.json()["code"] == "invalid_request"


async def test_the_verification_routes_are_in_the_public_api(public: httpx.AsyncClient) -> None:
    paths = (await public.get("/openapi.json")).json()["paths"]
    assert paths["/verify/{serial}"]["get"]["security"] == []
    assert paths["/api/v1/verify"]["post"]["security"] == []
    assert "/api/v1/callbacks/secret" in paths


def test_browsers_get_html_and_programs_json() -> None:
    assert wants_html(BROWSER)
    assert wants_html("text/html")
    assert not wants_html(None) and not wants_html("") and not wants_html("*/*")
    assert not wants_html("application/json")
    assert not wants_html("application/json, text/html;q=0.5")
    assert not wants_html("text/html;q=0.2, application/problem+json")
    assert not wants_html("text/html;q=0")
    assert rupiah(10_000) == "Rp 10.000" and rupiah(1_250_000) == "Rp 1.250.000"

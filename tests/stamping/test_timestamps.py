"""PAdES B-T: signature timestamps from an RFC 3161 authority over real HTTP (tests/tsa.py)."""

from __future__ import annotations

from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession, web
from pyhanko.keys import load_cert_from_pemder
from pyhanko.pdf_utils.reader import PdfFileReader
from pyhanko.sign.validation import async_validate_pdf_signature, validate_pdf_signature
from pyhanko_certvalidator import ValidationContext

from services.stamping.config import StampingSettings
from services.stamping.keys import SigningKeyPaths, create_development_keys
from services.stamping.signing import DocumentRejected, SignerFailure, StampRequest, StampSigner
from services.stamping.worker import load_signer
from tests.harness import ServiceStack, wait_for
from tests.pdfs import make_pdf
from tests.pdftools import pdfsig, qpdf_check
from tests.tsa import LocalTsa, local_tsa, serve, unreachable_url

SERIALS = ["TIMESTAMPED00000000001", "TIMESTAMPED00000000002"]


@pytest.fixture(scope="module")
def tsa() -> Iterator[LocalTsa]:
    with local_tsa() as running:
        yield running


@pytest.fixture(scope="module")
def key_paths(tmp_path_factory: pytest.TempPathFactory) -> SigningKeyPaths:
    return create_development_keys(tmp_path_factory.mktemp("keys"))


def signer_for(key_paths: SigningKeyPaths, tsa_url: str) -> StampSigner:
    return StampSigner.from_pem_files(
        key_paths.signer_key, key_paths.signer_cert, [key_paths.ca_cert], tsa_url=tsa_url
    )


def request(serial: str) -> StampRequest:
    return StampRequest(serial=serial, verify_url=f"http://127.0.0.1:8000/verify/{serial}")


def test_signatures_carry_a_valid_timestamp_token(
    key_paths: SigningKeyPaths, tsa: LocalTsa, tmp_path: Path
) -> None:
    signer = signer_for(key_paths, tsa.url)
    pdf = make_pdf(2)
    # The first signature is pyHanko's own container, the second reuses it (cms_signer).
    outputs = [signer.stamp(pdf, request(serial)) for serial in SERIALS]
    assert signer._signer.template is not None
    signer_trust = ValidationContext(trust_roots=[load_cert_from_pemder(str(key_paths.ca_cert))])
    tsa_trust = ValidationContext(trust_roots=[tsa.root])
    for serial, out in zip(SERIALS, outputs, strict=True):
        (embedded,) = PdfFileReader(BytesIO(out)).embedded_signatures
        status = validate_pdf_signature(embedded, signer_trust, ts_validation_context=tsa_trust)
        assert status.bottom_line, serial
        stamp = status.timestamp_validity
        assert stamp is not None, f"{serial}: no signature timestamp"
        assert stamp.intact and stamp.valid and stamp.trusted
        assert embedded.sig_object["/M"] is not None  # the claimed time stays, now vouched for

        path = tmp_path / f"{serial}.pdf"
        path.write_bytes(out)
        report = pdfsig(path)
        assert report.signatures == 1 and report.all_valid and report.total_document_signed
        check = qpdf_check(path)
        assert check.returncode == 0, check.stdout + check.stderr
    # One token sized the reservation, then one per signature.
    assert len(tsa.requests) >= len(SERIALS) + 1


def test_an_unreachable_authority_is_a_signer_failure(key_paths: SigningKeyPaths) -> None:
    signer = signer_for(key_paths, unreachable_url())
    with pytest.raises(SignerFailure, match="timestamp authority") as failure:
        signer.stamp(make_pdf(1), request(SERIALS[0]))
    assert not isinstance(failure.value, DocumentRejected)


def test_an_authority_that_stops_answering_is_a_signer_failure(
    key_paths: SigningKeyPaths, tsa: LocalTsa
) -> None:
    """The reservation is sized once; an authority failing later still fails the stamp as
    retryable, never as the document's fault."""

    async def broken(request: web.Request) -> web.Response:
        return web.Response(status=503, text="maintenance")

    with serve(broken) as broken_url:
        signer = signer_for(key_paths, tsa.url)
        signer.stamp(make_pdf(1), request(SERIALS[0]))
        assert signer._timestamper is not None
        signer._timestamper.url = broken_url
        with pytest.raises(SignerFailure, match="503"):
            signer.stamp(make_pdf(1), request(SERIALS[1]))


def test_workers_take_the_authority_from_the_settings(
    key_paths: SigningKeyPaths, tsa: LocalTsa
) -> None:
    settings = StampingSettings(
        signing_key_path=key_paths.signer_key,
        signing_cert_path=key_paths.signer_cert,
        signing_chain_paths=[key_paths.ca_cert],
        tsa_url=tsa.url,
        tsa_timeout_seconds=2.5,
    )
    signer = load_signer(settings)
    assert signer._timestamper is not None
    assert (signer._timestamper.url, signer._timestamper.timeout) == (tsa.url, 2.5)
    assert load_signer(settings.model_copy(update={"tsa_url": ""}))._timestamper is None


@pytest.mark.workers(0)
@pytest.mark.settings(stamping={"worker_lease_seconds": 1.0, "republish_after_seconds": 1.0})
async def test_a_job_waits_out_an_authority_outage(stack: ServiceStack, tsa: LocalTsa) -> None:
    """A worker whose authority is down leaves the job for a retry (the serial stays with it,
    nothing is blamed on the document); once the authority answers, the job is stamped."""
    attempts: list[int] = []

    async def flaky(request: web.Request) -> web.Response:
        attempts.append(1)
        if len(attempts) == 1:
            return web.Response(status=503, text="maintenance")
        async with ClientSession() as session:  # then pass through to the real authority
            async with session.post(
                tsa.url, data=await request.read(), headers=request.headers
            ) as reply:
                return web.Response(body=await reply.read(), content_type=reply.content_type)

    await stack.mint(1)
    api_key = await stack.create_distributor()
    async with stack.client(api_key) as client:
        await client.post("/api/v1/purchases", json={"quantity": 1})
        with serve(flaky) as flaky_url:
            await stack.add_worker(tsa_url=flaky_url)
            upload = await client.post(
                "/api/v1/stampings", files={"file": ("a.pdf", make_pdf(1), "application/pdf")}
            )
            assert upload.status_code == 202, upload.text

            async def done() -> dict[str, Any] | None:
                job: dict[str, Any] = (
                    await client.get(f"/api/v1/stampings/{upload.json()['id']}")
                ).json()
                assert job["status"] != "failed", job
                return job if job["status"] == "done" else None

            await wait_for(done, within=30)
        assert len(attempts) >= 3  # refused, then sizing and the token itself
        stamped = (await client.get(f"/api/v1/stampings/{upload.json()['id']}/document")).content
    (embedded,) = PdfFileReader(BytesIO(stamped)).embedded_signatures
    ca = load_cert_from_pemder(str(stack.infra.keys.ca_cert))
    status = await async_validate_pdf_signature(
        embedded,
        ValidationContext(trust_roots=[ca]),
        ts_validation_context=ValidationContext(trust_roots=[tsa.root]),
    )
    assert status.bottom_line and status.timestamp_validity is not None
    assert status.timestamp_validity.trusted

"""An applicant who paid is never sent back to the queue to use the stamp: once the admission
no longer buys (the page stopped asking the room, an upload took long, they came back the next
day), the same credential still pays, uploads, follows the job and downloads the document,
until its keep horizon; buying more needs the room again."""

from __future__ import annotations

import time

import httpx
import pytest

from services.platform.admission import AdmissionCodec, InvalidAdmission
from tests.harness import ADMISSION_SECRET, ServiceStack, wait_for
from tests.pdfs import make_pdf

TTL = 900
KEEP = 7 * 24 * 3600


def credential(stack: ServiceStack, ticket: int, issued_ago: float) -> str:
    codec = AdmissionCodec(ADMISSION_SECRET, ttl_seconds=TTL, keep_seconds=KEEP)
    return codec.issue(stack.event, ticket, now=time.time() - issued_ago)


def as_applicant(stack: ServiceStack, token: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=stack.gateway_url, headers={"X-Admission-Token": token}, timeout=30
    )


async def test_a_lapsed_admission_still_uses_what_was_bought_but_buys_nothing_more(
    stack: ServiceStack, provider: httpx.AsyncClient
) -> None:
    await stack.mint(2)
    async with as_applicant(stack, credential(stack, 11, issued_ago=0)) as live:
        response = await live.post("/api/v1/purchases", json={"quantity": 1})
        assert response.status_code == 201, response.text
        purchase = response.json()

    # An hour later the admission no longer buys; the payment arrives meanwhile.
    async with as_applicant(stack, credential(stack, 11, issued_ago=3600)) as lapsed:
        more = await lapsed.post("/api/v1/purchases", json={"quantity": 1})
        assert more.status_code == 401
        assert more.json()["code"] == "invalid_admission"
        assert "rejoin the queue" in more.json()["detail"]

        charge = await provider.post(
            "/charges", json={"reference": purchase["payment_reference"], "amount": 10_000}
        )
        assert charge.json()["body"] == {"outcome": "applied"}
        paid = await lapsed.get(f"/api/v1/purchases/{purchase['id']}")
        assert paid.status_code == 200 and paid.json()["status"] == "paid"

        upload = await lapsed.post(
            "/api/v1/stampings", files={"file": ("cv.pdf", make_pdf(1), "application/pdf")}
        )
        assert upload.status_code == 202, upload.text
        job = upload.json()
        assert job["serial"] == purchase["serials"][0]

        async def done() -> bool:
            answer = (await lapsed.get(f"/api/v1/stampings/{job['id']}")).json()
            return bool(answer["status"] == "done")

        await wait_for(done, within=60)
        document = await lapsed.get(f"/api/v1/stampings/{job['id']}/document")
        assert document.status_code == 200
        assert document.content.startswith(b"%PDF")

    # Past its keep horizon the credential serves nothing, and it never was another ticket's.
    async with as_applicant(stack, credential(stack, 11, issued_ago=KEEP + 1)) as gone:
        for method, path in (
            ("GET", f"/api/v1/stampings/{job['id']}"),
            ("GET", "/api/v1/serials"),
            ("POST", "/api/v1/purchases"),
        ):
            refused = await gone.request(method, path, json={"quantity": 1})
            assert refused.status_code == 401, (method, path)
            assert refused.json()["code"] == "invalid_admission"
    async with as_applicant(stack, credential(stack, 12, issued_ago=3600)) as other:
        assert (await other.get(f"/api/v1/stampings/{job['id']}")).status_code == 404
        assert (await other.get("/api/v1/serials")).json()["items"] == []


def test_the_codec_keeps_its_two_horizons() -> None:
    codec = AdmissionCodec("s" * 40, ttl_seconds=60, keep_seconds=3600)
    token = codec.issue("cpns", 5, now=1_000_000)
    admission = codec.verify(token, event="cpns", now=1_000_059)
    assert (admission.ticket, admission.expires_at, admission.kept_until) == (
        5,
        1_000_060,
        1_003_600,
    )
    with pytest.raises(InvalidAdmission, match="expired; rejoin"):
        codec.verify(token, event="cpns", now=1_000_060)
    assert codec.verify(token, event="cpns", to_buy=False, now=1_003_599).ticket == 5
    with pytest.raises(InvalidAdmission, match="expired"):
        codec.verify(token, event="cpns", to_buy=False, now=1_003_600)
    # Never shorter than the admission itself.
    assert AdmissionCodec("s" * 40, ttl_seconds=900, keep_seconds=10).keep_seconds == 900

"""The first vertical slice, through the gateway only: buy, upload, stamp, download, validate."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.harness import ServiceStack, wait_for
from tests.pdfs import make_pdf
from tests.pdftools import pdfsig, qpdf_check


async def _stamped(client: httpx.AsyncClient, job_id: str) -> dict[str, object]:
    async def finished() -> dict[str, object] | None:
        response = await client.get(f"/api/v1/stampings/{job_id}")
        assert response.status_code == 200, response.text
        body: dict[str, object] = response.json()
        return body if body["status"] in ("done", "failed") else None

    result: dict[str, object] = await wait_for(finished, within=60)
    return result


async def test_distributor_buys_uploads_and_downloads_a_valid_stamped_pdf(
    stack: ServiceStack, tmp_path: Path
) -> None:
    await stack.mint(10)
    api_key = await stack.create_distributor(balance=50_000)
    async with stack.client(api_key) as client:
        purchase = await client.post("/api/v1/purchases", json={"quantity": 2})
        assert purchase.status_code == 201, purchase.text
        serials = purchase.json()["serials"]
        assert len(serials) == 2 and len(set(serials)) == 2
        assert purchase.json()["amount"] == 20_000

        document = make_pdf(3)
        upload = await client.post(
            "/api/v1/stampings",
            files={"file": ("cv.pdf", document, "application/pdf")},
            data={"serial": serials[0], "page": "2", "box": "400,100,490,190"},
        )
        assert upload.status_code == 202, upload.text
        job = upload.json()
        assert upload.headers["location"] == f"/api/v1/stampings/{job['id']}"
        assert job["serial"] == serials[0] and job["status"] in ("queued", "signing", "done")

        final = await _stamped(client, job["id"])
        assert final["status"] == "done", final
        assert final["page"] == 2

        download = await client.get(f"/api/v1/stampings/{job['id']}/document")
        assert download.status_code == 200
        assert download.headers["content-type"] == "application/pdf"
        stamped = download.content
        assert stamped.startswith(document)  # an incremental update: the original is intact

        balance = (await client.get("/api/v1/balance")).json()
        assert balance["balance"] == 30_000

        # Inventory learns from `stamping.results` that the serial is now used.
        async def used() -> bool:
            listing = await client.get("/api/v1/serials", params={"state": "used"})
            return [item["serial"] for item in listing.json()["items"]] == [serials[0]]

        await wait_for(used)

    path = tmp_path / "stamped.pdf"
    path.write_bytes(stamped)
    report = pdfsig(path)
    assert report.signatures == 1 and report.all_valid, report.output
    assert report.total_document_signed, report.output
    assert f"eMeterai-{serials[0]}" in report.output
    check = qpdf_check(path)
    assert check.returncode == 0, check.stdout + check.stderr


async def test_upload_without_a_serial_takes_an_unused_one(stack: ServiceStack) -> None:
    await stack.mint(3)
    api_key = await stack.create_distributor()
    async with stack.client(api_key) as client:
        serials = (await client.post("/api/v1/purchases", json={"quantity": 1})).json()["serials"]
        upload = await client.post(
            "/api/v1/stampings", files={"file": ("a.pdf", make_pdf(1), "application/pdf")}
        )
        assert upload.status_code == 202, upload.text
        assert upload.json()["serial"] == serials[0]
        assert upload.json()["page"] == 1  # the last page by default

        again = await client.post(
            "/api/v1/stampings", files={"file": ("b.pdf", make_pdf(1), "application/pdf")}
        )
        assert again.status_code == 409
        assert again.json()["code"] == "no_unused_serial"


async def test_a_serial_is_affixed_once(stack: ServiceStack) -> None:
    await stack.mint(2)
    api_key = await stack.create_distributor()
    async with stack.client(api_key) as client:
        (serial,) = (await client.post("/api/v1/purchases", json={"quantity": 1})).json()["serials"]
        first = await client.post(
            "/api/v1/stampings",
            files={"file": ("a.pdf", make_pdf(1), "application/pdf")},
            data={"serial": serial},
        )
        assert first.status_code == 202
        second = await client.post(
            "/api/v1/stampings",
            files={"file": ("b.pdf", make_pdf(1), "application/pdf")},
            data={"serial": serial},
        )
        assert second.status_code == 409
        assert second.json()["code"] == "serial_unavailable"


async def test_upload_idempotency_key_replays_the_same_job(stack: ServiceStack) -> None:
    await stack.mint(3)
    api_key = await stack.create_distributor()
    document = make_pdf(2)
    async with stack.client(api_key) as client:
        await client.post("/api/v1/purchases", json={"quantity": 2})
        headers = {"Idempotency-Key": "upload-1"}
        files = {"file": ("a.pdf", document, "application/pdf")}
        first = await client.post("/api/v1/stampings", files=files, headers=headers)
        replay = await client.post("/api/v1/stampings", files=files, headers=headers)
        assert first.status_code == replay.status_code == 202
        assert replay.json()["id"] == first.json()["id"]
        assert replay.headers["idempotent-replayed"] == "true"

        other = await client.post(
            "/api/v1/stampings",
            files={"file": ("b.pdf", make_pdf(1), "application/pdf")},
            headers=headers,
        )
        assert other.status_code == 422
        assert other.json()["code"] == "idempotency_key_reused"
        # Only one serial was claimed: the other is still unused.
        balance = (await client.get("/api/v1/balance")).json()
        assert balance["stamps"]["sold"] + balance["stamps"]["used"] == 2

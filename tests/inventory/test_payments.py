"""Applicants reserve, pay through the provider (a real HTTP server), and the callbacks are
applied exactly once; expired, late, duplicate and forged callbacks are handled."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from services.platform import signatures
from tests.harness import PAYMENT_SECRET, ServiceStack, wait_for
from tests.inventory.test_purchases import ledger_and_balances

pytestmark = pytest.mark.workers(0)


async def reconcile_ok(stack: ServiceStack) -> None:
    books = await ledger_and_balances(stack)
    assert books["unbalanced"] == []


async def test_an_applicant_reserves_pays_once_and_owns_the_stamp(
    stack: ServiceStack, provider: httpx.AsyncClient
) -> None:
    await stack.mint(3)
    async with stack.applicant(1) as applicant:
        response = await applicant.post("/api/v1/purchases", json={"quantity": 1})
        assert response.status_code == 201, response.text
        purchase = response.json()
        assert purchase["status"] == "pending_payment"
        assert purchase["payment_reference"].startswith("MTR-")
        assert purchase["expires_at"] and purchase["amount"] == 10_000

        charge = await provider.post(
            "/charges", json={"reference": purchase["payment_reference"], "amount": 10_000}
        )
        assert charge.json()["status_code"] == 200
        assert charge.json()["body"] == {"outcome": "applied"}

        paid = (await applicant.get(f"/api/v1/purchases/{purchase['id']}")).json()
        assert paid["status"] == "paid" and paid["paid_at"]
        mine = (await applicant.get("/api/v1/serials")).json()["items"]
        assert [(item["serial"], item["state"]) for item in mine] == [
            (purchase["serials"][0], "sold")
        ]

        # The provider delivers the same event again (its timeout, our slow answer...).
        again = await provider.post(f"/charges/{charge.json()['charge_id']}/resend")
        assert again.json()["body"] == {"outcome": "duplicate"}
        # A second, different payment for the same reference is kept for a refund.
        double = await provider.post(
            "/charges", json={"reference": purchase["payment_reference"], "amount": 10_000}
        )
        assert double.json()["body"] == {"outcome": "already_paid"}

    async with stack.applicant(2) as other:
        # Another applicant sees nothing of it.
        missing = await other.get(f"/api/v1/purchases/{purchase['id']}")
        assert missing.status_code == 404
    await reconcile_ok(stack)


async def test_forged_tampered_and_replayed_callbacks_are_refused(
    stack: ServiceStack,
) -> None:
    await stack.mint(1)
    async with stack.applicant(7) as applicant:
        purchase = (await applicant.post("/api/v1/purchases", json={"quantity": 1})).json()
    event = {
        "event_id": "evt_forged",
        "reference": purchase["payment_reference"],
        "amount": 10_000,
        "status": "paid",
    }
    body = json.dumps(event).encode()
    tampered = json.dumps({**event, "amount": 1}).encode()
    old = int(time.time()) - 3600
    attempts = {
        "wrong secret": (body, signatures.sign("not-the-secret", body)),
        "tampered body": (tampered, signatures.sign(PAYMENT_SECRET, body)),
        "replayed an hour later": (body, signatures.sign(PAYMENT_SECRET, body, timestamp=old)),
        "no signature": (body, None),
        "garbage header": (body, "v1=deadbeef"),
    }
    async with stack.client() as client:
        for label, (content, signature) in attempts.items():
            headers = {"content-type": "application/json"}
            if signature is not None:
                headers[signatures.SIGNATURE_HEADER] = signature
            response = await client.post(
                "/api/v1/payments/notify", content=content, headers=headers
            )
            assert response.status_code == 401, label
            assert response.json()["code"] == "invalid_signature", label
        # A correctly signed body that is not JSON is a clear 400.
        junk = b"{not json"
        response = await client.post(
            "/api/v1/payments/notify",
            content=junk,
            headers={signatures.SIGNATURE_HEADER: signatures.sign(PAYMENT_SECRET, junk)},
        )
        assert response.status_code == 400 and response.json()["code"] == "malformed_json"
    async with stack.applicant(7) as applicant:
        still = (await applicant.get(f"/api/v1/purchases/{purchase['id']}")).json()
        assert still["status"] == "pending_payment"


@pytest.mark.settings(inventory={"reservation_ttl_seconds": 1, "sweep_interval_seconds": 0.2})
async def test_unpaid_reservations_expire_and_late_payments_are_kept(
    stack: ServiceStack, provider: httpx.AsyncClient
) -> None:
    await stack.mint(1)
    async with stack.applicant(3) as applicant:
        purchase = (await applicant.post("/api/v1/purchases", json={"quantity": 1})).json()
        assert purchase["status"] == "pending_payment"

        async def expired() -> bool:
            status = (await applicant.get(f"/api/v1/purchases/{purchase['id']}")).json()
            return bool(status["status"] == "expired")

        await wait_for(expired, within=10)
        assert (await applicant.get("/api/v1/serials")).json()["items"] == []

    # The serial is for sale again.
    async with stack.applicant(4) as next_in_line:
        again = await next_in_line.post("/api/v1/purchases", json={"quantity": 1})
        assert again.status_code == 201
        assert again.json()["serials"] == purchase["serials"]

    late = await provider.post(
        "/charges", json={"reference": purchase["payment_reference"], "amount": 10_000}
    )
    assert late.json()["body"] == {"outcome": "late"}
    unknown = await provider.post("/charges", json={"reference": "MTR-NOSUCHREF", "amount": 1})
    assert unknown.json()["body"] == {"outcome": "unknown_reference"}
    failed = await provider.post(
        "/charges",
        json={"reference": again.json()["payment_reference"], "amount": 10_000, "status": "failed"},
    )
    assert failed.json()["body"] == {"outcome": "not_paid"}
    await reconcile_ok(stack)


async def test_a_wrong_amount_is_not_applied(
    stack: ServiceStack, provider: httpx.AsyncClient
) -> None:
    await stack.mint(1)
    async with stack.applicant(5) as applicant:
        purchase = (await applicant.post("/api/v1/purchases", json={"quantity": 1})).json()
        short = await provider.post(
            "/charges", json={"reference": purchase["payment_reference"], "amount": 5_000}
        )
        assert short.json()["body"] == {"outcome": "amount_mismatch"}
        status = (await applicant.get(f"/api/v1/purchases/{purchase['id']}")).json()
        assert status["status"] == "pending_payment"


async def test_an_applicant_holds_at_most_the_limit_even_from_parallel_tabs(
    stack: ServiceStack,
) -> None:
    await stack.mint(20)
    async with stack.applicant(9) as applicant:
        too_many = await applicant.post("/api/v1/purchases", json={"quantity": 3})
        assert too_many.status_code == 409 and too_many.json()["code"] == "applicant_limit"
        responses = await asyncio.gather(
            *(applicant.post("/api/v1/purchases", json={"quantity": 1}) for _ in range(8))
        )
        assert sorted(r.status_code for r in responses) == [201, 201] + [409] * 6
        assert len((await applicant.get("/api/v1/serials")).json()["items"]) == 2
        # Applicants have no prepaid balance.
        assert (await applicant.get("/api/v1/balance")).status_code == 401


async def test_bad_and_foreign_admission_credentials_are_refused(stack: ServiceStack) -> None:
    from services.platform.admission import AdmissionCodec
    from tests.harness import ADMISSION_SECRET

    other_event = AdmissionCodec(ADMISSION_SECRET).issue("another-event", 1)
    expired = AdmissionCodec(ADMISSION_SECRET).issue(stack.event, 1, now=time.time() - 3600)
    forged = AdmissionCodec("not-the-secret-at-all-but-long-enough-xx").issue(stack.event, 1)
    valid = stack.admission_token(1)
    tampered = valid[:-4] + ("AAAA" if not valid.endswith("AAAA") else "BBBB")
    async with stack.client() as client:
        for token in (other_event, expired, forged, tampered, "garbage"):
            response = await client.post(
                "/api/v1/purchases", json={"quantity": 1}, headers={"X-Admission-Token": token}
            )
            assert response.status_code == 401
            assert response.json()["code"] == "invalid_admission"
        cookie = await client.post(
            "/api/v1/purchases",
            json={"quantity": 1},
            headers={"Cookie": f"meterai_admission={valid}"},
        )
        assert cookie.status_code == 409  # accepted as the applicant; the pool is empty
        assert cookie.json()["code"] == "sold_out"


@pytest.mark.settings(queue={"admit_per_minute": 6000})
async def test_the_waiting_room_admits_and_its_credential_buys(stack: ServiceStack) -> None:
    await stack.mint(1)
    async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=30) as browser:
        await browser.post("/queue/join")

        async def admitted() -> dict[str, object] | None:
            status = (await browser.get("/queue/status")).json()
            return status if status["state"] == "admitted" else None

        status = await wait_for(admitted, within=15)
        assert status["admission_token"]
        # The browser now holds the admission cookie.
        response = await browser.post("/api/v1/purchases", json={"quantity": 1})
        assert response.status_code == 201, response.text
        assert response.json()["status"] == "pending_payment"

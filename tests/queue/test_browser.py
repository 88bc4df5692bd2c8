"""The applicant's pages in a real browser: headless Chromium (Debian's `chromium` package,
driven by Playwright) against the whole test stack, through the gateway.

Screenshots go to each test's temporary folder, and also to `METERAI_SCREENSHOT_DIR` when set.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import Browser, ConsoleMessage, Page, Route, async_playwright, expect

from tests.harness import OPS_TOKEN, ServiceStack
from tests.paysim import PaymentProvider
from tests.pdfs import make_pdf
from tests.queue.test_pages import people_ahead

CHROMIUM = Path(os.environ.get("METERAI_CHROMIUM", "/usr/bin/chromium"))
OPS = {"Authorization": f"Bearer {OPS_TOKEN}"}
# What a phone shows (CSS pixels of a common 6-inch phone).
PHONE: dict[str, Any] = {
    "viewport": {"width": 390, "height": 844},
    "is_mobile": True,
    "has_touch": True,
    "locale": "id-ID",
    "timezone_id": "Asia/Jakarta",
}

expect.set_options(timeout=10_000)  # a shared 2-core machine is sometimes slow

# Skipped where Chromium is missing, except in CI (CI=true), which installs it: there, a missing
# browser must fail the run rather than silently skip the tests.
pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists() and not os.environ.get("CI"),
    reason=f"no Chromium at {CHROMIUM}: `apt-get install chromium` (.ci/run installs it), "
    "or point METERAI_CHROMIUM at one",
)


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    """One headless Chromium for the module (the system's, never a downloaded build)."""
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            # The machine has no network beyond loopback: keep Chromium from trying.
            args=[
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
def screenshot(tmp_path: Path, request: pytest.FixtureRequest) -> Callable[[Page, str], Any]:
    """`await screenshot(page, name)`: a full-page PNG in tmp_path (and METERAI_SCREENSHOT_DIR)."""
    extra = os.environ.get("METERAI_SCREENSHOT_DIR")
    if extra:
        Path(extra).mkdir(parents=True, exist_ok=True)

    async def take(page: Page, name: str) -> Path:
        path = tmp_path / f"{request.node.name}-{name}.png"
        await page.screenshot(path=path, full_page=True)
        if extra:
            await asyncio.to_thread(shutil.copy, path, Path(extra) / path.name)
        return path

    return take


def console_errors(page: Page) -> list[str]:
    """Errors the page logs or throws from now on (a CSP violation is one of them)."""
    errors: list[str] = []

    def on_console(message: ConsoleMessage) -> None:
        # Chromium logs every 4xx answer of a fetch; those are the protocol (a 404 before the
        # first join, a 410 for an expired ticket), not the page's errors.
        if message.type == "error" and not message.text.startswith("Failed to load resource"):
            errors.append(message.text)

    page.on("console", on_console)
    page.on("pageerror", lambda error: errors.append(str(error)))
    return errors


@pytest.mark.workers(1)
async def test_an_applicant_waits_is_admitted_buys_pays_and_downloads(
    stack: ServiceStack, browser: Browser, screenshot: Callable[[Page, str], Any], tmp_path: Path
) -> None:
    await stack.mint(2)
    provider = PaymentProvider.for_stack(stack)
    provider_url = await provider.start()
    context = await browser.new_context(base_url=stack.gateway_url, **PHONE)
    try:
        async with stack.client() as ops, stack.client() as ahead, stack.client() as behind:
            await ops.patch("/ops/queue", json={"paused": True}, headers=OPS)
            await ahead.post("/queue/join")
            await behind.post("/queue/join")

            page = await context.new_page()
            errors = console_errors(page)
            await page.goto("/")
            summary = page.locator("#summary")
            await expect(page.locator("#state-title")).to_have_text("Antrean sedang dijeda")
            # The place as the room's JSON says it, for this browser's ticket (its cookie).
            position = (await (await context.request.get("/queue/status")).json())["position"]
            assert position >= 2  # two joined before
            await expect(summary).to_have_text(people_ahead(position, "id"))
            await expect(page.locator("html")).to_have_attribute("lang", "id")
            await expect(page.locator("#eta")).to_have_text("belum dapat diperkirakan")
            await expect(page.locator("#updated")).not_to_have_text("–")
            await expect(page.get_by_role("progressbar", name="Kemajuan antrean")).to_be_visible()
            await screenshot(page, "room-paused")

            # English, in place; a reload remembers it and keeps the place in the queue.
            await page.get_by_role("link", name="English").click()
            await expect(page.locator("html")).to_have_attribute("lang", "en")
            await expect(summary).to_have_text(people_ahead(position, "en"))
            await expect(page).to_have_title("e-Meterai purchase queue")
            assert page.url.endswith("/?lang=en")
            await page.goto("/")
            await expect(summary).to_have_text(people_ahead(position, "en"))
            await expect(page.locator("#state-title")).to_have_text("The queue is paused")
            await screenshot(page, "room-paused-en")
            await page.get_by_role("link", name="Bahasa Indonesia").click()
            await expect(summary).to_have_text(people_ahead(position, "id"))

            # Operators resume at one admission every 3 s: the place moves, then it's our turn.
            await ops.patch(
                "/ops/queue", json={"paused": False, "admit_per_minute": 20}, headers=OPS
            )
            await expect(page.locator("#state-title")).to_have_text("Anda dalam antrean")
            # A function, not an expression: the page's CSP forbids eval, for tests too.
            await page.wait_for_function(
                "() => document.getElementById('progress').value > 0", timeout=20_000
            )
            await screenshot(page, "room-waiting")
            await page.wait_for_url("**/beli", timeout=30_000)

            # The purchase page: order a stamp, see how to pay.
            await expect(page.locator("h1")).to_have_text("Beli e-Meterai")
            await screenshot(page, "purchase")
            # Problems are told in plain language, by their code.
            await page.get_by_label("Jumlah meterai").fill("5")
            await page.get_by_role("button", name="Pesan meterai").click()
            await expect(page.locator("#buy-problem")).to_contain_text(
                "Setiap pemohon dapat memegang paling banyak"
            )
            await page.get_by_label("Jumlah meterai").fill("1")
            await page.get_by_role("button", name="Pesan meterai").click()
            await expect(page.locator("#buy-problem")).to_be_hidden()
            reference = page.locator("#payment-reference")
            await expect(reference).to_have_text(re.compile(r"^MTR-[0-9A-Z]{16}$"))
            await expect(page.locator("#amount")).to_have_text("Rp 10.000")
            await expect(page.locator("#purchase-status")).to_have_text("Menunggu pembayaran")
            await expect(page.locator("#expires")).to_contain_text("WIB")
            await screenshot(page, "purchase-reserved")

            # The applicant pays at the provider; the page notices.
            async with httpx.AsyncClient(base_url=provider_url, timeout=30) as pay:
                charge = await pay.post(
                    "/charges", json={"reference": await reference.inner_text(), "amount": 10_000}
                )
                assert charge.json()["body"] == {"outcome": "applied"}
            await expect(page.locator("#purchase-status")).to_have_text(
                "Lunas: meterai sudah menjadi milik Anda", timeout=15_000
            )

            # Upload a PDF, watch the job, download the stamped document.
            await page.locator("#document").set_input_files(
                files=[{"name": "foto.jpg", "mimeType": "image/jpeg", "buffer": b"\xff\xd8\xff"}]
            )
            await page.get_by_role("button", name="Unggah dan bubuhkan meterai").click()
            await expect(page.locator("#upload-problem")).to_have_text(
                "Berkas itu bukan PDF. Unggah dokumen dalam format PDF."
            )
            document = make_pdf(1)
            await page.locator("#document").set_input_files(
                files=[{"name": "surat.pdf", "mimeType": "application/pdf", "buffer": document}]
            )
            # The upload reaches the server, but its answer is lost on the way back. Pressing
            # again is the same upload (the same key): the job the server already took, not
            # "no unused stamp" because the lost upload holds it.
            lost: list[int] = []

            async def lose_the_answer(route: Route) -> None:
                lost.append((await route.fetch()).status)
                await route.abort("connectionreset")

            await page.route("**/api/v1/stampings", lose_the_answer)
            await page.get_by_role("button", name="Unggah dan bubuhkan meterai").click()
            await expect(page.locator("#upload-problem")).to_have_text(
                "Tidak dapat terhubung. Periksa koneksi internet Anda lalu coba lagi."
            )
            assert lost == [202]
            await page.unroute("**/api/v1/stampings", lose_the_answer)
            await page.get_by_role("button", name="Unggah dan bubuhkan meterai").click()
            await expect(page.locator("#upload-problem")).to_be_hidden()
            jobs = page.locator("#jobs li")
            await expect(jobs).to_have_count(1)
            await expect(jobs.first).to_contain_text("surat.pdf")
            download_link = page.get_by_role("link", name="Unduh PDF bermeterai")
            await expect(download_link).to_be_visible(timeout=60_000)
            await expect(jobs.first).to_contain_text("Selesai")
            await screenshot(page, "purchase-done")
            async with page.expect_download() as downloading:
                await download_link.click()
            download = await downloading.value
            saved = tmp_path / "stamped.pdf"
            await download.save_as(saved)
            stamped = saved.read_bytes()
            assert stamped.startswith(document[:8]) and len(stamped) > len(document)
            assert download.suggested_filename.startswith("stamped-")
            assert errors == []
    finally:
        await context.close()
        await provider.stop()


def first_proof(challenge: str, difficulty: int) -> int:
    """The smallest nonce whose SHA-256("<challenge>:<nonce>") has `difficulty` zero bits."""
    nonce = 0
    while True:
        digest = hashlib.sha256(f"{challenge}:{nonce}".encode()).digest()
        if int.from_bytes(digest, "big") >> (256 - difficulty) == 0:
            return nonce
        nonce += 1


def ticket_status(state: str, position: int, **fields: Any) -> dict[str, Any]:
    return {
        "state": state,
        "position": position,
        "eta_seconds": None,
        "poll_after_seconds": 1.0,
        "ticket": "t.fake.ticket",
        "admission_token": None,
        "opens_in_seconds": None,
        **fields,
    }


async def test_the_page_follows_the_status_contract_beyond_what_the_room_does_yet(
    stack: ServiceStack, browser: Browser, screenshot: Callable[[Page, str], Any]
) -> None:
    """Proof of work, the pre-queue countdown, an expired ticket and rejoining, with the room's
    answers played by the test (the page and its files are the real ones)."""
    difficulty = 16
    challenge = next(
        f"challenge-{n}" for n in range(1000) if first_proof(f"challenge-{n}", difficulty) > 20_000
    )
    proofs: list[str] = []
    checked = asyncio.Event()  # the test saw "preparing": the proven join may be answered
    counted = asyncio.Event()  # the test saw the countdown: the ticket may expire
    statuses = [
        (410, {"code": "ticket_expired", "detail": "Your ticket expired.", "status": 410}),
    ]

    async def join(route: Route) -> None:
        proof = route.request.headers.get("x-queue-proof")
        if proof is None and not proofs:
            await fulfil(
                route,
                428,
                {"code": "pow_required", "challenge": challenge, "difficulty": difficulty},
            )
            return
        if proof is not None:
            proofs.append(proof)
            await checked.wait()  # the page says "preparing" until this answer arrives
            await fulfil(route, 200, ticket_status("prequeue", 0, opens_in_seconds=3725))
        else:  # the rejoin after the ticket expired
            await fulfil(route, 200, ticket_status("waiting", 5, eta_seconds=600))

    async def status(route: Route) -> None:
        if not proofs:
            await fulfil(route, 404, {"code": "no_ticket", "detail": "Join first."})
        elif statuses:
            await counted.wait()
            await fulfil(route, *statuses.pop(0))
        else:
            await fulfil(route, 200, ticket_status("waiting", 5, eta_seconds=600))

    context = await browser.new_context(base_url=stack.gateway_url, **PHONE)
    try:
        page = await context.new_page()
        errors = console_errors(page)
        await page.route("**/queue/join", join)
        await page.route("**/queue/status", status)
        await page.goto("/")
        await expect(page.locator("#state-title")).to_have_text("Menyiapkan antrean…")
        checked.set()
        await expect(page.locator("#state-title")).to_have_text("Penjualan belum dibuka")
        nonce = int(proofs[0].rsplit(":", 1)[1])
        assert proofs == [f"{challenge}:{first_proof(challenge, difficulty)}"] and nonce > 20_000
        await expect(page.locator("#countdown")).to_contain_text("Dibuka dalam 1:0")
        await screenshot(page, "prequeue")
        counted.set()

        await expect(page.locator("#state-title")).to_have_text("Nomor antrean Anda kedaluwarsa")
        rejoin = page.get_by_role("button", name="Ambil nomor antrean baru")
        await expect(rejoin).to_be_focused()
        await screenshot(page, "expired")
        await page.keyboard.press("Enter")
        await expect(page.locator("#summary")).to_have_text("Anda di urutan ke-5")
        await expect(page.locator("#eta")).to_have_text("sekitar 10 menit")
        assert errors == []
    finally:
        await context.close()


async def fulfil(route: Route, status: int, body: dict[str, Any]) -> None:
    content_type = "application/json" if status < 400 else "application/problem+json"
    await route.fulfill(status=status, content_type=content_type, body=json.dumps(body))


async def test_without_javascript_the_browser_is_sent_to_the_status_page(
    stack: ServiceStack, browser: Browser, screenshot: Callable[[Page, str], Any]
) -> None:
    async with stack.client() as ops:
        await ops.patch("/ops/queue", json={"paused": True}, headers=OPS)
    context = await browser.new_context(
        base_url=stack.gateway_url, java_script_enabled=False, **PHONE
    )
    try:
        page = await context.new_page()
        await page.goto("/?lang=en")
        await page.wait_for_url("**/queue/page?lang=en")
        await page.get_by_role("button", name="Take a queue number").click()
        await page.wait_for_url(re.compile(r"/queue/page\?lang=en&first=\d+$"))
        position = (await (await context.request.get("/queue/status")).json())["position"]
        await expect(page.locator("#summary")).to_have_text(people_ahead(position, "en"))
        await expect(page.locator("html")).to_have_attribute("lang", "en")
        await screenshot(page, "no-javascript")
    finally:
        await context.close()

"""The applicant's pages over plain HTTP: the room page and its files, the page that works
without JavaScript (meta refresh, rendered from the ticket cookie), and the purchase page."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.exceptions

from services.inventory.models import PurchaseStatus
from services.queue.pages import RoomAnswer, duration_text, fill, problem_text, status_page
from services.queue.texts import TEXTS
from services.stamping.models import JobStatus
from tests.harness import OPS_TOKEN, ServiceStack, wait_for

pytestmark = pytest.mark.workers(0)

QUEUE = Path(__file__).resolve().parents[2] / "services" / "queue"
OPS = {"Authorization": f"Bearer {OPS_TOKEN}"}


def main(html: str) -> str:
    """What the page shows (its `<main>`), without the texts embedded for the scripts."""
    return html.split('<main id="main">', 1)[1].split("</main>", 1)[0]


def people_ahead(position: int, lang: str) -> str:
    """How the pages word a position."""
    key = "people_ahead_one" if position == 1 else "people_ahead"
    return fill(TEXTS[lang][key], {"n": position})


def meta_refresh(html: str) -> tuple[int, str] | None:
    """The (seconds, url) of the page's `<meta http-equiv="refresh">`, if it has one."""
    found = re.search(r'<meta http-equiv="refresh" content="(\d+); url=([^"]+)">', html)
    return (int(found[1]), found[2].replace("&amp;", "&")) if found else None


async def test_the_room_page_speaks_indonesian_first_and_english_on_request(
    stack: ServiceStack,
) -> None:
    async with stack.client() as client:
        page = await client.get("/")
        assert page.status_code == 200
        assert '<html lang="id">' in page.text and "<title>Antrean pembelian e-Meterai" in page.text
        assert "default-src 'self'" in page.headers["content-security-policy"]
        # Without JavaScript, the browser is sent to the server-rendered status page.
        assert '<noscript><meta http-equiv="refresh" content="0; url=/queue/page">' in page.text
        assert 'href="?lang=en" hreflang="en" lang="en">English</a>' in page.text
        english = await client.get("/?lang=en")
        assert (
            '<html lang="en">' in english.text and "<title>e-Meterai purchase queue" in english.text
        )
        assert "url=/queue/page?lang=en" in english.text
        assert '<html lang="id">' in (await client.get("/?lang=xx")).text

        # Its files come from the queue service, cached for good under versioned URLs.
        assets = re.findall(r'(?:src|href)="(/static/[^"]+)"', page.text)
        assert {asset.split("?")[0] for asset in assets} == {
            "/static/meterai.css",
            "/static/meterai.js",
            "/static/room.js",
        }
        for asset in assets:
            served = await client.get(asset)
            assert served.status_code == 200, asset
            assert "immutable" in served.headers["cache-control"]
            assert served.headers["content-type"].startswith(("text/css", "text/javascript"))
        missing = await client.get("/static/nothing.js")
        assert missing.status_code == 404 and missing.json()["code"] == "not_found"
        outside = await client.get("/static/..%2Fpages.py")
        assert outside.status_code == 404


async def test_without_javascript_the_status_page_shows_the_position_and_admits(
    stack: ServiceStack,
) -> None:
    async with stack.client() as ops, stack.client() as ahead, stack.client() as browser:
        await ops.patch("/ops/queue", json={"paused": True}, headers=OPS)
        await ahead.post("/queue/join")

        first = await browser.get("/queue/page")
        assert first.status_code == 200
        assert 'action="/queue/page"' in first.text and "Ambil nomor antrean" in main(first.text)
        assert meta_refresh(first.text) is None  # nothing to refresh before joining

        joined = await browser.post("/queue/page")
        assert joined.status_code == 303
        assert "meterai_ticket=" in joined.headers["set-cookie"]
        # The place as the JSON route sees it, for the same ticket (the page shows the same).
        position = (await browser.get("/queue/status")).json()["position"]
        assert position >= 1
        assert joined.headers["location"] == f"/queue/page?first={position}"
        page = await browser.get(joined.headers["location"])
        assert page.status_code == 200 and page.headers["cache-control"] == "no-store"
        shown = main(page.text)
        assert people_ahead(position, "id") in shown
        assert "Antrean sedang dijeda" in shown and "belum dapat diperkirakan" in shown
        assert '<progress id="progress" max="100" value="0">' in page.text
        refresh = meta_refresh(page.text)
        assert refresh is not None and refresh[1] == f"/queue/page?first={position}"
        assert refresh[0] >= 1
        # A second join (a double submit) keeps the place.
        again = await browser.post("/queue/page")
        assert again.headers["location"] == f"/queue/page?first={position}"

        english = await browser.get(f"/queue/page?lang=en&first={2 * position}")
        assert '<html lang="en">' in english.text
        assert people_ahead(position, "en") in main(english.text)
        assert 'value="50"' in english.text  # half-way from the first position given
        english_refresh = meta_refresh(english.text)
        assert english_refresh is not None
        assert english_refresh[1] == f"/queue/page?lang=en&first={2 * position}"

        await ops.patch("/ops/queue", json={"paused": False, "admit_per_minute": 6000}, headers=OPS)

        async def admitted_page() -> httpx.Response | None:
            response = await browser.get("/queue/page")
            return response if "Giliran Anda!" in main(response.text) else None

        admitted = await wait_for(admitted_page, within=15, interval=0.3)
        assert meta_refresh(admitted.text) == (3, "/beli")
        assert 'href="/beli"' in admitted.text
        assert "meterai_admission=" in admitted.headers.get("set-cookie", "")

        purchase = await browser.get("/beli")
        assert purchase.status_code == 200 and 'id="purchase-app"' in purchase.text
        assert 'id="buy-form"' in purchase.text and 'id="upload-form"' in purchase.text
        assert "/static/beli.js" in purchase.text
        async with stack.client() as stranger:  # no admission cookie
            refused = await stranger.get("/beli?lang=en")
        assert refused.status_code == 200 and 'id="not-admitted"' in refused.text
        assert (
            "It&#39;s not your turn yet" in main(refused.text)
            and 'href="/?lang=en"' in refused.text
        )


@pytest.mark.settings(queue={"join_limit_per_ip": 1})
async def test_without_javascript_the_rooms_refusals_are_explained(stack: ServiceStack) -> None:
    async with stack.client() as ops, stack.client() as browser, stack.client() as neighbour:
        await ops.patch("/ops/queue", json={"paused": True, "pow_difficulty": 8}, headers=OPS)
        # A form cannot solve the proof of work operators ask for: the page says so, and does
        # not reload itself into the same refusal.
        refused = await browser.post("/queue/page")
        assert refused.status_code == 428
        assert TEXTS["id"]["err_pow_required"] in main(refused.text)
        assert meta_refresh(refused.text) is None and "set-cookie" not in refused.headers

        await ops.patch("/ops/queue", json={"pow_difficulty": 0}, headers=OPS)
        joined = await browser.post("/queue/page")
        assert joined.status_code == 303 and "meterai_ticket=" in joined.headers["set-cookie"]
        # One join per address here: the next person on the same network is asked to wait,
        # and the page comes back when the room says to (Retry-After).
        limited = await neighbour.post("/queue/page?lang=en")
        assert limited.status_code == 429
        assert "Too many joins from your network" in main(limited.text)
        assert meta_refresh(limited.text) == (60, "/queue/page?lang=en")
        # The one who joined keeps the place.
        again = await browser.post("/queue/page")
        assert again.status_code == 303 and again.headers["location"] == joined.headers["location"]


async def test_without_javascript_a_failing_room_still_answers_with_a_page(
    stack: ServiceStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    room = stack.servers["queue"].app.state.waiting_room.room

    async def unreachable(arrival: Any) -> Any:
        raise redis.exceptions.ConnectionError("Redis is gone")

    async def crashing(arrival: Any) -> Any:
        raise RuntimeError("a bug")

    async with stack.client() as browser:
        # The room's store out of reach: a 503 page that says the place is kept and retries
        # after the room's Retry-After.
        monkeypatch.setattr(room, "join", unreachable)
        down = await browser.post("/queue/page")
        assert down.status_code == 503 and down.headers["content-type"].startswith("text/html")
        assert TEXTS["id"]["err_room_unavailable"] in main(down.text)
        assert meta_refresh(down.text) == (2, "/queue/page")
        # A bug: still a page (500), and it tries again by itself.
        monkeypatch.setattr(room, "join", crashing)
        failed = await browser.post("/queue/page")
    assert failed.status_code == 500 and failed.headers["content-type"].startswith("text/html")
    assert TEXTS["id"]["err_internal_error"] in main(failed.text)
    assert meta_refresh(failed.text) == (10, "/queue/page")


def answer(status_code: int, body: dict[str, Any], retry_after: int | None = None) -> RoomAnswer:
    return RoomAnswer(status_code, body, ["meterai_ticket=abc; Path=/"], retry_after)


def html(response: Any) -> str:
    return bytes(response.body).decode()


@pytest.mark.parametrize("lang", ["id", "en"])
def test_the_page_without_javascript_follows_the_status_contract(lang: str) -> None:
    """States and problems the room may answer, rendered (the room need not produce them)."""
    t = TEXTS[lang]
    prequeue = status_page(
        answer(
            200,
            {
                "state": "prequeue",
                "position": 0,
                "eta_seconds": None,
                "poll_after_seconds": 12.3,
                "opens_in_seconds": 754,
                "ticket": "x",
            },
        ),
        lang,
        None,
    )
    text = html(prequeue)
    assert t["prequeue_title"] in main(text) and duration_text(754, lang) in main(text)
    assert meta_refresh(text) is not None and meta_refresh(text)[0] == 13  # type: ignore[index]
    assert prequeue.headers["set-cookie"] == "meterai_ticket=abc; Path=/"

    expired = status_page(answer(410, {"code": "ticket_expired", "detail": "gone"}), lang, None)
    assert expired.status_code == 410
    assert t["expired_title"] in main(html(expired)) and t["rejoin"] in main(html(expired))
    assert 'method="post"' in main(html(expired)) and meta_refresh(html(expired)) is None

    said_expired = status_page(answer(200, {"state": "expired", "position": 0}), lang, None)
    assert t["rejoin"] in main(html(said_expired))

    pow_required = status_page(
        answer(428, {"code": "pow_required", "challenge": "c", "difficulty": 20}), lang, None
    )
    assert (
        t["err_pow_required"] in main(html(pow_required))
        and meta_refresh(html(pow_required)) is None
    )

    limited = status_page(answer(429, {"code": "rate_limited", "detail": "slow"}, 7), lang, None)
    assert t["err_rate_limited"] in main(html(limited))
    assert meta_refresh(html(limited)) == (
        7,
        "/queue/page" if lang == "id" else "/queue/page?lang=en",
    )

    unknown = status_page(
        answer(503, {"code": "something_new", "detail": "Try later."}), lang, None
    )
    assert "Try later." in main(html(unknown)) and meta_refresh(html(unknown)) is not None


def test_problems_and_waits_in_plain_language() -> None:
    limit = {"code": "applicant_limit", "max_stamps": 2, "held": 2, "detail": "..."}
    assert problem_text(limit, "id") == (
        "Setiap pemohon dapat memegang paling banyak 2 meterai, dan Anda sudah memegang 2."
    )
    assert (
        problem_text({"code": "new_code", "detail": "Odd."}, "en") == "Something went wrong: Odd."
    )
    assert duration_text(None, "id") == "belum dapat diperkirakan"
    assert duration_text(30, "en") == "under a minute"
    assert duration_text(12 * 60 + 10, "id") == "sekitar 12 menit"
    assert duration_text(2 * 3600 + 5 * 60, "en") == "about 2 h 5 min"


def test_both_languages_have_every_text_the_pages_use() -> None:
    assert TEXTS["id"].keys() == TEXTS["en"].keys()
    used: set[str] = set()
    for template in (QUEUE / "templates").glob("*.html"):
        source = template.read_text()
        used |= set(re.findall(r'data-t="(\w+)"', source))
        used |= set(re.findall(r"\bt\.(\w+)", source))
    for script in (QUEUE / "static").glob("*.js"):
        source = script.read_text()
        used |= set(re.findall(r'\bt\("(\w+)"[,)]', source))
        used |= set(re.findall(r'\bkey = "(\w+)";', source))
        used |= set(re.findall(r'\w+: "(\w+_(?:title|note)|connecting|preparing)"', source))
    # Keys the scripts build from the API's own values.
    used |= {f"job_{status}" for status in JobStatus}
    used |= {f"purchase_{status}" for status in PurchaseStatus}
    assert used - TEXTS["id"].keys() == set()

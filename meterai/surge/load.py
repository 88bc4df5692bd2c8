"""The simulated people of a surge, as Locust users in this process.

    python -m meterai.surge.load PLAN.json

Importing Locust monkey-patches the process for gevent, so this runs as a process of its own
(`meterai surge` starts it). Applicants arrive along the plan's curve (a `LoadTestShape`) and
each walks through what the page does: join, poll as `poll_after_seconds` says, buy one stamp
with the admission credential, pay at the provider, wait for the payment as the page does, upload
the reference PDF, watch the job, download the stamp, and (a sample of them) verify it.
Distributors buy and stamp in batches with their API keys meanwhile.

Like real clients, everyone sends a request again after `Retry-After` when it was refused for
now (429, or 503 with Retry-After), and after a second when there was no answer; every attempt
is recorded with its outcome (see `records`).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import resource
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import gevent
import gevent.event
import gevent.pool
from geventhttpclient.client import HTTPClientPool
from locust import FastHttpUser, LoadTestShape, User, task
from locust.contrib.fasthttp import FastHttpSession, FastResponse
from locust.env import Environment
from locust.exception import StopUser

from meterai.surge.plan import (
    DistributorAccount,
    Plan,
    applicant_address,
    arrivals_by,
    in_sample,
)
from meterai.surge.records import (
    ApplicantResult,
    JobResult,
    Milestone,
    Outcome,
    RecordWriter,
    RoomSample,
    Summary,
)
from services.queue.tickets import solve

# How long one step keeps trying (retries included) before the person gives up.
STEP_BUDGET_SECONDS = 900.0
# After an answer-less failure (refused, reset, timed out), try again this much later.
TRANSPORT_RETRY_SECONDS = 1.0
BOUNDARY = "meterai-surge-boundary-7d1f"


class GaveUp(Exception):
    """A step failed for good: the person stops (and says why)."""


class Crowd:
    """What every simulated person of the run shares: the plan, the records, the counters."""

    def __init__(self, plan: Plan, writer: RecordWriter) -> None:
        self.plan = plan
        self.writer = writer
        document = Path(plan.document).read_bytes()
        self.upload_body = (
            (
                f"--{BOUNDARY}\r\n"
                'Content-Disposition: form-data; name="file"; filename="surat-pernyataan.pdf"\r\n'
                "Content-Type: application/pdf\r\n\r\n"
            ).encode()
            + document
            + f"\r\n--{BOUNDARY}--\r\n".encode()
        )
        self.applicants: list[ApplicantResult] = []
        self.jobs: list[JobResult] = []
        self.milestones: Counter[Milestone] = Counter()
        self.outcomes: Counter[Outcome] = Counter()
        self.next_applicant = itertools.count()
        self.accounts = iter(plan.distributors)
        self.distributors_done = 0
        self.gave_up_waiting = 0
        self.distributor_purchases: list[str] = []
        self.room: RoomSample | None = None
        # One pool of connections for everyone, as a load balancer in front of the gateway
        # would keep: 20,000 people need not mean 20,000 sockets on this machine. It must hold
        # every request that people have in flight at once: requests waiting for a connection
        # here would never reach the stack, and their latency would be this pool's.
        self.pool = HTTPClientPool(
            concurrency=plan.connections, network_timeout=120.0, connection_timeout=30.0
        )
        self.over = gevent.event.Event()

    def mark(self, who: str, milestone: Milestone) -> None:
        self.milestones[milestone] += 1
        self.writer.mark(time.time(), who, milestone)

    @property
    def finished(self) -> int:
        return self.milestones[Milestone.downloaded] + self.milestones[Milestone.gave_up]


def retry_after(response: FastResponse) -> float | None:
    value = response.headers.get("retry-after") if response.headers else None
    if value is None:
        return None
    try:
        return max(0.0, float(str(value)))
    except ValueError:
        return 1.0


class Person(FastHttpUser):
    """A simulated client: HTTP calls with the retries real clients make, each recorded."""

    abstract = True
    crowd: ClassVar[Crowd]
    actor: ClassVar[str]
    client_pool: HTTPClientPool | None = None  # set per run (see `run`)

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        # Headers carry the ticket and the credential: no cookie jar to keep (or parse).
        self.client.client.cookiejar = None

    def call(
        self,
        method: str,
        path: str,
        step: str,
        *,
        expect: frozenset[int],
        headers: dict[str, str] | None = None,
        data: bytes | None = None,
        json: Any = None,
        renew: Callable[[], dict[str, str]] | None = None,
    ) -> FastResponse:
        """Send until the answer is one of `expect` (or an error the caller must handle),
        waiting out refusals as real clients do. `renew` gives fresh headers after a 401."""
        crowd = self.crowd
        deadline = time.monotonic() + STEP_BUDGET_SECONDS
        while True:
            started, clock = time.time(), time.perf_counter()
            response: FastResponse = self.client.request(
                method,
                path,
                name=step,
                headers=headers,
                data=data,  # type: ignore[arg-type]  # bytes are sent as they are
                json=json,
            )
            ms = 1000 * (time.perf_counter() - clock)
            status = int(response.status_code or 0)
            wait = retry_after(response) if status in (429, 503) else None
            if status in expect:
                outcome = Outcome.ok
            elif wait is not None:
                outcome = Outcome.retried
            elif status == 0:
                outcome, wait = Outcome.transport, TRANSPORT_RETRY_SECONDS
            elif status >= 500:
                outcome, wait = Outcome.server_error, TRANSPORT_RETRY_SECONDS
            else:
                outcome = Outcome.error
            crowd.outcomes[outcome] += 1
            crowd.writer.request(started, self.actor, step, ms, status, outcome)
            if outcome is Outcome.error and status == 401 and renew is not None:
                headers = {**(headers or {}), **renew()}
                renew = None  # once, as the page does
                continue
            if wait is None:
                return response
            if time.monotonic() + wait > deadline:
                raise GaveUp(f"{step}: still {status or 'no answer'} after retrying")
            gevent.sleep(wait * (1 + 0.2 * _jitter()))

    def upload(
        self,
        step: str,
        headers: dict[str, str],
        renew: Callable[[], dict[str, str]] | None = None,
    ) -> FastResponse:
        """Upload the reference PDF (one multipart body, built once for the whole crowd); the
        same Idempotency-Key in `headers` on every retry."""
        return self.call(
            "POST",
            "/api/v1/stampings",
            step,
            expect=frozenset({202}),
            headers={**headers, "Content-Type": f"multipart/form-data; boundary={BOUNDARY}"},
            data=self.crowd.upload_body,
            renew=renew,
        )

    def idle(self) -> None:
        # A person who is done stays until the run is over (Locust would otherwise start
        # another in its place), and then does not walk through it again.
        self.crowd.over.wait()
        raise StopUser()


def _jitter() -> float:
    return (uuid.uuid4().int % 1000) / 1000


def _json(response: FastResponse) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


class Applicant(Person):
    """One applicant, from arrival to a downloaded (and perhaps verified) stamp."""

    actor = "applicant"

    @task
    def deadline_rush(self) -> None:
        crowd = self.crowd
        index = next(crowd.next_applicant)
        me = ApplicantResult(index=index, address=applicant_address(index))
        crowd.applicants.append(me)
        self.who = str(index)
        self.me = me
        self.base = {"X-Forwarded-For": me.address}
        self.admitted = False
        crowd.mark(self.who, Milestone.arrived)
        try:
            self.walk_through()
            me.done = True
        except GaveUp as exc:
            me.failure = str(exc)
            crowd.mark(self.who, Milestone.gave_up)
            crowd.gave_up_waiting += 0 if self.admitted else 1
        self.idle()

    def walk_through(self) -> None:
        crowd, plan, me = self.crowd, self.crowd.plan, self.me
        status = self.join()
        while status["state"] != "admitted":
            gevent.sleep(float(status["poll_after_seconds"]))
            status = self.poll()
        crowd.mark(self.who, Milestone.admitted)
        self.admitted = True
        self.credential = str(status["admission_token"])

        bought = _json(
            self.call(
                "POST",
                "/api/v1/purchases",
                "purchase",
                expect=frozenset({201}),
                headers=self.headers(idempotency=True),
                json={"quantity": 1},
                renew=self.renew,
            )
        )
        if "payment_reference" not in bought:
            raise GaveUp(f"purchase refused: {bought.get('code', bought)}")
        me.purchase_id, me.payment_reference = bought["id"], bought["payment_reference"]
        me.serial = bought["serials"][0]
        crowd.mark(self.who, Milestone.bought)

        charge = _json(
            self.call(
                "POST",
                f"{plan.paysim}/charges",
                "pay at the provider",
                expect=frozenset({200}),
                json={"reference": me.payment_reference, "amount": bought["amount"]},
            )
        )
        outcome = charge.get("body", {}).get("outcome")
        # "duplicate" after retries: an earlier delivery was applied and its answer lost (the
        # purchase's status, polled next, must then say paid).
        if outcome != "applied" and not (outcome == "duplicate" and charge.get("attempts", 1) > 1):
            raise GaveUp(f"payment not applied: {charge}")
        purchase = bought
        while purchase.get("status") != "paid":  # the page looks every few seconds
            gevent.sleep(plan.purchase_poll_seconds)
            purchase = self.get_json(f"/api/v1/purchases/{me.purchase_id}", "purchase status")
            if purchase.get("status") not in ("pending_payment", "paid"):
                raise GaveUp(f"purchase {purchase.get('status', purchase)}")
        crowd.mark(self.who, Milestone.paid)

        upload = self.upload("upload", self.headers(idempotency=True), renew=self.renew)
        job = _json(upload)
        if upload.status_code != 202:
            raise GaveUp(f"upload refused: {job.get('code', upload.status_code)}")
        me.job_id = job["id"]
        crowd.mark(self.who, Milestone.uploaded)
        while job["status"] not in ("done", "failed"):
            gevent.sleep(plan.job_poll_seconds)
            job = self.get_json(f"/api/v1/stampings/{me.job_id}", "stamping status")
        me.job_status = job["status"]
        if job["status"] == "failed":
            raise GaveUp(f"stamping failed: {job.get('error')}")
        crowd.mark(self.who, Milestone.stamped)

        document = self.call(
            "GET",
            f"/api/v1/stampings/{me.job_id}/document",
            "download",
            expect=frozenset({200}),
            headers=self.headers(),
            renew=self.renew,
        )
        if document.status_code != 200 or not document.content:
            raise GaveUp(f"download refused: {document.status_code}")
        me.sha256 = hashlib.sha256(document.content).hexdigest()
        crowd.mark(self.who, Milestone.downloaded)
        if me.sha256 != job.get("sha256"):
            raise GaveUp("the download is not the document the job recorded")
        if in_sample(me.index, plan.verify_fraction):
            verified = self.call(
                "POST",
                "/api/v1/verify",
                "verify",
                expect=frozenset({200}),
                headers={**self.base, "Content-Type": "application/pdf"},
                data=document.content,
            )
            me.verdict = str(_json(verified).get("verdict", verified.status_code))
            crowd.mark(self.who, Milestone.verified)
            if me.verdict != "valid":
                raise GaveUp(f"verification said {me.verdict}")

    def join(self, *, proof: str | None = None) -> dict[str, Any]:
        headers = dict(self.base)
        if proof is not None:
            headers["X-Queue-Proof"] = proof
        response = self.call(
            "POST", "/queue/join", "join", expect=frozenset({200, 428}), headers=headers
        )
        body = _json(response)
        if response.status_code == 428:  # operators ask for a proof of work
            return self.join(proof=solve(body["challenge"], int(body["difficulty"])))
        if response.status_code != 200:
            raise GaveUp(f"join refused: {body.get('code', response.status_code)}")
        self._hold(str(body["ticket"]))
        return body

    def poll(self) -> dict[str, Any]:
        response = self.call(
            "GET",
            "/queue/status",
            "queue status",
            expect=frozenset({200, 410}),
            headers={**self.base, "X-Queue-Ticket": self.ticket},
        )
        if response.status_code == 410:  # the place lapsed: back of the line, as the page does
            return self.join()
        body = _json(response)
        if response.status_code != 200:
            raise GaveUp(f"status refused: {body.get('code', response.status_code)}")
        if body.get("ticket"):
            self._hold(str(body["ticket"]))
        return body

    def _hold(self, ticket: str) -> None:
        """Keep the ticket the room gave; note its number when it is a new one (a pre-queue
        ticket has none yet)."""
        self.ticket = ticket
        kind, number, _ = ticket.split(".", 2)
        if kind == "n" and int(number) != self.me.queue_number:
            self.me.queue_number, self.me.numbered_at = int(number), time.time()

    def renew(self) -> dict[str, str]:
        """A fresh admission credential (the page asks the room once after a 401)."""
        body = self.poll()
        if body.get("state") == "admitted":
            self.credential = str(body["admission_token"])
        return {"X-Admission-Token": self.credential}

    def headers(self, *, idempotency: bool = False) -> dict[str, str]:
        headers = {**self.base, "X-Admission-Token": self.credential}
        if idempotency:
            headers["Idempotency-Key"] = str(uuid.uuid4())
        return headers

    def get_json(self, path: str, step: str) -> dict[str, Any]:
        response = self.call(
            "GET", path, step, expect=frozenset({200}), headers=self.headers(), renew=self.renew
        )
        if response.status_code != 200:
            raise GaveUp(f"{step}: {response.status_code} {_json(response).get('code', '')}")
        return _json(response)


class Distributor(Person):
    """A distributor's server: buys a batch, stamps it, downloads it; again a while later."""

    actor = "distributor"
    fixed_count = 0  # set per run

    @task
    def batches(self) -> None:
        crowd, plan = self.crowd, self.crowd.plan
        account: DistributorAccount = next(crowd.accounts)
        number = plan.distributors.index(account)
        self.auth = {
            "Authorization": f"Bearer {account.api_key}",
            # Its own server's address (TEST-NET-1), not an applicant's.
            "X-Forwarded-For": f"192.0.2.{number % 250 + 1}",
        }
        for batch in range(plan.batches):
            began = time.monotonic()
            try:
                self.batch(account)
            except GaveUp as exc:
                crowd.jobs.append(JobResult(account.name, "", failure=f"batch {batch}: {exc}"))
            if batch + 1 < plan.batches:
                gevent.sleep(max(0.0, plan.batch_interval_seconds - (time.monotonic() - began)))
        crowd.distributors_done += 1
        self.idle()

    def batch(self, account: DistributorAccount) -> None:
        crowd, plan = self.crowd, self.crowd.plan
        bought = self.call(
            "POST",
            "/api/v1/purchases",
            "distributor purchase",
            expect=frozenset({201}),
            headers={**self.auth, "Idempotency-Key": str(uuid.uuid4())},
            json={"quantity": plan.batch_size},
        )
        if bought.status_code != 201:
            raise GaveUp(f"purchase refused: {_json(bought).get('code', bought.status_code)}")
        crowd.distributor_purchases.append(str(_json(bought)["id"]))

        def stamp_one(_: int) -> None:
            headers = {**self.auth, "Idempotency-Key": str(uuid.uuid4())}
            response = self.upload("distributor upload", headers)
            body = _json(response)
            if response.status_code != 202:
                crowd.jobs.append(
                    JobResult(account.name, "", failure=f"upload refused: {body.get('code')}")
                )
                return
            result = JobResult(account.name, str(body["id"]), serial=body.get("serial"))
            crowd.jobs.append(result)
            self.finish(result)

        gevent.pool.Pool(4).map(stamp_one, range(plan.batch_size))

    def finish(self, result: JobResult) -> None:
        plan = self.crowd.plan
        job: dict[str, Any] = {"status": "queued"}
        while job.get("status") not in ("done", "failed"):
            gevent.sleep(plan.job_poll_seconds)
            response = self.call(
                "GET",
                f"/api/v1/stampings/{result.job_id}",
                "distributor stamping status",
                expect=frozenset({200}),
                headers=self.auth,
            )
            if response.status_code != 200:
                result.failure = f"status {response.status_code}"
                return
            job = _json(response)
        result.job_status = str(job["status"])
        if job["status"] != "done":
            result.failure = f"stamping failed: {job.get('error')}"
            return
        document = self.call(
            "GET",
            f"/api/v1/stampings/{result.job_id}/document",
            "distributor download",
            expect=frozenset({200}),
            headers=self.auth,
        )
        result.sha256 = hashlib.sha256(document.content or b"").hexdigest()
        if document.status_code != 200 or result.sha256 != job.get("sha256"):
            result.failure = "the download is not the document the job recorded"


class ArrivalShape(LoadTestShape):
    """The plan's arrival curve: Locust's user count is everyone who has arrived so far."""

    plan: ClassVar[Plan]

    def tick(self) -> tuple[int, float]:
        plan, elapsed = self.plan, float(self.get_run_time())  # type: ignore[no-untyped-call]
        arrived = arrivals_by(plan.curve, elapsed, plan.ramp_seconds, plan.applicants)
        upcoming = arrivals_by(plan.curve, elapsed + 1, plan.ramp_seconds, plan.applicants)
        target = len(plan.distributors) + arrived
        behind = target - int(self.get_current_user_count())  # type: ignore[no-untyped-call]
        # Fast enough for the next second's arrivals and for any that are late.
        return target, max(1.0, 1.25 * (upcoming - arrived), float(behind))


def watch_room(crowd: Crowd, environment: Environment) -> None:
    """Sample the room as operators see it, and this process's CPU, every second."""
    ops = FastHttpSession(
        crowd.plan.gateway, request_event=_NoEvents(), user=None, client_pool=crowd.pool
    )
    headers = {"Authorization": f"Bearer {crowd.plan.ops_token}"}
    while not crowd.over.is_set():
        response = ops.request("GET", "/ops/queue", headers=headers)
        runner = environment.runner
        cpu = float(runner.current_cpu_usage) if runner is not None else 0.0
        if response.status_code == 200:
            view = _json(response)
            crowd.room = RoomSample(
                time.time(),
                int(view["length"]),
                int(view["active"]),
                int(view["admitted"]),
                float(view["effective_per_minute"]),
                float(view["measured_per_minute"]),
                cpu,
            )
            crowd.writer.room_sample(crowd.room)
        gevent.sleep(1.0)


class _NoEvents:
    """The operator's sampling is not part of the load: no Locust statistics for it."""

    def fire(self, **kwargs: Any) -> None:
        return None


def progress_line(crowd: Crowd, elapsed: float, stamped_before: int, interval: float) -> str:
    m, o = crowd.milestones, crowd.outcomes
    arrived, admitted = m[Milestone.arrived], m[Milestone.admitted]
    waiting = arrived - admitted - crowd.gave_up_waiting
    errors = o[Outcome.error] + o[Outcome.server_error] + o[Outcome.transport]
    room = crowd.room
    rate = (m[Milestone.stamped] - stamped_before) / interval
    queue = f"{room.length:>7,}" if room else "      ?"
    return (
        f"[{elapsed:5.0f} s] arrived {arrived:>7,}  waiting {max(0, waiting):>7,}  "
        f"admitted {admitted:>7,}  bought {m[Milestone.bought]:>7,}  "
        f"stamped {m[Milestone.stamped]:>7,} ({rate:5.1f}/s)  "
        f"downloaded {m[Milestone.downloaded]:>7,}  queue {queue}  "
        f"retried {o[Outcome.retried]:>5,}  errors {errors:>4,}"
    )


def run(plan: Plan) -> int:
    """Run the load until every applicant and distributor is done (or the plan's time is up);
    write the records. Returns 0 (the verdict is `meterai surge`'s, after the checks)."""
    # Locust warns of spawn rates above 100/s, which a deadline rush needs.
    logging.getLogger("locust").setLevel(logging.ERROR)
    out = Path(plan.out_dir)
    writer = RecordWriter(out)
    crowd = Crowd(plan, writer)
    Person.crowd = crowd
    Person.client_pool = crowd.pool
    Distributor.fixed_count = len(plan.distributors)
    ArrivalShape.plan = plan
    user_classes: list[type[User]] = [Applicant]
    if plan.distributors:
        user_classes.insert(0, Distributor)
    environment = Environment(
        user_classes=user_classes,
        shape_class=ArrivalShape(),  # type: ignore[no-untyped-call]
        host=plan.gateway,
    )
    runner = environment.create_local_runner()
    summary = Summary(
        started=time.time(), applicants=plan.applicants, verify_fraction=plan.verify_fraction
    )
    runner.start_shape()
    watcher = gevent.spawn(watch_room, crowd, environment)
    deadline = time.monotonic() + plan.max_seconds
    last_print, stamped_before = time.monotonic(), 0
    while True:
        gevent.sleep(0.5)
        now = time.monotonic()
        if not summary.ramp_ended and crowd.milestones[Milestone.arrived] >= plan.applicants:
            summary.ramp_ended = time.time()
        if now - last_print >= plan.progress_seconds:
            elapsed = time.time() - summary.started
            print(progress_line(crowd, elapsed, stamped_before, now - last_print), flush=True)
            last_print, stamped_before = now, crowd.milestones[Milestone.stamped]
        everyone = crowd.finished >= plan.applicants
        if everyone and crowd.distributors_done >= len(plan.distributors):
            break
        if now > deadline:
            summary.timed_out = True
            break
    print(progress_line(crowd, time.time() - summary.started, stamped_before, 1.0))
    summary.ended = time.time()
    summary.finished = crowd.finished
    summary.distributor_purchases = list(crowd.distributor_purchases)
    summary.load_cpu_saturated = bool(runner.cpu_warning_emitted)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    summary.cpu_seconds = usage.ru_utime + usage.ru_stime
    runner.quit()
    crowd.over.set()
    watcher.kill()
    for applicant in crowd.applicants:
        if not applicant.done and applicant.failure is None:
            applicant.failure = "unfinished when the run ended"
    writer.write(crowd.applicants, crowd.jobs, summary)
    crowd.pool.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m meterai.surge.load PLAN.json", file=sys.stderr)
        return 2
    return run(Plan.read(Path(args[0])))


if __name__ == "__main__":
    raise SystemExit(main())

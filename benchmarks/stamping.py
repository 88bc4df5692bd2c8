"""Stamps per second: our signer in one process next to pyHanko as its documentation shows it,
then jobs per second through the whole stack (gateway, Kafka, signing workers) with one and
with two signing workers.

    python -m benchmarks.stamping [--part signer|stack|both] [--seconds 2] [--rounds 5]
                                  [--tsa] [--jobs 400] [--repeat 1] [--set NAME=VALUE]

Both parts stamp the same reference document, generated here: A4, four pages of text and a
photo-like image, about 800 KB, like a CPNS upload.

Part one signs in this process, one stamp at a time, exactly as a worker calls the signer
(the page and box resolved at upload; reading the document under the CPU budget, placing,
stamping, signing RSA-2048, PAdES B-B). Rounds alternate between our signer and pyHanko's
documented way (``SimpleSigner.load`` and ``PdfSigner(..., stamp_style=QRStampStyle(...))``
with a visible QR stamp in the same box), so both see the same machine load. ``--tsa`` adds a
PAdES B-T figure with a local timestamp authority (tests/tsa.py) on the same cores.

Part two runs `meterai up` with 1, then 2 signing workers, pauses the workers (SIGSTOP),
uploads ``--jobs`` copies through the gateway, resumes them and times the drain from the
workers' own counters: jobs finished per second from when every worker has finished one (the
paused workers have to rejoin the consumer group first) until 90% of the batch is done. It
also reports the CPU each job costs in the workers and in the rest of the stack, and how busy
the machine was outside the stack meanwhile: on a 2-core machine the API, relay, inventory,
PostgreSQL and the broker share the cores with the workers, and so does anything else running.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import asyncpg
import httpx
import psutil
from pyhanko.pdf_utils import generic
from pyhanko.pdf_utils.font.basic import get_courier
from pyhanko.pdf_utils.generic import pdf_name
from pyhanko.pdf_utils.incremental_writer import IncrementalPdfFileWriter
from pyhanko.pdf_utils.writer import PageObject, PdfFileWriter
from pyhanko.sign import fields, signers
from pyhanko.stamp import QRStampStyle

from benchmarks.common import meterai_up
from services.stamping.config import StampingSettings
from services.stamping.keys import SigningKeyPaths, create_development_keys
from services.stamping.signing import StampRequest, StampSigner, inspect_document

A4 = (595.28, 841.89)
BASE_URL = "http://127.0.0.1:8000"
_WORDS = (
    "surat pernyataan bersedia ditempatkan di seluruh wilayah negara kesatuan republik "
    "indonesia saya yang bertanda tangan di bawah ini menyatakan dengan sesungguhnya bahwa "
    "data yang saya sampaikan adalah benar dan apabila di kemudian hari terbukti tidak benar"
).split()


# --- The reference document ----------------------------------------------------------------


def reference_document(pages: int = 4, seed: int = 2024) -> bytes:
    """A4 pages of text in Courier and, on the first page, a 480x560 RGB image (deflated
    noise over a gradient, so that it stays about 780 KB as a scan or a photo would)."""
    rng = random.Random(seed)  # noqa: S311 - test data, not secrets
    writer = PdfFileWriter(stream_xrefs=False)
    font = writer.add_object(get_courier(writer))
    width, height = 480, 560
    pixels = b"".join(
        bytes(
            (noise >> 2) + ((x // 3 + y) % 160) for x, noise in enumerate(rng.randbytes(3 * width))
        )
        for y in range(height)
    )
    image = generic.StreamObject(
        {
            pdf_name("/Type"): pdf_name("/XObject"),
            pdf_name("/Subtype"): pdf_name("/Image"),
            pdf_name("/Width"): generic.NumberObject(width),
            pdf_name("/Height"): generic.NumberObject(height),
            pdf_name("/ColorSpace"): pdf_name("/DeviceRGB"),
            pdf_name("/BitsPerComponent"): generic.NumberObject(8),
        },
        stream_data=pixels,
    )
    image.compress()
    image_ref = writer.add_object(image)
    for number in range(pages):
        resources = generic.DictionaryObject(
            {pdf_name("/Font"): generic.DictionaryObject({pdf_name("/F1"): font})}
        )
        lines = 20 if number == 0 else 60
        ops = [b"BT /F1 10 Tf 12 TL 56 790 Td"]
        ops += [
            b"(%s) '" % " ".join(rng.choice(_WORDS) for _ in range(11)).encode()
            for _ in range(lines)
        ]
        ops.append(b"ET")
        if number == 0:
            resources[pdf_name("/XObject")] = generic.DictionaryObject(
                {pdf_name("/Im1"): image_ref}
            )
            ops.append(b"q 288 0 0 336 154 120 cm /Im1 Do Q")
        contents = generic.StreamObject(stream_data=b"\n".join(ops))
        contents.compress()
        writer.insert_page(
            PageObject(
                contents=writer.add_object(contents), media_box=(0, 0, *A4), resources=resources
            )
        )
    out = BytesIO()
    writer.write(out)
    return out.getvalue()


def serial_for(number: int) -> str:
    return f"BENCH{number:017d}"


# --- Part one: signing in one process ------------------------------------------------------


@dataclass
class Rate:
    stamps: int
    seconds: float
    cpu_seconds: float

    @property
    def per_second(self) -> float:
        return self.stamps / self.seconds

    @property
    def per_cpu_second(self) -> float:
        """Stamps per second of this process's CPU time: what a core to itself would do."""
        return self.stamps / self.cpu_seconds


def timed(stamp: Callable[[int], bytes], seconds: float, minimum: int, start: int) -> Rate:
    """Stamp for about ``seconds`` (at least ``minimum`` stamps), serials from ``start``."""
    count, began, cpu = 0, time.perf_counter(), time.process_time()
    while count < minimum or time.perf_counter() - began < seconds:
        stamp(start + count)
        count += 1
    return Rate(count, time.perf_counter() - began, time.process_time() - cpu)


def our_signer(keys: SigningKeyPaths, document: bytes, tsa_url: str = "") -> Callable[[int], bytes]:
    """The worker's path: StampSigner built once, page and box as resolved at upload."""
    signer = StampSigner.from_pem_files(
        keys.signer_key, keys.signer_cert, [keys.ca_cert], tsa_url=tsa_url
    )
    page_index, box = inspect_document(document, None, None)
    budget = StampingSettings().document_cpu_budget_seconds

    def stamp(number: int) -> bytes:
        serial = serial_for(number)
        request = StampRequest(serial, f"{BASE_URL}/verify/{serial}", page=page_index + 1, box=box)
        return signer.stamp(document, request, cpu_budget_seconds=budget)

    return stamp


def documented_pyhanko(keys: SigningKeyPaths, document: bytes) -> Callable[[int], bytes]:
    """pyHanko as its documentation shows it: SimpleSigner.load, a PdfSigner with a QR stamp
    style, sign_pdf on an IncrementalPdfFileWriter; the same page and box as ours."""
    signer = signers.SimpleSigner.load(
        str(keys.signer_key), str(keys.signer_cert), ca_chain_files=(str(keys.ca_cert),)
    )
    if signer is None:
        raise RuntimeError("pyHanko could not load the development key")
    page_index, box = inspect_document(document, None, None)

    def stamp(number: int) -> bytes:
        serial = serial_for(number)
        field_name = f"eMeterai-{serial}"
        pdf_signer = signers.PdfSigner(
            signers.PdfSignatureMetadata(
                field_name=field_name,
                subfilter=fields.SigSeedSubFilter.PADES,
                md_algorithm="sha256",
            ),
            signer=signer,
            stamp_style=QRStampStyle(stamp_text="e-Meterai\n%(serial)s"),
            new_field_spec=fields.SigFieldSpec(
                sig_field_name=field_name,
                on_page=page_index,
                box=(box.llx, box.lly, box.urx, box.ury),  # type: ignore[arg-type]
            ),
        )
        out = pdf_signer.sign_pdf(
            IncrementalPdfFileWriter(BytesIO(document)),
            appearance_text_params={"url": f"{BASE_URL}/verify/{serial}", "serial": serial},
        )
        return bytes(out.getvalue())

    return stamp


def pdfsig_verdict(pdf: bytes) -> str:
    tool = shutil.which("pdfsig")
    if tool is None:
        return "pdfsig not installed"
    with tempfile.NamedTemporaryFile(suffix=".pdf") as file:
        file.write(pdf)
        file.flush()
        report = subprocess.run([tool, file.name], capture_output=True, text=True).stdout
    valid = "Signature is Valid." in report and "Total document signed" in report
    return "valid, total document signed" if valid else "NOT VALID:\n" + report


def signer_part(
    document: bytes, keys: SigningKeyPaths, seconds: float, rounds: int, tsa: bool
) -> None:
    ours, theirs = our_signer(keys, document), documented_pyhanko(keys, document)
    for stamp in (ours, theirs):  # warm-up: imports, caches, the reused CMS container
        for number in range(3):
            stamp(number)
    print(f"\nSigning in one process: {len(document) / 1000:,.0f} KB, RSA-2048, visible QR stamp")
    print("  stamps/s by the wall clock, and [per second of this process's CPU time]")
    mine_all, theirs_all = [], []
    serial = 10
    for round_number in range(1, rounds + 1):
        mine = timed(ours, seconds, 20, serial)
        serial += mine.stamps
        documented = timed(theirs, seconds, 5, serial)
        serial += documented.stamps
        mine_all.append(mine)
        theirs_all.append(documented)
        print(
            f"  round {round_number}: StampSigner {mine.per_second:6.1f}"
            f" [{mine.per_cpu_second:6.1f}] ({1000 / mine.per_second:5.2f} ms)"
            f"   pyHanko as documented {documented.per_second:5.1f}"
            f" [{documented.per_cpu_second:5.1f}] ({1000 / documented.per_second:6.1f} ms)"
            f"   x{mine.per_second / documented.per_second:.1f}"
            f" [x{mine.per_cpu_second / documented.per_cpu_second:.1f}]"
        )
    wall = statistics.median(rate.per_second for rate in mine_all)
    cpu = statistics.median(rate.per_cpu_second for rate in mine_all)
    ratio = statistics.median(
        m.per_second / t.per_second for m, t in zip(mine_all, theirs_all, strict=True)
    )
    cpu_ratio = statistics.median(
        m.per_cpu_second / t.per_cpu_second for m, t in zip(mine_all, theirs_all, strict=True)
    )
    print(
        f"  median:  StampSigner {wall:.1f} [{cpu:.1f}] stamps/s (goal >= 150),"
        f" x{ratio:.1f} [x{cpu_ratio:.1f}] pyHanko's (goal >= 15)"
    )
    print(f"  pdfsig on our output: {pdfsig_verdict(ours(serial))}")
    if tsa:
        from tests.tsa import local_tsa

        with local_tsa() as authority:
            timestamped = our_signer(keys, document, tsa_url=authority.url)
            for number in range(3):
                timestamped(serial + number)
            rate = timed(timestamped, seconds, 10, serial + 3)
        print(
            f"  PAdES B-T, local TSA in this process: {rate.per_second:6.1f} stamps/s"
            f" ({1000 / rate.per_second:5.2f} ms; the TSA's own work included)"
        )


# --- Part two: the whole stack -------------------------------------------------------------


@dataclass
class Drain:
    workers: int
    jobs: int
    failed: int
    upload_seconds: float
    rate: float
    """Jobs finished per second from when every worker had finished one until 90% were."""
    wall_seconds: float  # resume to last finished
    worker_cpu_ms: float  # per job, in the signing worker processes
    other_cpu_ms: float  # per job, everything else in the stack
    outside_cores: float  # CPU used meanwhile by processes outside the stack, in cores

    @property
    def total_cpu_ms(self) -> float:
        return self.worker_cpu_ms + self.other_cpu_ms


def _processes(up_pid: int) -> tuple[list[psutil.Process], list[psutil.Process]]:
    """The stack's worker processes and all its other processes."""
    children = psutil.Process(up_pid).children(recursive=True)
    workers = [p for p in children if "services.stamping.worker:create_worker_app" in p.cmdline()]
    return workers, [p for p in children if p not in workers]


def _cpu_seconds(processes: list[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def _machine_cpu_seconds() -> float:
    times = psutil.cpu_times()
    return float(sum(times) - times.idle - getattr(times, "iowait", 0.0))


async def _upload_all(
    gateway: str, api_key: str, document: bytes, jobs: int, concurrency: int = 8
) -> None:
    pending = iter(range(jobs))
    headers = {"Authorization": f"Bearer {api_key}"}

    async def uploader(client: httpx.AsyncClient) -> None:
        for number in pending:
            response = await client.post(
                "/api/v1/stampings",
                files={"file": (f"cpns-{number}.pdf", document, "application/pdf")},
            )
            if response.status_code != 202:
                raise RuntimeError(f"upload refused: {response.status_code} {response.text}")

    async with httpx.AsyncClient(base_url=gateway, headers=headers, timeout=60) as client:
        await asyncio.gather(*(uploader(client) for _ in range(concurrency)))


_FINISHED = re.compile(
    r'^meterai_signer_jobs_total\{outcome="(?:done|failed)"\} ([0-9.e+]+)$', re.M
)


async def _watch(worker_urls: list[str], jobs: int, within: float) -> list[tuple[float, list[int]]]:
    """Sample each worker's finished-jobs counter (its /metrics) until all jobs are finished:
    (monotonic time, counts per worker)."""
    samples: list[tuple[float, list[int]]] = []
    deadline = time.monotonic() + within
    async with httpx.AsyncClient(timeout=5) as client:
        while not samples or sum(samples[-1][1]) < jobs:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{jobs - sum(samples[-1][1])} jobs still unfinished")
            await asyncio.sleep(0.05)
            counts = []
            for url in worker_urls:
                metrics = (await client.get(f"{url}/metrics")).text
                counts.append(int(sum(float(value) for value in _FINISHED.findall(metrics))))
            samples.append((time.monotonic(), counts))
    return samples


def _steady_rate(samples: list[tuple[float, list[int]]], jobs: int) -> float:
    """Jobs/s from the first sample where every worker has finished a job (the consumer
    group has settled: after pausing, the workers rejoin it) to the one where 90% are."""
    start = next(i for i, (_, counts) in enumerate(samples) if min(counts) > 0)
    end = next(i for i, (_, counts) in enumerate(samples) if sum(counts) >= 0.9 * jobs)
    if end <= start:
        raise RuntimeError("the batch was over before every worker took part: use more --jobs")
    (began, first), (ended, last) = samples[start], samples[end]
    return (sum(last) - sum(first)) / (ended - began)


async def _failed(database_url: str) -> int:
    connection = await asyncpg.connect(database_url)
    try:
        count: int = await connection.fetchval(
            "SELECT count(*) FROM stamping_jobs WHERE status = 'failed'"
        )
        return count
    finally:
        await connection.close()


def drain(document: bytes, workers: int, jobs: int, settings: dict[str, str]) -> Drain:
    """Upload ``jobs`` copies with the workers paused, then time how the workers drain them."""
    with meterai_up(workers=workers, settings=settings) as stack:
        info = json.loads((stack.data_dir / "stack.json").read_text())
        created = stack.meterai("distributor", "create", "bench", "--balance", str(jobs * 10_000))
        api_key = re.search(r"api key:\s+(\S+)", created).group(1)  # type: ignore[union-attr]
        stack.meterai("serials", "mint", str(jobs))
        bought = httpx.post(
            f"{stack.gateway}/api/v1/purchases",
            json={"quantity": jobs},
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=60,
        )
        bought.raise_for_status()
        signing, others = _processes(info["pid"])
        if len(signing) != workers:
            raise RuntimeError(f"expected {workers} worker processes, found {len(signing)}")
        # `meterai up` gives worker N the port 10 + N - 1 above the gateway's.
        gateway_port = int(stack.gateway.rsplit(":", 1)[1])
        worker_urls = [f"http://127.0.0.1:{gateway_port + 10 + n}" for n in range(workers)]
        for process in signing:
            process.send_signal(signal.SIGSTOP)
        try:
            began = time.monotonic()
            asyncio.run(_upload_all(stack.gateway, api_key, document, jobs))
            upload_seconds = time.monotonic() - began
            time.sleep(1)  # the relay publishes the last requests
        finally:
            worker_cpu, other_cpu = _cpu_seconds(signing), _cpu_seconds(others)
            machine_cpu, resumed = _machine_cpu_seconds(), time.monotonic()
            for process in signing:
                process.send_signal(signal.SIGCONT)
        samples = asyncio.run(_watch(worker_urls, jobs, within=600))
        ended = samples[-1][0]
        worker_cpu = _cpu_seconds(signing) - worker_cpu
        other_cpu = _cpu_seconds(others) - other_cpu
        machine_cpu = _machine_cpu_seconds() - machine_cpu
        return Drain(
            workers=workers,
            jobs=jobs,
            failed=asyncio.run(_failed(info["env"]["METERAI_STAMPING_DATABASE_URL"])),
            upload_seconds=upload_seconds,
            rate=_steady_rate(samples, jobs),
            wall_seconds=ended - resumed,
            worker_cpu_ms=1000 * worker_cpu / jobs,
            other_cpu_ms=1000 * other_cpu / jobs,
            # This process's own polling counts as outside: a few percent of a core.
            outside_cores=(machine_cpu - worker_cpu - other_cpu) / (ended - resumed),
        )


def stack_part(document: bytes, jobs: int, settings: dict[str, str], repeat: int) -> None:
    print(f"\nThrough the stack: {jobs} uploads with the workers paused, then drained")
    ratios = []
    for run in range(1, repeat + 1):
        one, two = (drain(document, workers, jobs, settings) for workers in (1, 2))
        for result in (one, two):
            print(
                f"  {result.workers} worker{'s' if result.workers > 1 else ' '}:"
                f" {result.rate:6.1f} jobs/s   (resume to last {result.wall_seconds:4.1f} s;"
                f" uploads {jobs / result.upload_seconds:5.1f}/s; CPU per job: workers"
                f" {result.worker_cpu_ms:4.1f} ms, rest of the stack {result.other_cpu_ms:3.1f} ms;"
                f" busy outside the stack: {result.outside_cores:3.1f} cores)"
                + (f"   FAILED {result.failed}" if result.failed else "")
            )
        ratios.append(two.rate / one.rate)
        # What the CPU per job allows on otherwise idle cores: a worker is one process (one
        # core at most, as the GIL has it), and the rest of the stack needs its share.
        cores = psutil.cpu_count() or 1
        one_bound = min(1000 / one.worker_cpu_ms, 1000 * cores / one.total_cpu_ms)
        two_bound = min(2000 / two.worker_cpu_ms, 1000 * cores / two.total_cpu_ms)
        print(
            f"  run {run}: 2 workers / 1 worker x{ratios[-1]:.2f} (goal >= 1.8); at these CPU"
            f" costs {cores} idle cores would allow {one_bound:.0f} and {two_bound:.0f} jobs/s,"
            f" x{two_bound / one_bound:.2f}"
        )
    if repeat > 1:
        print(f"  median 2 workers / 1 worker: x{statistics.median(ratios):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("signer", "stack", "both"), default="both")
    parser.add_argument("--seconds", type=float, default=2.0, help="per round and signer")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=400, help="uploads per stack run")
    parser.add_argument("--repeat", type=int, default=1, help="stack runs (1 and 2 workers)")
    parser.add_argument("--tsa", action="store_true", help="also PAdES B-T with a local TSA")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting for the stack, e.g. METERAI_STAMPING_WORKER_CONCURRENCY=4",
    )
    args = parser.parse_args()

    document = reference_document()
    print(f"reference document: {len(document):,} bytes")
    with tempfile.TemporaryDirectory() as scratch:
        keys = create_development_keys(Path(scratch))
        if args.part in ("signer", "both"):
            signer_part(document, keys, args.seconds, args.rounds, args.tsa)
    if args.part in ("stack", "both"):
        settings = dict(item.split("=", 1) for item in args.set)
        stack_part(document, args.jobs, settings, args.repeat)


if __name__ == "__main__":
    main()

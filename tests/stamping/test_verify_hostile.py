"""The hostile documents of `tests/stamping/hostile.py`, checked by the verifier directly: each
gets an answer or a DocumentRejected with a stable code at a bounded cost, never a crash; the
odd documents we stamp (hybrid references, an author's signature, many revisions) verify."""

from __future__ import annotations

import asyncio
import time

import pytest

from services.stamping.documents import DocumentRejected
from services.stamping.signing import StampRequest, StampSigner
from services.stamping.verification import StampVerifier, Verdict, load_trust_roots
from tests.harness import Infrastructure
from tests.stamping.hostile import CASES, HostileCase, Materials, Stamped

CPU_BUDGET = 1.5
SERIAL = "HOSTILEVERIFY000000001"
CODES = {"invalid_pdf", "encrypted_pdf", "too_complex"}


@pytest.fixture(scope="module")
def verifier(infra: Infrastructure) -> StampVerifier:
    return StampVerifier(load_trust_roots([infra.keys.ca_cert]))


@pytest.fixture(scope="module")
def signer(infra: Infrastructure) -> StampSigner:
    keys = infra.keys
    return StampSigner.from_pem_files(keys.signer_key, keys.signer_cert, [keys.ca_cert])


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
async def test_every_hostile_document_gets_an_answer_at_a_bounded_cost(
    case: HostileCase, infra: Infrastructure, verifier: StampVerifier, signer: StampSigner
) -> None:
    kit = Materials(keys=infra.keys, serial=SERIAL, max_upload_bytes=20 * 1024 * 1024)
    document = await asyncio.to_thread(case.build, kit)
    started = time.monotonic()
    try:
        check = await asyncio.to_thread(verifier.check, document, cpu_budget_seconds=CPU_BUDGET)
    except DocumentRejected as rejection:
        assert rejection.code in CODES, rejection
    else:
        # Whatever it holds, it is not a valid stamp of ours (only `stamped-by-us` has one).
        assert check.verdict in (Verdict.not_stamped, Verdict.valid), check
    assert time.monotonic() - started < CPU_BUDGET + 5
    if not isinstance(case.expect, Stamped):
        return
    # What we stamp verifies.
    stamped = await asyncio.to_thread(
        signer.stamp,
        document,
        StampRequest(serial="HOSTILEVERIFY000000002", verify_url="http://x"),
    )
    check = await asyncio.to_thread(verifier.check, stamped, cpu_budget_seconds=CPU_BUDGET)
    assert check.verdict is Verdict.valid, check

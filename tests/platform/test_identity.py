"""Principal tokens: signed by the gateway, verified by services, refused when anything is off."""

from __future__ import annotations

import base64
import json
import time

import jwt
import pytest
from fastapi import APIRouter, FastAPI

from services.platform.errors import Unauthorized
from services.platform.identity import (
    PRINCIPAL_HEADER,
    CallingService,
    CurrentPrincipal,
    Principal,
    PrincipalCodec,
    PrincipalKind,
)
from tests.platform.apps import INTERNAL_SECRET, asgi_client, assert_problem, service_app

OTHER_SECRET = "another-internal-secret-that-is-long-enough-42"
DISTRIBUTOR = Principal(PrincipalKind.distributor, "dist-42")


def test_a_token_round_trips_every_kind() -> None:
    codec = PrincipalCodec(INTERNAL_SECRET)
    for kind in PrincipalKind:
        principal = Principal(kind, f"{kind.value}-subject")
        assert codec.decode(codec.encode(principal)) == principal
    assert DISTRIBUTOR.owner_key == "distributor:dist-42"


def test_a_token_lives_for_its_ttl() -> None:
    token = PrincipalCodec(INTERNAL_SECRET, ttl_seconds=300).encode(DISTRIBUTOR)
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == 300
    assert abs(claims["iat"] - time.time()) < 5
    assert claims["aud"] == "meterai-internal"


def test_an_expired_token_is_refused() -> None:
    token = PrincipalCodec(INTERNAL_SECRET, ttl_seconds=-1).encode(DISTRIBUTOR)
    with pytest.raises(Unauthorized) as raised:
        PrincipalCodec(INTERNAL_SECRET).decode(token)
    assert isinstance(raised.value.__cause__, jwt.ExpiredSignatureError)


def test_a_token_signed_with_another_secret_is_refused() -> None:
    token = PrincipalCodec(OTHER_SECRET).encode(DISTRIBUTOR)
    with pytest.raises(Unauthorized) as raised:
        PrincipalCodec(INTERNAL_SECRET).decode(token)
    assert isinstance(raised.value.__cause__, jwt.InvalidSignatureError)


def test_a_tampered_token_is_refused() -> None:
    codec = PrincipalCodec(INTERNAL_SECRET)
    header, payload, signature = codec.encode(DISTRIBUTOR).split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["kind"] = "operator"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    with pytest.raises(Unauthorized):
        codec.decode(f"{header}.{forged}.{signature}")
    with pytest.raises(Unauthorized):
        codec.decode(f"{header}.{payload}.{signature[:-4]}AAAA")


def test_a_token_for_another_audience_is_refused() -> None:
    now = int(time.time())
    claims = {"kind": "service", "sub": "x", "aud": "someone-else", "iat": now, "exp": now + 60}
    token = jwt.encode(claims, INTERNAL_SECRET, algorithm="HS256")
    with pytest.raises(Unauthorized) as raised:
        PrincipalCodec(INTERNAL_SECRET).decode(token)
    assert isinstance(raised.value.__cause__, jwt.InvalidAudienceError)


@pytest.mark.parametrize(
    "claims",
    [
        {"kind": "service", "sub": "x", "aud": "meterai-internal"},  # no exp
        {"sub": "x", "aud": "meterai-internal", "exp": 2**40},  # no kind
        {"kind": "emperor", "sub": "x", "aud": "meterai-internal", "exp": 2**40},
    ],
)
def test_a_token_missing_claims_or_with_an_unknown_kind_is_refused(
    claims: dict[str, object],
) -> None:
    token = jwt.encode(claims, INTERNAL_SECRET, algorithm="HS256")
    with pytest.raises(Unauthorized):
        PrincipalCodec(INTERNAL_SECRET).decode(token)


def test_a_token_with_alg_none_is_refused() -> None:
    claims = {"kind": "operator", "sub": "x", "aud": "meterai-internal", "exp": 2**40}
    token = jwt.encode(claims, key="", algorithm="none")
    with pytest.raises(Unauthorized):
        PrincipalCodec(INTERNAL_SECRET).decode(token)


router = APIRouter()


@router.get("/me")
async def me(principal: CurrentPrincipal) -> dict[str, str]:
    return {"owner": principal.owner_key}


@router.get("/internal")
async def internal(caller: CallingService) -> dict[str, str]:
    return {"service": caller.subject}


@pytest.fixture(scope="module")
def app() -> FastAPI:
    return service_app("ptidentity", [router])


async def test_the_principal_dependencies_verify_the_header(app: FastAPI) -> None:
    codec = PrincipalCodec(INTERNAL_SECRET)
    service = Principal(PrincipalKind.service, "stamping")
    async with asgi_client(app) as client:
        missing = await client.get("/me")
        forged = await client.get(
            "/me", headers={PRINCIPAL_HEADER: PrincipalCodec(OTHER_SECRET).encode(DISTRIBUTOR)}
        )
        ok = await client.get("/me", headers={PRINCIPAL_HEADER: codec.encode(DISTRIBUTOR)})
        not_a_service = await client.get(
            "/internal", headers={PRINCIPAL_HEADER: codec.encode(DISTRIBUTOR)}
        )
        a_service = await client.get("/internal", headers={PRINCIPAL_HEADER: codec.encode(service)})
    assert_problem(missing, 401, "unauthorized")
    assert missing.headers["www-authenticate"].startswith("Bearer")
    assert_problem(forged, 401, "unauthorized")
    assert ok.status_code == 200 and ok.json() == {"owner": "distributor:dist-42"}
    assert_problem(not_a_service, 403, "forbidden")
    assert a_service.status_code == 200 and a_service.json() == {"service": "stamping"}

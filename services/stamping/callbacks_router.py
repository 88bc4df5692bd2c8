"""What a caller needs to check the callbacks it receives: its own signing secret."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from services.platform import signatures
from services.platform.identity import CurrentPrincipal
from services.stamping.callbacks import EVENT_ID_HEADER, owner_secret
from services.stamping.config import StampingSettings

router = APIRouter(tags=["callbacks"])


class CallbackSecretOut(BaseModel):
    secret: str = Field(description="The HMAC-SHA256 key of your callbacks' signatures.")
    signature_header: str = signatures.SIGNATURE_HEADER
    signature_format: str = Field(
        'Header value `t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<raw body>">`; refuse '
        "signatures older than a few minutes.",
    )
    event_id_header: str = Field(
        EVENT_ID_HEADER, description="The same on every attempt: deduplicate on it."
    )


@router.get(
    "/api/v1/callbacks/secret",
    response_model=CallbackSecretOut,
    summary="Your callbacks' signing secret",
)
async def callback_secret(request: Request, principal: CurrentPrincipal) -> CallbackSecretOut:
    """The secret that signs the callbacks of your jobs (yours alone: no other caller can sign
    a callback that verifies with it). It changes only if operators rotate the service's
    callback secret."""
    settings: StampingSettings = request.app.state.settings
    secret = owner_secret(settings.callback_secret.get_secret_value(), principal.owner_key)
    return CallbackSecretOut(secret=secret)

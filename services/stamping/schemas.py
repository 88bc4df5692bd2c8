"""Response bodies of the stamping API."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

from services.stamping.models import JobStatus
from services.stamping.verification import Verdict

STAMP_DUTY_RUPIAH = 10_000
"""The face value of every e-meterai (PMK 133/2021: one price)."""


class StampingError(BaseModel):
    code: str
    detail: str | None


class Box(BaseModel):
    llx: float
    lly: float
    urx: float
    ury: float


class StampingOut(BaseModel):
    id: uuid.UUID
    status: JobStatus
    serial: str = Field(examples=["2C5NV74I6D0HJ1EZ000DU9"])
    page: int = Field(description="1-based page the stamp is on.")
    box: Box
    error: StampingError | None = None
    sha256: str | None = Field(None, description="SHA-256 of the stamped document.")
    input_sha256: str
    document_url: str | None = Field(None, description="Where to download the stamped PDF.")
    created_at: datetime
    finished_at: datetime | None = None


STAMPING_FORM_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary", "description": "The PDF."},
                        "serial": {
                            "type": "string",
                            "pattern": "^[0-9A-Z]{22}$",
                            "description": "One of your unused serials (default: any).",
                        },
                        "page": {
                            "type": "integer",
                            "minimum": 1,
                            "description": "1-based page (default: the last page).",
                        },
                        "llx": {"type": "number"},
                        "lly": {"type": "number"},
                        "urx": {"type": "number"},
                        "ury": {"type": "number"},
                        "box": {
                            "type": "string",
                            "description": "Alternative to the four fields: `llx,lly,urx,ury`.",
                        },
                        "callback_url": {"type": "string", "format": "uri"},
                    },
                }
            }
        },
    }
}


class Tariff(BaseModel):
    amount: int = Field(STAMP_DUTY_RUPIAH, description="The stamp duty paid, in rupiah.")
    currency: Literal["IDR"] = "IDR"


class SerialStatus(BaseModel):
    """What the public may know about a serial: whether and when it was affixed, and to which
    document (its SHA-256)."""

    serial: str = Field(examples=["2C5NV74I6D0HJ1EZ000DU9"])
    state: Literal["stamped", "pending"] = Field(
        description="`stamped`, or `pending` while the stamp is being affixed."
    )
    stamped_at: datetime | None = None
    sha256: str | None = Field(None, description="SHA-256 of the stamped document.")
    tariff: Tariff = Field(default_factory=Tariff)


class StampRecord(BaseModel):
    """What our records say about a stamp's serial, and whether the document agrees."""

    state: Literal["stamped", "pending", "unknown"]
    stamped_at: datetime | None = None
    sha256: str | None = Field(None, description="SHA-256 of the document we stamped.")
    matches: bool = Field(
        description="The signature's revision of the uploaded document is exactly the "
        "document we stamped with this serial."
    )


class StampVerification(BaseModel):
    """One e-meterai signature of an uploaded document."""

    serial: str | None
    verdict: Verdict
    signed_at: datetime | None = Field(
        description="The timestamp token's time if trusted, else the time the signer recorded."
    )
    timestamped: bool
    intact: bool = Field(
        description="The signature is cryptographically sound and the bytes it signs are unchanged."
    )
    trusted: bool = Field(description="Signed by a certificate issued by our trust roots.")
    signer: str | None
    coverage: str = Field(
        description="`entire_file`, `entire_revision` (something was added "
        "after it), `contiguous_block_from_start` or `unclear`."
    )
    modification_level: str | None = Field(
        description="pyHanko's assessment of what was added after it: `none`, `lta_updates`, "
        "`form_filling`, `annotations` or `other`."
    )
    changed_after_stamping: bool
    signed_revision_sha256: str | None = Field(
        description="SHA-256 of the document as this signature signed it."
    )
    field_name: str
    record: StampRecord | None
    problem: str | None = None


class VerificationOut(BaseModel):
    """Is the uploaded document's e-meterai valid? `verdict` is its worst stamp's."""

    valid: bool = Field(
        description="Stamped by us, intact, unchanged after stamping, and as our records say."
    )
    verdict: Verdict
    detail: str
    sha256: str = Field(description="SHA-256 of the uploaded document.")
    serial: str | None = Field(description="The serial of the stamp the verdict is about.")
    signed_at: datetime | None
    changed_after_stamping: bool | None
    tariff: Tariff | None
    stamps: list[StampVerification]
    other_signatures: int = Field(
        description="Signatures that are not e-meterai (an author's own, document timestamps)."
    )

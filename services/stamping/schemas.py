"""Response bodies of the stamping API."""

from __future__ import annotations

import uuid
from datetime import datetime

from pydantic import BaseModel, Field

from services.stamping.models import JobStatus


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

"""One OpenAPI document for the whole public API, merged from the services' own documents.

Each service stays the source of truth for its schemas; the gateway keeps only the operations
of its route table and adds how callers authenticate.
"""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import httpx

from services.gateway.routes import ROUTES, Access, Upstream
from services.platform.app import VERSION

DESCRIPTION = """\
Meterai sells and affixes Indonesian e-meterai (electronic duty stamps, Rp 10,000 each).

* **Distributors** authenticate with `Authorization: Bearer <api key>` (keys come from
  `meterai distributor create`).
* **Applicants** pass the waiting room (`/queue/join`, `/queue/status`) first.
* **Operators** use `Authorization: Bearer <ops token>` on `/ops/...`.

Errors are RFC 9457 `application/problem+json` documents with a stable `code`. Creating POSTs
accept an `Idempotency-Key` header.
"""

_SECURITY: dict[Access, list[dict[str, list[str]]]] = {
    Access.distributor: [{"distributorKey": []}],
    Access.customer: [{"distributorKey": []}, {"admissionToken": []}],
    Access.operator: [{"opsToken": []}],
    Access.public: [],
}


async def fetch_documents(upstreams: dict[Upstream, httpx.AsyncClient]) -> dict[Upstream, Any]:
    """Each service's OpenAPI document (services that do not answer are left out)."""

    async def one(client: httpx.AsyncClient) -> Any:
        response = await client.get("/openapi.json", timeout=5)
        response.raise_for_status()
        return response.json()

    names = list(upstreams)
    results = await asyncio.gather(
        *(one(upstreams[name]) for name in names), return_exceptions=True
    )
    return {
        name: result
        for name, result in zip(names, results, strict=True)
        if not isinstance(result, BaseException)
    }


def merge(documents: dict[Upstream, Any]) -> dict[str, Any]:
    """The public document: the routed operations of every service, with their schemas."""
    paths: dict[str, dict[str, Any]] = {}
    schemas: dict[str, Any] = {}
    for route in ROUTES:
        document = documents.get(route.upstream)
        if document is None:
            continue
        operation = document.get("paths", {}).get(route.path, {}).get(route.method.lower())
        if operation is None:
            continue
        operation = copy.deepcopy(operation)
        operation["security"] = _SECURITY[route.access]
        operation.setdefault("tags", [route.upstream.value])
        paths.setdefault(route.path, {})[route.method.lower()] = operation
    for document in documents.values():
        schemas.update(document.get("components", {}).get("schemas", {}))
    return {
        "openapi": "3.1.0",
        "info": {"title": "Meterai public API", "version": VERSION, "description": DESCRIPTION},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "distributorKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A distributor API key.",
                },
                "admissionToken": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "X-Admission-Token",
                    "description": "The waiting room's admission credential (or its cookie).",
                },
                "opsToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "The operations token.",
                },
            },
        },
    }

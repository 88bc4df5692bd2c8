"""One OpenAPI document for the whole public API, merged from the services' own documents.

Each service stays the source of truth for its schemas; the gateway keeps only the operations
of its route table and adds how callers authenticate.
"""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import httpx

from services.gateway.routes import ROUTES, Access, Route, Upstream
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


PROBLEM_MEDIA_TYPE = "application/problem+json"

PROBLEM_SCHEMA: dict[str, Any] = {
    "title": "Problem",
    "description": "An RFC 9457 problem document; `code` is stable, match on it.",
    "type": "object",
    "required": ["type", "title", "status", "detail", "code"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "code": {"type": "string"},
    },
    "additionalProperties": True,
}

_RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before trying again.",
        "schema": {"type": "integer"},
    }
}

# What the edge itself may answer, on top of what each service documents.
_EDGE_RESPONSES: dict[str, str] = {
    "401": "`missing_credentials`, `invalid_api_key`, `invalid_ops_token` or `unauthorized`",
    "403": "`forbidden`: this kind of caller may not use the operation",
    "404": "`not_found`: no such resource, or not yours (the two are not told apart)",
    "400": "`malformed_json`, `malformed_multipart` or `invalid_idempotency_key`",
    "413": "`payload_too_large`",
    "422": "`invalid_request` (with `errors`) or a more specific code",
    "429": "Rate limited; `Retry-After` says when to come back",
    "503": "Shed or a dependency is down (`unavailable`, `database_unavailable`); see "
    "`Retry-After`",
}


def _edge_statuses(route: Route) -> list[str]:
    statuses = ["422", "429", "503"]
    if route.access is not Access.public:
        statuses += ["401", "403"]
    if "{" in route.path:
        statuses.append("404")
    if route.method in ("POST", "PUT", "PATCH"):
        statuses += ["400", "413"]
    return statuses


def _document_errors(operation: dict[str, Any], route: Route) -> None:
    """Every error answer is problem+json: document the edge's own, and make the services'
    (FastAPI documents its 422 as plain JSON of another shape) say so."""
    responses: dict[str, Any] = operation.setdefault("responses", {})
    for status in _edge_statuses(route):
        responses.setdefault(status, {"description": _EDGE_RESPONSES[status]})
    for status, response in responses.items():
        if status[:1] not in ("4", "5"):
            continue
        if status == "422" and "HTTPValidationError" in str(response.get("content")):
            response["description"] = _EDGE_RESPONSES["422"]
        response["content"] = {
            PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}
        }
        if status in ("429", "503"):
            response.setdefault("headers", {}).update(_RETRY_AFTER)


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
        _document_errors(operation, route)
        paths.setdefault(route.path, {})[route.method.lower()] = operation
    for document in documents.values():
        schemas.update(document.get("components", {}).get("schemas", {}))
    schemas["Problem"] = PROBLEM_SCHEMA
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

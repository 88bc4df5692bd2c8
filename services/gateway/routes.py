"""The public route table: every path the gateway exposes, who may call it, and where it goes.

Only these routes reach the services; internal endpoints are never routable from outside.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Upstream(StrEnum):
    inventory = "inventory"
    queue = "queue"
    stamping = "stamping"


class Access(StrEnum):
    public = "public"  # anyone; no principal is forwarded
    distributor = "distributor"  # a distributor API key
    customer = "customer"  # a distributor API key, or an applicant's admission credential
    operator = "operator"  # the operations token


class RouteClass(StrEnum):
    """What a route costs the backend; shedding uses it (cheap reads are shed last)."""

    read = "read"
    write = "write"
    upload = "upload"
    room = "room"


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    upstream: Upstream
    access: Access
    route_class: RouteClass
    # An applicant needs a live admission here (it buys); elsewhere a credential still within
    # its keep horizon serves (it uses what was bought): see services.platform.admission.
    buys: bool = False


ROUTES: tuple[Route, ...] = (
    # Waiting room.
    Route("GET", "/", Upstream.queue, Access.public, RouteClass.room),
    Route("POST", "/queue/join", Upstream.queue, Access.public, RouteClass.room),
    Route("GET", "/queue/status", Upstream.queue, Access.public, RouteClass.room),
    # The applicant's pages: the room without JavaScript, the purchase page, their files.
    Route("GET", "/queue/page", Upstream.queue, Access.public, RouteClass.room),
    Route("POST", "/queue/page", Upstream.queue, Access.public, RouteClass.room),
    Route("GET", "/beli", Upstream.queue, Access.public, RouteClass.room),
    Route("GET", "/static/{name}", Upstream.queue, Access.public, RouteClass.room),
    Route("GET", "/ops/queue", Upstream.queue, Access.operator, RouteClass.read),
    Route("PATCH", "/ops/queue", Upstream.queue, Access.operator, RouteClass.write),
    # Purchases.
    Route(
        "POST",
        "/api/v1/purchases",
        Upstream.inventory,
        Access.customer,
        RouteClass.write,
        buys=True,
    ),
    Route(
        "GET",
        "/api/v1/purchases/{purchase_id}",
        Upstream.inventory,
        Access.customer,
        RouteClass.read,
    ),
    Route("GET", "/api/v1/balance", Upstream.inventory, Access.distributor, RouteClass.read),
    Route("GET", "/api/v1/serials", Upstream.inventory, Access.customer, RouteClass.read),
    # The payment provider's callback: authenticated by its HMAC signature, not by us.
    Route("POST", "/api/v1/payments/notify", Upstream.inventory, Access.public, RouteClass.write),
    # Stamping.
    Route("POST", "/api/v1/stampings", Upstream.stamping, Access.customer, RouteClass.upload),
    Route(
        "GET",
        "/api/v1/stampings/{job_id}",
        Upstream.stamping,
        Access.customer,
        RouteClass.read,
    ),
    Route(
        "GET",
        "/api/v1/stampings/{job_id}/document",
        Upstream.stamping,
        Access.customer,
        RouteClass.read,
    ),
    Route("GET", "/api/v1/callbacks/secret", Upstream.stamping, Access.customer, RouteClass.read),
    # Verification: anyone (the QR code on every stamp opens the first).
    Route("GET", "/verify/{serial}", Upstream.stamping, Access.public, RouteClass.read),
    Route("POST", "/api/v1/verify", Upstream.stamping, Access.public, RouteClass.upload),
)

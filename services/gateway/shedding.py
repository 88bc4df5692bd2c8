"""Load shedding: a bound on requests in flight per upstream and per route class, refused at
once beyond it (503 `overloaded` with Retry-After) instead of queueing without end.

Each class may fill only its share of the upstream's budget, so as an upstream fills, uploads
are refused first, then writes, and cheap reads (status, verify) last.
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import Counter, Gauge

from services.gateway.routes import RouteClass, Upstream
from services.platform.errors import ServiceUnavailable

SHED = Counter(
    "meterai_gateway_shed_total",
    "Requests refused because too many were in flight",
    ["upstream", "route_class"],
)
IN_FLIGHT = Gauge(
    "meterai_gateway_upstream_in_flight",
    "Requests in flight to an upstream, by route class",
    ["upstream", "route_class"],
)


class Overloaded(ServiceUnavailable):
    code = "overloaded"
    title = "Overloaded"


class UpstreamBudget:
    """The in-flight count of one upstream (plain integers: one event loop, no awaits between
    the check and the increment)."""

    def __init__(self, upstream: Upstream, limit: int) -> None:
        self.upstream = upstream
        self.limit = limit
        self.in_flight = 0


class ClassBudget:
    """One route class on one upstream: `acquire` or refuse, `release` when the response ends."""

    def __init__(
        self, upstream: UpstreamBudget, route_class: RouteClass, share: float, limit: int
    ) -> None:
        self.upstream = upstream
        self.route_class = route_class
        self.upstream_limit = max(1, int(upstream.limit * share))
        self.limit = limit
        self.in_flight = 0
        self.retry_after = 1
        self._shed = SHED.labels(upstream.upstream.value, route_class.value)
        IN_FLIGHT.labels(upstream.upstream.value, route_class.value).set_function(
            lambda: self.in_flight
        )

    def acquire(self) -> None:
        """Count one more request in flight, or raise `Overloaded`."""
        upstream = self.upstream
        if self.in_flight >= self.limit or upstream.in_flight >= self.upstream_limit:
            self._shed.inc()
            raise Overloaded(
                f"The {upstream.upstream.value} service has too many requests in flight; "
                "try again shortly.",
                retry_after=self.retry_after,
            )
        self.in_flight += 1
        upstream.in_flight += 1

    def release(self) -> None:
        self.in_flight -= 1
        self.upstream.in_flight -= 1


class Budgets:
    """Every (upstream, route class) budget of one gateway process."""

    def __init__(
        self,
        *,
        per_upstream: int,
        shares: Mapping[str, float],
        per_class: Mapping[str, int],
        retry_after: int,
    ) -> None:
        self._budgets: dict[tuple[Upstream, RouteClass], ClassBudget] = {}
        for upstream in Upstream:
            total = UpstreamBudget(upstream, per_upstream)
            for route_class in RouteClass:
                budget = ClassBudget(
                    total,
                    route_class,
                    shares.get(route_class.value, 1.0),
                    per_class.get(route_class.value, per_upstream),
                )
                budget.retry_after = retry_after
                self._budgets[(upstream, route_class)] = budget

    def get(self, upstream: Upstream, route_class: RouteClass) -> ClassBudget:
        return self._budgets[(upstream, route_class)]

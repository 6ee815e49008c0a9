"""Prometheus metrics of the verifier. HTTP request counts and latencies come from
services.common.app; these add per-item outcomes and the pool's state (read at scrape time)."""

from __future__ import annotations

import weakref
from collections.abc import Iterable

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from services.verifier.pool import Verdict, VerifyPool

ITEMS = Counter("rlrt_verifier_items_total", "items verified", ["path", "status"])
ITEM_SECONDS = Histogram(
    "rlrt_verifier_item_seconds", "per-item time in the service (queue + check)", ["path"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
REJECTED = Counter("rlrt_verifier_rejected_total", "requests refused before verification", ["reason"])


def observe(path: str, verdicts: Iterable[Verdict]) -> None:
    hist = ITEM_SECONDS.labels(path)
    for v in verdicts:
        ITEMS.labels(path, v.status).inc()
        hist.observe(v.latency_ms / 1000.0)


class _PoolCollector(Collector):
    """Sums the live pools of this process (normally one; tests make several)."""

    def __init__(self) -> None:
        self.pools: weakref.WeakSet[VerifyPool] = weakref.WeakSet()

    def collect(self) -> Iterable:
        stats = [p.stats() for p in list(self.pools)]
        gauges = {
            "queue_depth": "items waiting for a worker",
            "busy": "workers checking an item",
            "alive": "live worker processes",
        }
        for name, doc in gauges.items():
            yield GaugeMetricFamily(f"rlrt_verifier_pool_{name}", doc, value=sum(getattr(s, name) for s in stats))
        counters = {
            "restarts": "worker processes replaced (killed at a deadline, crashed, or out of memory)",
            "timeouts": "items answered 'timeout'",
            "crashes": "worker processes that died while checking an item",
        }
        for name, doc in counters.items():
            yield CounterMetricFamily(f"rlrt_verifier_pool_{name}", doc, value=sum(getattr(s, name) for s in stats))


POOLS = _PoolCollector()
REGISTRY.register(POOLS)


def track(pool: VerifyPool) -> None:
    POOLS.pools.add(pool)

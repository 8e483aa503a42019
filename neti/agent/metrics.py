"""Prometheus metrics of the agent, served only when ``metrics.enabled`` is set.

A private CollectorRegistry keeps tests independent and the endpoint free of process
metrics nobody asked for (the default collectors are added back explicitly).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
    start_http_server,
)

from neti.backends import BACKENDS
from neti.fleet.model import SKIP_REASONS

log = logging.getLogger(__name__)

# Gauges are exported as floats: keep every value finite and within what a float holds.
GAUGE_MAX = 2.0**53


def _finite(value: float) -> float:
    """``value`` as a finite gauge value (an int too big for a float, NaN or inf clamp)."""
    try:
        f = float(value)
    except (OverflowError, ValueError, TypeError):
        return GAUGE_MAX
    if math.isnan(f):
        return 0.0
    return max(-GAUGE_MAX, min(GAUGE_MAX, f))


ZK_STATES = ("connecting", "connected", "suspended", "lost", "closed")
APPLY_KINDS = ("full", "delta")  # Backend.apply, Backend.apply_delta
APPLY_RESULTS = ("ok", "error")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self._reconcile_series(self.registry)
        self._registry_series(self.registry)
        self._dataplane_series(self.registry)
        self.set_zk_state("connecting")
        self.set_skipped({})
        self._server: Any = None

    def _reconcile_series(self, r: CollectorRegistry) -> None:
        """Reconciles and the guard."""
        self.members = Gauge(
            "neti_members", "Members in the applied fleet, by network", ["network"], registry=r
        )
        self.reconcile_duration = Histogram(
            "neti_reconcile_duration_seconds",
            "Time to read the fleet, compute and apply the desired state",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.reconciles = Counter("neti_reconciles", "Reconciles by result", ["result"], registry=r)
        self.last_success = Gauge(
            "neti_last_success_timestamp_seconds",
            "When the kernel last matched the (guarded) fleet",
            registry=r,
        )
        self.apply_errors = Counter(
            "neti_apply_errors", "Reconciles whose apply the kernel refused", registry=r
        )
        self.guard_held = Gauge(
            "neti_guard_held", "1 while the mass-removal guard holds removals back", registry=r
        )
        self.guard_would_remove = Gauge(
            "neti_guard_would_remove", "Members the guard is holding back", registry=r
        )
        self.max_change = Gauge("neti_max_change", "The maxchange threshold in use", registry=r)

    def _registry_series(self, r: CollectorRegistry) -> None:
        """ZooKeeper and what the registry holds."""
        self.zk_state = Gauge(
            "neti_zookeeper_state",
            "1 for the current ZooKeeper session state",
            ["state"],
            registry=r,
        )
        self.zk_expiries = Counter(
            "neti_zookeeper_session_expiries", "ZooKeeper sessions lost", registry=r
        )
        self.skipped = Gauge(
            "neti_skipped_entries",
            "Registry entries left out of the applied fleet, by reason "
            "(neti.fleet.model.SKIP_REASONS)",
            ["reason"],
            registry=r,
        )
        self.claims_excess = Gauge(
            "neti_claims_excess",
            "ip-to-id claims beyond id-to-ip's at the last resync (excess claims drain the pool)",
            registry=r,
        )
        self.reverify_held = Counter(
            "neti_reverify_held",
            "Member nodes' data changes held to the end of their node's re-verify interval "
            "(a host rewriting its node faster than that)",
            registry=r,
        )

    def _dataplane_series(self, r: CollectorRegistry) -> None:
        """The kernel: conntrack and the backend's applies."""
        self.conntrack_count = Gauge(
            "neti_conntrack_entries", "Entries in the conntrack table", registry=r
        )
        self.conntrack_max = Gauge("neti_conntrack_max", "nf_conntrack_max", registry=r)
        self.tunnel_peers = Gauge(
            "neti_encryption_peers",
            "Members reached through the WireGuard tunnel (the peers the kernel was given)",
            registry=r,
        )
        self.cleartext_members = Gauge(
            "neti_encryption_cleartext_members",
            "Members encryption should reach in the tunnel but reaches by cleartext DNAT "
            "(their record carries no key)",
            registry=r,
        )
        # Labels stay bounded: backend is a registered backend's name, kind and result fixed.
        self.apply_duration = Histogram(
            "neti_dataplane_apply_duration_seconds",
            "Time one dataplane apply took (kernel read, write, read back), by backend and kind",
            ["backend", "kind"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.applies = Counter(
            "neti_dataplane_applies",
            "Dataplane applies by backend, kind and result (error: the kernel refused)",
            ["backend", "kind", "result"],
            registry=r,
        )
        self.objects_written = Histogram(
            "neti_dataplane_objects_written",
            "Kernel objects (set elements, map entries, rules) one successful apply wrote",
            ["backend", "kind"],
            buckets=(0, 1, 2, 10, 100, 1000, 10000, 100000),
            registry=r,
        )

    def set_encryption(self, counts: tuple[int, int] | None) -> None:
        """Counts only, never a label per peer: the tunnel peers the kernel was given and the
        members encryption should reach but reaches in cleartext (0 and 0 when off)."""
        peers, cleartext = counts if counts is not None else (0, 0)
        self.tunnel_peers.set(_finite(peers))
        self.cleartext_members.set(_finite(cleartext))

    def set_zk_state(self, state: str) -> None:
        for s in ZK_STATES:
            self.zk_state.labels(state=s).set(1 if s == state else 0)

    def set_members(self, by_network: dict[str, int]) -> None:
        self.members.clear()
        for net, n in by_network.items():
            self.members.labels(network=net).set(n)

    def set_skipped(self, by_reason: Mapping[str, int]) -> None:
        """One series per known reason (0 when none), so alerts see a steady set of labels."""
        for reason in SKIP_REASONS:
            self.skipped.labels(reason=reason).set(_finite(by_reason.get(reason, 0)))

    def set_conntrack(self, count: int | None, maximum: int | None) -> None:
        if count is not None:
            self.conntrack_count.set(count)
        if maximum is not None:
            self.conntrack_max.set(maximum)

    def observe_apply(
        self, backend: str, seconds: float, ok: bool, objects: int = 0, kind: str = "full"
    ) -> None:
        """One dataplane apply: its latency, whether the kernel took it, what it wrote.

        ``backend`` is the backend's registered name (``Backend.name``); anything else is
        counted as ``other`` so a label never grows without bound.
        """
        backend = backend if backend in BACKENDS else "other"
        kind = kind if kind in APPLY_KINDS else "full"
        self.apply_duration.labels(backend=backend, kind=kind).observe(max(0.0, _finite(seconds)))
        self.applies.labels(backend=backend, kind=kind, result="ok" if ok else "error").inc()
        if ok:
            self.objects_written.labels(backend=backend, kind=kind).observe(
                max(0.0, _finite(objects))
            )

    def serve(self, addr: str, port: int) -> None:
        """Start the HTTP endpoint (a daemon thread); OSError if the port is taken."""
        self._server = start_http_server(port, addr=addr, registry=self.registry)
        log.info("metrics on http://%s:%d/metrics", addr, port)

    def shutdown(self) -> None:
        if self._server is not None:
            server, thread = self._server
            server.shutdown()
            server.server_close()
            thread.join(5)
            self._server = None

    def render(self) -> bytes:
        return generate_latest(self.registry)

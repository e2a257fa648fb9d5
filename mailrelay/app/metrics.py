"""The metrics server (C{[metrics] listen}): Prometheus's text format at C{/metrics}, made by
C{prometheus_client} from the relay's metrics and its delivery processes'
(L{mailrelay.metrics}), and a health check at C{/healthz}, on C{twisted.web}.

Both answer on the reactor thread, from memory: a scrape costs no I/O but a C{statvfs} of
the spool (at most once a second).  Requests are not logged (a scrape every few seconds
would drown the mail's lines).
"""

from __future__ import annotations

import json
import os
from typing import Any

from prometheus_client.exposition import choose_encoder
from twisted.logger import ILogObserver, Logger
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from zope.interface import provider

from mailrelay.app.listeners import ListenerService
from mailrelay.metrics import ProcessMetrics, exposition

__all__ = ["MetricsService", "health"]


def health(relay: Any) -> tuple[bool, dict[str, Any]]:
    """Whether C{relay} (a L{mailrelay.app.relay.RelayService}) is healthy, and what each part
    says: C{listeners} (each listening: C{"up"}), C{spool} (C{"up"}: started, writable and
    with its minimum free space; C{"full"}, C{"down"}), C{delivery} (C{"up"}, C{"held"}:
    C{[queue] hold}, deliberately delivering nothing; C{"down"}: its process is not running,
    it is being restarted) and, with acceptor processes (C{[relay] processes} over 1),
    C{acceptors} (C{"up"}: as many running as configured; C{"down"}: fewer, one being
    restarted or the relay stopping) with C{acceptor_pids}."""
    listeners = {
        endpoint: "up" if listener.port is not None else "down"
        for endpoint, listener in relay.listeners.items()
    }
    spool = relay.spool
    if spool is None or not spool.running or not os.access(spool.directory, os.W_OK):
        spoolState = "down"
    elif not spool.hasFreeSpace(0):
        spoolState = "full"
    else:
        spoolState = "up"
    delivery = relay.delivery
    deliveryState = "down" if delivery is None else delivery.state()
    parts: dict[str, Any] = {
        "listeners": listeners,
        "spool": spoolState,
        "delivery": deliveryState,
    }
    pid = getattr(delivery, "pid", None)
    if pid is not None:
        parts["delivery_pid"] = pid
    acceptorState = "up"
    acceptors = getattr(relay, "acceptors", None)
    described = acceptors.describe() if acceptors is not None else None
    if described and described["count"]:
        pids = [child["pid"] for child in described["running"] if child["pid"] is not None]
        acceptorState = "up" if len(pids) >= described["count"] else "down"
        parts["acceptors"] = acceptorState
        parts["acceptor_pids"] = pids
    healthy = (
        bool(listeners)
        and all(state == "up" for state in listeners.values())
        and spoolState == "up"
        and deliveryState in ("up", "held")
        and acceptorState == "up"
    )
    return healthy, parts


class _Metrics(Resource):
    """C{GET /metrics}: the Prometheus text format (or OpenMetrics, when asked for)."""

    isLeaf = True

    def __init__(self, relay: Any) -> None:
        super().__init__()
        self.registry = exposition(lambda: _childMetrics(relay))

    def render_GET(self, request: Request) -> bytes:
        accept = request.getHeader("accept")
        encoder, contentType = choose_encoder(accept or "")
        request.setHeader(b"content-type", contentType.encode("ascii"))
        return bytes(encoder(self.registry))


def _childMetrics(relay: Any) -> ProcessMetrics | None:
    return getattr(relay, "childMetrics", None)


class _Health(Resource):
    """C{GET /healthz}: 200 when healthy, else 503; JSON saying what each part is."""

    isLeaf = True

    def __init__(self, relay: Any) -> None:
        super().__init__()
        self.relay = relay

    def render_GET(self, request: Request) -> bytes:
        healthy, parts = health(self.relay)
        request.setResponseCode(200 if healthy else 503)
        request.setHeader(b"content-type", b"application/json")
        body = {"status": "ok" if healthy else "unhealthy", **parts}
        return json.dumps(body, sort_keys=True).encode("utf-8") + b"\n"


@provider(ILogObserver)
def _discard(event: dict[str, Any]) -> None:
    """A log observer that keeps nothing."""


class _QuietChannel(http.HTTPChannel):
    """Twisted's HTTP channel without its line per idle connection timed out ('Timing out
    client'): a scanner's connections would fill the relay's log."""

    _log = Logger(observer=_discard)


class _QuietSite(Site):
    """A site that does not log its requests, nor its start, nor its idle time-outs."""

    noisy = False
    protocol = _QuietChannel  # type: ignore[assignment]  # (Twisted types it as a factory)

    def log(self, request: http.Request) -> None:
        pass


def makeSite(relay: Any) -> Site:
    """The metrics server's site for C{relay}: C{/metrics} and C{/healthz}."""
    root = Resource()
    root.putChild(b"metrics", _Metrics(relay))
    root.putChild(b"healthz", _Health(relay))
    return _QuietSite(root)


class MetricsService(ListenerService):
    """Serves the metrics and the health check of C{relay} on C{endpoint}; like an SMTP
    listener, it listens before twistd drops privileges, and a failure to listen stops the
    start-up with a message naming the endpoint."""

    def __init__(self, reactor: Any, endpoint: str, relay: Any) -> None:
        super().__init__(reactor, endpoint, makeSite(relay), role="metrics")
        self.setName("metrics")

"""A queue manager in memory, for tests of delivery backends and routers (also for site
plugin authors).

    from mailrelay.route.table import RouteRule
    from mailrelay.testing import QueueHarness

    harness = QueueHarness(tmp_path, {"webhook": MyBackend()},
                           routes=[RouteRule("hooks.example", "webhook")])
    queueID = harness.submit("alice@example.org", ["bob@hooks.example"])
    assert harness.queued() == []            # delivered, and removed from the spool
    harness.clock.advance(300)               # the first retry of what was deferred

The queue manager is the relay's own (L{mailrelay.queue.QueueManager}), built as the relay
builds it: over a L{MemorySpool}, on a C{task.Clock}, its notifications entering the spool
through an intake (L{mailrelay.cleanup.intake.Intake}) with the header stampers.  Messages
enter through the same intake (L{QueueHarness.submit}), which hands each one committed to the
queue manager: with backends that answer at once, a message is delivered (or deferred, or
bounced) before C{submit} returns.  Nothing touches the network or the global reactor; the
spool writes each message to a file in the directory given when a backend asks for its
path.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from mailrelay.cleanup.intake import Intake
from mailrelay.cleanup.stamping import ConfiguredStamper, DefaultStamper
from mailrelay.envelope import Envelope, Recipient
from mailrelay.errors import EntryGone
from mailrelay.interfaces import IDeliveryBackend, IRouter
from mailrelay.queue import QueueManager, QueuePolicy
from mailrelay.route.table import RouteRule, RoutingTable
from mailrelay.spool.memory import MemorySpool
from mailrelay.testing.plugins import hookPlugins

__all__ = ["QueueHarness"]

#: The message L{QueueHarness.submit} spools when given none.
DEFAULT_MESSAGE = b"Subject: test\r\n\r\nHello.\r\n"


class QueueHarness:
    """A queue manager over a L{MemorySpool} on a C{Clock}, delivering through the backends
    a test gives.

    @ivar clock: the C{Clock} (it starts at 1,800,000,000 seconds since the epoch): advance
        it for retries, expiry, delay warnings and timeouts.
    @ivar spool: the L{MemorySpool} (C{spool.committed} holds the entries still queued).
    @ivar intake: the L{Intake} messages and notifications enter the spool through.
    @ivar queue: the L{QueueManager}, started unless C{start=False} was given.
    @ivar spooled: every message that entered the spool, in order, as committed: C{(envelope,
        message)} pairs, the notifications the queue manager made included.

    @param directory: where the spool writes messages for the backends to read (pytest's
        C{tmp_path}).
    @param backends: the delivery backends by name (L{IDeliveryBackend} providers).
    @param router: an L{IRouter}; by default a L{RoutingTable} of C{routes} (a recipient no
        rule matches goes to the C{smtp} backend, next hop its domain).
    @param routes: the L{RouteRule}s of the default router.
    @param stampers: L{IHeaderStamper} providers (each may answer within 30 seconds of the
        clock) or L{ConfiguredStamper}s; by default the L{DefaultStamper}.
    @param hostname: the relay's host name.
    @param timeouts: seconds one delivery by the named backend may take (a site backend's
        C{[[backends]] timeout}); others get C{policy.deliveryTimeout}.
    @param start: start the queue manager now.
    @param plugins: plugins of the delivery side's hooks: delivery and queue observers
        (L{mailrelay.testing.RecordingObserver} records what they are told), message filters
        (the notifications pass them); objects, or
        L{PluginEntry <mailrelay.config.plugins.PluginEntry>}s, as for L{ServerHarness}.
    @param clock: the clock (a C{MemoryReactorClock}: C{FakeNexthop.reactor}, for a backend
        talking to a L{mailrelay.testing.FakeNexthop}); by default a new C{Clock}.
    @param policy: the queue's settings: L{QueuePolicy} field names, e.g. C{minBackoff=60},
        C{maxLifetime=3600}, C{delayWarning=600}, C{postmaster="postmaster@relay.test"}.
    """

    def __init__(
        self,
        directory: Path,
        backends: Mapping[str, IDeliveryBackend],
        *,
        router: IRouter | None = None,
        routes: Sequence[RouteRule] = (),
        stampers: Sequence[Any] | None = None,
        hostname: str = "relay.test",
        timeouts: Mapping[str, float] | None = None,
        start: bool = True,
        plugins: Sequence[Any] = (),
        clock: Any = None,
        **policy: Any,
    ) -> None:
        if clock is None:
            clock = Clock()
            clock.advance(1_800_000_000)
        self.clock = clock
        self.hooks = hookPlugins(plugins)
        observers = self.hooks.observers(clock)
        self.spool = MemorySpool(directory)
        self.spooled: list[tuple[Envelope, bytes]] = []
        configured = [
            s if isinstance(s, ConfiguredStamper) else ConfiguredStamper(type(s).__name__, s, 30.0)
            for s in ([DefaultStamper()] if stampers is None else stampers)
        ]

        def makeIntake(enqueue: Callable[[str], None]) -> Intake:
            def committed(queueID: str) -> None:
                self.spooled.append(self.spool.committed[queueID])
                enqueue(queueID)

            return Intake(
                self.spool,
                configured,
                self.clock,
                hostname,
                notify=committed,
                filters=self.hooks.filterChain(self.clock),
                observe=observers.messageQueued if observers.queued else None,
            )

        self.queue = QueueManager(
            self.spool,
            router if router is not None else RoutingTable(routes),
            backends,
            self.clock,
            hostname=hostname,
            makeIntake=makeIntake,
            policy=QueuePolicy(**policy),
            timeouts=timeouts,
            observers=observers,
        )
        self.intake = self.queue.intake
        if start:
            self.queue.startService()

    def submit(
        self,
        sender: str,
        recipients: Sequence[str | Recipient],
        message: bytes = DEFAULT_MESSAGE,
        **envelope: Any,
    ) -> str:
        """Spool a message through the intake (stamped as mail the relay made itself) and
        hand it to the queue manager, which delivers it at once when it can.

        @param recipients: addresses, or L{Recipient}s (for C{notify}, C{orcpt}).
        @param message: the message, CRLF lines.
        @param envelope: other L{Envelope} fields (C{ret}, C{envid}, C{smtputf8}, C{body},
            C{requireTLS}, ...).
        @return: its queue id.
        @raise mailrelay.interfaces.MessageRefused: the intake refused it (a stamper failed).
        @raise RuntimeError: the intake has not answered yet (a stamper or the spool is
            holding it: advance the clock, or release the spool's commits, first).
        """
        env = Envelope(
            sender=sender,
            recipients=[r if isinstance(r, Recipient) else Recipient(r, r) for r in recipients],
            **envelope,
        )
        return str(_result(self.intake.submit(env, message), "the intake"))

    def queued(self) -> list[str]:
        """The queue ids of the entries still in the spool."""
        return self.spool.queueIDs()

    def envelope(self, queueID: str) -> Envelope | None:
        """The envelope of a queued entry as last recorded (each recipient's C{state},
        C{attempts}, C{status}, C{lastResult}; C{nextAttempt}), or C{None} once it is gone."""
        try:
            return self.spool.loadEnvelope(queueID)
        except EntryGone:
            return None

    def notifications(self) -> list[tuple[Envelope, bytes]]:
        """The delivery status notifications the queue manager spooled, in order."""
        return [(env, message) for env, message in self.spooled if env.isBounce]

    def stop(self) -> None:
        """Stop the queue manager; its deliveries in flight must have answered (advance the
        clock past C{stopTimeout} to interrupt the others).

        @raise RuntimeError: a delivery is still in flight.
        """
        _result(self.queue.stopService(), "stopping the queue manager")


def _result(d: Deferred[Any], what: str) -> Any:
    """What C{d} has fired with; raise its failure's exception, or L{RuntimeError} when it
    has not fired yet."""
    outcome: list[Any] = []
    d.addBoth(outcome.append)
    if not outcome:
        raise RuntimeError(f"{what} has not answered yet")
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    return outcome[0]

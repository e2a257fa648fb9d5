"""The test kit's side of plugins: building one as the relay does (L{buildPlugin}), the
context objects plugins are given (L{makePluginContext}, L{makeClient}, L{makeEnvelope},
L{makeFilterContext}, L{makeStampContext}, L{makeDeliveryEvent}), and an observer that
records what it is told (L{RecordingObserver}).

    from mailrelay.testing import buildPlugin, makeClient, makeEnvelope
    plugin = buildPlugin("acme-dnsbl", {"zones": ["bl.test"]}, tmp_path, resolver=resolver)
    verdict = plugin.checkConnect(makeClient("192.0.2.7"))

Nothing here touches the network or the global reactor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from zope.interface import implementer

from mailrelay.cleanup.filters import FilterContext
from mailrelay.config.plugins import HookPlugins, PluginEntry, availablePlugins
from mailrelay.config.plugins import buildPlugin as _buildPlugin
from mailrelay.envelope import ClientInfo, Envelope, Recipient
from mailrelay.interfaces import (
    DEFERRED,
    DELIVERED,
    ConfiguredPlugin,
    DeliveryEvent,
    DeliveryStatus,
    IDeliveryObserver,
    IQueueObserver,
    PluginContext,
    RecipientResult,
    StampContext,
)
from mailrelay.testing.resolver import FakeResolver

__all__ = [
    "RecordingObserver",
    "buildPlugin",
    "hookPlugins",
    "makeClient",
    "makeDeliveryEvent",
    "makeEnvelope",
    "makeFilterContext",
    "makePluginContext",
    "makeStampContext",
]

#: When the clocks of the test kit start (seconds since the epoch: November 2027).
START = 1_800_000_000


def makePluginContext(
    directory: Path,
    *,
    hostname: str = "relay.test",
    reactor: Any = None,
    resolver: Any = None,
    deferToThread: Callable[..., Deferred[Any]] | None = None,
    kept: dict[str, Any] | None = None,
    monotonic: Callable[[], float] | None = None,
    recipientDelimiter: str = "",
) -> PluginContext:
    """The L{PluginContext} the relay would give a plugin whose configuration file is in
    C{directory} (pytest's C{tmp_path}).

    @param reactor: by default a C{task.Clock} (at L{START}): timers run when the test
        advances it, and C{context.deferToThread} runs the function at once.
    @param resolver: by default an empty L{FakeResolver} (every name NXDOMAIN).
    @param deferToThread: another thread hand-off (by default: at once, without a thread
        pool in C{reactor}).
    @param kept: what L{PluginContext.keep} keeps (share one dict between two contexts to
        test a reload).
    @param monotonic: the context's clock for durations (L{PluginContext.monotonic}); by
        default C{reactor}'s C{seconds} when it is a C{task.Clock} (its time passes as the
        test advances it), else C{time.monotonic}.  Give another C{Clock}'s to test a step
        of the wall clock (C{reactor.rightNow -= 3600}).
    @param recipientDelimiter: C{[delivery] recipient_delimiter} (by default none).
    """
    if reactor is None:
        reactor = Clock()
        reactor.advance(START)
    if monotonic is None and isinstance(reactor, Clock):
        monotonic = reactor.seconds
    context = PluginContext(
        hostname=hostname,
        configDir=Path(directory),
        reactor=reactor,
        resolver=resolver if resolver is not None else FakeResolver(),
        source=str(Path(directory) / "mailrelay.toml"),
        kept=kept if kept is not None else {},
        recipientDelimiter=recipientDelimiter,
    )
    if monotonic is not None:
        context.monotonic = monotonic
    if deferToThread is not None:
        context.deferToThread = deferToThread
    return context


def buildPlugin(
    name: str,
    options: dict[str, Any],
    directory: Path,
    *,
    interface: Any = None,
    context: PluginContext | None = None,
    **contextOptions: Any,
) -> Any:
    """Build the installed plugin C{name} as the relay does: found by real discovery (the
    C{twisted/plugins/} directories on C{sys.path}), built with C{options} and checked with
    C{verifyObject} against every interface it declares.

    @param directory: the configuration file's directory (relative file names in the options
        are relative to it): pytest's C{tmp_path}.
    @param interface: an interface the plugin must provide (as a table of the configuration
        asks it), or C{None}.
    @param context: the L{PluginContext}; by default L{makePluginContext}C{(directory,
        **contextOptions)} (C{reactor=}, C{resolver=}, C{hostname=}, C{kept=},
        C{recipientDelimiter=}).
    @raise mailrelay.errors.ConfigError: as the relay would refuse it (without the file and
        table, which a configuration adds).
    """
    context = context if context is not None else makePluginContext(directory, **contextOptions)
    return _buildPlugin(availablePlugins(), name, interface, options, context)


def makeClient(address: str = "192.0.2.1", **fields: Any) -> ClientInfo:
    """A L{ClientInfo} (C{helo=}, C{rdns=}, C{tls=}, C{authUser=}, C{relayAllowed=},
    C{listener=}, C{notes=}, ...)."""
    return ClientInfo(address, **fields)


def makeEnvelope(
    sender: str = "sender@example.com",
    recipients: Sequence[str | Recipient] = ("rcpt@example.org",),
    *,
    client: ClientInfo | None = None,
    queueID: str | None = "01KTEST0000000000000000000",
    **fields: Any,
) -> Envelope:
    """An L{Envelope} as a plugin sees it: C{recipients} addresses (or L{Recipient}s), a
    client (L{makeClient}), a queue id, and any other field (C{notes=}, C{size=}, ...)."""
    return Envelope(
        sender=sender,
        recipients=[r if isinstance(r, Recipient) else Recipient(r, r) for r in recipients],
        client=client if client is not None else makeClient(),
        queueID=queueID,
        **fields,
    )


def _envelopeAndClient(
    envelope: Envelope | None, client: ClientInfo | None | str
) -> tuple[Envelope, ClientInfo | None]:
    """The envelope (by default L{makeEnvelope}'s) and the client (by default, C{"default"},
    the envelope's)."""
    envelope = envelope if envelope is not None else makeEnvelope()
    who = envelope.client if client == "default" else client
    return envelope, who if isinstance(who, ClientInfo) else None


def makeFilterContext(
    message: bytes,
    *,
    envelope: Envelope | None = None,
    client: ClientInfo | None | str = "default",
    hostname: str = "relay.test",
    listenerOptions: dict[str, Any] | None = None,
    deferToThread: Callable[..., Deferred[Any]] = maybeDeferred,
) -> FilterContext:
    """The L{mailrelay.interfaces.IFilterContext} of C{message} (CRLF lines, as stamped), as
    the intake gives the message filters: C{context.read()} fires with the message and the
    fields of earlier filters (C{context.addFields(prepend, append)} adds some, as a filter
    before would), C{context.prepend} and C{context.append} are what the filters added.

    @param client: the client (by default the envelope's), or C{None} for a message the relay
        made itself.
    @param deferToThread: by default, at once.
    """
    envelope, who = _envelopeAndClient(envelope, client)
    return FilterContext(
        hostname,
        who,
        envelope,
        listenerOptions or {},
        len(message),
        lambda: message,
        deferToThread,
    )


def makeStampContext(
    headers: Sequence[tuple[str, bytes]] = (),
    *,
    envelope: Envelope | None = None,
    client: ClientInfo | None | str = "default",
    hostname: str = "relay.test",
    listenerOptions: dict[str, Any] | None = None,
    now: float = START,
    complete: bool = True,
) -> StampContext:
    """The L{StampContext} a header stamper is given (C{headers}: C{(name, raw field)};
    C{complete=False}: a header section longer than the relay holds)."""
    envelope, who = _envelopeAndClient(envelope, client)
    return StampContext(
        hostname,
        who,
        envelope,
        list(headers),
        dict(listenerOptions or {"add_message_id": True, "add_date": True}),
        now,
        complete,
    )


def makeDeliveryEvent(
    outcome: str = DELIVERED,
    *,
    envelope: Envelope | None = None,
    recipient: Recipient | None = None,
    code: str | None = None,
    diagnostic: str = "smtp; 250 2.0.0 Ok",
    relay: str = "mx.example.org",
    attempts: int = 1,
    nextAttempt: float | None = None,
) -> DeliveryEvent:
    """A L{DeliveryEvent} as the delivery observers are told (C{outcome}: C{DELIVERED},
    C{DEFERRED} or C{BOUNCED}; its status code follows unless given)."""
    envelope = envelope if envelope is not None else makeEnvelope()
    recipient = recipient if recipient is not None else envelope.recipients[0]
    status = {
        DELIVERED: DeliveryStatus.DELIVERED, DEFERRED: DeliveryStatus.TRANSIENT,
    }.get(outcome, DeliveryStatus.PERMANENT)  # fmt: skip
    if code is None:
        code = {DeliveryStatus.DELIVERED: "2.0.0", DeliveryStatus.TRANSIENT: "4.4.1"}.get(
            status, "5.1.1"
        )
    result = RecipientResult(recipient.address, status, code, diagnostic)
    if outcome == DEFERRED and nextAttempt is None:
        nextAttempt = START + 300
    return DeliveryEvent(envelope, recipient, outcome, result, relay, attempts, nextAttempt)


@implementer(IQueueObserver, IDeliveryObserver)
class RecordingObserver:
    """A queue and delivery observer that records what it is told.

    @ivar queued: the envelopes of the messages queued, in order.
    @ivar events: the L{DeliveryEvent}s, in order.
    """

    def __init__(self) -> None:
        self.queued: list[Envelope] = []
        self.events: list[DeliveryEvent] = []

    def messageQueued(self, envelope: Envelope) -> None:
        self.queued.append(envelope)

    def deliveryAttempted(self, event: DeliveryEvent) -> None:
        self.events.append(event)

    def outcomes(self) -> list[tuple[str, str]]:
        """C{(recipient, outcome)} of each event, in order."""
        return [(e.recipient.address, e.outcome) for e in self.events]


def hookPlugins(
    plugins: Sequence[Any], validators: Sequence[ConfiguredPlugin] = ()
) -> HookPlugins:
    """The L{HookPlugins} of C{plugins} (objects, each serving every hook it provides, within
    30 seconds, or L{PluginEntry}s: C{PluginEntry.serving(name, plugin, timeout, hooks)}),
    after the recipient C{validators}: what a harness's C{plugins=} makes of them."""
    entries = tuple(
        p if isinstance(p, PluginEntry) else PluginEntry.serving(type(p).__name__, p)
        for p in plugins
    )
    return HookPlugins(entries, tuple(validators))

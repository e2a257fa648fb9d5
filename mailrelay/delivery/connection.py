"""A connection to a next hop for delivery backends: L{connectSMTP} connects an endpoint,
sets the connection up (greeting, EHLO, STARTTLS, AUTH) and fires with a ready
L{SMTPConnection}, which carries transactions one at a time."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from twisted.internet import error as ierror
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure

from mailrelay.delivery.protocol import SMTPClientProtocol
from mailrelay.envelope import Envelope, Recipient
from mailrelay.smtp.clientsettings import ClientSettings
from mailrelay.smtp.errors import SMTPConnectError


class SMTPConnection:
    """A set-up connection to a next hop, ready for transactions one at a time.

    @ivar remoteMTA: RFC 3464 Remote-MTA (C{"dns; mx.example.org"}).
    @ivar extensions: the server's EHLO keywords (upper case) to their parameters.
    @ivar tls: the connection is encrypted.
    @ivar authenticated: AUTH succeeded.
    @ivar host: the server for logs (C{"mx.example.org[192.0.2.1]"}).
    """

    def __init__(self, protocol: SMTPClientProtocol) -> None:
        self._protocol = protocol

    @property
    def remoteMTA(self) -> str:
        return self._protocol.session.remoteMTA or ""

    @property
    def extensions(self) -> dict[str, str]:
        return self._protocol.session.extensions

    @property
    def tls(self) -> bool:
        return self._protocol.session.tls

    @property
    def tlsSessionFailed(self) -> bool:
        """The connection was lost or timed out in a step while TLS was up (see
        L{ClientSession.tlsSessionFailed <mailrelay.smtp.client.ClientSession>})."""
        return self._protocol.session.tlsSessionFailed

    @property
    def broke(self) -> bool:
        """The connection was lost or timed out in a step (see L{ClientSession.broke
        <mailrelay.smtp.client.ClientSession>})."""
        return self._protocol.session.broke

    @property
    def authenticated(self) -> bool:
        return self._protocol.session.authenticated

    @property
    def host(self) -> str:
        return self._protocol.host

    @property
    def address(self) -> str | None:
        """The server's IP address (C{"192.0.2.1"}), C{None} when not over TCP."""
        transport = getattr(self._protocol, "transport", None)
        peer = transport.getPeer() if transport is not None else None
        return getattr(peer, "host", None)

    @property
    def relay(self) -> str:
        """The server as the log's C{relay=} says it (C{"mx.example.org[192.0.2.1]:25"})."""
        return self._protocol.relay

    @property
    def tlsDescription(self) -> str | None:
        """The connection's TLS for the log (C{"TLSv1.3 TLS_AES_256_GCM_SHA384 verified"},
        or C{unverified}), C{None} without TLS."""
        return self._protocol.tlsDescription

    @property
    def usable(self) -> bool:
        """Open, idle and without error: it may carry another transaction."""
        return self._protocol.session.idle and not self._protocol.lost

    def send(self, envelope: Envelope, recipients: Sequence[Recipient],
             messagePath: Path, *, lineEndsChecked: bool = False) -> Deferred:
        """Deliver the message at C{messagePath} to C{recipients} in one transaction.

        Fires with one L{RecipientResult} per recipient, in order; never fails.  Refusals,
        lost connections and timeouts are TRANSIENT or PERMANENT results (transport trouble:
        TRANSIENT 4.4.2 saying what was being waited for).  Without PIPELINING commands go one
        at a time.  The file is read with L{CHUNK_SIZE
        <mailrelay.delivery.protocol.CHUNK_SIZE>} reads as the connection takes data.
        After a transaction that left state on the server, the next one starts with RSET.

        A file holding a bare CR or LF is not sent (4.3.0, a corrupt file), unless
        C{lineEndsChecked}: the caller vouches that it holds CRLF line ends only, as the
        spool's text messages do (the intake refuses or normalises bare LF and makes a bare
        CR a space in text content), and it is streamed with dot-stuffing only
        (L{DotStuffer <mailrelay.smtp.wire.DotStuffer>} without checks), not checked again:
        the built-in backends pass it for the spooled file of a message that is not
        BINARYMIME, never for a file converted to 7 bits or one from elsewhere.
        """
        return self._protocol._send(envelope, recipients, messagePath, lineEndsChecked)

    def quit(self) -> Deferred:
        """Send QUIT, wait for the reply (C{quit} timeout), close.  Fires with C{None} once the
        connection is closed; never fails.  A transaction in progress is aborted."""
        protocol = self._protocol
        if protocol.lost:
            return succeed(None)
        d: Deferred = Deferred()
        protocol._quitWaiters.append(d)
        protocol._handle(protocol.session.quit())
        return d

    def abort(self) -> None:
        """Close at once; a transaction in progress ends with TRANSIENT results."""
        protocol = self._protocol
        if protocol.lost:
            return
        if protocol.session.closed:  # closing already (QUIT sent): do not wait
            protocol._cancelTimer()
            protocol.transport.abortConnection()
        else:
            protocol._handle(protocol.session.abort())


class _SMTPClientFactory(Factory):
    noisy = False  # no "Starting factory" log line per connection
    def __init__(self, reactor: Any, settings: ClientSettings, tlsHostname: str,
                 remoteMTA: str, ready: Deferred) -> None:
        self.reactor = reactor
        self.settings = settings
        self.tlsHostname = tlsHostname
        self.remoteMTA = remoteMTA
        self.ready = ready
        self.protocolInstance: SMTPClientProtocol | None = None

    def buildProtocol(self, addr: Any) -> SMTPClientProtocol:
        p = SMTPClientProtocol(self.reactor, self.settings, self.tlsHostname, self.remoteMTA,
                               self.ready)
        p.factory = self
        p.connection = SMTPConnection(p)
        self.protocolInstance = p
        return p


def connectSMTP(reactor: Any, endpoint: Any, settings: ClientSettings, *, tlsHostname: str,
                remoteMTA: str | None = None) -> Deferred:
    """Connect to an SMTP or LMTP server and set the connection up.

    Reads the greeting (220), sends EHLO (HELO when EHLO gets any non-2xx reply but 421;
    LHLO for LMTP), STARTTLS per C{settings.tls} and EHLO again, then AUTH when
    C{settings.username} is set.

    @param reactor: provides C{IReactorTime}; all timeouts use it.
    @param endpoint: an C{IStreamClientEndpoint}; for C{tls="implicit"} already TLS-wrapped
        (L{clientTLSOptions}).
    @param tlsHostname: the server's host name: certificate verification and SNI use it, and
        so do diagnostics.
    @param remoteMTA: RFC 3464 Remote-MTA for results; default C{"dns; " + tlsHostname}.
    @return: a Deferred firing with an L{SMTPConnection}, or failing with L{SMTPConnectError}
        (C{CancelledError} if cancelled; cancelling aborts the connection).  C{timeouts.connect}
        covers the endpoint's connect only; with implicit TLS the handshake falls under
        C{timeouts.greeting}.
    """
    remoteMTA = remoteMTA or f"dns; {tlsHostname}"
    # What the diagnostics name: a UNIX socket by its path (LMTP to a local server).
    where = (str(endpoint._path) if isinstance(endpoint, UNIXClientEndpoint)
             else tlsHostname)
    state: dict[str, Any] = {"connecting": None, "timedOut": False, "cancelled": False}

    def cancel(d: Deferred) -> None:
        # The Deferred then fails with CancelledError.
        state["cancelled"] = True
        connecting = state["connecting"]
        protocol = factory.protocolInstance
        if protocol is not None:
            protocol.ready = None
            if not protocol.lost:
                protocol.connection.abort()
        elif connecting is not None and not connecting.called:
            connecting.cancel()

    ready: Deferred = Deferred(cancel)
    factory = _SMTPClientFactory(reactor, settings, tlsHostname, remoteMTA, ready)

    def timedOut() -> None:
        state["timedOut"] = True
        state["connecting"].cancel()

    timer = reactor.callLater(settings.timeouts.connect, timedOut)

    def connected(protocol: Any) -> None:
        if timer.active():
            timer.cancel()

    def failed(failure: Failure) -> None:
        if timer.active():
            timer.cancel()
        value = failure.value
        if state["cancelled"] or ready.called:
            return  # cancelled by our caller
        if state["timedOut"]:
            why = f"connection to {where} timed out"
        elif isinstance(value, ierror.ConnectBindError):
            # [delivery] source_address that the host no longer has: deferred, not sent from
            # another address (Postfix's smtp_bind_address_enforce = yes).
            source = getattr(getattr(endpoint, "_wrappedEndpoint", endpoint), "_bindAddress",
                             None)
            ready.errback(SMTPConnectError(
                "4.4.0",
                f"X-mailrelay; cannot connect to {where} from source address "
                f"{source[0] if source else '?'} (server configuration error): {value}",
                sourceUnbound=True,
            ))
            return
        elif isinstance(value, ierror.ConnectionRefusedError):
            why = f"connection refused by {where}"
        elif isinstance(value, ierror.DNSLookupError):
            why = f"host {where} not found"
        elif isinstance(value, (CancelledError, ierror.ConnectingCancelledError)):
            why = f"connecting to {where} was cancelled"
        else:
            why = f"cannot connect to {where}: {value}"
        # (Not logged here: the backend that asked logs it once, with the queue id, the
        # host, its address and port.)  No server answered: no Remote-MTA (RFC 3464 section
        # 2.3.5; Postfix's dsb_simple()).
        ready.errback(SMTPConnectError("4.4.1", f"X-mailrelay; {why}"))

    connecting = endpoint.connect(factory)
    state["connecting"] = connecting
    connecting.addCallbacks(connected, failed)
    return ready


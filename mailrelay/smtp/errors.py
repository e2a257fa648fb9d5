"""The errors of the SMTP engines: L{SMTPConnectError} (setting a client connection up
failed), L{ProtocolError} (the server broke the protocol), L{BareNewlineError} (message
content that cannot be sent as it is) and L{SizeMismatchError} (a message file of another size
than announced in BDAT)."""

from __future__ import annotations

from collections.abc import Sequence

from mailrelay.envelope import Recipient
from mailrelay.interfaces import DeliveryStatus, RecipientResult


class SMTPConnectError(Exception):
    """Connecting, the greeting, EHLO/HELO/LHLO, STARTTLS or AUTH failed.

    @ivar code: the RFC 3463 status: C{"4.4.1"} (connection refused, timed out, host not found),
        C{"4.4.2"} (connection lost or timed out later, protocol error), C{"4.7.4"} (TLS
        required but STARTTLS not offered: RFC 3463 X.7.4, security features not supported,
        as Postfix), C{"4.7.5"} (TLS required but refused, handshake or verification
        failed), C{"4.7.0"} (STARTTLS
        response injection, credentials withheld, no usable AUTH mechanism), C{"5.7.8"}
        (credentials rejected) or the status of the server's reply (STARTTLS refused when
        TLS is required: see C{refusedTLS}).
    @ivar diagnostic: RFC 3464 Diagnostic-Code form: C{"smtp; 554 5.7.1 go away"} for a reply,
        C{"X-mailrelay; connection refused by mx.example.org"} otherwise.
    @ivar permanent: C{True} for a 5xx greeting, EHLO and HELO, STARTTLS or AUTH reply.
    @ivar remoteMTA: RFC 3464 Remote-MTA form (C{"dns; mx.example.org"}), or C{None} when no
        server answered (refused, timed out, silent before its greeting): no remote MTA gave
        the status (RFC 3464 section 2.3.5), as Postfix leaves it out.
    @ivar tlsFailure: TLS failed, not the server's SMTP: the handshake failed or timed out
        (or TLS could not be started), or the connection was lost or timed out once TLS was
        up (Postfix's failed handshake and "TLS session failure"): what C{tls = "may"} may
        try again without TLS.  A response injection after STARTTLS is not one.
    @ivar loop: the server answered EHLO with the relay's own name: it is the relay itself
        (5.4.6; the backend decides whether that is final).
    @ivar command: the command whose reply C{diagnostic} is (C{"EHLO"}, C{"HELO"},
        C{"LHLO"}, C{"STARTTLS"}, C{"AUTH"}), as L{RecipientResult.command
        <mailrelay.interfaces.RecipientResult>}; C{None} for no reply, or the greeting's.
    @ivar refusedSetup: the server refused HELO (after EHLO) or LHLO, or STARTTLS that TLS
        required, with a 5xx: the recipients are returned when it is the last server to
        try, as Postfix's C{smtp_site_fail} at the final server does.  A 5xx greeting or
        AUTH reply is not one: Postfix defers those (C{smtp_skip_5xx_greeting},
        C{smtp_sasl_auth_soft_bounce}).
    @ivar remoteAddress: the address of the server whose reply it is (with C{remoteMTA},
        its name), or C{None} (see L{RecipientResult.remoteAddress
        <mailrelay.interfaces.RecipientResult>}).
    @ivar relay: the server whose reply it is as the log's C{relay=} says it
        (C{"mx.example.org[192.0.2.1]:25"}), set by the connection, or C{None}.
    @ivar sourceUnbound: the connection could not be made from its source address (the
        host no longer has it: Postfix's 4.4.0 "server configuration error"): a fault of
        this delivery's settings, not of the server.
    """

    def __init__(self, code: str, diagnostic: str, permanent: bool = False,
                 remoteMTA: str | None = None, *, tlsFailure: bool = False,
                 loop: bool = False, refusedSetup: bool = False,
                 command: str | None = None, refusedTLS: bool = False,
                 sourceUnbound: bool = False, remoteAddress: str | None = None) -> None:
        """
        @param refusedTLS: TLS was required and the server refused STARTTLS (its reply is
            the C{diagnostic}, its status the C{code}, as Postfix passes them on).
        """
        super().__init__(diagnostic)
        if permanent != code.startswith("5."):
            raise ValueError(f"permanent={permanent} does not match status {code}")
        self.code = code
        self.diagnostic = diagnostic
        self.permanent = permanent
        self.remoteMTA = remoteMTA
        self.tlsFailure = tlsFailure
        self.loop = loop
        self.refusedSetup = refusedSetup and permanent
        self.command = command
        self.refusedTLS = refusedTLS
        self.sourceUnbound = sourceUnbound
        self.remoteAddress = remoteAddress
        self.relay: str | None = None

    @property
    def withoutRequiredTLS(self) -> bool:
        """Whether the server gave no TLS (verified) that the settings required: not offered
        (4.7.4), refused (its reply), failed or not verified (4.7.5)."""
        return self.refusedTLS or self.code in ("4.7.4", "4.7.5")

    @property
    def described(self) -> str:
        """The diagnostic for the log, with the command it answered: C{"smtp; 535 5.7.8 no
        (in reply to AUTH command)"}."""
        if self.command is None:
            return self.diagnostic
        return f"{self.diagnostic} (in reply to {self.command} command)"

    def resultsFor(self, recipients: Sequence[Recipient]) -> list[RecipientResult]:
        """One L{RecipientResult} per recipient saying this error happened."""
        status = DeliveryStatus.PERMANENT if self.permanent else DeliveryStatus.TRANSIENT
        return [RecipientResult(r.address, status, self.code, self.diagnostic, self.remoteMTA,
                                command=self.command, remoteAddress=self.remoteAddress,
                                relay=self.relay)
                for r in recipients]

    def __repr__(self) -> str:
        return f"SMTPConnectError({self.code!r}, {self.diagnostic!r}, permanent={self.permanent})"


class ProtocolError(Exception):
    """The server broke the protocol (malformed reply, reply out of place)."""


class BareNewlineError(Exception):
    """The message content holds a CR not followed by LF, or an LF not preceded by CR."""


class SizeMismatchError(Exception):
    """The message content is not as long as announced (a BDAT chunk size, RFC 3030): the
    message file changed while it was sent."""

"""How the delivery client talks to one next hop: L{ClientSettings} and its
L{ClientTimeouts} (values, used by the sans-IO L{mailrelay.smtp.client.ClientSession} and
by the connection in L{mailrelay.delivery})."""

from __future__ import annotations

from dataclasses import dataclass, field

from mailrelay.interfaces import TLS_POLICIES


@dataclass(frozen=True)
class ClientTimeouts:
    """Seconds to wait at each step; the defaults are those of RFC 5321 section 4.5.3.2.

    C{starttls} covers the reply to STARTTLS and the TLS handshake; C{dataBlock} is the longest
    the connection may refuse to take more body data; C{dataDone} is the wait for the reply (for
    LMTP: each reply) after the final dot.
    """

    connect: float = 30
    greeting: float = 300
    ehlo: float = 300
    starttls: float = 120
    auth: float = 120
    mail: float = 300
    rcpt: float = 300
    dataInit: float = 120
    dataBlock: float = 180
    dataDone: float = 600
    rset: float = 20
    quit: float = 300


@dataclass(frozen=True)
class ClientSettings:
    """How to talk to one next hop.

    @ivar heloName: the name sent in EHLO/HELO/LHLO.
    @ivar lmtp: speak LMTP (RFC 2033): LHLO (no HELO fallback) and, after the final dot, one
        reply per accepted recipient.
    @ivar tls: C{"none"}: never STARTTLS.  C{"may"}: STARTTLS when offered, without certificate
        verification; plaintext when not offered or refused.  C{"required"}: STARTTLS must be
        offered and succeed, with the certificate chain and host name verified, else
        L{SMTPConnectError} 4.7.4 (not offered), the server's reply and status (refused),
        or 4.7.5.  C{"implicit"}: the caller's endpoint
        is TLS-wrapped (see L{clientTLSOptions}); verified like C{"required"} unless
        C{tlsVerify} is false.
    @ivar tlsVerify: with C{tls="implicit"} only, C{False}: the TLS is not verified
        (Postfix's C{encrypt} level): what a message's C{TLS-Required: No} (RFC 8689) makes of
        implicit TLS, which cannot be left out as STARTTLS can.
    @ivar caFile: a PEM bundle of trusted CA certificates, or C{None} for the platform's.
    @ivar username: authenticate (AUTH PLAIN, else LOGIN) with these credentials.
    @ivar authWithoutTLS: allow sending credentials on a connection without TLS.
    """

    heloName: str
    lmtp: bool = False
    tls: str = "may"
    caFile: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    authWithoutTLS: bool = False
    timeouts: ClientTimeouts = ClientTimeouts()
    tlsVerify: bool = True

    @property
    def verifiesTLS(self) -> bool:
        """Whether the server's certificate (chain and host name) is verified: C{"required"},
        and C{"implicit"} unless C{tlsVerify} is false."""
        return self.tls == "required" or (self.tls == "implicit" and self.tlsVerify)

    def __post_init__(self) -> None:
        if self.tls not in TLS_POLICIES:
            raise ValueError(f"tls must be one of {', '.join(TLS_POLICIES)}, not {self.tls!r}")
        if not self.tlsVerify and self.tls != "implicit":
            raise ValueError(f'tlsVerify=False goes with tls="implicit", not {self.tls!r}')
        if self.username is not None and self.password is None:
            raise ValueError("a username needs a password")
        if not self.heloName or any(c.isspace() for c in self.heloName):
            raise ValueError(f"bad heloName {self.heloName!r}")

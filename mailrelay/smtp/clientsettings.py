"""How the delivery client talks to one next hop: L{ClientSettings} and its
L{ClientTimeouts} (values, used by the sans-IO L{mailrelay.smtp.client.ClientSession} and
by the connection in L{mailrelay.delivery})."""

from __future__ import annotations

from dataclasses import dataclass, field

from mailrelay.interfaces import TLS_POLICIES, checkSourceAddresses


@dataclass(frozen=True)
class ClientTimeouts:
    """Seconds to wait at each step; the defaults are those of RFC 5321 section 4.5.3.2.

    C{starttls} covers the reply to STARTTLS and the TLS handshake; C{dataBlock} is the longest
    the connection may refuse to take more body data; C{dataDone} is the wait for the reply (for
    LMTP: each reply) after the final dot, or after the last BDAT chunk (each reply still due).
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


#: The certificate usages of DANE (RFC 7218) that SMTP uses (RFC 7672 section 3.1).
DANE_TA = 2
DANE_EE = 3

#: The sizes of the digests of TLSA matching types 1 (SHA2-256) and 2 (SHA2-512).
_DIGEST_SIZES = {1: 32, 2: 64}


@dataclass(frozen=True)
class TLSARecord:
    """One TLSA record (RFC 6698 section 2.1): its certificate usage, selector, matching type
    and certificate association data."""

    usage: int
    selector: int
    matchingType: int
    data: bytes

    def __str__(self) -> str:
        return f"{self.usage} {self.selector} {self.matchingType} {self.data.hex()}"

    @property
    def usable(self) -> bool:
        """Whether it can authenticate an SMTP server (RFC 7672 section 3.1): usage
        DANE-TA(2) or DANE-EE(3) (PKIX-TA(0) and PKIX-EE(1) are not, section 3.1.3), selector
        Cert(0) or SPKI(1), matching type Full(0), SHA2-256(1) or SHA2-512(2) with data of
        the digest's length (RFC 6698 section 2.1)."""
        if self.usage not in (DANE_TA, DANE_EE) or self.selector not in (0, 1):
            return False
        return len(self.data) == _DIGEST_SIZES.get(self.matchingType, -1) or (
            self.matchingType == 0 and bool(self.data))

    @classmethod
    def fromWire(cls, data: bytes) -> TLSARecord | None:
        """The record whose RDATA is C{data} (RFC 6698 section 2.1), C{None} when it is too
        short to be one."""
        if len(data) < 3:
            return None
        return cls(data[0], data[1], data[2], data[3:])


@dataclass(frozen=True)
class DANEPolicy:
    """The DANE TLSA records of one server (RFC 7672), found in DNSSEC-validated DNS.

    @ivar base: the owner name of the records (C{"_25._tcp.mx.example.org"}), for messages.
    @ivar records: the usable records (DANE-TA(2) and DANE-EE(3) with a known selector and
        matching type), at least one of which the server's certificate must match; empty when
        the server publishes records but none is usable: TLS is then mandatory but not
        verified (RFC 7672 section 2.2; Postfix's "encrypt" fallback of its "dane" level).
    @ivar names: the names a certificate matched by a DANE-TA(2) record must be for (the
        TLSA base domain, the securely CNAME-expanded next-hop domain, the next hop's domain:
        Postfix's DANE match list, RFC 7672 section 3.2.3); DANE-EE(3) has no name check
        (RFC 7672 section 3.1.1).
    """

    base: str
    records: tuple[TLSARecord, ...]
    names: tuple[str, ...]

    @property
    def baseDomain(self) -> str:
        """The TLSA base domain: C{base} without its port and protocol labels (the MX host,
        or its CNAME expansion where the records were found), the name to send in SNI (RFC
        7672 section 8.1)."""
        return self.base.split(".", 2)[2] if self.base.startswith("_") else self.base


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
    @ivar tlsa: with C{tls="required"} only: the server's DANE TLSA records, against which
        its certificate is checked instead of C{caFile} (L{DANEPolicy}; none usable: TLS
        without verification).
    @ivar caFile: a PEM bundle of trusted CA certificates, or C{None} for the platform's.
    @ivar username: authenticate (AUTH PLAIN, else LOGIN) with these credentials.
    @ivar authWithoutTLS: allow sending credentials on a connection without TLS.
    @ivar sourceAddress: the local IPv4 address connections to IPv4 addresses are made from
        (bound before connecting), or C{None}: the system's choice (Postfix's
        C{smtp_bind_address}).
    @ivar sourceAddress6: the same for IPv6 (Postfix's C{smtp_bind_address6}).
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
    tlsa: DANEPolicy | None = None
    sourceAddress: str | None = None
    sourceAddress6: str | None = None

    @property
    def verifiesTLS(self) -> bool:
        """Whether the server's certificate is verified (its chain and host name, or its DANE
        records): C{"required"} (unless its DANE records are all unusable), and C{"implicit"}
        unless C{tlsVerify} is false."""
        if self.tls == "required":
            return self.tlsa is None or bool(self.tlsa.records)
        return self.tls == "implicit" and self.tlsVerify

    def __post_init__(self) -> None:
        if self.tls not in TLS_POLICIES:
            raise ValueError(f"tls must be one of {', '.join(TLS_POLICIES)}, not {self.tls!r}")
        if not self.tlsVerify and self.tls != "implicit":
            raise ValueError(f'tlsVerify=False goes with tls="implicit", not {self.tls!r}')
        if self.tlsa is not None and self.tls != "required":
            raise ValueError(f'DANE records go with tls="required", not {self.tls!r}')
        if self.username is not None and self.password is None:
            raise ValueError("a username needs a password")
        if not self.heloName or any(c.isspace() for c in self.heloName):
            raise ValueError(f"bad heloName {self.heloName!r}")
        checkSourceAddresses(self)

    def sourceFor(self, family: int) -> tuple[str, int] | None:
        """The local address to bind a connection of address C{family} (4 or 6) to before
        connecting (any port), or C{None}."""
        address = self.sourceAddress6 if family == 6 else self.sourceAddress
        return None if address is None else (address, 0)

"""TLS for the delivery client: the client's TLS options for a next hop under a TLS policy
(L{clientTLSOptions}), and what a failed handshake is, in words (L{describeTLSFailure})."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_der_public_key,
)
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from service_identity import CertificateError, VerificationError
from service_identity.hazmat import (
    DNS_ID,
    DNSPattern,
    IPAddress_ID,
    IPAddressPattern,
    ServiceID,
    verify_service_identity,
)
from service_identity.pyopenssl import extract_patterns
from twisted.internet import error as ierror
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import (
    CertificateOptions,
    platformTrust,
    trustRootFromCertificates,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from mailrelay.pem import pemCertificates
from mailrelay.smtp.clientsettings import (
    DANE_EE,
    DANE_TA,
    ClientSettings,
    DANEPolicy,
    TLSARecord,
)


def _loadTrustRoot(caFile: str | None) -> Any:
    if caFile is None:
        return platformTrust()
    certificates = pemCertificates(Path(caFile).read_bytes())
    if not certificates:
        raise ValueError(f"no certificate in {caFile}")
    return trustRootFromCertificates(certificates)


def _isAddress(hostname: str) -> bool:
    return isIPAddress(hostname) or isIPv6Address(hostname)


@implementer(IOpenSSLClientConnectionCreator)
class _ClientTLS:
    """TLS to C{hostname} with C{options}, sending its name in SNI (not an IP address).  The
    name goes as the DNS has it: Python's IDNA codec leaves ASCII labels as they are, where
    Twisted's C{optionsForClientTLS} (the C{idna} package, IDNA 2008) refuses a host name
    with an underscore, which the DNS and Postfix allow (C{mx_1.example.org})."""

    def __init__(self, hostname: str, options: CertificateOptions) -> None:
        self._options = options
        self._sni = None if _isAddress(hostname) else hostname.encode("idna")

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = self._options.clientConnectionForTLS(tlsProtocol)
        if self._sni:
            connection.set_tlsext_host_name(self._sni)
        return connection


class _UnverifiedClientTLS(_ClientTLS):
    """TLS for C{tls="may"}: encryption without certificate verification (RFC 7435
    opportunistic security), with SNI."""

    def __init__(self, hostname: str) -> None:
        super().__init__(hostname, CertificateOptions())


#: OpenSSL's words for its certificate verification errors (C{X509_V_ERR_*}, x509_vfy.h) that
#: a next hop's certificate commonly has; those that say its issuer is not trusted are in
#: L{_UNTRUSTED}.
_VERIFY_ERRORS = {
    2: "unable to get issuer certificate",
    4: "unable to decrypt certificate's signature",
    6: "unable to decode issuer public key",
    7: "certificate signature failure",
    9: "certificate is not yet valid",
    10: "certificate has expired",
    13: "format error in certificate's notBefore field",
    14: "format error in certificate's notAfter field",
    18: "self-signed certificate",
    19: "self-signed certificate in certificate chain",
    20: "unable to get local issuer certificate",
    21: "unable to verify the first certificate",
    22: "certificate chain too long",
    23: "certificate revoked",
    24: "invalid CA certificate",
    25: "path length constraint exceeded",
    26: "unsupported certificate purpose",
    27: "certificate not trusted",
    28: "certificate rejected",
}
_UNTRUSTED = frozenset({2, 18, 19, 20, 21, 27})


class CertificateVerifyError(Exception):
    """OpenSSL refused the chain of the server's certificate: why (its verification error,
    in its words), at which depth (0: the server's own certificate) and whose certificate."""

    def __init__(self, error: int, depth: int, subject: str) -> None:
        self.error = error
        self.untrusted = error in _UNTRUSTED
        words = _VERIFY_ERRORS.get(error, f"verification error {error}")
        super().__init__(f"{words} at depth {depth}: {subject}")


class CertificateNameMismatch(Exception):
    """The server's certificate is not for the host name the relay connected to: which name
    that was, and the names the certificate gives (its DNS and IP address subjectAltNames,
    or the common names that stand for them: L{_namePatterns})."""

    def __init__(self, hostname: str, patterns: Sequence[Any]) -> None:
        names = [
            p.pattern.decode("ascii", "replace") if isinstance(p.pattern, bytes) else str(p.pattern)
            for p in patterns
            if isinstance(p, (DNSPattern, IPAddressPattern))
        ]
        which = (f"which names {', '.join(names)}" if names
                 else "which names no host (no DNS or IP address subjectAltName)")
        super().__init__(f"{hostname} is not a name of the certificate, {which}")


def _namePatterns(certificate: Any, commonNameFallback: bool) -> list[Any]:
    """The names C{certificate} gives for checking a host name against (service_identity's
    patterns of its subjectAltNames); with C{commonNameFallback}, when none of them is a DNS
    name, its subject's common names too, as DNS names (RFC 6125 section 6.4.4: a CN-ID only
    when there is no DNS-ID; OpenSSL's X509_check_host and Postfix's smtp do the same).

    @raise CertificateError: a name cannot be read (a wildcard over a whole top-level
        domain...)."""
    patterns = list(extract_patterns(certificate))
    if not commonNameFallback or any(isinstance(p, DNSPattern) for p in patterns):
        return patterns
    subject = certificate.to_cryptography().subject
    return patterns + [DNSPattern.from_bytes(str(a.value).encode("utf-8"))
                       for a in subject.get_attributes_for_oid(NameOID.COMMON_NAME)]


def _subject(certificate: Any) -> str:
    """A certificate's subject (RFC 4514: C{CN=mx.example,O=Example})."""
    return str(certificate.to_cryptography().subject.rfc4514_string())


class _VerifiedClientTLS(_ClientTLS):
    """TLS for C{tls="required"} and C{"implicit"}: the chain verified against C{trustRoot}
    by OpenSSL, SNI, and the certificate's names checked here (service_identity, the host name
    compared as ASCII labels, an underscore taken as OpenSSL's X509_check_host takes it).
    Not Twisted's C{optionsForClientTLS}: it refuses such host names, and its own check only
    fails the handshake on a mismatch: when the certificate's names cannot be read
    (service_identity's C{CertificateError}, e.g. a wildcard over a whole top-level domain)
    it logs the error and lets the handshake succeed as verified, whatever the names.  A chain
    OpenSSL refuses fails the handshake with a L{CertificateVerifyError} saying why (expired,
    issuer unknown...), as Postfix's log does, not just "certificate verify failed".  With
    C{commonNameFallback} a certificate without DNS subjectAltNames is checked against its
    subject's common names (L{_namePatterns}), as Postfix's smtp does."""

    def __init__(self, hostname: str, trustRoot: Any, commonNameFallback: bool) -> None:
        super().__init__(hostname, CertificateOptions(trustRoot=trustRoot))
        self._hostname = hostname
        self._commonNameFallback = commonNameFallback
        self._identity: ServiceID = (
            IPAddress_ID(hostname) if _isAddress(hostname) else DNS_ID(hostname))

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = super().clientConnectionForTLS(tlsProtocol)
        hostname, identity = self._hostname, self._identity
        commonNameFallback = self._commonNameFallback

        def verify(_connection: SSL.Connection, certificate: Any, error: int, depth: int,
                   ok: int) -> bool:
            try:
                if not ok:  # (OpenSSL verifies the chain): say why it refused it
                    tlsProtocol.failVerification(Failure(
                        CertificateVerifyError(error, depth, _subject(certificate))))
                    return False
                if depth != 0:
                    return True
                patterns = _namePatterns(certificate, commonNameFallback)
                verify_service_identity(patterns, [identity], [])
            except VerificationError:
                tlsProtocol.failVerification(Failure(CertificateNameMismatch(hostname, patterns)))
                return False
            except CertificateError as e:
                tlsProtocol.failVerification(Failure(e))
                return False
            except BaseException:  # (an exception must not reach OpenSSL)
                tlsProtocol.failVerification(Failure())
                return False
            return True

        connection.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, verify)
        return connection


class DANEMismatch(Exception):
    """The server's certificate matches none of its DANE TLSA records (RFC 7672 section 3):
    which server, which records, and why."""

    def __init__(self, hostname: str, base: str, why: str) -> None:
        super().__init__(f"DANE: the certificate of {hostname} matches no TLSA record of "
                         f"{base}: {why}")


_DIGESTS = {1: hashlib.sha256, 2: hashlib.sha512}


def tlsaMatches(record: TLSARecord, certificate: x509.Certificate) -> bool:
    """Whether C{certificate} is the one C{record} names: its DER encoding (selector 0) or
    its SubjectPublicKeyInfo's (1), whole or digested (RFC 6698 section 2.1)."""
    if record.selector == 0:
        selected = certificate.public_bytes(Encoding.DER)
    else:
        selected = certificate.public_key().public_bytes(
            Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    digest = _DIGESTS.get(record.matchingType)
    return (digest(selected).digest() if digest is not None else selected) == record.data


def _issued(certificate: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        certificate.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _signedByKey(certificate: x509.Certificate, record: TLSARecord) -> bool:
    """Whether C{certificate} was signed with the public key C{record} holds whole
    (SPKI(1) Full(0): a trust anchor published as a bare key, RFC 7671 section 5.2.2): an
    RSA (PKCS#1 v1.5 or PSS, as the certificate says), ECDSA, Ed25519 or Ed448 signature."""
    if record.selector != 1 or record.matchingType != 0:
        return False  # (a digest, or a certificate: its certificate must be sent)
    signature, signed = certificate.signature, certificate.tbs_certificate_bytes
    try:
        key = load_der_public_key(record.data)
        if isinstance(key, rsa.RSAPublicKey):
            padding = certificate.signature_algorithm_parameters
            if padding is None or certificate.signature_hash_algorithm is None:
                return False
            key.verify(signature, signed, padding,  # type: ignore[arg-type]
                       certificate.signature_hash_algorithm)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            if certificate.signature_hash_algorithm is None:
                return False
            key.verify(signature, signed, ec.ECDSA(certificate.signature_hash_algorithm))
        elif isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
            key.verify(signature, signed)
        else:
            return False  # (DSA, X25519...: no certificate of a mail server is signed so)
    except (ValueError, TypeError, UnsupportedAlgorithm, InvalidSignature):
        return False
    return True


def _current(certificate: x509.Certificate, now: datetime) -> bool:
    return certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc


def daneProblem(policy: DANEPolicy, chain: Sequence[x509.Certificate], leaf: Any,
                now: datetime) -> str | None:
    """Why the server's certificate chain C{chain} (its own first, as it sent it) is not
    authenticated by C{policy}'s records, or C{None} when it is (RFC 7672 section 3.1):

      - DANE-EE(3): the server's certificate matches; nothing else is checked (no name,
        no expiry: section 3.1.1);
      - DANE-TA(2): a certificate the server sent, other than its own, matches, and the
        server's certificate chains up to it (each signed by the next, every one below the
        trust anchor current), and is for one of C{policy.names} (section 3.1.2; Postfix's
        match list: the MX host, the next hop's domain).  A record holding the anchor's
        public key whole (SPKI(1) Full(0)) need not have its certificate sent: the topmost
        certificate of the chain the server sent must then be signed by that key (RFC 7671
        section 5.2.2; L{_signedByKey}).

    @param leaf: the server's certificate as pyOpenSSL has it (for its names).
    """
    if not chain:
        return "the server sent no certificate"
    server = chain[0]
    records = policy.records
    if any(r.usage == DANE_EE and tlsaMatches(r, server) for r in records):
        return None
    anchors = [r for r in records if r.usage == DANE_TA]
    if not anchors:
        return "its certificate does not match the DANE-EE records"
    path, others = [server], list(chain[1:])
    for _ in range(len(chain)):
        issuer = next((c for c in others if _issued(path[-1], c)), None)
        if issuer is None:
            if any(_signedByKey(path[-1], r) for r in anchors):
                below = path  # (the anchor, a bare key, is not among them)
                break
            return ("its certificate does not match the DANE-EE records, and does not chain "
                    "to a trust anchor of the DANE-TA records among the certificates it sent")
        others.remove(issuer)
        path.append(issuer)
        if any(tlsaMatches(r, issuer) for r in anchors):
            below = path[:-1]
            break
    else:  # pragma: no cover - the last round finds no issuer left
        return "its certificate chain reaches no trust anchor of the DANE-TA records"
    expired = next((c for c in below if not _current(c, now)), None)
    if expired is not None:
        return f"certificate {expired.subject.rfc4514_string()} is expired or not yet valid"
    patterns = _namePatterns(leaf, commonNameFallback=True)
    for name in policy.names:
        try:
            verify_service_identity(patterns, [DNS_ID(name)], [])
        except VerificationError:
            continue
        return None
    return str(CertificateNameMismatch(" or ".join(policy.names), patterns))


class _DANEClientTLS(_ClientTLS):
    """TLS for a server with DANE TLSA records (L{DANEPolicy}): its certificate checked
    against them (L{daneProblem}), not against a trust store; a mismatch fails the handshake
    with a L{DANEMismatch}.  The check is made in OpenSSL's verification callback, at the
    server's certificate, on the chain the server sent.  The name sent in SNI is the TLSA
    base domain (RFC 7672 section 8.1, as Postfix): the MX host, or its CNAME expansion
    where the records were found."""

    def __init__(self, hostname: str, policy: DANEPolicy) -> None:
        super().__init__(policy.baseDomain, CertificateOptions())
        self._hostname = hostname
        self._policy = policy

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = super().clientConnectionForTLS(tlsProtocol)
        checked: list[str | None] = []

        def verify(connection: SSL.Connection, certificate: Any, error: int, depth: int,
                   ok: int) -> bool:
            if depth != 0:
                return True  # (no trust store: the records decide, at the server's own)
            try:
                if not checked:
                    sent = connection.get_peer_cert_chain() or [certificate]
                    chain = [c.to_cryptography() for c in sent]
                    checked.append(daneProblem(self._policy, chain, certificate,
                                                datetime.now(UTC)))
                if checked[0] is None:
                    return True
                tlsProtocol.failVerification(Failure(
                    DANEMismatch(self._hostname, self._policy.base, checked[0])))
            except BaseException:  # (an exception must not reach OpenSSL)
                tlsProtocol.failVerification(Failure())
            return False

        connection.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, verify)
        return connection


def verifiedClientTLS(hostname: str, trustRoot: Any = None) -> IOpenSSLClientConnectionCreator:
    """TLS to C{hostname} verified against C{trustRoot} (by default the platform's trust
    store): the certificate's chain and names, as for C{tls="required"} but by its
    subjectAltNames only, never its common name (HTTPS, RFC 9110 section 4.3.4 and RFC 6125
    as browsers apply them): for the MTA-STS policy fetches (RFC 8461 section 3.3)."""
    return _VerifiedClientTLS(
        hostname, platformTrust() if trustRoot is None else trustRoot, commonNameFallback=False)


def clientTLSOptions(settings: ClientSettings, hostname: str) -> IOpenSSLClientConnectionCreator:
    """The TLS client options for C{hostname} under C{settings}.

    With C{settings.tlsa}: its usable TLSA records verify the certificate (L{daneProblem});
    with none usable, nothing is verified.  For C{tls="required"} and C{"implicit"} (unless
    C{settings.tlsVerify} is false): verifying the chain against C{settings.caFile} (or the
    platform's trust store) and the host name (service_identity; the common name when there
    is no DNS subjectAltName, as Postfix).
    Otherwise: no verification.  For implicit TLS wrap the endpoint with it::

        endpoint = wrapClientTLS(clientTLSOptions(settings, host), TCP4ClientEndpoint(...))

    @raise OSError, ValueError: the CA file cannot be read or holds no certificate.
    """
    if settings.tlsa is not None:
        if settings.tlsa.records:
            return _DANEClientTLS(hostname, settings.tlsa)
        return _UnverifiedClientTLS(hostname)  # (records, none usable: RFC 7672 2.2)
    if settings.verifiesTLS:
        return _VerifiedClientTLS(hostname, _loadTrustRoot(settings.caFile),
                                  commonNameFallback=True)
    return _UnverifiedClientTLS(hostname)


def _openSSLReasons(error: SSL.Error) -> str:
    """The reasons of OpenSSL's error list (C{[(library, function, reason), ...]}), each once:
    C{"wrong version number"}."""
    entries = error.args[0] if error.args else None
    if isinstance(entries, list) and entries and all(
        isinstance(e, tuple) and len(e) == 3 for e in entries
    ):
        return "; ".join(dict.fromkeys(str(e[2]) or str(e[0]) for e in entries))
    return str(error)


def describeTLSFailure(reason: Failure) -> str:
    """Why a TLS handshake failed, in words for logs and diagnostics."""
    value = reason.value
    if isinstance(value, DANEMismatch):
        return str(value)
    if isinstance(value, (CertificateNameMismatch, VerificationError)):
        return f"certificate host name mismatch ({value})"
    if isinstance(value, CertificateError):
        return f"certificate host name mismatch (its names cannot be checked: {value})"
    if isinstance(value, CertificateVerifyError):
        if value.untrusted:
            return f"certificate not trusted ({value})"
        return f"certificate verification failed ({value})"
    if isinstance(value, SSL.Error):
        text = _openSSLReasons(value)
        if "certificate verify failed" in text:
            return "certificate not trusted (certificate verify failed)"
        return f"TLS error: {text}"
    if isinstance(value, (ierror.ConnectionDone, ierror.ConnectionLost)):
        return "connection closed during the handshake"
    return str(value) or type(value).__name__

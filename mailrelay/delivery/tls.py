"""TLS for the delivery client: the client's TLS options for a next hop under a TLS policy
(L{clientTLSOptions}), and what a failed handshake is, in words (L{describeTLSFailure})."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from OpenSSL import SSL
from twisted.internet import error as ierror
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import (
    CertificateOptions,
    optionsForClientTLS,
    platformTrust,
    trustRootFromCertificates,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from mailrelay.config.values import pemCertificates
from mailrelay.smtp.clientsettings import ClientSettings


def _loadTrustRoot(caFile: str | None) -> Any:
    if caFile is None:
        return platformTrust()
    certificates = pemCertificates(Path(caFile).read_bytes())
    if not certificates:
        raise ValueError(f"no certificate in {caFile}")
    return trustRootFromCertificates(certificates)


@implementer(IOpenSSLClientConnectionCreator)
class _UnverifiedClientTLS:
    """TLS for C{tls="may"}: encryption without certificate verification (RFC 7435
    opportunistic security), with SNI."""

    def __init__(self, hostname: str) -> None:
        self._context = CertificateOptions().getContext()
        self._sni = None if isIPAddress(hostname) or isIPv6Address(hostname) else (
            hostname.encode("idna"))

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        if self._sni:
            connection.set_tlsext_host_name(self._sni)
        return connection


def clientTLSOptions(settings: ClientSettings, hostname: str) -> IOpenSSLClientConnectionCreator:
    """The TLS client options for C{hostname} under C{settings}.

    For C{tls="required"} and C{"implicit"}: verifying the chain against C{settings.caFile} (or
    the platform's trust store) and the host name (service_identity).  Otherwise: no
    verification.  For implicit TLS wrap the endpoint with it::

        endpoint = wrapClientTLS(clientTLSOptions(settings, host), TCP4ClientEndpoint(...))

    @raise OSError, ValueError: the CA file cannot be read or holds no certificate.
    """
    if settings.tls in ("required", "implicit"):
        return optionsForClientTLS(hostname, trustRoot=_loadTrustRoot(settings.caFile))
    return _UnverifiedClientTLS(hostname)


def describeTLSFailure(reason: Failure) -> str:
    """Why a TLS handshake failed, in words for logs and diagnostics."""
    value = reason.value
    try:
        from service_identity import VerificationError
    except ImportError:  # pragma: no cover
        VerificationError = ()  # type: ignore[assignment,misc]
    if isinstance(value, VerificationError):
        return f"certificate host name mismatch ({value})"
    if isinstance(value, SSL.Error):
        text = str(value)
        if "certificate verify failed" in text:
            return "certificate not trusted (certificate verify failed)"
        return f"TLS error {text}"
    if isinstance(value, (ierror.ConnectionDone, ierror.ConnectionLost)):
        return "connection closed during the handshake"
    return str(value) or type(value).__name__

"""Certificates made to measure for TLS client tests (what trustme cannot issue: no
subjectAltName at all, DNS names that are not IDNA-valid such as C{mx_1.example.org}), and an
in-memory TLS handshake (L{twisted.test.iosim}) to try a client's connection creator on."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet.interfaces import IHandshakeListener, IOpenSSLServerConnectionCreator
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, trustRootFromCertificates
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test import iosim
from zope.interface import implementer


def _name(commonName: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, commonName)])


class CA:
    """A certificate authority (one self-signed certificate) issuing server certificates."""

    def __init__(self) -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._cert = self._builder(_name("mailrelay test CA"), self._key).add_extension(
            x509.BasicConstraints(ca=True, path_length=None), critical=True
        ).sign(self._key, hashes.SHA256())

    def _builder(self, subject: x509.Name, key: Any, expired: bool = False
                 ) -> x509.CertificateBuilder:
        now = datetime.datetime.now(datetime.timezone.utc)
        if expired:  # (a day ago)
            now -= datetime.timedelta(days=2)
        return (x509.CertificateBuilder()
                .subject_name(subject)
                .issuer_name(_name("mailrelay test CA"))
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(hours=1))
                .not_valid_after(now + datetime.timedelta(days=1)))

    @property
    def trustRoot(self) -> Any:
        """This CA as a Twisted trust root."""
        return trustRootFromCertificates([Certificate.loadPEM(self.pem)])

    @property
    def pem(self) -> bytes:
        return self._cert.public_bytes(serialization.Encoding.PEM)

    @property
    def certificate(self) -> x509.Certificate:
        """This CA's own certificate."""
        return self._cert

    def issue(self, commonName: str = "server", dnsNames: tuple[str, ...] | None = None,
              *, expired: bool = False) -> ServerCertificate:
        """A server certificate with the subject C{CN=commonName} and, unless C{dnsNames} is
        C{None}, a subjectAltName of these DNS names, taken as they are (no IDNA check);
        C{expired}: one that expired a day ago."""
        key = ec.generate_private_key(ec.SECP256R1())
        builder = self._builder(_name(commonName), key, expired)
        if dnsNames is not None:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName(n) for n in dnsNames]), critical=False)
        return ServerCertificate(builder.sign(self._key, hashes.SHA256()), key)


@implementer(IOpenSSLServerConnectionCreator)
class ServerCertificate:
    """A server's certificate and key: its TLS for L{TLSMemoryBIOFactory} (recording the
    server names the clients ask for), or in files (L{writeTo})."""

    def __init__(self, certificate: x509.Certificate, key: Any) -> None:
        self.certificate, self.key = certificate, key
        #: The certificates sent after the server's own (its chain).
        self.chain: list[x509.Certificate] = []
        self.serverNames: list[bytes | None] = []  # (the SNI of each handshake)

    def writeTo(self, directory: Path) -> tuple[Path, Path]:
        """The certificate and its key in PEM files in C{directory}: their paths."""
        certificate, key = directory / "server.pem", directory / "server.key"
        certificate.write_bytes(self.certificate.public_bytes(serialization.Encoding.PEM))
        key.write_bytes(self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        return certificate, key

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        context = SSL.Context(SSL.TLS_METHOD)
        context.use_certificate(self.certificate)
        context.use_privatekey(self.key)
        for certificate in self.chain:
            context.add_extra_chain_cert(certificate)
        context.set_tlsext_servername_callback(
            lambda connection: self.serverNames.append(connection.get_servername()))
        return SSL.Connection(context, None)


@implementer(IHandshakeListener)
class _Client(Protocol):
    def __init__(self) -> None:
        self.completed = False
        self.lost: Failure | None = None

    def handshakeCompleted(self) -> None:
        self.completed = True

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost = reason


def handshake(creator: Any, server: ServerCertificate) -> Failure | None:
    """A TLS handshake in memory between C{creator} (an C{IOpenSSLClientConnectionCreator})
    and a server presenting C{server}: C{None} when it completed, else why the client lost
    the connection."""
    serverFactory = TLSMemoryBIOFactory(server, False, Factory.forProtocol(Protocol))
    client = _Client()
    clientFactory = TLSMemoryBIOFactory(creator, True, Factory.forProtocol(lambda: client))
    _, _, pump = iosim.connectedServerAndClient(
        lambda: serverFactory.buildProtocol(None), lambda: clientFactory.buildProtocol(None),
        greet=False)
    pump.flush()
    if client.completed and client.lost is None:
        return None
    return client.lost or Failure(AssertionError("the handshake neither completed nor failed"))

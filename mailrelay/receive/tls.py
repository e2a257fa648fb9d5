"""Server-side TLS: loading and checking a listener's certificate and key, and describing a
TLS session for logs and C{Received:}.

L{loadServerTLS} reads the PEM files named in a listener's configuration and returns the
Twisted C{CertificateOptions} its connections use, for STARTTLS (C{transport.startTLS}) and
for implicit TLS (C{TLSMemoryBIOFactory} around the listener's factory) alike.  Every problem
(missing or unreadable file, no certificate, no key, an encrypted key, a key that does not
belong to the certificate, an unknown cipher string) raises L{TLSConfigError} with a message
naming the file; the configuration loader turns it into a C{ConfigError} naming the key.  A
certificate that has expired, or is not valid yet, is not an error (the relay keeps serving
plaintext clients, and opportunistic TLS clients do not verify): it is returned in
L{ServerTLS.warnings}, which the service logs at start-up.
"""

from __future__ import annotations

import datetime
import os
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.utils import CryptographyDeprecationWarning
from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.ssl import AcceptableCiphers, CertificateOptions, TLSVersion
from zope.interface import implementer

# (Its home is smtp.wire, which the delivery client shares; named here for its users.)
from mailrelay.namedfile import readError, readNamedFile
from mailrelay.pem import pemCertificates
from mailrelay.smtp.wire import describeTLS as describeTLS

#: The values of C{tls_min_version}, lowest first.
TLS_VERSIONS: dict[str, Any] = {"TLSv1.2": TLSVersion.TLSv1_2, "TLSv1.3": TLSVersion.TLSv1_3}
DEFAULT_TLS_MIN_VERSION = "TLSv1.2"


class TLSConfigError(ValueError):
    """A listener's certificate, key or TLS settings cannot be used; the message says why and
    names the file.

    @ivar setting: which setting is at fault: C{"certificate"}, C{"key"}, C{"ciphers"} or
        C{"version"} (the configuration names the matching key).
    """

    def __init__(self, message: str, setting: str = "certificate") -> None:
        super().__init__(message)
        self.setting = setting


@dataclass
class ServerTLS:
    """A listener's TLS material, checked.

    @ivar options: the C{CertificateOptions} for the listener's connections (an
        C{IOpenSSLServerConnectionCreator}).
    @ivar subject: the leaf certificate's subject, for logs.
    @ivar notAfter: when the leaf certificate expires.
    @ivar warnings: problems that do not stop start-up (expired, not yet valid), in words.
    @ivar files: the bytes it was made of, by file (the certificate's, the key's): handed
        by the relay to the processes it starts, which serve them as it does.
    """

    options: CertificateOptions
    subject: str
    notAfter: datetime.datetime
    warnings: list[str] = field(default_factory=list)
    files: dict[str, bytes] = field(default_factory=dict, repr=False)


def _read(path: str, what: str, given: Mapping[str, bytes]) -> bytes:
    if path in given:
        return given[path]
    try:
        return readNamedFile(path)
    except OSError as e:
        message = f"cannot read the {what} file {path!r}: {readError(e)}"
        raise TLSConfigError(message, what) from None


def loadServerTLS(
    certificateFile: str,
    keyFile: str,
    *,
    minVersion: str = DEFAULT_TLS_MIN_VERSION,
    ciphers: str | None = None,
    now: datetime.datetime | None = None,
    files: Mapping[str, bytes] | None = None,
) -> ServerTLS:
    """Load and check a listener's certificate chain and private key.

    @param certificateFile: a PEM file: the server's certificate first, then any intermediate
        certificates (the chain sent to clients).  It may also hold the key.
    @param keyFile: a PEM file holding the (unencrypted) private key; it may be
        C{certificateFile} itself.
    @param minVersion: the lowest TLS version accepted, a key of L{TLS_VERSIONS}.
    @param ciphers: an OpenSSL cipher string for TLS 1.2 (TLS 1.3's suites are always the
        OpenSSL defaults), or C{None} for Twisted's default selection.
    @param now: the time to check validity against (tests); default: now.
    @param files: the bytes to take for these files, by path, rather than read them: the
        relay's, in a process it started (see L{ServerTLS.files}).
    @raise TLSConfigError: the message says what is wrong and names the file.
    """
    given = files or {}
    if minVersion not in TLS_VERSIONS:
        raise TLSConfigError(
            f"unknown TLS version {minVersion!r}; choose one of {', '.join(TLS_VERSIONS)}",
            "version",
        )
    certData = _read(certificateFile, "certificate", given)
    try:
        chain = x509.load_pem_x509_certificates(certData)
    except ValueError:
        raise TLSConfigError(
            f"the certificate file {certificateFile!r} holds no PEM certificate "
            '(no valid "-----BEGIN CERTIFICATE-----" block)'
        ) from None
    keyData = certData if keyFile == certificateFile else _read(keyFile, "key", given)
    key = _loadKey(keyData, keyFile, chain[0], certificateFile)
    acceptable = None
    if ciphers is not None:
        acceptable = AcceptableCiphers.fromOpenSSLCipherString(ciphers)
        if not acceptable._ciphers:  # nothing this OpenSSL knows
            raise TLSConfigError(
                f"the cipher string {ciphers!r} selects no cipher OpenSSL knows", "ciphers"
            )
    try:
        options = CertificateOptions(
            # cryptography objects: pyOpenSSL deprecates its own X509/PKey in contexts.
            privateKey=key,  # type: ignore[arg-type]
            certificate=chain[0],  # type: ignore[arg-type]
            extraCertChain=list(chain[1:]),  # type: ignore[arg-type]
            raiseMinimumTo=TLS_VERSIONS[minVersion],
            acceptableCiphers=acceptable,
        )
        options.getContext()  # builds the context now: any OpenSSL complaint stops start-up
    except (SSL.Error, ValueError, TypeError) as e:
        raise TLSConfigError(
            f"OpenSSL refuses the certificate {certificateFile!r} and key {keyFile!r}: {e}"
        ) from None
    described = _described(options, chain[0], certificateFile, now)
    described.files = {certificateFile: certData, keyFile: keyData}
    return described


def loadEndpointTLS(
    description: str, files: Mapping[str, bytes] | None = None
) -> tuple[Any, dict[str, bytes]]:
    """The TLS options of the C{ssl:} server endpoint C{description}, made as Twisted's
    parser makes them (of its C{privateKey=}, C{certKey=}, C{extraCertChain=},
    C{dhParameters=} and C{sslmethod=}), but of the files' bytes read once here, or taken
    from C{files} (by path, as the description names them: the relay's, in a process it
    started); returned with the bytes, by path (see L{ServerTLS.files}).

    @raise Exception: as Twisted's parser (C{OSError}, C{ValueError}, OpenSSL's errors).
    """
    from twisted.internet import endpoints, ssl
    from twisted.python.filepath import FilePath

    given = files or {}
    options = endpoints._parse(description)[1]
    read: dict[str, bytes] = {}

    def content(path: str) -> bytes:
        if path not in read:
            read[path] = given[path] if path in given else FilePath(path).getContent()
        return read[path]

    privateKey = options.get("privateKey", "server.pem")
    certKey = options.get("certKey") or privateKey
    pair = ssl.PrivateCertificate.loadPEM(content(certKey) + b"\n" + content(privateKey))
    chain = None
    chainFile = options.get("extraCertChain")
    if chainFile is not None:
        # (Read as a CA file is: a block that cannot be read stops the start, naming it,
        # where Twisted's parser leaves one without its END line out of the chain.)
        chain = [c.original for c in pemCertificates(content(chainFile))]
        if not chain:
            raise ValueError(f"Specified chain file {chainFile!r} doesn't contain any valid "
                             "certificates in PEM format.")
    method = options.get("sslmethod")
    extra = {} if method is None else {"method": getattr(ssl.SSL, method)}
    dhFile = options.get("dhParameters")
    with ExitStack() as atPath:
        dh = None
        if dhFile is not None:
            # (OpenSSL's load_tmp_dh takes a path: the bytes read are put at one while the
            # context is made, now; it is kept and serves every connection.)
            path = atPath.enter_context(_dataPath(_dhParameters(dhFile, content(dhFile))))
            dh = ssl.DiffieHellmanParameters.fromFile(FilePath(path))
        made = ssl.CertificateOptions(
            privateKey=pair.privateKey.original,
            certificate=pair.original,
            extraCertChain=chain,
            dhParameters=dh,
            **extra,
        )
        made.getContext()
    return made, read


def _dhParameters(path: str, data: bytes) -> bytes:
    """C{data}, the content of the C{dhParameters=} file C{path}, checked.

    @raise ValueError: it holds no PEM DH parameters (the message names the file)."""
    try:
        with warnings.catch_warnings():  # (that FFDH is deprecated: the site's choice)
            warnings.simplefilter("ignore", CryptographyDeprecationWarning)
            serialization.load_pem_parameters(data)
    except ValueError:
        raise ValueError(f"dhParameters file {path!r} holds no PEM DH parameters") from None
    return data


@contextmanager
def _dataPath(data: bytes) -> Iterator[str]:
    """A path that OpenSSL can open, holding C{data}, while the context lasts: a memory
    file's (Linux's C{memfd}, by its C{/proc/self/fd} path), else a private temporary
    file's."""
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        fd = os.memfd_create("mailrelay-tls", os.MFD_CLOEXEC)
        try:
            with open(fd, "wb", closefd=False) as f:
                f.write(data)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    with tempfile.NamedTemporaryFile() as f:
        f.write(data)
        f.flush()
        yield f.name


def describeServerTLS(
    options: Any, certificateFile: str, now: datetime.datetime | None = None
) -> ServerTLS:
    """The L{ServerTLS} of TLS C{options} loaded elsewhere (Twisted's C{CertificateOptions}
    of an C{ssl:} endpoint, from C{certificateFile}): its leaf certificate's subject, end of
    validity and warnings, for the log, as L{loadServerTLS} gives them."""
    leaf = options.certificate
    if hasattr(leaf, "to_cryptography"):  # (pyOpenSSL's X509, as Twisted loads it)
        leaf = leaf.to_cryptography()
    return _described(options, leaf, certificateFile, now)


def _described(
    options: Any, leaf: x509.Certificate, certificateFile: str, now: datetime.datetime | None
) -> ServerTLS:
    now = now or datetime.datetime.now(datetime.UTC)
    return ServerTLS(
        options=options,
        subject=leaf.subject.rfc4514_string(),
        notAfter=leaf.not_valid_after_utc,
        warnings=_validityWarnings(leaf, certificateFile, now),
    )


def _loadKey(keyData: bytes, keyFile: str, leaf: x509.Certificate, certificateFile: str) -> Any:
    """The unencrypted private key in C{keyData}, checked to belong to C{leaf}."""
    if b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in keyData or b"Proc-Type: 4,ENCRYPTED" in keyData:
        raise TLSConfigError(
            f"the private key in {keyFile!r} is encrypted; the relay needs an unencrypted key "
            "(readable by the relay only)",
            "key",
        )
    try:
        key = serialization.load_pem_private_key(keyData, password=None)
    except (ValueError, TypeError) as e:
        raise TLSConfigError(
            f"the key file {keyFile!r} holds no usable PEM private key ({e})", "key"
        ) from None
    der, spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if leaf.public_key().public_bytes(der, spki) != key.public_key().public_bytes(der, spki):
        raise TLSConfigError(
            f"the private key in {keyFile!r} does not belong to the certificate in "
            f"{certificateFile!r} (the first certificate of the file must be the server's)",
            "key",
        )
    return key


def _validityWarnings(
    leaf: x509.Certificate, certificateFile: str, now: datetime.datetime
) -> list[str]:
    """Why C{leaf} is not valid at C{now} (expired, not yet valid), in words; or nothing."""
    subject = leaf.subject.rfc4514_string()
    notAfter = leaf.not_valid_after_utc
    if notAfter < now:
        return [
            f"the certificate {certificateFile!r} ({subject}) expired on "
            f"{notAfter:%Y-%m-%d %H:%M} UTC"
        ]
    if leaf.not_valid_before_utc > now:
        return [
            f"the certificate {certificateFile!r} ({subject}) is not valid before "
            f"{leaf.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
        ]
    return []


def matchServerName(name: str, candidates: Mapping[str, Any]) -> Any:
    """The value of C{candidates} (keyed by lower-case host names and C{"*.domain"}
    wildcards) for the server name C{name}, or C{None}.  An exact name wins over a wildcard;
    a wildcard covers one label only (C{"*.example.org"} covers C{"mx.example.org"}, not
    C{"example.org"} nor C{"a.mx.example.org"})."""
    name = name.lower().rstrip(".")
    if name in candidates:
        return candidates[name]
    head, dot, parent = name.partition(".")
    if head and dot and parent:
        return candidates.get("*." + parent)
    return None


@implementer(IOpenSSLServerConnectionCreator)
class SNIServerOptions:
    """A server context factory that presents the certificate matching the name the client
    asks for (TLS SNI, RFC 6066), and C{default}'s for no name or an unknown one.

    It can stand wherever Twisted takes server TLS options: C{transport.startTLS} (STARTTLS)
    and C{TLSMemoryBIOFactory} (implicit TLS).  Every connection starts with C{default}'s
    context; pyOpenSSL's server name callback switches it before the certificate is sent.

    @ivar selected: how many handshakes were switched to each name's certificate (for tests
        and curiosity).
    """

    def __init__(
        self, default: CertificateOptions, byName: Mapping[str, CertificateOptions]
    ) -> None:
        self._context = default.getContext()
        self._contexts = {name: (name, options.getContext()) for name, options in byName.items()}
        self._context.set_tlsext_servername_callback(self._serverName)
        self.selected: dict[str, int] = {}

    def getContext(self) -> SSL.Context:
        """The default context (old-style context factory API)."""
        return self._context

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        return SSL.Connection(self._context, None)

    def _serverName(self, connection: SSL.Connection) -> None:
        try:
            raw = connection.get_servername()
            if not raw:
                return
            found = matchServerName(raw.decode("ascii", "replace"), self._contexts)
            if found is not None:
                key, context = found
                connection.set_context(context)
                self.selected[key] = self.selected.get(key, 0) + 1
        except Exception:  # pragma: no cover - never fail a handshake over the name
            pass

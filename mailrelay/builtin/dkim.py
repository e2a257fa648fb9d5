"""DKIM signing (RFC 6376; Ed25519 keys, RFC 8463): the built-in message filter C{dkim-sign},
with C{dkimpy}.

Each message of ours (from an authenticated client, a client in the relay networks, or made
by the relay itself) whose C{From:} domain (or, configured so, envelope sender domain) has a
key gets a C{DKIM-Signature:} field per key of that domain, prepended by the intake before
the message is spooled (with C{subdomains}, a key of a parent domain signs for its
subdomains); every other message passes unsigned.  The message is read off the
reactor thread (L{IFilterContext.read}) and signed in the thread pool
(L{IFilterContext.deferToThread}).

The filter runs after the header stampers, so the C{Received:} field this relay adds is
already there; it is never signed (nor any trace field: RFC 6376 section 5.4.1), so the
signature covers the fields that do not change in transit, and the body.  Key files are read
and checked when the plugin is built: a key that cannot be read, is not an RSA (at least 1024
bits, RFC 8301) or Ed25519 private key, or cannot sign, stops the relay with a configuration
error naming the file and the table.

Written on the public plugin API only, as a site's plugin would be (tests/test_layering.py).
See docs/plugin-dkim-sign.md.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import math
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.defer import TimeoutError as CancelledTimeout
from twisted.logger import Logger
from twisted.names import dns
from zope.interface import implementer

from mailrelay.address import normaliseDomain
from mailrelay.builtin.dnsbl import isNXDOMAIN
from mailrelay.builtin.headers import headerFields
from mailrelay.config.schema import At, Key, Reading, Table, pluginOptions
from mailrelay.config.values import boolean, choice, fileName, seconds, strings
from mailrelay.errors import ConfigError, describeValue
from mailrelay.interfaces import (
    CONTINUE,
    FilterResult,
    IMessageFilter,
    IOnlineCheck,
    ISigningFilter,
)
from mailrelay.namedfile import readError, readNamedFile

__all__ = ["DEFAULT_HEADERS", "DKIMSigner", "SigningKey", "build", "loadKey"]

log = Logger()

#: The header fields signed by default, each as many times as the message has it: RFC 6376
#: section 5.4.1's list (dkimpy's, and OpenDKIM's C{SignHeaders} default).
DEFAULT_HEADERS = (
    "from", "sender", "reply-to", "subject", "date", "message-id", "to", "cc",
    "mime-version", "content-type", "content-transfer-encoding", "content-id",
    "content-description", "resent-date", "resent-from", "resent-sender", "resent-to",
    "resent-cc", "resent-message-id", "in-reply-to", "references", "list-id", "list-help",
    "list-unsubscribe", "list-subscribe", "list-post", "list-owner", "list-archive",
)  # fmt: skip

#: The header fields signed one more time than the message has them by default, so that no
#: such field can be added after signing (OpenDKIM's C{OversignHeaders From}).
DEFAULT_OVERSIGN = ("from",)

#: Fields never signed: trace fields that change in transit (our own C{Received:} included),
#: and those RFC 6376 section 5.4.1 says should not be signed.
UNSIGNABLE = (
    "received", "return-path", "dkim-signature", "comments", "keywords", "bcc", "resent-bcc",
)  # fmt: skip

CANONICALIZATIONS = ("relaxed/relaxed", "relaxed/simple", "simple/relaxed", "simple/simple")

_FIELD_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_SELECTOR = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
#: What to install when dkimpy (or PyNaCl, for Ed25519 keys) is missing.
_INSTALL = "pip install 'mailrelay[dkim]'"


def _dkim() -> Any:
    """The C{dkim} module (dkimpy), or a L{ConfigError} saying what to install."""
    try:
        import dkim  # type: ignore[import-untyped]
    except ImportError as e:
        raise ConfigError(f"the dkim-sign plugin needs dkimpy ({e}): {_INSTALL}") from None
    return dkim


@dataclass(frozen=True)
class SigningKey:
    """One configured key (an entry of C{keys}), read and checked.

    @ivar domain: the signing domain (C{d=}), in A-labels.
    @ivar selector: the selector (C{s=}).
    @ivar keyFile: the private key's file.
    @ivar algorithm: C{"rsa-sha256"} or C{"ed25519-sha256"}, from the key's type.
    @ivar privateKey: the key as dkimpy takes it (PKCS#1 PEM, or the Ed25519 seed in base64).
    @ivar record: the DNS TXT record to publish at C{<selector>._domainkey.<domain>}.
    @ivar bits: the RSA key's size, C{None} for Ed25519.
    """

    domain: str
    selector: str
    keyFile: str
    algorithm: str
    privateKey: bytes = b""
    record: str = ""
    bits: int | None = None

    @property
    def recordName(self) -> str:
        """Where L{record} is published."""
        return f"{self.selector}._domainkey.{self.domain}"

    def __repr__(self) -> str:  # (no key material in logs)
        return f"<SigningKey d={self.domain} s={self.selector} {self.algorithm} {self.keyFile}>"


def loadKey(data: bytes) -> tuple[str, bytes, str, int | None]:
    """Read a DKIM private key: a PEM private key (RSA of at least 1024 bits, or Ed25519;
    PKCS#1 or PKCS#8, as C{openssl genrsa}/C{genpkey} and C{opendkim-genkey} write them), or
    an Ed25519 seed in base64 (as dkimpy's C{dknewkey --ktype ed25519} writes it).

    @return: C{(algorithm, the key as dkimpy takes it, the public TXT record, RSA bits)}.
    @raise ValueError: it is none of these; the message says why.
    """
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization as s
    from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa

    def b64(octets: bytes) -> str:
        return base64.b64encode(octets).decode("ascii")

    if b"-----BEGIN" in data:
        try:
            key = s.load_pem_private_key(data, password=None)
        except TypeError:
            raise ValueError("is encrypted with a passphrase; give it unencrypted") from None
        except (ValueError, UnsupportedAlgorithm) as e:
            raise ValueError(f"holds no private key that can be read ({e})") from None
        if isinstance(key, rsa.RSAPrivateKey):
            if key.key_size < 1024:
                raise ValueError(
                    f"is an RSA key of {key.key_size} bits; DKIM needs at least 1024 "
                    "(RFC 8301), 2048 recommended"
                )
            pem = key.private_bytes(
                s.Encoding.PEM, s.PrivateFormat.TraditionalOpenSSL, s.NoEncryption()
            )
            public = key.public_key().public_bytes(
                s.Encoding.DER, s.PublicFormat.SubjectPublicKeyInfo
            )
            return "rsa-sha256", pem, f"v=DKIM1; k=rsa; p={b64(public)}", key.key_size
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            kinds = {ec.EllipticCurvePrivateKey: "an EC", dsa.DSAPrivateKey: "a DSA",
                     ed448.Ed448PrivateKey: "an Ed448"}  # fmt: skip
            kind = next((k for t, k in kinds.items() if isinstance(key, t)), "another kind of")
            raise ValueError(f"is {kind} key; DKIM signs with RSA or Ed25519 keys")
        seed = key.private_bytes(s.Encoding.Raw, s.PrivateFormat.Raw, s.NoEncryption())
    else:
        try:
            seed = base64.b64decode(data.strip(), validate=True)
        except (binascii.Error, ValueError):
            seed = b""
        if len(seed) != 32:
            raise ValueError(
                "is neither a PEM private key (RSA or Ed25519) nor an Ed25519 key in base64 "
                "(dknewkey --ktype ed25519)"
            )
        key = ed25519.Ed25519PrivateKey.from_private_bytes(seed)
    public = key.public_key().public_bytes(s.Encoding.Raw, s.PublicFormat.Raw)
    return "ed25519-sha256", b64(seed).encode("ascii"), f"v=DKIM1; k=ed25519; p={b64(public)}", None


def _checkSigns(key: SigningKey) -> None:
    """Sign a small message with C{key} and verify it against its own public record, as a
    receiver would: what dkimpy cannot use is refused at start-up, not at the first message.

    @raise ValueError: it does not sign, or its signature does not verify.
    """
    dkim = _dkim()
    message = f"From: <postmaster@{key.domain}>\r\nSubject: key check\r\n\r\nCheck.\r\n".encode()
    try:
        field = dkim.sign(
            message, key.selector.encode(), key.domain.encode(), key.privateKey,
            signature_algorithm=key.algorithm.encode(), canonicalize=(b"relaxed", b"relaxed"),
        )
    except dkim.NaClNotFoundError:
        raise ValueError(f"needs PyNaCl to sign with an Ed25519 key: {_INSTALL}") from None
    except dkim.DKIMException as e:
        raise ValueError(f"cannot sign: {e}") from None
    record = key.record.encode()
    if not dkim.verify(field + message, dnsfunc=lambda name, timeout=5: record):
        raise ValueError("makes signatures that do not verify")  # pragma: no cover


def _selector(value: Any, at: At) -> str:
    if not isinstance(value, str) or not _SELECTOR.fullmatch(value):
        raise at.error(
            f"must be a DKIM selector (DNS labels: letters, digits, hyphens, dots), not "
            f"{describeValue(value)}"
        )
    return value


def _domain(value: Any, at: At) -> str:
    try:
        if not isinstance(value, str) or value.startswith("["):
            raise ValueError
        return normaliseDomain(value)
    except ValueError:
        raise at.error(f"must be a domain name, not {describeValue(value)}") from None


def _fieldNames(value: Any, at: At) -> tuple[str, ...]:
    """An array of header field names, lower-cased, each once."""
    names: list[str] = []
    for index, name in enumerate(strings(value, at)):
        if not _FIELD_NAME.fullmatch(name):
            raise at.item(index).error(f"{describeValue(name)} is not a header field name")
        if name.lower() not in names:
            names.append(name.lower())
    return tuple(names)


def _readKey(fields: dict[str, Any], at: At) -> SigningKey:
    """One entry of C{keys}: its key file read and checked."""
    key = SigningKey(fields["domain"], fields["selector"], fields["keyFile"], "")
    where = at.child("key_file")
    try:
        data = readNamedFile(key.keyFile)
    except OSError as e:
        raise where.error(
            f"cannot read the DKIM private key {describeValue(key.keyFile)}: {readError(e)}"
        ) from None
    try:
        algorithm, privateKey, record, bits = loadKey(data)
        key = SigningKey(key.domain, key.selector, key.keyFile, algorithm, privateKey, record, bits)
        _checkSigns(key)
    except ValueError as e:
        raise where.error(f"the DKIM private key {describeValue(key.keyFile)} {e}") from None
    return key


KEYS = Table(
    (
        Key("domain", _domain, "The signing domain (d=): mail from it is signed.",
            required="is required (the domain signed for)"),
        Key("selector", _selector, "The selector (s=): the key's name in DNS.",
            required="is required (the key's name in DNS, <selector>._domainkey.<domain>)"),
        Key("key_file", fileName, "The private key: PEM (RSA or Ed25519), or dknewkey's Ed25519.",
            required="is required (the private key's file)"),
    ),
    build=_readKey,
    array=True,
    empty="must list at least one key ({domain, selector, key_file})",
)  # fmt: skip


def _check(reading: Reading) -> None:
    """The checks involving several options."""
    seen: dict[tuple[str, str], int] = {}
    for index, key in enumerate(reading.fields["keys"]):
        first = seen.setdefault((key.domain, key.selector.lower()), index)
        if first != index:
            raise reading.at.child("keys").item(index).child("selector").error(
                f"{describeValue(key.selector)} for {key.domain} is already keys[{first}]"
            )
    headers = reading.fields["headers"]
    if "from" not in headers:
        raise reading.error("headers", "must include \"from\" (RFC 6376 section 5.4)")
    for name in headers:
        if name in UNSIGNABLE:
            raise reading.error(
                "headers",
                f"{describeValue(name)} must not be signed: it changes in transit or is not "
                "for the recipients (RFC 6376 section 5.4.1)",
            )
    for name in reading.fields["oversign"]:
        if name not in headers:
            raise reading.error("oversign", f"{describeValue(name)} is not in headers")


SCHEMA = pluginOptions(
    Key("keys", KEYS, "The keys: [{domain, selector, key_file}], several per domain allowed.",
        required="is required: [{domain = ..., selector = ..., key_file = ...}]"),
    Key("sign_by", choice("from", "sender"),
        "Whose domain picks the key: the From: field's (DMARC alignment) or the envelope "
        "sender's.", default="from"),
    Key("headers", _fieldNames, "The header fields signed (each as often as present).",
        default=list(DEFAULT_HEADERS)),
    Key("oversign", _fieldNames, "Fields of headers signed once more than present.",
        default=list(DEFAULT_OVERSIGN)),
    Key("canonicalization", choice(*CANONICALIZATIONS), "header/body canonicalization (c=).",
        default="relaxed/relaxed"),
    Key("signature_ttl", seconds,
        "Seconds a signature is valid after signing (x=; OpenDKIM's SignatureTTL); none: "
        "no x=, it never expires.", field="signatureTTL"),
    Key("subdomains", boolean,
        "Sign mail of the subdomains of a key's domain with its key (OpenDKIM's SubDomains).",
        default=False),
    check=_check,
)  # fmt: skip


def fromDomain(headers: Sequence[tuple[bytes, bytes]]) -> tuple[str | None, str]:
    """The domain of the C{From:} field of C{headers} (C{(name, value)} pairs),
    and C{""}; or C{None} and why there is none to sign for: no or several C{From:} fields,
    no address, addresses in several domains, a bad domain."""
    values = [value for name, value in headers if name.lower() == b"from"]
    if len(values) != 1:
        return None, "no From: field" if not values else f"{len(values)} From: fields"
    text = values[0].decode("utf-8", "replace").replace("\r\n", "")
    addresses = [address for _, address in email.utils.getaddresses([text])]
    found = set()
    for address in addresses:
        if "@" in address:
            domain = address.rpartition("@")[2]
            try:
                found.add(normaliseDomain(domain))
            except ValueError:
                return None, f"bad From: domain {domain!r}"
    if len(found) != 1:
        return None, "no address in From:" if not found else "From: has several domains"
    return found.pop(), ""


def _senderDomain(sender: str) -> str:
    """The domain of the envelope sender as the keys' domains are kept (A-labels, lower
    case), or C{""} (the null sender, or a domain that is none)."""
    try:
        return normaliseDomain(sender.rpartition("@")[2]) if "@" in sender else ""
    except ValueError:
        return ""


@dataclass(frozen=True)
class Signed:
    """What signing one message made (in the thread pool): the fields, or why none."""

    fields: tuple[bytes, ...] = ()
    domain: str | None = None
    why: str = ""
    #: Not signed for want of a parse, though its domain has a key (logged as a warning).
    unparsed: bool = False


def recordTags(record: str) -> dict[str, str]:
    """The tags of a DKIM key record (RFC 6376 section 3.6.1) as a receiver reads them
    (dkimpy's C{parse_tag_value}, as authres uses it), white space removed from the values
    (a base64 C{p=} may be folded anywhere); none for a record it cannot read."""
    util = _dkim().util
    try:
        tags = util.parse_tag_value(record.encode("ascii", "replace"))
    except util.InvalidTagValueList:
        return {}
    return {name.decode("ascii"): re.sub(r"\s+", "", value.decode("ascii", "replace"))
            for name, value in tags.items()}


def recordVerdict(key: SigningKey, records: Sequence[str]) -> tuple[bool, str]:
    """Whether the TXT C{records} found at C{key}'s name publish C{key} (as a receiver
    verifying its signatures would read them), and what to say of it."""
    ours = recordTags(key.record)
    where = f"dkim-sign: the key record at {key.recordName}"
    fails = (f"receivers will fail every signature of {key.domain} with selector "
             f"{key.selector} (dkim=fail), and DMARC with them; publish: {key.record}")
    published = [recordTags(record) for record in records]
    for tags in published:
        if tags.get("p") == ours["p"] and tags.get("k", "rsa").lower() == ours["k"]:
            return True, f"{where} publishes the key of {key.keyFile}"
    if not published:
        return False, (
            f"dkim-sign: no DKIM key record at {key.recordName}: receivers cannot verify the "
            f"signatures of {key.domain} with selector {key.selector} (no key for "
            f"signature), and DMARC fails with them; publish: {key.record}"
        )
    if any(tags.get("p") == "" for tags in published):
        return False, f"{where} revokes the key (an empty p=): {fails}"
    return False, f"{where} publishes another key than {key.keyFile}: {fails}"


@implementer(IMessageFilter, ISigningFilter, IOnlineCheck)
class DKIMSigner(Service):
    """Signs our messages with the keys of their domain (see the module's docstring).

    Started (with the relay, and at each reload), it looks up each key's TXT record, as
    C{opendkim-testkey} does, and warns when it is missing, revoked or of another key: every
    signature made with it would fail at the receivers, DMARC with it, unseen until then.

    @ivar keys: the L{SigningKey}s by domain, in the order configured.
    @ivar resolver: what looks up the records (an C{IResolver}), or C{None}: not checked.
    """

    def __init__(
        self,
        keys: Sequence[SigningKey],
        *,
        signBy: str = "from",
        headers: Sequence[str] = DEFAULT_HEADERS,
        oversign: Sequence[str] = DEFAULT_OVERSIGN,
        canonicalization: str = "relaxed/relaxed",
        signatureTTL: float | None = None,
        subdomains: bool = False,
        resolver: Any = None,
    ) -> None:
        self.resolver = resolver
        self.subdomains = subdomains
        #: Whole seconds from a signature's C{t=} to its C{x=}, or C{None}: no C{x=}.
        self.signatureTTL = None if signatureTTL is None else math.ceil(signatureTTL)
        self.keys: dict[str, list[SigningKey]] = {}
        for key in keys:
            self.keys.setdefault(key.domain, []).append(key)
        self.signBy = signBy
        self.headers = tuple(headers)
        self.oversign = frozenset(oversign)
        header, body = canonicalization.split("/")
        self.canonicalize = (header.encode(), body.encode())

    def __repr__(self) -> str:
        return f"<DKIMSigner {sorted(self.keys)} by {self.signBy}>"

    def startService(self) -> None:
        super().startService()
        if self.resolver is None:
            return

        def say(findings: list[tuple[str, str]]) -> None:
            for kind, said in findings:  # (one that could not be checked: info, not warn)
                (log.warn if kind == "problem" else log.info)("{said}", said=said)

        self.checkOnline().addCallback(say)

    def checkOnline(
        self, clock: Any = None, timeout: float | None = None
    ) -> Deferred[list[tuple[str, str]]]:
        """Look up each key's TXT record (L{IOnlineCheck}): whether it publishes the key
        (L{recordVerdict}), or why it could not be looked up."""
        if self.resolver is None:
            return succeed([])
        lookups = []
        for keys in self.keys.values():
            for key in keys:
                d = self.resolver.lookupText(key.recordName)
                if clock is not None and timeout is not None:
                    d.addTimeout(timeout, clock)
                d.addCallbacks(self._found, self._notFound, (key,), None, (key, timeout))
                lookups.append(d)
        return gatherResults(lookups)

    def _found(self, result: Any, key: SigningKey) -> tuple[str, str]:
        answers, _, _ = result
        records = [
            b"".join(answer.payload.data).decode("ascii", "replace")
            for answer in answers
            if answer.type == dns.TXT and str(answer.name).lower() == key.recordName.lower()
        ]
        published, said = recordVerdict(key, records)
        return ("ok" if published else "problem"), said

    def _notFound(
        self, failure: Any, key: SigningKey, timeout: float | None
    ) -> tuple[str, str]:
        if isNXDOMAIN(failure):
            return self._found(([], [], []), key)
        if failure.check(CancelledTimeout):
            error = f"no answer within {timeout:g} s"
        else:
            error = failure.getErrorMessage() or failure.type.__name__
        return "unchecked", (
            f"dkim-sign: could not check the key record at {key.recordName}: {error}"
        )

    def isOurs(self, client: Any) -> bool:
        """Whether mail from C{client} is ours to sign: made by the relay (C{None}), from an
        authenticated client, or from a client allowed to relay (in the relay networks);
        never mail relayed in from elsewhere."""
        return client is None or bool(client.authUser) or bool(client.relayAllowed)

    def filterMessage(self, context: Any) -> Any:
        envelope = context.envelope
        if not self.isOurs(context.client):
            return CONTINUE
        senderDomain = _senderDomain(envelope.sender)
        if self.signBy == "sender" and self.keyDomain(senderDomain) is None:
            return CONTINUE  # (the message need not be read)
        d = context.read()
        d.addCallback(lambda message: context.deferToThread(self.sign, message, senderDomain))
        d.addCallback(self._signed, envelope.queueID)
        return d

    def _signed(self, signed: Signed, queueID: str) -> Any:
        if not signed.fields:
            emit = log.warn if signed.unparsed else log.debug
            emit("{queueID}: dkim-sign: not signed: {why}", queueID=queueID, why=signed.why)
            return CONTINUE
        log.info(
            "{queueID}: dkim-sign: signed d={domain} s={selectors}",
            queueID=queueID, domain=signed.domain,
            selectors=",".join(k.selector for k in self.keys[signed.domain or ""]),
        )  # fmt: skip
        return FilterResult(prepend=signed.fields)

    def keyDomain(self, domain: str) -> str | None:
        """The domain whose keys sign mail of C{domain}: C{domain} itself, or, with
        L{subdomains}, its closest parent domain that has keys (OpenDKIM's C{SubDomains});
        C{None}: none."""
        if domain in self.keys:
            return domain
        if self.subdomains:
            labels = domain.split(".")
            for parent in (".".join(labels[i:]) for i in range(1, len(labels))):
                if parent in self.keys:
                    return parent
        return None

    def includeHeaders(self, headers: Sequence[tuple[bytes, bytes]]) -> list[bytes]:
        """The C{h=} list for a message with C{headers}: each configured field as many times
        as the message has it, once more when oversigned."""
        count = Counter(name.lower() for name, _ in headers)
        include: list[bytes] = []
        for name in self.headers:
            times = count[name.encode()] + (name in self.oversign)
            include += [name.encode()] * times
        return include

    def sign(self, message: bytes, senderDomain: str) -> Signed:
        """The C{DKIM-Signature:} fields of C{message} (blocking: run in the thread pool).

        A message whose domain has no key is not parsed by dkimpy; one it cannot parse (RFC
        5322 4.5's obsolete syntax, a line that is no field: nothing a retry changes) is not
        signed, C{unparsed} saying why.

        @raise dkim.DKIMException: dkimpy cannot sign it (the filter then fails: 451).
        """
        dkim = _dkim()
        headers = [(name, raw.partition(b":")[2]) for name, raw in headerFields(message)]
        domain, why = fromDomain(headers)
        if domain is None:
            return Signed(why=why)  # (RFC 6376: the From: field must be signed)
        if self.signBy == "sender":
            domain = senderDomain
        keyDomain = self.keyDomain(domain)
        if keyDomain is None:
            return Signed(why=f"no key for {domain}")
        keys = self.keys[keyDomain]
        try:
            signer = dkim.DKIM(message, linesep=b"\r\n")
        except dkim.MessageFormatError as e:
            return Signed(why=f"dkimpy cannot parse the header section: {e}", unparsed=True)
        if self.signatureTTL is not None:
            _expire(signer, self.signatureTTL)
        include = self.includeHeaders(signer.headers)
        fields = tuple(
            signer.sign(
                key.selector.encode(), key.domain.encode(), key.privateKey,
                signature_algorithm=key.algorithm.encode(), canonicalize=self.canonicalize,
                include_headers=include,
            )
            for key in keys
        )  # fmt: skip
        return Signed(fields, keyDomain)


def _expire(signer: Any, ttl: int) -> None:
    """Make the signatures of C{signer} (a C{dkim.DKIM}) carry C{x=}: their C{t=} plus
    C{ttl} seconds (RFC 6376 section 3.5).  dkimpy's C{sign} has no such parameter; it hands
    the list of its tags to C{gen_header}, which hashes and signs them: the tag is added to
    that list, after C{t=}, before it is signed."""
    generate = signer.gen_header

    def gen_header(fields: list[tuple[bytes, bytes]], *args: Any, **kwargs: Any) -> Any:
        tags = [tag for tag, _ in fields]
        if b"t" in tags:
            at, signed = tags.index(b"t") + 1, int(fields[tags.index(b"t")][1])
        else:  # (dkimpy always says t=; x= alone is valid too)
            at, signed = tags.index(b"b"), int(time.time())
        fields.insert(at, (b"x", str(signed + ttl).encode("ascii")))
        return generate(fields, *args, **kwargs)

    signer.gen_header = gen_header


def build(options: dict[str, Any], context: Any) -> DKIMSigner:
    """The C{dkim-sign} plugin (see docs/plugin-dkim-sign.md)."""
    _dkim()
    read = context.readOptions(SCHEMA, options)
    for key in read.keys:
        log.info(
            "dkim-sign: signing for {domain} with selector {selector} ({algorithm}{bits}, "
            "{keyFile}); its TXT record at {name}: {record}",
            domain=key.domain, selector=key.selector, algorithm=key.algorithm,
            bits=f", {key.bits} bits" if key.bits else "", keyFile=key.keyFile,
            name=key.recordName, record=key.record,
        )  # fmt: skip
    return DKIMSigner(
        read.keys,
        signBy=read.signBy,
        headers=read.headers,
        oversign=read.oversign,
        canonicalization=read.canonicalization,
        signatureTTL=read.signatureTTL,
        subdomains=read.subdomains,
        # (Checked by the relay; not again by its child processes.)
        resolver=None if context.quiet else context.resolver,
    )

"""The built-in C{dkim-sign} message filter (mailrelay.builtin.dkim), without sockets: built
by real discovery with the test kit, signing with keys made here, each signature checked with
dkimpy's verifier against the key's public record served by a C{dnsfunc}."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import dkim
import pytest
from cryptography.hazmat.primitives import serialization as s
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from twisted.internet.defer import Deferred
from zope.interface.verify import verifyObject

from mailrelay.builtin.dkim import DKIMSigner, fromDomain
from mailrelay.errors import ConfigError
from mailrelay.interfaces import CONTINUE, FilterResult, IMessageFilter, VerdictKind
from mailrelay.testing import buildPlugin, makeClient, makeEnvelope, makeFilterContext

MESSAGE = (
    b"Received: from client.test (client.test [192.0.2.7])\r\n"
    b"\tby relay.test (mailrelay) with ESMTP id 01KTEST; Mon, 1 Nov 2027 00:00:00 +0000\r\n"
    b"From: Alice <alice@Example.ORG>\r\n"
    b"To: bob@example.net\r\n"
    b"Subject: hello\r\n"
    b"Date: Mon, 1 Nov 2027 00:00:00 +0000\r\n"
    b"Message-Id: <1@example.org>\r\n"
    b"\r\n"
    b"Hello Bob,  with   spaces  \r\n"
    b"\r\n"
    b"\r\n"
)


#: An RSA key too short for DKIM (cryptography will not make one).
RSA_512 = b"""\
-----BEGIN PRIVATE KEY-----
MIIBVAIBADANBgkqhkiG9w0BAQEFAASCAT4wggE6AgEAAkEA3wpLflVRkG8AbAGc
jFpv27tMQn6NPmHyOYOmDarhNUN02Sizg47oKFQd56ghvh57HH51XWSpQOOAm2gO
2VhRtwIDAQABAkASldQGmetrAqThWx0FYP/TKn9HRy5T1WuOuVab6vJLMsTzdV3Y
Oczd//2h8DzfX2LHAsWwyum6iwO2tWAsTQ0hAiEA9IPDhSEhMk7HneQK38apztXt
PcC1nmgl7GSEPpcGGHECIQDphE4aYwH7DQcCVoAbx4jSymiuj8OY6XzsH5ZgeHRg
pwIgQ8qMWMq4o3QIEBR7l1NDHR9eqTJWqFaDvSiZKalBfWECIQCd23ms7sc0/k6B
rxX1MYL19Cyl7LuuEBEJ0iSm3GbXuwIgMY1UnW7rba8L1Z2PeSrFuDC/Xk/1b2C/
/CaHq2hdx7w=
-----END PRIVATE KEY-----
"""


def pem(key: Any, fmt: Any = s.PrivateFormat.PKCS8) -> bytes:
    return key.private_bytes(s.Encoding.PEM, fmt, s.NoEncryption())


def rsaKey(bits: int = 2048) -> Any:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


class Keys:
    """Key files in a directory, and the DNS the tests verify against."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.records: dict[bytes, bytes] = {}

    def rsa(self, name: str = "example.org.pem", bits: int = 2048) -> str:
        return write(self.directory / name, pem(rsaKey(bits), s.PrivateFormat.TraditionalOpenSSL))

    def dnsfunc(self, name: bytes, timeout: float = 5) -> bytes | None:
        return self.records.get(name.rstrip(b"."))

    def publish(self, signer: DKIMSigner) -> None:
        for keys in signer.keys.values():
            for key in keys:
                self.records[key.recordName.encode()] = key.record.encode()

    def verify(self, message: bytes, index: int = 0) -> bool:
        """Whether signature C{index} (from the top) verifies, as dkimpy's verifier says."""
        try:
            return bool(dkim.DKIM(message).verify(idx=index, dnsfunc=self.dnsfunc))
        except dkim.DKIMException:
            return False


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return Keys(tmp_path)


def build(tmp_path: Path, ring: Keys, **options: Any) -> DKIMSigner:
    options.setdefault(
        "keys", [{"domain": "example.org", "selector": "s1", "key_file": ring.rsa()}]
    )
    signer = buildPlugin("dkim-sign", options, tmp_path, interface=IMessageFilter)
    ring.publish(signer)
    return signer


def run(signer: DKIMSigner, message: bytes = MESSAGE, **context: Any) -> tuple[Any, bytes]:
    """The filter's answer, and the message as it would be spooled (its fields added)."""
    ctx = makeFilterContext(message, **context)
    answer: list[Any] = []
    result = signer.filterMessage(ctx)
    if isinstance(result, Deferred):
        result.addBoth(answer.append)
    else:
        answer.append(result)
    (got,) = answer
    if isinstance(got, FilterResult):
        assert got.verdict is CONTINUE
        ctx.addFields(got.prepend, got.append)
    spooled: list[bytes] = []
    ctx.message().addCallback(spooled.append)
    return got, spooled[0]


RELAYED = makeEnvelope("alice@example.org", client=makeClient("127.0.0.1", relayAllowed=True))


def test_signs_our_mail_and_it_verifies(tmp_path: Path, keys: Keys) -> None:
    signer = build(tmp_path, keys)
    verifyObject(IMessageFilter, signer)
    answer, spooled = run(signer, envelope=RELAYED)
    (field,) = answer.prepend
    assert field.startswith(b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.org;")
    assert spooled == field + MESSAGE
    tags = dkim.util.parse_tag_value(field.split(b":", 1)[1])
    # The RFC 6376 fields present, From oversigned; never our own Received:.
    assert b"".join(tags[b"h"].split()).split(b":") == [
        b"from", b"from", b"subject", b"date", b"message-id", b"to"]
    assert tags[b"s"] == b"s1" and b"l" not in tags
    assert keys.verify(spooled)
    # The signature holds: a Received: added on top by the next hop changes nothing, a
    # changed body or an added From: (oversigned) breaks it.
    assert keys.verify(b"Received: from relay.test by mx.example.net; now\r\n" + spooled)
    assert not keys.verify(spooled.replace(b"Hello Bob", b"Hello Eve"))
    assert not keys.verify(spooled.replace(b"To: ", b"From: eve@example.org\r\nTo: "))


def test_who_is_ours(tmp_path: Path, keys: Keys) -> None:
    """Authenticated and relay clients, and the relay's own messages, are signed; mail relayed
    in from outside is not (the message is not even read)."""
    signer = build(tmp_path, keys)
    outsider = makeEnvelope("alice@example.org", client=makeClient("192.0.2.9"))
    ctx = makeFilterContext(MESSAGE, envelope=outsider)
    ctx.read = None  # type: ignore[method-assign]  # (must not be called)
    assert signer.filterMessage(ctx) is CONTINUE
    user = makeEnvelope("alice@example.org", client=makeClient("192.0.2.9", authUser="alice"))
    for envelope, client in ((user, "default"), (outsider, None)):
        answer, spooled = run(signer, envelope=envelope, client=client)
        assert keys.verify(spooled), (envelope, client)


def test_other_domains_and_odd_from_pass_unsigned(tmp_path: Path, keys: Keys) -> None:
    signer = build(tmp_path, keys)
    other = MESSAGE.replace(b"alice@Example.ORG", b"alice@example.com")
    assert run(signer, other, envelope=RELAYED) == (CONTINUE, other)
    sub = MESSAGE.replace(b"alice@Example.ORG", b"alice@sub.example.org")
    assert run(signer, sub, envelope=RELAYED)[0] is CONTINUE
    assert fromDomain([(b"To", b"x@example.org")]) == (None, "no From: field")
    assert fromDomain([(b"From", b" a@example.org"), (b"from", b" b@example.org")]) == (
        None, "2 From: fields")
    assert fromDomain([(b"From", b" a@example.org, b@example.com")]) == (
        None, "From: has several domains")
    assert fromDomain([(b"From", b' "x, y" <a@EXAMPLE.org>,\r\n b@example.org')]) == (
        "example.org", "")
    assert fromDomain([(b"From", "é <a@bücher.example>".encode())]) == (
        "xn--bcher-kva.example", "")


def test_sign_by_sender_and_options(tmp_path: Path, keys: Keys) -> None:
    signer = build(tmp_path, keys, sign_by="sender", canonicalization="simple/simple",
                   headers=["From", "Subject", "X-Tag"], oversign=["subject"])
    other = MESSAGE.replace(b"alice@Example.ORG", b"alice@example.com")
    answer, spooled = run(signer, other, envelope=RELAYED)
    (field,) = answer.prepend
    tags = dkim.util.parse_tag_value(field.split(b":", 1)[1])
    assert (tags[b"d"], tags[b"c"]) == (b"example.org", b"simple/simple")
    assert b"".join(tags[b"h"].split()).split(b":") == [b"from", b"subject", b"subject"]
    assert keys.verify(spooled)
    # A sender without a key: unsigned, and the message is not read.
    stranger = makeEnvelope("x@example.com", client=makeClient("127.0.0.1", relayAllowed=True))
    assert signer.filterMessage(makeFilterContext(MESSAGE, envelope=stranger)) is CONTINUE


def test_sign_by_sender_of_an_international_domain(tmp_path: Path, keys: Keys) -> None:
    """The key's domain is kept in A-labels, as From: domains are compared: an SMTPUTF8
    sender in U-labels (or in capitals) picks it too.  It passed unsigned ("no key")."""
    ring = [{"domain": "b\u00fccher.example", "selector": "s1", "key_file": keys.rsa()}]
    signer = build(tmp_path, keys, sign_by="sender", keys=ring)
    for sender in ("alice@b\u00fccher.example", "alice@B\u00dcCHER.example",
                   "alice@xn--bcher-kva.example"):
        envelope = makeEnvelope(sender, client=makeClient("127.0.0.1", relayAllowed=True))
        answer, spooled = run(signer, envelope=envelope)
        assert isinstance(answer, FilterResult), sender
        (field,) = answer.prepend
        assert b" d=xn--bcher-kva.example;" in field
        assert keys.verify(spooled)


def test_ed25519_and_dual_signing(tmp_path: Path, keys: Keys) -> None:
    """RFC 8463: an Ed25519 key beside an RSA one, each signing; PKCS#8 PEM and dknewkey's
    base64 seed both read."""
    seed = ed25519.Ed25519PrivateKey.generate()
    raw = seed.private_bytes(s.Encoding.Raw, s.PrivateFormat.Raw, s.NoEncryption())
    signer = build(tmp_path, keys, keys=[
        {"domain": "example.org", "selector": "rsa", "key_file": keys.rsa()},
        {"domain": "example.org", "selector": "ed",
         "key_file": write(tmp_path / "ed.pem", pem(ed25519.Ed25519PrivateKey.generate()))},
        {"domain": "example.org", "selector": "ed2",
         "key_file": write(tmp_path / "ed.key", base64.b64encode(raw) + b"\n")},
    ])
    answer, spooled = run(signer, envelope=RELAYED)
    assert [f.split(b";")[1] for f in answer.prepend] == [
        b" a=rsa-sha256", b" a=ed25519-sha256", b" a=ed25519-sha256"]
    assert [keys.verify(spooled, i) for i in range(3)] == [True, True, True]
    assert [k.bits for k in signer.keys["example.org"]] == [2048, None, None]


def test_eight_bit_and_utf8_headers_sign(tmp_path: Path, keys: Keys) -> None:
    signer = build(tmp_path, keys)
    message = MESSAGE.replace(b"Subject: hello", "Subject: grüße".encode()).replace(
        b"Hello Bob", "Grüß dich, Bob".encode())
    answer, spooled = run(signer, message, envelope=RELAYED)
    assert answer.prepend and keys.verify(spooled)


def test_failure_to_sign_fails_the_filter(tmp_path: Path, keys: Keys) -> None:
    """A message dkimpy cannot sign makes the filter fail (the chain then defers, 451)."""
    signer = build(tmp_path, keys)
    signer.keys["example.org"][0] = type(signer.keys["example.org"][0])(
        "example.org", "s1", "x", "rsa-sha256", b"-----BEGIN nothing-----\n--", "")
    answer, _ = run(signer, envelope=RELAYED)
    assert answer.check(dkim.DKIMException)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: str(p / "missing.pem"),
         'keys[0].key_file: cannot read the DKIM private key "{file}": No such file or '
         "directory"),
        (lambda p: write(p / "k.pem", b"not a key\n"),
         'keys[0].key_file: the DKIM private key "{file}" is neither a PEM private key (RSA or '
         "Ed25519) nor an Ed25519 key in base64 (dknewkey --ktype ed25519)"),
        (lambda p: write(p / "k.pem", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE "
                                      b"KEY-----\n"),
         'keys[0].key_file: the DKIM private key "{file}" holds no private key that can be '
         "read"),
        (lambda p: write(p / "k.pem", RSA_512),
         'keys[0].key_file: the DKIM private key "{file}" is an RSA key of 512 bits; DKIM '
         "needs at least 1024 (RFC 8301), 2048 recommended"),
        (lambda p: write(p / "k.pem", pem(ec.generate_private_key(ec.SECP256R1()))),
         'keys[0].key_file: the DKIM private key "{file}" is an EC key; '
         "DKIM signs with RSA or Ed25519 keys"),
        (lambda p: write(p / "k.pem", rsaKey().private_bytes(
            s.Encoding.PEM, s.PrivateFormat.PKCS8, s.BestAvailableEncryption(b"pw"))),
         'keys[0].key_file: the DKIM private key "{file}" is encrypted with a passphrase; give '
         "it unencrypted"),
    ],
)
def test_bad_key_files_refused(tmp_path: Path, make: Any, message: str) -> None:
    file = make(tmp_path)
    with pytest.raises(ConfigError) as e:
        buildPlugin("dkim-sign", {"keys": [
            {"domain": "example.org", "selector": "s1", "key_file": file}]}, tmp_path)
    assert str(e.value).startswith(f"{tmp_path / 'mailrelay.toml'}: "
                                   + message.format(file=file)), str(e.value)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, 'keys: is required: [{domain = ..., selector = ..., key_file = ...}]'),
        ({"keys": []}, "keys: must list at least one key ({domain, selector, key_file})"),
        ({"keys": [{"domain": "example.org", "key_file": "k.pem"}]},
         "keys[0].selector: is required (the key's name in DNS, <selector>._domainkey.<domain>)"),
        ({"keys": [{"domain": "example.org", "selector": "a_b", "key_file": "k.pem"}]},
         'keys[0].selector: must be a DKIM selector (DNS labels: letters, digits, hyphens, '
         'dots), not "a_b"'),
        ({"keys": [{"domain": "[192.0.2.1]", "selector": "s", "key_file": "k.pem"}]},
         'keys[0].domain: must be a domain name, not "[192.0.2.1]"'),
        ({"keys": [{"domain": "example.org", "selector": "s", "key_file": "k.pem",
                    "keyfile": 1}]},
         'keys[0].keyfile: unknown key "keyfile" (did you mean "key_file"?)'),
        ({"keys": [{"domain": "example.org", "selector": "s", "key_file": "k.pem"},
                   {"domain": "EXAMPLE.org.", "selector": "S", "key_file": "k.pem"}]},
         'keys[1].selector: "S" for example.org is already keys[0]'),
        ({"headers": ["subject"]}, 'headers: must include "from" (RFC 6376 section 5.4)'),
        ({"headers": ["from", "Received"]},
         'headers: "received" must not be signed: it changes in transit or is not for the '
         'recipients (RFC 6376 section 5.4.1)'),
        ({"headers": ["from", "bad name"]},
         'headers[1]: "bad name" is not a header field name'),
        ({"oversign": ["reply-to"], "headers": ["from"]},
         'oversign: "reply-to" is not in headers'),
        ({"sign_by": "envelope"},
         'sign_by: must be "from" or "sender", not "envelope"'),
        ({"canonicalization": "relaxed"},
         'canonicalization: must be "relaxed/relaxed", "relaxed/simple", "simple/relaxed" or '
         '"simple/simple", not "relaxed"'),
        ({"selector": "s1"},
         'selector: unknown key "selector"'),
        ({"signature_ttl": 0},
         "signature_ttl: must be a positive number of seconds, not 0"),
        ({"signature_ttl": "1d"},
         'signature_ttl: must be a positive number of seconds, not "1d"'),
        ({"subdomains": "yes"},
         'subdomains: must be true or false, not "yes"'),
    ],
)
def test_bad_options_refused(tmp_path: Path, options: dict[str, Any], message: str) -> None:
    (tmp_path / "k.pem").write_bytes(pem(rsaKey(1024)))
    if "keys" not in options and not message.startswith("keys:"):
        options["keys"] = [{"domain": "example.org", "selector": "s", "key_file": "k.pem"}]
    with pytest.raises(ConfigError) as e:
        buildPlugin("dkim-sign", options, tmp_path)
    assert str(e.value).startswith(f"{tmp_path / 'mailrelay.toml'}: {message}"), str(e.value)


def test_relative_key_file_and_verdicts(tmp_path: Path, keys: Keys) -> None:
    keys.rsa("rel.pem", 1024)
    signer = build(tmp_path, keys, keys=[
        {"domain": "example.org", "selector": "s1", "key_file": "rel.pem"}])
    assert signer.keys["example.org"][0].keyFile == str(tmp_path / "rel.pem")
    answer, spooled = run(signer, envelope=RELAYED)
    assert answer.verdict.kind is VerdictKind.CONTINUE and keys.verify(spooled)


def test_the_documented_example_builds(tmp_path: Path, keys: Keys) -> None:
    """docs/plugin-dkim-sign.md's [[plugins]] table, its key files made here."""
    import tomllib

    doc = (Path(__file__).resolve().parent.parent / "docs" / "plugin-dkim-sign.md").read_text()
    table = tomllib.loads(doc.split("```toml\n", 1)[1].split("```", 1)[0])["plugins"][0]
    assert table.pop("plugin") == "dkim-sign"
    for entry in table["keys"]:
        name = Path(entry["key_file"]).name
        entry["key_file"] = (
            write(tmp_path / name, pem(ed25519.Ed25519PrivateKey.generate()))
            if "ed25519" in name else keys.rsa(name)
        )
    signer = build(tmp_path, keys, **table)
    assert [(k.selector, k.algorithm) for k in signer.keys["example.org"]] == [
        ("s2027", "rsa-sha256"), ("ed2027", "ed25519-sha256")]
    answer, spooled = run(signer, envelope=RELAYED)
    assert len(answer.prepend) == 2 and keys.verify(spooled, 0) and keys.verify(spooled, 1)


def test_a_header_section_dkimpy_cannot_parse_passes_unsigned(tmp_path: Path, keys: Keys) -> None:
    """A field name followed by white space (RFC 5322 4.5's obsolete syntax) or a line that
    is no field: dkimpy cannot parse the message, a permanent condition; it passes unsigned
    (it was refused 451, forever)."""
    signer = build(tmp_path, keys)
    for odd in (b"Subject : hello", b"Subject: hello\r\nthis is not a header field"):
        message = MESSAGE.replace(b"Subject: hello", odd)
        assert run(signer, message, envelope=RELAYED) == (CONTINUE, message)


def test_a_message_of_a_domain_without_a_key_is_not_parsed_by_dkimpy(
    tmp_path: Path, keys: Keys, monkeypatch: Any,
) -> None:
    """dkimpy parsed every message of ours before the key was looked up: one it could not
    parse failed the filter even when its domain had no key."""
    signer = build(tmp_path, keys)
    parsed: list[bytes] = []

    class Counting(dkim.DKIM):  # type: ignore[misc]
        def __init__(self, message: bytes, **kw: Any) -> None:
            parsed.append(message)
            super().__init__(message, **kw)

    monkeypatch.setattr(dkim, "DKIM", Counting)
    other = MESSAGE.replace(b"alice@Example.ORG", b"carol@example.com")
    assert run(signer, other, envelope=RELAYED) == (CONTINUE, other)
    assert parsed == []
    assert run(signer, envelope=RELAYED)[0].prepend and parsed  # (what counts is seen)


def checked(tmp_path: Path, keyFile: str, records: dict[str, Any]) -> list[str]:
    """What the signer of C{keyFile} says of its key's DNS record when it starts, with
    C{records} (name to TXT value, or an exception for a failed lookup) in DNS."""
    from twisted.logger import capturedLogs, formatEvent

    from mailrelay.testing import FakeResolver

    resolver = FakeResolver()
    for name, value in records.items():
        if isinstance(value, Exception):
            resolver.fail(name, "TXT", value)
        else:
            resolver.add(name, "TXT", value)
    signer = buildPlugin(
        "dkim-sign",
        {"keys": [{"domain": "example.org", "selector": "s1", "key_file": keyFile}]},
        tmp_path, interface=IMessageFilter, resolver=resolver,
    )
    with capturedLogs() as events:
        signer.startService()
        signer.stopService()
    key = signer.keys["example.org"][0]
    return [f"{e['log_level'].name}: {formatEvent(e)}".replace(key.record, "RECORD")
            for e in events if "dkim-sign" in formatEvent(e)]


NAME = "s1._domainkey.example.org"


def test_the_published_record_is_checked_at_start(tmp_path: Path, keys: Keys) -> None:
    """At start-up (and each reload) the relay looks up each key's TXT record, as
    opendkim-testkey does: a record missing, revoked or of another key makes every signature
    fail at the receivers (and DMARC with it), silently until then."""
    path = keys.rsa()
    missing = checked(tmp_path, path, {})
    assert missing == [f"warn: dkim-sign: no DKIM key record at {NAME}: receivers cannot verify "
                    "the signatures of example.org with selector s1 (no key for signature), "
                    "and DMARC fails with them; publish: RECORD"]
    # The right record (split into strings, folded, tags in another order): all is well.
    from mailrelay.builtin.dkim import loadKey

    record = loadKey(Path(path).read_bytes())[2]
    _, _, p = record.partition("p=")
    folded = ("k = rsa ;v=DKIM1; p=" + p[:100] + " \t", p[100:])
    said = checked(tmp_path, path, {NAME: folded})
    assert said == [f"info: dkim-sign: the key record at {NAME} publishes the key of {path}"]
    # Another key, a revoked one, an Ed25519 record for an RSA key.
    other = checked(tmp_path, path, {NAME: "v=DKIM1; k=rsa; p=MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8A"})
    assert other == [f"warn: dkim-sign: the key record at {NAME} publishes another key than "
                     f"{path}: receivers will fail every signature "
                     "of example.org with selector s1 (dkim=fail), and DMARC with them; "
                     "publish: RECORD"]
    revoked = checked(tmp_path, path, {NAME: "v=DKIM1; p="})
    assert revoked == [f"warn: dkim-sign: the key record at {NAME} revokes the key (an empty "
                       "p=): receivers will fail every signature of example.org with selector "
                       "s1 (dkim=fail), and DMARC with them; publish: RECORD"]
    kind = checked(tmp_path, path, {NAME: "v=DKIM1; k=ed25519; " + "p=" + p})
    assert kind[0].startswith(f"warn: dkim-sign: the key record at {NAME} publishes another")


def test_a_record_that_cannot_be_looked_up_is_said_not_warned(
    tmp_path: Path, keys: Keys
) -> None:
    from mailrelay.testing.resolver import SERVFAIL

    said = checked(tmp_path, keys.rsa(), {NAME: SERVFAIL(NAME)})
    assert len(said) == 1 and said[0].startswith(
        f"info: dkim-sign: could not check the key record at {NAME}: "
    ), said
    timeout = checked(tmp_path, keys.rsa(), {NAME: TimeoutError(NAME)})
    assert timeout[0].startswith("info: dkim-sign: could not check"), timeout


def test_the_relays_child_processes_do_not_check_again(tmp_path: Path, keys: Keys) -> None:
    from mailrelay.testing import makePluginContext

    context = makePluginContext(tmp_path)
    context.quiet = True  # (a child process of the relay: the relay checked)
    signer = buildPlugin(
        "dkim-sign",
        {"keys": [{"domain": "example.org", "selector": "s1", "key_file": keys.rsa()}]},
        tmp_path, interface=IMessageFilter, context=context,
    )
    signer.startService()
    assert context.resolver.queries == []


def test_check_prints_what_the_records_lack(tmp_path: Path, keys: Keys) -> None:
    """C{mailrelay check} asks the signer (an L{IOnlineCheck}) to look its keys' records
    up, as the relay does at start: a key not published, or a record that could not be
    looked up, is a warning of the check's; a published one says nothing."""
    from twisted.internet.task import Clock

    from mailrelay.app.cli import _checkOnline
    from mailrelay.testing import FakeResolver
    from mailrelay.testing.resolver import SERVFAIL

    paths = {"example.org": keys.rsa(), "example.net": keys.rsa()}
    resolver = FakeResolver()
    signer = buildPlugin(
        "dkim-sign",
        {"keys": [{"domain": d, "selector": "s1", "key_file": k} for d, k in paths.items()]},
        tmp_path, interface=IMessageFilter, resolver=resolver,
    )
    published = signer.keys["example.org"][0]
    resolver.add(published.recordName, "TXT", published.record)
    assert [w.split(": receivers")[0] for w in _checkOnline(Clock(), [("dkim-sign", signer)])] == [
        "dkim-sign: no DKIM key record at s1._domainkey.example.net"]
    resolver.fail("s1._domainkey.example.net", "TXT", SERVFAIL("s1._domainkey.example.net"))
    [unchecked] = _checkOnline(Clock(), [("dkim-sign", signer)])
    assert unchecked.startswith(
        "dkim-sign: could not check the key record at s1._domainkey.example.net: ")
    assert _checkOnline(Clock(), [("another", object())]) == []


def signatureTags(field: bytes) -> dict[bytes, bytes]:
    """The tags of a C{DKIM-Signature:} field."""
    return dkim.util.parse_tag_value(field.split(b":", 1)[1])


def test_signature_ttl_sets_an_expiry(tmp_path: Path, keys: Keys, monkeypatch: Any) -> None:
    """C{signature_ttl} (OpenDKIM's C{SignatureTTL}): each signature carries C{x=}, its C{t=}
    plus the TTL (RFC 6376 section 3.5); it verifies until then, and fails after (dkimpy
    allows a receiver's clock ten hours of slack).  Without it, no C{x=}."""
    signer = build(tmp_path, keys, signature_ttl=86400)
    answer, spooled = run(signer, envelope=RELAYED)
    (field,) = answer.prepend
    tags = signatureTags(field)
    assert int(tags[b"x"]) - int(tags[b"t"]) == 86400
    assert keys.verify(spooled)
    later = int(tags[b"x"]) + 10 * 3600 + 60
    monkeypatch.setattr(dkim.time, "time", lambda: float(later))
    assert not keys.verify(spooled)
    monkeypatch.undo()
    # A TTL in fractions of a second rounds up to whole seconds (x= is an integer).
    answer, _ = run(build(tmp_path, keys, signature_ttl=0.5), envelope=RELAYED)
    tags = signatureTags(answer.prepend[0])
    assert int(tags[b"x"]) - int(tags[b"t"]) == 1
    answer, _ = run(build(tmp_path, keys), envelope=RELAYED)
    assert b"x" not in signatureTags(answer.prepend[0])


def test_subdomains_sign_with_the_parent_domains_key(tmp_path: Path, keys: Keys) -> None:
    """C{subdomains = true} (OpenDKIM's C{SubDomains}): mail From: an address of any
    subdomain of a key's domain is signed with that key, C{d=} the key's domain (aligned with
    the From: domain under DMARC's relaxed alignment, RFC 7489 section 3.1.1); the closest
    domain with a key wins; a domain that only ends in the same letters is not a subdomain.
    Without it, only the exact domain is signed (test_other_domains_and_odd_from_pass_unsigned)."""
    ring = [{"domain": "example.org", "selector": "s1", "key_file": keys.rsa()},
            {"domain": "lists.example.org", "selector": "s2", "key_file": keys.rsa("l.pem")}]
    signer = build(tmp_path, keys, keys=ring, subdomains=True)
    for domain, d, selector in (("sub.example.org", b"example.org", b"s1"),
                                ("a.b.Example.ORG", b"example.org", b"s1"),
                                ("example.org", b"example.org", b"s1"),
                                ("x.lists.example.org", b"lists.example.org", b"s2")):
        message = MESSAGE.replace(b"Example.ORG", domain.encode())
        answer, spooled = run(signer, message, envelope=RELAYED)
        (field,) = answer.prepend
        tags = signatureTags(field)
        assert (tags[b"d"], tags[b"s"], tags[b"i"]) == (d, selector, b"@" + d), domain
        assert keys.verify(spooled), domain
    for other in ("notexample.org", "example.org.evil.test", "org"):
        message = MESSAGE.replace(b"alice@Example.ORG", f"alice@{other}".encode())
        assert run(signer, message, envelope=RELAYED) == (CONTINUE, message), other
    # By the envelope sender: its subdomains too (and the message is read only for them).
    signer = build(tmp_path, keys, sign_by="sender", subdomains=True)
    sender = makeEnvelope("alice@mail.example.org",
                          client=makeClient("127.0.0.1", relayAllowed=True))
    answer, spooled = run(signer, envelope=sender)
    assert signatureTags(answer.prepend[0])[b"d"] == b"example.org" and keys.verify(spooled)
    stranger = makeEnvelope("x@example.com", client=makeClient("127.0.0.1", relayAllowed=True))
    assert signer.filterMessage(makeFilterContext(MESSAGE, envelope=stranger)) is CONTINUE

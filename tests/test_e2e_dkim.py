"""End-to-end: the built-in C{dkim-sign} filter in the real C{twistd -n mailrelay}.

Messages sent with smtplib from 127.0.0.1 (a relay client) are relayed to an aiosmtpd next
hop; what arrives there is checked with dkimpy's verifier against the public keys, served by
a fake resolver (a C{dnsfunc}) holding the TXT records a site would publish.  A message whose
From: domain has no key passes unsigned; the bounce the relay makes (in its delivery process)
is signed with the key of its own domain; a bad key file stops the relay at start with one
line naming the file and the table.
"""

from __future__ import annotations

import base64
import os
import smtplib
import subprocess
import time
from pathlib import Path
from typing import Any

import dkim
from cryptography.hazmat.primitives import serialization as s
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from tests.harness import RelayProcess
from tests.test_e2e_outbound import nexthop  # noqa: F401 - the aiosmtpd next-hop fixture


class FakeDNS:
    """The DKIM key records, as a resolver would serve them to dkimpy (its C{dnsfunc})."""

    def __init__(self) -> None:
        self.records: dict[str, bytes] = {}
        self.asked: list[str] = []

    def publish(self, selector: str, domain: str, key: object) -> None:
        public = key.public_key()  # type: ignore[attr-defined]
        if isinstance(key, rsa.RSAPrivateKey):
            der = public.public_bytes(s.Encoding.DER, s.PublicFormat.SubjectPublicKeyInfo)
            record = b"v=DKIM1; k=rsa; p=" + base64.b64encode(der)
        else:
            raw = public.public_bytes(s.Encoding.Raw, s.PublicFormat.Raw)
            record = b"v=DKIM1; k=ed25519; p=" + base64.b64encode(raw)
        self.records[f"{selector}._domainkey.{domain}"] = record

    def txt(self, name: bytes, timeout: float = 5) -> bytes | None:
        self.asked.append(name.decode().rstrip("."))
        return self.records.get(name.decode().rstrip("."))

    def verify(self, message: bytes, index: int) -> bool:
        try:
            return bool(dkim.DKIM(message).verify(idx=index, dnsfunc=self.txt))
        except dkim.DKIMException:
            return False


def keyFile(path: Path, key: object) -> str:
    path.write_bytes(key.private_bytes(  # type: ignore[attr-defined]
        s.Encoding.PEM, s.PrivateFormat.PKCS8, s.NoEncryption()))
    return str(path)


def test_relayed_mail_is_signed_and_verifies_at_the_next_hop(relays, nexthop, tmp_path) -> None:  # noqa: F811
    hop, port = nexthop()
    hop.rcptReply = lambda rcpt: "550 5.1.1 no such user" if rcpt.startswith("gone@") else None
    dns = FakeDNS()
    orgRSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    orgEd = ed25519.Ed25519PrivateKey.generate()
    relayRSA = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    dns.publish("s1", "example.org", orgRSA)
    dns.publish("ed1", "example.org", orgEd)
    dns.publish("mx", "relay.test", relayRSA)
    r = relays(
        '[dns]\nreverse_lookups = false\n'
        f'[relay]\nsmarthost = "[127.0.0.1]:{port}"\n'
        '[[plugins]]\nplugin = "dkim-sign"\nkeys = [\n'
        f'  {{domain = "example.org", selector = "s1", key_file = '
        f'"{keyFile(tmp_path / "org.pem", orgRSA)}"}},\n'
        f'  {{domain = "example.org", selector = "ed1", key_file = '
        f'"{keyFile(tmp_path / "org-ed.pem", orgEd)}"}},\n'
        f'  {{domain = "relay.test", selector = "mx", key_file = '
        f'"{keyFile(tmp_path / "relay.pem", relayRSA)}"}},\n'
        ']\n'
    ).start()

    signed = ("From: Alice <alice@example.org>\r\nTo: bob@example.net\r\nSubject: signed\r\n"
              "Date: Mon, 1 Nov 2027 00:00:00 +0000\r\nMessage-Id: <e2e-1@example.org>\r\n"
              "\r\nGrüße,   Bob  \r\n.. a dot line\r\n\r\n").encode()
    unsigned = signed.replace(b"alice@example.org", b"carol@other.example").replace(
        b"Subject: signed", b"Subject: unsigned")
    with smtplib.SMTP("127.0.0.1", r.port, timeout=10) as smtp:
        smtp.sendmail("alice@example.org", ["bob@example.net", "gone@example.net"], signed,
                      mail_options=["BODY=8BITMIME"])
        smtp.sendmail("carol@other.example", ["bob@example.net"], unsigned,
                      mail_options=["BODY=8BITMIME"])
    got = {m.content.split(b"Subject: ")[1].split(b"\r\n")[0]: m.content
           for m in hop.waitTo("bob@example.net", 2)}

    # Signed twice (RSA and Ed25519, RFC 8463), above the relay's Received:, which is not
    # signed; both verify against the published keys; the rest arrived as sent.
    message = got[b"signed"]
    assert message.startswith(b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; "
                               b"d=example.org;"), message
    headers, _ = dkim.rfc822_parse(message)
    assert [name for name, _ in headers][:4] == [
        b"DKIM-Signature", b"DKIM-Signature", b"Received", b"From"]
    tags = [dkim.util.parse_tag_value(value) for _, value in headers[:2]]
    assert [t[b"a"] for t in tags] == [b"rsa-sha256", b"ed25519-sha256"]
    for t in tags:
        assert b"".join(t[b"h"].split()).split(b":") == [
            b"from", b"from", b"subject", b"date", b"message-id", b"to"]
    assert message.endswith(b"\r\n" + signed)
    assert dns.verify(message, 0) and dns.verify(message, 1)
    assert {"s1._domainkey.example.org", "ed1._domainkey.example.org"} <= set(dns.asked)
    # The verifier is not fooled: the same message with its body changed fails.
    assert not dns.verify(message.replace("Grüße".encode(), b"Hello"), 0)

    # No key for other.example: relayed unsigned.
    assert b"DKIM-Signature" not in got[b"unsigned"]
    assert got[b"unsigned"].endswith(b"\r\n" + unsigned)

    # The relay's own bounce for gone@ (made in the delivery process, client None) is signed
    # with the key of its domain (From: MAILER-DAEMON@relay.test).
    (bounce,) = hop.waitTo("alice@example.org")
    assert bounce.mailFrom == "<>"
    assert b"\r\nFrom: MAILER-DAEMON@relay.test" in bounce.content
    assert bounce.content.startswith(b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; "
                                     b"d=relay.test;")
    assert dns.verify(bounce.content, 0)
    log = r.log()
    assert "dkim-sign: signed d=example.org s=s1,ed1" in log
    assert "dkim-sign: signed d=relay.test s=mx" in log


def test_a_bad_key_file_stops_the_relay_with_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("-----BEGIN RSA PRIVATE KEY-----\nnot base64 at all\n"
                   "-----END RSA PRIVATE KEY-----\n")
    r = RelayProcess(
        tmp_path / "relay",
        '[dns]\nreverse_lookups = false\n[[plugins]]\nplugin = "dkim-sign"\n'
        f'keys = [{{domain = "example.org", selector = "s1", key_file = "{bad}"}}]\n',
    )
    done = subprocess.run(r.command(), cwd=r.directory, env=dict(os.environ),
                          capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 1
    lines = done.stderr.decode().strip().splitlines()
    assert len(lines) == 1, done.stderr.decode()
    assert lines[0].startswith(
        f"mailrelay: configuration error: {r.directory / 'mailrelay.toml'}: "
        f'plugins[0].keys[0].key_file: the DKIM private key "{bad}" holds no private key '
        "that can be read"
    ), lines[0]


def test_a_header_section_dkimpy_cannot_parse_passes_unsigned(relays, nexthop, tmp_path) -> None:  # noqa: F811
    """A field name followed by white space (RFC 5322 4.5's obsolete syntax): dkimpy cannot
    parse the message.  It was refused 451 4.3.0 at every retry, even for a domain without a
    key; it is relayed unsigned, the reason logged.  (A line that is no field ends the header
    section: the empty line the relay puts before it, as Postfix's cleanup, makes the rest
    body, and the message is signed.)"""
    hop, port = nexthop()
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    r = relays(
        '[dns]\nreverse_lookups = false\n'
        f'[relay]\nsmarthost = "[127.0.0.1]:{port}"\n'
        '[[plugins]]\nplugin = "dkim-sign"\nkeys = [\n'
        f'  {{domain = "example.org", selector = "s1", key_file = '
        f'"{keyFile(tmp_path / "org.pem", key)}"}},\n]\n'
    ).start()
    messages = [
        b"From: alice@example.org\r\nSubject : spaced colon\r\nTo: bob@example.net\r\n\r\nx\r\n",
        b"From: alice@example.org\r\nTo: bob@example.net\r\nnot a field\r\n\r\nx\r\n",
        b"From: carol@nokey.example\r\nSubject : no key\r\nTo: bob@example.net\r\n\r\nx\r\n",
    ]
    with smtplib.SMTP("127.0.0.1", r.port, timeout=10) as smtp:
        for data in messages:
            sender = "carol@nokey.example" if b"carol" in data else "alice@example.org"
            smtp.sendmail(sender, ["bob@example.net"], data)  # (raises on a refusal)
    got = hop.waitTo("bob@example.net", 3)
    for data in messages:  # (each line as sent; the relay adds Received:, Message-Id:, Date:)
        lines = data.split(b"\r\n\r\n")[0].split(b"\r\n")
        assert [m for m in got if all(b"\r\n" + line + b"\r\n" in m.content for line in lines)]
    assert [b"not a field" in m.content for m in got if b"DKIM-Signature" in m.content] == [True]
    r.waitForLog(r"dkim-sign: not signed: dkimpy cannot parse the header section: "
                 r"Unexpected characters in RFC822 header: b'Subject : spaced colon'")


def _oneKeyPublished(tmp_path: Path) -> tuple[Any, str]:
    """A DNS server (started) publishing the record of the key of signed.test (selector
    s1) and not that of unsigned.test (s2), and the C{[[plugins]]} table of dkim-sign with
    both keys."""
    from tests.harness import DNSServer

    published = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    missing = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    record = FakeDNS()
    record.publish("s1", "signed.test", published)
    value = record.records["s1._domainkey.signed.test"].decode()
    server = DNSServer(tmp_path / "dns", "test", [["s1._domainkey.signed.test", "TXT", value]])
    return server, (
        '[[plugins]]\nplugin = "dkim-sign"\nkeys = [\n'
        f'  {{domain = "signed.test", selector = "s1", key_file = '
        f'"{keyFile(tmp_path / "signed.pem", published)}"}},\n'
        f'  {{domain = "unsigned.test", selector = "s2", key_file = '
        f'"{keyFile(tmp_path / "unsigned.pem", missing)}"}},\n'
        ']\n'
    )


def test_the_relay_checks_its_keys_records_at_start(relays, tmp_path: Path) -> None:
    """The relay looks up each key's record once started, through its name servers, and
    warns of one missing: every signature with that key would fail at the receivers."""
    server, keys = _oneKeyPublished(tmp_path)
    try:
        r = relays(
            '[dns]\nreverse_lookups = false\n'
            f'nameservers = ["127.0.0.1:{server.port}"]\n[queue]\nhold = true\n' + keys
        ).start()
        r.waitForLog(r"dkim-sign: the key record at s1\._domainkey\.signed\.test publishes "
                     rf"the key of {tmp_path / 'signed.pem'}")
        line = r.waitForLog(r"\[mailrelay\.builtin\.dkim#warn\] dkim-sign: no DKIM key record "
                            r"at s2\._domainkey\.unsigned\.test: .*").group(0)
        assert "publish: v=DKIM1; k=rsa; p=" in line, line
        # Once, by the relay: not again by its delivery process.
        assert r.log().count("no DKIM key record at s2._domainkey.unsigned.test") == 1
        assert ("s2._domainkey.unsigned.test", "TXT") in server.queries()
    finally:
        server.stop()


def test_check_looks_up_the_keys_records(tmp_path: Path) -> None:
    """`mailrelay check` looks up each key's record, as the relay does at start (and as
    opendkim-testkey does): one missing (or of another key) is a warning, not a failure;
    name servers that do not answer say the records could not be checked."""
    import sys

    from tests.harness import freePort

    mailrelay = str(Path(sys.executable).with_name("mailrelay"))
    server, keys = _oneKeyPublished(tmp_path)

    def check(port: int) -> subprocess.CompletedProcess[str]:
        config = tmp_path / "mailrelay.toml"
        config.write_text(f'[dns]\nnameservers = ["127.0.0.1:{port}"]\n'
                          f'[spool]\ndirectory = "{tmp_path / "spool"}"\n{keys}')
        return subprocess.run([mailrelay, "check", "--config", str(config)],
                              capture_output=True, text=True, timeout=60)

    try:
        p = check(server.port)
        assert p.returncode == 0, p.stderr
        assert "mailrelay: configuration" in p.stdout and p.stdout.rstrip().endswith(": ok")
        warnings = [line for line in p.stderr.splitlines() if "dkim-sign" in line]
        assert len(warnings) == 1, p.stderr
        assert warnings[0].startswith(
            "mailrelay: warning: dkim-sign: no DKIM key record at s2._domainkey.unsigned.test:"
        ) and "publish: v=DKIM1; k=rsa; p=" in warnings[0], warnings
        assert ("s1._domainkey.signed.test", "TXT") in server.queries()
    finally:
        server.stop()
    started = time.monotonic()
    p = check(freePort())  # nobody answers there
    assert p.returncode == 0, p.stderr
    unchecked = sorted(line for line in p.stderr.splitlines() if "dkim-sign" in line)
    assert len(unchecked) == 2, p.stderr
    for line, name in zip(unchecked, ["s1._domainkey.signed.test",
                                      "s2._domainkey.unsigned.test"], strict=True):
        assert line.startswith(
            f"mailrelay: warning: dkim-sign: could not check the key record at {name}: "
        ), line
    assert time.monotonic() - started < 30


def signingRelay(relays, port: int, directory: Path, options: str = ""):  # noqa: ANN001, ANN201
    """A relay started with dkim-sign and one new key of example.org (selector s1, its file
    in C{directory}), relaying to the next hop on C{port}; and the L{FakeDNS} publishing it."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    keyPath = directory / "org.pem"
    dns = FakeDNS()
    dns.publish("s1", "example.org", key)
    return relays(
        '[dns]\nreverse_lookups = false\n'
        f'[relay]\nsmarthost = "[127.0.0.1]:{port}"\n'
        '[[plugins]]\nplugin = "dkim-sign"\n'
        f'keys = [{{domain = "example.org", selector = "s1", key_file = "{keyFile(keyPath, key)}"}}]\n'
        + options
    ).start(), dns


def relaySigned(r, hop, sender: str) -> tuple[dict[bytes, bytes], bytes]:  # noqa: ANN001
    """Send a message From: C{sender} to bob@example.net through the relay C{r}; the tags of
    the signature on top of it as it reached the next hop C{hop}, and the message."""
    data = f"From: {sender}\r\nTo: bob@example.net\r\nSubject: signed\r\n\r\nx\r\n"
    with smtplib.SMTP("127.0.0.1", r.port, timeout=10) as smtp:
        smtp.sendmail(sender, ["bob@example.net"], data.encode())
    (got,) = hop.waitTo("bob@example.net")
    headers, _ = dkim.rfc822_parse(got.content)
    assert headers[0][0] == b"DKIM-Signature", got.content
    return dkim.util.parse_tag_value(headers[0][1]), got.content


def test_signature_ttl_puts_an_expiry_on_the_wire(relays, nexthop, tmp_path) -> None:  # noqa: F811
    """C{signature_ttl = 3600}: the signature arriving at the next hop carries C{x=} an
    hour after its C{t=} (RFC 6376 section 3.5, OpenDKIM's SignatureTTL), and verifies."""
    hop, port = nexthop()
    r, dns = signingRelay(relays, port, tmp_path, "signature_ttl = 3600\n")
    tags, content = relaySigned(r, hop, "alice@example.org")
    assert int(tags[b"x"]) - int(tags[b"t"]) == 3600
    assert dns.verify(content, 0)


def test_subdomains_are_signed_with_the_parent_key(relays, nexthop, tmp_path) -> None:  # noqa: F811
    """C{subdomains = true}: mail From: a sub.example.org address arrives signed with the
    key of example.org (C{d=example.org}, OpenDKIM's SubDomains), and verifies."""
    hop, port = nexthop()
    r, dns = signingRelay(relays, port, tmp_path, "subdomains = true\n")
    tags, content = relaySigned(r, hop, "alice@sub.example.org")
    assert tags[b"d"] == b"example.org"
    assert dns.verify(content, 0)
    r.waitForLog(r"dkim-sign: signed d=example\.org s=s1")

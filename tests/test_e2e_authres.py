"""End-to-end: the built-in C{authres} filter in the real C{twistd -n mailrelay}, its DNS
through C{[dns] nameservers} (tests/harness.py's DNSServer): a message from an SPF-permitted
127.0.0.1 with a good DKIM signature (signed here with a key made here) reaches the aiosmtpd
next hop with C{Authentication-Results: relay.test; spf=pass ...; dkim=pass ...; dmarc=pass};
a forged one with fail results; with C{dmarc_reject} a p=reject failure is refused 550."""

from __future__ import annotations

import smtplib
from typing import Any

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.harness import DNSServer
from tests.test_e2e_outbound import nexthop  # noqa: F401  (the fixture)


def _key() -> tuple[bytes, list[str]]:
    """A new RSA key: its PEM, and its DKIM key record in character-strings."""
    import base64

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    text = "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode("ascii")
    return pem, [text[i : i + 200] for i in range(0, len(text), 200)]


GOOD_KEY, GOOD_RECORD = _key()
OTHER_KEY, _ = _key()

ZONE = [
    ["example.test", "TXT", "v=spf1 ip4:127.0.0.1 -all"],
    ["sel._domainkey.example.test", "TXT", *GOOD_RECORD],
    ["_dmarc.example.test", "TXT", "v=DMARC1; p=reject"],
    ["bank.test", "TXT", "v=spf1 ip4:192.0.2.1 -all"],
    ["sel._domainkey.bank.test", "TXT", *GOOD_RECORD],
    ["_dmarc.bank.test", "TXT", "v=DMARC1; p=reject"],
    ["tempspf.test", "TXT", "v=spf1 include:sf.test -all"],
    ["sf.test", "SERVFAIL"],
    ["s1._domainkey.evil.test", "SERVFAIL"],
]


@pytest.fixture(scope="module")
def dnsServer(tmp_path_factory: pytest.TempPathFactory):
    server = DNSServer(tmp_path_factory.mktemp("dns"), "test", ZONE)
    yield server
    server.stop()


def config(dnsPort: int, hopPort: int, options: str = "") -> str:
    # 127.0.0.1 is not in a relay network: a client from outside, as at an MX.
    return (
        '[relay]\nnetworks = []\naccept_domains = ["example.org"]\n'
        f'[dns]\nreverse_lookups = false\nnameservers = ["127.0.0.1:{dnsPort}"]\n'
        f'[[routes]]\ndomain = "example.org"\nbackend = "smtp"\nnexthop = "[127.0.0.1]:{hopPort}"\n'
        f'[[plugins]]\nplugin = "authres"\n{options}'
    )


def message(sender: str, subject: str, key: bytes, domain: str, selector: bytes = b"sel") -> bytes:
    body = (f"From: <{sender}>\r\nTo: <bob@example.org>\r\nSubject: {subject}\r\n"
            f"Message-Id: <{subject}@{domain}>\r\n\r\nHello Bob.\r\n").encode()
    return dkim.sign(body, selector, domain.encode(), key, linesep=b"\r\n") + body


def send(port: int, sender: str, data: bytes) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=15) as s:
        assert s.ehlo("client.example.test")[0] == 250
        assert s.mail(sender)[0] == 250
        assert s.rcpt("bob@example.org")[0] == 250
        return s.data(data)


def results(received: Any) -> list[str]:
    """The Authentication-Results fields of a message the next hop received, unfolded."""
    head = received.content.split(b"\r\n\r\n", 1)[0].decode()
    fields = head.replace("\r\n\t", " ").replace("\r\n ", " ").split("\r\n")
    return [f for f in fields if f.lower().startswith("authentication-results:")]


def test_pass_and_fail_reach_the_next_hop(relays, dnsServer, nexthop) -> None:  # noqa: F811
    hop, hopPort = nexthop()
    r = relays(config(dnsServer.port, hopPort)).start()
    # A client's own Authentication-Results claiming the relay's name is removed (RFC 8601 5).
    good = b"Authentication-Results: relay.test; dmarc=pass\r\n" + message(
        "alice@example.test", "good", GOOD_KEY, "example.test")
    assert send(r.port, "alice@example.test", good)[0] == 250
    # Forged: bank.test permits only 192.0.2.1, and the signature is not made with its key.
    forged = message("ceo@bank.test", "forged", OTHER_KEY, "bank.test")
    assert send(r.port, "ceo@bank.test", forged)[0] == 250
    accepted = hop.waitFor(lambda acc: len(acc) >= 2, 15, "two messages")
    bySubject = {b"good" if b"Subject: good" in m.content else b"forged": m for m in accepted}
    [field] = results(bySubject[b"good"])
    assert field.startswith("Authentication-Results: relay.test; spf=pass "
                            "smtp.mailfrom=alice@example.test; dkim=pass header.d=example.test "
                            "header.s=sel header.b=")
    assert field.endswith("; dmarc=pass (p=reject dis=none) header.from=example.test")
    [field] = results(bySubject[b"forged"])
    assert "spf=fail smtp.mailfrom=ceo@bank.test;" in field
    assert "dkim=fail (" in field and "header.d=bank.test header.s=sel" in field
    assert field.endswith("dmarc=fail (p=reject dis=reject) header.from=bank.test")
    # Every lookup went to the configured name server.
    asked = set(dnsServer.queries())
    assert {("example.test", "TXT"), ("sel._domainkey.example.test", "TXT"),
            ("_dmarc.example.test", "TXT"), ("_dmarc.bank.test", "TXT")} <= asked
    assert "authres: spf=fail dkim=fail:bank.test dmarc=fail from=bank.test" in r.log()


def test_dmarc_reject_refuses_550(relays, dnsServer, nexthop) -> None:  # noqa: F811
    hop, hopPort = nexthop()
    r = relays(config(dnsServer.port, hopPort, "dmarc_reject = true\n")).start()
    forged = message("ceo@bank.test", "forged", OTHER_KEY, "bank.test")
    assert send(r.port, "ceo@bank.test", forged) == (
        550, b"5.7.1 Error: rejected by DMARC policy for bank.test")
    good = message("alice@example.test", "good", GOOD_KEY, "example.test")
    assert send(r.port, "alice@example.test", good)[0] == 250
    [received] = hop.waitFor(lambda acc: len(acc) >= 1, 15, "the good message")
    assert b"Subject: good" in received.content
    # The refused message was never queued: the intake's line says so.
    r.waitForLog(r"from=<ceo@bank\.test> .*result=550 5\.7\.1 Error: rejected by DMARC")
    assert len(hop.accepted) == 1


def test_a_dns_failure_of_an_unaligned_identity_does_not_save_a_spoof(
    relays, dnsServer, nexthop,  # noqa: F811
) -> None:
    """A From: ceo@bank.test (p=reject) from a host bank.test does not permit is refused even
    when the lookup of another domain's DKIM key or SPF record fails, or a selector makes
    the key name longer than 255 octets: only an identifier aligned with the From: domain can
    make DMARC temperror (RFC 7489 4.2).  Each was dmarc=temperror, accepted 250."""
    hop, hopPort = nexthop()
    r = relays(config(dnsServer.port, hopPort, "dmarc_reject = true\n")).start()
    refused = (550, b"5.7.1 Error: rejected by DMARC policy for bank.test")
    # A DKIM signature of evil.test, whose key lookup fails (SERVFAIL).
    spoof = message("ceo@bank.test", "evilkey", OTHER_KEY, "bank.test")
    signed = dkim.sign(spoof, b"s1", b"evil.test", OTHER_KEY, linesep=b"\r\n") + spoof
    assert send(r.port, "ceo@bank.test", signed) == refused
    # MAIL FROM a domain whose SPF record includes one that fails.
    assert send(r.port, "x@tempspf.test", spoof) == refused
    # A selector of 15 labels of 60 octets: the key name is no DNS name (a permerror).
    long = b".".join([b"a" * 60] * 15)
    forged = (b"DKIM-Signature: v=1; a=rsa-sha256; d=evil.test; c=relaxed/relaxed;\r\n s="
              + long + b";\r\n h=from; bh=AAAA; b=AAAA\r\n" + spoof)
    assert send(r.port, "ceo@bank.test", forged) == refused
    r.waitForLog(r"dkim=temperror:evil\.test fail:bank\.test dmarc=fail from=bank\.test")
    r.waitForLog(r"spf=temperror dkim=fail:bank\.test dmarc=fail from=bank\.test")
    r.waitForLog(r"dkim=permerror:evil\.test fail:bank\.test dmarc=fail from=bank\.test")
    assert ("s1._domainkey.evil.test", "TXT") in dnsServer.queries()
    assert not [q for q in dnsServer.queries() if q[0].startswith("aaa")]
    assert hop.accepted == []


def test_a_header_section_dkimpy_cannot_parse_is_tagged_not_deferred(
    relays, dnsServer, nexthop,  # noqa: F811
) -> None:
    """A field name followed by white space (RFC 5322 4.5's obsolete syntax): dkimpy cannot
    parse the message.  It was refused 451 4.3.0 (the filter failed) at every retry; it is
    accepted, its signature neutral, DMARC passing by SPF.  (A line that is no field ends the
    header section: the relay puts an empty line before it, as Postfix's cleanup, so the
    message is parsed, and its signature no longer matches the body.)"""
    hop, hopPort = nexthop()
    r = relays(config(dnsServer.port, hopPort, "dmarc_reject = true\n")).start()
    good = message("alice@example.test", "odd", GOOD_KEY, "example.test")
    for odd in (b"Subject : odd", b"Subject: odd\r\nthis is not a header field"):
        assert send(r.port, "alice@example.test", good.replace(b"Subject: odd", odd))[0] == 250
    accepted = hop.waitFor(lambda acc: len(acc) >= 2, 15, "two messages")
    dkim = []
    for received in accepted:
        [field] = results(received)
        assert "spf=pass smtp.mailfrom=alice@example.test;" in field
        assert field.endswith("dmarc=pass (p=reject dis=none) header.from=example.test")
        dkim.append(field.split("; dkim=")[1].split(" (")[0])
    assert sorted(dkim) == ["fail", "neutral"]
    assert [r for r in accepted if b"(the header section cannot be parsed)" in r.content]
    r.waitForLog(r"authres: DKIM not verified: dkimpy cannot parse the header section: "
                 r"Unexpected characters in RFC822 header: b'Subject : odd'")


def test_a_from_domain_that_is_no_token_cannot_add_results(
    relays, dnsServer, nexthop,  # noqa: F811
) -> None:
    """The From: domain is written in header.from= as RFC 8601 says a value is written: a
    token, else a quoted-string.  A domain literal holding "; dkim=pass ..." was written as
    it came, so the field the next hops trust (it names this relay) carried the client's
    results as the relay's own."""
    hop, hopPort = nexthop()
    r = relays(config(dnsServer.port, hopPort)).start()
    forged = (b"From: <ceo@[x; dkim=pass header.d=bank.test; dmarc=pass header.from=bank.test]>\r\n"
              b"To: <bob@example.org>\r\nSubject: injected\r\n\r\nHello Bob.\r\n")
    assert send(r.port, "ceo@bank.test", forged)[0] == 250
    [received] = hop.waitFor(lambda acc: len(acc) >= 1, 15, "the message")
    [field] = results(received)
    assert field.endswith('; dmarc=none header.from="[x; dkim=pass header.d=bank.test; '
                          'dmarc=pass header.from=bank.test]"'), field


def test_a_message_without_header_section_cannot_continue_the_field(
    relays, dnsServer, nexthop,  # noqa: F811
) -> None:
    """Without header stampers (header_stampers = []) the Authentication-Results: field is
    the first one the message gets.  One whose first line starts with white space (no
    header section) got it right above that line, which then continued the field: the
    client's "dkim=pass header.d=bank.test" was read as the relay's.  An empty line now
    keeps that line in the body, as the stampers' fields are kept apart from it."""
    hop, hopPort = nexthop()
    r = relays("header_stampers = []\n" + config(dnsServer.port, hopPort)).start()
    forged = b" ; dkim=pass header.d=bank.test\r\nSubject: continued\r\n\r\nHello Bob.\r\n"
    assert send(r.port, "ceo@bank.test", forged)[0] == 250
    [received] = hop.waitFor(lambda acc: len(acc) >= 1, 15, "the message")
    [field] = results(received)
    assert "bank.test" not in field.partition("smtp.mailfrom=ceo@bank.test;")[2], field
    assert received.content.endswith(b"\r\n\r\n" + forged), received.content

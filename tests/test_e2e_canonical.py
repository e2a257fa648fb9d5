"""End-to-end: the built-in C{sender-canonical} filter in the real C{twistd -n mailrelay}, as
a smarthost whose upstream refuses senders it does not know.

A site's machine submits (smtplib, from 127.0.0.1, a relay client) mail from
C{root@web1.internal}; the aiosmtpd next hop receives MAIL FROM and From: rewritten by a
canonical(5) table, the trace fields untouched, and a DKIM signature (dkim-sign after the
rewriting) that verifies; the bounce of a refused recipient goes to the rewritten sender.
"""

from __future__ import annotations

import smtplib

import dkim
from cryptography.hazmat.primitives.asymmetric import ed25519

from tests.test_e2e_dkim import FakeDNS, keyFile
from tests.test_e2e_outbound import nexthop  # noqa: F401 - the aiosmtpd next-hop fixture

TRACE = (b"Received: by web1.internal (Postfix, from userid 0)\r\n\tid 4Q1; Tue, 1 Dec 2026 "
         b"10:00:00 +0000 (envelope-from <root@web1.internal>)\r\n")
MESSAGE = (
    TRACE
    + b"From: Cron Daemon <root@web1.internal>\r\n"
    b"Reply-To: root@web1.internal,\r\n admin@example.net\r\n"
    b"To: bob@example.net\r\nSubject: cron root@web1.internal\r\n"
    b"Date: Tue, 1 Dec 2026 10:00:00 +0000\r\nMessage-Id: <cron-1@web1.internal>\r\n"
    b"\r\nroot@web1.internal said hello\r\n"
)


def _rewritingRelay(relays, tmp_path, table: str, config: str, after: str = ""):  # noqa: ANN001, ANN202
    """A relay (started) without reverse lookups, of C{config}, then the sender-canonical
    filter of the canonical(5) C{table} (written to a file), then C{after}."""
    (tmp_path / "canonical").write_text(table)
    return relays(
        "[dns]\nreverse_lookups = false\n" + config
        + f'[[plugins]]\nplugin = "sender-canonical"\nmap = "{tmp_path / "canonical"}"\n'
        + after
    ).start()


def test_a_smarthost_rewrites_the_sender_and_signs_what_leaves(relays, nexthop, tmp_path) -> None:  # noqa: F811
    hop, port = nexthop()
    hop.rcptReply = lambda rcpt: "550 5.1.1 no such user" if rcpt.startswith("gone@") else None
    dns = FakeDNS()
    key = ed25519.Ed25519PrivateKey.generate()
    dns.publish("s1", "example.com", key)
    r = _rewritingRelay(
        relays, tmp_path,
        "# the site's machines\nroot@web1.internal  ops@example.com\n@app3.lan  @example.com\n",
        f'[relay]\nsmarthost = "[127.0.0.1]:{port}"\n',
        '[[plugins]]\nplugin = "dkim-sign"\n'
        f'keys = [{{domain = "example.com", selector = "s1", key_file = '
        f'"{keyFile(tmp_path / "s1.pem", key)}"}}]\n',
    )
    with smtplib.SMTP("127.0.0.1", r.port, timeout=10) as smtp:
        smtp.sendmail("root@web1.internal", ["bob@example.net", "gone@example.net"], MESSAGE)
        smtp.sendmail("www-data@app3.lan", ["bob@example.net"],
                      MESSAGE.replace(b"Cron Daemon <root@web1.internal>",
                                      b"<www-data@app3.lan>").replace(b"cron-1", b"cron-2"))
    first, second = sorted(hop.waitTo("bob@example.net", 2), key=lambda m: b"cron-2" in m.content)

    assert first.mailFrom == "ops@example.com"
    assert second.mailFrom == "www-data@example.com"  # (@domain: the local part kept)
    headers, body = dkim.rfc822_parse(first.content)
    fields = dict(reversed(headers))
    assert fields[b"From"] == b" Cron Daemon <ops@example.com>\r\n"
    assert fields[b"Reply-To"] == b" ops@example.com,\r\n admin@example.net\r\n"
    # Trace fields, the Subject:, the body: as sent; the relay's own Received: above.
    assert TRACE in first.content
    assert b"Subject: cron root@web1.internal\r\n" in first.content
    assert first.content.endswith(b"\r\n\r\nroot@web1.internal said hello\r\n")
    assert [name for name, _ in headers][:2] == [b"DKIM-Signature", b"Received"]
    # Signed after the rewriting: it verifies, and covers From:.
    assert b"d=example.com" in headers[0][1] and dns.verify(first.content, 0)
    assert not dns.verify(first.content.replace(b"<ops@example.com>", b"<root@web1.internal>"), 0)
    assert b"From: <www-data@example.com>\r\n" in second.content and dns.verify(second.content, 0)

    # The bounce for gone@ goes to the rewritten sender (the point of it).
    (bounce,) = hop.waitTo("ops@example.com")
    assert bounce.mailFrom == "<>" and b"gone@example.net" in bounce.content
    log = r.log()
    assert "sender=<root@web1.internal> rewritten to <ops@example.com>" in log
    assert "sender-canonical: From: <root@web1.internal> rewritten to <ops@example.com>" in log
    assert "from=<ops@example.com> nrcpt=2" in log


def test_a_from_line_the_rewriting_would_make_too_long_is_left_as_sent(
    relays, nexthop, tmp_path  # noqa: F811
) -> None:
    """A From: line that the longer address would take past 998 octets is relayed as sent
    (the log says why), the envelope sender rewritten: the client's message is taken, not
    deferred at each of its tries."""
    hop, port = nexthop()
    r = _rewritingRelay(relays, tmp_path, "root@web1.internal  a-much-longer-address@example.com\n",
                        f'[relay]\nsmarthost = "[127.0.0.1]:{port}"\n')
    field = b"From: " + b"x" * 963 + b" <root@web1.internal>\r\n"
    with smtplib.SMTP("127.0.0.1", r.port, timeout=10) as smtp:
        smtp.sendmail("root@web1.internal", ["bob@example.net"],
                      b"Subject: long\r\n" + field + b"\r\nhi\r\n")
    (message,) = hop.waitTo("bob@example.net")
    assert message.mailFrom == "a-much-longer-address@example.com"
    assert b"\r\n" + field in message.content
    assert "sender-canonical: From: left as it is, a line would be longer than 998 octets" \
        in r.log()


def test_a_sender_route_is_chosen_by_the_rewritten_sender(
    relays, nexthop, tmp_path  # noqa: F811
) -> None:
    """[[sender_routes]] looks up the sender as queued, after sender-canonical rewrote it (as
    Postfix's sender_dependent_relayhost_maps sees the sender its cleanup rewrote): the
    machines' root@web1.internal leaves as ops@example.com through example.com's route."""
    smarthost, smarthostPort = nexthop()
    provider, providerPort = nexthop()
    r = _rewritingRelay(
        relays, tmp_path, "root@web1.internal  ops@example.com\n",
        f'[relay]\nsmarthost = "[127.0.0.1]:{smarthostPort}"\n'
        f'[[sender_routes]]\nsender = "@example.com"\nnexthop = "[127.0.0.1]:{providerPort}"\n',
    )
    with smtplib.SMTP("127.0.0.1", r.port, timeout=10) as smtp:
        smtp.sendmail("root@web1.internal", ["bob@example.net"], MESSAGE)
    (message,) = provider.waitTo("bob@example.net")
    assert message.mailFrom == "ops@example.com"
    assert smarthost.accepted == []


def test_an_address_extension_is_kept_through_the_rewriting(relays, nexthop, tmp_path) -> None:  # noqa: F811
    """With [delivery] recipient_delimiter = "+", root+cron@web1.internal is looked up whole,
    then as root@web1.internal, and becomes ops+cron@example.com (Postfix's canonical maps
    with recipient_delimiter: canonical(5) ADDRESS EXTENSION); it was left as it was."""
    hop, port = nexthop()
    r = _rewritingRelay(
        relays, tmp_path, "root@web1.internal  ops@example.com\n",
        '[delivery]\nrecipient_delimiter = "+"\n'
        f'[relay]\nsmarthost = "[127.0.0.1]:{port}"\n',
    )
    with smtplib.SMTP("127.0.0.1", r.port, timeout=10) as smtp:
        smtp.sendmail("root+cron@web1.internal", ["bob@example.net"],
                      MESSAGE.replace(b"<root@web1.internal>", b"<root+cron@web1.internal>"))
    (got,) = hop.waitTo("bob@example.net")
    assert got.mailFrom == "ops+cron@example.com"
    assert b"From: Cron Daemon <ops+cron@example.com>\r\n" in got.content
    assert "sender=<root+cron@web1.internal> rewritten to <ops+cron@example.com>" in r.log()

"""End-to-end, CHUNKING on the way out (RFC 3030): the real C{twistd -n mailrelay} delivering
to Postfix's smtpd, which offers CHUNKING by default: the message goes in BDAT chunks (Postfix's
own log counts them), byte for byte, dots unstuffed; to Postfix told not to offer CHUNKING it
goes with DATA; a chunk Postfix refuses bounces with Postfix's reply.  (aiosmtpd offers no
CHUNKING: the tests of L{tests.test_e2e_outbound} deliver to it with DATA.)"""

from __future__ import annotations

import re
from pathlib import Path

from mailrelay.delivery.protocol import CHUNK_SIZE
from tests.postfixpeer import DOMAIN, PostfixPeer, postfix  # noqa: F401 - fixture
from tests.test_e2e_outbound import (
    ScriptedServer,
    bounceID,
    config,
    dns,  # noqa: F401 - the module's DNS server fixture
    relay,  # noqa: F401 - the relay fixture
    release,
    smtpRoute,
    spooled,
    submit,
    waitEmpty,
    waitRemoved,
    waitResult,
)


def _body(size: int) -> bytes:
    """About C{size} octets of lines, with lines of dots at and around every CHUNK_SIZE."""
    line = b"0123456789" * 7 + b"\r\n"
    body = b""
    while len(body) < size:
        body += line * 100 + b".\r\n..\r\n.x\r\n"
    return body


def _stored(content: bytes) -> bytes:
    """A message as Postfix's virtual agent stored it, from our Received: on (LF lines)."""
    at = content.index(b"Received: from client.test")
    return content[at:]


def _commands(peer: PostfixPeer) -> str:
    """The command counts of the relay's session, from smtpd's disconnect line."""
    return peer.waitForLog(r"disconnect from localhost\[127\.0\.0\.1\] (.*)").group(1)


def test_bdat_to_postfix(relay, dns, postfix) -> None:
    peer = postfix()
    routes = [{"domain": DOMAIN, "backend": "smtp", "nexthop": f"[127.0.0.1]:{peer.port}"}]
    r = relay(config(dns, hold=True, routes=routes))
    msg = b"From: <alice@sender.test>\r\nTo: <bob@postfix.test>\r\nSubject: chunks\r\n\r\n" + (
        _body(3 * CHUNK_SIZE + 100))
    qid = submit(r, "alice@sender.test", [f"bob@{DOMAIN}"], msg)
    original = spooled(r, qid)
    release(r, config(dns, routes=routes))
    m = waitResult(r, qid, f"bob@{DOMAIN}")
    assert m["status"] == "sent" and m["diagnostic"].startswith("smtp; 250 2.0.0 Ok"), m[0]
    waitRemoved(r, qid)
    (stored,) = peer.waitMailbox("bob")
    assert _stored(stored) == original.replace(b"\r\n", b"\n")  # dots unstuffed, nothing added
    # One BDAT per CHUNK_SIZE read of the spool file, no DATA.
    chunks = -(-len(original) // CHUNK_SIZE)
    assert re.search(rf"\bbdat={chunks}\b", _commands(peer)), peer.log()
    assert "data=" not in _commands(peer)
    waitEmpty(r)


def test_data_when_chunking_is_not_offered(relay, dns, postfix) -> None:
    peer = postfix("smtpd_discard_ehlo_keywords=chunking")
    routes = [{"domain": DOMAIN, "backend": "smtp", "nexthop": f"[127.0.0.1]:{peer.port}"}]
    r = relay(config(dns, routes=routes))
    qid = submit(r, "alice@sender.test", [f"bob@{DOMAIN}"],
                 b"Subject: data\r\n\r\n.leading dot\r\n")
    assert waitResult(r, qid, f"bob@{DOMAIN}")["status"] == "sent"
    (stored,) = peer.waitMailbox("bob")
    assert stored.endswith(b"\n\n.leading dot\n")
    assert re.search(r"\bdata=1\b", _commands(peer)) and "bdat" not in _commands(peer)


def test_refused_chunk_bounces(relay, dns, postfix, tmp_path: Path) -> None:
    """Postfix refuses the message at a BDAT chunk (over its size limit, SIZE not offered so
    that the relay cannot know before): the recipient bounces with Postfix's reply."""
    peer = postfix("message_size_limit=100000", "smtpd_discard_ehlo_keywords=size")
    template = str(tmp_path / "mail" / "{domain}" / "{local}" / "Maildir")
    (tmp_path / "mail" / "sender.test" / "alice").mkdir(parents=True)  # (a maildir route delivers only to users whose directory exists)
    routes = [{"domain": DOMAIN, "backend": "smtp", "nexthop": f"[127.0.0.1]:{peer.port}"},
              {"domain": "sender.test", "backend": "maildir", "nexthop": template}]
    r = relay(config(dns, routes=routes))
    qid = submit(r, "alice@sender.test", [f"bob@{DOMAIN}"],
                 b"Subject: too big\r\n\r\n" + _body(3 * CHUNK_SIZE))
    m = waitResult(r, qid, f"bob@{DOMAIN}")
    assert m["status"] == "bounced", m[0]
    assert m["diagnostic"].startswith("smtp; 552 5.3.4 "), m[0]
    waitRemoved(r, qid)
    assert peer.mailbox("bob") == []
    # The bounce is a queue entry of its own, delivered after the original is removed.
    waitResult(r, bounceID(r, qid), "alice@sender.test", "sent")
    bounce = tmp_path / "mail" / "sender.test" / "alice" / "Maildir" / "new"
    assert len(list(bounce.iterdir())) == 1
    waitEmpty(r)


def test_a_break_once_the_last_chunk_is_sent_says_the_message_may_go_twice(relay, dns) -> None:
    """A next hop that reads every BDAT chunk, the LAST one too, and closes before any
    reply: it may have the message, so the deferral says it may be sent more than once (it
    said "while sending BDAT"), as one after the end of DATA does."""
    hop = ScriptedServer(EHLO=b"250-scripted.test\r\n250-PIPELINING\r\n250 CHUNKING\r\n",
                         BDAT=lambda n: b"" if n == 0 else None)
    try:
        r = relay(config(dns, queue={"min_backoff": 300, "max_backoff": 600},
                         routes=[smtpRoute("example.org", hop.port)]))
        msg = b"From: <alice@sender.test>\r\nSubject: two chunks\r\n\r\n" + _body(CHUNK_SIZE)
        qid = submit(r, "alice@sender.test", ["bob@example.org"], msg)
        m = waitResult(r, qid, "bob@example.org")
        assert (m["status"], m["diagnostic"]) == (
            "deferred", "X-mailrelay; lost connection with 127.0.0.1[127.0.0.1] while sending "
            "end of data -- message may be sent more than once"), m[0]
        assert len(hop.messages) == 1 and r.queued() == [qid]
    finally:
        hop.close()

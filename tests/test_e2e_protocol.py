"""End-to-end, server side of issue 12: what the real C{twistd -n mailrelay} offers in EHLO
(DSN, CHUNKING, BINARYMIME, REQUIRETLS) and how it takes what clients send with them: raw
sessions (LineClient), swaks, smtplib and Postfix as a client."""

from __future__ import annotations

import json
import re
import smtplib
import subprocess

import pytest

from tests import test_e2e_inbound
from tests.harness import LineClient, RelayProcess, requireTool

#: The fixture starting relays that hold their mail (spool only, no delivery).
relay = test_e2e_inbound.relay


@pytest.fixture
def postfix():
    from tests.postfixpeer import PostfixPeer

    made: list[PostfixPeer] = []

    def start(relayhost: str, **settings: str) -> PostfixPeer:
        peer = PostfixPeer(relayhost, settings)
        made.append(peer)
        return peer.start()

    yield start
    for peer in made:
        peer.stop()


def queued(r: RelayProcess) -> list[tuple[dict, bytes]]:
    base = r.spool / "queue"
    return [(json.loads((base / f"{q}.json").read_text()), (base / f"{q}.eml").read_bytes())
            for q in r.queued()]


def session(r: RelayProcess, ehlo: bytes = b"EHLO client.example"
            ) -> tuple[LineClient, list[bytes]]:
    c = r.connect()
    assert c.readReply()[0].startswith(b"220 ")
    c.send(ehlo + b"\r\n")
    return c, c.readReply()


# DSN ----------------------------------------------------------------------------------------


def test_dsn_advertised_and_parameters_spooled(relay) -> None:
    r = relay()
    with smtplib.SMTP("127.0.0.1", r.port, timeout=10) as s:
        s.ehlo("client.example")
        assert s.has_extn("dsn")
        s.sendmail("a@example.com", ["b@example.org"], b"Subject: dsn\r\n\r\nbody\r\n",
                   mail_options=["RET=HDRS", "ENVID=QQ+2B1"],
                   rcpt_options=["NOTIFY=SUCCESS,DELAY", "ORCPT=rfc822;B+40example.org"])
    ((envelope, _),) = queued(r)
    assert (envelope["ret"], envelope["envid"]) == ("HDRS", "QQ+1")
    assert envelope["recipients"][0]["notify"] == ["SUCCESS", "DELAY"]
    assert envelope["recipients"][0]["orcpt"] == "rfc822;B@example.org"


def test_postfix_passes_dsn_requests_on_to_the_relay(relay, postfix) -> None:
    """Postfix relays through mailrelay: as DSN is offered, it passes NOTIFY, ORCPT, RET and
    ENVID on instead of answering "relayed" itself (it did before: two messages came, the
    second its notice to the sender).  Its SMTP client sends DATA, not BDAT, though CHUNKING
    is offered: Postfix's client has no BDAT."""
    r = relay()
    peer = postfix(f"[127.0.0.1]:{r.port}")
    with smtplib.SMTP("127.0.0.1", peer.port, timeout=30) as s:
        s.ehlo("client.example")
        assert s.has_extn("dsn")
        s.sendmail("alice@example.com", ["bob@example.org"],
                   b"Subject: via postfix\r\n\r\nbody\r\n", mail_options=["RET=HDRS", "ENVID=env1"],
                   rcpt_options=["NOTIFY=SUCCESS,DELAY"])
    peer.waitForLog(r"to=<bob@example\.org>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:\d+, .*status=sent")
    peer.waitForEmptyQueue()
    messages = queued(r)
    assert len(messages) == 1, [m[0]["sender"] for m in messages]
    ((envelope, message),) = messages
    assert envelope["sender"] == "alice@example.com"
    assert (envelope["ret"], envelope["envid"]) == ("HDRS", "env1")
    (rcpt,) = envelope["recipients"]
    assert (rcpt["address"], rcpt["notify"], rcpt["orcpt"]) == (
        "bob@example.org", ["SUCCESS", "DELAY"], "rfc822;bob@example.org")
    assert b"Subject: via postfix\r\n" in message
    log = peer.log()
    assert re.search(rf"> 127\.0\.0\.1\[127\.0\.0\.1\]:{r.port}: DATA", log), log
    assert not re.search(rf"> 127\.0\.0\.1\[127\.0\.0\.1\]:{r.port}: BDAT", log)


# HELO/EHLO ----------------------------------------------------------------------------------


def test_ehlo_with_spaces_accepted_and_logged(relay) -> None:
    r = relay()
    c, ehlo = session(r, b"EHLO My Computer")
    assert ehlo[0] == b"250-relay.test"
    c.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
    assert [c.readReply()[0][:3] for _ in range(3)] == [b"250", b"250", b"354"]
    c.send(b"Subject: s\r\n\r\n.\r\n")
    assert c.readReply()[0].startswith(b"250 2.0.0 Ok: queued as ")
    c.send(b"EHLO\r\n")
    assert c.readReply() == [b"501 5.5.4 Syntax: EHLO hostname"]
    c.close()
    r.waitForLog(r"127\.0\.0\.1: EHLO argument with spaces accepted: 'My Computer'")
    ((envelope, message),) = queued(r)
    assert envelope["client"]["helo"] == "My Computer"
    assert message.startswith(b"Received: from unknown (localhost [127.0.0.1])\r\n")


def test_swaks_helo_with_spaces(relay) -> None:
    swaks = requireTool("swaks")
    r = relay()
    out = subprocess.run(
        [swaks, "--server", f"127.0.0.1:{r.port}", "--from", "a@example.com", "--to",
         "b@example.org", "--helo", "WIN 10 PC", "--header", "Subject: helo"],
        capture_output=True, text=True, timeout=30,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert " -> EHLO WIN 10 PC" in out.stdout
    ((envelope, _),) = queued(r)
    assert envelope["client"]["helo"] == "WIN 10 PC"

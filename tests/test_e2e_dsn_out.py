"""End-to-end, delivery status notifications on the way out (RFC 3461/3464): the real
C{twistd -n mailrelay} tells the sender of a success as asked (NOTIFY=SUCCESS), with the
action that says where the message went: C{delivered} when it reached the mailbox (a maildir
here), C{relayed} when the next hop does not offer DSN (see
L{tests.test_e2e_outbound.test_relay_byte_exact_without_dsn}); and, when the next hop offers
DSN, passes the request on and leaves the notice to it (Postfix as the next hop, which sends its
own C{delivered} notice back through the relay)."""

from __future__ import annotations

import email
import json
import re
import socket
import time
from pathlib import Path

import pytest

from tests.harness import freePort
from tests.postfixpeer import DOMAIN, HOSTNAME, postfix  # noqa: F401 - fixture
from tests.test_e2e_outbound import (
    Recorder,
    SilentServer,
    _TCPController,
    bounceID,
    config,
    dns,  # noqa: F401 - the module's DNS server fixture
    message,
    nexthop,  # noqa: F401 - the next hop fixture
    parseReport,
    relay,  # noqa: F401 - the relay fixture
    smtpRoute,
    submit,
    unfold,
    waitEmpty,
    waitRemoved,
    waitResult,
)


def _maildir(tmp_path: Path, domain: str) -> dict:
    template = str(tmp_path / "mail" / "{domain}" / "{local}" / "Maildir")
    for local in ("alice", "bob", "carol"):  # the users (a maildir route delivers only to
        (tmp_path / "mail" / domain / local).mkdir(parents=True, exist_ok=True)  # those)
    return {"domain": domain, "backend": "maildir", "nexthop": template}


def _delivered(tmp_path: Path, domain: str, local: str) -> list[bytes]:
    box = tmp_path / "mail" / domain / local / "Maildir" / "new"
    return [p.read_bytes() for p in sorted(box.iterdir())] if box.exists() else []


def test_success_to_a_mailbox_is_reported_delivered(relay, dns, tmp_path: Path) -> None:
    routes = [_maildir(tmp_path, "maildir.test"), _maildir(tmp_path, "sender.test")]
    r = relay(config(dns, routes=routes))
    qid = submit(r, "alice@sender.test", ["bob@maildir.test", "carol@maildir.test"],
                 message("success wanted"), mailOptions=("ENVID=env-9",),
                 rcptOptions=("NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;Bob@Maildir.test"))
    for rcpt in ("bob@maildir.test", "carol@maildir.test"):
        assert waitResult(r, qid, rcpt)["status"] == "sent"
    dsnID = bounceID(r, qid, "delivery status notification")
    waitRemoved(r, dsnID)
    waitEmpty(r)
    (report,) = _delivered(tmp_path, "sender.test", "alice")
    content = report.split(b"\n", 2)[2].replace(b"\n", b"\r\n")  # after Return-Path/Delivered-To
    msg, perMessage, perRecipient, parts = parseReport(content)
    assert msg["Subject"] == "Successful Mail Delivery Report"
    assert perMessage["Original-Envelope-Id"] == "env-9"
    assert [(b["Original-Recipient"], b["Final-Recipient"], b["Action"], b["Status"])
            for b in perRecipient] == [
        ("rfc822; Bob@Maildir.test", "rfc822; bob@maildir.test", "delivered", "2.0.0"),
        ("rfc822; Bob@Maildir.test", "rfc822; carol@maildir.test", "delivered", "2.0.0"),
    ]
    text = " ".join(parts[0].get_payload().split())
    assert "<bob@maildir.test>: X-mailrelay; delivered to maildir" not in text
    assert "<bob@maildir.test>: delivered to maildir" in text
    # The original's header section comes back (RET=HDRS is the default for successes).
    assert parts[2].get_content_type() == "text/rfc822-headers"
    assert email.message_from_string(parts[2].get_payload())["Subject"] == "success wanted"




def test_bounce_names_quoted_addresses_exactly(relay, nexthop, dns) -> None:  # noqa: F811
    """A sender and a recipient with runs of spaces in quoted local parts, the recipient
    refused by the next hop: the bounce names both exactly (RFC 3464 2.3.1-2.3.2), in To:
    and in the delivery-status fields, as on its envelope.  It used to read '"x y"'."""
    hop, port = nexthop()
    sender, rcpt = '"x  y"@sender.test', '"a  b"@example.org'
    hop.rcptReply = lambda a: "550 5.1.1 no such user" if a == rcpt else None
    r = relay(config(dns, routes=[smtpRoute("example.org", port),
                                  smtpRoute("sender.test", port)]))
    qid = submit(r, sender, [rcpt], message("quoted"),
                 rcptOptions=('ORCPT=rfc822;"a+20+20b"@example.org',))
    assert waitResult(r, qid, rcpt)["status"] == "bounced"
    dsnID = bounceID(r, qid)
    waitResult(r, dsnID, sender, "sent")
    (bounce,) = hop.waitTo(sender)
    assert (bounce.mailFrom, bounce.rcptTos) == ("<>", [sender])
    content = bounce.content
    assert b'\r\nTo: <"x  y"@sender.test>\r\n' in content
    assert b'\r\nX-Mailrelay-Sender: rfc822; "x  y"@sender.test\r\n' in content
    assert b'\r\nOriginal-Recipient: rfc822; "a  b"@example.org\r\n' in content
    assert b'\r\nFinal-Recipient: rfc822; "a  b"@example.org\r\n' in content
    msg, perMessage, (block,), _ = parseReport(content)
    assert msg["To"] == f"<{sender}>"
    assert perMessage["X-Mailrelay-Sender"] == f"rfc822; {sender}"
    assert block["Final-Recipient"] == f"rfc822; {rcpt}"
    waitEmpty(r)


@pytest.mark.parametrize("stage", ["RCPT TO", "end of DATA"])
def test_bounce_text_says_which_command_the_refusal_answered(relay, nexthop, dns,  # noqa: F811
                                                             stage: str) -> None:
    """The bounce's text says what the next hop said and to which command, as Postfix's
    (smtp_trouble.c: "host %s said: %s (in reply to %s command)"), as the log line does;
    the Diagnostic-Code field is the reply alone (RFC 3464 2.3.6)."""
    hop, port = nexthop()
    reply = "550 5.1.1 no such user" if stage == "RCPT TO" else "554 5.6.0 refused"
    if stage == "RCPT TO":
        hop.rcptReply = lambda a: reply if a == "bob@example.org" else None
    else:
        hop.dataReply = lambda received, n: (
            reply if received.rcptTos == ["bob@example.org"] else "250 2.0.0 OK")
    r = relay(config(dns, routes=[smtpRoute("example.org", port),
                                  smtpRoute("sender.test", port)]))
    qid = submit(r, "alice@sender.test", ["bob@example.org"], message("refused"))
    m = waitResult(r, qid, "bob@example.org", "bounced")
    assert m["diagnostic"].endswith(f"{reply} (in reply to {stage} command)"), m[0]
    waitResult(r, bounceID(r, qid), "alice@sender.test", "sent")
    (bounce,) = hop.waitTo("alice@sender.test")
    _msg, _perMessage, (block,), _parts = parseReport(bounce.content)
    assert block["Diagnostic-Code"] == f"smtp; {reply}", str(block)
    text = " ".join(email.message_from_bytes(bounce.content).get_payload(0)
                    .get_payload(decode=True).decode().split())
    assert (f"<bob@example.org>: host 127.0.0.1[127.0.0.1] said: {reply} (in reply to "
            f"{stage} command)") in text, text
    waitEmpty(r)


def test_bounce_of_a_binary_message_returns_its_header_section(relay, nexthop, dns) -> None:  # noqa: F811
    """A BODY=BINARYMIME message (RFC 3030, by BDAT to a listener with binarymime = true)
    refused by the next hop, RET=FULL: the bounce returns its header section as it is, says
    why not the whole message, and is 7-bit.  It used to return the whole message with its
    bare CRs and LFs made CRLF and its NULs in a message/rfc822 part labelled 8bit, sent
    with BODY=8BITMIME."""
    hop, port = nexthop()
    hop.rcptReply = lambda a: "550 5.1.1 no such user" if a == "bob@example.org" else None
    routes = [smtpRoute("example.org", port), smtpRoute("sender.test", port)]
    r = relay(config(dns, routes=routes)
              + '[[listeners]]\nendpoint = "tcp:0:interface=127.0.0.1"\nbinarymime = true\n',
              "--spool", "spool", "--hostname", "relay.test", defaults=False)
    headers = (b"From: alice@sender.test\r\nDate: Mon, 1 Dec 2025 10:00:00 +0000\r\n"
               b"Message-Id: <binary@sender.test>\r\nSubject: binary\r\nMIME-Version: 1.0\r\n"
               b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: binary\r\n")
    content = headers + b"\r\n" + bytes(range(256)) + b"\nX\rY\r\n"
    c = r.connect()
    try:
        assert c.readReply()[0].startswith(b"220 ")
        c.send(b"EHLO client.test\r\n")
        assert b"250-BINARYMIME" in c.readReply()
        c.send(b"MAIL FROM:<alice@sender.test> BODY=BINARYMIME RET=FULL\r\n"
               b"RCPT TO:<bob@example.org>\r\nBDAT %d LAST\r\n" % len(content) + content)
        got = [c.readReply()[-1] for _ in range(3)]
        c.send(b"QUIT\r\n")
    finally:
        c.close()
    assert got[:2] == [b"250 2.1.0 Ok", b"250 2.1.5 Ok"]
    m = re.fullmatch(rb"250 2\.0\.0 Ok: queued as (\w+)", got[2])
    assert m, got
    qid = m.group(1).decode()
    assert waitResult(r, qid, "bob@example.org")["status"] == "bounced"
    dsnID = bounceID(r, qid)
    waitResult(r, dsnID, "alice@sender.test", "sent")
    (bounce,) = hop.waitTo("alice@sender.test")
    assert bounce.mailFrom == "<>"
    assert not any(o.upper().startswith("BODY=") for o in bounce.mailOptions), bounce.mailOptions
    assert b"\0" not in bounce.content and bounce.content.isascii()
    assert headers + b"\r\n--" in bounce.content  # as it was (after the relay's Received:)
    _, _, (block,), parts = parseReport(bounce.content)
    assert parts[2].get_content_type() == "text/rfc822-headers"
    assert parts[2]["Content-Transfer-Encoding"] == "7bit"
    assert (block["Action"], block["Status"]) == ("failed", "5.1.1")
    text = " ".join(parts[0].get_payload().split())
    assert "The original message is binary (BODY=BINARYMIME)" in text
    waitEmpty(r)


def test_postfix_next_hop_sends_its_own_delivered_notice(relay, dns, postfix,
                                                         tmp_path: Path) -> None:
    """Relay -> Postfix (which offers DSN) with NOTIFY=SUCCESS,DELAY: the request is passed
    on, so the success notice the sender gets is Postfix's own (Reporting-MTA its name,
    action delivered), relayed back through mailrelay; mailrelay sends none of its own."""
    peer = postfix(start=False)
    routes = [{"domain": DOMAIN, "backend": "smtp", "nexthop": f"[127.0.0.1]:{peer.port}"},
              _maildir(tmp_path, "sender.test")]
    r = relay(config(dns, routes=routes))
    peer.postconf(f"relayhost=[127.0.0.1]:{r.port}")
    peer.start()
    qid = submit(r, "alice@sender.test", [f"bob@{DOMAIN}"], message("via postfix"),
                 mailOptions=("RET=HDRS", "ENVID=env-pf"),
                 rcptOptions=("NOTIFY=SUCCESS,DELAY",))
    m = waitResult(r, qid, f"bob@{DOMAIN}")
    assert m["status"] == "sent", m[0]
    waitRemoved(r, qid)
    # Postfix got the DSN parameters and delivered to bob's mailbox ...
    peer.waitForLog(rf"to=<bob@{DOMAIN}>.*status=sent")
    (delivered,) = peer.waitMailbox("bob")
    assert b"Subject: via postfix" in delivered
    # ... and its notice came back through the relay to alice's maildir.
    deadline = time.monotonic() + 30
    while not _delivered(tmp_path, "sender.test", "alice") and time.monotonic() < deadline:
        time.sleep(0.1)
    (report,) = _delivered(tmp_path, "sender.test", "alice")
    content = report.split(b"\n", 2)[2].replace(b"\n", b"\r\n")
    msg, perMessage, perRecipient, _ = parseReport(content)
    assert msg["From"] == f"Mail Delivery System <MAILER-DAEMON@{HOSTNAME}>"
    assert perMessage["Reporting-MTA"] == f"dns; {HOSTNAME}"
    assert perMessage["Original-Envelope-Id"] == "env-pf"
    [block] = perRecipient
    assert (block["Final-Recipient"], block["Action"]) == (f"rfc822; bob@{DOMAIN}",
                                                           "delivered")
    assert block["Original-Recipient"] == f"rfc822;bob@{DOMAIN}"
    # mailrelay itself sent no notice about the message.
    assert f"{qid}: sender delivery status notification" not in r.log()
    waitEmpty(r)


def test_bounce_after_refused_connections_names_no_remote_mta(relay, nexthop, dns) -> None:  # noqa: F811
    """A recipient given up after connections that were all refused: the bounce's report
    has its status and diagnostic but no Remote-MTA, as no remote MTA ever answered (RFC 3464
    section 2.3.5 names the MTA that gave the status; Postfix leaves it out then)."""
    hop, port = nexthop()
    closed = freePort()  # nothing listens there: every connection is refused
    r = relay(config(dns, queue={"min_backoff": 1, "max_backoff": 1, "max_lifetime": 1},
                     routes=[smtpRoute("example.org", closed), smtpRoute("sender.test", port)]))
    qid = submit(r, "alice@sender.test", ["bob@example.org"], message("refused"))
    m = waitResult(r, qid, "bob@example.org", "bounced")
    assert "connection refused by 127.0.0.1" in m["diagnostic"], m[0]
    dsnID = bounceID(r, qid)
    waitResult(r, dsnID, "alice@sender.test", "sent")
    (bounce,) = hop.waitTo("alice@sender.test")
    _msg, _perMessage, (block,), _parts = parseReport(bounce.content)
    assert block["Final-Recipient"] == "rfc822; bob@example.org"
    # The status of the last reason, as Postfix returns its defer log on expiry.
    assert block["Action"] == "failed" and block["Status"] == "4.4.1", str(block)
    assert "Remote-MTA" not in block, str(block)
    assert "connection refused by 127.0.0.1" in block["Diagnostic-Code"]
    text = " ".join(email.message_from_bytes(bounce.content).get_payload(0)
                    .get_payload(decode=True).decode().split())
    assert "<bob@example.org>: message expired after" in text, text
    assert "the last attempt said: connection refused by 127.0.0.1" in text, text
    waitEmpty(r)


class BusyServer(SilentServer):
    """Greets, then answers EHLO with 421 and closes (a server that refuses sessions)."""

    def __init__(self) -> None:
        super().__init__()
        self.serve(self._refuse)

    def _refuse(self, conn: socket.socket) -> None:
        with conn:
            conn.sendall(b"220 busy.test ESMTP\r\n")
            conn.recv(1000)  # EHLO
            conn.sendall(b"421 4.3.2 busy.test is busy\r\n")


@pytest.mark.parametrize("notice", ["delayed", "failed"])
def test_a_notice_of_a_suspended_next_hop_says_what_its_server_said(
    relay, nexthop, dns, notice: str  # noqa: F811
) -> None:
    """A next hop whose server answers EHLO with 421 is suspended after a cohort of
    deliveries (1 here); the message deferred meanwhile, unattempted, gets a delay notice
    (or, past max_lifetime, a bounce) saying what that failure said, as Postfix's qmgr
    defers a dead queue's mail with its saved DSN (qmgr_queue_throttle(), dsn_copy()): the
    same Status, Remote-MTA and Diagnostic-Code ("smtp; 421 ...": the server's reply), and
    the reason "delivery temporarily suspended: host H said: <reply>" in the text and the
    log (which adds the command it answered).  Its Diagnostic-Code was the reason, typed
    X-mailrelay."""
    hop, port = nexthop()
    busy = BusyServer()
    try:
        # (Past max_lifetime, or older than delay_warning, when first tried.)
        queue = {"min_backoff": 300, "max_backoff": 600}
        queue.update({"delay_warning": 1} if notice == "delayed" else {"max_lifetime": 1})

        def settings(hold: bool) -> str:
            return config(dns, hold=hold, queue=queue,
                          delivery={"destination_concurrency": 1},
                          routes=[smtpRoute("busy.test", busy.port),
                                  smtpRoute("sender.test", port)])

        r = relay(settings(True))
        queued = [submit(r, "alice@sender.test", [f"u{n}@busy.test"], message(f"busy {n}"))
                  for n in range(2)]
        submitted = time.monotonic()
        r.stop()
        while time.monotonic() - submitted < 1.1:
            time.sleep(0.05)
        r.configText = settings(False)
        r.start()
        status = "deferred" if notice == "delayed" else "bounced"
        logged = [waitResult(r, q, f"u{n}@busy.test", status) for n, q in enumerate(queued)]
        found = {m["diagnostic"] for m in logged}
        # The attempted one's relay= names the server that refused the session as Postfix's
        # does, name[address]:port; the one deferred unattempted, none.
        assert sorted(m["relay"] for m in logged) == sorted(
            [f"127.0.0.1[127.0.0.1]:{busy.port}", "none"]), r.log()
        reply = "421 4.3.2 busy.test is busy"
        said = f"{reply} (in reply to EHLO command)"
        suspended = f"delivery temporarily suspended: host 127.0.0.1[127.0.0.1] said: {said}"
        if notice == "failed":
            found = {re.sub(r"^message expired after \d+s in the queue; last error: ", "", d)
                     for d in found}
        assert found == {f"smtp; {said}", suspended}, r.log()
        notices = hop.waitTo("alice@sender.test", count=2)
        blocks, texts = [], []
        for n in notices:
            _msg, _perMessage, (block,), parts = parseReport(n.content)
            blocks.append((block["Action"], block["Status"], block["Remote-MTA"],
                           unfold(block["Diagnostic-Code"])))
            texts.append(" ".join(parts[0].get_payload(decode=True).decode().split()))
        assert blocks == [(notice, "4.3.2", "dns; [127.0.0.1]", f"smtp; {reply}")] * 2, blocks
        assert sum(f"delivery temporarily suspended: host 127.0.0.1[127.0.0.1] said: {reply}" in t
                   for t in texts) == 1, texts
        assert all(f"said: {reply}" in t for t in texts), texts
        # The other, the one attempted, names the host that said it, the bounce after
        # max_lifetime as the delay notice (Postfix's bounce gives the defer log's text).
        attempted = {"failed": "in the queue; the last attempt: ",
                     "delayed": "@busy.test>: "}[notice] + f"host 127.0.0.1[127.0.0.1] said: {reply}"
        assert sum(attempted in t for t in texts) == 1, texts
    finally:
        busy.close()


def test_bounce_after_a_lost_connection_names_no_remote_mta(relay, nexthop, dns) -> None:  # noqa: F811
    """A recipient given up after its next hop took the message and dropped the connection
    before answering: the status is the relay's own ("lost connection ... while sending end
    of data"), so the bounce names no Remote-MTA, as Postfix's
    smtp_stream_except() records it with dsb_simple() (no mta)."""
    hop, port = nexthop()
    hop.dataReply = lambda received, n: "DROP" if received.rcptTos == ["bob@example.org"] \
        else "250 2.0.0 OK"
    r = relay(config(dns, queue={"min_backoff": 1, "max_backoff": 1, "max_lifetime": 1},
                     routes=[smtpRoute("example.org", port), smtpRoute("sender.test", port)]))
    qid = submit(r, "alice@sender.test", ["bob@example.org"], message("dropped"))
    m = waitResult(r, qid, "bob@example.org", "bounced")
    assert "lost connection with" in m["diagnostic"], m[0]
    waitResult(r, bounceID(r, qid), "alice@sender.test", "sent")
    (bounce,) = hop.waitTo("alice@sender.test")
    _msg, _perMessage, (block,), _parts = parseReport(bounce.content)
    assert block["Status"] == "4.4.2", str(block)
    assert "Remote-MTA" not in block, str(block)
    assert "lost connection with" in block["Diagnostic-Code"]
    waitEmpty(r)


def test_bounce_for_a_size_limit_names_no_remote_mta(relay, nexthop, dns) -> None:  # noqa: F811
    """A message over the next hop's advertised SIZE is refused by the relay itself, before
    MAIL FROM (5.3.4): the bounce names no Remote-MTA, as Postfix reports its own verdicts
    with DSN_BY_LOCAL_MTA (smtp_proto.c, "message size %lu exceeds size limit %.0f of
    server %s")."""
    notices, noticePort = nexthop()
    small = _TCPController(Recorder(), hostname="127.0.0.1", port=0, ready_timeout=10,
                           data_size_limit=200)
    small.start()
    try:
        r = relay(config(dns, routes=[smtpRoute("example.org", small.port),
                                      smtpRoute("sender.test", noticePort)]))
        qid = submit(r, "alice@sender.test", ["bob@example.org"], message("big", "x" * 400))
        m = waitResult(r, qid, "bob@example.org", "bounced")
        assert "exceeds the size limit 200" in m["diagnostic"], m[0]
        waitResult(r, bounceID(r, qid), "alice@sender.test", "sent")
        (bounce,) = notices.waitTo("alice@sender.test")
        _msg, _perMessage, (block,), _parts = parseReport(bounce.content)
        assert (block["Action"], block["Status"]) == ("failed", "5.3.4")
        assert "Remote-MTA" not in block, str(block)
        assert small.handler.attempts == []
        waitEmpty(r)
    finally:
        small.stop()


def test_a_success_notice_deferred_is_stored_in_the_form_earlier_relays_read(
    relay, dns, tmp_path: Path  # noqa: F811
) -> None:
    """A success notice keeps its noticeOf (a field relays before it do not know: rolled
    back to, they moved the notice to corrupt/) only until the marks of the message it
    reports on are found cleared: its first deferral writes its envelope without it."""
    busy = BusyServer()
    try:
        r = relay(config(dns, routes=[_maildir(tmp_path, "maildir.test"),
                                      smtpRoute("sender.test", busy.port)]))
        qid = submit(r, "alice@sender.test", ["bob@maildir.test"], message("success wanted"),
                     rcptOptions=("NOTIFY=SUCCESS",))
        waitResult(r, qid, "bob@maildir.test", "sent")
        dsnID = bounceID(r, qid, "delivery status notification")
        waitResult(r, dsnID, "alice@sender.test", "deferred")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # (the deferral is logged as it is written)
            stored = json.loads((r.spool / "queue" / f"{dsnID}.json").read_bytes())
            if stored["attempts"]:
                break
            time.sleep(0.05)
        assert stored["attempts"] == 1 and stored["isBounce"], stored
        assert "noticeOf" not in stored, stored
    finally:
        busy.close()


def test_a_relayed_notice_names_the_server_with_its_address(relay, nexthop, dns) -> None:  # noqa: F811
    """A success notice's text names the next hop's server that took the message as
    Postfix's does, name[address] ("delivery via %s", trace.c); its Remote-MTA field stays
    the name."""
    hop, port = nexthop()
    notices, noticePort = nexthop()
    r = relay(config(dns, routes=[smtpRoute("example.org", port),
                                  smtpRoute("sender.test", noticePort)]))
    qid = submit(r, "alice@sender.test", ["bob@example.org"], message("relayed"),
                 rcptOptions=("NOTIFY=SUCCESS",))
    waitResult(r, qid, "bob@example.org", "sent")
    (notice,) = notices.waitTo("alice@sender.test")
    _, _, (block,), parts = parseReport(notice.content)
    assert (block["Action"], block["Remote-MTA"]) == ("relayed", "dns; [127.0.0.1]")
    text = " ".join(parts[0].get_payload(decode=True).decode().split())
    assert "<bob@example.org>: relayed via 127.0.0.1[127.0.0.1]: 250" in text, text
    waitEmpty(r)

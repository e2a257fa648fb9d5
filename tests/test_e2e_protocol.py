"""End-to-end, server side of issue 12: what the real C{twistd -n mailrelay} offers in EHLO
(DSN, CHUNKING, BINARYMIME, REQUIRETLS) and how it takes what clients send with them: raw
sessions (LineClient), swaks, smtplib and Postfix as a client."""

from __future__ import annotations

import json
import re
import smtplib
import socket
import subprocess
import time
from pathlib import Path

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
        # The peer's SMTP client logs its dialogue with the relay (debug_peer_list).
        settings = {"debug_peer_list": "127.0.0.1", **settings}
        peer = PostfixPeer(relayhost, settings=tuple(f"{k}={v}" for k, v in settings.items()))
        made.append(peer)
        return peer.start()

    yield start
    for peer in made:
        peer.cleanup()


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


def test_addresses_starting_with_a_dash_refused(relay) -> None:
    """As Postfix (allow_min_user = no): a command down the line, a pipe backend or a site's
    script, could take such an address for an option."""
    r = relay()
    c, _ = session(r)
    c.send(b"MAIL FROM:<-f@example.com>\r\nMAIL FROM:<a@example.com>\r\n"
           b"RCPT TO:<-oi@example.org>\r\nRCPT TO:<\"-x\"@example.org>\r\n"
           b"RCPT TO:<b-c@example.org>\r\n")
    assert [c.readReply() for _ in range(5)] == [
        [b"501 5.1.7 Error: bad sender address syntax: local part starts with '-'"],
        [b"250 2.1.0 Ok"],
        [b"501 5.1.3 Error: bad recipient address syntax: local part starts with '-'"],
        [b"501 5.1.3 Error: bad recipient address syntax: local part starts with '-'"],
        [b"250 2.1.5 Ok"],
    ]
    c.close()


def test_an_ip_address_without_brackets_is_no_domain(relay) -> None:
    """RCPT TO:<u@127.0.0.1> was taken and its mail sent straight to 127.0.0.1, no DNS
    asked, as if it were <u@[127.0.0.1]>: an all-digit top label is no domain (RFC 1123
    section 2.1); Postfix refuses it (resolve_numeric_domain = no).  The literal is taken."""
    r = relay()
    c, _ = session(r)
    c.send(b"MAIL FROM:<a@192.0.2.1>\r\nMAIL FROM:<a@example.com>\r\n"
           b"RCPT TO:<u@127.0.0.1>\r\nRCPT TO:<u@[127.0.0.1]>\r\n")
    syntax = (b"the last label of a domain cannot be all digits (an IP address is written in "
              b"brackets: [192.0.2.1])")
    assert [c.readReply() for _ in range(4)] == [
        [b"501 5.1.7 Error: bad sender address syntax: " + syntax],
        [b"250 2.1.0 Ok"],
        [b"501 5.1.3 Error: bad recipient address syntax: " + syntax],
        [b"250 2.1.5 Ok"],
    ]
    c.close()


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


# CHUNKING: BDAT (RFC 3030) ----------------------------------------------------------------------

START = b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@example.org>\r\n"


def bdat(content: bytes, last: bool = False) -> bytes:
    return b"BDAT %d%s\r\n" % (len(content), b" LAST" if last else b"") + content


def replies(c: LineClient, n: int) -> list[bytes]:
    return [b"\n".join(c.readReply()) for _ in range(n)]


def listener(keys: str = "", limits: str = "") -> tuple[str, ...]:
    """A relay whose listener has C{keys} (and C{[limits]} C{limits})."""
    return (f"{limits}[[listeners]]\nendpoint = \"tcp:0:interface=127.0.0.1\"\n{keys}",
            "--spool", "spool", "--hostname", "relay.test")


def test_bdat_chunks_pipelined_in_one_packet(relay) -> None:
    """The real relay, with its default reject_unauth_pipelining: MAIL, RCPT, three chunks
    (the second holding what would be commands and an end of data) and QUIT in one packet."""
    r = relay()
    c, ehlo = session(r)
    assert b"250-CHUNKING" in ehlo and b"250-DSN" in ehlo
    inside = b"\r\n.\r\nRSET\r\nMAIL FROM:<evil@example.net>\r\nRCPT TO:<v@example.net>\r\nDATA\r\n"
    c.send(START + bdat(b"Subject: chunks\r\n\r\n") + bdat(inside) + bdat(b"end\r\n", True) +
           b"QUIT\r\n")
    got = replies(c, 6)
    assert got[:4] == [b"250 2.1.0 Ok", b"250 2.1.5 Ok", b"250 2.0.0 Ok: 19 octets received",
                       b"250 2.0.0 Ok: %d octets received" % len(inside)]
    m = re.fullmatch(rb"250 2\.0\.0 Ok: queued as (\w+)", got[4])
    assert m and got[5] == b"221 2.0.0 Bye"
    c.expectClosed()
    ((envelope, message),) = queued(r)
    assert envelope["queueID"] == m.group(1).decode()
    assert message.startswith(b"Received: from client.example (localhost [127.0.0.1])\r\n"
                              b"\tby relay.test (mailrelay) with ESMTP id " + m.group(1))
    assert message.endswith(b"\r\n\r\n" + inside + b"end\r\n")
    assert re.search(rf"{m.group(1).decode()}: from=<alice@example\.com> nrcpt=1 size="
                     rf"{len(message)} client=127\.0\.0\.1 result=250 2\.0\.0", r.log())


def test_bdat_split_across_packets(relay) -> None:
    """Chunks and command lines cut anywhere by the network: in the command, in the chunk,
    between a CR and its LF, one octet at a time."""
    r = relay()
    c, _ = session(r)
    c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    content = b"Subject: split\r\n\r\n" + b"".join(b"line %d\r\n" % i for i in range(50))
    wire = START + bdat(content[:17]) + bdat(content[17:], True)
    for piece in [wire[:3], wire[3:60], wire[60:61], *(wire[i:i + 1] for i in range(61, 80)),
                  wire[80:]]:
        c.send(piece)
        time.sleep(0.005)
    got = replies(c, 4)
    assert got[2] == b"250 2.0.0 Ok: 17 octets received"
    assert got[3].startswith(b"250 2.0.0 Ok: queued as ")
    c.close()
    ((_, message),) = queued(r)
    assert b"\r\nSubject: split\r\n" in message.split(b"\r\n\r\n", 1)[0] + b"\r\n"
    assert message.split(b"\r\n\r\n", 1)[1] == content.split(b"\r\n\r\n", 1)[1]


def test_bdat_0_last_and_bdat_after_data(relay) -> None:
    r = relay()
    c, _ = session(r)
    c.send(START + bdat(b"Subject: zero\r\n\r\nbody\r\n") + b"BDAT 0 LAST\r\n")
    got = replies(c, 4)
    assert got[2] == b"250 2.0.0 Ok: 23 octets received" and got[3].startswith(b"250 2.0.0 Ok: q")
    # A message by DATA, then BDAT: no transaction any more; then DATA refused, then BDAT.
    c.send(START + b"DATA\r\n")
    assert replies(c, 3)[2].startswith(b"354 ")
    c.send(b"Subject: data\r\n\r\n.\r\n" + bdat(b"MAIL FROM:<x@example.net>\r\n", True))
    got = replies(c, 2)
    assert got[0].startswith(b"250 2.0.0 Ok: queued as ")
    assert got[1] == b"503 5.5.1 Error: need MAIL command"
    c.send(b"MAIL FROM:<a@example.com>\r\nDATA\r\n")  # DATA ends a group (RFC 2920)
    assert replies(c, 2) == [b"250 2.1.0 Ok", b"503 5.5.1 Error: need RCPT command"]
    c.send(bdat(b"x", True) + b"RSET\r\n" + START + bdat(b"Subject: b\r\n") + b"DATA\r\n")
    assert replies(c, 6) == [
        b"503 5.5.1 Error: need RCPT command", b"250 2.0.0 Ok", b"250 2.1.0 Ok", b"250 2.1.5 Ok",
        b"250 2.0.0 Ok: 12 octets received", b"503 5.5.1 Error: DATA after BDAT"]
    c.send(bdat(b"\r\n", True))
    assert c.readReply()[0].startswith(b"250 2.0.0 Ok: queued as ")
    c.close()
    subjects = sorted(re.search(rb"\r\nSubject: (\w+)\r\n", m).group(1) for _, m in queued(r))
    assert subjects == [b"b", b"data", b"zero"]


def test_bdat_over_the_size_limit_consumed_and_refused(relay) -> None:
    r = relay(*listener(limits="[limits]\nmessage_size = 1000\n"), defaults=False)
    c, ehlo = session(r)
    assert b"250-SIZE 1000" in ehlo
    c.send(START + bdat(b"Subject: big\r\n\r\n" + b"x" * 600 + b"\r\n") +
           bdat(b"y" * 600 + b"\r\n") + bdat(b"z\r\n", True) + b"NOOP\r\n")
    got = replies(c, 6)
    assert got[2:] == [b"250 2.0.0 Ok: 618 octets received",
                       b"552 5.3.4 Error: message size exceeds fixed limit",
                       b"552 5.3.4 Error: 3 octets discarded after an earlier error",
                       b"250 2.0.0 Ok"]
    # Far beyond: not read (552 and close), as Postfix's smtpd.
    c.send(START + b"BDAT 2000000 LAST\r\n" + b"x" * 1000)
    assert replies(c, 3)[2] == b"552 5.3.4 Error: message size exceeds fixed limit"
    c.expectClosed()
    assert queued(r) == []
    assert re.search(r"\w+: from=<alice@example\.com> nrcpt=1 size=\d+ client=127\.0\.0\.1 "
                     r"result=552 5\.3\.4", r.log())


def test_empty_bdat_chunks_end_the_session_at_the_error_limit(relay) -> None:
    """"BDAT 0" without LAST, repeated: after the first refusal each was "discarded after an
    earlier error", uncounted, without end; each is an error now (Postfix's null BDAT
    request), and the session ends at [limits] errors."""
    r = relay(*listener(limits="[limits]\nerrors = 3\nerror_sleep_time = 0\n"),
              defaults=False)
    c, _ = session(r)
    c.send(START + b"BDAT 0\r\n" * 50)
    assert replies(c, 6)[2:] == [b"501 5.5.4 Error: empty BDAT chunk without LAST"] * 3 + [
        b"421 4.7.0 relay.test Error: too many errors"]
    c.expectClosed()
    r.waitForLog(r"disconnect from 127\.0\.0\.1:\d+ messages=0 errors=3")


def test_discarded_bdat_chunks_end_the_session_at_the_error_limit(relay) -> None:
    """Chunks discarded after a refused one (here: bare LF) were not counted, so a client
    could send them until 1.5 times the size limit; each is an error now (Postfix's
    bdat_cmd/skip_bdat), and the session ends at [limits] errors."""
    r = relay(*listener(limits="[limits]\nerrors = 3\nerror_sleep_time = 0\n"),
              defaults=False)
    c, _ = session(r)
    c.send(START + bdat(b"a\nb\r\n") + bdat(b"xyz") * 50)
    assert replies(c, 6)[2:] == [
        b"550 5.6.0 Error: message contains a bare LF; use CRLF line endings"] + [
        b"550 5.6.0 Error: 3 octets discarded after an earlier error"] * 2 + [
        b"421 4.7.0 relay.test Error: too many errors"]
    c.expectClosed()
    r.waitForLog(r"disconnect from 127\.0\.0\.1:\d+ messages=0 errors=3")
    assert queued(r) == []


def test_bdat_rset_mid_chunking_and_malformed_bdat(relay) -> None:
    r = relay()
    c, _ = session(r)
    c.send(START + bdat(b"Subject: dropped\r\n") + b"RSET\r\n" + bdat(b"x", True))
    assert replies(c, 5)[2:] == [b"250 2.0.0 Ok: 18 octets received", b"250 2.0.0 Ok",
                                 b"503 5.5.1 Error: need MAIL command"]
    r.waitForLog(r"\w+: message not completed, dropped")
    c.send(b"BDAT ten\r\nQUIT\r\n")
    assert c.readReply() == [b"521 5.5.4 Syntax: BDAT count [LAST]"]
    c.expectClosed()
    assert queued(r) == []
    assert list((r.spool / "tmp").iterdir()) == []


def test_bdat_bare_newline_refused_and_normalized(relay) -> None:
    r = relay()
    c, _ = session(r)
    c.send(START + bdat(b"Subject: lf\n\nbody\n", True))
    assert replies(c, 3)[2] == (b"550 5.6.0 Error: message contains a bare LF; use CRLF "
                                b"line endings")
    c.close()
    assert queued(r) == []
    r2 = relay(*listener('bare_newline = "normalize"\n'), defaults=False)
    c, _ = session(r2)
    c.send(START + bdat(b"Subject: lf\n\nbody\n", True))
    assert replies(c, 3)[2].startswith(b"250 2.0.0 Ok: queued as ")
    c.close()
    ((_, message),) = queued(r2)
    assert b"\r\nSubject: lf\r\n" in message and message.endswith(b"\r\n\r\nbody\r\n")
    assert message.count(b"\n") == message.count(b"\r\n")


def test_binarymime_on_a_listener_that_offers_it(relay) -> None:
    r = relay(*listener("binarymime = true\n"), defaults=False)
    c, ehlo = session(r)
    assert b"250-BINARYMIME" in ehlo
    binary = (b"Subject: binary\r\nMIME-Version: 1.0\r\nContent-Type: application/octet-stream\r\n"
              b"Content-Transfer-Encoding: binary\r\n\r\n" + bytes(range(256)) * 8)
    c.send(b"MAIL FROM:<alice@example.com> BODY=BINARYMIME\r\nRCPT TO:<bob@example.org>\r\n"
           b"DATA\r\n")
    got = replies(c, 3)
    c.send(bdat(binary[:1000]) + bdat(binary[1000:], True))
    got += replies(c, 2)
    assert got[2] == b"503 5.5.1 Error: BODY=BINARYMIME needs BDAT, not DATA"
    assert got[3] == b"250 2.0.0 Ok: 1000 octets received" and got[4].startswith(b"250 2.0.0 Ok: q")
    c.close()
    ((envelope, message),) = queued(r)
    assert envelope["body"] == "BINARYMIME"
    assert message.endswith(b"\r\n\r\n" + bytes(range(256)) * 8)
    r2 = relay()
    c, ehlo = session(r2)
    assert not any(b"BINARYMIME" in line for line in ehlo)
    c.send(b"MAIL FROM:<alice@example.com> BODY=BINARYMIME\r\n")
    assert c.readReply() == [b"501 5.5.4 Error: unsupported BODY value 'BINARYMIME'"]


# REQUIRETLS (RFC 8689) ------------------------------------------------------------------------


def test_requiretls_over_starttls_only(tmp_path: Path) -> None:
    import ssl

    from tests.test_e2e_tls_auth import Site

    site = Site(tmp_path / "site")
    config = ('[[listeners]]\nendpoint = "tcp:0:interface=127.0.0.1"\n'
              'tls_certificate = "relay.pem"\ntls_key = "relay.key"\n')
    r = RelayProcess(site.directory, config, ("--spool", str(site.directory / "spool"),
                     "--hostname", "relay.test"), defaults=False, hold=True).start()
    try:
        with smtplib.SMTP("127.0.0.1", r.port, timeout=15) as s:
            s.ehlo("client.example")
            assert s.has_extn("starttls") and not s.has_extn("requiretls")
            assert s.mail("a@example.com", ["REQUIRETLS"]) == (
                530, b"5.7.0 Must issue a STARTTLS command first")
            s.rset()
            s.sendmail("a@example.com", ["b@example.org"],
                       b"Subject: plain\r\nTLS-Required: No\r\n\r\nbody\r\n")
            s.starttls(context=site.context(check_hostname=False, verify_mode=ssl.CERT_NONE))
            s.ehlo("client.example")
            assert s.has_extn("requiretls")
            s.sendmail("a@example.com", ["b@example.org"],
                       b"Subject: secret\r\nTLS-Required: No\r\n\r\nbody\r\n",
                       mail_options=["REQUIRETLS"])
        r.waitForLog(r"requiretls result=250 ")
        bySubject = {re.search(rb"Subject: (\w+)", m).group(1): e for e, m in queued(r)}
        assert (bySubject[b"plain"]["requireTLS"], bySubject[b"plain"]["tlsRequiredNo"]) == (
            False, True)
        assert (bySubject[b"secret"]["requireTLS"], bySubject[b"secret"]["tlsRequiredNo"]) == (
            True, False)
        assert re.search(r"tls_required=no result=250 ", r.log())
    finally:
        r.stop()

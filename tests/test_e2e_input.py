"""End-to-end: input that must not corrupt a message or the relay's memory (issue 7, point 4).

The real C{twistd -n mailrelay}, spoken to with smtplib and raw sockets, relaying to aiosmtpd
(the next hop and DNS fixtures of L{tests.test_e2e_outbound}).
"""

from __future__ import annotations

import re
import smtplib
import time
from pathlib import Path

import pytest

from tests.harness import DNSServer, LineClient, RelayProcess
from tests.test_e2e_outbound import (  # noqa: F401 - fixtures
    config,
    dns,
    nexthop,
    relay,
    release,
    smtpRoute,
    spooled,
    submit,
    waitEmpty,
    waitRemoved,
    waitResult,
)

# ---------------------------------------------------------------------------------------------
# A 998-octet line that begins with "." (999 octets on the wire, dot-stuffed)


def test_longest_line_starting_with_a_dot_is_relayed(relay, nexthop, dns) -> None:
    hop, port = nexthop()
    routes = [smtpRoute("example.org", port)]
    r = relay(config(dns, hold=True, routes=routes))
    longest = b"." + b"d" * 997
    assert len(longest) == 998
    msg = (b"From: alice@sender.test\r\nTo: bob@example.org\r\nSubject: long dot line\r\n\r\n"
           + longest + b"\r\n" + b"." * 998 + b"\r\nend\r\n")
    # smtplib dot-stuffs: 999 octets on the wire for both lines, the limit plus the dot.
    qid = submit(r, "alice@sender.test", ["bob@example.org"], msg)
    original = spooled(r, qid)
    assert original.endswith(msg.split(b"\r\n\r\n", 1)[1])
    release(r, config(dns, routes=routes))
    m = waitResult(r, qid, "bob@example.org")
    assert m["status"] == "sent", m[0]
    waitRemoved(r, qid)
    (got,) = hop.to("bob@example.org")
    assert got.content == original
    assert b"\r\n" + longest + b"\r\n" + b"." * 998 + b"\r\nend\r\n" in got.content
    waitEmpty(r)


def test_line_over_the_limit_after_unstuffing_is_refused(relay) -> None:
    r = relay(hold=True)
    with smtplib.SMTP("127.0.0.1", r.port, timeout=15) as s:
        s.ehlo("client.test")
        s.mail("alice@sender.test")
        s.rcpt("bob@example.org")
        code, reply = s.data(b"Subject: x\r\n\r\n." + b"d" * 998 + b"\r\n")
    assert (code, reply) == (500, b"5.5.2 Error: message line longer than 998 octets")
    assert r.queued() == []


# ---------------------------------------------------------------------------------------------
# A header section over the 100 KB the relay parses ([limits] header_size)


def wellFormed(message: bytes) -> None:
    """CRLF line ends only, and a header section of complete fields up to the empty line."""
    assert message.count(b"\r") == message.count(b"\n") == message.count(b"\r\n")
    header, sep, _ = message.partition(b"\r\n\r\n")
    assert sep
    for line in header.split(b"\r\n"):
        assert re.match(rb"[\x21-\x39\x3b-\x7e]+:|[ \t]", line), line[:80]


@pytest.mark.parametrize("firstLine", [101, 150, 60])
def test_huge_header_section_is_refused(relay, firstLine: int) -> None:
    # The relay holds the first 102400 octets of the header section ([limits] header_size);
    # the fields of 100 octets after the first one put that limit between CR and LF (101),
    # mid-line (150), or inside a continuation line (60).  A section going on past it was
    # stored as sent, unparsed past the limit (a Message-Id:, Date: or Bcc: there unseen);
    # it is refused now (552 5.6.0), and nothing is queued.  Up to the limit, it is taken.
    r = relay(hold=True)
    first = b"X-First: " + b"f" * (firstLine - 11) + b"\r\n"
    filler = [b"X-Filler: " + b"y" * 88 + b"\r\n", b"\tcont" + b"c" * 93 + b"\r\n"]
    fields = first + b"".join(filler[i % 2] for i in range(1400))
    assert 150_000 > len(fields) > 102400
    body = b"Subject: big header\r\n\r\nbody\r\n"
    with smtplib.SMTP("127.0.0.1", r.port, timeout=15) as s:
        s.ehlo("client.test")
        s.mail("alice@sender.test")
        s.rcpt("bob@example.org")
        assert s.data(fields + body) == (
            552, b"5.6.0 Error: message header size exceeds fixed limit")
    assert r.queued() == []
    within = fields[: fields.index(b"\r\nX-Filler: ", 102400 - 1100) + 2]
    assert 102400 - 1100 < len(within) + len(b"Subject: big header\r\n") <= 102400
    qid = submit(r, "alice@sender.test", ["bob@example.org"], within + body)
    stored = spooled(r, qid)
    wellFormed(stored)
    trace = re.fullmatch(rb"Received: [^\r\n]+(?:\r\n\t[^\r\n]+)*\r\n(.*)", stored, re.S)
    assert trace is not None and trace.group(1).startswith(within + b"Subject: big header\r\n")


def test_a_message_without_header_section_keeps_its_first_line_in_the_body(relay) -> None:
    """Its first line no field: the fields the relay adds on top are followed by an empty
    line, or that line would become part of them."""
    r = relay(hold=True)
    qid = submit(r, "alice@sender.test", ["bob@example.org"], b"hello world\r\nsecond line\r\n")
    stored = spooled(r, qid)
    wellFormed(stored)
    head, _, body = stored.partition(b"\r\n\r\n")
    assert body == b"hello world\r\nsecond line\r\n"
    names = [line.split(b":")[0] for line in head.split(b"\r\n") if line[:1] not in (b" ", b"\t")]
    assert names == [b"Received", b"Message-Id", b"Date"]



def test_a_header_section_ended_by_a_line_that_is_no_field_is_closed_by_an_empty_line(relay) -> None:  # noqa: F811
    """As Postfix's cleanup (non_empty_end_of_header_action = fix_quietly): the line that is
    no field, and the field-like lines after it, are the body; they were stored (and sent on)
    right under the header fields, where a next hop could read them as fields."""
    r = relay(hold=True)
    message = b"Subject: x\r\nnot a field\r\nBcc: eve@example.org\r\n\r\nbody\r\n"
    qid = submit(r, "alice@sender.test", ["bob@example.org"], message)
    stored = spooled(r, qid)
    wellFormed(stored)
    head, _, body = stored.partition(b"\r\n\r\n")
    assert body == b"not a field\r\nBcc: eve@example.org\r\n\r\nbody\r\n"
    names = [line.split(b":")[0] for line in head.split(b"\r\n") if line[:1] not in (b" ", b"\t")]
    assert names == [b"Received", b"Subject", b"Message-Id", b"Date"]


def test_a_resent_message_gets_resent_message_id_and_date(relay) -> None:  # noqa: F811
    """With a Resent- field (a message forwarded on, RFC 5322 3.6.6), Postfix's cleanup adds
    the missing Resent-Message-Id: and Resent-Date:; the relay added a Message-Id: and a
    Date: to the original instead."""
    r = relay(hold=True)
    message = b"From: a@sender.test\r\nResent-From: b@sender.test\r\nSubject: fwd\r\n\r\nbody\r\n"
    stored = spooled(r, submit(r, "b@sender.test", ["bob@example.org"], message))
    head = stored.partition(b"\r\n\r\n")[0]
    names = [line.split(b":")[0] for line in head.split(b"\r\n") if line[:1] not in (b" ", b"\t")]
    assert names == [b"Received", b"From", b"Resent-From", b"Subject", b"Resent-Message-Id",
                     b"Resent-Date"]


def test_postmaster_at_the_relay_is_delivered_to_the_queue_postmaster(relay, nexthop, dns) -> None:  # noqa: F811
    """postmaster@<hostname> (RFC 5321 4.5.1: always accepted) went to the host name's MX,
    the relay itself, and bounced as a loop; it goes to [queue] postmaster.  Its Received:
    field says "for <postmaster>", the recipient given, not the address it goes to."""
    hop, port = nexthop()
    r = relay(config(dns, routes=[smtpRoute("example.org", port)],
                     queue={"postmaster": "admin@example.org"}))
    with smtplib.SMTP("127.0.0.1", r.port, timeout=15) as s:
        s.ehlo("client.test")
        assert s.mail("alice@sender.test") == (250, b"2.1.0 Ok")
        assert s.rcpt("<postmaster>") == (250, b"2.1.5 Ok")
        code, reply = s.data(b"Subject: hello postmaster\r\n\r\nbody\r\n")
    assert code == 250, reply
    (got,) = hop.waitTo("admin@example.org", 1)
    assert got.rcptTos == ["admin@example.org"] and b"hello postmaster" in got.content
    # Received: names the recipient given at RCPT, as Postfix's smtpd does.
    assert re.search(rb"\r\n\tfor <postmaster>; ", got.content), got.content


def test_postmaster_at_the_relays_own_unrouted_name_is_refused(relay, dns) -> None:  # noqa: F811
    """[queue] postmaster = "postmaster" (postmaster@<hostname>, as Postfix appends
    $myorigin) with nothing routing the host name: its mail and the notices of failed
    bounces went to the host name's MX, the relay itself, a loop.  The relay does not
    start, naming the key and the ways out."""
    with pytest.raises(AssertionError) as e:
        relay(config(dns, queue={"postmaster": "postmaster"}))
    assert "relay exited with 1" in str(e.value)
    assert ('queue.postmaster: "postmaster" is postmaster@relay.test, at this relay\'s own '
            "host name, which nothing routes but its MX lookup") in str(e.value)
    assert "Traceback" not in str(e.value)

# ---------------------------------------------------------------------------------------------
# NUL in message data: "\r\n\0.\r\n" is an end of data to a receiver that strips NULs


def rawTransaction(r: RelayProcess, content: bytes) -> tuple[bytes, LineClient]:
    """A raw session up to the end of C{content} (sent as is, then the final dot): the last
    reply line, and the client (still open)."""
    c = r.connect()
    assert c.readReply()[0].startswith(b"220 ")
    c.send(b"EHLO client.test\r\n")
    c.readReply()
    for command in (b"MAIL FROM:<alice@sender.test>", b"RCPT TO:<bob@example.org>", b"DATA"):
        c.send(command + b"\r\n")
        assert c.readReply()[-1][:1] in (b"2", b"3"), command
    c.send(content + b".\r\n")
    return c.readReply()[-1], c


SMUGGLING = (b"Subject: nul\r\n\r\nfirst\r\n\0.\r\nMAIL FROM:<evil@sender.test>\r\n"
             b"RCPT TO:<victim@example.org>\r\nDATA\r\nforged\r\n")


def test_nul_in_data_is_refused(relay) -> None:
    r = relay(hold=True)
    reply, c = rawTransaction(r, SMUGGLING)
    assert reply == b"550 5.6.0 Error: message contains NUL characters"
    c.send(b"QUIT\r\n")
    assert c.readReply() == [b"221 2.0.0 Bye"]
    c.close()
    assert r.queued() == []
    assert re.search(r"result=550 5\.6\.0 Error: message contains NUL characters", r.log())


def test_nul_removed_on_a_normalizing_listener(relay) -> None:
    r = relay('[[listeners]]\nendpoint = "tcp:0:interface=127.0.0.1"\nnul_bytes = "normalize"\n',
              "--spool", "spool", "--hostname", "relay.test", defaults=False, hold=True)
    reply, c = rawTransaction(r, SMUGGLING)
    c.close()
    m = re.fullmatch(rb"250 2\.0\.0 Ok: queued as ([0-9A-Z]{20})", reply)
    assert m, reply
    (qid,) = r.queued()
    stored = spooled(r, qid)
    assert b"\0" not in stored
    assert stored.endswith(b"\r\n\r\n" + SMUGGLING.split(b"\r\n\r\n")[1].replace(b"\0", b""))


# ---------------------------------------------------------------------------------------------
# A client that pipelines commands and never reads the replies


def rss(pid: int) -> int:
    """The resident set size of process C{pid}, in bytes."""
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB$", text, re.M).group(1)) * 1024


def sendWithoutReading(c: LineClient, data: bytes, stall: float) -> int:
    """Send C{data} as far as the peer takes it, giving up once nothing could be sent for
    C{stall} seconds; how many bytes were sent."""
    c.sock.settimeout(0.2)
    sent = 0
    stalledSince = None
    while sent < len(data):
        try:
            sent += c.sock.send(data[sent : sent + 65536])
            stalledSince = None
        except TimeoutError:
            now = time.monotonic()
            stalledSince = stalledSince or now
            if now - stalledSince > stall:
                break
    return sent


def test_pipelining_client_that_never_reads_cannot_grow_memory(relay) -> None:
    # (RSETs past junk_commands are errors, which would slow the session down before its
    # output blocks: this is about the output.)
    r = relay("[limits]\nidle_timeout = 6\njunk_commands = 1000000\n", hold=True)
    c = r.connect()
    c.readReply()
    c.send(b"EHLO client.test\r\n")
    c.readReply()
    assert r.process is not None
    before = rss(r.process.pid)
    total = 20 * 1024 * 1024
    sent = sendWithoutReading(c, b"RSET\r\n" * (total // 6), stall=2.0)
    grown = rss(r.process.pid) - before
    # The relay stopped reading: what was sent sits in the kernel's socket buffers, and the
    # replies to what it read in its (bounded) write buffer.
    assert sent < total // 6 * 6, f"the relay read all {sent} bytes; its memory grew by {grown}"
    assert grown < 16 * 1024 * 1024, (sent, grown)
    # Its output blocked past the idle timeout, the session is closed.
    r.waitForLog(r"timeout .*client not reading replies.* from 127\.0\.0\.1", timeout=30)
    c.sock.settimeout(10)
    with pytest.raises((ConnectionResetError, EOFError)):
        while True:
            if not c.sock.recv(1 << 20):
                raise EOFError()
    c.close()


# ---------------------------------------------------------------------------------------------
# Names and addresses from outside: reverse DNS names, PROXY v1 addresses


@pytest.fixture
def ptrDNS(tmp_path: Path):
    """A DNS server with forward-confirmed reverse names for 192.0.2.7 (a name that would
    close the comment of Received: and open another) and 192.0.2.8 (a good one), a name
    for 192.0.2.9 that resolves to another address (forged), and for 192.0.2.10 a name
    that does not exist before a good one."""
    server = DNSServer(tmp_path / "ptr-dns", "test", [
        ["7.2.0.192.in-addr.arpa", "PTR", "spoof) (by trusted.test"],
        ["spoof) (by trusted.test", "A", "192.0.2.7"],
        ["8.2.0.192.in-addr.arpa", "PTR", "good.test"],
        ["good.test", "A", "192.0.2.8"],
        ["9.2.0.192.in-addr.arpa", "PTR", "forged.test"],  # (not confirmed: another address)
        ["forged.test", "A", "192.0.2.99"],
        ["10.2.0.192.in-addr.arpa", "PTR", "gone.test"],  # (NXDOMAIN) then a good name
        ["10.2.0.192.in-addr.arpa", "PTR", "second.test"],
        ["second.test", "A", "192.0.2.10"],
    ])
    yield server
    server.stop()


def proxiedRelay(relay, dnsPort: int) -> RelayProcess:
    return relay(
        '[relay]\naccept_domains = ["example.org"]\n'
        '[dns]\nreverse_lookups = true\nnameservers = ["127.0.0.1:%d"]\n'
        '[[listeners]]\nendpoint = "tcp:0:interface=127.0.0.1"\n'
        'proxy_protocol = true\nproxy_networks = ["127.0.0.0/8"]\n' % dnsPort,
        "--spool", "spool", "--hostname", "relay.test", defaults=False, hold=True,
    )


def proxiedMessage(r: RelayProcess, header: bytes, helo: bytes = b"lb-client.test") -> bytes:
    """Send one message through the PROXY listener as the client C{header} names; the queued
    message."""
    c = r.connect()
    c.send(header)
    assert c.readReply()[0].startswith(b"220 ")
    for command in (b"EHLO " + helo, b"MAIL FROM:<a@sender.test>", b"RCPT TO:<b@example.org>",
                    b"DATA"):
        c.send(command + b"\r\n")
        assert c.readReply()[-1][:1] in (b"2", b"3"), command
    c.send(b"Subject: proxied\r\n\r\nx\r\n.\r\n")
    (reply,) = c.readReply()
    c.close()
    m = re.fullmatch(rb"250 2\.0\.0 Ok: queued as ([0-9A-Z]{20})", reply)
    assert m, reply
    return spooled(r, m.group(1).decode())


def test_reverse_name_of_bad_syntax_is_left_out(relay, ptrDNS) -> None:
    r = proxiedRelay(relay, ptrDNS.port)
    good = proxiedMessage(r, b"PROXY TCP4 192.0.2.8 192.0.2.25 40000 25\r\n")
    assert good.startswith(b"Received: from lb-client.test (good.test [192.0.2.8])\r\n")
    bad = proxiedMessage(r, b"PROXY TCP4 192.0.2.7 192.0.2.25 40001 25\r\n", b"x(y).test")
    assert bad.startswith(b"Received: from unknown (unknown [192.0.2.7])\r\n")
    assert ("7.2.0.192.in-addr.arpa", "PTR") in ptrDNS.queries()
    assert "spoof" not in r.log()


def test_a_forged_reverse_name_is_unknown_and_logged(relay, ptrDNS) -> None:
    """A PTR name that does not resolve to the client's address: "unknown" in Received:
    and a warning that says why, as Postfix's smtpd ("hostname X does not resolve to
    address Y"); nothing was logged."""
    r = proxiedRelay(relay, ptrDNS.port)
    forged = proxiedMessage(r, b"PROXY TCP4 192.0.2.9 192.0.2.25 40000 25\r\n")
    assert forged.startswith(b"Received: from lb-client.test (unknown [192.0.2.9])\r\n")
    assert ("forged.test", "A") in ptrDNS.queries()
    assert re.search(r"#warn\] hostname forged\.test does not resolve to address 192\.0\.2\.9$",
                     r.log(), re.MULTILINE), r.log()


def test_a_reverse_name_that_does_not_exist_does_not_hide_the_next(relay, ptrDNS) -> None:
    """The first PTR name of a client does not exist (NXDOMAIN): logged, and its next PTR
    name, which resolves to it, is the client's name.  The NXDOMAIN made the client
    "unknown" and nothing was logged."""
    r = proxiedRelay(relay, ptrDNS.port)
    message = proxiedMessage(r, b"PROXY TCP4 192.0.2.10 192.0.2.25 40000 25\r\n")
    assert message.startswith(b"Received: from lb-client.test (second.test [192.0.2.10])\r\n")
    assert re.search(r"#warn\] hostname gone\.test does not resolve to address 192\.0\.2\.10: "
                     r"the name does not exist$", r.log(), re.MULTILINE), r.log()


def test_proxy_ipv4_mapped_client_is_logged_as_ipv4(relay, ptrDNS) -> None:
    """A load balancer naming an IPv4 client in IPv6 form: the PROXY line logged it as
    [::ffff:c000:208]:40000, while the relay knows it as 192.0.2.8 everywhere else (as
    Postfix's haproxy_srvr.c converts it)."""
    r = proxiedRelay(relay, ptrDNS.port)
    message = proxiedMessage(r, b"PROXY TCP6 ::ffff:192.0.2.8 ::ffff:192.0.2.25 40000 25\r\n")
    assert message.startswith(b"Received: from lb-client.test (good.test [192.0.2.8])\r\n")
    assert "PROXY v1 from 127.0.0.1: client 192.0.2.8:40000" in r.log()
    assert "ffff" not in r.log()


def test_an_ipv4_mapped_helo_literal_is_written_as_given(relay, ptrDNS) -> None:
    """EHLO [IPv6:::ffff:192.0.2.9] was written [IPv6:::ffff:c000:209] in Received:;
    Postfix's smtpd writes the HELO name as given."""
    r = proxiedRelay(relay, ptrDNS.port)
    message = proxiedMessage(r, b"PROXY TCP4 192.0.2.8 192.0.2.25 40000 25\r\n",
                             b"[IPv6:::ffff:192.0.2.9]")
    assert message.startswith(
        b"Received: from [IPv6:::ffff:192.0.2.9] (good.test [192.0.2.8])\r\n"), message


def test_proxy_v1_address_with_a_zone_id_is_refused(relay, ptrDNS) -> None:
    r = proxiedRelay(relay, ptrDNS.port)
    c = r.connect()
    c.send(b"PROXY TCP6 fe80::1%(spoof) fe80::2 40000 25\r\n")
    with pytest.raises((EOFError, ConnectionResetError)):
        c.readReply()
    r.waitForLog(r"bad PROXY header from 127\.0\.0\.1: .*zone")
    assert r.queued() == []


# ---------------------------------------------------------------------------------------------
# Integer settings beyond their bounds stop the relay with the file, key and value


def refusedAtStart(tmp_path: Path, config: str, error: str) -> None:
    """The relay with C{config} does not start: it exits with C{error} (a regular
    expression), after the file's name."""
    r = RelayProcess(tmp_path / "relay", config)
    with pytest.raises(AssertionError, match="relay exited with 1"):
        r.start()
    r.stop()
    assert re.search(r"mailrelay: configuration error: \S+/mailrelay\.toml: " + error, r.log())


def test_message_size_beyond_20_digits_stops_the_relay(tmp_path: Path) -> None:
    refusedAtStart(
        tmp_path, "[limits]\nmessage_size = 1000000000000000000000\n",
        r"limits\.message_size: must be a positive integer no larger than 99999999999999999999 "
        r"\(20 digits, RFC 1870\), not 1000000000000000000000")


def test_lifetime_beyond_the_bound_of_seconds_stops_the_relay(tmp_path: Path) -> None:
    """A queue lifetime of 31,000 years was accepted, then every delay warning failed to be
    built ("year 33715 is out of range"): settings in seconds have a bound too."""
    refusedAtStart(
        tmp_path, "[queue]\nmax_lifetime = 1e12\ndelay_warning = 60\n",
        r"queue\.max_lifetime: must be a positive number of seconds no larger than 1000000000 "
        r"\(about 31 years\), not 1000000000000\.0")


def test_a_ca_file_cut_before_its_end_line_stops_the_relay(tmp_path: Path) -> None:
    """A CA file cut by a failed copy just before its last C{-----END CERTIFICATE-----} line
    was read as whole (the END line was put back), and the relay started trusting a bundle
    nobody wrote: it does not start, naming the file and the certificate (RFC 7468 2)."""
    import trustme

    pem = trustme.CA().cert_pem.bytes()
    ca = tmp_path / "ca.pem"
    ca.write_bytes(pem[: pem.index(b"-----END CERTIFICATE-----")])
    refusedAtStart(
        tmp_path, f'[delivery]\nca_file = "{ca}"\n',
        re.escape(f'delivery.ca_file: the CA file "{ca}": certificate 1 of 1 cannot be read: '
                  'no "-----END CERTIFICATE-----" line after its BEGIN line'))

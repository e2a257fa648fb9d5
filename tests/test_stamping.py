"""Header stamping, loop counting, reverse DNS and relay control units."""

from __future__ import annotations

from ipaddress import ip_network
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.names import dns
from twisted.names.error import DNSNameError
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from mailrelay.address import parseForwardPath
from mailrelay.envelope import ClientInfo, Envelope, Recipient
from mailrelay.interfaces import (
    IHeaderStamper,
    PluginContext,
    StampContext,
    StampResult,
    VerdictKind,
)
from mailrelay.policy import RelayControl
from mailrelay.receive.rdns import hostsFileName, reverseLookup
from mailrelay.stamping import (
    ConfiguredStamper,
    DefaultStamper,
    HeaderProcessor,
    StampingFailed,
    buildDefaultStamper,
    parseHeaderSection,
    runStampers,
)


def context(**kw) -> StampContext:
    client = kw.pop("client", ClientInfo(address="192.0.2.1", helo="client.example", esmtp=True, rdns="mail.client.example"))
    envelope = kw.pop("envelope", Envelope(sender="a@b.example", recipients=[Recipient("c@d.example")], queueID="Q1", client=client))
    return StampContext(hostname="relay.test", client=client, envelope=envelope, headers=kw.pop("headers", []), now=1_800_000_000, **kw)


def test_default_stamper_provides_interface() -> None:
    verifyObject(IHeaderStamper, DefaultStamper())
    verifyObject(IHeaderStamper, buildDefaultStamper({}, PluginContext("relay.test", configDir=None)))  # type: ignore[arg-type]


def test_received_field_per_rfc5321() -> None:
    result = DefaultStamper().stamp(context())
    (received,) = result.prepend
    assert received.startswith(b"Received: from client.example (mail.client.example [192.0.2.1])\r\n\tby relay.test (mailrelay) with ESMTP id Q1\r\n\tfor <c@d.example>; ")
    assert received.endswith(b"\r\n")
    assert [f.split(b":")[0] for f in result.append] == [b"Message-Id", b"Date"]


def test_received_ipv6_tls_auth_and_several_recipients() -> None:
    client = ClientInfo(address="2001:db8::1", helo="h", esmtp=True, tls="TLSv1.3 TLS_AES_128_GCM_SHA256", authUser="joe")
    envelope = Envelope(recipients=[Recipient("a@x.example"), Recipient("b@x.example")], queueID="Q2", client=client, smtputf8=True)
    (received,) = DefaultStamper().stamp(context(client=client, envelope=envelope)).prepend
    assert b"(unknown [IPv6:2001:db8::1])" in received
    assert b"with UTF8SMTPSA id Q2" in received
    assert b"(using TLSv1.3 TLS_AES_128_GCM_SHA256)" in received
    # The login name is the relay's log's, not every recipient's (Postfix's
    # smtpd_sasl_authenticated_header = no): shown only with the stamper's auth_user option.
    assert b"authenticated" not in received
    assert b"for <" not in received
    stamper = buildDefaultStamper({"auth_user": True}, PluginContext("relay.test", configDir=None))  # type: ignore[arg-type]
    (received,) = stamper.stamp(context(client=client, envelope=envelope)).prepend
    assert b"\r\n\t(authenticated as joe)" in received


@pytest.mark.parametrize(("helo", "written"), [
    ("[IPv6:::ffff:1.2.3.4]", "[IPv6:::ffff:1.2.3.4]"),
    ("[IPv6:2001:DB8:0::1]", "[IPv6:2001:DB8:0::1]"),
    ("[192.0.2.7]", "[192.0.2.7]"),
    ("[IPv6:::ffff:1.2.3.400]", "unknown"),
    ("[IPv6:fe80::1%eth0]", "unknown"),
    ("[x-tag:a) (b]", "unknown"),
])
def test_received_names_an_address_literal_helo_as_given(helo: str, written: str) -> None:
    """An EHLO address literal is written as the client gave it, as Postfix's smtpd writes
    its HELO name (smtpd.c: helo_name, printable and neutered, into "from %s"), not
    rewritten ([IPv6:::ffff:1.2.3.4] became [IPv6:::ffff:102:304], naming the IPv4 address
    in hex); one of bad syntax is "unknown", as before, so no comment can be spoofed."""
    client = ClientInfo(address="192.0.2.1", helo=helo, esmtp=True, rdns="mail.client.example")
    (received,) = DefaultStamper().stamp(context(client=client)).prepend
    assert received.startswith(f"Received: from {written} (mail.client.example [192.0.2.1])\r\n".encode())


@pytest.mark.parametrize("resent", ["Resent-From", "resent-to", "Resent-Date", "Resent-Message-Id"])
def test_a_resent_message_gets_the_resent_fields_it_lacks(resent: str) -> None:
    """A message with a Resent- field (RFC 5322 3.6.6: a resent block) gets a missing
    Resent-Message-Id: and Resent-Date:, as Postfix's cleanup adds them
    (cleanup_header_done_callback in cleanup_message.c), not a Message-Id: or Date: of
    the original: that message has its own, or was sent without one."""
    headers = [("From", b"From: a@b.example\r\n"), (resent, f"{resent}: x\r\n".encode())]
    result = DefaultStamper().stamp(context(headers=headers))
    names = [f.split(b":")[0] for f in result.append]
    assert names == [n for n in (b"Resent-Message-Id", b"Resent-Date") if n.lower() != resent.encode().lower()]
    assert all(not f.startswith((b"Message-Id", b"Date")) for f in result.append)
    if names[:1] == [b"Resent-Message-Id"]:
        assert result.append[0].startswith(b"Resent-Message-Id: <20270115080000.Q1@relay.test>")
    # The listener's add_message_id and add_date say whether either is added.
    options = {"add_message_id": False, "add_date": False}
    assert DefaultStamper().stamp(context(headers=headers, listenerOptions=options)).append == []


def test_existing_fields_not_duplicated_and_options_respected() -> None:
    headers, _ = parseHeaderSection(b"message-id: <x@y>\r\nDATE: now\r\n\r\n")
    assert DefaultStamper().stamp(context(headers=headers)).append == []
    assert DefaultStamper().stamp(context(listenerOptions={"add_message_id": False, "add_date": False})).append == []
    assert DefaultStamper(addMessageID=False).stamp(context()).append[0].startswith(b"Date: ")


def test_build_default_stamper_checks_options() -> None:
    from mailrelay.errors import ConfigError

    with pytest.raises(ConfigError, match="colour"):
        buildDefaultStamper({"colour": True}, None)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="date"):
        buildDefaultStamper({"date": "yes"}, None)  # type: ignore[arg-type]


def test_parse_header_section() -> None:
    data = b"Received: a\r\n b\r\nSubject: x\r\nX-Y : z\r\n\r\nbody\r\nNot: a header\r\n"
    fields, end = parseHeaderSection(data)
    assert [n for n, _ in fields] == ["Received", "Subject", "X-Y"]
    assert fields[0][1] == b"Received: a\r\n b\r\n"
    assert data[end:] == b"\r\nbody\r\nNot: a header\r\n"
    fields, end = parseHeaderSection(b"Subject: x\r\nno colon here\r\nmore\r\n")
    assert [n for n, _ in fields] == ["Subject"] and end == len(b"Subject: x\r\n")


def test_malformed_stamper_output_is_refused() -> None:
    class Bad:
        def stamp(self, ctx):
            return StampResult(prepend=[b"X-Evil: a\r\nBcc: victim@example.com\r\n"])

    failures: list = []
    runStampers([ConfiguredStamper("bad", Bad(), 30)], context(), Clock()).addErrback(failures.append)
    (failure,) = failures
    assert failure.check(StampingFailed)
    assert "header stamper bad returned a malformed header field" in str(failure.value)


@pytest.mark.parametrize(
    "result, problem",
    [
        # A tuple raised TypeError out of the check (list + tuple): the client got no reply.
        (StampResult(append=(b"X-S: ok\r\n",)), None),  # taken: a sequence of fields
        (StampResult(append=b"X-S: ok\r\n"), "not a list of header fields"),  # type: ignore[arg-type]
        (StampResult(prepend=None), "not a list of header fields"),  # type: ignore[arg-type]
        # A NUL went into the message (the relay refuses NUL from clients by default).
        (StampResult(append=[b"X-S: a\x00b\r\n"]), "a malformed header field"),
        # RFC 5322 2.1.1: a line over 998 octets was taken, and the next hop refused it.
        (StampResult(append=[b"X-S: " + b"x" * 994 + b"\r\n"]),
         "a header field with a line over 998 octets (fold it, RFC 5322 2.1.1)"),
        (StampResult(append=[b"X-S: " + b"x" * 993 + b"\r\n " + b"y" * 997 + b"\r\n"]), None),
    ],
)
def test_stamper_answers_of_the_wrong_shape(result: StampResult, problem: str | None) -> None:
    class Odd:
        def stamp(self, ctx):
            return result

    outcomes: list = []
    answer = runStampers([ConfiguredStamper("odd", Odd(), 30)], context(), Clock())
    if isinstance(answer, StampResult):  # (answered at once)
        outcomes.append(answer)
    else:
        answer.addBoth(outcomes.append)
    (outcome,) = outcomes
    if problem is None:
        assert isinstance(outcome, StampResult) and list(outcome.append) == list(result.append)
    else:
        assert isinstance(outcome, Failure) and outcome.check(StampingFailed), outcome
        assert f"header stamper odd returned {problem}" in str(outcome.value), outcome


def test_later_stampers_prepend_on_top() -> None:
    class S:
        def __init__(self, name):
            self.name = name

        def stamp(self, ctx):
            return StampResult(prepend=[b"X-%s: 1\r\n" % self.name], append=[b"X-End-%s: 1\r\n" % self.name])

    result = runStampers([ConfiguredStamper(n, S(n.encode()), 30) for n in "AB"], context(), Clock())
    assert result.prepend == [b"X-B: 1\r\n", b"X-A: 1\r\n"]
    assert result.append == [b"X-End-A: 1\r\n", b"X-End-B: 1\r\n"]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.sampled_from([b"Subject: s\r\n", b"Received: r\r\n", b" cont\r\n", b"\r\n", b"body\r\n", b"X: y\r\n"]), max_size=20),
    st.lists(st.integers(min_value=1, max_value=40), max_size=6),
)
def test_header_processor_stores_message_unchanged_besides_added_fields(parts: list[bytes], cuts: list[int]) -> None:
    message = b"".join(parts)
    out: list[bytes] = []
    seen: list[list[tuple[str, bytes]]] = []

    def stamp(headers):
        seen.append(headers)
        return StampResult(prepend=[b"Received: ours\r\n"], append=[b"X-Added: 1\r\n"])

    proc = HeaderProcessor(out.append, stamp, limit=64)
    pos = 0
    for cut in sorted(cuts):
        proc.write(message[pos:cut])
        pos = max(pos, min(cut, len(message)))
    proc.write(message[pos:])
    proc.finish()
    stored = b"".join(out)
    if not proc.complete:  # a section longer than the limit: refused by the intake
        assert seen == [] and stored == b""
        return
    assert len(seen) == 1
    assert stored.startswith(b"Received: ours\r\n")
    rest = stored[len(b"Received: ours\r\n"):]
    # A header section ended by a line that is no field (nor empty), or a message without
    # one (starting with white space or such a line), gets an empty line before that line,
    # after the fields added (as Postfix's cleanup).
    at = rest.index(b"X-Added: 1\r\n")
    head, after = rest[:at], rest[at + len(b"X-Added: 1\r\n"):]
    ended = 0
    while ended < len(parts) and (
        parts[ended] in (b"Subject: s\r\n", b"Received: r\r\n", b"X: y\r\n")
        or (ended and parts[ended] == b" cont\r\n")
    ):
        ended += 1
    bodyFirst = ended < len(parts) and parts[ended] != b"\r\n"
    if head + after != message:
        assert after.startswith(b"\r\n") and head + after[2:] == message
        assert head == b"".join(parts[:ended]) and bodyFirst
    elif len(message) <= 64:  # (a longer header section is parsed up to the limit only)
        assert not bodyFirst


class FakeResolver:
    def __init__(self, ptr=None, a=(), aaaa=(), fail=False):
        self.ptr, self.a, self.aaaa, self.fail = ptr, a, aaaa, fail
        self.queries: list[str] = []

    def lookupPointer(self, name):
        self.queries.append(name)
        if self.fail:
            return fail(DNSNameError(name))
        if self.ptr is None:
            return Deferred()
        ptrs = self.ptr if isinstance(self.ptr, list) else [self.ptr]
        return succeed(([dns.RRHeader(name, dns.PTR, payload=dns.Record_PTR(p)) for p in ptrs],
                        [], []))

    def lookupAddress(self, name):
        return succeed(([dns.RRHeader(name, dns.A, payload=dns.Record_A(a)) for a in self.a], [], []))

    def lookupIPV6Address(self, name):
        return succeed(([dns.RRHeader(name, dns.AAAA, payload=dns.Record_AAAA(a)) for a in self.aaaa], [], []))


def test_reverse_lookup_forward_confirmed() -> None:
    clock = Clock()
    r = FakeResolver(ptr="Mail.Example.", a=["192.0.2.1"])
    results: list = []
    reverseLookup(r, "192.0.2.1", 10, clock).addCallback(results.append)
    assert results == ["mail.example"]
    assert r.queries == ["1.2.0.192.in-addr.arpa"]
    results.clear()
    reverseLookup(FakeResolver(ptr="liar.example", a=["192.0.2.99"]), "192.0.2.1", 10, clock).addCallback(results.append)
    reverseLookup(FakeResolver(fail=True), "192.0.2.1", 10, clock).addCallback(results.append)
    reverseLookup(FakeResolver(ptr="v6.example", aaaa=["2001:db8::1"]), "2001:db8::1", 10, clock).addCallback(results.append)
    assert results == [None, None, "v6.example"]


def test_a_reverse_name_that_does_not_resolve_to_the_client_is_logged() -> None:
    """A PTR name whose addresses are not the client's (a forged or stale name): the client
    is "unknown", and the warning says why, as Postfix's smtpd_peer.c ("hostname X does not
    resolve to address Y"); it said nothing, the admin could not tell a forged name from no
    PTR record at all."""
    results: list = []
    with capturedLogs() as events:
        reverseLookup(FakeResolver(ptr=["Liar.Example."], a=["192.0.2.99"]), "192.0.2.1", 10,
                      Clock()).addCallback(results.append)
        reverseLookup(FakeResolver(ptr=["mail.example"], a=["192.0.2.2"]), "192.0.2.2", 10,
                      Clock()).addCallback(results.append)
    assert results == [None, "mail.example"]
    assert [(e["log_level"], formatEvent(e)) for e in events] == [
        (LogLevel.warn, "hostname liar.example does not resolve to address 192.0.2.1")]


def test_a_reverse_name_that_does_not_exist_is_logged_and_the_next_tried() -> None:
    """A PTR name that does not exist (NXDOMAIN for its address): logged as Postfix's smtpd
    does ("hostname X does not resolve to address Y: ..."), and the client's next PTR
    name is still tried.  The NXDOMAIN failed the whole lookup: the client was "unknown",
    a name of it that resolves to it not even asked, and nothing was said."""

    class Resolver(FakeResolver):
        def lookupAddress(self, name):
            if name == "gone.example":
                return fail(DNSNameError(name))
            return super().lookupAddress(name)

    results: list = []
    with capturedLogs() as events:
        reverseLookup(Resolver(ptr=["gone.example", "mail.example"], a=["192.0.2.1"]),
                      "192.0.2.1", 10, Clock()).addCallback(results.append)
    assert results == ["mail.example"]
    assert [(e["log_level"], formatEvent(e)) for e in events] == [
        (LogLevel.warn, "hostname gone.example does not resolve to address 192.0.2.1: "
                        "the name does not exist")]


def test_reverse_lookup_skips_a_name_not_in_ascii() -> None:
    """A PTR record whose name is not ASCII (what a hostile DNS server can answer) is
    skipped, as a name of bad syntax is: the client's other PTR names are still tried (it
    made the whole lookup fail: str() of the name raised UnicodeDecodeError)."""
    r = FakeResolver(ptr=["mx\u00e9.example".encode(), b"dots.example..", "Mail.Example."],
                     a=["192.0.2.1"])
    results: list = []
    reverseLookup(r, "192.0.2.1", 10, Clock()).addCallback(results.append)
    assert results == ["mail.example"]


def test_reverse_lookup_answers_are_remembered_for_a_while() -> None:
    """A client's name (or its lack) is looked up once per REVERSE_CACHE_TIME, per resolver;
    a failure is asked again at the next connection."""
    from mailrelay.receive.rdns import REVERSE_CACHE_TIME

    clock = Clock()
    r = FakeResolver(ptr="mail.example", a=["192.0.2.1"])
    results: list = []
    for _ in range(3):
        reverseLookup(r, "192.0.2.1", 10, clock).addCallback(results.append)
    assert results == ["mail.example"] * 3 and len(r.queries) == 1
    reverseLookup(FakeResolver(ptr="other.example", a=["192.0.2.1"]), "192.0.2.1", 10, clock).addCallback(results.append)
    assert results[-1] == "other.example"  # another resolver, another cache
    clock.advance(REVERSE_CACHE_TIME)
    r.ptr = "renamed.example"
    reverseLookup(r, "192.0.2.1", 10, clock).addCallback(results.append)
    assert results[-1] == "renamed.example" and len(r.queries) == 2  # asked again
    failing = FakeResolver(fail=True)
    for _ in range(2):
        reverseLookup(failing, "192.0.2.1", 10, clock).addCallback(results.append)
    assert results[-2:] == [None, None] and len(failing.queries) == 2


def test_reverse_lookup_answers_are_not_kept_longer_after_a_step_back_of_the_clock() -> None:
    """An answer remembered before a step back of the clock (NTP, date -s) is kept
    REVERSE_CACHE_TIME from the step at most, not until the clock reaches its end again (a
    client's old name was used for the size of the step)."""
    from mailrelay.receive.rdns import REVERSE_CACHE_TIME

    clock = Clock()
    clock.advance(1_800_000_000)
    r = FakeResolver(ptr="mail.example", a=["192.0.2.1"])
    results: list = []
    reverseLookup(r, "192.0.2.1", 10, clock).addCallback(results.append)
    clock.rightNow -= 3600
    r.ptr = "renamed.example"
    clock.advance(REVERSE_CACHE_TIME)
    reverseLookup(r, "192.0.2.1", 10, clock).addCallback(results.append)
    assert results == ["mail.example", "renamed.example"] and len(r.queries) == 2


def test_reverse_lookup_times_out_to_unknown() -> None:
    clock = Clock()
    results: list = []
    reverseLookup(FakeResolver(), "192.0.2.1", 10, clock).addCallback(results.append)
    assert results == []
    clock.advance(10)
    assert results == [None]


def test_loopback_uses_hosts_file_only(tmp_path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("# comment\n127.0.0.1 localhost loopy\n::1 ip6-localhost\n")
    assert hostsFileName("127.0.0.1", str(hosts)) == "localhost"
    assert hostsFileName("::1", str(hosts)) == "ip6-localhost"
    assert hostsFileName("127.0.0.2", str(hosts)) is None
    r = FakeResolver(fail=True)
    results: list = []
    reverseLookup(r, "127.0.0.1", 10, Clock()).addCallback(results.append)
    assert r.queries == [] and len(results) == 1


@pytest.mark.parametrize(
    "client,rcpt,allowed",
    [
        ("10.1.2.3", "x@anywhere.example", True),
        ("::ffff:10.1.2.3", "x@anywhere.example", True),
        ("192.0.2.1", "x@anywhere.example", False),
        ("192.0.2.1", "x@ours.example", True),
        ("192.0.2.1", "x@sub.ours.example", False),
        ("192.0.2.1", "x%y@ours.example", False),
        ("192.0.2.1", "Postmaster@relay.test", True),
        ("2001:db8::5", "x@anywhere.example", True),
        ("not-an-ip", "x@anywhere.example", False),
    ],
)
def test_relay_control(client: str, rcpt: str, allowed: bool) -> None:
    relay = RelayControl([ip_network("10.0.0.0/8"), ip_network("2001:db8::/32")], ["ours.example"], "relay.test")
    info = ClientInfo(address=client, relayAllowed=relay.isRelayClient(client))
    verdict = relay.check(info, parseForwardPath(f"<{rcpt}>", postmasterDomain="relay.test"))
    assert (verdict.kind is VerdictKind.CONTINUE) is allowed


@pytest.mark.parametrize("client", ["10.0.0.1", "192.0.2.1"])
def test_postmaster_with_nowhere_to_go_is_refused_at_rcpt(client: str) -> None:
    """Mail to postmaster at the relay's host name (or <postmaster>), with no [queue]
    postmaster and nothing routing that name but its MX lookup (normally the relay itself),
    was accepted from anyone, then bounced as a loop (5.4.6) -- to a forged sender as
    backscatter, and from the null sender dropped.  It is refused at RCPT (Postfix accepts
    postmaster@$myhostname only because it delivers it locally), from relay clients too;
    other mail is as before."""
    relay = RelayControl([ip_network("10.0.0.0/8")], ["ours.example"], "relay.test",
                         postmasterDeliverable=False)
    info = ClientInfo(address=client, relayAllowed=relay.isRelayClient(client))
    for rcpt in ("Postmaster@relay.test", "postmaster"):
        verdict = relay.check(info, parseForwardPath(f"<{rcpt}>", postmasterDomain="relay.test"))
        assert verdict.kind is VerdictKind.REJECT, rcpt
        assert str(verdict.reply) == (
            "550 5.1.1 Recipient address rejected: this relay has no mailbox for its "
            "postmaster")
    for rcpt, allowed in (("bob@ours.example", True), ("postmaster@ours.example", True),
                          ("bob@elsewhere.example", client == "10.0.0.1")):
        verdict = relay.check(info, parseForwardPath(f"<{rcpt}>", postmasterDomain="relay.test"))
        assert (verdict.kind is VerdictKind.CONTINUE) is allowed, rcpt

SENDER_ROUTE = '[[sender_routes]]\nsender = "@a.example"\nnexthop = "[smtp.a.example]:587"\n'


def _postmasterConfig(tmp_path: Any, text: str) -> Any:
    from mailrelay.config import loadConfig

    path = tmp_path / "relay.toml"
    path.write_text('hostname = "relay.test"\n' + text, encoding="utf-8")
    return loadConfig(str(path))


@pytest.mark.parametrize("text,accepted", [
    # The sender route of @a.example takes its senders' mail to postmaster@relay.test.
    (SENDER_ROUTE, {"a.example"}),
    (SENDER_ROUTE + '[[sender_routes]]\nsender = "<>"\nnexthop = "[bounces.example]"\n',
     {"a.example", "<>"}),
    # A [[routes]] rule for the name wins over the sender route, as at delivery: by its MX.
    (SENDER_ROUTE + '[[routes]]\ndomain = "relay.test"\nbackend = "smtp"\n', set()),
])
def test_postmaster_mail_a_sender_route_takes_is_accepted(tmp_path: Any, text: str,
                                                          accepted: set[str]) -> None:
    """Without [queue] postmaster, mail to postmaster@<hostname> (or <postmaster>) from a
    sender whose [[sender_routes]] entry routes it goes to that relay host, as its delivery
    will (a [[routes]] rule for the recipient first, then the sender route, then the
    smarthost, then MX: Postfix's trivial-rewrite resolve.c): accepted, not refused as
    having nowhere to go -- the RCPT rule asks the routing table the question the delivery
    asks.  Other senders' such mail is still refused."""
    from mailrelay.app.listeners import makeRecipientPolicy
    from mailrelay.config.plugins import HookPlugins

    policy = makeRecipientPolicy(_postmasterConfig(tmp_path, text), Clock(), HookPlugins())
    info = ClientInfo(address="192.0.2.1", relayAllowed=False)
    for sender in ("alice@a.example", "Bob@A.Example", "carol@b.example", ""):
        for rcpt in ("postmaster@relay.test", "postmaster"):
            mailbox = parseForwardPath(f"<{rcpt}>", postmasterDomain="relay.test")
            d = policy.check(info, Envelope(sender=sender), Recipient(str(mailbox)), mailbox)
            verdicts: list[Any] = []
            d.addBoth(verdicts.append)
            expected = (sender.lower().rpartition("@")[2] or "<>") in accepted
            assert (verdicts[0].kind is VerdictKind.CONTINUE) is expected, (sender, rcpt)


def test_the_postmaster_warning_names_the_senders_a_sender_route_takes(tmp_path: Any) -> None:
    """The start-up, reload and `mailrelay check` warning says which senders' mail to
    postmaster is accepted after all: those of the sender routes that take it."""
    from mailrelay.app.relay import _sayWherePostmasterMailGoes

    with capturedLogs() as events:
        _sayWherePostmasterMailGoes(_postmasterConfig(tmp_path, SENDER_ROUTE))
    (line,) = [formatEvent(e) for e in events]
    assert ("mail to postmaster@relay.test (and <postmaster>) is refused (550 5.1.1) but "
            "from the senders of [[sender_routes]] that route it (@a.example), and bounces"
            ) in line, line


def _clearing(context: Any) -> None:
    context.envelope.recipients.clear()


def _adding(context: Any) -> None:
    context.envelope.recipients.append(Recipient("mallory@elsewhere.example", "elsewhere.example"))


@pytest.mark.parametrize(
    ("change", "later"),
    [(_clearing, False), (_adding, False), (_adding, True)],
    ids=["clearing", "adding", "adding-deferred"],
)
def test_a_stamper_changing_the_envelope_gets_451_and_nothing_is_queued(
    change: Any, later: bool
) -> None:
    """A header stamper that clears the recipients (or changes one) got the message queued
    with none after a 250, then dropped, silently.  The intake checks the sender and
    recipients it was given against what it commits: changed, the message is refused (451,
    logged), the change undone, and nothing is queued.  The one log line names the stamper
    (it said "a plugin changed ...": which, it did not say)."""
    from twisted.logger import capturedLogs, formatEvent

    from mailrelay.stamping import ConfiguredStamper
    from mailrelay.testing import ServerHarness

    class Changing:
        def stamp(self, context):
            change(context)
            return succeed(StampResult()) if later else StampResult()

    h = ServerHarness(stampers=[DefaultStamper(),
                                ConfiguredStamper("site-changing", Changing(), 30.0)])
    h.send(b"EHLO client.test\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\n")
    h.send(b"DATA\r\n")
    with capturedLogs() as events:
        reply = h.send(b"Subject: hi\r\n\r\nHello.\r\n.\r\n")
    assert reply == [b"451 4.3.0 Error: temporary failure processing the message, try again "
                     b"later"], reply
    assert h.spool.committed == {}
    texts = [formatEvent(e) for e in events if e["log_level"].name in ("error", "critical")]
    assert len(texts) == 1, texts
    assert ("header stamper site-changing changed the Envelope's recipients (only notes may "
            "change); the message is refused with 451") in texts[0], texts


@pytest.mark.parametrize(
    "change",
    [
        lambda c: setattr(c.envelope.recipients[0], "notify", ("NEVER",)),
        lambda c: setattr(c.envelope.recipients[0], "orcpt", "rfc822;x@elsewhere.example"),
        lambda c: setattr(c.client, "authUser", "mallory"),
        lambda c: setattr(c.client, "relayAllowed", False),
    ],
    ids=["notify", "orcpt", "login", "relay"],
)
def test_a_stamper_changing_what_the_policy_keeps_gets_451(change: Any) -> None:
    """docs/plugins.md: a header stamper that changes a recipient's DSN parameters or the
    client's relay permission or login gets the message refused (451) -- the intake checked
    only the sender and the recipients' addresses, so a NOTIFY=NEVER set by a stamper was
    queued (no bounce ever sent) as the client never asked."""
    from mailrelay.testing import ServerHarness

    class Changing:
        def stamp(self, context):
            change(context)
            return StampResult()

    h = ServerHarness(stampers=[DefaultStamper(), Changing()])
    h.send(b"EHLO client.test\r\nMAIL FROM:<a@example.com>\r\n"
           b"RCPT TO:<b@example.org> NOTIFY=FAILURE\r\nDATA\r\n")
    reply = h.send(b"Subject: hi\r\n\r\nHello.\r\n.\r\n")
    assert reply[0].startswith(b"451 4.3.0 "), reply
    assert h.spool.committed == {}


def test_the_intake_notes_whether_an_smtputf8_message_has_a_utf8_header() -> None:
    """An SMTPUTF8 message's envelope says whether a header field holds UTF-8: without one
    (and with ASCII addresses) it goes to a next hop without SMTPUTF8 as it is."""
    from mailrelay.envelope import Envelope
    from mailrelay.testing import ServerHarness

    for subject, expected in [(b"plain", False), ("caf\u00e9".encode(), True)]:
        h = ServerHarness()
        h.send(b"EHLO client.test\r\nMAIL FROM:<a@example.com> SMTPUTF8\r\n"
               b"RCPT TO:<b@example.org>\r\nDATA\r\n")
        assert h.send(b"Subject: " + subject + b"\r\n\r\nHello.\r\n.\r\n")[0].startswith(b"250")
        [(envelope, _)] = h.spool.committed.values()
        assert isinstance(envelope, Envelope) and envelope.utf8Header is expected
    h = ServerHarness()  # (not SMTPUTF8: not noted, not stored)
    h.send(b"EHLO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
    h.send(b"Subject: x\r\n\r\nHi.\r\n.\r\n")
    [(envelope, _)] = h.spool.committed.values()
    assert envelope.utf8Header is None and "utf8Header" not in envelope.toDict()


def test_utf8_header_fields_the_relay_adds_or_does_not_see_count_too() -> None:
    """An SMTPUTF8 message whose own fields are ASCII goes to a next hop without SMTPUTF8
    as it is: unless a stamper or a message filter added a field holding UTF-8 (allowed in
    an SMTPUTF8 message).  Each was noted as holding none (utf8Header False), and the
    message went without SMTPUTF8 with 8-bit octets in its header (RFC 6531 3.2 needs
    SMTPUTF8).  (A header section going on past what the relay parses, where one may be,
    is refused now: [limits] header_size.)"""
    from zope.interface import implementer

    from mailrelay.interfaces import FilterResult, IMessageFilter
    from mailrelay.testing import ServerHarness

    utf8 = "X-Note: caf\u00e9\r\n".encode()

    class Stamping:
        def stamp(self, context):
            return StampResult(append=[utf8])

    @implementer(IMessageFilter)
    class Filtering:
        def filterMessage(self, context):
            return FilterResult(append=(utf8,))

    long = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 90) for i in range(1100))
    cases = [
        ({"stampers": [DefaultStamper(), Stamping()]}, b"Subject: plain\r\n"),
        ({"plugins": [Filtering()]}, b"Subject: plain\r\n"),
    ]
    for options, fields in cases:
        h = ServerHarness(**options)
        h.send(b"EHLO client.test\r\nMAIL FROM:<a@example.com> SMTPUTF8\r\n"
               b"RCPT TO:<b@example.org>\r\nDATA\r\n")
        assert h.send(fields + b"\r\nHello.\r\n.\r\n")[0].startswith(b"250")
        [(envelope, data)] = h.spool.committed.values()
        assert not data.partition(b"\r\n\r\n")[0].isascii()
        assert envelope.utf8Header is not False, options
    h = ServerHarness()
    h.send(b"EHLO client.test\r\nMAIL FROM:<a@example.com> SMTPUTF8\r\n"
           b"RCPT TO:<b@example.org>\r\nDATA\r\n")
    assert h.send(long + "Subject: caf\u00e9\r\n\r\nHello.\r\n.\r\n".encode()) == [
        b"552 5.6.0 Error: message header size exceeds fixed limit"]
    assert h.spool.committed == {}


def _postmasterVerdict(tmp_path: Any, table: Any, classes: str) -> Any:
    """The verdict at RCPT on postmaster@relay.test of a relay whose sender route takes
    the mail of @a.example, with a sender-canonical entry of C{table} rewriting C{classes},
    as a function of the sender (and whether the message is SMTPUTF8)."""
    from mailrelay.app.listeners import makeRecipientPolicy
    from mailrelay.app.plugins import availablePlugins, pluginBuilder
    from mailrelay.config.plugins import buildHooks

    config = _postmasterConfig(
        tmp_path, SENDER_ROUTE + '[[plugins]]\nplugin = "sender-canonical"\n'
        f'map = "{table}"\nclasses = {classes}\n')
    hooks = buildHooks(config, pluginBuilder(config, Clock(), availablePlugins()), "relay")
    policy = makeRecipientPolicy(config, Clock(), hooks)
    info = ClientInfo(address="192.0.2.1", relayAllowed=False)
    mailbox = parseForwardPath("<postmaster@relay.test>", postmasterDomain="relay.test")

    def verdict(sender: str, smtputf8: bool = False) -> VerdictKind:
        verdicts: list[Any] = []
        policy.check(info, Envelope(sender=sender, smtputf8=smtputf8),
                     Recipient(str(mailbox)), mailbox).addBoth(verdicts.append)
        return verdicts[0].kind

    return verdict


@pytest.mark.parametrize("classes,accepted", [
    ('["envelope_sender"]', True), ('["header_sender"]', False)])
def test_postmaster_rule_asks_with_the_sender_sender_canonical_makes(
        tmp_path: Any, classes: str, accepted: bool) -> None:
    """The postmaster rule at RCPT asks the routing table with the sender the delivery will
    route by: the one sender-canonical (envelope_sender) will make of MAIL FROM at the end of
    data, not MAIL FROM as given.  root@web1.internal rewritten to ops@a.example is taken by
    the sender route of @a.example: accepted (without the envelope rewriting, refused as
    having nowhere to go, as the delivery would find).  (Postfix's smtpd resolves with the
    sender as given, its cleanup rewrites later; it never refuses postmaster mail.)"""
    (tmp_path / "canonical").write_text("root@web1.internal ops@a.example\n"
                                        "@utf8.internal pöstmaster@a.example\n")
    verdict = _postmasterVerdict(tmp_path, tmp_path / "canonical", classes)
    assert (verdict("root@web1.internal") is VerdictKind.CONTINUE) is accepted
    assert verdict("bob@web1.internal") is VerdictKind.REJECT
    assert verdict("alice@a.example") is VerdictKind.CONTINUE
    # A result the message may not carry (not SMTPUTF8) is not made: not asked with it.
    assert verdict("x@utf8.internal") is VerdictKind.REJECT
    assert (verdict("x@utf8.internal", True) is VerdictKind.CONTINUE) is accepted


def test_postmaster_rule_asks_with_the_canonical_table_as_it_is_now(tmp_path: Any) -> None:
    """The sender-canonical table a message's filter will use is the file as it is at the
    end of data (read again when it changed): the postmaster rule at RCPT asks with that
    table too, not the one a process last read for a message -- in a process that only
    refuses postmaster mail, that could be the table of its start, forever.  A changed
    file that cannot be used leaves the table before in use, and says why."""
    table = tmp_path / "canonical"
    table.write_text("root@web1.internal ops@a.example\n")
    verdict = _postmasterVerdict(tmp_path, table, '["envelope_sender"]')
    assert verdict("root@web1.internal") is VerdictKind.CONTINUE
    table.write_text("# root@web1.internal ops@a.example\nbob@web1.internal ops@a.example\n")
    assert verdict("root@web1.internal") is VerdictKind.REJECT
    assert verdict("bob@web1.internal") is VerdictKind.CONTINUE
    table.write_text("bad line without a result\n")
    with capturedLogs() as events:
        assert verdict("bob@web1.internal") is VerdictKind.CONTINUE
    (said,) = [formatEvent(e) for e in events if "sender-canonical" in formatEvent(e)]
    assert said.startswith(f"sender-canonical: the map {table} changed but cannot be used")

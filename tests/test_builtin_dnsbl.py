"""The built-in plugin dnsbl, on the test kit: FakeResolver, a Clock, ServerHarness."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.names import dns
from twisted.names.error import DNSQueryRefusedError as REFUSED

from mailrelay.builtin.dnsbl import parseZone, queryName
from mailrelay.errors import ConfigError
from mailrelay.interfaces import CONTINUE, FilterResult, Verdict, VerdictKind
from mailrelay.testing import (
    SERVFAIL,
    FakeResolver,
    ServerHarness,
    buildPlugin,
    makeClient,
    makeEnvelope,
    makeFilterContext,
)
from tests.harness import fired

LISTED = "192.0.2.7"
NAME = "7.2.0.192.bl.test"




def plugin(tmp_path: Path, resolver: FakeResolver, clock: Any = None, **options: Any) -> Any:
    options.setdefault("zones", ["bl.test"])
    extra = {"reactor": clock} if clock is not None else {}
    return buildPlugin("dnsbl", options, tmp_path, resolver=resolver, **extra)


# -- names and zones


def test_query_names_reverse_octets_and_nibbles() -> None:
    assert queryName(ipaddress.ip_address("192.0.2.7"), "bl.test") == NAME
    six = queryName(ipaddress.ip_address("2001:db8::1"), "bl.test")
    assert six == "1." + "0." * 23 + "8.b.d.0.1.0.0.2.bl.test"
    assert len(six.split(".")) == 32 + 2


def test_zones_with_filters_and_weights() -> None:
    zone = parseZone("Zen.Spamhaus.org.=127.0.0.[2..11]*3")
    assert (zone.name, zone.weight) == ("zen.spamhaus.org", 3)
    assert zone.accepts("127.0.0.2") and zone.accepts("127.0.0.11")
    assert not zone.accepts("127.0.0.12") and not zone.accepts("127.255.255.254")
    mixed = parseZone("list.dnswl.org=127.0.[0..255].[1;3]*-2")
    assert mixed.weight == -2 and mixed.accepts("127.0.9.3") and not mixed.accepts("127.0.9.2")
    assert parseZone("bl.test").accepts("10.1.2.3")
    for bad in ("bl.test=127.0.0", "bl.test=127.0.0.[5..2]", "bl.test=127.0.0.256", "nodot",
                "bl.test*x", "b l.test"):
        with pytest.raises(ValueError):
            parseZone(bad)


@pytest.mark.parametrize(
    ("options", "key", "message"),
    [
        ({"zones": []}, "zones", "at least one zone"),
        ({"zones": ["bl.test=127.0.0.[1..300]"]}, "zones[0]", "bad answer filter"),
        ({"zones": ["bl.test", "BL.test"]}, "zones[1]", "listed twice"),
        ({"zones": ["bl.test"], "threshold": 2}, "threshold", "can never be reached"),
        ({"zones": ["bl.test"], "action": "drop"}, "action", '"reject" or "tag"'),
        ({"zones": ["bl.test"], "header": "X DNSBL"}, "header", "not a header field name"),
        ({"zones": ["bl.test"], "zone": "x"}, "zone", 'did you mean "zones"'),
        ({}, "zones", "is required"),
    ],
)
def test_bad_options_name_the_key(tmp_path: Path, options: dict, key: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        buildPlugin("dnsbl", options, tmp_path)
    assert e.value.key == key and message in str(e.value), str(e.value)


# -- connect


def test_a_listed_client_is_refused_naming_the_zone_and_its_reason(tmp_path: Path) -> None:
    resolver = FakeResolver({NAME: {"A": ["127.0.0.2"], "TXT": ["https://bl.test/q/192.0.2.7"]}})
    client = makeClient(LISTED)
    verdict = fired(plugin(tmp_path, resolver).checkConnect(client))
    assert verdict == Verdict.reject(
        "Service unavailable; Client host [192.0.2.7] blocked using bl.test; "
        "https://bl.test/q/192.0.2.7", 554, "5.7.1")
    assert client.notes == {"dnsbl": {"score": 1, "listed": [
        {"zone": "bl.test", "answers": ["127.0.0.2"]}]}}


def test_without_a_reason_the_reply_is_postfix_s(tmp_path: Path) -> None:
    resolver = FakeResolver({NAME: {"A": ["127.0.0.2"]}})
    verdict = fired(plugin(tmp_path, resolver).checkConnect(makeClient(LISTED)))
    assert str(verdict.reply) == (
        "554 5.7.1 Service unavailable; Client host [192.0.2.7] blocked using bl.test")


def test_an_unlisted_client_passes_without_notes(tmp_path: Path) -> None:
    client = makeClient("192.0.2.8")
    assert fired(plugin(tmp_path, FakeResolver()).checkConnect(client)) is CONTINUE
    assert client.notes == {}


def test_answers_the_filter_refuses_are_no_listing(tmp_path: Path) -> None:
    resolver = FakeResolver({NAME: {"A": ["127.255.255.254"]}})
    p = plugin(tmp_path, resolver, zones=["bl.test=127.0.0.[2..11]"])
    assert fired(p.checkConnect(makeClient(LISTED))) is CONTINUE


@pytest.mark.parametrize("error", [SERVFAIL, None])
def test_a_failing_lookup_fails_open_and_is_logged(tmp_path: Path, error: Any) -> None:
    resolver = FakeResolver({NAME: {"A": ["127.0.0.2"]}})
    resolver.fail(NAME, "A", error(NAME) if error else None)
    with capturedLogs() as events:
        verdict = fired(plugin(tmp_path, resolver).checkConnect(makeClient(LISTED)))
    assert verdict is CONTINUE
    assert any(f"lookup of {NAME} failed, taken as not listed" in formatEvent(e)
               for e in events)


@pytest.mark.parametrize(
    ("error", "text"),
    [(SERVFAIL, "server failure (SERVFAIL)"), (REFUSED, "refused (REFUSED)")],
)
def test_a_failing_lookup_is_said_in_words(tmp_path: Path, error: Any, text: str) -> None:
    """twisted.names fails with the server's answer as the argument: the log read
    "<Message id=32883 rCode=2 maxSize=0 flags=answ>"."""
    resolver = FakeResolver({NAME: {"A": ["127.0.0.2"]}})
    resolver.fail(NAME, "A", error(dns.Message(id=32883, rCode=2, answer=1)))
    with capturedLogs() as events:
        fired(plugin(tmp_path, resolver).checkConnect(makeClient(LISTED)))
    assert f"lookup of {NAME} failed, taken as not listed: {text}" in [
        formatEvent(e) for e in events][0]


def test_zones_are_asked_in_parallel_within_the_timeout(tmp_path: Path) -> None:
    clock = Clock()
    resolver = FakeResolver({NAME: {"A": ["127.0.0.2"]}, "7.2.0.192.slow.test": {"A": [
        "127.0.0.3"]}}, clock=clock, delay=3)
    p = plugin(tmp_path, resolver, clock, zones=["bl.test", "slow.test", "none.test"],
               query_timeout=5, action="tag")
    client = makeClient(LISTED)
    d = p.checkConnect(client)
    assert [q for q in resolver.queries] == [
        (NAME, "A"), ("7.2.0.192.slow.test", "A"), ("7.2.0.192.none.test", "A")]
    clock.advance(3)
    assert fired(d) is CONTINUE
    assert [e["zone"] for e in client.notes["dnsbl"]["listed"]] == ["bl.test", "slow.test"]


def test_a_lookup_slower_than_the_timeout_is_not_a_listing(tmp_path: Path) -> None:
    clock = Clock()
    resolver = FakeResolver({NAME: {"A": ["127.0.0.2"]}}, clock=clock, delay=30)
    p = plugin(tmp_path, resolver, clock, query_timeout=2)
    d = p.checkConnect(makeClient(LISTED))
    assert not d.called
    with capturedLogs() as events:
        clock.advance(2)
    assert fired(d) is CONTINUE
    assert not clock.getDelayedCalls()  # the slow answer's timer was cancelled
    # Said as such (it read "(2.0, 'Deferred')").
    texts = [formatEvent(e) for e in events]
    assert f"dnsbl: lookup of {NAME} failed, taken as not listed: no answer within 2s" in (
        texts), texts


def test_an_ipv6_client_is_looked_up_by_nibbles(tmp_path: Path) -> None:
    name = queryName(ipaddress.ip_address("2001:db8::1"), "bl.test")
    resolver = FakeResolver({name: {"A": ["127.0.0.2"]}})
    verdict = fired(plugin(tmp_path, resolver).checkConnect(makeClient("2001:db8::1")))
    assert "Client host [2001:db8::1] blocked using bl.test" in verdict.reply.text
    mapped = makeClient("::ffff:192.0.2.7")
    resolver.add(NAME, "A", "127.0.0.2")
    assert fired(plugin(tmp_path, resolver).checkConnect(mapped)).kind is VerdictKind.REJECT


def test_weights_and_threshold(tmp_path: Path) -> None:
    resolver = FakeResolver({NAME: {"A": ["127.0.0.2"]},
                             "7.2.0.192.two.test": {"A": ["127.0.0.2"]},
                             "7.2.0.192.allow.test": {"A": ["127.0.9.1"]}})
    p = plugin(tmp_path, resolver, zones=["bl.test", "two.test*2", "allow.test*-2", "z.test"],
               threshold=3)
    client = makeClient(LISTED)
    assert fired(p.checkConnect(client)) is CONTINUE  # 1 + 2 - 2 = 1
    assert client.notes["dnsbl"]["score"] == 1
    resolver.remove("7.2.0.192.allow.test")
    verdict = fired(p.checkConnect(makeClient(LISTED)))  # 1 + 2 = 3
    assert verdict.reply.text.endswith("blocked using bl.test")


def test_tag_notes_the_client_and_adds_the_header(tmp_path: Path) -> None:
    resolver = FakeResolver({NAME: {"A": ["127.0.0.2", "127.0.0.4"]}})
    p = plugin(tmp_path, resolver, action="tag", header="X-DNSBL")
    client = makeClient(LISTED)
    assert fired(p.checkConnect(client)) is CONTINUE
    assert client.notes["dnsbl"]["listed"] == [
        {"zone": "bl.test", "answers": ["127.0.0.2", "127.0.0.4"]}]
    context = makeFilterContext(b"Subject: x\r\n\r\nx\r\n", envelope=makeEnvelope(client=client))
    assert p.filterMessage(context) == FilterResult(
        prepend=(b"X-DNSBL: bl.test=127.0.0.2/127.0.0.4 (score 1)\r\n",))
    clean = makeFilterContext(b"Subject: x\r\n\r\nx\r\n")
    assert p.filterMessage(clean) is CONTINUE
    assert p.filterMessage(makeFilterContext(b"x\r\n", client=None)) is CONTINUE


def test_relay_clients_and_exempt_networks_are_not_looked_up(tmp_path: Path) -> None:
    resolver = FakeResolver({NAME: {"A": ["127.0.0.2"]}})
    p = plugin(tmp_path, resolver, exempt_networks=["192.0.2.0/28"])
    assert fired(p.checkConnect(makeClient(LISTED, relayAllowed=True))) is CONTINUE
    assert fired(p.checkConnect(makeClient(LISTED))) is CONTINUE
    assert resolver.queries == []
    strict = plugin(tmp_path, resolver, exempt_relay_clients=False)
    verdict = fired(strict.checkConnect(makeClient(LISTED, relayAllowed=True)))
    assert verdict.kind is VerdictKind.REJECT


def test_reject_at_mail_spares_authenticated_clients(tmp_path: Path) -> None:
    resolver = FakeResolver({NAME: {"A": ["127.0.0.2"]}})
    p = plugin(tmp_path, resolver, reject_at="mail")
    client = makeClient(LISTED)
    assert fired(p.checkConnect(client)) is CONTINUE
    verdict = fired(p.validateSender(client, makeEnvelope(client=client)))
    assert str(verdict.reply) == (
        "554 5.7.1 Service unavailable; Client host [192.0.2.7] blocked using bl.test")
    client.authUser, client.relayAllowed = "alice", True
    assert fired(p.validateSender(client, makeEnvelope(client=client))) is CONTINUE


# -- in a session


def test_the_greeting_is_the_refusal(tmp_path: Path) -> None:
    resolver = FakeResolver({NAME: {"A": ["127.0.0.2"]}})
    h = ServerHarness(plugins=[plugin(tmp_path, resolver)], peer=LISTED, relay={"networks": []})
    assert h.transport.value() == (
        b"554 5.7.1 Service unavailable; Client host [192.0.2.7] blocked using bl.test\r\n")
    assert h.send(b"EHLO x\r\n")[1:] == [b"503 5.5.1 Error: no SMTP service here, send QUIT"]
    clean = ServerHarness(plugins=[plugin(tmp_path, resolver)], peer="192.0.2.8")
    assert clean.transport.value().startswith(b"220 ")


@pytest.mark.parametrize(
    "entry, warned",
    [
        ('timeout = 5\n', "query_timeout = 10s is not below the plugin's timeout of 5s"),
        ('timeout = 5\nquery_timeout = 5\n', "query_timeout = 5s is not below"),
        ('timeout = 5\nquery_timeout = 4\n', None),
        ('', None),  # the defaults: 10 s within 30 s
    ],
)
def test_a_query_timeout_the_relay_would_cut_is_warned_of(
    tmp_path: Path, entry: str, warned: str | None
) -> None:
    """docs/plugin-dnsbl.md says to keep query_timeout below the entry's timeout: the relay
    cuts a slower call and defers, so dnsbl's failing open would never act.  The relay's
    start (and `mailrelay check`, a reload) says so, naming the file and the key."""
    from twisted.logger import capturedLogs, formatEvent

    from mailrelay.app.plugins import availablePlugins, pluginBuilder
    from mailrelay.config import loadConfig
    from mailrelay.config.plugins import buildHooks

    path = tmp_path / "relay.toml"
    path.write_text(
        '[dns]\nnameservers = ["127.0.0.1"]\n'
        '[[plugins]]\nplugin = "dnsbl"\nzones = ["zen.example"]\n' + entry
    )
    config = loadConfig(str(path))
    with capturedLogs() as events:
        buildHooks(config, pluginBuilder(config, Clock(), availablePlugins()), "relay")
    lines = [formatEvent(e) for e in events if "is not below" in formatEvent(e)]
    if warned is None:
        assert lines == []
    else:
        (line,) = lines
        assert line.startswith(f"{path}: plugins[0].{warned}")
        assert line.endswith("never acts; make query_timeout shorter")

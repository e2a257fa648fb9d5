"""The example site plugins of every hook, C{examples/site-hooks}, tested as docs/plugins.md
says a site tests its own: built through real discovery (C{buildPlugin}), called with the
test kit's context objects, and run inside the relay's own listener (C{ServerHarness}) and
queue manager (C{QueueHarness}), without sockets.  (Their end-to-end tests, in the real
twistd, are in tests/test_e2e_hooks.py.)"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType

import pytest
from zope.interface.verify import verifyObject

from mailrelay.cleanup.stamping import DefaultStamper
from mailrelay.delivery.discard import DiscardBackend
from mailrelay.errors import ConfigError
from mailrelay.interfaces import (
    CONTINUE,
    FilterResult,
    IMailRelayPlugin,
    Verdict,
    VerdictKind,
)
from mailrelay.route.table import RouteRule
from mailrelay.testing import (
    QueueHarness,
    ServerHarness,
    buildPlugin,
    makeClient,
    makeDeliveryEvent,
    makeEnvelope,
    makeFilterContext,
    makeStampContext,
)

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "site-hooks"


@pytest.fixture(autouse=True)
def site(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The example on the path, as PYTHONPATH puts it for the relay: its module, and its
    dropin among the directories Twisted scans for plugins."""
    monkeypatch.syspath_prepend(str(EXAMPLE))
    import twisted.plugins

    monkeypatch.setattr(twisted.plugins, "__path__", [*twisted.plugins.__path__,
                                                      str(EXAMPLE / "twisted" / "plugins")])
    return importlib.import_module("sitehooks")


def result(d: object) -> object:
    """What a Deferred (that has fired) holds."""
    box: list[object] = []
    d.addBoth(box.append)  # type: ignore[attr-defined]
    assert box, "the Deferred has not fired"
    return box[0]


def test_the_dropin_names_plugins_without_importing_them() -> None:
    assert not (EXAMPLE / "twisted" / "__init__.py").exists()
    assert not (EXAMPLE / "twisted" / "plugins" / "__init__.py").exists()
    dropin = importlib.import_module("twisted.plugins.sitehooks_plugin")
    for name in ("siteGate", "siteSenders", "siteGrey", "siteFilter", "siteObserver",
                 "siteExtension", "siteStamp"):
        plugin = getattr(dropin, name)
        verifyObject(IMailRelayPlugin, plugin)
        assert plugin.factory.startswith("sitehooks:")


def test_connect_and_helo(tmp_path: Path) -> None:
    gate = buildPlugin("site-gate", {"reject": ["192.0.2.7"], "bad_helo": ["evil.test"]},
                       tmp_path)
    assert gate.checkConnect(makeClient("192.0.2.7")) == Verdict.reject(
        "Error: 192.0.2.7 is listed", 554, "5.7.1")
    client = makeClient("192.0.2.8")
    assert gate.checkConnect(client) is CONTINUE
    assert client.notes == {"gate": {"connected": "192.0.2.8"}}
    assert gate.checkHelo(client, "evil.test").kind is VerdictKind.REJECT
    assert gate.checkHelo(client, "mx.example.org") is CONTINUE


def test_a_session_through_the_relays_own_listener(tmp_path: Path) -> None:
    gate = buildPlugin("site-gate", {"bad_helo": ["evil.test"]}, tmp_path)
    senders = buildPlugin("site-senders", {"reject": ["spam@example.com"]}, tmp_path)
    extension = buildPlugin("site-ext", {}, tmp_path)
    h = ServerHarness(plugins=[gate, senders, extension])
    assert h.replies() == [b"220 relay.test ESMTP mailrelay"]
    assert h.send(b"EHLO evil.test\r\n") == [b"550 5.7.1 Error: HELO evil.test refused"]
    assert any(line[4:] == b"XSITE TAG" for line in h.send(b"EHLO client.test\r\n"))
    assert h.send(b"XSITE\r\n") == [b"250 2.0.0 site says hello to 127.0.0.1"]
    assert h.send(b"MAIL FROM:<spam@example.com>\r\n") == [
        b"550 5.7.1 Error: sender refused by site policy"]
    assert h.send(b"MAIL FROM:<alice@example.com> XSITE-TAG=no-no\r\n") == [
        b"501 5.5.4 Error: bad XSITE-TAG parameter: a tag is letters and digits"]
    assert h.send(b"MAIL FROM:<alice@example.com> XSITE-TAG=Blue\r\n")[0].startswith(b"250 ")
    assert h.send(b"RCPT TO:<bob@example.org>\r\n")[0].startswith(b"250 ")
    assert h.send(b"DATA\r\n")[0].startswith(b"354 ")
    assert h.send(b"Subject: hi\r\n\r\nHello.\r\n.\r\n")[0].startswith(b"250 ")
    [(envelope, message)] = h.spool.committed.values()
    assert envelope.parameters == {"XSITE-TAG": "blue"}
    assert envelope.notes == {"senders": "checked"}
    assert envelope.client is not None
    assert envelope.client.notes == {"gate": {"connected": "127.0.0.1"}}


def test_greylisting_remembers_across_a_reload(tmp_path: Path) -> None:
    kept: dict[str, object] = {}  # what the relay keeps for plugins across reloads
    grey = buildPlugin("site-grey", {"log": "events.jsonl"}, tmp_path, kept=kept)
    envelope = makeEnvelope("alice@example.com", ["bob@example.org"])
    assert grey.checkData(envelope.client, envelope) == Verdict.defer(
        "Greylisted, try again later", 451, "4.7.1")
    reloaded = buildPlugin("site-grey", {"log": "events.jsonl"}, tmp_path, kept=kept)
    assert reloaded is not grey
    assert reloaded.checkData(envelope.client, envelope) is CONTINUE
    reloaded.deliveryAttempted(makeDeliveryEvent(envelope=envelope))
    [event] = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert (event["hook"], event["rcpt"], event["outcome"]) == (
        "delivery", "bob@example.org", "delivered")


def test_the_message_filter_reads_the_whole_message(tmp_path: Path) -> None:
    content = buildPlugin("site-filter", {"reject_word": "VIRUS"}, tmp_path)
    refused = makeFilterContext(b"Subject: x\r\n\r\nA VIRUS.\r\n")
    verdict = result(content.filterMessage(refused))
    assert verdict == Verdict.reject("Error: message refused by content filter", 554, "5.7.1")
    message = b"Subject: x\r\n\r\nHello.\r\n"
    context = makeFilterContext(message)
    answer = result(content.filterMessage(context))
    assert answer == FilterResult(prepend=(b"X-Site-Filter: checked 22 octets\r\n",))
    assert context.envelope.notes == {"filter": {"size": len(message)}}


def test_the_observers_under_the_queue_manager(tmp_path: Path) -> None:
    observer = buildPlugin("site-observer", {"log": "events.jsonl"}, tmp_path)
    h = QueueHarness(tmp_path, {"discard": DiscardBackend()},
                     routes=[RouteRule("*", "discard")], plugins=[observer])
    queueID = h.submit("alice@example.com", ["bob@example.org"], notes={"site": 1})
    h.stop()
    lines = (tmp_path / "events.jsonl").read_text().splitlines()
    events = {event["hook"]: event for event in map(json.loads, lines)}
    queued, delivered = events["queue"], events["delivery"]
    assert (queued["hook"], queued["queueID"], queued["notes"]) == ("queue", queueID, {"site": 1})
    assert (delivered["hook"], delivered["rcpt"], delivered["outcome"]) == (
        "delivery", "bob@example.org", "delivered")


def test_the_stamper_after_the_default_one(tmp_path: Path) -> None:
    stamp = buildPlugin("site-stamp", {}, tmp_path)
    h = ServerHarness(stampers=[DefaultStamper(), stamp], peer="192.0.2.7",
                      relay={"networks": ["192.0.2.0/24"]})
    h.send(b"EHLO client.test\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\n")
    h.send(b"DATA\r\n")
    assert h.send(b"Subject: hi\r\n\r\nHello.\r\n.\r\n")[0].startswith(b"250 ")
    [(envelope, message)] = h.spool.committed.values()
    assert message.startswith(b"Received: from client.test (unknown [192.0.2.7])")
    assert message.endswith(b"\r\nX-Site-Client: unknown [192.0.2.7]\r\n\r\nHello.\r\n")
    assert stamp.stamp(makeStampContext(client=None)).append == []  # the relay's own mail


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("site-gate", {"rejct": []}, 'unknown key "rejct" (did you mean "reject"?)'),
        ("site-gate", {"reject": "192.0.2.7"}, "reject: must be an array of strings"),
        ("site-grey", {}, "log: is required"),
        ("site-stamp", {"field": "X"}, 'unknown key "field"'),
        ("site-broken", {}, "plugin 'site-broken' failed to build: RuntimeError: cannot reach"),
    ],
)
def test_option_errors_name_the_key(tmp_path: Path, name: str, options: dict[str, object],
                                    message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        buildPlugin(name, options, tmp_path)
    assert message in str(raised.value)


def test_queued_is_told_before_delivered(tmp_path: Path) -> None:
    """An observer hears that a message is queued before it hears of its delivery, even when
    the backend answers at once (the intake tells the observers before the queue)."""
    observer = buildPlugin("site-observer", {"log": "events.jsonl"}, tmp_path)
    h = QueueHarness(tmp_path, {"discard": DiscardBackend()},
                     routes=[RouteRule("*", "discard")], plugins=[observer])
    h.submit("alice@example.com", ["bob@example.org"])
    h.stop()
    lines = (tmp_path / "events.jsonl").read_text().splitlines()
    assert [json.loads(line)["hook"] for line in lines] == ["queue", "delivery"]

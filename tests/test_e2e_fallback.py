"""End-to-end: fallback relays (Postfix's smtp_fallback_relay) through the real
C{twistd -n mailrelay}, with two next hops: the destination, which refuses, says 421 or
550, and the fallback relay (aiosmtpd), which accepts."""

from __future__ import annotations

import pytest

from tests.harness import freePort
from tests.test_e2e_outbound import (  # noqa: F401 - dns, nexthop, relay: the fixtures
    ScriptedServer,
    bounceID,
    config,
    dns,
    message,
    nexthop,
    parseReport,
    relay,
    smtpRoute,
    submit,
    unfold,
    waitEmpty,
    waitRemoved,
    waitResult,
)


@pytest.mark.parametrize("primary", ["refused", "421"])
def test_mail_the_destination_cannot_take_goes_to_the_fallback_relay(
    relay, nexthop, dns, primary: str  # noqa: F811
) -> None:
    """Mail to a domain whose MX host refuses the connection, or greets with 421, is sent to
    [delivery] fallback_relay in the same attempt (Postfix's smtp_fallback_relay,
    smtp_connect.c); the log's relay= and the success notice's Remote-MTA name the
    fallback relay that took it, not the MX host."""
    fallback, fallbackPort = nexthop()
    notices, noticePort = nexthop()
    busy = ScriptedServer(GREETING=b"421 4.3.2 too busy\r\n") if primary == "421" else None
    try:
        port = busy.port if busy is not None else freePort()
        text = config(dns, queue={"min_backoff": 300, "max_backoff": 600}, routes=[
            {"domain": "mx.test", "backend": "smtp", "nexthop": f"mx.test:{port}"},
            smtpRoute("sender.test", noticePort)])
        text = text.replace("[delivery]\n", "[delivery]\nfallback_relay = "
                            f'["[127.0.0.1]:{fallbackPort}"]\n', 1)
        r = relay(text)
        qid = submit(r, "alice@sender.test", ["bob@mx.test"], message("via the fallback"),
                     rcptOptions=("NOTIFY=SUCCESS",))
        m = waitResult(r, qid, "bob@mx.test")
        assert (m["status"], m["relay"], m["attempts"]) == (
            "sent", f"127.0.0.1[127.0.0.1]:{fallbackPort}", "1"), m[0]
        r.waitForLog(rf"{qid}: every recipient not taken by mx\.test:{port} \(.*\); trying "
                     rf"fallback relay \[127\.0\.0\.1\]:{fallbackPort}")
        (got,) = fallback.waitTo("bob@mx.test")
        assert b"Subject: via the fallback" in got.content
        dsnID = bounceID(r, qid, "delivery status notification")
        waitRemoved(r, dsnID)
        (notice,) = notices.waitTo("alice@sender.test")
        _, _, (block,), _ = parseReport(notice.content)
        assert (block["Action"], block["Remote-MTA"]) == ("relayed", "dns; [127.0.0.1]")
        waitEmpty(r)
    finally:
        if busy is not None:
            busy.close()


def test_a_5xx_from_the_destination_bounces_and_the_fallback_is_unused(
    relay, nexthop, dns  # noqa: F811
) -> None:
    """A 550 from the destination is final: the recipient bounces, and the route's
    fallback_relay never sees it (Postfix sends only soft-failed recipients on); the
    recipient the destination deferred (450) goes to the fallback relay."""
    primary, port = nexthop()
    fallback, fallbackPort = nexthop()
    notices, noticePort = nexthop()
    primary.rcptReply = lambda a: {"gone@example.org": "550 5.1.1 no such user",
                                   "busy@example.org": "450 4.2.1 busy"}.get(a)
    route = {**smtpRoute("example.org", port),
             "fallback_relay": [f"[127.0.0.1]:{fallbackPort}"]}
    r = relay(config(dns, queue={"min_backoff": 300, "max_backoff": 600},
                     routes=[route, smtpRoute("sender.test", noticePort)]))
    qid = submit(r, "alice@sender.test", ["gone@example.org", "busy@example.org"],
                 message("one bounces"))
    gone = waitResult(r, qid, "gone@example.org")
    busy = waitResult(r, qid, "busy@example.org")
    assert (gone["status"], gone["diagnostic"]) == (
        "bounced", "smtp; 550 5.1.1 no such user (in reply to RCPT TO command)"), gone[0]
    assert (busy["status"], busy["relay"]) == (
        "sent", f"127.0.0.1[127.0.0.1]:{fallbackPort}"), busy[0]
    assert [m.rcptTos for m in fallback.accepted] == [["busy@example.org"]]
    dsnID = bounceID(r, qid)
    waitRemoved(r, dsnID)
    (bounce,) = notices.waitTo("alice@sender.test")
    _, _, (block,), _ = parseReport(bounce.content)
    assert (block["Final-Recipient"], block["Status"]) == ("rfc822; gone@example.org", "5.1.1")
    assert unfold(block["Diagnostic-Code"]) == "smtp; 550 5.1.1 no such user"
    assert primary.accepted == []
    waitEmpty(r)


def test_the_last_fallback_relay_refusing_hello_defers_naming_it(relay, nexthop, dns) -> None:  # noqa: F811
    """The last fallback relay refusing HELO with a 5xx defers the mail (4.3.5, Postfix's
    'smtp_fallback_relay configuration problem'); the deferral's relay= names the relay
    that refused, as any other server reply's result does."""
    refusing = ScriptedServer(EHLO=b"550 5.7.1 not you\r\n", HELO=b"550 5.7.1 not you\r\n")
    try:
        route = {**smtpRoute("example.org", freePort()),
                 "fallback_relay": [f"[127.0.0.1]:{refusing.port}"]}
        r = relay(config(dns, queue={"min_backoff": 300, "max_backoff": 600}, routes=[route]))
        qid = submit(r, "alice@sender.test", ["bob@example.org"], message("refused"))
        m = waitResult(r, qid, "bob@example.org", "deferred")
        assert m["relay"] == f"127.0.0.1[127.0.0.1]:{refusing.port}", m[0]
        assert "550 5.7.1 not you" in m[0], m[0]
    finally:
        refusing.close()


def test_a_suspended_destination_the_relay_is_an_mx_of_skips_the_fallback(
    relay, nexthop, dns  # noqa: F811
) -> None:
    """A relay that is a backup MX host of the destination (mx2.two.test) hands none of its
    mail to a fallback relay, which could send it back (Postfix's i_am_mx): nor once the
    destination is suspended after its primary refused, when its hosts are not tried."""
    fallback, fallbackPort = nexthop()
    route = {"domain": "two.test", "backend": "smtp", "nexthop": f"two.test:{freePort()}",
             "fallback_relay": [f"[127.0.0.1]:{fallbackPort}"]}
    text = config(dns, queue={"min_backoff": 300, "max_backoff": 600},
                  delivery={"destination_concurrency": 1}, routes=[route])
    r = relay(text, "--hostname", "mx2.two.test")
    first = submit(r, "alice@sender.test", ["bob@two.test"], message("first"))
    waitResult(r, first, "bob@two.test", "deferred")
    second = submit(r, "alice@sender.test", ["bob@two.test"], message("second"))
    m = waitResult(r, second, "bob@two.test", "deferred")
    assert "delivery temporarily suspended" in m[0], m[0]
    r.waitForLog(rf"{second}: this relay is an MX host of two\.test:\d+, or its mail loops "
                 "back here: the fallback relays are not used")
    assert fallback.accepted == []

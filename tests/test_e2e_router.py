"""End-to-end: the real C{twistd -n mailrelay} with a site router, the example
C{examples/lmtp-domains} dropped in through C{PYTHONPATH}, in front of the routing table.

Next hops are aiosmtpd: an LMTP server on a UNIX socket for the router's domains, an SMTP
server for what the routes say (see tests/test_e2e_outbound.py, whose fixtures these are).
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from tests.test_e2e_outbound import (  # noqa: F401 (fixtures)
    bounceID,
    config,
    dns,
    message,
    nexthop,
    parseReport,
    relay,
    smtpRoute,
    submit,
    waitEmpty,
    waitRemoved,
    waitResult,
)

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "lmtp-domains"


def test_example_router_routes_before_the_table(
    relay, nexthop, dns, tmp_path: Path  # noqa: F811 (the fixtures imported above)
) -> None:
    """The router's domains go to LMTP, its REJECT bounces, its DEFER stays queued, the rest
    goes where the routes say; a reload re-reads the router's file."""
    lmtp, socket = nexthop(lmtp=True)
    smtp, port = nexthop()
    domains = tmp_path / "lmtp-domains"
    domains.write_text(
        f"lmtp.test      unix:{socket}\n"
        f".lmtp.test     unix:{socket}   # and its subdomains\n"
        "gone.test      REJECT moved away\n"
        "later.test     DEFER\n",
        encoding="utf-8",
    )
    routes = [smtpRoute("other.test", port), smtpRoute("sender.test", port)]
    # Retries every second, so that fred@later.test is retried soon after the reload.
    queue = {"min_backoff": 1, "max_backoff": 1}
    text = config(dns, queue=queue, routes=routes)
    text += f'[[routers]]\nplugin = "lmtp-domains"\nfile = "{domains}"\n'
    env = {"PYTHONPATH": os.pathsep.join([str(EXAMPLE), os.environ.get("PYTHONPATH", "")])}
    r = relay(text, env=env)

    rcpts = ["bob@lmtp.test", "carol@sub.lmtp.test", "dave@other.test", "erin@gone.test",
             "fred@later.test"]
    qid = submit(r, "alice@sender.test", rcpts, message("routed"))

    # The router's domains: one LMTP transaction for both.
    for rcpt in ("bob@lmtp.test", "carol@sub.lmtp.test"):
        m = waitResult(r, qid, rcpt)
        assert (m["status"], m["diagnostic"]) == ("sent", "smtp; 250 2.0.0 delivered"), m[0]
    (delivered,) = lmtp.waitTo("bob@lmtp.test")
    assert delivered.rcptTos == ["bob@lmtp.test", "carol@sub.lmtp.test"]
    assert b"Subject: routed\r\n" in delivered.content
    # Not the router's: the routing table's SMTP route.
    m = waitResult(r, qid, "dave@other.test")
    assert m["status"] == "sent", m[0]
    assert [m.rcptTos for m in smtp.waitTo("dave@other.test")] == [["dave@other.test"]]
    # REJECT: bounced at once with the router's status and text, the DSN says so.
    m = waitResult(r, qid, "erin@gone.test")
    assert (m["status"], m["diagnostic"]) == ("bounced", "X-mailrelay; moved away"), m[0]
    r.waitForLog(
        rf"{qid}: router lmtp-domains answered for <erin@gone\.test>: 5\.1\.2 X-mailrelay; "
        "moved away"
    )
    # Once each: the router's verdict, then the status line -- no warning of the queue's
    # repeating the router's (one line per fact, as Postfix).
    erin = [line for line in r.log().splitlines() if "<erin@gone.test>" in line]
    assert len(erin) == 2 and "status=bounced" in erin[1], erin
    dsnID = bounceID(r, qid)
    waitRemoved(r, dsnID)
    (bounce,) = smtp.waitTo("alice@sender.test")
    _, _, (block,), _ = parseReport(bounce.content)
    assert (block["Final-Recipient"], block["Action"], block["Status"]) == (
        "rfc822; erin@gone.test", "failed", "5.1.2")
    # DEFER: deferred, still queued, never delivered anywhere.
    m = waitResult(r, qid, "fred@later.test")
    assert m["status"] == "deferred", m[0]
    # The router's own status and text (not a generic "routing failed").
    assert m["diagnostic"] == "X-mailrelay; domain later.test is not accepting mail now", m[0]
    envelope = json.loads((r.spool / "queue" / f"{qid}.json").read_text())
    (fred,) = [x for x in envelope["recipients"] if x["address"] == "fred@later.test"]
    assert fred["status"] == "4.3.2", fred
    assert r.queued() == [qid]
    assert not lmtp.to("fred@later.test") and not smtp.to("fred@later.test")

    # A reload re-reads the file: later.test now goes to LMTP, at the next retry.
    domains.write_text(f"later.test unix:{socket}\n", encoding="utf-8")
    assert r.process is not None
    r.process.send_signal(signal.SIGHUP)
    r.waitForLog("configuration reloaded from")
    m = waitResult(r, qid, "fred@later.test", "sent", timeout=30)
    assert m["diagnostic"] == "smtp; 250 2.0.0 delivered", m[0]
    assert [m.rcptTos for m in lmtp.waitTo("fred@later.test")] == [["fred@later.test"]]
    waitEmpty(r)


ROUTER = '''\
from zope.interface import implementer

from mailrelay.interfaces import IRouter, Route, RouteOptions


@implementer(IRouter)
class Bound:
    def __init__(self, backend, nexthop, options):
        self.route_ = Route(backend, nexthop, RouteOptions(**options))

    def route(self, envelope, recipient):
        return self.route_


def build(options, context):
    return Bound(options["backend"], options["nexthop"], options["options"])
'''

DROPIN = '''\
from mailrelay.interfaces import IRouter
from mailrelay.plugins import MailRelayPlugin

bound = MailRelayPlugin(name="bound-lmtp", provides=IRouter, description="test router",
                        factory="bound_lmtp:build")
'''


@pytest.mark.parametrize("backend,options,problem", [
    ("lmtp", 'sourceAddress = "127.0.0.1"',
     "an lmtp route takes no sourceAddress (LMTP connections are not bound to a source "
     "address)"),
    ("maildir", 'tls = "required", username = "u", password = "p"',
     'only smtp and lmtp routes take tls, username, password, not a "maildir" route'),
])
def test_a_routers_route_with_options_its_backend_does_not_take_is_deferred(
    relay, nexthop, dns, tmp_path: Path, backend: str, options: str,  # noqa: F811 (fixtures)
    problem: str,
) -> None:
    """A router's route with options its backend does not take (which [[routes]] refuses):
    an lmtp route's source address, a maildir route's TLS and AUTH settings, defers the
    recipient with 4.3.5, logged; nothing reaches the LMTP server from another address,
    nothing is written to the mailbox as if the options meant nothing (they were silently
    ignored: found by a review)."""
    lmtp, socket = nexthop(lmtp=True)
    mailbox = tmp_path / "mail" / "bob"
    mailbox.mkdir(parents=True)  # (the user exists: a maildir route would deliver)
    target = f"unix:{socket}" if backend == "lmtp" else f"{mailbox.parent}/{{local}}/Maildir"
    site = tmp_path / "site"
    (site / "twisted" / "plugins").mkdir(parents=True)
    (site / "bound_lmtp.py").write_text(ROUTER)
    (site / "twisted" / "plugins" / "bound_lmtp_plugin.py").write_text(DROPIN)
    text = config(dns) + (f'[[routers]]\nplugin = "bound-lmtp"\nbackend = "{backend}"\n'
                          f'nexthop = "{target}"\noptions = {{ {options} }}\n')
    r = relay(text, env={"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH",
                                                                                 "")])})
    qid = submit(r, "alice@sender.test", ["bob@lmtp.test"], message("bound"))
    m = waitResult(r, qid, "bob@lmtp.test")
    assert (m["status"], m["diagnostic"]) == (
        "deferred", f"X-mailrelay; unusable options for the route to {target}: {problem}"), m[0]
    r.waitForLog(rf"{qid}: unusable options for the route to \S+: {re.escape(problem)} for 1 "
                 r"recipient\(s\); deferring")
    # Kept queued with its status (the envelope is written just after the result's line).
    deadline = time.monotonic() + 10
    while True:
        envelope = json.loads((r.spool / "queue" / f"{qid}.json").read_text())
        statuses = [x["status"] for x in envelope["recipients"]]
        if statuses == ["4.3.5"] or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert statuses == ["4.3.5"], envelope
    assert not lmtp.to("bob@lmtp.test")
    assert list(mailbox.iterdir()) == []

"""The RCPT-time check of the maildir routes' users (L{MaildirUsers}) and where the relay
asks it (L{RecipientPolicy}, L{mailrelay.app.listeners.makeRecipientPolicy})."""

from __future__ import annotations

import os
from collections.abc import Sequence
from ipaddress import ip_network
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from zope.interface import directlyProvides

from mailrelay.address import Mailbox
from mailrelay.app.listeners import makeRecipientPolicy
from mailrelay.config import loadConfig
from mailrelay.config.plugins import HookPlugins
from mailrelay.delivery.maildir import MaildirUsers, needsUsers
from mailrelay.envelope import ClientInfo, Envelope, Recipient
from mailrelay.interfaces import CONTINUE, IRecipientValidator, Verdict, VerdictKind
from mailrelay.policy.chain import RecipientPolicy, RelayControl
from mailrelay.policy.runner import ConfiguredPlugin
from mailrelay.route import RouteRule, RoutingTable


def syncThread(f: Any, *args: Any) -> defer.Deferred:
    return defer.maybeDeferred(f, *args)


def answer(d: defer.Deferred | None) -> Any:
    assert d is not None
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "no answer yet"
    return box[0]


def users(tmp_path: Path, *rules: RouteRule, **kw: Any) -> MaildirUsers:
    table = RoutingTable(rules, smarthost="[smarthost.test]")
    return MaildirUsers(table, Clock(), **({"deferToThread": syncThread} | kw))


def boxes(tmp_path: Path) -> RouteRule:
    return RouteRule("maildir.test", "maildir", str(tmp_path / "{domain}" / "{local}" / "Maildir"))


def test_known_and_unknown_users(tmp_path: Path) -> None:
    """A user whose directory exists continues; one without is refused 550 5.1.1; an
    address that cannot name a directory 550 5.1.3; nothing is created."""
    (tmp_path / "maildir.test" / "bob").mkdir(parents=True)
    check = users(tmp_path, boxes(tmp_path)).check
    assert answer(check(Recipient("Bob@maildir.test"))) is CONTINUE
    refused = answer(check(Recipient("erin@maildir.test")))
    assert refused.kind is VerdictKind.REJECT
    assert (refused.reply.code, refused.reply.enhanced) == (550, "5.1.1")
    unsafe = answer(check(Recipient('"../x"@maildir.test')))
    assert (unsafe.kind, unsafe.reply.code, unsafe.reply.enhanced) == (
        VerdictKind.REJECT, 550, "5.1.3")
    assert "starts with '.'" in unsafe.reply.text
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["bob", "maildir.test"]


def test_an_extension_is_its_users(tmp_path: Path) -> None:
    """With recipient delimiters, bob+lists is known when bob is (and checked as bob)."""
    (tmp_path / "maildir.test" / "bob").mkdir(parents=True)
    check = users(tmp_path, boxes(tmp_path), delimiters="+-").check
    assert answer(check(Recipient("bob+lists@maildir.test"))) is CONTINUE
    assert answer(check(Recipient("bob-x@maildir.test"))) is CONTINUE
    assert answer(check(Recipient("carol+lists@maildir.test"))).reply.enhanced == "5.1.1"
    plain = users(tmp_path, boxes(tmp_path)).check
    assert answer(plain(Recipient("bob+lists@maildir.test"))).reply.enhanced == "5.1.1"
    # The whole local part first (found by a bug hunt: owner-list was refused, its
    # directory there): a user with a delimiter in its name is known.
    (tmp_path / "maildir.test" / "owner-list").mkdir()
    (tmp_path / "maildir.test" / "carol-ann").mkdir()
    assert answer(check(Recipient("owner-list@maildir.test"))) is CONTINUE
    assert answer(check(Recipient("carol-ann@maildir.test"))) is CONTINUE


def test_a_file_is_not_a_user(tmp_path: Path) -> None:
    """As at delivery: a user is a directory."""
    (tmp_path / "maildir.test").mkdir()
    (tmp_path / "maildir.test" / "bob").write_text("")
    refused = answer(users(tmp_path, boxes(tmp_path)).check(Recipient("bob@maildir.test")))
    assert refused.reply.enhanced == "5.1.1"


def test_other_routes_are_not_looked_at(tmp_path: Path) -> None:
    """Recipients routed by SMTP (a route, the smarthost), to a maildir template naming no
    user (one mailbox, created when missing), or with no route at all: not the check's
    business (None: the policy's verdict stands)."""
    check = users(
        tmp_path,
        boxes(tmp_path),
        RouteRule("one.test", "maildir", str(tmp_path / "{domain}" / "Maildir")),
        RouteRule("lmtp.test", "lmtp", "unix:/run/lmtp"),
    ).check
    for address in ("a@one.test", "a@lmtp.test", "a@elsewhere.test"):
        assert check(Recipient(address)) is None, address
    noSmarthost = MaildirUsers(RoutingTable([boxes(tmp_path)]), Clock(), syncThread)
    assert noSmarthost.check(Recipient("postmaster")) is None  # no domain, no route


def test_lookup_failure_defers(tmp_path: Path) -> None:
    """A directory that cannot be looked up (a symbolic link loop here; a directory the relay
    may not search, an I/O error) defers the recipient, logged with the error: not an
    unknown user."""
    (tmp_path / "maildir.test").mkdir()
    os.symlink(tmp_path / "maildir.test" / "bob", tmp_path / "maildir.test" / "bob")
    with capturedLogs() as events:
        deferred = answer(users(tmp_path, boxes(tmp_path)).check(Recipient("bob@maildir.test")))
    assert (deferred.kind, deferred.reply.code, deferred.reply.enhanced) == (
        VerdictKind.DEFER, 451, "4.3.0")
    (line,) = [formatEvent(e) for e in events]
    assert line.startswith(f"cannot look up the mailbox of bob@maildir.test "
                           f"({tmp_path}/maildir.test/bob): [Errno 40] Too many levels")
    assert line.endswith("; deferring")


def test_a_lookup_that_hangs_defers(tmp_path: Path) -> None:
    """A lookup that does not come back (a hung network file system) defers the recipient
    after the timeout."""
    clock = Clock()
    table = RoutingTable([boxes(tmp_path)])
    hung = MaildirUsers(table, clock, lambda f, *a: defer.Deferred(), timeout=5)
    d = hung.check(Recipient("bob@maildir.test"))
    box: list[Any] = []
    assert d is not None
    d.addBoth(box.append)
    clock.advance(4.9)
    assert box == []
    with capturedLogs() as events:
        clock.advance(0.2)
    assert box[0].kind is VerdictKind.DEFER
    assert "no answer within 5s; deferring" in formatEvent(events[0])


def test_a_burst_of_lookups_is_not_a_hung_file_system(tmp_path: Path) -> None:
    """Ten sessions' RCPTs read in one reactor turn queue ten lookups before a thread runs
    one: that is load, not a hang -- none of them may be deferred for it (the bug hunt saw
    smtp-source -s 10 get 451 for a user that exists)."""
    clock = Clock()
    queued: list[defer.Deferred] = []

    def pool(f: Any, *args: Any) -> defer.Deferred:
        queued.append(defer.Deferred())
        return queued[-1]

    checker = MaildirUsers(RoutingTable([boxes(tmp_path)]), clock, pool, timeout=5, inFlight=2)
    answers = [checker.check(Recipient(f"u{n}@maildir.test")) for n in range(10)]
    assert len(queued) == 10
    for d in queued:
        d.callback(True)
    assert [answer(d) for d in answers] == [CONTINUE] * 10


def test_lookups_hanging_are_bounded(tmp_path: Path) -> None:
    """A hung file system holds a thread per lookup, timed out or not: once the bound of
    lookups has been running for a while (HUNG_AFTER), further recipients are deferred at
    once (the thread pool also checks passwords), until a lookup comes back."""
    from mailrelay.delivery.maildir import HUNG_AFTER

    clock = Clock()
    hung: list[defer.Deferred] = []

    def hang(f: Any, *args: Any) -> defer.Deferred:
        hung.append(defer.Deferred())
        return hung[-1]

    checker = MaildirUsers(RoutingTable([boxes(tmp_path)]), clock, hang, timeout=30, inFlight=2)
    first = checker.check(Recipient("a@maildir.test"))
    checker.check(Recipient("b@maildir.test"))
    checker.check(Recipient("c@maildir.test"))  # (young: not hung yet, asked too)
    assert len(hung) == 3
    clock.advance(HUNG_AFTER)
    with capturedLogs() as events:
        refused = answer(checker.check(Recipient("d@maildir.test")))
    assert refused.kind is VerdictKind.DEFER and len(hung) == 3
    assert ("3 lookups have been running for 5s or more (a hung file system?); deferring"
            in formatEvent(events[0]))
    clock.advance(30)
    assert answer(first).kind is VerdictKind.DEFER  # timed out ...
    assert checker.inFlight == 3  # ... but its thread still hangs
    for d in hung[:2]:
        d.callback(True)  # (too late for a@ and b@: their answers were given)
    assert checker.inFlight == 1
    checker.check(Recipient("e@maildir.test"))
    assert len(hung) == 4


def test_postmaster_is_always_accepted(tmp_path: Path) -> None:
    """RFC 5321 4.5.1: postmaster is accepted even where it has no mailbox (delivery then
    bounces it to the sender, as before)."""
    check = users(tmp_path, boxes(tmp_path), RouteRule("*", "maildir", str(tmp_path / "{local}"))).check
    for address in ("postmaster@maildir.test", "PostMaster@maildir.test", "postmaster"):
        assert check(Recipient(address)) is None, address
    assert answer(check(Recipient("postmistress@maildir.test"))).reply.enhanced == "5.1.1"


def test_a_name_too_long_for_the_file_system_is_unknown(tmp_path: Path) -> None:
    """No user can have a directory whose name the file system cannot hold (ENAMETOOLONG):
    unknown (5.1.1), not a lookup failure deferred forever."""
    check = users(tmp_path, RouteRule("maildir.test", "maildir", str(tmp_path / "{address}"))).check
    address = "l" * 64 + "@maildir.test"
    assert len(address.encode()) <= 255  # (fits; the one below does not)
    long = "l" * 64 + "@" + ".".join(["d" * 63] * 3) + ".maildir.test"
    table = RoutingTable([RouteRule(".maildir.test", "maildir", str(tmp_path / "{address}"))])
    refused = answer(MaildirUsers(table, Clock(), syncThread).check(Recipient(long)))
    assert (refused.kind, refused.reply.enhanced) == (VerdictKind.REJECT, "5.1.1")
    assert answer(check(Recipient(address))).reply.enhanced == "5.1.1"


def test_lookups_run_in_the_reactors_thread_pool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a deferToThread, the lookups go to the reactor's thread pool."""
    pool = object()
    ran: list[Any] = []

    class Reactor(Clock):
        def getThreadPool(self) -> Any:
            return pool

    def fake(r: Any, p: Any, f: Any, *args: Any) -> defer.Deferred:
        ran.append((r, p, f.__name__, args))
        return defer.succeed(True)

    from twisted.internet import threads

    monkeypatch.setattr(threads, "deferToThreadPool", fake)
    reactor = Reactor()
    checker = MaildirUsers(RoutingTable([boxes(tmp_path)]), reactor)
    assert answer(checker.check(Recipient("bob@maildir.test"))) is CONTINUE
    assert ran == [(reactor, pool, "_anyUser", ([str(tmp_path / "maildir.test" / "bob")],))]


@pytest.mark.parametrize(
    "rules, create, wanted",
    [
        ([RouteRule("a.test", "maildir", "/m/{domain}/{local}/Maildir")], False, True),
        ([RouteRule("a.test", "maildir", "/m/{address}")], False, True),
        ([RouteRule("a.test", "maildir", "/m/{local}")], True, False),
        ([RouteRule("a.test", "maildir", "/m/{domain}/Maildir")], False, False),
        ([RouteRule("a.test", "lmtp", "unix:/run/lmtp")], False, False),
        ([], False, False),
    ],
)
def test_needsUsers(rules: list[RouteRule], create: bool, wanted: bool) -> None:
    assert needsUsers(rules, create) is wanted


# ---------------------------------------------------------------------------------------------
# In the recipient policy


class FakeMailboxes:
    def __init__(self, verdict: Verdict | None) -> None:
        self.verdict = verdict
        self.asked: list[str] = []

    def check(self, recipient: Recipient) -> defer.Deferred | None:
        self.asked.append(recipient.address)
        return None if self.verdict is None else defer.succeed(self.verdict)


class Validator:
    def __init__(self, verdict: Verdict) -> None:
        self.verdict = verdict

    def validateRecipient(self, client: Any, envelope: Any, recipient: Any) -> Verdict:
        return self.verdict


UNKNOWN = Verdict.reject("Error: user unknown (no mailbox here)", 550, "5.1.1")


def policyCheck(mailboxes: Any, validators: Sequence[Verdict] = (),
                address: str = "bob@ours.test", client: str = "192.0.2.7") -> Verdict:
    configured = []
    for i, verdict in enumerate(validators):
        v = Validator(verdict)
        directlyProvides(v, IRecipientValidator)
        configured.append(ConfiguredPlugin(f"v{i}", v, 30))
    relay = RelayControl([ip_network("127.0.0.0/8")], ["ours.test"], "relay.test")
    policy = RecipientPolicy(relay, configured, Clock(), mailboxes=mailboxes)
    local, _, domain = address.partition("@")
    info = ClientInfo(address=client)
    info.relayAllowed = relay.isRelayClient(client)
    return answer(policy.check(info, Envelope(sender="a@b.test"), Recipient(address),
                               Mailbox(local, domain)))


def test_policy_asks_the_mailboxes_last() -> None:
    """After relay control and the validators (whether they continued or accepted); its
    refusal is the answer, its CONTINUE leaves theirs."""
    ACCEPT = Verdict(VerdictKind.ACCEPT)
    for validators in ([], [CONTINUE], [ACCEPT]):
        assert policyCheck(FakeMailboxes(UNKNOWN), validators) is UNKNOWN
        expected = validators[0] if validators else CONTINUE
        assert policyCheck(FakeMailboxes(CONTINUE), validators) is expected
        assert policyCheck(FakeMailboxes(None), validators) is expected


def test_policy_does_not_ask_about_refused_recipients() -> None:
    """Relay control's or a validator's refusal stands, the mailboxes are not asked."""
    mailboxes = FakeMailboxes(UNKNOWN)
    denied = policyCheck(mailboxes, address="bob@elsewhere.test")
    assert denied.reply.code == 554  # relay access denied
    refused = Verdict.reject("no", 550, "5.7.1")
    assert policyCheck(mailboxes, [refused]) is refused
    assert mailboxes.asked == []


# ---------------------------------------------------------------------------------------------
# Composed from the configuration


CONFIG = """
hostname = "relay.test"
[relay]
accept_domains = ["maildir.test"]
[[routes]]
domain = "maildir.test"
backend = "maildir"
nexthop = "{root}/{{domain}}/{{local}}/Maildir"
"""


def policyOf(tmp_path: Path, extra: str = "") -> RecipientPolicy:
    path = tmp_path / "mailrelay.toml"
    path.write_text(CONFIG.format(root=tmp_path) + extra)
    return makeRecipientPolicy(loadConfig(str(path)), Clock(), HookPlugins())


def test_the_relay_checks_its_maildir_users(tmp_path: Path) -> None:
    assert isinstance(policyOf(tmp_path).mailboxes, MaildirUsers)
    policy = policyOf(tmp_path, '[delivery]\nrecipient_delimiter = "+"\n')
    assert policy.mailboxes.delimiters == "+"


def test_not_with_create_mailboxes(tmp_path: Path) -> None:
    assert policyOf(tmp_path, "[delivery]\ncreate_mailboxes = true\n").mailboxes is None


def test_not_with_routers(tmp_path: Path) -> None:
    """A router may send any recipient elsewhere: the table alone cannot say who is
    unknown, so the users are checked at delivery only, and the log says so."""
    with capturedLogs() as events:
        policy = policyOf(tmp_path, '[[routers]]\nplugin = "lmtp-domains"\nfile = "x"\n')
    assert policy.mailboxes is None
    assert any("maildir users are checked at delivery only" in formatEvent(e) for e in events)

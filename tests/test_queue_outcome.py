"""Tests for L{mailrelay.queue.outcome}: the pure decision of what an attempt means.

Property tests (hypothesis) over random envelopes, results, policies and times check that
L{decide} changes nothing and follows the rules; a few examples pin the details.
"""

from __future__ import annotations

import ast
import copy
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from mailrelay.envelope import BOUNCED, DELIVERED, PENDING, ClientInfo, Envelope, Recipient
from mailrelay.interfaces import DeliveryStatus, RecipientResult
from mailrelay.queue import outcome as outcomeModule
from mailrelay.queue import policy as policyModule
from mailrelay.queue.dsn import DSN_SOURCE
from mailrelay.queue.outcome import (
    POSTMASTER_SOURCE,
    Decision,
    Outcome,
    apply,
    decide,
    isPostmasterNotice,
    wants,
)
from mailrelay.queue.policy import QueuePolicy, backoff

POSTMASTER = "postmaster@relay.test"
CODES = {
    DeliveryStatus.DELIVERED: "2.0.0",
    DeliveryStatus.TRANSIENT: "4.2.0",
    DeliveryStatus.PERMANENT: "5.1.1",
}

notifies = st.one_of(
    st.none(),
    st.just(("NEVER",)),
    st.lists(st.sampled_from(["SUCCESS", "FAILURE", "DELAY", "success"]), min_size=1,
             max_size=3, unique=True).map(tuple),
)
times = st.floats(min_value=0, max_value=40 * 86400, allow_nan=False)
lifetimes = st.one_of(st.sampled_from([0.0, 3600.0, 5 * 86400.0, 50 * 86400.0]), times)


@st.composite
def scenarios(draw: Any) -> tuple[Envelope, list[Outcome], QueuePolicy, float]:
    count = draw(st.integers(1, 5))
    recipients = [
        Recipient(
            f"r{i}@example.org",
            f"r{i}@example.org",
            notify=draw(notifies),
            state=draw(st.sampled_from([PENDING, PENDING, DELIVERED, BOUNCED])),
            attempts=draw(st.integers(0, 30)),
            finalTime=draw(st.one_of(st.none(), times)),
        )
        for i in range(count)
    ]
    recipients[0].state = PENDING
    sender = draw(st.sampled_from(["", "sender@example.org"]))
    isBounce = not sender and draw(st.booleans())
    listener = POSTMASTER_SOURCE if isBounce and draw(st.booleans()) else DSN_SOURCE
    if isBounce and draw(st.booleans()):
        for r in recipients:  # a bounce to the postmaster itself
            r.address = r.original = POSTMASTER
    start = 1_700_000_000.0
    arrival = draw(st.one_of(st.none(), st.just(start)))
    now = start + draw(times)
    minBackoff = draw(st.floats(1, 3600))
    policy = QueuePolicy(
        minBackoff=minBackoff,
        maxBackoff=minBackoff * draw(st.floats(1, 100)),
        maxLifetime=draw(lifetimes),
        bounceLifetime=draw(lifetimes),
        delayWarning=draw(st.sampled_from([0.0, 1.0, 4 * 3600.0, 10 * 86400.0])),
        postmaster=draw(st.sampled_from([None, POSTMASTER])),
    )
    envelope = Envelope(
        sender=sender,
        recipients=recipients,
        queueID="01K1H5WXVST20000479F",
        client=ClientInfo("127.0.0.1", listener=listener),
        arrival=arrival,
        attempts=draw(st.integers(0, 100)),
        delayWarned=draw(st.booleans()),
        isBounce=isBounce,
    )
    outcomes = []
    for r in envelope.pendingRecipients:
        status = draw(st.sampled_from(list(DeliveryStatus)))
        result = RecipientResult(
            r.address,
            status,
            CODES[status],
            f"smtp; {CODES[status]} said",
            draw(st.sampled_from([None, "dns; mx.example.org"])),
            dsnRelayed=status is DeliveryStatus.DELIVERED and draw(st.booleans()),
            final=status is DeliveryStatus.DELIVERED and draw(st.booleans()),
        )
        outcomes.append(Outcome(r, result, "smtp:example.org"))
    return envelope, outcomes, policy, now


@settings(max_examples=100, deadline=None)
@given(scenarios())
def test_decideChangesNothingAndIsRepeatable(scenario: Any) -> None:
    envelope, outcomes, policy, now = scenario
    before = copy.deepcopy(envelope)
    first = decide(envelope, outcomes, policy, now)
    assert envelope == before
    assert all(o.recipient is r for o, r in zip(outcomes, envelope.pendingRecipients, strict=True))
    assert decide(envelope, outcomes, policy, now) == first


@settings(max_examples=100, deadline=None)
@given(scenarios())
def test_transitionsFollowTheResults(scenario: Any) -> None:
    envelope, outcomes, policy, now = scenario
    decision = decide(envelope, outcomes, policy, now)
    arrival = envelope.arrival if envelope.arrival is not None else now
    # Mail from the null sender, ours or relayed, lives bounceLifetime, at most maxLifetime.
    lifetime = policy.maxLifetime if envelope.sender else min(policy.bounceLifetime,
                                                              policy.maxLifetime)
    expired = now - arrival >= lifetime
    assert decision.delay == now - arrival
    assert decision.attempts == envelope.attempts + 1
    assert len(decision.transitions) == len(outcomes)
    for t, o in zip(decision.transitions, outcomes, strict=True):
        r, result = o.recipient, o.result
        assert t.recipient is r and t.relay == o.relay and t.attempts == r.attempts + 1
        assert (t.lastResult, t.remoteMTA) == (result.diagnostic, result.remoteMTA)
        if result.status is DeliveryStatus.DELIVERED:
            assert (t.state, t.status, t.finalTime, t.logStatus) == (
                DELIVERED, result.code, now, "sent")
        elif result.status is DeliveryStatus.PERMANENT:
            assert (t.state, t.status, t.finalTime, t.logStatus) == (
                BOUNCED, result.code, now, "bounced")
        elif expired:
            assert (t.state, t.status, t.finalTime, t.logStatus) == (
                BOUNCED, result.code, now, "bounced")
            assert t.logDiagnostic.startswith("message expired after ")
            assert t.logDiagnostic.endswith("; last error: " + result.diagnostic)
        else:
            assert (t.state, t.status, t.finalTime, t.logStatus) == (
                PENDING, result.code, r.finalTime, "deferred")
    # The message's age, clamped (Postfix's qmgr), whatever the number of attempts.
    assert decision.nextAttempt == now + backoff(policy, now - arrival)
    assert decision.nextAttempt == now + min(policy.maxBackoff,
                                             max(policy.minBackoff, now - arrival))
    assert now + policy.minBackoff <= decision.nextAttempt <= now + policy.maxBackoff


def _after(envelope: Envelope, decision: Decision) -> dict[int, str]:
    states = {id(r): r.state for r in envelope.recipients}
    states.update({id(t.recipient): t.state for t in decision.transitions})
    return states


@settings(max_examples=250, deadline=None)
@given(scenarios())
def test_noticesFollowNotifyAndTheNullSenderRules(scenario: Any) -> None:
    envelope, outcomes, policy, now = scenario
    decision = decide(envelope, outcomes, policy, now)
    states = _after(envelope, decision)
    bounced = [t.recipient for t in decision.transitions if t.state == BOUNCED]
    pendingAfter = [r for r in envelope.recipients if states[id(r)] == PENDING]
    arrival = envelope.arrival if envelope.arrival is not None else now
    warnNow = (policy.delayWarning > 0 and not envelope.delayWarned and bool(pendingAfter)
               and now - arrival >= policy.delayWarning)
    assert decision.delayWarned == (envelope.delayWarned or warnNow)
    byAction = {n.action: n for n in decision.notices}
    assert len(byAction) == len(decision.notices)  # at most one of each
    if envelope.sender:
        assert decision.discarded is None
        assert all(n.to == envelope.sender and not n.postmaster for n in decision.notices)
        expected = {
            "failed": [r for r in bounced if wants(r, "FAILURE")],
            "delayed": [r for r in pendingAfter if wants(r, "DELAY")] if warnNow else [],
            # Delivered to the mailbox (final) or relayed where no notice will come from.
            **{
                action: [
                    o.recipient for o in outcomes
                    if o.result.status is DeliveryStatus.DELIVERED and not o.result.dsnRelayed
                    and wants(o.recipient, "SUCCESS") and o.result.final == (action == "delivered")
                ]
                for action in ("delivered", "relayed")
            },
        }
        for action, recipients in expected.items():
            got = list(byAction[action].recipients) if action in byAction else []
            assert [r.address for r in got] == [r.address for r in recipients]
            assert all(any(g is r for r in recipients) for g in got)
        assert [n.action for n in decision.notices] == [
            a for a in ("failed", "delayed", "delivered", "relayed") if expected[a]]
        return
    # The null sender: nobody but the postmaster is ever told, and only of failures; a
    # failed notice to the postmaster is told to nobody.
    neverAgain = isPostmasterNotice(envelope) or (
        policy.postmaster is not None
        and envelope.isBounce
        and all(r.address == policy.postmaster for r in envelope.recipients)
    )
    if not bounced:
        assert decision.notices == () and decision.discarded is None
    elif policy.postmaster is not None and not neverAgain:
        (notice,) = decision.notices
        assert (notice.action, notice.to, notice.postmaster) == ("failed", POSTMASTER, True)
        assert list(notice.recipients) == bounced
        assert decision.discarded is None
    else:
        assert decision.notices == ()
        assert decision.discarded is not None
        assert decision.discarded.addresses == tuple(r.address for r in bounced)
        expected = "postmaster notification" if neverAgain else "bounce"
        assert decision.discarded.what == expected


@settings(max_examples=100, deadline=None)
@given(scenarios())
def test_applyWritesTheDecision(scenario: Any) -> None:
    envelope, outcomes, policy, now = scenario
    decision = decide(envelope, outcomes, policy, now)
    tried = {id(t.recipient) for t in decision.transitions}
    others = [(r, copy.deepcopy(r)) for r in envelope.recipients if id(r) not in tried]
    apply(envelope, decision)
    assert (envelope.attempts, envelope.delayWarned) == (decision.attempts, decision.delayWarned)
    for t in decision.transitions:
        r = t.recipient
        assert (r.state, r.status, r.lastResult, r.remoteMTA, r.finalTime, r.attempts) == (
            t.state, t.status, t.lastResult, t.remoteMTA, t.finalTime, t.attempts)
    assert all(r == before for r, before in others)  # recipients not tried are left alone


def test_expiryExample() -> None:
    r = Recipient("a@example.org", "a@example.org")
    envelope = Envelope("s@example.org", [r], arrival=1000.0)
    result = RecipientResult("a@example.org", DeliveryStatus.TRANSIENT, "4.2.0", "smtp; 451 busy")
    policy = QueuePolicy(maxLifetime=3600, minBackoff=300, maxBackoff=4000)
    decision = decide(envelope, [Outcome(r, result, "mx.example.org")], policy, 1000.0 + 3601)
    (t,) = decision.transitions
    assert (t.state, t.status, t.logStatus) == (BOUNCED, "4.2.0", "bounced")
    assert t.logDiagnostic == "message expired after 3601s in the queue; last error: smtp; 451 busy"
    (notice,) = decision.notices
    assert (notice.action, notice.to, notice.recipients) == ("failed", "s@example.org", (r,))
    assert decision.nextAttempt == 1000.0 + 3601 + 3601 and decision.attempts == 1
    assert r.state == PENDING  # decided, not applied


def test_mail_from_the_null_sender_expires_at_the_bounce_lifetime() -> None:
    """Every message from the null sender, not only the relay's own bounces, is given up
    after bounceLifetime, as Postfix applies bounce_queue_lifetime to every message with an
    empty sender; a bounceLifetime above maxLifetime counts as maxLifetime (as Postfix's
    qmgr adjusts it)."""
    busy = RecipientResult("a@example.org", DeliveryStatus.TRANSIENT, "4.2.0", "smtp; 451 busy")

    def state(sender: str, policy: QueuePolicy, age: float, isBounce: bool = False) -> str:
        r = Recipient("a@example.org", "a@example.org")
        envelope = Envelope(sender, [r], arrival=1000.0, isBounce=isBounce,
                            client=ClientInfo("192.0.2.1", listener="tcp:25"))
        (t,) = decide(envelope, [Outcome(r, busy, "mx")], policy, 1000.0 + age).transitions
        return f"{t.state} {t.status}"

    policy = QueuePolicy(maxLifetime=86400, bounceLifetime=3600)
    for isBounce in (False, True):  # relayed from a client, or ours
        assert state("", policy, 3599, isBounce) == "pending 4.2.0"
        assert state("", policy, 3600, isBounce) == "bounced 4.2.0"
    assert state("s@example.org", policy, 3600) == "pending 4.2.0"
    assert state("s@example.org", policy, 86400) == "bounced 4.2.0"
    larger = QueuePolicy(maxLifetime=3600, bounceLifetime=86400)
    assert (larger.lifetime(""), larger.lifetime("s@example.org")) == (3600, 3600)
    assert policy.lifetime("") == 3600 and policy.lifetime("s@example.org") == 86400
    assert state("", larger, 3600) == "bounced 4.2.0"


def test_delayWarningOnce() -> None:
    """One delay warning, for the recipients still pending that want it, once the delay is
    reached; never again once sent."""
    a = Recipient("a@example.org", "a@example.org")
    b = Recipient("b@example.org", "b@example.org", notify=("FAILURE",))
    c = Recipient("c@example.org", "c@example.org")
    envelope = Envelope("s@example.org", [a, b, c], arrival=0.0)
    policy = QueuePolicy(delayWarning=3600)
    later = RecipientResult("x", DeliveryStatus.TRANSIENT, "4.2.0", "smtp; 451 later")
    done = RecipientResult("c@example.org", DeliveryStatus.DELIVERED, "2.0.0", "smtp; 250 ok")

    def outcomes() -> list[Outcome]:
        return [
            Outcome(a, RecipientResult(a.address, later.status, later.code, later.diagnostic), ""),
            Outcome(b, RecipientResult(b.address, later.status, later.code, later.diagnostic), ""),
            Outcome(c, done, ""),
        ]

    assert decide(envelope, outcomes(), policy, 3599).notices == ()
    decision = decide(envelope, outcomes(), policy, 3600)
    assert decision.delayWarned
    assert [(n.action, n.recipients) for n in decision.notices] == [("delayed", (a,))]
    envelope.delayWarned = True
    again = decide(envelope, outcomes(), policy, 7200)
    assert again.notices == () and again.delayWarned


def test_decideDoesNoIO() -> None:
    """The outcome module and the policy it reads import nothing that could do I/O (no
    Twisted, no os, no spool, no notification builder): only values."""
    allowed = {"__future__", "collections.abc", "dataclasses", "mailrelay.envelope",
               "mailrelay.interfaces", "mailrelay.queue.policy"}
    for module in (outcomeModule, policyModule):
        tree = ast.parse(Path(str(module.__file__)).read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        imported |= {a.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                     for a in node.names}
        assert imported <= allowed, imported - allowed


def test_the_log_says_which_command_a_reply_answered() -> None:
    """Postfix's "(in reply to RCPT TO command)" after a server's refusal in the log line
    (not after a success, as Postfix); the recorded result (the DSN's Diagnostic-Code) stays
    the reply alone."""
    r = Recipient("a@example.org", "a@example.org")
    envelope = Envelope("s@example.org", [r], arrival=1000.0)
    result = RecipientResult("a@example.org", DeliveryStatus.PERMANENT, "5.1.1",
                             "smtp; 550 5.1.1 no such user", command="RCPT TO")
    policy = QueuePolicy(maxLifetime=3600, minBackoff=300, maxBackoff=4000)
    (t,) = decide(envelope, [Outcome(r, result, "mx.example.org")], policy, 1100.0).transitions
    assert t.logDiagnostic == "smtp; 550 5.1.1 no such user (in reply to RCPT TO command)"
    assert t.lastResult == "smtp; 550 5.1.1 no such user"
    late = RecipientResult("a@example.org", DeliveryStatus.TRANSIENT, "4.2.0", "smtp; 451 busy",
                           command="end of DATA")
    (t,) = decide(envelope, [Outcome(r, late, "mx")], policy, 1000.0 + 3601).transitions
    assert t.logDiagnostic == ("message expired after 3601s in the queue; last error: "
                               "smtp; 451 busy (in reply to end of DATA command)")
    sent = RecipientResult("a@example.org", DeliveryStatus.DELIVERED, "2.0.0", "smtp; 250 ok",
                           command="end of DATA")
    (t,) = decide(envelope, [Outcome(r, sent, "mx")], policy, 1100.0).transitions
    assert t.logDiagnostic == "smtp; 250 ok"


def test_a_reason_beside_the_diagnostic_is_recorded_and_logged() -> None:
    """A result whose reason is not what its diagnostic says (a suspended next hop's
    deferral: the failure's reply, and "delivery temporarily suspended: host H said: ...",
    as Postfix's qmgr keeps its saved DSN's dtext beside the reason it prepends to) keeps
    both: the diagnostic for the DSN's Diagnostic-Code, the reason for the log and the
    notice's text; the next result without one forgets it."""
    r = Recipient("a@example.org", "a@example.org")
    envelope = Envelope("s@example.org", [r], arrival=1000.0)
    reason = "delivery temporarily suspended: host mx.example.org said: 421 4.3.2 busy"
    suspended = RecipientResult("a@example.org", DeliveryStatus.TRANSIENT, "4.3.2",
                                "smtp; 421 4.3.2 busy", "dns; mx.example.org",
                                command="EHLO", reason=reason)
    policy = QueuePolicy(maxLifetime=3600, minBackoff=300, maxBackoff=4000)
    decision = decide(envelope, [Outcome(r, suspended, "mx.example.org")], policy, 1100.0)
    (t,) = decision.transitions
    assert (t.lastResult, t.reason, t.remoteMTA) == (
        "smtp; 421 4.3.2 busy", reason, "dns; mx.example.org")
    assert t.logDiagnostic == f"{reason} (in reply to EHLO command)"
    apply(envelope, decision)
    assert (r.lastResult, r.reason) == ("smtp; 421 4.3.2 busy", reason)
    (t,) = decide(envelope, [Outcome(r, suspended, "mx")], policy, 1000.0 + 3601).transitions
    assert t.logDiagnostic == ("message expired after 3601s in the queue; last error: "
                               f"{reason} (in reply to EHLO command)")
    later = RecipientResult("a@example.org", DeliveryStatus.TRANSIENT, "4.2.0", "smtp; 451 x")
    apply(envelope, decide(envelope, [Outcome(r, later, "mx")], policy, 1200.0))
    assert (r.lastResult, r.reason) == ("smtp; 451 x", None)


def test_the_command_a_refusal_answered_is_recorded_with_the_recipient() -> None:
    """The command whose reply refused or deferred a recipient (C{RCPT TO}, C{end of DATA})
    is recorded beside its last result, for the notice's text (Postfix's "(in reply to %s
    command)", smtp_trouble.c); the diagnostic itself (the DSN's Diagnostic-Code) is the
    reply alone.  A delivery, or a result that is no server's reply, records none."""
    policy = QueuePolicy(maxLifetime=3600, minBackoff=300, maxBackoff=4000)
    for status, code, command, recorded in [
        (DeliveryStatus.PERMANENT, "5.1.1", "RCPT TO", "RCPT TO"),
        (DeliveryStatus.TRANSIENT, "4.3.0", "end of DATA", "end of DATA"),
        (DeliveryStatus.DELIVERED, "2.0.0", "end of DATA", None),
        (DeliveryStatus.TRANSIENT, "4.4.1", None, None),
    ]:
        r = Recipient("a@example.org", "a@example.org", command="MAIL FROM")
        envelope = Envelope("s@example.org", [r], arrival=1000.0)
        result = RecipientResult("a@example.org", status, code, f"smtp; {code[0]}50 {code} x",
                                 command=command)
        apply(envelope, decide(envelope, [Outcome(r, result, "mx")], policy, 1001.0))
        assert (r.lastResult, r.command) == (f"smtp; {code[0]}50 {code} x", recorded)

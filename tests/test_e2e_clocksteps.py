"""End to end: the system clock stepped while the relay runs (NTP correcting a wrong clock, a
virtual machine resumed, C{date -s}).  The relay runs under libfaketime (Debian's
C{faketime}), whose offset a file sets while it runs; the monotonic clock is left alone, as
a real step leaves it."""

from __future__ import annotations

import glob
import os
import smtplib
import time
from pathlib import Path
from typing import Any

import pytest

from tests.harness import RelayProcess, freePort
from tests.test_e2e_outbound import (
    config,
    dns,  # noqa: F401 - the module's DNS server fixture
    message,
    nexthop,  # noqa: F401 - the next hop fixture
    relay,  # noqa: F401 - the relay fixture
    results,
    smtpRoute,
    submit,
    waitRemoved,
    waitResult,
)


def libfaketime() -> str:
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))
    if not found:
        if os.environ.get("CI") == "true":
            pytest.fail("libfaketime is not installed; .ci/run must install it")
        pytest.skip("libfaketime is not installed (apt-get install faketime)")
    return found[0]


class FakeClock:
    """The relay's wall clock: the real one plus an offset written to a file."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "faketime"
        self.path.write_text("+0\n")
        self.env = {
            "LD_PRELOAD": libfaketime(),
            "FAKETIME_TIMESTAMP_FILE": str(self.path),
            "FAKETIME_NO_CACHE": "1",
            "FAKETIME_DONT_FAKE_MONOTONIC": "1",
            "DONT_FAKE_MONOTONIC": "1",  # (its older name)
        }

    def step(self, seconds: int) -> None:
        self.path.write_text(f"{seconds:+d}\n")


def _deferredUnderFaketime(relay, nexthop, dns, tmp_path: Path,  # noqa: F811
                           minBackoff: int, maxBackoff: int) -> tuple[FakeClock, Any, str]:
    """A relay under libfaketime (and its L{FakeClock}), and the queue id of a message to
    bob@example.org its next hop deferred (it defers the first two tries, takes the
    third), once logged so."""
    clock = FakeClock(tmp_path)
    hop, port = nexthop()
    tries: list[str] = []

    def rcptReply(address: str) -> str | None:
        tries.append(address)
        return "451 4.3.0 try later" if len(tries) <= 2 else None

    hop.rcptReply = rcptReply
    r = relay(config(dns, queue={"min_backoff": minBackoff, "max_backoff": maxBackoff},
                     routes=[smtpRoute("example.org", port)]), env=clock.env)
    qid = submit(r, "alice@sender.test", ["bob@example.org"], message("stepped"))
    waitResult(r, qid, "bob@example.org", "deferred")
    return clock, r, qid


@pytest.mark.parametrize("step", [-3 * 3600, 6 * 86400])
def test_deferred_mail_is_retried_on_time_after_a_step(
    relay, nexthop, dns, tmp_path: Path, step: int  # noqa: F811
) -> None:
    clock, r, qid = _deferredUnderFaketime(relay, nexthop, dns, tmp_path, 3, 4)
    deferredAt = time.monotonic()
    time.sleep(0.5)  # the deferral recorded
    clock.step(step)
    waitResult(r, qid, "bob@example.org", "sent", timeout=15)
    waited = time.monotonic() - deferredAt
    direction = "back" if step < 0 else "forward"
    assert f"the system clock was stepped {direction} by " in r.log()
    # Retried twice, after about min_backoff each time, not after the step's size; and not
    # expired by a step forward (max_lifetime is 5 days).
    assert 5 < waited < 12, waited
    waitRemoved(r, qid)
    assert [s for _, s, _ in results(r, qid, "bob@example.org")] == ["deferred", "deferred",
                                                                      "sent"]
    assert "notification" not in r.log()


def test_a_connection_rate_window_is_not_stretched_by_a_step_back(tmp_path: Path) -> None:
    clock = FakeClock(tmp_path)
    text = ('[[listeners]]\nendpoint = "tcp:0:interface=127.0.0.1"\n'
            "connection_rate_limit = 1\nrate_window = 3\nlimit_exceptions = []\n")
    r = RelayProcess(tmp_path / "relay", text, ("--spool", "spool", "--hostname", "relay.test"),
                     env=clock.env, defaults=False, hold=True)
    try:
        r.start()

        def greeting() -> bytes:
            c = r.connect()
            try:
                return c.readReply()[0]
            finally:
                c.close()

        assert greeting().startswith(b"220 ")
        clock.step(-3600)
        r.waitForLog(r"the system clock was stepped back by 1:00:00")
        assert greeting().startswith(b"421 ")  # the window goes on
        deadline = time.monotonic() + 10
        while greeting().startswith(b"421 ") and time.monotonic() < deadline:
            time.sleep(0.5)
        assert time.monotonic() < deadline  # over after rate_window, not after an hour
    finally:
        r.stop()


def test_auth_failures_are_forgotten_on_time_after_a_step_back(tmp_path: Path) -> None:
    from tests.test_e2e_tls_auth import AUTH, LISTENERS, PASSWORDS, Site

    clock = FakeClock(tmp_path)
    site = Site(tmp_path / "relay")
    config = AUTH.replace("max_failures = 4", "max_failures = 2\nfailure_window = 3") + LISTENERS
    r = RelayProcess(site.directory, config,
                     ("--spool", str(site.directory / "spool"), "--hostname", "relay.test"),
                     env=clock.env, defaults=False, listeners=3, hold=True)

    def auth(password: str) -> int:
        with smtplib.SMTP("127.0.0.1", r.ports[1], timeout=10) as s:
            s.starttls(context=site.context())
            s.ehlo("laptop.example")
            s.user, s.password = "alice", password
            try:
                return s.auth("PLAIN", s.auth_plain)[0]
            except smtplib.SMTPAuthenticationError as e:
                return e.smtp_code
            except smtplib.SMTPServerDisconnected:
                return 421

    try:
        r.start()
        assert [auth("wrong"), auth("wrong")] == [535, 421]
        assert auth(PASSWORDS["alice"]) == 421  # throttled
        clock.step(-3600)
        r.waitForLog(r"the system clock was stepped back by 1:00:00")
        deadline = time.monotonic() + 10
        while auth(PASSWORDS["alice"]) == 421 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert time.monotonic() < deadline  # after failure_window, not after an hour
    finally:
        r.stop()


def _greylisting(tmp_path: Path, clock: FakeClock, options: str) -> tuple[RelayProcess, Any]:
    """A relay (not started) greylisting with C{options}, and what sends it a message
    (returning the reply to its end of data, or to C{DATA})."""
    text = ('[relay]\nnetworks = []\naccept_domains = ["example.org"]\n'
            '[dns]\nreverse_lookups = false\n'
            f'[[plugins]]\nplugin = "greylist"\n{options}')
    r = RelayProcess(tmp_path / "relay", text, env=clock.env, hold=True)

    def send() -> int:
        with smtplib.SMTP("127.0.0.1", r.port, timeout=10) as s:
            s.ehlo("client.test")
            assert s.mail("alice@sender.test")[0] == 250
            assert s.rcpt("bob@example.org")[0] == 250
            code, _ = s.docmd("DATA")
            if code != 354:
                return code
            s.send(b"Subject: grey\r\n\r\nHello.\r\n.\r\n")
            return s.getreply()[0]

    return r, send


def test_greylisting_after_a_step_back_waits_its_delay_not_the_step(tmp_path: Path) -> None:
    clock = FakeClock(tmp_path)
    r, send = _greylisting(tmp_path, clock, "delay = 2\n")
    try:
        r.start()
        assert send() == 451
        clock.step(-3600)
        r.waitForLog(r"the system clock was stepped back by 1:00:00")
        deadline = time.monotonic() + 10
        while send() == 451 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert time.monotonic() < deadline  # after the delay, not after an hour
        assert len(r.queued()) == 1
    finally:
        r.stop()


def test_greylisting_after_a_step_forward_still_waits_its_delay(tmp_path: Path) -> None:
    """The memory store times the delay on the monotonic clock: a step forward of an hour
    let the retry pass at once (and a longer one greylisted it again)."""
    clock = FakeClock(tmp_path)
    r, send = _greylisting(tmp_path, clock, "delay = 30\n")
    try:
        r.start()
        assert send() == 451
        clock.step(3600)
        r.waitForLog(r"the system clock was stepped forward by 1:00:00")
        assert send() == 451  # 30 s not passed
        assert r.queued() == []
    finally:
        r.stop()

def test_a_passed_triplet_is_forgotten_its_lifetime_after_a_step_back(tmp_path: Path) -> None:
    """The memory store forgets a passed triplet C{lifetime} after its last use, whatever
    the wall clock did: after a step back of an hour it was kept an hour longer (the
    sender passed at once)."""
    clock = FakeClock(tmp_path)
    r, send = _greylisting(tmp_path, clock, "delay = 1\nlifetime = 3\nauto_whitelist = 0\n")
    try:
        r.start()
        assert send() == 451
        deadline = time.monotonic() + 10
        while send() == 451 and time.monotonic() < deadline:
            time.sleep(0.3)
        assert time.monotonic() < deadline  # passed: known for 3 s
        passed = time.monotonic()
        clock.step(-3600)
        r.waitForLog(r"the system clock was stepped back by 1:00:00")
        time.sleep(max(0.0, passed + 3.5 - time.monotonic()))
        assert send() == 451  # forgotten: greylisted again
    finally:
        r.stop()


def test_a_message_being_sent_survives_a_step_forward(tmp_path: Path) -> None:
    clock = FakeClock(tmp_path)
    r = RelayProcess(tmp_path / "relay", "[dns]\nreverse_lookups = false\n", env=clock.env,
                     hold=True)
    try:
        r.start()
        c = r.connect()
        assert c.readReply()[0].startswith(b"220 ")
        for command in (b"EHLO client.test", b"MAIL FROM:<a@example.com>",
                        b"RCPT TO:<b@example.org>", b"DATA"):
            c.send(command + b"\r\n")
            assert c.readReply()[-1][:1] in (b"2", b"3"), command
        c.send(b"Subject: slow\r\n\r\n")
        time.sleep(0.5)
        clock.step(2 * 86400)
        r.waitForLog(r"the system clock was stepped forward by 2 days")
        c.send(b"Hello.\r\n")  # min_data_rate's deadline, counted on the clock, is past
        time.sleep(0.5)
        c.send(b".\r\n")
        assert c.readReply()[0].startswith(b"250 2.0.0 Ok: queued as ")
        c.close()
    finally:
        r.stop()


def test_a_suspended_next_hop_is_tried_again_on_time_after_a_step_back(
    relay, nexthop, dns, tmp_path: Path  # noqa: F811
) -> None:
    clock = FakeClock(tmp_path)
    port = freePort()
    r = relay(config(dns, queue={"min_backoff": 3, "max_backoff": 4},
                     delivery={"destination_concurrency": 1},
                     routes=[smtpRoute("example.org", port)]), env=clock.env)
    qid = submit(r, "alice@sender.test", ["bob@example.org"], message("suspended"))
    waitResult(r, qid, "bob@example.org", "deferred")  # refused: suspended for 3 s
    time.sleep(0.5)
    clock.step(-3600)
    r.waitForLog(r"the system clock was stepped back by 1:00:00")
    hop, _ = nexthop(port=port)
    # Suspended 3 s from the step at most, not an hour.
    waitResult(r, qid, "bob@example.org", "sent", timeout=12)


def test_mail_waiting_through_a_step_forward_keeps_its_age_across_a_restart(
    relay, nexthop, dns, tmp_path: Path  # noqa: F811
) -> None:
    """A deferred message waiting for its next attempt while the clock is stepped forward
    by 6 days, then the relay restarted before that attempt: the stop writes the step to
    its envelope, so the restarted relay, deferred again, keeps it queued (and delivers it
    at the next attempt), not bounces it as 6 days in the queue (max_lifetime is 5 days),
    its age read from the spool."""
    clock, r, qid = _deferredUnderFaketime(relay, nexthop, dns, tmp_path, 8, 8)
    clock.step(6 * 86400)
    r.waitForLog(r"the system clock was stepped forward by 6 days")
    r.stop()
    r.start()
    waitResult(r, qid, "bob@example.org", "sent", timeout=30)
    waitRemoved(r, qid)
    # (The log of the restarted relay: its attempt deferred, not bounced, then the next.)
    assert [s for _, s, _ in results(r, qid, "bob@example.org")] == ["deferred", "sent"]
    assert "notification" not in r.log()


def test_the_queue_list_gives_a_waiting_entrys_arrival_after_a_step(
    relay, nexthop, dns, tmp_path: Path  # noqa: F811
) -> None:
    """`mailrelay queue list` shows a deferred message's arrival on the stepped clock at
    once (the queue counts its age so), not the stored one until its next attempt: it was
    six days before the relay's "now" after a step forward of six days."""
    from tests.test_e2e_control import listing

    clock, r, qid = _deferredUnderFaketime(relay, nexthop, dns, tmp_path, 600, 600)
    clock.step(6 * 86400)
    r.waitForLog(r"the system clock was stepped forward by 6 days")
    entry = listing(r)[qid]
    assert abs(entry["arrival_time"] - (time.time() + 6 * 86400)) < 60, entry
    assert entry["next_attempt"] > time.time() + 6 * 86400 + 500, entry

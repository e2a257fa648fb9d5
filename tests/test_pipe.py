"""Tests for the C{pipe} backend (L{mailrelay.delivery.pipe}): real commands (small shell
scripts) run by the real reactor (trial test cases), and its options checked at build."""

from __future__ import annotations

import dataclasses
import io
import os
import pwd
import re
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer, reactor
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from mailrelay.delivery.pipe import OUTPUT_LIMIT, _Run, build
from mailrelay.envelope import Envelope, Recipient
from mailrelay.errors import ConfigError
from mailrelay.interfaces import DeliveryStatus, IDeliveryBackend, PluginContext, Route
from tests.test_e2e_stop import _alive

MESSAGE = b"Subject: piped\r\n\r\n.dot line\r\nlast\r\n"
ROOT = os.geteuid() == 0
USER = "nobody" if ROOT else pwd.getpwuid(os.geteuid()).pw_name


def workdir() -> Path:
    """A directory the command's user can use (pytest's are private to root)."""
    path = Path(tempfile.mkdtemp(prefix="mailrelay-pipe-"))
    path.chmod(0o777)
    return path


def script(directory: Path, body: str, name: str = "cmd") -> str:
    """An executable shell script recording its arguments, user and input in C{directory}
    (one file set per run, numbered), then running C{body}."""
    path = directory / name
    path.write_text(
        "#!/bin/sh\n"
        f"d={directory}; n=$(mktemp -p $d run.XXXXXX)\n"
        'for a in "$@"; do printf "%s\\n" "$a"; done > "$n.args"\n'
        'id -u > "$n.uid"\n'
        'printf "%s" "$HOME:$USER:$PATH:$LANG:${SECRET-unset}" > "$n.env"\n'
        'cat > "$n.stdin"\n'
        f"{body}\n"
    )
    path.chmod(0o755)
    return str(path)


def runs(directory: Path) -> list[dict[str, Any]]:
    found = []
    for marker in sorted(directory.glob("run.??????")):
        stem = str(marker)
        found.append({
            "args": Path(stem + ".args").read_text().splitlines(),
            "uid": int(Path(stem + ".uid").read_text()),
            "env": Path(stem + ".env").read_text(),
            "stdin": Path(stem + ".stdin").read_bytes(),
        })
    return found


def killLeftovers(directory: Path) -> None:
    """Kill the processes the commands of a test left running (in sessions of their own, so
    that nothing else kills them), by the ids they wrote to C{leftovers}."""
    path = directory / "leftovers"
    if path.exists():
        for pid in path.read_text().split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass


#: A shell command line starting a process in a session of its own (a daemon), which keeps
#: the command's standard input, output and error open for 20 s after the command exits.
DETACHED = "setsid sleep 20 & echo $! >> $d/leftovers"


def backend(command: list[str], **options: Any) -> Any:
    options.setdefault("user", USER)
    return build({"command": command, **options},
                 PluginContext("relay.test", Path("/"), reactor))


def envelope(*addresses: str, sender: str = "alice@example.org") -> Envelope:
    return Envelope(sender=sender, recipients=[Recipient(a) for a in addresses],
                    queueID="01K1AP4J8VGG0000VZ3M7Q")


class PipeTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = workdir()
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.addCleanup(killLeftovers, self.dir)
        self.message = self.dir / "message.eml"
        self.message.write_bytes(MESSAGE)

    def deliver(self, b: Any, env: Envelope, nexthop: str = "procmail") -> defer.Deferred:
        return b.deliver(env, env.recipients, Route("procmail", nexthop), self.message)

    @defer.inlineCallbacks
    def firstRunStarted(self) -> Any:
        """Wait for a run to start (its input file exists)."""
        for _ in range(200):
            if list(self.dir.glob("run.*.stdin")):
                break
            yield deferLater(0.05)

    @defer.inlineCallbacks
    def placedDeliveryRunning(self, b: Any, places: Any) -> Any:
        """A delivery to two recipients by C{b}, with C{places}, once its first run has
        started (its input file exists): in a list, not to be waited for."""
        b.useDeliveryPlaces(places)
        both = self.deliver(b, envelope("a@example.org", "b@example.org"))
        yield self.firstRunStarted()
        return [both]

    @defer.inlineCallbacks
    def test_perRecipientArgumentsNeverGoThroughAShell(self) -> Any:
        b = backend([script(self.dir, "exit 0"), "-f", "{sender}", "--to={recipient}",
                     "{domain}", "{queue_id}", "{nexthop}", "{{literal}}"])
        verifyObject(IDeliveryBackend, b)
        odd = '"$(touch x) ;|`id`"@example.net'
        results = yield self.deliver(b, envelope("bob@example.org", odd))
        assert [r.status for r in results] == [DeliveryStatus.DELIVERED] * 2
        assert results[0].diagnostic == "X-mailrelay; delivered via procmail service"
        assert all(r.final for r in results)  # a success notice says "delivered"
        done = sorted(runs(self.dir), key=lambda run: run["args"][2])
        assert [run["args"] for run in done] == [
            ["-f", "alice@example.org", f"--to={odd}", "example.net", "01K1AP4J8VGG0000VZ3M7Q",
             "example.net", "{literal}"],
            ["-f", "alice@example.org", "--to=bob@example.org", "example.org",
             "01K1AP4J8VGG0000VZ3M7Q", "example.org", "{literal}"],
        ]
        assert not (Path("/") / "x").exists() and not (self.dir / "x").exists()
        # The message with LF line ends, as Postfix's pipe writes it.
        assert done[0]["stdin"] == MESSAGE.replace(b"\r\n", b"\n")
        home = pwd.getpwnam(USER).pw_dir
        assert done[0]["env"] == f"{home}:{USER}:/usr/local/bin:/usr/bin:/bin:C:unset"
        assert done[0]["uid"] == pwd.getpwnam(USER).pw_uid

    @defer.inlineCallbacks
    def test_perMessageRepeatsRecipientItems(self) -> Any:
        b = backend([script(self.dir, "exit 0"), "{sender}", "-d", "{recipient}"],
                    per="message")
        results = yield self.deliver(b, envelope("a@example.org", "b@example.net", sender=""))
        assert [r.status for r in results] == [DeliveryStatus.DELIVERED] * 2
        [run] = runs(self.dir)
        assert run["args"] == ["MAILER-DAEMON", "-d", "a@example.org", "b@example.net"]

    @defer.inlineCallbacks
    def test_nexthopIsTheRecipientDomainWhenTheRouteGivesNone(self) -> Any:
        """{nexthop} of a route without a next hop of its own (the routing table gives a site
        backend's routes the backend's name) is the recipient's domain, as Postfix's
        ${nexthop} for a transport entry "example.org  procmail:"; one run per message
        takes the recipients of one domain, as Postfix's deliveries are per next hop.  A
        route's own next hop is kept.  It was the backend's name."""
        env = envelope("a@example.org", "b@example.net", "c@example.org")
        b = backend([script(self.dir, "exit 0"), "{nexthop}", "{recipient}"], per="message")
        results = yield self.deliver(b, env)
        assert [r.status for r in results] == [DeliveryStatus.DELIVERED] * 3
        assert sorted(run["args"] for run in runs(self.dir)) == [
            ["example.net", "b@example.net"], ["example.org", "a@example.org", "c@example.org"]]
        own = workdir()
        self.addCleanup(shutil.rmtree, own, True)
        b = backend([script(own, "exit 0"), "{nexthop}", "{recipient}"], per="message")
        yield self.deliver(b, env, nexthop="lists.example.org")
        assert [run["args"] for run in runs(own)] == [
            ["lists.example.org", "a@example.org", "b@example.net", "c@example.org"]]

    @defer.inlineCallbacks
    def test_exitStatusesBySysexits(self) -> Any:
        expected = {0: (DeliveryStatus.DELIVERED, "2.0.0"), 75: (DeliveryStatus.TRANSIENT, "4.3.0"),
                    71: (DeliveryStatus.TRANSIENT, "4.3.0"), 67: (DeliveryStatus.PERMANENT, "5.1.1"),
                    77: (DeliveryStatus.PERMANENT, "5.7.0"), 1: (DeliveryStatus.PERMANENT, "5.3.0")}
        for status, (kind, code) in expected.items():
            b = backend([script(self.dir, f"echo 'said: no such user' >&2; exit {status}",
                                name=f"cmd{status}")])
            (r,) = yield self.deliver(b, envelope("bob@example.org"))
            assert (r.status, r.code) == (kind, code), (status, r)
            if status:
                assert r.diagnostic.startswith(f"x-unix; {self.dir}/cmd{status} exited with "
                                               f"status {status} (")
                assert r.diagnostic.endswith("): said: no such user")

    @defer.inlineCallbacks
    def test_outputIsBoundedAndMadePrintable(self) -> Any:
        b = backend([script(self.dir, "printf 'bad\\001\\n\\tline '; seq -s ' ' 2000; exit 65")])
        (r,) = yield self.deliver(b, envelope("bob@example.org"))
        assert (r.status, r.code) == (DeliveryStatus.PERMANENT, "5.6.0")
        output = r.diagnostic.split("(data format error): ", 1)[1]
        assert output.startswith("bad line 1 2 3") and len(output) == OUTPUT_LIMIT
        assert output.isprintable() and output.isascii()

    @defer.inlineCallbacks
    def test_timeLimitKillsAndDefers(self) -> Any:
        b = backend([script(self.dir, "exec sleep 30")], time_limit=0.5)
        (r,) = yield self.deliver(b, envelope("bob@example.org"))
        assert (r.status, r.code) == (DeliveryStatus.TRANSIENT, "4.3.0")
        assert "time limit of 0.5s exceeded" in r.diagnostic

    @defer.inlineCallbacks
    def test_cancelKillsTheRun(self) -> Any:
        b = backend([script(self.dir, "exec sleep 30")])
        d = self.deliver(b, envelope("bob@example.org"))
        for _ in range(200):  # the run has started when its input file exists
            if list(self.dir.glob("run.*.stdin")):
                break
            yield deferLater(0.05)
        d.cancel()
        with pytest.raises(defer.CancelledError):
            yield d
        for _ in range(200):  # killed: it ends
            if not b.running:
                break
            yield deferLater(0.05)
        assert not b.running

    @defer.inlineCallbacks
    def test_eachRunTakesADeliveryPlace(self) -> Any:
        """Given the queue's places of the deliveries in flight ([queue] delivery_limit),
        each run takes one once it has its place among the backend's own: with one place,
        one command runs at a time.  A delivery cancelled before any of its commands ran
        fails with DeliveryNotStarted (nothing was sent); one cancelled with a command
        running, with a plain cancellation (the command may have taken the message)."""
        from mailrelay.errors import DeliveryNotStarted
        from mailrelay.queue.attempt import DeliveryPlaces

        places = DeliveryPlaces(1)
        b = backend([script(self.dir, "exec sleep 30")])
        b.useDeliveryPlaces(places)
        both = self.deliver(b, envelope("a@example.org", "b@example.org"))
        yield self.firstRunStarted()
        assert (places.running, places.waiting, len(b.running)) == (1, 1, 1)
        waiting = self.deliver(b, envelope("c@example.org"))
        assert places.waiting == 2
        waiting.cancel()
        with pytest.raises(DeliveryNotStarted):
            yield waiting
        both.cancel()
        try:
            yield both
        except defer.CancelledError as e:
            assert not isinstance(e, DeliveryNotStarted)
        else:
            raise AssertionError("not cancelled")
        assert (places.running, places.waiting) == (0, 0)
        for _ in range(200):  # killed: it ends
            if not b.running:
                break
            yield deferLater(0.05)
        assert not b.running
        assert len(runs(self.dir)) == 1

    @defer.inlineCallbacks
    def test_aRunRefusedItsPlaceByTheStopDefersOnlyItsRecipients(self) -> Any:
        """The stop refuses the queue's places to the runs still waiting for one
        (DeliveryPlaces.interrupt) while another run of the delivery goes on: the delivery
        ends once that run has, with its result (the command took the message), and the
        recipients of the runs never started deferred, not the whole delivery failing at
        once (recorded as deferred, a recipient its command took would be delivered again
        at the next start)."""
        from mailrelay.queue.attempt import DeliveryPlaces

        places = DeliveryPlaces(1)
        go = self.dir / "go"
        b = backend([script(self.dir, f"while [ ! -e {go} ]; do sleep 0.02; done")])
        [both] = yield self.placedDeliveryRunning(b, places)
        assert (places.running, places.waiting) == (1, 1)
        places.interrupt()  # the stop begins
        assert not both.called  # the first run goes on
        go.touch()
        results = yield both
        assert [r.status for r in results] == [DeliveryStatus.DELIVERED,
                                               DeliveryStatus.TRANSIENT]
        assert results[1].code == "4.3.0"
        assert results[1].diagnostic == (
            "X-mailrelay; delivery via procmail:procmail not started: the relay was stopping")
        assert len(runs(self.dir)) == 1

    @defer.inlineCallbacks
    def test_optionLikeAddressesRefused(self) -> Any:
        b = backend([script(self.dir, "exit 0"), "{recipient}"])
        results = yield self.deliver(b, envelope("-oQ/tmp@example.org", "ok@example.org"))
        assert (results[0].status, results[0].code) == (DeliveryStatus.PERMANENT, "5.1.3")
        assert results[1].status is DeliveryStatus.DELIVERED
        assert [run["args"] for run in runs(self.dir)] == [["ok@example.org"]]

    @defer.inlineCallbacks
    def test_commandThatCannotStartDefers(self) -> Any:
        path = script(self.dir, "exit 0")
        b = backend([path])
        os.unlink(path)
        (r,) = yield self.deliver(b, envelope("bob@example.org"))
        assert r.status is DeliveryStatus.TRANSIENT


    @defer.inlineCallbacks
    def test_timeLimitKillsTheCommandsOffspringToo(self) -> Any:
        """A command whose child keeps its output open (a shell waiting on sleep, a
        background job): the time limit kills them all and the run ends at the limit.  Only
        the command was killed: the run lasted as long as the child held the pipe (the
        backend's 600 s timeout, the destination's slot held), and each retry left one more
        orphan behind, even after the relay stopped."""
        b = backend([script(self.dir, "sleep 30 & echo $! > $d/child.pid; wait")],
                    time_limit=1)
        started = time.monotonic()
        (r,) = yield self.deliver(b, envelope("bob@example.org"))
        assert time.monotonic() - started < 10
        assert (r.status, r.code) == (DeliveryStatus.TRANSIENT, "4.3.0")
        child = int((self.dir / "child.pid").read_text())
        for _ in range(100):
            if not _alive(child):
                break
            yield deferLater(0.05)
        assert not _alive(child), "the command's child survived"

    @defer.inlineCallbacks
    def test_aProcessTheCommandLeftHoldingItsOutputDoesNotHoldTheDelivery(self) -> Any:
        """A command that exits 0 leaving a daemon (a session of its own, which the time limit
        cannot kill) with its output open: delivered once it has exited, its output read
        for a moment more.  The run waited for the output's end: until the daemon ended, or
        forever, the queue's timeout deferring it and each retry delivering it again."""
        b = backend([script(self.dir, f"{DETACHED}; echo started; exit 0")], time_limit=60)
        started = time.monotonic()
        (r,) = yield self.deliver(b, envelope("bob@example.org"))
        assert time.monotonic() - started < 10
        assert r.status is DeliveryStatus.DELIVERED, r
        assert len(runs(self.dir)) == 1
        assert not b.running

    @defer.inlineCallbacks
    def test_aDeliveryCancelledAfterTheCommandExitedKeepsItsStatus(self) -> Any:
        """The relay stops while the output of a command that exited 0 is still read (a
        daemon it left holds it): the delivery is cancelled, and answers delivered at once.
        It answered cancelled: the message was deferred and the command run again."""
        from mailrelay.delivery import pipe

        # (Its output is read for a while after it exited: long enough for a loaded machine.)
        self.patch(pipe, "_OUTPUT_WAIT", 60.0)
        b = backend([script(self.dir, f"{DETACHED}; echo started; exit 0")], time_limit=60)
        d = self.deliver(b, envelope("bob@example.org"))
        deadline = time.monotonic() + 30
        while not any(run.exited is not None for run in b.running):  # until it has exited
            assert time.monotonic() < deadline
            yield deferLater(0.05)
        assert not d.called
        d.cancel()
        outcomes: list[Any] = []
        d.addBoth(outcomes.append)
        ((r,),) = outcomes
        assert r.status is DeliveryStatus.DELIVERED, r
        assert len(runs(self.dir)) == 1

    @defer.inlineCallbacks
    def test_aProcessTheCommandLeftHoldingItsUnreadInputDoesNotHoldTheDelivery(self) -> Any:
        """The same, the command exiting without reading the message, which its daemon holds
        open unread: the input not written yet is dropped (the exit status decides, as when
        the command closes its input early)."""
        self.message.write_bytes(MESSAGE + b"x" * 998 + b"\r\n" * 1000)  # (over a pipe's buffer)
        path = self.dir / "noread"
        path.write_text(f"#!/bin/sh\nd={self.dir}\n{DETACHED}\nexit 0\n")
        path.chmod(0o755)
        b = backend([str(path)], time_limit=60)
        started = time.monotonic()
        (r,) = yield self.deliver(b, envelope("bob@example.org"))
        assert time.monotonic() - started < 10
        assert r.status is DeliveryStatus.DELIVERED, r
        assert not b.running

    @defer.inlineCallbacks
    def test_theTimeLimitEndsARunWhoseOutputADetachedProcessHolds(self) -> Any:
        """At the time limit the command is killed and its pipes closed: a daemon it started
        (out of reach of the kill) held them, and the run, until it ended."""
        b = backend([script(self.dir, f"{DETACHED}; exec sleep 30")], time_limit=1)
        started = time.monotonic()
        (r,) = yield self.deliver(b, envelope("bob@example.org"))
        assert time.monotonic() - started < 10
        assert (r.status, r.code) == (DeliveryStatus.TRANSIENT, "4.3.0"), r
        assert "time limit of 1s exceeded" in r.diagnostic
        assert not b.running

    @defer.inlineCallbacks
    def test_aCommandThatCannotBeExecutedDefers(self) -> Any:
        """A command that passes the executable check but cannot be run (its interpreter is
        missing; as root the check sees files the user cannot): deferred with 4.3.5 and one
        line saying why.  It bounced (5.3.0: exit status 1) with Twisted's traceback, the
        install paths and the whole command line in the bounce."""
        path = self.dir / "noint"
        path.write_text("#!/nonexistent/interpreter\n")
        path.chmod(0o755)
        b = backend([str(path), "{recipient}"])
        (r,) = yield self.deliver(b, envelope("bob@example.org"))
        assert (r.status, r.code) == (DeliveryStatus.TRANSIENT, "4.3.5"), r
        assert r.diagnostic == f"X-mailrelay; cannot run {path}: No such file or directory", r
        assert "Traceback" not in r.diagnostic

    @defer.inlineCallbacks
    def test_anEnhancedStatusTheCommandPrintsDecides(self) -> Any:
        """A command that fails printing 'D.S.N text' first: that status, deferred for 4.x.x
        and bounced for 5.x.x, as Postfix's pipe (pipe_command.c: dsn_valid); before, exit 1
        bounced 5.3.0 whatever it said ('4.2.2 Mailbox over quota' too)."""
        for said, status, kind, code in [
            ("4.2.2 Mailbox over quota, try later", 1, DeliveryStatus.TRANSIENT, "4.2.2"),
            ("5.1.1 no such user", 1, DeliveryStatus.PERMANENT, "5.1.1"),
            ("4.2.2 over quota", 67, DeliveryStatus.TRANSIENT, "4.2.2"),  # the output first
            ("no status here", 75, DeliveryStatus.TRANSIENT, "4.3.0"),
        ]:
            b = backend([script(self.dir, f"echo '{said}'; exit {status}", name=f"d{status}")])
            (r,) = yield self.deliver(b, envelope("bob@example.org"))
            assert (r.status, r.code) == (kind, code), (said, r)
            assert said in r.diagnostic

    @defer.inlineCallbacks
    def test_binaryMIMEIsConverted(self) -> Any:
        """Found by a bug hunt: a BODY=BINARYMIME message went with the CRLF of its binary
        part made LF, the image broken.  Its binary part goes base64, as to a next hop
        without BINARYMIME, once for all the runs; one that cannot be converted (DKIM-signed)
        is returned with 5.6.3, the command not run."""
        from mailrelay.delivery import mime
        from tests.test_delivery import BINARY_MESSAGE, PAYLOAD, binaryPart

        conversions = []
        convertFile = mime.convertFile

        def counting(*args: Any) -> Any:
            conversions.append(args)
            return convertFile(*args)

        self.patch(mime, "convertFile", counting)
        self.message.write_bytes(BINARY_MESSAGE)
        b = backend([script(self.dir, "exit 0"), "{recipient}"])
        env = dataclasses.replace(envelope("bob@example.org", "carol@example.org"),
                                  body="BINARYMIME")
        results = yield self.deliver(b, env)
        assert [r.status for r in results] == [DeliveryStatus.DELIVERED] * 2
        done = runs(self.dir)
        assert len(done) == 2 and len(conversions) == 1
        for run in done:
            assert binaryPart(run["stdin"]) == PAYLOAD
            assert run["stdin"].isascii() and b"\r" not in run["stdin"]
        for run in Path(self.dir).glob("run.*"):
            run.unlink()
        self.message.write_bytes(b"DKIM-Signature: v=1; d=example.com\r\n" + BINARY_MESSAGE)
        results = yield self.deliver(b, env)
        assert [(r.status, r.code) for r in results] == [(DeliveryStatus.PERMANENT, "5.6.3")] * 2
        assert results[0].diagnostic.startswith(
            "X-mailrelay; procmail does not support BINARYMIME, and the message cannot be "
            "converted to 7 bits: the message is DKIM-signed")
        assert runs(self.dir) == []


class FakeProcess:
    """A run's process transport, as Twisted's: the protocol learns that the command exited
    (C{processExited}), then that the run ended (C{processEnded}) once every pipe is closed.
    Nothing is written to the command (its input is never asked for)."""

    pid: int | None = 4242

    def __init__(self, run: _Run) -> None:
        self.run = run
        self.open = {0, 1, 2}
        self.reason: Exception | None = None
        self.signals: list[str] = []
        self.ended = 0
        run.makeConnection(self)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        pass

    def closeChildFD(self, childFD: int) -> None:
        self.open.discard(childFD)
        self._maybeEnded()

    def closeStdin(self) -> None:
        self.closeChildFD(0)

    def closeStdout(self) -> None:
        self.closeChildFD(1)

    def closeStderr(self) -> None:
        self.closeChildFD(2)

    def loseConnection(self) -> None:
        for childFD in (0, 1, 2):
            self.closeChildFD(childFD)

    def signalProcess(self, name: str) -> None:
        if self.reason is not None:
            raise ProcessExitedAlready()
        self.signals.append(name)

    def exit(self, reason: Exception) -> None:
        """The command exits; whatever it left running holds the pipes still open."""
        self.reason, self.pid = reason, None
        self.run.processExited(Failure(reason))
        self._maybeEnded()

    def _maybeEnded(self) -> None:
        if self.reason is not None and not self.open and not self.ended:
            self.ended += 1
            self.run.processEnded(Failure(self.reason))


def fakeRun(timeLimit: float = 300) -> tuple[Clock, _Run, FakeProcess, list[_Run]]:
    clock, ended = Clock(), []
    run = _Run(clock, io.BytesIO(MESSAGE), timeLimit, ended.append)
    return clock, run, FakeProcess(run), ended


@pytest.mark.parametrize("reason", [ProcessDone(0), ProcessTerminated(75)])
def test_theExitStatusDecidesOnceTheCommandHasExited(reason: Exception) -> None:
    """A command exits, a process it left running holding its output: the output is read a
    moment more, then closed, and the run ends with the command's exit status, once.
    Twisted ends a run only once its pipes are closed: it never ended."""
    clock, run, process, ended = fakeRun()
    run.childDataReceived(1, b"queued\n")
    process.exit(reason)
    clock.advance(0.5)
    assert not run.done.called  # still reading what comes
    run.childDataReceived(2, b"late\n")
    clock.advance(4.5)
    assert process.open == set() and process.ended == 1
    assert run.done.called and run.done.result is reason
    assert bytes(run.output) == b"queued\nlate\n"
    assert ended == [run]
    clock.advance(600)  # no time limit once the command has exited
    assert process.signals == [] and clock.getDelayedCalls() == []
    assert not run.timedOut


def test_theTimeLimitClosesThePipesItsKillLeavesOpen() -> None:
    """At the time limit the command is killed and its pipes are closed, so that the run
    ends once it is dead, whatever holds them.  It was only killed."""
    clock, run, process, ended = fakeRun(timeLimit=10)
    clock.advance(10)
    assert process.signals == ["KILL"] and process.open == set()
    killed = ProcessTerminated(signal=9)
    process.exit(killed)
    assert run.done.called and run.done.result is killed and run.timedOut
    assert ended == [run] and clock.getDelayedCalls() == []


@pytest.mark.parametrize("status", [ProcessDone(0), ProcessTerminated(75)])
def test_aRunCancelledAfterTheCommandExitedEndsWithItsStatus(status: Failure) -> None:
    """The queue gives up on a run whose command has exited (the pipes held, the output
    read a while more): it ends at once, and the command's exit status decides.  It ended
    cancelled: a command that had delivered (exit 0) was deferred and run again."""
    clock, run, process, ended = fakeRun()
    process.exit(status)
    run.done.cancel()
    outcomes: list[object] = []
    run.done.addBoth(outcomes.append)
    assert outcomes == [status]
    clock.advance(5)
    assert process.open == set() and process.ended == 1 and ended == [run]
    assert clock.getDelayedCalls() == []


def deferLater(seconds: float) -> defer.Deferred:
    from twisted.internet import task

    return task.deferLater(reactor, seconds, lambda: None)


@pytest.mark.parametrize("options, problem", [
    ({}, "command: is required"),
    ({"command": "/bin/true {recipient}"}, "must be a non-empty list of strings"),
    ({"command": ["true"]}, "must be an absolute path"),
    ({"command": ["/nonexistent/cmd"]}, "is not an executable file"),
    ({"command": ["/bin/true", "{rcpt}"]}, 'unknown placeholder "{rcpt}"'),
    ({"command": ["/bin/true", "{recipient"]}, 'unknown placeholder "{"'),
    # Postfix's spelling: it would give "$bob@example.org" (found by a bug hunt).
    ({"command": ["/bin/true", "${recipient}"]}, 'is written {recipient} here, not "${recipient}"'),
    ({"command": ["/bin/true", "-f$sender"]}, "Postfix's $sender is written {sender} here"),
    ({"command": ["/bin/true", "$extension"]}, "Postfix's $extension has no equivalent here"),
    ({"command": ["/bin/true"], "per": "domain"}, "per"),
    ({"command": ["/bin/true"], "user": "no-such-user-here"}, "no such user"),
    ({"command": ["/bin/true"], "user": "root"}, "never run as root"),
    ({"command": ["/bin/true"], "colour": "blue"}, 'unknown key "colour"'),
])
def test_badOptions(options: dict[str, Any], problem: str) -> None:
    options = dict(options)
    if "user" not in options and "command" in options:
        options["user"] = USER
    with pytest.raises(ConfigError, match=re.escape(problem)):
        build(options, PluginContext("relay.test", Path("/"), None))


@pytest.mark.skipif(not ROOT, reason="only root must name the user")
def test_rootMustNameTheUser() -> None:
    with pytest.raises(ConfigError, match="required when the relay runs as root"):
        build({"command": ["/bin/true"]}, PluginContext("relay.test", Path("/"), None))


class _StuckThreads(Clock):
    """A reactor whose thread pool never runs what it is given (a thread stuck on a slow
    disk): L{held} keeps each call, to run it later by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[tuple[Any, Any, tuple, dict]] = []

    def getThreadPool(self) -> Any:
        return self

    def callInThreadWithCallback(self, onResult: Any, f: Any, *args: Any, **kw: Any) -> None:
        self.held.append((onResult, f, args, kw))

    def callFromThread(self, f: Any, *args: Any) -> None:
        f(*args)


def test_aStuckPreparationIsGivenUpAtTheTimeLimit(tmp_path: Path) -> None:
    """The conversion of a BODY=BINARYMIME message (in a thread, before any run has its
    place, so before the queue's delivery timeout runs) that does not end is given up after
    the backend's time_limit, as Postfix's pipe(8) time limit covers its whole delivery:
    the recipients are deferred (4.3.0, saying why) and no command runs; the copy the
    thread makes after that is removed.  Before, the delivery waited for ever, its message
    held."""
    from tests.test_delivery import BINARY_MESSAGE

    clock = _StuckThreads()
    message = tmp_path / "message.eml"
    message.write_bytes(BINARY_MESSAGE)
    b = build({"command": [script(tmp_path, "exit 0"), "{recipient}"], "user": USER,
               "time_limit": 30}, PluginContext("relay.test", Path("/"), clock))
    env = dataclasses.replace(envelope("bob@example.org", "-x@example.org"),
                              body="BINARYMIME")
    started: list[bool] = []
    d = b.deliver(env, env.recipients, Route("procmail", "procmail"), message,
                  started=lambda: started.append(True))
    assert len(clock.held) == 1 and not d.called
    clock.advance(29)
    assert not d.called
    clock.advance(1)
    bob, dash = d.result
    assert (bob.status, bob.code, bob.diagnostic) == (
        DeliveryStatus.TRANSIENT, "4.3.0",
        "X-mailrelay; converting the message for procmail timed out after 30s")
    assert (dash.status, dash.code) == (DeliveryStatus.PERMANENT, "5.1.3")
    assert started == [] and runs(tmp_path) == []
    onResult, f, args, kw = clock.held[0]
    copy, _ = f(*args, **kw)  # the thread ends at last: its copy is removed
    assert Path(copy).exists()
    onResult(True, (copy, _))
    assert not Path(copy).exists()

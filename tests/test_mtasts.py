"""MTA-STS (RFC 8461): the TXT record, the policy file, MX matching, and the cache of
policies (L{mailrelay.route.mtasts}), without a network: a fake resolver and fetch."""

from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.names import dns
from twisted.names import error as dnsError
from twisted.python.failure import Failure

from mailrelay.route.mtasts import (
    MAX_AGE,
    MTASTS,
    RECHECK,
    PolicyError,
    STSPolicy,
    parsePolicy,
    parseRecord,
)

POLICY = ("version: STSv1\r\nmode: enforce\r\nmx: mail.example.org\r\nmx: *.example.net\r\n"
          "max_age: 86400\r\n")


@pytest.mark.parametrize(
    "records, wanted",
    [
        (["v=STSv1; id=20160831085700Z;"], "20160831085700Z"),
        (["v=STSv1;id=abc"], "abc"),
        (["v=spf1 -all", "v=STSv1; id=x1; ext=y"], "x1"),
        (["v=spf1 -all"], None),
        ([], None),
    ],
)
def test_parseRecord(records: list[str], wanted: str | None) -> None:
    assert parseRecord(records) == wanted


@pytest.mark.parametrize(
    "records, problem",
    [
        (["v=STSv1; id=a", "v=STSv1; id=b"], "2 MTA-STS TXT records"),
        (["v=STSv1;"], "no id field"),
        (["v=STSv1; id=" + "a" * 33], "bad id"),
        (["v=STSv1; id=a-b"], "bad id"),
        (["v=STSv10; id=a"], "bad version field"),
    ],
)
def test_parseRecord_refuses(records: list[str], problem: str) -> None:
    with pytest.raises(PolicyError, match=problem):
        parseRecord(records)


def test_parsePolicy() -> None:
    assert parsePolicy(POLICY) == ("enforce", ("mail.example.org", "*.example.net"), 86400)
    assert parsePolicy("version: STSv1\nmode: none\nmax_age: 5\n") == ("none", (), 5)
    assert parsePolicy("version: STSv1\nmode: testing\nmx: MX.Example.ORG.\nmax_age: "
                       "9999999999\nextension: x\n")[1:] == (("mx.example.org",), MAX_AGE)


@pytest.mark.parametrize(
    "text, problem",
    [
        ("version: STSv2\nmode: enforce\nmx: a.b\nmax_age: 1\n", "version"),
        ("version: STSv1\nmode: strict\nmx: a.b\nmax_age: 1\n", "mode is 'strict'"),
        ("version: STSv1\nmode: enforce\nmax_age: 1\n", "no mx pattern"),
        ("version: STSv1\nmode: enforce\nmx: a.b\nmax_age: soon\n", "max_age"),
        ("version: STSv1\nmode: enforce\nmx: a.b\n", "max_age"),
        ("version: STSv1\nmode: enforce\nmx: a.b\nmax_age: 99999999999\n", "max_age"),
        ("version: STSv1\nmode: enforce\nmx: *.*.b\nmax_age: 1\n", "bad mx pattern"),
        ("version: STSv1\nmode: enforce\nmx: localhost\nmax_age: 1\n", "bad mx pattern"),
        ("<html>hello</html>", "bad line"),
    ],
)
def test_parsePolicy_refuses(text: str, problem: str) -> None:
    with pytest.raises(PolicyError, match=problem):
        parsePolicy(text)


@pytest.mark.parametrize(
    "host, matches",
    [
        ("mail.example.org", True),
        ("MAIL.example.org.", True),
        ("mx1.example.net", True),
        ("a.mx1.example.net", False),  # (one label only)
        ("example.net", False),
        ("other.example.org", False),
    ],
)
def test_matches(host: str, matches: bool) -> None:
    policy = STSPolicy("example.org", "1", "enforce", ("mail.example.org", "*.example.net"),
                       86400, 0.0)
    assert policy.matches(host) is matches


# -- the cache of policies ----------------------------------------------------------------------


class FakeResolver:
    def __init__(self) -> None:
        self.records: dict[str, list[str]] = {}
        self.failing: dict[str, Exception] = {}
        self.cnames: dict[str, str] = {}
        self.asked: list[str] = []

    def lookupText(self, name: str, timeout: Any = None) -> defer.Deferred:
        self.asked.append(name)
        if name in self.failing:
            return defer.fail(self.failing[name])
        if name not in self.records:
            return defer.fail(dnsError.DNSNameError(name))
        target = self.cnames.get(name, name)
        answers = [dns.RRHeader(name, dns.CNAME, payload=dns.Record_CNAME(target.encode()))
                   ] if target != name else []
        answers += [
            dns.RRHeader(target, dns.TXT, payload=dns.Record_TXT(text.encode()))
            for text in self.records[name]
        ]
        return defer.succeed((answers, [], []))


class Fetches:
    def __init__(self) -> None:
        self.texts: dict[str, Any] = {}
        self.asked: list[str] = []

    def __call__(self, domain: str) -> defer.Deferred:
        self.asked.append(domain)
        answer = self.texts[domain]
        if isinstance(answer, Exception):
            return defer.fail(answer)
        if isinstance(answer, defer.Deferred):
            return answer
        return defer.succeed(answer)


class Now:
    def __init__(self) -> None:
        self.t = 1_800_000_000.0

    def __call__(self) -> float:
        return self.t


def result(d: defer.Deferred) -> Any:
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "no result yet"
    return box[0]


@pytest.fixture
def world(tmp_path: Path) -> Any:
    class World:
        resolver = FakeResolver()
        fetches = Fetches()
        now = Now()
        cache = str(tmp_path / "mta-sts.json")

        def sts(self) -> MTASTS:
            return MTASTS(self.resolver, Clock(), self.cache, self.fetches, now=self.now)

    w = World()
    w.resolver.records["_mta-sts.example.org"] = ["v=STSv1; id=one"]
    w.fetches.texts["example.org"] = POLICY.encode()
    return w


def test_a_policy_is_fetched_once_and_kept(world: Any) -> None:
    sts = world.sts()
    policy = result(sts.policy("Example.ORG"))
    assert (policy.mode, policy.mx, policy.maxAge, policy.id) == (
        "enforce", ("mail.example.org", "*.example.net"), 86400, "one")
    assert result(sts.policy("example.org")) is policy  # within RECHECK: no lookup
    assert world.resolver.asked == ["_mta-sts.example.org"] and world.fetches.asked == [
        "example.org"]
    world.now.t += RECHECK
    assert result(sts.policy("example.org")) is policy  # same id: no fetch
    assert len(world.resolver.asked) == 2 and len(world.fetches.asked) == 1
    world.resolver.records["_mta-sts.example.org"] = ["v=STSv1; id=two"]
    world.fetches.texts["example.org"] = POLICY.replace("enforce", "testing").encode()
    world.now.t += RECHECK
    assert result(sts.policy("example.org")).mode == "testing"  # a new id: fetched again


def test_a_policy_is_checked_again_after_a_step_back_of_the_clock(world: Any) -> None:
    """A domain checked before a step back of the clock is checked again RECHECK after
    the step at the latest, not once the clock has reached the last check again (a new
    policy, or a policy newly published, went unseen for the size of the step)."""
    sts = world.sts()
    assert result(sts.policy("example.org")).mode == "enforce"
    world.now.t -= 3600
    world.resolver.records["_mta-sts.example.org"] = ["v=STSv1; id=two"]
    world.fetches.texts["example.org"] = POLICY.replace("enforce", "testing").encode()
    assert result(sts.policy("example.org")).mode == "testing"


def test_the_record_may_be_a_cname(world: Any) -> None:
    """RFC 8461 section 3.1: _mta-sts.<domain> may be a CNAME (a hosted policy)."""
    world.resolver.cnames["_mta-sts.example.org"] = "_mta-sts.hosting.example"
    assert result(world.sts().policy("example.org")).id == "one"


def test_policies_outlive_a_restart(world: Any) -> None:
    result(world.sts().policy("example.org"))
    saved = json.loads(Path(world.cache).read_text())
    assert [p["domain"] for p in saved["policies"]] == ["example.org"]
    del world.resolver.records["_mta-sts.example.org"]  # DNS forged or gone
    restarted = world.sts()
    assert result(restarted.policy("example.org")).mode == "enforce"
    assert world.fetches.asked == ["example.org"]
    world.now.t += 86400  # max_age over: gone
    assert result(world.sts().policy("example.org")) is None


def test_the_cache_is_readable_by_the_relays_user_only(world: Any) -> None:
    """The cache names the domains the relay sends mail to: mode 0600 whatever the umask,
    as the queue files, for the spool directory is searchable by all when [spool]
    mailq_users lets other users list the queue (its control socket in it)."""
    old = os.umask(0o022)
    try:
        result(world.sts().policy("example.org"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(world.cache).st_mode) == 0o600


def test_without_a_record_there_is_no_policy(world: Any) -> None:
    assert result(world.sts().policy("other.example")) is None
    assert world.fetches.asked == []


@pytest.mark.parametrize(
    "problem",
    [
        dnsError.DNSServerError("SERVFAIL"),
        defer.TimeoutError("no answer"),
    ],
)
def test_a_failed_lookup_keeps_the_cached_policy(world: Any, problem: Exception) -> None:
    sts = world.sts()
    first = result(sts.policy("example.org"))
    world.resolver.failing["_mta-sts.example.org"] = problem
    world.now.t += RECHECK
    assert result(sts.policy("example.org")) is first
    world.now.t += 86400
    assert result(sts.policy("example.org")) is None  # (expired meanwhile)


@pytest.mark.parametrize(
    "fetched, logged",
    [
        (ConnectionRefusedError("refused"), "refused"),
        (b"version: STSv1\nmode: bogus\nmx: a.b\nmax_age: 1\n", "mode is 'bogus'"),
        (PolicyError("HTTP status 404 (not 200)"), "HTTP status 404"),
    ],
)
def test_a_failed_fetch_keeps_the_cached_policy_or_none(
    world: Any, fetched: Any, logged: str
) -> None:
    sts = world.sts()
    first = result(sts.policy("example.org"))
    world.resolver.records["_mta-sts.example.org"] = ["v=STSv1; id=two"]
    world.fetches.texts["example.org"] = fetched
    world.now.t += RECHECK
    with capturedLogs() as events:
        assert result(sts.policy("example.org")) is first
    assert any(logged in formatEvent(e) and "keeping its cached policy" in formatEvent(e)
               for e in events)
    fresh = MTASTS(world.resolver, Clock(), None, world.fetches, now=world.now)
    assert result(fresh.policy("example.org")) is None


def test_a_malformed_record_is_no_policy(world: Any) -> None:
    world.resolver.records["_mta-sts.example.org"] = ["v=STSv1; id=a", "v=STSv1; id=b"]
    with capturedLogs() as events:
        assert result(world.sts().policy("example.org")) is None
    assert any("2 MTA-STS TXT records" in formatEvent(e) for e in events)


def test_one_lookup_at_a_time_per_domain(world: Any) -> None:
    slow: defer.Deferred = defer.Deferred()
    world.fetches.texts["example.org"] = slow
    sts = world.sts()
    first, second = sts.policy("example.org"), sts.policy("example.org")
    assert not first.called and not second.called
    slow.callback(POLICY.encode())
    policy = result(first)
    assert result(second) is policy and policy.mode == "enforce"
    assert world.fetches.asked == ["example.org"]


def test_an_unreadable_cache_is_said_and_ignored(world: Any) -> None:
    Path(world.cache).write_text("{not json")
    with capturedLogs() as events:
        assert result(world.sts().policy("example.org")).mode == "enforce"
    assert any("not read" in formatEvent(e) for e in events)
    assert json.loads(Path(world.cache).read_text())["policies"][0]["domain"] == "example.org"


@pytest.mark.parametrize(
    "policy",
    [
        {"maxAge": "Infinity"},
        {"mx": "mx.example.org"},  # (a string: was split into characters)
        {"fetched": "NaN"},  # (was a policy that never expires)
        {"mode": "strict"},
        {"id": 7},
    ],
)
def test_a_corrupt_cache_entry_is_said_and_ignored(world: Any, policy: dict) -> None:
    """Found by a bug hunt: "maxAge": Infinity stopped the relay from starting (OverflowError
    out of the smtp backend's build), "mx" as a string was split into characters, and
    "fetched": NaN never expired.  Such a cache is ignored, logged, as unreadable JSON is."""
    entry = {"domain": "example.org", "id": "one", "mode": "enforce",
             "mx": ["mx.example.org"], "maxAge": 86400, "fetched": world.now.t}
    entry.update({k: (float(v) if v in ("Infinity", "NaN") else v) for k, v in policy.items()})
    Path(world.cache).write_text(json.dumps({"policies": [entry]}))
    del world.resolver.records["_mta-sts.example.org"]
    with capturedLogs() as events:
        assert result(world.sts().policy("example.org")) is None
    assert any("not read" in formatEvent(e) for e in events)


def test_a_deeply_nested_cache_is_ignored(world: Any) -> None:
    Path(world.cache).write_text("[" * 100000 + "]" * 100000)
    with capturedLogs() as events:
        assert result(world.sts().policy("example.org")).mode == "enforce"
    assert any("not read" in formatEvent(e) for e in events)


def test_the_cache_is_read_when_first_needed(world: Any) -> None:
    """The relay's own process builds the smtp backend to check the configuration, and the
    delivery process builds it to deliver: only the one that looks up a policy reads the
    cache (and says once what is wrong with it)."""
    Path(world.cache).write_text("{not json")
    with capturedLogs() as events:
        sts = world.sts()
    assert events == []
    with capturedLogs() as events:
        result(sts.policy("example.org"))
    assert sum("not read" in formatEvent(e) for e in events) == 1


class Threads:
    """A deferToThread whose calls wait until the test runs them, each in a thread of its
    own; it records on which thread the cache file was opened."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, tuple[Any, ...], defer.Deferred]] = []

    def __call__(self, f: Any, *args: Any) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.calls.append((f, args, d))
        return d

    def runNext(self) -> None:
        f, args, d = self.calls.pop(0)
        box: list[Any] = []

        def run() -> None:
            try:
                box.append(f(*args))
            except Exception:
                box.append(Failure())

        worker = threading.Thread(target=run)
        worker.start()
        worker.join(10)
        (d.errback if isinstance(box[0], Failure) else d.callback)(box[0])


def test_the_cache_is_read_off_the_reactor_thread(world: Any, monkeypatch: Any) -> None:
    """Found by a review: the cache file was read and parsed on the reactor thread (its
    size grows with the domains that publish a policy: megabytes for a relay sending to
    many).  It is read in the thread pool; the lookups asked meanwhile wait for it, and it
    is read once."""
    result(world.sts().policy("example.org"))  # a cache with example.org's policy
    del world.resolver.records["_mta-sts.example.org"]  # now only the cache has it
    opened: list[str] = []
    realOpen = open

    def watchedOpen(path: Any, *args: Any, **kwargs: Any) -> Any:
        if str(path) == world.cache:
            opened.append(threading.current_thread().name)
        return realOpen(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", watchedOpen)
    threads = Threads()
    sts = MTASTS(world.resolver, Clock(), world.cache, world.fetches, now=world.now,
                 deferToThread=threads)
    first, second = sts.policy("example.org"), sts.policy("other.example")
    assert opened == [] and not first.called and not second.called
    assert len(threads.calls) == 1
    threads.runNext()
    assert result(first).id == "one" and result(second) is None
    assert opened and threading.current_thread().name not in opened
    assert result(sts.policy("example.org")).id == "one"
    assert threads.calls == [] and len(opened) == 1


@pytest.mark.parametrize(
    "error, said",
    [
        (defer.TimeoutError(60.0, "Deferred"), "no answer within 60s"),
        (defer.CancelledError(), "no answer within 60s"),
    ],
)
def test_fetch_failures_are_said_in_words(world: Any, error: Exception, said: str) -> None:
    """Found by a bug hunt: "(60.0, 'Deferred')" and "[<twisted.python.failure.Failure ...>]"
    were the reasons in the log."""
    world.fetches.texts["example.org"] = error
    with capturedLogs() as events:
        assert result(world.sts().policy("example.org")) is None
    (line,) = [formatEvent(e) for e in events if "cannot fetch" in formatEvent(e)]
    assert line == f"MTA-STS: cannot fetch the policy of example.org (id one): {said}; no policy"


def test_a_refused_connection_of_the_agent_is_said_in_words(world: Any) -> None:
    from twisted.python.failure import Failure
    from twisted.web.client import ResponseNeverReceived

    from mailrelay.route.mtasts import describeFetchError

    error = ResponseNeverReceived([Failure(ConnectionRefusedError("Connection refused"))])
    assert describeFetchError(error) == "Connection refused"
    # With the SMTP client's words for TLS (what the relay gives it):
    from OpenSSL import SSL

    from mailrelay.delivery.tls import describeTLSFailure

    untrusted = ResponseNeverReceived([Failure(SSL.Error([("SSL routines", "",
                                                            "certificate verify failed")]))])
    assert describeFetchError(untrusted, describeTLS=describeTLSFailure) == (
        "certificate not trusted (certificate verify failed)")
    assert describeFetchError(PolicyError("HTTP status 404 (not 200)")) == (
        "HTTP status 404 (not 200)")


def test_a_policy_of_mode_none_is_logged_without_mx(world: Any) -> None:
    world.fetches.texts["example.org"] = b"version: STSv1\nmode: none\nmax_age: 86400\n"
    with capturedLogs() as events:
        result(world.sts().policy("example.org"))
    (line,) = [formatEvent(e) for e in events]
    assert line == "MTA-STS: policy of example.org (id one): mode none, max_age 86400"


def test_domains_without_a_policy_are_forgotten(world: Any, monkeypatch: Any) -> None:
    """What is known of domains without a policy is kept for RECHECK, not for ever (a relay
    sending to many domains; found by the final review); a policy to keep stays."""
    from mailrelay.route import mtasts

    monkeypatch.setattr(mtasts, "MAX_KNOWN", 5)
    sts = world.sts()
    result(sts.policy("example.org"))
    for n in range(10):
        result(sts.policy(f"d{n}.example"))
    assert len(sts._known) == 11
    world.now.t += RECHECK
    result(sts.policy("another.example"))
    assert sorted(sts._known) == ["another.example", "example.org"]


def test_expired_policies_are_not_written_again(world: Any) -> None:
    sts = world.sts()
    result(sts.policy("example.org"))
    world.now.t += 86400  # example.org's has expired
    world.resolver.records["_mta-sts.other.example"] = ["v=STSv1; id=x"]
    world.fetches.texts["other.example"] = POLICY.encode()
    result(sts.policy("other.example"))
    saved = json.loads(Path(world.cache).read_text())["policies"]
    assert [p["domain"] for p in saved] == ["other.example"]


def _temporaries(cache: str) -> list[str]:
    directory = Path(cache).parent
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_a_failed_write_of_the_cache_leaves_no_temporary_file(world: Any) -> None:
    """Found by a review: a write of the cache that failed (the spool's disk full; here the
    rename onto a directory in its place) left C{mta-sts.json.PID.tmp} in the spool, one a
    failure.  It is removed, and the failure said once, naming the cache file."""
    os.mkdir(world.cache)
    Path(world.cache, "keep").write_text("")  # (a directory os.replace cannot replace)
    with capturedLogs() as events:
        assert result(world.sts().policy("example.org")).mode == "enforce"
    assert _temporaries(world.cache) == []
    said = [formatEvent(e) for e in events if "cannot write" in formatEvent(e)]
    assert said == [f"MTA-STS: cannot write the cache {world.cache}: Is a directory"], said


def test_temporary_files_left_by_a_crash_are_removed(world: Any) -> None:
    """A write interrupted by a crash (or a power cut) left its temporary file for good:
    those of processes no longer running are removed when the cache is first read (as
    Postfix's postsuper at start removes the temporary files left in its queue), those of
    a running process (during a reload the old delivery process may be writing) are not."""
    dead = _deadPid()
    for pid in (dead, os.getppid(), os.getpid()):
        Path(f"{world.cache}.{pid}.tmp").write_text("{")
    Path(f"{world.cache}.notapid.tmp").write_text("")  # (not a name of the relay's)
    Path(world.cache).write_text("{not json")  # (said, and the leftovers removed all the same)
    with capturedLogs() as events:
        assert result(world.sts().policy("example.org")).mode == "enforce"
    assert sum("not read" in formatEvent(e) for e in events) == 1
    assert _temporaries(world.cache) == sorted(
        [f"mta-sts.json.{os.getppid()}.tmp", "mta-sts.json.notapid.tmp"])
    said = sorted(formatEvent(e) for e in events if "removed" in formatEvent(e))
    assert said == sorted(f"MTA-STS: removed {world.cache}.{pid}.tmp, left by an interrupted "
                          f"write" for pid in (dead, os.getpid())), said


def _deadPid() -> int:
    """The process id of a process that has ended (and been waited for)."""
    import subprocess

    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_a_lasting_cache_write_failure_is_logged_once_a_minute_and_its_end_once(
        world: Any) -> None:
    """Found by a review: while the cache could not be written (the spool's disk full), each
    new policy logged "cannot write the cache": a flood exactly when the disk is full.  The
    first failure is logged, then at most one a minute saying how many were not (Postfix's
    msg_rate_delay(3), which its dict_cache uses for its caches' errors), and one line when
    the cache is written again."""
    os.mkdir(world.cache)
    Path(world.cache, "keep").write_text("")  # (a directory os.replace cannot replace)
    sts = world.sts()
    for i in range(6):
        world.resolver.records[f"_mta-sts.d{i}.example"] = ["v=STSv1; id=x"]
        world.fetches.texts[f"d{i}.example"] = POLICY.encode()
    failed = f"MTA-STS: cannot write the cache {world.cache}: Is a directory"
    with capturedLogs() as events:
        for i in range(4):
            assert result(sts.policy(f"d{i}.example")).mode == "enforce"
            world.now.t += 10
        world.now.t += 30  # a minute since the first failure
        result(sts.policy("d4.example"))
        Path(world.cache, "keep").unlink()
        os.rmdir(world.cache)
        result(sts.policy("d5.example"))
    said = [formatEvent(e) for e in events if "the cache" in formatEvent(e)]
    assert said == [failed, failed + " (3 more times since the last such line)",
                    f"MTA-STS: the cache {world.cache} is written again"], said
    assert json.loads(Path(world.cache).read_text())["policies"]

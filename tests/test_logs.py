"""Unit tests of the log level (L{mailrelay.app.logs}): events below it are dropped before
any formatting, Twisted's DNS port chatter counts as debug, and twistd's own observer gets
the filter."""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import pytest
from twisted.application.service import Application
from twisted.logger import ILogObserver, Logger, LogLevel, LogPublisher, textFileLogObserver
from twisted.python import log as legacy

from mailrelay.app.logs import LevelFilter, filtered, installTwistdObserver
from mailrelay.config.keys import LOG_LEVELS


class Costly:
    """A value that counts how often it is formatted."""

    def __init__(self) -> None:
        self.formatted = 0

    def __format__(self, spec: str) -> str:
        self.formatted += 1
        return "costly"


def publisherTo(levels: LevelFilter) -> tuple[Logger, io.StringIO]:
    out = io.StringIO()
    publisher = LogPublisher(filtered(textFileLogObserver(out), levels))
    return Logger(namespace="test", observer=publisher), out


def test_levelsAreTwisted() -> None:
    assert LOG_LEVELS == ("debug", "info", "warn", "error", "critical")


def test_belowTheLevelNotFormatted() -> None:
    levels = LevelFilter()
    log, out = publisherTo(levels)
    value = Costly()
    log.debug("debug {value}", value=value)
    assert value.formatted == 0 and out.getvalue() == ""
    log.info("info {value}", value=value)
    assert value.formatted == 1 and "info costly" in out.getvalue()


def test_levelChanges() -> None:
    levels = LevelFilter()
    log, out = publisherTo(levels)
    levels.setLevel("warn")
    log.info("not this")
    log.warn("but this")
    levels.setLevel("debug")
    log.debug("and this")
    text = out.getvalue()
    assert "not this" not in text and "but this" in text and "and this" in text
    assert levels.level is LogLevel.debug


def legacyEvent(text: str) -> dict[str, Any]:
    """An event as twisted.python.log.msg(text) publishes it to new-style observers."""
    events: list[dict[str, Any]] = []
    publisher = legacy.LogPublisher()
    publisher.addObserver(lambda e: events.append(e))
    publisher.msg(text)
    (event,) = events
    event.setdefault("log_namespace", "log_legacy")
    event.setdefault("log_level", LogLevel.info)
    return event


@pytest.mark.parametrize(
    "noise, kept",
    [
        # Twisted's four lines about each DNS query's UDP port; the TCP listener's are kept.
        (
            [
                "DNSDatagramProtocol starting on 14431",
                "Starting protocol <twisted.names.dns.DNSDatagramProtocol object at 0x7f21>",
                "(UDP Port 14431 Closed)",
                "Stopping protocol <twisted.names.dns.DNSDatagramProtocol object at 0x7f21>",
            ],
            ["SMTPServerFactory starting on 2525", "(TCP Port 2525 Closed)"],
        ),
        # Its resolver's lines of reading the system's resolv.conf (at start, in each
        # process, and at each change); a line that only ends alike is kept.
        (
            [
                "b'/etc/resolv.conf' changed, reparsing",
                "/etc/resolv.conf changed, reparsing",
                "Resolver added ('10.255.255.53', 53) to server list",
                "Resolver added ('2001:db8::53', 53) to server list",
            ],
            ["the policy file changed, reparsing it", "Resolver added to server list"],
        ),
    ],
)
def test_twistedDNSChatterIsDebug(noise: list[str], kept: list[str]) -> None:
    """Twisted's DNS chatter passes only at debug; other lines are kept."""
    levels = LevelFilter()
    passed = [text for text in noise + kept if levels(legacyEvent(text)).name == "maybe"]
    assert passed == kept
    levels.setLevel("debug")
    assert all(levels(legacyEvent(text)).name == "maybe" for text in noise)


def test_installTwistdObserver(tmp_path) -> None:
    """The application gets twistd's observer (here its log file) behind the filter; not
    when twistd has a --logger, or the application has an observer already."""
    from twisted.scripts.twistd import ServerOptions

    options = ServerOptions()
    options.parseOptions(["--logfile", str(tmp_path / "twistd.log"), "--pidfile=", "mailrelay"])
    application = Application("test")
    levels = LevelFilter(LogLevel.warn)
    assert installTwistdObserver(application, options, levels)
    observer = application.getComponent(ILogObserver)
    log = Logger(namespace="test", observer=observer)
    log.info("quiet")
    log.error("loud")
    text = (tmp_path / "twistd.log").read_text()
    assert "loud" in text and "quiet" not in text
    assert not installTwistdObserver(application, options, levels)  # already has one
    options["logger"] = "some.factory"
    assert not installTwistdObserver(Application("other"), options, levels)


def syslogged(monkeypatch, levels: LevelFilter) -> tuple[Logger, list[tuple[int, str]]]:
    """A logger through the observer twistd's C{--syslog} gets, and the C{(priority, line)}
    pairs it would send to syslog."""
    from twisted.python import syslog as twistedSyslog
    from twisted.scripts.twistd import ServerOptions

    sent: list[tuple[int, str]] = []
    monkeypatch.setattr(twistedSyslog.SyslogObserver, "openlog", lambda *args: None)
    monkeypatch.setattr(twistedSyslog.SyslogObserver, "syslog",
                        lambda self, priority, line: sent.append((priority, line)))
    options = ServerOptions()
    options.parseOptions(["--syslog", "--prefix", "mailrelay", "--pidfile=", "mailrelay"])
    application = Application("test")
    assert installTwistdObserver(application, options, levels)
    return Logger(namespace="test", observer=application.getComponent(ILogObserver)), sent


def test_syslogPriorityIsTheLevel(monkeypatch) -> None:
    """With twistd's --syslog each line has the priority of its level, as Postfix's
    warnings are LOG_WARNING and its errors LOG_ERR: not LOG_INFO for every warning and
    LOG_ALERT for every error, as twistd's observer gives (a syslog filter on the
    priority would miss the warnings)."""
    import syslog

    log, sent = syslogged(monkeypatch, LevelFilter(LogLevel.debug))
    log.debug("d")
    log.info("i")
    log.warn("w")
    log.error("e")
    log.critical("c")
    try:
        1 / 0
    except ZeroDivisionError:
        log.failure("f")
    first = [(priority & 7, line) for priority, line in sent
             if re.fullmatch(r"\[.*\] \w", line)]
    assert first == [(syslog.LOG_DEBUG, "[test#debug] d"), (syslog.LOG_INFO, "[test#info] i"),
                     (syslog.LOG_WARNING, "[test#warn] w"), (syslog.LOG_ERR, "[test#error] e"),
                     (syslog.LOG_CRIT, "[test#critical] c"),
                     (syslog.LOG_CRIT, "[test#critical] f")], sent
    assert any("ZeroDivisionError" in line for _, line in sent), sent  # (its traceback)
    log.warn("{what} below", what="filtered")
    assert sent[-1] == (syslog.LOG_MAIL | syslog.LOG_WARNING, "[test#warn] filtered below")


def test_syslogFacilityIsMail(monkeypatch) -> None:
    """With twistd's --syslog the lines go to the mail facility, as Postfix's
    (syslog_facility = mail: /var/log/mail.log), not twistd's default, user."""
    import syslog

    log, sent = syslogged(monkeypatch, LevelFilter())
    log.info("hello")
    log.error("oops")
    assert [priority & ~7 for priority, _ in sent] == [syslog.LOG_MAIL] * 2, sent


class BrokenPipe(io.StringIO):
    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")


def test_deliveryProcessSendsEventsAsTheyAre() -> None:
    """The delivery process's observer is a modern one: the filter hands it each event as it
    was logged (no conversion to Twisted's legacy form on the way), and it sends one line the
    relay decodes to the same text."""
    from mailrelay.app.deliveryprocess import relayObserver
    from mailrelay.queue.process import decodeLogEvent

    out, err = io.StringIO(), io.StringIO()
    observer = relayObserver(out, err)
    assert ILogObserver.providedBy(observer)
    levels = LevelFilter()
    chain = filtered(observer, levels)
    assert chain._observer is observer  # type: ignore[attr-defined]
    log = Logger(namespace="mailrelay.queue", observer=LogPublisher(chain))
    log.info("{queueID}: status=sent", queueID="01ABC")
    line = out.getvalue()
    assert line.endswith("\n") and line.count("\n") == 1
    event = decodeLogEvent(line[:-1])
    assert event["log_text"] == "01ABC: status=sent"
    assert event["log_namespace"] == "mailrelay.queue" and event["log_level"] is LogLevel.info
    assert err.getvalue() == ""


def test_deliveryProcessLogsToStderrOnceTheRelayIsGone() -> None:
    from mailrelay.app.deliveryprocess import relayObserver

    err = io.StringIO()
    log = Logger(namespace="mailrelay.queue", observer=relayObserver(BrokenPipe(), err))
    log.info("one")
    log.info("two")
    assert err.getvalue().count("\n") == 2
    assert "one" in err.getvalue() and "two" in err.getvalue()


class Unprintable:
    def __format__(self, spec: str) -> str:
        raise ValueError("no")

    def __repr__(self) -> str:
        raise ValueError("no")


def classicEvents() -> list[dict[str, Any]]:
    """Events as the relay logs them, and the awkward ones."""
    from twisted.python.failure import Failure

    try:
        1 / 0
    except ZeroDivisionError:
        failure = Failure()
    when = 1764576000.25
    base = {"log_time": when, "log_namespace": "mailrelay.cleanup.intake",
            "log_level": LogLevel.info}
    return [
        {**base, "log_format": "{queueID}: from=<{sender}> nrcpt={n} size={size}",
         "queueID": "01K1", "sender": "a@example.com", "n": 1, "size": 5050},
        {**base, "log_format": "value {v!r} spec {x:>6.2f} item {d[k]} attr {e.real}",
         "v": "é\u2603", "x": 3.14159, "d": {"k": "K"}, "e": 2},
        {**base, "log_format": "two\nlines\r\nhere"},
        {**base, "log_format": "called {f()}", "f": lambda: "yes"},
        {**base, "log_format": "missing {nothere}"},
        {**base, "log_format": "bad {u}", "u": Unprintable()},
        {**base, "log_format": "with a failure", "log_failure": failure},
        {**base, "log_format": ""},
        {**base, "log_format": None},
        {**base, "log_format": b"bytes {x}", "x": 1},
        {**base, "log_format": "{log_text}", "log_text": "from the delivery process"},
        {"log_format": "no time, namespace or level"},
        {**base, "log_format": "system {x}", "x": 1, "log_system": "child#3"},
        {**base, "log_format": "level none", "log_level": None},
        {"log_time": when + 0.5, "log_format": "same second", "log_level": LogLevel.warn,
         "log_namespace": "n"},
        {"log_time": when + 1, "log_format": "next second", "log_level": LogLevel.error,
         "log_namespace": "n"},
    ]


def test_classicLogTextWritesWhatTwistedWrites() -> None:
    """The relay's formatter gives, event for event, the text of Twisted's own
    textFileLogObserver (the fast path and the fall-backs alike)."""
    from twisted.logger import formatEventAsClassicLogText, formatTime

    from mailrelay.app.logs import classicLogText

    ours = classicLogText()
    for event in classicEvents():
        theirs = formatEventAsClassicLogText(event, formatTime=lambda e: formatTime(e))
        assert ours(dict(event)) == theirs, event


def test_twistdsObserverGetsTheFasterFormatter(tmp_path) -> None:
    from twisted.logger import FileLogObserver
    from twisted.scripts.twistd import ServerOptions

    options = ServerOptions()
    options.parseOptions(["--logfile", str(tmp_path / "twistd.log"), "--pidfile=", "mailrelay"])
    application = Application("test")
    assert installTwistdObserver(application, options, LevelFilter())
    chain = application.getComponent(ILogObserver)
    observer = chain._observer  # type: ignore[attr-defined]
    assert type(observer) is FileLogObserver
    assert observer.formatEvent.__qualname__ == "classicLogText.<locals>.formatEvent"
    Logger(namespace="mailrelay.test", observer=chain).info("hello {who}", who="world")
    line = (tmp_path / "twistd.log").read_text().splitlines()[-1]
    assert line.endswith(" [mailrelay.test#info] hello world"), line


def test_eventTextIsTwistedsFormatEvent() -> None:
    """The delivery process's records carry the text Twisted's formatEvent gives."""
    from twisted.logger import formatEvent

    from mailrelay.queue.process import eventText

    for event in classicEvents():
        assert eventText(dict(event)) == formatEvent(event), event


def test_childsLegacyEventsKeepTheirSystem() -> None:
    """An event a child logs through twisted.python.log (Twisted's resolver re-reading
    resolv.conf, say) has a system ("-"); the relay's line for it shows that system, as
    the relay's own line for the same event does, not the "log_legacy#info" made up from
    the namespace when there is none."""
    from twisted.logger import globalLogPublisher

    from mailrelay.app.deliveryprocess import relayObserver
    from mailrelay.app.logs import classicLogText
    from mailrelay.queue.process import decodeLogEvent

    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        legacy.msg("b'/etc/resolv.conf' changed, reparsing")
        legacy.msg("a request", system="HTTPChannel,0,127.0.0.1")
    finally:
        globalLogPublisher.removeObserver(events.append)
    form = classicLogText()
    lines = []
    for event in events[-2:]:
        out = io.StringIO()
        relayObserver(out, io.StringIO())(event)
        line = form(decodeLogEvent(out.getvalue()[:-1]))
        assert line == form(dict(event))
        lines.append(line)
    assert " [-] b'/etc/resolv.conf' changed, reparsing\n" in lines[0]
    assert " [HTTPChannel,0,127.0.0.1] a request\n" in lines[1]


def test_the_log_file_is_given_to_the_run_user(reachable: Path) -> None:
    """twistd --logfile with --uid: root creates the file before the drop, and Twisted's
    rotation (at 1 MB, on SIGUSR1) then did nothing, silently.  The relay gives it to the
    run user, and says when its directory will not let that user rotate it."""
    import os

    from twisted.logger import capturedLogs, formatEvent

    from mailrelay.app.logs import giveLogFile

    if os.geteuid() != 0:
        pytest.skip("changing a file's owner needs root")
    logs = reachable / "logs"
    logs.mkdir(mode=0o755)
    path = logs / "twistd.log"
    path.write_text("")
    with capturedLogs() as events:
        giveLogFile(str(path), 65534, 65534)
    assert (path.stat().st_uid, path.stat().st_gid) == (65534, 65534)
    assert any("is not writable by the relay's user" in formatEvent(e) for e in events)
    os.chown(logs, 65534, 65534)
    with capturedLogs() as events:
        giveLogFile(str(path), 65534, 65534)
    assert not events


def test_a_pid_file_the_run_user_cannot_remove_is_said(reachable: Path) -> None:
    """twistd --pidfile with --uid: the relay's user removes the pid file at the stop, which
    it cannot in a directory only root may write (the README's /run): twistd then left it
    behind at every stop, saying only 'No permission to delete pid file' as it exited.  The
    relay says at start where to put it instead; not when the user may remove it."""
    import os

    from twisted.logger import capturedLogs, formatEvent

    from mailrelay.app.logs import checkPidFile

    if os.geteuid() != 0:
        pytest.skip("changing a directory's owner needs root")
    run = reachable / "run"
    run.mkdir(mode=0o755)
    with capturedLogs() as events:
        checkPidFile(str(run / "mailrelay.pid"), 65534, 65534)
    said = [formatEvent(e) for e in events]
    assert len(said) == 1 and f"the pid file {run}/mailrelay.pid will stay after" in said[0], said
    os.chown(run, 65534, 65534)
    with capturedLogs() as events:
        checkPidFile(str(run / "mailrelay.pid"), 65534, 65534)
    assert not events



#: A process id no process has (above Linux's largest pid_max).
GONE = 2**31 - 1


def test_a_pid_file_in_a_sticky_directory_that_the_run_user_may_not_remove_is_said(
    reachable: Path,
) -> None:
    """twistd --pidfile /tmp/... with --uid: /tmp lets every user make files, but (sticky)
    remove only its own, and twistd wrote the pid file as root: the relay's user cannot
    remove it at the stop, which its directory's mode bits did not say (no warning, and
    the file stayed).  Checked from the owners and the sticky bit: no other user needed."""
    import os

    from twisted.logger import capturedLogs, formatEvent

    from mailrelay.app.logs import checkPidFile

    sticky = reachable / "tmp"
    sticky.mkdir()
    sticky.chmod(0o1777)
    pidfile = sticky / "mailrelay.pid"
    pidfile.write_text(f"{os.getpid()}\n")
    other = os.getuid() + 4242  # (the relay's user: not the file's owner)
    with capturedLogs() as events:
        checkPidFile(str(pidfile), other, other)
    said = [formatEvent(e) for e in events]
    assert len(said) == 1, said
    assert said[0].startswith(f"the pid file {pidfile} will stay after the relay stops: its "
                              f"directory {sticky} is sticky"), said
    with capturedLogs() as events:  # the file's owner may remove it
        checkPidFile(str(pidfile), os.getuid(), os.getgid())
    assert not events
    sticky.chmod(0o777)  # not sticky: whoever may write the directory may
    with capturedLogs() as events:
        checkPidFile(str(pidfile), other, other)
    assert not events


def test_a_stale_pid_file_we_may_not_remove_stops_the_start_with_one_line(
    tmp_path: Path,
) -> None:
    """Started (not as root) with a pid file left by a process that is gone, which this
    user may not remove (another user's, in a sticky directory such as /tmp): twistd went
    to remove it and died of a PermissionError traceback.  The relay now says why in one
    line naming the file, before twistd looks; a pid file it may remove, or of a process
    that runs (twistd says so), or none, goes on."""
    import os

    from mailrelay.app.logs import refuseStalePidFile

    sticky = tmp_path / "tmp"
    sticky.mkdir()
    sticky.chmod(0o1777)
    pidfile = sticky / "mailrelay.pid"
    pidfile.write_text(f"{GONE}\n")
    other = os.getuid() + 4242  # (the user starting twistd: not the file's owner)
    with pytest.raises(SystemExit) as e:
        refuseStalePidFile(str(pidfile), other)
    assert str(e.value) == (
        f"mailrelay: error: the pid file {pidfile} is left by a process that is gone (pid "
        f"{GONE}), and this user may not remove it: its directory {sticky} is sticky (mode "
        "1777) and the file is not this user's: only its owner, the directory's or root may "
        "remove it; remove it, or give twistd another --pidfile")
    refuseStalePidFile(str(pidfile), os.getuid())  # its owner may
    pidfile.write_text(f"{os.getpid()}\n")
    refuseStalePidFile(str(pidfile), other)  # (running: twistd says so)
    refuseStalePidFile(str(sticky / "none.pid"), other)


@pytest.fixture
def reachable():
    """A directory the user nobody can reach (pytest's C{tmp_path} is in root's own
    C{/tmp/pytest-of-root}, 0700), removed after the test."""
    import shutil
    import tempfile

    directory = Path(tempfile.mkdtemp(prefix="mailrelay-logs-"))
    directory.chmod(0o755)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def test_the_run_users_directory_is_asked_of_the_system(reachable: Path) -> None:
    """Whether the run user may make and remove files in a directory (its log file's, its
    pid file's) is asked of the system, as the user (as L{runUserReadError} is): the
    directories on the way, the user's groups and ACLs count, not only the directory's
    mode bits.  A directory of the user's own in a directory it cannot enter is not
    writable by it (its mode bits said it was: no warning, and the pid file stayed)."""
    import grp
    import os
    import pwd

    from twisted.logger import capturedLogs, formatEvent

    from mailrelay.app.logs import checkPidFile

    if os.geteuid() != 0:
        pytest.skip("becoming another user needs root")
    try:
        nobody = pwd.getpwnam("nobody").pw_uid
        nogroup = grp.getgrnam("nogroup").gr_gid
    except KeyError:
        pytest.skip("no user nobody or group nogroup")
    top = reachable
    for mode, told in ((0o700, True), (0o755, False)):
        top.chmod(mode)  # (root's: nobody may enter it, or not)
        run = top / f"run{mode:o}"
        run.mkdir(mode=0o755)
        os.chown(run, nobody, nogroup)
        with capturedLogs() as events:
            checkPidFile(str(run / "mailrelay.pid"), nobody, nogroup)
        said = [formatEvent(e) for e in events]
        assert bool(said) is told, (mode, said)


def test_twistds_scan_of_a_failing_dropin_is_debug(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """twistd's own plugin scan (for its commands, before any of mailrelay's code runs)
    logs a site dropin that fails to import as "Unhandled Error" with its traceback, and
    twistd writes it again in the relay's log once logging starts; the relay's scan then
    says it in one line naming the file and the error (mailrelay.config.plugins._scan).
    The traceback now passes only at debug, so that the log at start holds that line
    alone; other failures are kept."""
    from twisted.logger import capturedLogs
    from twisted.plugin import IPlugin, getPlugins

    import twisted.plugins

    site = tmp_path / "site" / "twisted" / "plugins"
    site.mkdir(parents=True)
    (site / "acme_scan_plugin.py").write_text("import acme_ldap_client_not_installed\n")
    monkeypatch.setattr(twisted.plugins, "__path__", [str(site)])
    with capturedLogs() as events:
        assert list(getPlugins(IPlugin, twisted.plugins)) == []
        try:
            1 / 0
        except ZeroDivisionError:
            legacy.err()
    scan, other = [e for e in events if e.get("failure") is not None]
    assert "acme_ldap_client_not_installed" in scan["failure"].getTraceback()
    levels = LevelFilter()
    assert (levels(scan).name, levels(other).name) == ("no", "maybe")
    levels.setLevel("debug")
    assert levels(scan).name == "maybe"

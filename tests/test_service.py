"""Running as a service: the systemd unit (etc/mailrelay.service, checked with
C{systemd-analyze}), the notifications to systemd (L{mailrelay.app.systemd}) from the real
twistd, and the run user twistd drops to (L{mailrelay.app.tap.runAs})."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pytest
from twisted.internet.task import Clock
from twisted.logger import formatEvent

from mailrelay.app.systemd import Notifier, notify
from mailrelay.app.tap import runAs
from tests.harness import REPO, TWISTD, RelayProcess

UNIT = REPO / "etc" / "mailrelay.service"


def systemdAnalyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("systemd-analyze is not installed; .ci/run must install systemd")
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    return path


def settings(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, value = line.split("=", 1)
            found.setdefault(key, []).append(value)
    return found


def test_unitSettings() -> None:
    """Type=notify with twistd in the foreground, reload by SIGHUP, SIGTERM to twistd alone
    (KillMode=mixed), long enough a stop for both drains, and never root."""
    unit = settings(UNIT.read_text())
    assert unit["Type"] == ["notify"] and unit["KillMode"] == ["mixed"]
    (start,) = unit["ExecStart"]
    assert "--nodaemon" in start.split() and "--pidfile=" in start.split()
    assert start.split()[start.split().index("--pidfile=") + 1] == "mailrelay"
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert int(unit["TimeoutStopSec"][0]) > 2 * 30
    assert unit["User"] == ["mailrelay"] and unit["NoNewPrivileges"] == ["yes"]


def test_unitVerifies(tmp_path: Path) -> None:
    """systemd-analyze verify finds nothing to say (ExecStart pointed at this twistd), and
    its security review rates the unit's exposure low."""
    analyze = systemdAnalyze()
    unit = tmp_path / "mailrelay.service"
    unit.write_text(UNIT.read_text().replace("/opt/mailrelay/bin/twistd", TWISTD))
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                            timeout=120)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    result = subprocess.run([analyze, "security", "--offline=yes", str(unit)],
                            capture_output=True, text=True, timeout=120)
    m = re.search(r"Overall exposure level for mailrelay\.service: ([\d.]+)", result.stdout)
    assert m, result.stdout + result.stderr
    assert float(m.group(1)) < 2.5, result.stdout


# ---------------------------------------------------------------------------------------------
# sd_notify


def listen(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(30)
    return s


def test_notifyAbstractAndPath(tmp_path: Path) -> None:
    name = f"\0mailrelay-test-{os.getpid()}"
    with listen(name) as s:
        assert notify("READY=1", {"NOTIFY_SOCKET": "@" + name[1:]})
        assert s.recv(1024) == b"READY=1"
    with listen(str(tmp_path / "notify")) as s:
        assert notify("STOPPING=1", {"NOTIFY_SOCKET": str(tmp_path / "notify")})
        assert s.recv(1024) == b"STOPPING=1"
    assert not notify("READY=1", {})
    assert not notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "nobody-there")})


def test_watchdog(tmp_path: Path) -> None:
    """With WatchdogSec= (WATCHDOG_USEC for our pid), pings at half the period, until the
    stop."""
    clock = Clock()
    path = str(tmp_path / "notify")
    with listen(path) as s:
        s.settimeout(0.5)
        environ = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "10000000",
                   "WATCHDOG_PID": str(os.getpid())}
        notifier = Notifier(clock, environ)
        notifier.ready("running")
        assert s.recv(1024).startswith(b"READY=1\nSTATUS=running\n")
        assert s.recv(1024) == b"WATCHDOG=1"
        clock.advance(5)
        assert s.recv(1024) == b"WATCHDOG=1"
        notifier.stopping()
        assert s.recv(1024) == b"STOPPING=1"
        clock.advance(5)
        with pytest.raises(TimeoutError):
            s.recv(1024)
        other = Notifier(clock, {**environ, "WATCHDOG_PID": "1"})  # not ours
        other.ready("running")
        assert s.recv(1024).startswith(b"READY=1")
        with pytest.raises(TimeoutError):
            s.recv(1024)


def test_notificationsFromTwistd(tmp_path: Path) -> None:
    """The real twistd says READY=1 once it listens, RELOADING=1 then READY=1 around a
    reload (SIGHUP), and STOPPING=1 when it stops."""
    path = str(tmp_path / "notify")
    with listen(path) as s:
        r = RelayProcess(tmp_path / "relay", "", env={"NOTIFY_SOCKET": path}, hold=True)
        r.start()
        try:
            ready = s.recv(4096).decode()
            assert ready.startswith("READY=1\nSTATUS=1 listener(s), delivery held\n"), ready
            assert r.process is not None and f"MAINPID={r.process.pid}" in ready
            r.process.send_signal(signal.SIGHUP)
            assert s.recv(4096).decode().startswith("RELOADING=1\nMONOTONIC_USEC=")
            assert s.recv(4096).decode().startswith("READY=1")
            r.waitForLog("configuration reloaded")
        finally:
            r.stop()
        assert s.recv(4096) == b"STOPPING=1"


# ---------------------------------------------------------------------------------------------
# The run user


def test_runAs(monkeypatch) -> None:
    """twistd's --uid/--gid as the spool's owner: the user's own group when only --uid is
    given; nothing when not root or neither is given."""
    import pwd

    monkeypatch.setattr(os, "geteuid", lambda: 0)
    nobody = pwd.getpwnam("nobody")
    assert runAs({"uid": nobody.pw_uid, "gid": None}) == (nobody.pw_uid, nobody.pw_gid)
    assert runAs({"uid": nobody.pw_uid, "gid": 5}) == (nobody.pw_uid, 5)
    assert runAs({"uid": None, "gid": 5}) == (-1, 5)
    assert runAs({"uid": None, "gid": None}) is None
    assert runAs(None) is None
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert runAs({"uid": nobody.pw_uid, "gid": None}) is None


def test_a_relative_configuration_path_is_made_absolute(tmp_path: Path, monkeypatch) -> None:
    """C{--config relay.toml} is the file in the directory twistd was started in: the relay
    names it so (C{mailrelay status}, C{reload}) and reads it so at each reload, even after
    twistd's C{--rundir} changed directory."""
    from mailrelay.app.tap import Options

    monkeypatch.chdir(tmp_path)
    options = Options()
    options.parseOptions(["--config", "relay.toml"])
    assert options["config"] == str(tmp_path / "relay.toml")
    options = Options()
    options.parseOptions([])
    assert options["config"] is None


def test_a_daemon_that_cannot_start_tells_the_whole_error(tmp_path: Path) -> None:
    """A daemonizing twistd's parent (the command run) prints only the first 100 octets of
    the status pipe, and the daemon's own standard error is /dev/null: the relay writes the
    whole message on the command's standard error, kept for it
    (C{RelayService.startErrors}), and its status pipe points there.  Without that copy
    the pipe carries what fits, as before."""
    from mailrelay.app.relay import RelayService

    message = "mailrelay: error: --listen: cannot listen on unix:/run/" + "x" * 100 + ": why"
    for kept in (True, False):
        relay = RelayService(Clock())
        statusRead, statusWrite = os.pipe()
        relay.twistdOptions = {"statusPipe": statusWrite}
        if kept:
            errorsRead, relay.startErrors = os.pipe()
            os.set_blocking(errorsRead, False)
        relay._failedStart(SystemExit(message))
        status = os.read(statusRead, 1000)
        os.close(statusRead)
        assert relay.twistdOptions["statusPipe"] is None
        if kept:
            assert readToEnd(errorsRead) == message.encode() + b"\n"
            assert status == b"1 the relay did not start: see the error above"
            assert relay.startErrors is None
        else:
            assert status == b"1 " + message.encode()[:98]


def test_a_daemon_that_started_lets_go_of_the_commands_standard_error() -> None:
    """Once started, the daemon closes its copy of the command's standard error: a caller
    reading it to its end (a script's C{$(...)}) is not held until the relay stops."""
    from mailrelay.app.relay import RelayService

    relay = RelayService(Clock())
    errorsRead, relay.startErrors = os.pipe()
    os.set_blocking(errorsRead, False)
    relay.startedWell()
    assert relay.startErrors is None
    assert readToEnd(errorsRead) == b""


def readToEnd(fd: int) -> bytes:
    """What the non-blocking C{fd} holds, once its writer closed it (else: fails at once,
    not waiting); C{fd} is closed."""
    try:
        data = b""
        while chunk := os.read(fd, 65536):
            data += chunk
        return data
    except BlockingIOError:
        raise AssertionError("the writing end is still open") from None
    finally:
        os.close(fd)


def test_a_configuration_error_preparing_the_fork_server_stops_the_start(
    tmp_path: Path, monkeypatch
) -> None:
    """The fork server's preparation lists the installed plugins (to preload the built-in
    ones' modules); their being refused there (two plugins of one name) is the same
    one-line configuration error as anywhere else, not a traceback."""
    from mailrelay.app import forkserver, plugins
    from mailrelay.app.tap import Options, makeService
    from mailrelay.errors import ConfigError

    def refused() -> None:
        raise ConfigError("two installed plugins are named 'site-gate': ...")

    monkeypatch.setattr(plugins, "availablePlugins", refused)
    monkeypatch.setattr(forkserver, "usable", lambda twistdOptions: None)
    config = tmp_path / "relay.toml"
    config.write_text(f'[spool]\ndirectory = "{tmp_path / "spool"}"\n'
                      '[[listeners]]\nendpoint = "tcp:0:interface=127.0.0.1"\n')
    options = Options()
    options.parseOptions(["--config", str(config)])
    with pytest.raises(SystemExit) as raised:
        makeService(options)
    assert str(raised.value) == (
        "mailrelay: configuration error: two installed plugins are named 'site-gate': ...")


@pytest.mark.parametrize(("options", "toFile"), [
    ({"nodaemon": True, "logfile": None, "syslog": False}, False),
    ({"nodaemon": True, "logfile": "-", "syslog": False}, False),
    ({"nodaemon": False, "logfile": None, "syslog": True}, False),
    ({"nodaemon": True, "logfile": "relay.log", "syslog": False}, True),
    ({"nodaemon": False, "logfile": None, "syslog": False}, True),  # (twistd.log)
])
def test_whether_twistd_logs_to_a_file_it_rotates(options: dict, toFile: bool) -> None:
    """As twistd's UnixAppLogger decides (it installs its SIGUSR1 rotation only then)."""
    from mailrelay.app.tap import twistdLogsToFile

    assert twistdLogsToFile(options) is toFile


def test_sigusr1_is_handled_before_the_relay_listens_without_a_log_file(tmp_path: Path) -> None:
    """twistd listens before it runs the reactor: a SIGUSR1 then (a log rotation at the
    wrong moment) took its default action and killed the relay, where the handler saying
    there is no file to rotate was installed only once the reactor ran.  Without a log file
    twistd installs no handler of its own, so the relay's is installed as it is built."""
    from mailrelay.app.tap import installRotateSignalNow

    previous = signal.getsignal(signal.SIGUSR1)
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    try:
        clock = Clock()
        assert installRotateSignalNow(clock, {"nodaemon": True, "logfile": None,
                                              "syslog": False}) is True
        assert signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, None)
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        # With a log file, twistd's rotation is installed after the relay is built: left to it.
        assert installRotateSignalNow(clock, {"nodaemon": True, "logfile": "relay.log",
                                              "syslog": False}) is False
        assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGUSR1, previous)


class _Reactor:
    """What the stop handlers use of a reactor: C{callFromThread}, recorded."""

    def __init__(self) -> None:
        self.calls: list[tuple[object, ...]] = []

    def callFromThread(self, f: object, *args: object) -> None:
        self.calls.append((f, *args))


def test_a_stop_signal_at_any_moment_of_the_start_stops_the_relay_cleanly() -> None:
    """Found by a review: Twisted installs its SIGTERM and SIGINT handlers only as the
    reactor runs, after twistd has built and started the relay (control socket, spool lock,
    children): a SIGTERM before that (systemd's stop right after a start, a restart) took
    the default action and killed the relay on the spot, leaving control.sock (and a
    Ctrl-C a traceback).  The handlers are installed first thing as the relay is built, as
    the SIGHUP one is; a signal that comes before the reactor exists is kept and stops the
    reactor once it runs, and a second is said to be one."""
    from mailrelay.app.services import catchStopSignals, stopOnSignals, stopReactor

    signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)  # (all three it catches)
    previous = {sig: signal.getsignal(sig) for sig in signals}
    try:
        early = catchStopSignals()  # (first thing in makeService: no reactor yet)
        os.kill(os.getpid(), signal.SIGTERM)  # we survive it
        reactor = _Reactor()
        stopOnSignals(reactor, early)
        assert reactor.calls == [(stopReactor, reactor)]
        assert getattr(reactor, "_exitSignal") == signal.SIGTERM  # (twistd's exit status)
        os.kill(os.getpid(), signal.SIGINT)  # (no KeyboardInterrupt either)
        assert reactor.calls == [(stopReactor, reactor)]
        # A signal after the reactor is known, before it runs, goes the same way.
        later = _Reactor()
        stopOnSignals(later, catchStopSignals())
        os.kill(os.getpid(), signal.SIGINT)
        assert later.calls == [(stopReactor, later)]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def test_a_sighup_while_the_relay_is_built_reloads_once_it_runs() -> None:
    """SIGHUP's default action ends the process too: the reload handler was installed only
    once the relay was built (its plugins, the fork server, the spool), so a SIGHUP
    meanwhile (a reload asked just after a start) killed it on the spot.  It is caught
    first thing with the stop signals, and reloads once the reactor runs."""
    from mailrelay.app.services import catchStopSignals, stopOnSignals
    from mailrelay.app.tap import installReloadSignal

    signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    previous = {sig: signal.getsignal(sig) for sig in signals}
    try:
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        early = catchStopSignals()  # (first thing in makeService)
        assert signal.getsignal(signal.SIGHUP) not in (signal.SIG_DFL, signal.SIG_IGN, None)
        os.kill(os.getpid(), signal.SIGHUP)  # we survive it
        reactor = _Reactor()

        class Relay:
            def reload(self) -> bool:
                return True

        relay = Relay()
        installReloadSignal(reactor, relay, early)
        stopOnSignals(reactor, early)  # (not a stop)
        assert reactor.calls == [(relay.reload,)]
        os.kill(os.getpid(), signal.SIGHUP)
        assert reactor.calls == [(relay.reload,), (relay.reload,)]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def test_a_relative_or_default_spool_is_made_absolute(tmp_path: Path, monkeypatch) -> None:
    """C{--spool relspool}, and the default C{./mailrelay-spool} when neither the command
    line nor the file names a spool, are the directories of the directory twistd was
    started in: the relay gives them so to its children and its reloads, which run after
    twistd's C{--rundir} changed directory.  A spool the file names stays the file's."""
    from mailrelay.app.tap import Options

    monkeypatch.chdir(tmp_path)
    options = Options()
    options.parseOptions(["--spool", "relspool"])
    assert options["spool"] == str(tmp_path / "relspool")
    assert options.pinnedOverrides(None) == {"spool": str(tmp_path / "relspool")}
    options = Options()
    options.parseOptions([])
    assert options["spool"] is None
    assert options.pinnedOverrides(None) == {"spool": str(tmp_path / "mailrelay-spool")}
    assert options.pinnedOverrides(b"[queue]\nhold = true\n") == {
        "spool": str(tmp_path / "mailrelay-spool")
    }
    assert options.pinnedOverrides(b'[spool]\ndirectory = "s"\n') == {}
    assert options.overrides() == {}


def test_a_spool_the_file_names_after_the_default_was_pinned_waits_for_a_restart() -> None:
    """The default spool, made absolute for the relay's life (not given on the command
    line), is not said to come from C{--spool} when a reload's file names one: that one is
    used once the relay is restarted."""
    from types import SimpleNamespace

    from twisted.logger import capturedLogs

    from mailrelay.app.relay import RelayService

    relay = RelayService(Clock(), "/etc/relay.toml", {"spool": "/start/mailrelay-spool"})
    relay.pinned = frozenset({"spool"})
    text = b'[spool]\ndirectory = "/var/spool/relay"\n'
    with capturedLogs() as events:
        relay._sayOverridden(SimpleNamespace(source="/etc/relay.toml"), text)
    [said] = [formatEvent(e) for e in events]
    assert said == ("spool.directory in /etc/relay.toml is not used until the relay is "
                    "restarted: it runs on the default, /start/mailrelay-spool")
    relay.pinned = frozenset()
    with capturedLogs() as events:
        relay._sayOverridden(SimpleNamespace(source="/etc/relay.toml"), text)
    assert [formatEvent(e) for e in events] == [
        "spool.directory in /etc/relay.toml is not used: --spool on the command line replaces it"
    ]

"""The relay's reload (L{mailrelay.app.relay.RelayService.reload}) in this process, on a
memory reactor: a reload refused leaves everything as it was, and the next one works."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.application.service import Service
from twisted.internet.testing import MemoryReactorClock
from zope.interface import implementer

from mailrelay.interfaces import CONTINUE, IDataPolicy, IRateLimiter
from mailrelay.limits import MemoryRateLimiter
from tests.harness import fired

BASE = ('[queue]\nhold = true\nprocess = "inline"\n[dns]\nreverse_lookups = false\n'
        '[[listeners]]\nendpoint = "tcp:2525"\n')


@implementer(IDataPolicy)
class Starting(Service):
    """A plugin that is a service, and fails to start when its tag is C{"fail"}."""

    def __init__(self, tag: str) -> None:
        self.tag = tag

    def checkData(self, client: Any, envelope: Any) -> Any:
        return CONTINUE

    def startService(self) -> None:
        super().startService()
        if self.tag == "fail":
            raise RuntimeError("its database is gone")


@pytest.fixture
def built(monkeypatch) -> list[Starting]:
    """The C{test-starting} plugins built, in order."""
    from mailrelay.app import relay
    from mailrelay.plugins import MailRelayPlugin

    made: list[Starting] = []

    def build(options: dict[str, Any], context: Any) -> Starting:
        made.append(Starting(options["tag"]))
        return made[-1]

    plugin = MailRelayPlugin("test-starting", IDataPolicy, "tests", build)
    limits = MailRelayPlugin("test-limits", IRateLimiter, "tests",
                             lambda options, context: MemoryRateLimiter(context.reactor))
    installed = relay.availablePlugins()
    monkeypatch.setattr(relay, "availablePlugins",
                        lambda: {**installed, "test-starting": plugin, "test-limits": limits})
    return made


def plugins(*tags: str) -> str:
    return "".join(f'[[plugins]]\nplugin = "test-starting"\ntag = "{tag}"\n' for tag in tags)


class Relay:
    """The relay of a configuration file under C{directory}, started (without its control
    socket) on a memory reactor."""

    def __init__(self, directory: Path, text: str) -> None:
        from mailrelay.app.relay import makeRelayService
        from mailrelay.config import loadConfig

        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / "relay.toml"
        self.path.write_text(text)
        overrides = {"spool": str(directory / "spool")}
        self.reactor = MemoryReactorClock()
        config = loadConfig(str(self.path), overrides)
        self.top = makeRelayService(config, self.reactor, overrides, self.path.read_bytes())
        self.top.control.disownServiceParent()
        self.top.control = None
        self.top.privilegedStartService()
        self.top.startService()

    def reload(self, text: str) -> bool:
        self.path.write_text(text)
        return self.top.reload()

    def stop(self) -> None:
        fired(self.top.stopService())


def test_a_plugin_that_fails_to_start_refuses_the_whole_reload(tmp_path: Path, built) -> None:
    """A plugin service of the new configuration that fails to start: the reload is refused,
    naming it and why; what started for it is stopped again; the listeners, limits, delivery
    and plugins of the running configuration stay.  It was half done: the new listener and
    limits were in use, the delivery side was never reloaded, and the error was a SystemExit
    out of the reload (the CLI was told "the relay failed to answer")."""
    r = Relay(tmp_path, BASE + plugins("old"))
    top = r.top
    config, factory, [(_, old)] = top.config, top.listeners["tcp:2525"].factory, top.plugins.current
    assert old.running
    new = (BASE.replace("hold = true", "hold = false")
           + '[[listeners]]\nendpoint = "tcp:2526"\n[limits]\nrecipients = 1\n')
    assert not r.reload(new + plugins("new", "fail"))
    assert top.reloadError == (
        f"{r.path}: plugin 'test-starting' failed to start: "
        "RuntimeError('its database is gone')")
    _, started, failed = built
    assert not started.running and not failed.running  # stopped again
    assert old.running and top.plugins.current == [("test-starting", old)]
    assert top.config is config and list(top.listeners) == ["tcp:2525"]
    assert top.listeners["tcp:2525"].factory is factory
    assert top.delivery.hold

    assert r.reload(new.replace("hold = false", "hold = true") + plugins("new"))
    assert top.reloadError is None and list(top.listeners) == ["tcp:2525", "tcp:2526"]
    assert built[-1].running and top.plugins.current == [("test-starting", built[-1])]
    r.reactor.advance(top.config.drainTime)
    assert not old.running  # retired once the old sessions have ended
    r.stop()
    assert not built[-1].running


def passwordFile(directory: Path) -> Path:
    """A password file under C{directory}: user C{alice}, password C{pw}."""
    from tests.test_config import HASH

    users = directory / "users"
    users.write_text(f"alice:{HASH}\n")
    return users


def test_a_refused_reload_keeps_the_auth_failures_and_the_rate_counters(
    tmp_path: Path, built
) -> None:
    """A reload refused once its listeners were built (a plugin fails to start), which
    changed the AUTH failure window and took a [rate_limiter] plugin: the next reload, back
    to the configuration that runs, keeps its AUTH throttle with the failures counted and
    its rate limiter.  The refused reload had replaced them in what reloads carry over, and
    the next one forgot every AUTH failure (a brute force let off by two reloads) and every
    rate counter."""
    auth = f'[auth]\npassword_file = "{passwordFile(tmp_path)}"\nfailure_window = {{}}\n'
    running = BASE + auth.format(900)
    r = Relay(tmp_path, running)
    throttle, limiter = r.top.throttle, r.top.limiter
    for _ in range(2):
        throttle.reserve("192.0.2.7")
        throttle.settle("192.0.2.7", True)
    refused = (BASE + auth.format(901) + '[rate_limiter]\nplugin = "test-limits"\n'
               + plugins("fail"))
    assert not r.reload(refused)
    assert r.top.throttle is throttle and r.top.limiter is limiter
    assert r.reload(running)
    assert r.top.throttle is throttle and r.top.limiter is limiter
    assert throttle.failures("192.0.2.7") == 2
    r.stop()


def test_a_listener_that_cannot_listen_is_named_at_start_and_refuses_a_reload(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A listener whose endpoint cannot be built when it listens (a systemd: one, the relay
    not started by systemd): start-up stops with one line naming the file, the key and the
    endpoint; a reload is refused so, the relay running on as it was.  It was a traceback
    at start-up and "unexpected error: IndexError(...)" at a reload."""
    from twisted.internet.endpoints import _SystemdParser
    from twisted.python.systemd import ListenFDs

    from mailrelay.app.relay import RelayService

    monkeypatch.setattr(_SystemdParser, "_sddaemon", ListenFDs([], ()))  # (none passed)
    systemd = '[[listeners]]\nendpoint = "systemd:domain=INET:index=0"\n'
    why = ("cannot listen on systemd:domain=INET:index=0: systemd passed this process no "
           "socket (LISTEN_FDS): a systemd: endpoint needs the relay started by a systemd "
           "socket unit")
    with pytest.raises(SystemExit) as e:
        Relay(tmp_path / "start", BASE + systemd)
    path = tmp_path / "start" / "relay.toml"
    assert str(e.value) == f"mailrelay: error: {path}: listeners[1].endpoint: {why}"
    r = Relay(tmp_path, BASE)
    assert not r.reload(BASE + systemd)
    assert r.top.reloadError == f"{r.path}: listeners[1].endpoint: {why}"
    assert list(r.top.listeners) == ["tcp:2525"]
    r.stop()
    assert RelayService(None, None, {"listen": ["tcp:25"]}).listenerWhere(r.top.config, 0) == (
        "--listen")


def test_a_listener_spelled_anew_keeps_its_count_of_open_connections(tmp_path: Path) -> None:
    """A reload that spells a listener's endpoint anew (C{tcp:2525:backlog=64} for
    C{tcp:2525}) keeps its socket, and must keep its count of the connections open on it:
    with a fresh count, max_connections let as many again in."""
    r = Relay(tmp_path, BASE)
    (count,) = r.top.carried.counts.values()
    count.value = 2  # two sessions open
    assert r.reload(BASE.replace('"tcp:2525"', '"tcp:2525:backlog=64"'))
    assert list(r.top.listeners) == ["tcp:2525:backlog=64"]
    assert list(r.top.carried.counts.values()) == [count] and count.value == 2
    r.stop()


def test_refused_reloads_leave_no_resolver_timers_behind(tmp_path: Path, built) -> None:
    """Reloads refused (a plugin fails to start) whose C{[dns] nameservers} differ from the
    running ones: each built a resolver of its own (the system's re-reads resolv.conf every
    minute, on a timer of the relay's reactor), and each was left behind with its timer, one
    more per refused reload."""
    running = BASE + '[dns]\nnameservers = ["127.0.0.1:5353"]\n'
    r = Relay(tmp_path, running.replace("[dns]\nreverse_lookups = false\n", ""))

    def timers() -> int:
        return sum(getattr(call.func, "__name__", "") == "maybeParseConfig"
                   for call in r.reactor.getDelayedCalls())

    for _ in range(3):
        assert not r.reload(BASE + plugins("fail"))  # the system's resolver
    assert timers() <= 1
    assert r.reload(BASE)
    assert timers() == 1
    r.stop()


_SIGHUP_AT_START = """
import os, signal, sys
from twisted.internet import reactor
from mailrelay.app.tap import Options, makeService
options = Options()
options.parseOptions(sys.argv[1:])
relay = makeService(options)
relay.privilegedStartService()  # (listening, as twistd has it before its reactor runs)
os.kill(os.getpid(), signal.SIGHUP)
print("alive", flush=True)
os._exit(0)  # (its threads and children are not the point)
"""


def test_a_sighup_while_the_relay_starts_does_not_end_it(tmp_path: Path) -> None:
    """SIGHUP once the relay listens, before twistd's reactor runs (logrotate's postrotate,
    or an operator's reload, during a restart): the relay must live on.  The handler was
    installed only once the reactor ran, and the signal's default action ended the relay."""
    import subprocess
    import sys

    config = tmp_path / "relay.toml"
    config.write_text(f'[[listeners]]\nendpoint = "tcp:0:interface=127.0.0.1"\n'
                      f'[spool]\ndirectory = "{tmp_path / "spool"}"\n'
                      '[queue]\nprocess = "inline"\n')
    result = subprocess.run(
        [sys.executable, "-c", _SIGHUP_AT_START, "--config", str(config)],
        stdin=subprocess.DEVNULL, capture_output=True, timeout=60, cwd=tmp_path, text=True)
    assert (result.returncode, result.stdout) == (0, "alive\n"), result.stderr


def test_the_first_configuration_is_built_with_the_plugins_given(tmp_path: Path) -> None:
    """makeRelayService(available=...): the relay builds its first configuration with the
    installed plugins it is given (those the fork server was forked with, found just
    before); a reload looks for them again -- here, without the test's plugin, refused."""
    from mailrelay.app import relay
    from mailrelay.app.relay import makeRelayService
    from mailrelay.config import loadConfig
    from mailrelay.plugins import MailRelayPlugin

    made: list[Starting] = []

    def build(options: dict[str, Any], context: Any) -> Starting:
        made.append(Starting(options["tag"]))
        return made[-1]

    available = {**relay.availablePlugins(),
                 "test-starting": MailRelayPlugin("test-starting", IDataPolicy, "tests", build)}
    path = tmp_path / "relay.toml"
    path.write_text(BASE + plugins("first"))
    overrides = {"spool": str(tmp_path / "spool")}
    config = loadConfig(str(path), overrides)
    top = makeRelayService(config, MemoryReactorClock(), overrides, path.read_bytes(),
                           available=available)
    assert [p.tag for p in made] == ["first"]
    assert top.plugins.current == [("test-starting", made[0])]
    top.control.disownServiceParent()
    top.control = None
    top.privilegedStartService()
    top.startService()
    try:
        assert not top.reload()
        assert top.reloadError is not None and "unknown plugin 'test-starting'" in top.reloadError
    finally:
        fired(top.stopService())

"""End-to-end: the relay's children forked by the fork server (L{mailrelay.app.forkserver},
C{[relay] fork_children}, on by default under C{twistd -n}): the process tree, the memory it
saves, mail going through, a reload, the relay's death, the server's death (children are
then started as new processes); and the unit details."""

from __future__ import annotations

import os
import re
import signal
import socket
import time
from pathlib import Path

import pytest

from mailrelay.app import forkserver
from tests.harness import RelayProcess
from tests.test_e2e_delivery_process import _alive as alive
from tests.test_e2e_delivery_process import _send as send
from tests.test_e2e_delivery_process import relay  # noqa: F401 - the relay fixture
from tests.test_e2e_operating import childrenOf as children
from tests.test_e2e_operating import descendantsOf
from tests.test_e2e_outbound import nexthop  # noqa: F401 - the aiosmtpd next-hop fixture


def tree(pid: int) -> list[int]:
    """C{pid} and its descendants."""
    return [pid, *descendantsOf(pid)]


def name(pid: int, expected: str | None = None, timeout: float = 10.0) -> str:
    """The name of C{pid} (C{comm}), once it is C{expected} if given (a forked child names
    itself just after the fork), or when the C{timeout} is over."""
    deadline = time.monotonic() + timeout
    while True:
        found = Path(f"/proc/{pid}/comm").read_text().strip()
        if expected is None or found == expected or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def waitGone(pids: list[int], timeout: float = 15.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and [p for p in pids if alive(p)]:
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


def anonymousPss(pids: list[int]) -> int:
    """The summed PSS of the anonymous memory of C{pids}, in KiB (the memory of the
    processes themselves: the libraries' files are shared with every Python)."""
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss_Anon:"):
                total += int(line.split()[1])
    return total


def base(port: int, extra: str = "") -> str:
    return (f'[relay]\nsmarthost = "[127.0.0.1]:{port}"\n{extra}'
            "[dns]\nreverse_lookups = false\n")


def deliveryPid(r: RelayProcess, nth: int = 0, timeout: float = 15.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        pids = re.findall(r"delivery process started \(pid (\d+)\)", r.log())
        if len(pids) > nth:
            return int(pids[nth])
        assert time.monotonic() < deadline, r.log()
        time.sleep(0.05)


def test_delivery_process_forked_by_the_fork_server(relay, nexthop) -> None:  # noqa: F811
    """twistd -> fork server -> delivery process, all named so; mail goes through; the
    relay's stop ends them all."""
    recorder, port = nexthop()
    r = relay(base(port))
    server = int(r.waitForLog(r"fork server started \(pid (\d+)\)").group(1))
    child = deliveryPid(r)
    assert r.process is not None
    assert children(r.process.pid) == [server] and children(server) == [child]
    assert (name(server), name(child, "mr-delivery")) == ("mr-forkserver", "mr-delivery")
    r.waitForLog("queue manager started")
    send(r.port, "one@example.org")
    recorder.waitTo("one@example.org")
    assert r.stop() in (0, -signal.SIGTERM)
    assert waitGone([server, child]) == []
    log = r.log()
    assert "Traceback" not in log and "exited unexpectedly" not in log, log


def test_forked_children_use_less_memory(relay, nexthop) -> None:  # noqa: F811
    """The point: forked, the relay's processes hold less memory in all than with the
    delivery process started as a new Python (issue 11: 12 MiB less; at least 6 here)."""
    _, port = nexthop()
    sums = {}
    for fork in ("true", "false"):
        r = relay(base(port, f"fork_children = {fork}\n"))
        r.waitForLog("queue manager started")
        assert r.process is not None
        pids = tree(r.process.pid)
        assert len(pids) == (3 if fork == "true" else 2)
        time.sleep(1)  # (the processes settle: nothing runs)
        sums[fork] = anonymousPss(tree(r.process.pid))
        r.stop()
    assert sums["true"] < sums["false"] - 6 * 1024, sums


def test_children_new_processes_when_off(relay, nexthop) -> None:  # noqa: F811
    recorder, port = nexthop()
    r = relay(base(port, "fork_children = false\n"))
    child = deliveryPid(r)
    assert r.process is not None
    assert children(r.process.pid) == [child] and name(child) != "mr-delivery"
    assert "relay.fork_children = false" in r.log()
    send(r.port, "off@example.org")
    recorder.waitTo("off@example.org")


def test_reload_forks_a_new_delivery_process(relay, nexthop) -> None:  # noqa: F811
    recorder, port = nexthop()
    r = relay(base(port))
    server = int(r.waitForLog(r"fork server started \(pid (\d+)\)").group(1))
    first = deliveryPid(r)
    assert r.process is not None
    r.process.send_signal(signal.SIGHUP)
    r.waitForLog("configuration reloaded")
    second = deliveryPid(r, 1)
    assert second != first and children(server) in ([second], [first, second], [second, first])
    assert waitGone([first]) == []
    send(r.port, "reloaded@example.org")
    recorder.waitTo("reloaded@example.org")


def test_acceptor_processes_forked(relay, nexthop) -> None:  # noqa: F811
    recorder, port = nexthop()
    r = relay(base(port, "processes = 2\n"))
    server = int(r.waitForLog(r"fork server started \(pid (\d+)\)").group(1))
    acceptor = int(r.waitForLog(r"acceptor process started \(pid (\d+)\)").group(1))
    assert name(acceptor, "mr-acceptor") == "mr-acceptor" and acceptor in children(server)
    for i in range(4):  # some, at least, through the acceptor
        send(r.port, f"a{i}@example.org")
    for i in range(4):
        recorder.waitTo(f"a{i}@example.org")


def sockets(pid: int) -> set[int]:
    """The inodes of the sockets process C{pid} holds (C{/proc/PID/fd})."""
    found = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # (closed meanwhile)
            continue
        if target.startswith("socket:["):
            found.add(int(target[len("socket:["):-1]))
    return found


def test_the_fork_server_holds_no_listening_socket(tmp_path: Path) -> None:
    """The fork server forks the acceptors their listening sockets (passed it with each
    request, and closed there) but keeps none: not the systemd socket the relay was given
    (LISTEN_FDS), which it inherited at its fork, nor one passed it since, or the port of a
    listener the relay stopped would stay open in it.  It holds one socket: its own to the
    relay."""
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen()
    inode = os.fstat(listening.fileno()).st_ino
    r = RelayProcess(tmp_path / "relay", "[relay]\nprocesses = 2\n", (
        "--listen", "systemd:domain=INET:index=0"), systemdSocket=listening, hold=True)
    try:
        r.start()
        listening.close()  # (the relay has it)
        server = int(r.waitForLog(r"fork server started \(pid (\d+)\)").group(1))
        acceptor = int(r.waitForLog(r"acceptor process (\d+): accepting on systemd").group(1))
        assert r.process is not None and inode in sockets(r.process.pid)
        assert inode in sockets(acceptor)
        held = sockets(server)
        assert len(held) == 1 and inode not in held, held
    finally:
        r.stop()

def test_relay_killed_takes_them_along(relay, nexthop) -> None:  # noqa: F811
    _, port = nexthop()
    r = relay(base(port))
    server = int(r.waitForLog(r"fork server started \(pid (\d+)\)").group(1))
    child = deliveryPid(r)
    r.waitForLog("queue manager started")
    r.kill9()
    assert waitGone([server, child]) == []


@pytest.mark.parametrize("fork", ["true", "false"])
def test_relay_killed_takes_every_child_along(relay, nexthop, fork: str) -> None:  # noqa: F811
    """kill -9 of twistd, with acceptor processes too, forked (twistd -> fork server ->
    children) or started as new processes (twistd -> children): every process of the relay
    is gone within seconds, without systemd's KillMode=control-group to kill them (each
    dies with its parent: PR_SET_PDEATHSIG), as Postfix's processes exit when their master
    is gone.  (A restarted relay's queue manager meanwhile waits for the spool's queue lock:
    test_e2e_stop.py::test_kill9_delivery_process_finishes_in_flight_work_and_exits.)"""
    _, port = nexthop()
    r = relay(base(port, f"processes = 2\nfork_children = {fork}\n"))
    r.waitForLog(r"acceptor process started")
    r.waitForLog("queue manager started")
    assert r.process is not None
    pids = descendantsOf(r.process.pid)
    assert len(pids) == (3 if fork == "true" else 2), pids
    r.kill9()
    assert waitGone(pids, timeout=10) == []


def test_fork_server_killed_children_started_anew(relay, nexthop) -> None:  # noqa: F811
    """The server killed: its delivery process ends (it dies with its parent), the relay
    says so and starts the next one as a new process; mail still goes through."""
    recorder, port = nexthop()
    r = relay(base(port))
    server = int(r.waitForLog(r"fork server started \(pid (\d+)\)").group(1))
    first = deliveryPid(r)
    r.waitForLog("queue manager started")
    os.kill(server, signal.SIGKILL)
    r.waitForLog(rf"the fork server \(pid {server}\) is gone")
    assert waitGone([first]) == []
    r.waitForLog("delivery process exited unexpectedly")
    second = deliveryPid(r, 1, timeout=20)
    assert r.process is not None
    assert second in children(r.process.pid) and name(second) != "mr-delivery"
    send(r.port, "after@example.org")
    recorder.waitTo("after@example.org", timeout=20)
    assert r.stop() in (0, -signal.SIGTERM)
    assert waitGone([second]) == []


# -- units --------------------------------------------------------------------------------------


def test_usable_only_under_twistd_nodaemon() -> None:
    good = {"nodaemon": True, "chroot": None, "euid": False}
    # (This process, pytest's, may have threads or a reactor: only the options are judged.)
    for options, why in [
        (None, "not run by twistd"),
        ({**good, "nodaemon": False}, "twistd daemonizes (no --nodaemon)"),
        ({**good, "chroot": "/srv"}, "twistd --chroot"),
        ({**good, "euid": True}, "twistd --euid"),
    ]:
        assert forkserver.usable(options) == why


def test_parent_pid_left_out() -> None:
    assert forkserver._withoutParentPid(
        ["--overrides", "{}", "--parent-pid", "12", "--config", "x", "--parent-pid=3"]
    ) == ["--overrides", "{}", "--config", "x"]


def test_the_metrics_library_is_preloaded_when_children_count(monkeypatch) -> None:
    """With [metrics], the fork server imports prometheus_client before it forks (and before
    twistd drops privileges): each child imports it at start, and as the run user it could
    not read an installation under /root ('No module named gzip', for ever)."""
    from mailrelay.app import forkserver
    from mailrelay.config import loadConfig

    asked: list[list[str]] = []

    def noFork(*args: object) -> None:
        raise OSError("not forked in this test")

    monkeypatch.setattr(forkserver, "preload", lambda modules: asked.append(list(modules)))
    monkeypatch.setattr(forkserver, "usable", lambda options: None)
    monkeypatch.setattr(forkserver.ForkServer, "start", noFork)
    for text, expected in [(b"", False), (b'[metrics]\nlisten = "tcp:9125"\n', True)]:
        config = loadConfig("mailrelay.toml", {"hostname": "relay.test"}, text=text)
        asked.clear()
        assert forkserver.forRelay(config, {"nodaemon": True}, None) is None
        assert asked and ("prometheus_client" in asked[0]) is expected, asked


PROBE_CHILD = '''
import os

def forkedMain(argv):
    from mailrelay.endpoints import passedSockets

    passed = passedSockets()
    os.write(1, repr((passed.inheritedDescriptors(), passed.inheritedNamedDescriptors(),
                      os.environ.get("LISTEN_FDS"))).encode())
    return 0
'''


def test_a_forked_child_does_not_see_the_relays_systemd_sockets(tmp_path: Path, monkeypatch) -> None:
    """The relay reads the sockets systemd passed it (LISTEN_FDS) once, when Twisted's
    endpoints are imported; a child forked by the fork server inherited that list, but
    in the child those numbers are its own pipes and control socket: passedSockets()
    there named the wrong descriptors.  A forked child now sees only what its own
    environment passes it (here: nothing)."""
    import sys

    from twisted.internet.endpoints import _SystemdParser
    from twisted.python.systemd import ListenFDs

    (tmp_path / "probe_forked_child.py").write_text(PROBE_CHILD)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(_SystemdParser, "_sddaemon", ListenFDs([3, 4], ("smtp", "submission")))

    class Server:
        pid = os.getpid()

    env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
    request = {"module": "probe_forked_child", "argv": [], "env": env}
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        forkserver._runChild(Server(), request, {1: w})  # type: ignore[arg-type]
    os.close(w)
    with os.fdopen(r, "rb") as output:
        said = output.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, said
    assert said == b"([], {}, None)", said
    assert "probe_forked_child" not in sys.modules


FORKED_TEXT = (b'hostname = "relay.test"\n[relay]\nsmarthost = "[127.0.0.1]:2525"\n'
               b'[[listeners]]\nendpoint = "tcp:2500:interface=127.0.0.1"\n')


def _forkedRecord(tmp_path: Path, monkeypatch, overrides: dict) -> tuple[object, object]:
    """What L{forkserver.forRelay} leaves in the fork server's image for the configuration
    parsed from FORKED_TEXT with C{overrides} (the fork itself left out), and the config."""
    from mailrelay.config import loadConfig

    monkeypatch.chdir(tmp_path)
    path = str(tmp_path / "mailrelay.toml")  # (the relay's is absolute: tap.Options)
    config = loadConfig(path, overrides, text=FORKED_TEXT)
    recorded = []

    def start(*args: object) -> None:
        recorded.append(forkserver._forkedConfig)
        raise OSError("not forked in this test")

    monkeypatch.setattr(forkserver, "preload", lambda modules: None)
    monkeypatch.setattr(forkserver, "usable", lambda options: None)
    monkeypatch.setattr(forkserver.ForkServer, "start", start)
    assert forkserver.forRelay(
        config, {"nodaemon": True}, None, (path, overrides, FORKED_TEXT)
    ) is None
    assert forkserver._forkedConfig is None  # the relay's process keeps no copy
    assert len(recorded) == 1 and recorded[0] is not None
    return recorded[0], config


def test_the_forked_configuration_is_taken_only_as_it_was_parsed(tmp_path: Path,
                                                                 monkeypatch) -> None:
    """The configuration the relay parsed before forking the fork server is what a forked
    child gets from the same path, overrides, bytes and directory -- the same as parsing
    them again (as a delivery process, listeners' certificates unread) gives -- and nothing
    otherwise (the child parses)."""
    from mailrelay.config import loadConfig

    overrides = {"spool": "spool"}
    record, config = _forkedRecord(tmp_path, monkeypatch, overrides)
    path = str(tmp_path / "mailrelay.toml")
    assert forkserver.forkedConfig(path, overrides, FORKED_TEXT) is None  # not forked
    monkeypatch.setattr(forkserver, "_forkedConfig", record)
    taken = forkserver.forkedConfig(path, overrides, FORKED_TEXT)
    assert taken is config
    assert taken == loadConfig(path, overrides, text=FORKED_TEXT, listenerTLS=False)
    assert forkserver.forkedConfig(path, overrides, FORKED_TEXT + b"\n") is None
    assert forkserver.forkedConfig(path, {"spool": "other"}, FORKED_TEXT) is None
    assert forkserver.forkedConfig(path, {}, FORKED_TEXT) is None
    assert forkserver.forkedConfig(str(tmp_path / "other.toml"), overrides, FORKED_TEXT) is None
    assert forkserver.forkedConfig("mailrelay.toml", overrides, FORKED_TEXT) is None
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # (the relative spool is another directory)
    assert forkserver.forkedConfig(path, overrides, FORKED_TEXT) is None


def test_a_child_takes_the_forked_configuration_only_when_told_and_forked(
    tmp_path: Path, monkeypatch
) -> None:
    """L{deliveryprocess.childConfig}: the forked configuration for a forked child given
    C{--forked-config}; parsed (an equal configuration, a new object) for one not forked,
    one not told, and an acceptor process (given the relay's users and files)."""
    import json

    from mailrelay.app import deliveryprocess

    record, config = _forkedRecord(tmp_path, monkeypatch, {})
    monkeypatch.setattr(forkserver, "_forkedConfig", record)
    path = str(tmp_path / "mailrelay.toml")
    told = deliveryprocess._parseArguments(
        ["--config", path, "--config-fd", "3", "--overrides", json.dumps({}),
         "--forked-config"])
    untold = deliveryprocess._parseArguments(["--config", path, "--config-fd", "3"])
    assert deliveryprocess.childConfig(told, FORKED_TEXT, True, listenerTLS=False) is config
    for options, forked, extra in [
        (told, False, {}), (untold, True, {}), (told, True, {"relayFiles": {"a.pem": b"x"}}),
    ]:
        parsed = deliveryprocess.childConfig(options, FORKED_TEXT, forked, listenerTLS=False,
                                             **extra)
        assert parsed is not config and parsed == config


def test_the_fork_server_offers_its_configuration_once_for_the_same_bytes() -> None:
    """L{forkserver.ForkServer.offerForkedConfig}: for the very bytes object the relay
    parsed (a reload's equal bytes are not it), once, while the server is there."""
    ours, theirs = socket.socketpair()
    try:
        server = forkserver.ForkServer(ours, 0)
        text = bytes(FORKED_TEXT)
        server.forkedConfigText = (text,)
        assert server.offerForkedConfig(text) is True
        assert server.offerForkedConfig(text) is False  # once
        server.forkedConfigText = (text,)
        assert server.offerForkedConfig(bytes(bytearray(text))) is False  # not the same
        assert server.offerForkedConfig(text) is False
        server.forkedConfigText = (text,)
        server.gone = "closed"
        assert server.offerForkedConfig(text) is False
    finally:
        ours.close()
        theirs.close()


def test_the_first_delivery_process_is_told_to_take_the_forked_configuration() -> None:
    """L{DeliveryProcessService}: C{--forked-config} for the first child its spawner (the
    fork server) offers it to; a restarted one parses its configuration."""
    from twisted.internet.testing import StringTransport

    from mailrelay.queue.process import DeliveryProcessService
    from tests.test_acceptors import ProcessReactor

    text = b"[relay]\n"

    class Spawner(ProcessReactor):
        offered = [text]

        def adoptStreamConnection(self, fd: int, family: object, factory) -> None:
            factory.buildProtocol(None).makeConnection(StringTransport())

        def offerForkedConfig(self, configText: bytes | None) -> bool:
            return bool(self.offered) and self.offered.pop() is configText

    reactor = Spawner()
    service = DeliveryProcessService(reactor, None, {}, configText=text)
    service.spawner = reactor
    service.startService()
    reactor.spawned[-1][0].end(9)
    reactor.advance(60)
    assert len(reactor.spawned) == 2
    assert ["--forked-config" in args for _, args, _ in reactor.spawned] == [True, False]
    service.beginShutdown()


def test_a_forked_childs_environment_is_the_one_asked() -> None:
    """L{forkserver._setEnvironment}: the environment asked, whether it differs (emptied and
    filled again) or is the one the child has already (then left alone: its objects are
    the same)."""
    environ = {"PATH": "/usr/bin", "LANG": "C.UTF-8", "OLD": "1"}
    forkserver._setEnvironment({"PATH": "/bin", "LANG": "C.UTF-8"}, environ)
    assert environ == {"PATH": "/bin", "LANG": "C.UTF-8"}
    before = list(environ.values())
    forkserver._setEnvironment({"LANG": "C.UTF-8", "PATH": "/bin"}, environ)
    assert environ == {"PATH": "/bin", "LANG": "C.UTF-8"}
    assert all(a is b for a, b in zip(environ.values(), before, strict=True))
    forkserver._setEnvironment({}, environ)
    assert environ == {}


def test_the_delivery_process_parser_is_made_before_the_fork_and_reused() -> None:
    """The delivery process's argument parser is made once (by its preload, before the
    fork); parsing with it again gives each command line its own options, none carried
    over from the one before."""
    from mailrelay.app import deliveryprocess

    first = deliveryprocess._parseArguments(
        ["--config", "/etc/mailrelay.toml", "--config-fd", "3", "--overrides", '{"a": 1}',
         "--control-fd", "4", "--forked-config"])
    second = deliveryprocess._parseArguments(["--control-fd", "5"])
    assert deliveryprocess._arguments() is deliveryprocess._arguments()
    assert vars(first) == {"config": "/etc/mailrelay.toml", "config_fd": 3,
                           "overrides": '{"a": 1}', "parent_pid": None, "control_fd": 4,
                           "forked_config": True}
    assert vars(second) == {"config": None, "config_fd": None, "overrides": "{}",
                            "parent_pid": None, "control_fd": 5, "forked_config": False}


def test_the_forked_plugins_go_with_the_forked_configuration_only(tmp_path: Path,
                                                                  monkeypatch) -> None:
    """L{forkserver.forkedPlugins}: the installed plugins as the relay found them before
    the fork -- the same as looking for them again -- for the configuration it parsed
    then, taken by the child; for any other configuration (an equal one parsed anew, a
    reload's), and in a process not forked by the server, none (it looks for them)."""
    from mailrelay.config import loadConfig
    from mailrelay.config.plugins import availablePlugins

    record, config = _forkedRecord(tmp_path, monkeypatch, {})
    assert forkserver.forkedPlugins(config) is None  # not forked
    monkeypatch.setattr(forkserver, "_forkedConfig", record)
    plugins = forkserver.forkedPlugins(config)
    assert plugins is not None and plugins == availablePlugins()
    again = loadConfig(str(tmp_path / "mailrelay.toml"), {}, text=FORKED_TEXT)
    assert again == config and forkserver.forkedPlugins(again) is None


def test_the_relay_side_keeps_the_plugins_and_the_bytes_the_server_was_forked_with(
    tmp_path: Path, monkeypatch
) -> None:
    """L{forkserver.forRelay}: the relay's end of the server started holds the very bytes
    object the configuration was parsed from (L{ForkServer.offerForkedConfig}) and the
    installed plugins found just before the fork -- the same as looking again -- for the
    relay to build its first configuration with."""
    from mailrelay.config import loadConfig
    from mailrelay.config.plugins import availablePlugins

    monkeypatch.chdir(tmp_path)
    path = str(tmp_path / "mailrelay.toml")
    text = bytes(bytearray(FORKED_TEXT))
    config = loadConfig(path, {}, text=text)
    ours, theirs = socket.socketpair()
    monkeypatch.setattr(forkserver, "preload", lambda modules: None)
    monkeypatch.setattr(forkserver, "usable", lambda options: None)
    monkeypatch.setattr(forkserver.ForkServer, "start",
                        lambda *args: forkserver.ForkServer(ours, 0))
    try:
        server = forkserver.forRelay(config, {"nodaemon": True}, None, (path, {}, text))
        assert server is not None
        assert server.forkedConfigText is not None and server.forkedConfigText[0] is text
        assert server.plugins is not None and server.plugins == availablePlugins()
    finally:
        ours.close()
        theirs.close()

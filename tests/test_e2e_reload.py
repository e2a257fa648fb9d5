"""End-to-end: SIGHUP reloads the real C{twistd -n mailrelay} (as C{postfix reload} does).

The new configuration is read, built and checked completely before anything running is
touched: a bad one is logged (file, key) and the relay keeps running on the old one.  A good
one replaces policy, limits, TLS certificates and routes; listeners are added and removed;
sessions already open finish on the settings they started with; the delivery process is
replaced without losing (or repeating) its deliveries in flight.  SIGUSR1 still rotates
twistd's log file.
"""

from __future__ import annotations

import re
import signal
import smtplib
import socket
import ssl
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import SlowHop
from tests.harness import TWISTD, RelayProcess
from tests.test_e2e_stop import _send


def _reload(r: RelayProcess, config: str) -> str:
    """Write C{config} as the relay's file and send SIGHUP; the log line that answers."""
    (r.directory / "mailrelay.toml").write_text(config)
    before = r.log().count("configuration reloaded from") + r.log().count(
        "configuration not reloaded")
    r.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        lines = [line for line in r.log().splitlines()
                 if "configuration reloaded from" in line or "configuration not reloaded" in line]
        if len(lines) > before:
            return lines[before]
        assert r.process.poll() is None, f"the relay exited on SIGHUP:\n{r.log()}"
        time.sleep(0.05)
    raise AssertionError(f"no answer to SIGHUP:\n{r.log()}")


BASE = "[dns]\nreverse_lookups = false\n[queue]\nhold = true\n"


def test_bad_configuration_is_refused_and_the_relay_keeps_running(relays) -> None:
    r = relays(BASE).start()
    line = _reload(r, BASE + "[limits]\nrecipients = \"ten\"\n")
    assert "configuration not reloaded (still running on the previous one)" in line
    assert "mailrelay.toml: limits.recipients: must be a positive integer" in line
    line = _reload(r, BASE + "[[recipient_validators]]\nplugin = \"no-such-plugin\"\n")
    assert "recipient_validators" in line and "no-such-plugin" in line
    line = _reload(r, "this is not TOML [")
    assert "TOML syntax error" in line
    assert r.process.poll() is None
    with smtplib.SMTP("127.0.0.1", r.port, timeout=10) as s:
        s.sendmail("a@example.com", ["b@example.org"], b"Subject: still\r\n\r\nhere\r\n")
    assert len(r.queued()) == 1
    assert r.stop() in (0, -signal.SIGTERM)


def test_restart_only_settings_are_refused(relays) -> None:
    r = relays(BASE).start()
    line = _reload(r, BASE.replace("[dns]", '[spool]\nsync = "fsync"\n[dns]'))
    assert "spool.sync: changed from syncfs to fsync: a restart is needed" in line
    line = _reload(r, BASE + 'process = "inline"\n')
    assert "queue.process: changed from 'separate' to 'inline'" in line
    # A setting added or removed is said so, not as Python's None.
    line = _reload(r, BASE + '[metrics]\nlisten = "tcp:0:interface=127.0.0.1"\n')
    assert ("metrics.listen: changed from (not set) to tcp:0:interface=127.0.0.1: a restart is "
            "needed") in line, line


def _fileListeners(relays, config: str) -> RelayProcess:
    """A relay whose listeners come from its file (the harness's --listen would override
    them); the first must be C{tcp:0:interface=127.0.0.1}."""
    r = relays(config, defaults=False)
    r.args = ("--spool", str(r.spool), "--hostname", "relay.test")
    return r


LISTENER = '[[listeners]]\nendpoint = "tcp:0:interface=127.0.0.1"\n'


def test_policy_and_listeners_change_open_sessions_keep_theirs(relays) -> None:
    """After a reload that stops loopback from relaying and adds a listener: new sessions are
    refused relaying, a session opened before keeps relaying, the new listener listens."""
    r = _fileListeners(relays, BASE + LISTENER).start()
    old = r.connect()
    assert old.readReply()[0].startswith(b"220 ")
    old.send(b"EHLO old.test\r\n")
    old.readReply()

    new = BASE + ('[relay]\nnetworks = []\naccept_domains = ["local.test"]\n'
                  '[[listeners]]\nendpoint = "tcp:0:interface=127.0.0.1"\n'
                  '[[listeners]]\nendpoint = "tcp:0:interface=127.0.0.2"\n')
    line = _reload(r, new)
    assert "configuration reloaded from" in line and "mailrelay.toml" in line
    added = r.waitForLog(r"listening on 127\.0\.0\.2:(\d+) ")
    port2 = int(added.group(1))

    old.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\n")
    assert old.readReply() == [b"250 2.1.0 Ok"]
    assert old.readReply() == [b"250 2.1.5 Ok"]  # the settings it started with
    old.send(b"QUIT\r\n")
    old.readReply()
    for port, host in ((r.port, "127.0.0.1"), (port2, "127.0.0.2")):
        with smtplib.SMTP(host, port, timeout=10) as s:
            s.ehlo("new.test")
            s.mail("a@example.com")
            code, text = s.rcpt("b@example.org")
            assert code == 554 and b"Relay access denied" in text
            assert s.rcpt("x@local.test")[0] == 250

    # Back to one listener: the 127.0.0.2 one is removed.
    line = _reload(r, BASE + LISTENER)
    assert "configuration reloaded from" in line
    r.waitForLog(r"listener tcp:0:interface=127\.0\.0\.2 removed")
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.2", port2), timeout=5).close()
    assert r.stop() in (0, -signal.SIGTERM)


SERVICE_MODULE = '''
"""A site plugin for the tests: a service that fails to start with tag = "fail"."""
from twisted.application.service import Service
from zope.interface import implementer

from mailrelay.interfaces import CONTINUE, IDataPolicy


@implementer(IDataPolicy)
class Starting(Service):
    def __init__(self, tag):
        self.tag = tag

    def checkData(self, client, envelope):
        return CONTINUE

    def startService(self):
        super().startService()
        if self.tag == "fail":
            raise RuntimeError("its database is gone")


def build(options, context):
    return Starting(options["tag"])
'''

SERVICE_DROPIN = '''
from mailrelay.interfaces import IDataPolicy
from mailrelay.plugins import MailRelayPlugin

starting = MailRelayPlugin(name="test-starting", provides=IDataPolicy,
                           description="fails to start with tag = fail (tests only)",
                           factory="site_starting:build")
'''


def test_a_plugin_that_fails_to_start_refuses_the_reload(relays, tmp_path: Path) -> None:
    """A plugin service of the new configuration fails to start: the reload is refused,
    saying which and why (to `mailrelay reload` too), the old listeners, limits and delivery
    stay, and the next reload works.  It was half done: the new listener and limits were
    used, the delivery side never reloaded (no delivery process for hold = false), the CLI
    heard "the relay failed to answer", and every later reload failed the same way."""
    import os

    from tests.test_e2e_control import cli

    site = tmp_path / "site"
    (site / "twisted" / "plugins").mkdir(parents=True)
    (site / "site_starting.py").write_text(SERVICE_MODULE)
    (site / "twisted" / "plugins" / "site_starting_plugin.py").write_text(SERVICE_DROPIN)
    env = {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    plugin = '[[plugins]]\nplugin = "test-starting"\ntag = "{}"\n'
    r = relays(BASE + LISTENER + plugin.format("ok"), defaults=False, env=env)
    r.args = ("--spool", str(r.spool), "--hostname", "relay.test")
    r.start()
    new = (BASE.replace("hold = true", "hold = false") + "[limits]\nrecipients = 1\n" + LISTENER
           + '[[listeners]]\nendpoint = "tcp:0:interface=127.0.0.2"\n')
    (r.directory / "mailrelay.toml").write_text(new + plugin.format("fail"))
    p = cli(r, "reload")
    assert p.returncode == 1, p
    assert "configuration not reloaded (still running on the previous one): " in p.stderr, p
    assert ("mailrelay.toml: plugin 'test-starting' failed to start: "
            "RuntimeError('its database is gone')") in p.stderr, p
    r.waitForLog("configuration not reloaded")
    assert "delivery process" not in r.log()
    # The new listener (opened before the plugins start, as a listener that cannot be is
    # found first) is closed again.
    port2 = r.waitForLog(r"listening on 127\.0\.0\.2:(\d+) ").group(1)
    r.waitForLog(rf"TCP Port {port2} Closed")
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.2", int(port2)), timeout=5).close()
    with smtplib.SMTP("127.0.0.1", r.port, timeout=10) as s:
        s.ehlo("client.test")
        s.mail("a@example.com")
        assert s.rcpt("b@example.org")[0] == s.rcpt("c@example.org")[0] == 250
    line = _reload(r, new + plugin.format("ok"))
    assert "configuration reloaded from" in line, r.log()
    r.waitForLog(r"listening on 127\.0\.0\.2:")
    r.waitForLog(r"delivery process started")
    assert r.stop() in (0, -signal.SIGTERM)


def test_a_refused_reload_does_not_forgive_auth_failures(relays, tmp_path: Path) -> None:
    """A client locked out by its AUTH failures stays locked out across a reload refused
    (a port in use) that changed the failure window, and the next reload, back to the
    configuration that runs.  The refused reload had replaced the throttle reloads carry
    over, so the next one forgot every failure: a reload let a brute force go on."""
    import base64

    from tests.test_reload import passwordFile

    auth = (f'[auth]\npassword_file = "{passwordFile(tmp_path)}"\nthrottle_after = 100\n'
            "max_failures = 2\nfailure_window = {}\n")
    listener = LISTENER + "auth = true\nauth_without_tls = true\n"
    running = BASE + auth.format(900) + listener
    r = _fileListeners(relays, running).start()

    def login(password: bytes) -> int:
        with smtplib.SMTP("127.0.0.1", r.port, timeout=10) as s:
            s.ehlo("client.test")
            token = base64.b64encode(b"\0alice\0" + password).decode()
            return s.docmd("AUTH", "PLAIN " + token)[0]

    assert login(b"wrong") == 535
    assert login(b"wrong") == login(b"pw") == 421
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = f'[[listeners]]\nendpoint = "tcp:{busy.getsockname()[1]}:interface=127.0.0.1"\n'
        line = _reload(r, BASE + auth.format(901) + listener + taken)
    assert "configuration not reloaded" in line and "Address already in use" in line, line
    assert "mailrelay.toml: listeners[1].endpoint: cannot listen on tcp:" in line, line
    assert login(b"pw") == 421
    assert "configuration reloaded from" in _reload(r, running)
    assert login(b"pw") == 421
    assert r.stop() in (0, -signal.SIGTERM)


def test_a_listener_spelled_anew_on_its_socket_is_kept(relays, tmp_path: Path) -> None:
    """A listener's endpoint written another way for the same socket (a backlog added, the
    port by name): the reload keeps the listening socket, with the new spelling's backlog,
    and mail goes on.  It was refused: the new spelling was listened on beside the old one,
    'Address already in use'.  The socket kept may become an ssl: endpoint's (its TLS is
    the listener's factory's; it was refused: a restart was needed)."""
    from tests.harness import freePort

    port = freePort()
    first = f'[[listeners]]\nendpoint = "tcp:{port}:interface=127.0.0.1"\n'
    r = relays(BASE + first, defaults=False)
    r.args = ("--spool", str(r.spool), "--hostname", "relay.test")
    r.start()
    again = f'[[listeners]]\nendpoint = "tcp:port={port}:interface=127.0.0.1:backlog=128"\n'
    line = _reload(r, BASE + again)
    assert "configuration reloaded from" in line, r.log()
    assert f"listener tcp:{port}:interface=127.0.0.1 is now tcp:port={port}:" in r.log()
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.sendmail("a@example.com", ["b@example.org"], b"Subject: kept\r\n\r\nhi\r\n")
    assert len(r.queued()) == 1

    import trustme

    leaf = trustme.CA().issue_cert("relay.test")
    leaf.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "both.pem"))
    ssl1 = f'[[listeners]]\nendpoint = "ssl:{port}:interface=127.0.0.1:privateKey={tmp_path}/both.pem"\n'
    line = _reload(r, BASE + ssl1)
    assert "configuration reloaded from" in line, r.log()
    assert f"listener tcp:port={port}:interface=127.0.0.1:backlog=128 is now ssl:{port}:" in r.log()
    with smtplib.SMTP_SSL("127.0.0.1", port, timeout=10,
                          context=ssl._create_unverified_context()) as s:
        s.sendmail("a@example.com", ["b@example.org"], b"Subject: tls\r\n\r\nhi\r\n")
    assert len(r.queued()) == 2
    # The port moved from loopback to every address: the socket to be closed holds it.
    line = _reload(r, BASE + f'[[listeners]]\nendpoint = "tcp:{port}"\n')
    assert "configuration not reloaded" in line and "Address already in use" in line, line
    assert (f"port {port} is held by the listener ssl:{port}:interface=127.0.0.1:privateKey="
            f"{tmp_path}/both.pem, which this reload closes: moving a port between addresses "
            "takes a restart") in line, line
    assert r.stop() in (0, -signal.SIGTERM)


def test_file_settings_replaced_by_command_line_options_are_named(relays) -> None:
    """A setting the file gives and a command-line option replaces (here --smarthost, and
    the harness's --listen): the start and every reload say that the file's value is not
    used.  The reload said only 'configuration reloaded' while mail went on to the
    command line's smarthost."""
    r = relays(BASE + '[relay]\nsmarthost = "[127.0.0.1]:3313"\n')
    r.args = ("--smarthost", "[127.0.0.1]:3302")
    r.start()
    assert re.search(r"relay\.smarthost in \S+mailrelay\.toml is not used: --smarthost on "
                     r"the command line replaces it", r.log()), r.log()
    before = r.log().count("is not used:")
    line = _reload(r, BASE + '[relay]\nsmarthost = "[127.0.0.1]:3314"\n'
                   '[[listeners]]\nendpoint = "tcp:0:interface=127.0.0.1"\n')
    assert "configuration reloaded from" in line
    text = r.log()
    assert text.count("is not used:") == before + 2, text
    assert "listeners in " in text and "--listen on the command line replaces it" in text


def test_new_certificate_is_served_after_a_reload(relays) -> None:
    import trustme

    ca = trustme.CA()
    r = _fileListeners(relays, BASE)
    r.directory.mkdir(parents=True, exist_ok=True)

    def issue(name: str) -> None:
        leaf = ca.issue_cert(name, "127.0.0.1")
        (r.directory / "relay.pem").write_bytes(b"".join(p.bytes() for p in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(str(r.directory / "relay.key"))

    def served() -> list:
        context = ssl.create_default_context()
        ca.configure_trust(context)
        with smtplib.SMTP("127.0.0.1", r.port, timeout=10) as s:
            s.starttls(context=context)
            cert = s.sock.getpeercert()
        return [v for kind, v in cert["subjectAltName"] if kind == "DNS"]

    tls = ('[[listeners]]\nendpoint = "tcp:0:interface=127.0.0.1"\n'
           'tls_certificate = "relay.pem"\ntls_key = "relay.key"\n')
    issue("first.relay.test")
    r.configText = BASE + tls
    r.start()
    assert "first.relay.test" in served()
    issue("second.relay.test")  # renewed on disk
    assert "first.relay.test" in served()  # not before the reload
    assert "configuration reloaded from" in _reload(r, BASE + tls)
    assert "second.relay.test" in served()
    # A certificate that does not load is refused; the one in use stays.
    (r.directory / "relay.pem").write_text("not a certificate\n")
    line = _reload(r, BASE + tls)
    assert "configuration not reloaded" in line and "listeners" in line
    assert "second.relay.test" in served()


def _replaceNextHop(relays, hop, extra: str = "") -> RelayProcess:
    """Deliver through a slow next hop, reload to a new one while a delivery is in flight:
    the delivery in flight ends once, new mail goes to the new next hop."""
    slow, oldPort = hop(2)
    fast, newPort = hop(0)
    config = ('drain_time = 10\n[relay]\nsmarthost = "[127.0.0.1]:{}"\n[dns]\n'
              "reverse_lookups = false\n" + extra)
    r = relays(config.format(oldPort)).start()
    r.waitForLog(r"queue manager started")
    _send(r.port, "before")
    slow.waitFor(lambda: slow.started >= 1, 20, "the delivery in flight")
    assert "configuration reloaded from" in _reload(r, config.format(newPort))
    _send(r.port, "after")
    fast.waitFor(lambda: fast.subjects["after"] == 1, 30, "the new mail at the new next hop")
    slow.waitFor(lambda: slow.subjects["before"] == 1, 30, "the delivery in flight")
    time.sleep(1)
    assert slow.subjects == Counter({"before": 1}) and fast.subjects == Counter({"after": 1})
    assert r.queued() == []
    return r


def test_delivery_process_is_replaced_without_losing_or_repeating_deliveries(relays, hop) -> None:
    r = _replaceNextHop(relays, hop)
    first = r.waitForLog(r"delivery process started \(pid (\d+)\)").group(1)
    r.waitForLog(rf"previous delivery process \(pid {first}\) exited")


def test_sigusr1_still_rotates_the_log(tmp_path: Path) -> None:
    logfile = tmp_path / "relay.log"
    p = subprocess.Popen(
        [TWISTD, "-n", "--pidfile=", f"--logfile={logfile}", "mailrelay",
         "--listen", "tcp:0:interface=127.0.0.1", "--spool", str(tmp_path / "spool"),
         "--hostname", "relay.test"],
        cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while "queue manager started" not in (logfile.read_text() if logfile.exists() else ""):
            assert time.monotonic() < deadline and p.poll() is None
            time.sleep(0.1)
        p.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while not (tmp_path / "relay.log.1").exists():
            assert time.monotonic() < deadline, "SIGUSR1 did not rotate the log"
            time.sleep(0.1)
        p.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "configuration reloaded from (embedded default)" not in logfile.read_text():
            assert time.monotonic() < deadline and p.poll() is None
            time.sleep(0.1)
    finally:
        p.terminate()
        p.wait(30)


def test_hold_is_lifted_by_a_reload(relays, hop) -> None:
    """[queue] hold switched off by a reload: what waited is delivered; switched on again:
    nothing more is."""
    fast, port = hop(0)
    config = 'drain_time = 5\n[relay]\nsmarthost = "[127.0.0.1]:{}"\n[dns]\nreverse_lookups = false\n'
    held = config.format(port) + "[queue]\nhold = true\n"
    r = relays(held).start()
    _send(r.port, "waited")
    time.sleep(1)
    assert not fast.subjects and len(r.queued()) == 1
    assert "configuration reloaded from" in _reload(r, config.format(port))
    fast.waitFor(lambda: fast.subjects["waited"] == 1, 30, "the held message")
    assert "configuration reloaded from" in _reload(r, held)
    r.waitForLog(r"queue.hold is set: the delivery process is stopped")
    r.waitForLog(r"previous delivery process \(pid \d+\) exited")
    _send(r.port, "held again")
    time.sleep(1)
    assert fast.subjects == Counter({"waited": 1}) and len(r.queued()) == 1


def test_inline_queue_manager_is_replaced_by_a_reload(relays, hop) -> None:
    r = _replaceNextHop(relays, hop, '[queue]\nprocess = "inline"\n')
    assert "delivery process started" not in r.log()
    assert r.stop() in (0, -signal.SIGTERM)


class _PickyHop(SlowHop):
    """A next hop that defers every recipient until C{accepting}, then every one but
    C{later@...}; counts the deliveries to each recipient."""

    def __init__(self) -> None:
        super().__init__(0)
        self.accepting = False
        self.delivered: Counter[str] = Counter()

    async def handle_RCPT(self, server, session, envelope, address, options) -> str:
        if not self.accepting or address.startswith("later@"):
            return "450 4.2.0 not now"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope) -> str:
        with self.cond:
            self.delivered.update(envelope.rcpt_tos)
            self.cond.notify_all()
        return "250 2.0.0 OK"


def test_a_delivery_state_the_spool_could_not_take_survives_a_reload(relays, tmp_path) -> None:
    """A recipient delivered while the spool cannot save the delivery state (its file
    system full, here its tmp/ unusable), then a reload: the old delivery process saves the
    state it kept in memory before it exits, and the new one does not deliver the message
    to that recipient again.  The new one sent it a second time, and no line said it might."""
    from tests.test_e2e_control import ok
    from tests.test_e2e_outbound import _TCPController

    hopHandler = _PickyHop()
    controller = _TCPController(hopHandler, hostname="127.0.0.1", port=0, ready_timeout=10)
    controller.start()
    try:
        config = (f'[relay]\nsmarthost = "[127.0.0.1]:{controller.port}"\n'
                  "[dns]\nreverse_lookups = false\n")
        r = relays(config).start()
        r.waitForLog(r"queue manager started")
        with smtplib.SMTP("127.0.0.1", r.port, timeout=20) as s:
            s.sendmail("alice@example.com", ["ok@example.org", "later@example.org"],
                       b"Subject: once\r\n\r\nbody\r\n")
        (queueID,) = r.queued()
        r.waitForLog(rf"{queueID}: to=<later@example.org>.*status=deferred")
        tmp = r.spool / "tmp"
        tmp.rename(r.spool / "tmp.away")
        tmp.write_text("not a directory\n")  # the spool's envelope updates fail
        hopHandler.accepting = True
        ok(r, "queue", "flush")
        r.waitForLog(rf"{queueID}: saving the delivery state failed")
        assert hopHandler.delivered == Counter({"ok@example.org": 1})
        tmp.unlink()
        (r.spool / "tmp.away").rename(tmp)
        assert "configuration reloaded from" in _reload(r, config)
        r.waitForLog(rf"{queueID}: delivery state saved at the stop")
        r.waitForLog(r"previous delivery process \(pid \d+\) exited")
        before = r.log().count(f"{queueID}: to=<later@example.org>")
        ok(r, "queue", "flush")
        deadline = time.monotonic() + 20
        while r.log().count(f"{queueID}: to=<later@example.org>") == before:
            assert time.monotonic() < deadline, r.log()
            time.sleep(0.1)
        assert hopHandler.delivered == Counter({"ok@example.org": 1}), r.log()
    finally:
        controller.stop()


def test_a_reload_after_the_code_changed_says_to_restart(relays, tmp_path: Path) -> None:
    """A site edits its plugin (or upgrades mailrelay) and reloads: the relay goes on
    running the code it loaded at start-up, and says so -- in the log, to `mailrelay
    reload` and in `mailrelay status` -- naming the changed file, instead of seeming to have
    taken the change.  It said only "configuration reloaded"."""
    import os

    from tests.test_e2e_control import cli

    site = tmp_path / "site"
    (site / "twisted" / "plugins").mkdir(parents=True)
    module = site / "site_starting.py"
    module.write_text(SERVICE_MODULE)
    (site / "twisted" / "plugins" / "site_starting_plugin.py").write_text(SERVICE_DROPIN)
    env = {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    plugin = '[[plugins]]\nplugin = "test-starting"\ntag = "ok"\n'
    r = relays(BASE + plugin, env=env).start()
    p = cli(r, "reload")
    assert p.returncode == 0 and "code" not in p.stderr, p
    assert "code on disk" not in cli(r, "status").stdout

    module.write_text(SERVICE_MODULE + "\n# edited by the site\n")
    p = cli(r, "reload")
    assert p.returncode == 0, p  # (the configuration was reloaded)
    assert "configuration reloaded" in p.stdout, p
    # (A site's plugin module is not among what the fork server loaded: the processes the
    # relay starts import it anew.)
    said = ("the code on disk changed since the relay started (1 file of loaded modules: "
            f"{module}); the relay goes on running the code loaded at start-up, but the "
            "processes it starts (the delivery process, the acceptors) import 1 of them anew "
            f"when they use it ({module}), running the new code beside the relay's old: "
            "restart the relay (not reload) to run the new code everywhere")
    assert f"mailrelay: warning: {said}" in p.stderr, p
    r.waitForLog(re.escape(said))
    status = cli(r, "status")
    assert f"code: {said}" in status.stdout, status

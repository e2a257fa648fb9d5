"""End-to-end tests of operating the relay (the real C{twistd -n mailrelay}): the log level,
metrics and the health check, the run user (C{--uid}/C{--gid})."""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

from tests.harness import RelayProcess, freePort
from tests.test_e2e_outbound import (  # noqa: F401 - fixtures
    _mxRoutes,
    config,
    dns,
    message,
    nexthop,
    relay,
    submit,
    waitRemoved,
    waitResult,
)

_DNS_CHATTER = ("Starting protocol <twisted.names.dns.DNSDatagramProtocol", "(UDP Port ")


def waitListening(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on port {port} after {timeout}s")


# ---------------------------------------------------------------------------------------------
# The log level


def test_logLevelInfoHidesDNSChatter(relay, nexthop, dns) -> None:
    """At the default level a delivery by MX lookup logs its result, not Twisted's lines
    about each DNS query's UDP port; at debug those lines are there."""
    hop, port = nexthop()
    notices, noticePort = nexthop()
    r = relay(config(dns, routes=_mxRoutes(port, noticePort)))
    qid = submit(r, "alice@sender.test", ["user@mx.test"], message("info"))
    assert waitResult(r, qid, "user@mx.test")["status"] == "sent"
    waitRemoved(r, qid)
    assert ("mx.test", "MX") in dns.queries()
    assert not any(chatter in r.log() for chatter in _DNS_CHATTER), r.log()

    r = relay(config(dns, routes=_mxRoutes(port, noticePort)) + '[log]\nlevel = "debug"\n')
    qid = submit(r, "alice@sender.test", ["user@mx.test"], message("debug"))
    assert waitResult(r, qid, "user@mx.test")["status"] == "sent"
    assert all(chatter in r.log() for chatter in _DNS_CHATTER), r.log()


def test_logLevelWarnAndReload(tmp_path: Path) -> None:
    """At "warn" the relay logs its warnings only (not even where it listens); a reload
    back to "info" brings the connection lines back."""
    port = freePort()
    r = RelayProcess(tmp_path / "relay", '[log]\nlevel = "warn"\n',
                     args=("--listen", f"tcp:{port}:interface=127.0.0.1"), listeners=0, hold=True)
    r.start()
    r.ports = [port]
    try:
        waitListening(port)
        r.connect().close()
        r.waitForLog(r"queue\.hold is set")  # a warning
        time.sleep(0.5)
        assert "listening on" not in r.log() and "connect from" not in r.log(), r.log()
        r.configText = "[queue]\nhold = true\n[log]\nlevel = \"info\"\n"
        (r.directory / "mailrelay.toml").write_text(r.configText)
        assert r.process is not None
        r.process.send_signal(signal.SIGHUP)
        r.waitForLog(r"configuration reloaded")
        r.connect().close()
        r.waitForLog(r"connect from 127\.0\.0\.1")
    finally:
        r.stop()

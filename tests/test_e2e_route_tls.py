"""End-to-end: TLS settings belong to the route the router chose, not to the next hop's name
(issue 7, point 3).

One next hop (aiosmtpd offering STARTTLS, with a trustme certificate) is both the smarthost,
configured C{tls = "required"}, and the next hop of a C{[[routes]]} entry configured
C{tls = "none"}.  Smarthost mail must arrive over TLS, the route's mail in plaintext, and a
connection is only reused for a delivery with the very same settings.
"""

from __future__ import annotations

import smtplib
import ssl
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.harness import DNSServer, RelayProcess
from tests.test_e2e_outbound import Recorder, _TCPController


class TLSRecorder(Recorder):
    """A L{Recorder} that also notes, per recipient, the connection (client address and port)
    and whether it was under TLS when the recipient was given."""

    def __init__(self) -> None:
        super().__init__()
        self.sessions: dict[str, tuple[Any, bool]] = {}

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        with self.cond:
            self.sessions[address] = (session.peer, session.ssl is not None)
        return await super().handle_RCPT(server, session, envelope, address, rcpt_options)


@pytest.fixture(scope="module")
def dns(tmp_path_factory: pytest.TempPathFactory):
    server = DNSServer(tmp_path_factory.mktemp("dns"), "test",
                       [["smarthost.tls.test", "A", "127.0.0.1"]])
    yield server
    server.stop()


@pytest.fixture
def nexthop(tmp_path: Path):
    """A next hop offering (not requiring) STARTTLS: C{(TLSRecorder, port, caFile)}."""
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("smarthost.tls.test").configure_cert(context)
    caFile = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(caFile))
    recorder = TLSRecorder()
    controller = _TCPController(recorder, hostname="127.0.0.1", port=0, ready_timeout=10,
                                tls_context=context, require_starttls=False)
    controller.start()
    yield recorder, controller.port, caFile
    controller.stop()


def _relay(tmp_path: Path, dns: DNSServer, port: int, caFile: Path) -> RelayProcess:
    config = (
        f'[relay]\nsmarthost = "[smarthost.tls.test]:{port}"\n'
        f'[smarthost]\ntls = "required"\nca_file = "{caFile}"\n'
        # A long cache time: a connection left by one delivery is there for the next one.
        "[delivery]\nconnection_cache_time = 60\n"
        f'[dns]\nreverse_lookups = false\nnameservers = ["127.0.0.1:{dns.port}"]\n'
        "[queue]\nmin_backoff = 60\n"
        '[[routes]]\ndomain = "plain.example"\nbackend = "smtp"\n'
        f'nexthop = "[smarthost.tls.test]:{port}"\ntls = "none"\n'
    )
    return RelayProcess(tmp_path / "relay", config).start()


def _send(r: RelayProcess, to: str) -> None:
    with smtplib.SMTP("127.0.0.1", r.port, timeout=10) as s:
        s.sendmail("alice@example.com", [to], f"Subject: to {to}\r\n\r\nsecret\r\n".encode())


def _deliver(r: RelayProcess, recorder: TLSRecorder, to: str) -> tuple[Any, bool]:
    """Send a message to C{to}; the next hop's connection and TLS state for it."""
    _send(r, to)
    recorder.waitTo(to)
    r.waitForLog(rf"to=<{to.replace('.', '[.]')}>.*status=sent")
    return recorder.sessions[to]


@pytest.mark.parametrize("smarthostFirst", [True, False], ids=["smarthost-first", "route-first"])
def test_smarthost_mail_keeps_its_tls_when_a_route_shares_the_next_hop(
    tmp_path: Path, dns: DNSServer, nexthop: Any, smarthostFirst: bool
) -> None:
    recorder, port, caFile = nexthop
    r = _relay(tmp_path, dns, port, caFile)
    try:
        # The first delivery's connection is idle in the cache when the second one starts.
        if smarthostFirst:
            tlsPeer, tls = _deliver(r, recorder, "bob@example.org")
            plainPeer, plainTLS = _deliver(r, recorder, "carol@plain.example")
        else:
            plainPeer, plainTLS = _deliver(r, recorder, "carol@plain.example")
            tlsPeer, tls = _deliver(r, recorder, "bob@example.org")
        assert tls, "smarthost mail (tls = required) went out in plaintext"
        assert not plainTLS  # the route says tls = "none"
        assert tlsPeer != plainPeer  # different settings: never the same connection
        # The same settings again: the smarthost's TLS connection is reused.
        assert _deliver(r, recorder, "dave@example.org") == (tlsPeer, True)
    finally:
        r.stop()


def test_smarthost_does_not_trust_the_ca_file_of_delivery(
    tmp_path: Path, dns: DNSServer, nexthop: Any
) -> None:
    """C{[delivery] ca_file} is for MX hosts and smtp routes; the smarthost's certificate is
    verified against its own C{[smarthost] ca_file}, by default the system's trust store, which
    does not know the next hop's test CA: its mail is deferred, never sent."""
    recorder, port, caFile = nexthop
    config = (
        f'[relay]\nsmarthost = "[smarthost.tls.test]:{port}"\n'
        '[smarthost]\ntls = "required"\n'
        f'[delivery]\nca_file = "{caFile}"\n'
        f'[dns]\nreverse_lookups = false\nnameservers = ["127.0.0.1:{dns.port}"]\n'
        "[queue]\nmin_backoff = 60\n"
    )
    r = RelayProcess(tmp_path / "relay", config).start()
    try:
        _send(r, "bob@example.org")
        line = r.waitForLog(r"to=<bob@example\.org>.*status=\w+ \(.*\)")[0]
    finally:
        r.stop()
    assert "status=deferred" in line and "certificate not trusted" in line, line
    assert recorder.sessions == {}

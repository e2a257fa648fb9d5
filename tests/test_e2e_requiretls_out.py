"""End-to-end, REQUIRETLS (RFC 8689) and C{TLS-Required: No} on the way out: the real
C{twistd -n mailrelay} delivering to an aiosmtpd smarthost with STARTTLS (a trustme
certificate) that offers REQUIRETLS, or not.

A message marked REQUIRETLS goes only over TLS with a verified certificate (the smarthost's
C{tls = "may"} is raised to verified for it) to a next hop offering REQUIRETLS, with the
REQUIRETLS parameter; otherwise it is returned with 5.7.30, at once, and the report returns
none of it.  A message with C{TLS-Required: No} is delivered over TLS that cannot be verified
where C{tls = "required"} would defer it.

The envelope flag is the receiving side's to set (MAIL ... REQUIRETLS over TLS); these tests
set it in the spooled envelope of a held message, then let the relay deliver it.
"""

from __future__ import annotations

import json
import smtplib
import ssl
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP

from tests.harness import DNSServer, RelayProcess
from tests.test_e2e_outbound import Recorder, ScriptedServer, _TCPController, parseReport


@pytest.fixture(scope="module")
def dns(tmp_path_factory: pytest.TempPathFactory):
    server = DNSServer(tmp_path_factory.mktemp("dns"), "test",
                       [["smarthost.tls.test", "A", "127.0.0.1"]])
    yield server
    server.stop()


class RequireTLSRecorder(Recorder):
    """A L{Recorder} that offers REQUIRETLS after STARTTLS when C{offer} is set."""

    def __init__(self, offer: bool) -> None:
        super().__init__()
        self.offer = offer

    async def handle_EHLO(self, server: Any, session: Any, envelope: Any, hostname: str,
                          responses: list[str]) -> list[str]:
        session.host_name = hostname
        if self.offer and session.ssl is not None:
            responses.insert(-1, "250-REQUIRETLS")
        return responses


class RequireTLSSMTP(SMTP):
    """aiosmtpd taking the REQUIRETLS parameter of MAIL (kept in the mail options)."""

    def _getparams(self, params: Any) -> Any:
        result = super()._getparams(params)
        if result is not None:
            result.pop("REQUIRETLS", None)
        return result


class Controller(_TCPController):
    def factory(self) -> SMTP:
        return RequireTLSSMTP(self.handler, **self.SMTP_kwargs)


class LMTPController(_TCPController):
    def factory(self) -> SMTP:
        return LMTP(self.handler, **self.SMTP_kwargs)


@pytest.fixture
def lmtpServer():
    """An LMTP server on 127.0.0.1, over TCP, without STARTTLS: C{(recorder, port)}."""
    recorder = Recorder(lmtp=True)
    controller = LMTPController(recorder, hostname="127.0.0.1", port=0, ready_timeout=10)
    controller.start()
    yield recorder, controller.port
    controller.stop()


@pytest.fixture
def smarthost(tmp_path: Path):
    """C{start(offer=True, selfSigned=False, implicit=False)} -> (recorder, port, CA file);
    C{implicit}: TLS from the first byte (RFC 8314) instead of STARTTLS."""
    controllers: list[Any] = []

    def start(offer: bool = True, selfSigned: bool = False,
              implicit: bool = False) -> tuple[Recorder, int, Path]:
        trusted = trustme.CA()
        ca = trustme.CA() if selfSigned else trusted
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("smarthost.tls.test").configure_cert(context)
        caFile = tmp_path / f"ca{len(controllers)}.pem"
        trusted.cert_pem.write_to_path(str(caFile))
        handler = RequireTLSRecorder(offer)
        controller = Controller(handler, hostname="127.0.0.1", port=0, ready_timeout=10,
                                **{"ssl_context" if implicit else "tls_context": context})
        controller.start()
        controllers.append(controller)
        return handler, controller.port, caFile

    yield start
    for c in controllers:
        c.stop()


def _config(dns: DNSServer, port: int, caFile: Path, tmp_path: Path, tls: str,
            hold: bool, routes: str = "") -> str:
    template = tmp_path / "mail" / "{domain}" / "{local}" / "Maildir"
    (tmp_path / "mail" / "sender.test" / "alice").mkdir(parents=True, exist_ok=True)  # (a maildir route delivers only to users whose directory exists)
    return (
        f'[relay]\nsmarthost = "[smarthost.tls.test]:{port}"\n'
        f'[smarthost]\ntls = "{tls}"\nca_file = "{caFile}"\n'
        f'[dns]\nreverse_lookups = false\nnameservers = ["127.0.0.1:{dns.port}"]\n'
        f"[queue]\nmin_backoff = 60\nhold = {'true' if hold else 'false'}\n"
        f'[[routes]]\ndomain = "sender.test"\nbackend = "maildir"\nnexthop = "{template}"\n'
        + routes
    )


def markRequireTLS(r: RelayProcess, queueIDs: Iterable[str], requireTLS: bool = True) -> None:
    """Mark the spooled envelopes of C{queueIDs} (the relay C{r} stopped) C{requireTLS}, as
    the receiving side does for MAIL ... REQUIRETLS over TLS (RFC 8689)."""
    for queueID in queueIDs:
        path = r.spool / "queue" / f"{queueID}.json"
        envelope = json.loads(path.read_bytes())
        envelope["requireTLS"] = requireTLS
        path.write_text(json.dumps(envelope))


def _queueHeld(tmp_path: Path, dns: DNSServer, port: int, caFile: Path, tls: str,
               message: bytes, requireTLS: bool, routes: str = "") -> tuple[RelayProcess, str]:
    """A relay that has spooled C{message} (held), its envelope marked C{requireTLS}, then
    restarted to deliver it; C{routes}: more C{[[routes]]} tables."""
    r = RelayProcess(tmp_path / "relay", _config(dns, port, caFile, tmp_path, tls, True, routes))
    r.start()
    with smtplib.SMTP("127.0.0.1", r.port, timeout=10) as s:
        s.sendmail("alice@sender.test", ["bob@example.org"], message)
    (qid,) = r.queued()
    r.stop()
    markRequireTLS(r, [qid], requireTLS)
    r.configText = _config(dns, port, caFile, tmp_path, tls, False, routes)
    r.start()
    return r, qid


def _report(tmp_path: Path) -> bytes:
    box = tmp_path / "mail" / "sender.test" / "alice" / "Maildir" / "new"
    (path,) = list(box.iterdir())
    return path.read_bytes().split(b"\n", 2)[2].replace(b"\n", b"\r\n")


SECRET = b"Subject: secret plans\r\n\r\nThe secret.\r\n"


def test_requiretls_delivered_over_verified_tls(tmp_path: Path, dns, smarthost) -> None:
    recorder, port, caFile = smarthost(offer=True)
    # tls = "may" for other mail; REQUIRETLS makes it verified for this message.
    r, qid = _queueHeld(tmp_path, dns, port, caFile, "may", SECRET, requireTLS=True)
    try:
        (got,) = recorder.waitTo("bob@example.org")
        assert "REQUIRETLS" in got.mailOptions
        assert got.content.endswith(SECRET.split(b"\r\n\r\n", 1)[1])
        r.waitForLog(rf"{qid}: to=<bob@example\.org>.*status=sent")
    finally:
        r.stop()


@pytest.mark.parametrize("offer, selfSigned, why", [
    (False, False, "REQUIRETLS support required, but smarthost.tls.test[127.0.0.1] does not "
                   "offer REQUIRETLS"),
    (True, True, "certificate not trusted"),
])
def test_requiretls_returned_when_it_cannot_be_met(tmp_path: Path, dns, smarthost, offer: bool,
                                                   selfSigned: bool, why: str) -> None:
    recorder, port, caFile = smarthost(offer=offer, selfSigned=selfSigned)
    r, qid = _queueHeld(tmp_path, dns, port, caFile, "may", SECRET, requireTLS=True)
    try:
        m = r.waitForLog(rf"{qid}: to=<bob@example\.org>.*status=bounced \((.*)\)")
        assert why in m.group(1)
        r.waitForLog(rf"{qid}: removed")
        assert recorder.to("bob@example.org") == []  # never sent, not even unverified
        _, _, [block], parts = parseReport(_report(tmp_path))
        assert (block["Action"], block["Status"]) == ("failed", "5.7.30")
        assert len(parts) == 2  # none of the message comes back
        assert b"secret" not in _report(tmp_path)
    finally:
        r.stop()


@pytest.mark.parametrize("tls", ["required", "implicit"])
def test_tls_required_no_header(tmp_path: Path, dns, smarthost, tls: str) -> None:
    """tls = "required" (or "implicit") and a certificate that cannot be verified: mail is
    deferred, but a message whose sender said TLS-Required: No goes (over TLS, unverified:
    implicit TLS cannot be left out, as Postfix's "encrypt" level under its wrapper mode)."""
    recorder, port, caFile = smarthost(offer=False, selfSigned=True,
                                       implicit=tls == "implicit")
    r, qid = _queueHeld(tmp_path, dns, port, caFile, tls,
                        b"TLS-Required: No\r\nSubject: not secret\r\n\r\nHello.\r\n",
                        requireTLS=False)
    try:
        recorder.waitTo("bob@example.org")
        r.waitForLog(rf"{qid}: TLS-Required: No: delivering to \[smarthost\.tls\.test\]:{port}")
        r.waitForLog(rf"Untrusted TLS connection established to smarthost\.tls\.test"
                     rf"\[127\.0\.0\.1\]:{port}")
        r.waitForLog(rf"{qid}: to=<bob@example\.org>.*status=sent")
        with smtplib.SMTP("127.0.0.1", r.port, timeout=10) as s:
            s.sendmail("alice@sender.test", ["carol@example.org"], b"Subject: plain\r\n\r\nx\r\n")
        m = r.waitForLog(r"to=<carol@example\.org>.*status=deferred \((.*)\)")
        assert "certificate not trusted" in m.group(1)
    finally:
        r.stop()


def test_requiretls_not_sent_to_an_lmtp_server_over_tcp_without_tls(
    tmp_path: Path, dns, smarthost, lmtpServer
) -> None:
    """An LMTP server reached over TCP is across a network, unlike one on a UNIX socket: a
    REQUIRETLS message goes to it only over verified TLS; this one does not offer STARTTLS,
    so the message is returned (5.7.30), never sent in plaintext."""
    _, port, caFile = smarthost()
    store, lmtpPort = lmtpServer
    route = (f'[[routes]]\ndomain = "example.org"\nbackend = "lmtp"\n'
             f'nexthop = "127.0.0.1:{lmtpPort}"\n')
    r, qid = _queueHeld(tmp_path, dns, port, caFile, "may", SECRET, requireTLS=True,
                        routes=route)
    try:
        m = r.waitForLog(rf"{qid}: to=<bob@example\.org>.*status=(\w+) \((.*)\)")
        assert m.group(1) == "bounced", m.group(0)
        assert "does not offer STARTTLS (REQUIRETLS support required)" in m.group(2)
        r.waitForLog(rf"{qid}: removed")
        assert store.to("bob@example.org") == []
        _, _, [block], _ = parseReport(_report(tmp_path))
        assert (block["Action"], block["Status"]) == ("failed", "5.7.30")
    finally:
        r.stop()


def test_requiretls_returned_when_no_fallback_relay_can_carry_it(
    tmp_path: Path, dns, smarthost
) -> None:
    """A route's fallback relay found by an MX lookup that cannot be secured here cannot
    carry a REQUIRETLS message: when the route's next hop does not offer STARTTLS, the
    message is returned (5.7.30) at once, as without the fallback relay, not deferred
    until it expires."""
    _, port, caFile = smarthost()
    plain = ScriptedServer()
    try:
        route = (f'[[routes]]\ndomain = "example.org"\nbackend = "smtp"\n'
                 f'nexthop = "[127.0.0.1]:{plain.port}"\n'
                 'fallback_relay = ["fallback.example"]\n')
        r, qid = _queueHeld(tmp_path, dns, port, caFile, "may", SECRET, requireTLS=True,
                            routes=route)
        try:
            m = r.waitForLog(rf"{qid}: to=<bob@example\.org>.*status=(\w+) \((.*)\)")
            assert m.group(1) == "bounced", m.group(0)
            assert "(REQUIRETLS support required)" in m.group(2), m.group(0)
            r.waitForLog(rf"{qid}: REQUIRETLS: fallback relay fallback\.example not used")
        finally:
            r.stop()
    finally:
        plain.close()

"""End-to-end: the real relay logging in (SMTP AUTH) to a smarthost that offers AUTH after
STARTTLS (aiosmtpd with a trustme certificate).  The right password delivers; a refused one
(535) defers the mail, as Postfix's smtp_sasl_auth_soft_bounce, with a log line saying it
was AUTH that was refused; the password is never logged."""

from __future__ import annotations

import base64
import smtplib
import ssl
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiosmtpd.smtp import AuthResult, LoginPassword

from tests.harness import DNSServer, RelayProcess
from tests.test_e2e_outbound import Recorder, _TCPController
from tests.test_e2e_smarthost_tls import dns  # noqa: F401 - the DNS fixture (smarthost.tls.test)

PASSWORD = "correct horse battery staple"


@pytest.fixture
def smarthost(tmp_path: Path):
    """A next hop offering STARTTLS, and AUTH once TLS is up, for the user "relay" with
    L{PASSWORD}: C{(Recorder, port, caFile, logins)}; C{logins} lists the (user, password)
    pairs tried."""
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("smarthost.tls.test").configure_cert(context)
    caFile = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(caFile))
    logins: list[tuple[bytes, bytes]] = []

    def authenticator(server: Any, session: Any, envelope: Any, mechanism: str,
                      data: Any) -> AuthResult:
        if isinstance(data, LoginPassword):
            logins.append((data.login, data.password))
            if (data.login, data.password) == (b"relay", PASSWORD.encode()):
                return AuthResult(success=True)
        # (This aiosmtpd does not answer a refusal without a message.)
        return AuthResult(success=False, handled=False, message="535 5.7.8 go away")

    recorder = Recorder()
    controller = _TCPController(recorder, hostname="127.0.0.1", port=0, ready_timeout=10,
                                tls_context=context, require_starttls=True,
                                authenticator=authenticator, auth_required=True)
    controller.start()
    yield recorder, controller.port, caFile, logins
    controller.stop()


def _relay(tmp_path: Path, dns: DNSServer, port: int, caFile: Path, password: str
           ) -> RelayProcess:
    passwordFile = tmp_path / "smarthost.password"
    passwordFile.write_text(password + "\n")
    config = (
        f'[relay]\nsmarthost = "[smarthost.tls.test]:{port}"\n'
        f'[smarthost]\ntls = "required"\nca_file = "{caFile}"\nusername = "relay"\n'
        f'password_file = "{passwordFile}"\n'
        f'[dns]\nreverse_lookups = false\nnameservers = ["127.0.0.1:{dns.port}"]\n'
        "[queue]\nmin_backoff = 60\n"
    )
    return RelayProcess(tmp_path / "relay", config).start()


def _send(r: RelayProcess) -> None:
    with smtplib.SMTP("127.0.0.1", r.port, timeout=10) as s:
        s.sendmail("alice@example.com", ["bob@example.org"], b"Subject: auth\r\n\r\nhi\r\n")


def _assertPasswordNotLogged(r: RelayProcess, password: str) -> None:
    log = r.log()
    plain = base64.b64encode(b"\0relay\0" + password.encode()).decode()
    for secret in (password, plain, base64.b64encode(password.encode()).decode()):
        assert secret not in log


def test_the_right_password_delivers(tmp_path: Path, dns, smarthost) -> None:
    recorder, port, caFile, logins = smarthost
    r = _relay(tmp_path, dns, port, caFile, PASSWORD)
    try:
        _send(r)
        (message,) = recorder.waitTo("bob@example.org")
        assert logins == [(b"relay", PASSWORD.encode())]
        r.waitForLog(r"connected to smarthost\.tls\.test\[127\.0\.0\.1\]:\d+: tls=True "
                     r"auth=True")
        r.waitForLog(r"to=<bob@example\.org>.*status=sent")
        _assertPasswordNotLogged(r, PASSWORD)
    finally:
        r.stop()


def test_a_refused_password_defers_and_says_auth_was_refused(
    tmp_path: Path, dns, smarthost
) -> None:
    recorder, port, caFile, logins = smarthost
    r = _relay(tmp_path, dns, port, caFile, "wrong password")
    try:
        _send(r)
        m = r.waitForLog(r"to=<bob@example\.org>.*status=(\w+) \((.*)\)\n")
        assert m.group(1) == "deferred"  # (Postfix's smtp_sasl_auth_soft_bounce)
        assert m.group(2).startswith("smtp; 535 ")
        assert m.group(2).endswith(" (in reply to AUTH command)")
        r.waitForLog(r"connection to smarthost\.tls\.test\[127\.0\.0\.1\] failed: smtp; 535 "
                     r".* \(in reply to AUTH command\)\n")
        assert logins == [(b"relay", b"wrong password")]
        assert recorder.to("bob@example.org") == []
        assert len(r.queued()) == 1
        _assertPasswordNotLogged(r, "wrong password")
    finally:
        r.stop()

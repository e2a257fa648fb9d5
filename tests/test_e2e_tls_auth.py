"""End-to-end: STARTTLS, implicit TLS, AUTH and submission with the real C{twistd -n mailrelay}
and real clients (swaks, smtplib, raw sockets wrapped in C{ssl}); certificates from trustme,
users made with the real C{mailrelay-passwd} (C{python -m mailrelay.passwd})."""

from __future__ import annotations

import base64
import contextlib
import json
import re
import smtplib
import socket
import ssl
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.harness import TWISTD, LineClient, RelayProcess, requireTool

PASSWORDS = {"alice": "alice's secret", "bob": "b0b pw"}

LISTENERS = """
[[listeners]]
endpoint = "tcp:0:interface=127.0.0.1"
tls_certificate = "relay.pem"
tls_key = "relay.key"
auth = true

[[listeners]]
endpoint = "tcp:port=0:interface=127.0.0.1"
mode = "submission"
tls_certificate = "relay.pem"
tls_key = "relay.key"

[[listeners]]
endpoint = "tcp:interface=127.0.0.1:port=0"
mode = "submissions"
tls_certificate = "relay.pem"
tls_key = "relay.key"
"""

AUTH = """
[relay]
networks = []

[auth]
password_file = "users"
throttle_after = 2
failure_delay = 0.5
max_failures = 4

[auth.senders]
bob = ["@bob.example"]
"""


def passwd(directory: Path, *args: str, password: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mailrelay.passwd", *args], cwd=directory, input=password,
        capture_output=True, text=True, timeout=60,
    )


class Site:
    """A relay directory: certificate (for relay.test and 127.0.0.1), CA, users."""

    def __init__(self, directory: Path) -> None:
        import trustme

        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.ca = trustme.CA()
        leaf = self.ca.issue_cert("relay.test", "127.0.0.1")
        (directory / "relay.pem").write_bytes(b"".join(p.bytes() for p in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(str(directory / "relay.key"))
        self.caFile = directory / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.caFile))
        for user, password in PASSWORDS.items():
            out = passwd(directory, "--stdin", "users", "add", user, password=password + "\n")
            assert out.returncode == 0, out.stderr

    def context(self, **kw) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.caFile))
        for name, value in kw.items():
            setattr(context, name, value)
        return context


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path / "relay")


@pytest.fixture
def relay(site: Site):
    started: list[RelayProcess] = []

    def start(config: str = AUTH + LISTENERS, listeners: int = 3) -> RelayProcess:
        r = RelayProcess(
            site.directory, config, ("--spool", str(site.directory / "spool"), "--hostname", "relay.test"),
            defaults=False, listeners=listeners, hold=True,
        )
        started.append(r)
        return r.start()

    yield start
    for r in started:
        r.stop()


def queued(r: RelayProcess) -> list[tuple[dict, bytes]]:
    out = []
    for queueID in r.queued():
        base = r.spool / "queue" / queueID
        out.append((json.loads(base.with_suffix(".json").read_text()), base.with_suffix(".eml").read_bytes()))
    return out


def received(message: bytes) -> str:
    end = message.index(b"\r\n", message.index(b"; ")) if b"; " in message else len(message)
    return message[:end].decode()


#: (The user name is not shown: Postfix's smtpd_sasl_authenticated_header = no.)
RECEIVED_TLS = re.compile(
    r"with ESMTPSA id \w+\r\n\t\(using (TLSv1\.[23]) (\S+)\)\r\n\tfor <"
)


# STARTTLS + AUTH ---------------------------------------------------------------------------------


def test_swaks_starttls_auth_plain(relay, site) -> None:
    swaks = requireTool("swaks")
    r = relay()
    out = subprocess.run(
        [swaks, "--server", f"127.0.0.1:{r.ports[0]}", "--tls", "--tls-verify", "--tls-ca-path",
         str(site.caFile), "--auth", "PLAIN", "--auth-user", "alice", "--auth-password",
         PASSWORDS["alice"], "--from", "alice@example.com", "--to", "carol@example.org",
         "--ehlo", "laptop.example", "--header", "Subject: via swaks"],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "235 2.7.0 Authentication successful" in out.stdout
    ((envelope, message),) = queued(r)
    assert envelope["client"]["authUser"] == "alice"
    assert envelope["client"]["protocol"] == "ESMTPSA"
    m = RECEIVED_TLS.search(message.decode())
    assert m, received(message)
    assert "alice" not in received(message)
    assert envelope["client"]["tls"] == f"{m.group(1)} {m.group(2)}"
    assert f"client=127.0.0.1 sasl_username=alice result=250 2.0.0 Ok: queued as {envelope['queueID']}" in r.log()


def test_smtplib_starttls_login_on_submission(relay, site) -> None:
    r = relay()
    with smtplib.SMTP("127.0.0.1", r.ports[1], timeout=10) as s:
        s.ehlo("laptop.example")
        assert s.has_extn("starttls") and not s.has_extn("auth")
        s.starttls(context=site.context())
        s.ehlo("laptop.example")
        assert not s.has_extn("starttls")
        assert s.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]
        assert s.login("alice", PASSWORDS["alice"])[0] == 235
        s.sendmail("alice@example.com", ["carol@example.org"], b"Subject: via smtplib\r\n\r\nhi\r\n")
    # LOGIN, and a TLS 1.2 client.
    with smtplib.SMTP("127.0.0.1", r.ports[1], timeout=10) as s:
        s.starttls(context=site.context(maximum_version=ssl.TLSVersion.TLSv1_2))
        s.ehlo("laptop.example")
        s.user, s.password = "bob", PASSWORDS["bob"]
        assert s.auth("LOGIN", s.auth_login)[0] == 235
        s.sendmail("bob@bob.example", ["carol@example.org"], b"Subject: TLS 1.2\r\n\r\nhi\r\n")
    messages = sorted(queued(r), key=lambda x: x[0]["client"]["authUser"])
    assert [e["client"]["authUser"] for e, _ in messages] == ["alice", "bob"]
    (e1, m1), (e2, m2) = messages
    assert RECEIVED_TLS.search(m1.decode()) and "alice" not in received(m1)
    assert RECEIVED_TLS.search(m2.decode()).group(1) == "TLSv1.2"
    assert e2["client"]["tls"].startswith("TLSv1.2 ECDHE-")
    # Submission adds Message-Id: and Date:.
    assert re.search(rb"\r\nMessage-Id: <\d+\.\w+@relay\.test>\r\nDate: ", m1)


def test_auth_before_tls_is_refused_and_not_advertised(relay, site) -> None:
    r = relay()
    c = LineClient(r.ports[0])
    c.readReply()
    c.send(b"EHLO laptop.example\r\n")
    ehlo = c.readReply()
    assert b"STARTTLS" in [line[4:] for line in ehlo] and not any(b"AUTH" in line for line in ehlo)
    plain = base64.b64encode(b"\0alice\0" + PASSWORDS["alice"].encode())
    c.send(b"AUTH PLAIN " + plain + b"\r\n")
    assert c.readReply() == [b"538 5.7.11 Encryption required for requested authentication mechanism"]
    c.close()


def test_submission_without_auth_is_refused(relay, site) -> None:
    r = relay()
    with smtplib.SMTP("127.0.0.1", r.ports[1], timeout=10) as s:
        s.starttls(context=site.context())
        s.ehlo("laptop.example")
        code, text = s.mail("alice@example.com")
        assert (code, text) == (530, b"5.7.0 Authentication required")
    # Nor may an unauthenticated client relay through the relay listener.
    with smtplib.SMTP("127.0.0.1", r.ports[0], timeout=10) as s:
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            s.sendmail("a@example.com", ["carol@example.org"], b"Subject: x\r\n\r\nx\r\n")
    assert r.queued() == []


def test_sender_binding(relay, site) -> None:
    r = relay()
    with smtplib.SMTP("127.0.0.1", r.ports[1], timeout=10) as s:
        s.starttls(context=site.context())
        s.login("bob", PASSWORDS["bob"])
        code, text = s.mail("bob@example.com")
        assert code == 553
        assert text == b"5.7.1 <bob@example.com>: Sender address rejected: not owned by user bob"


def test_wrong_password_is_throttled_then_421(relay, site) -> None:
    r = relay()

    def attempt(s: smtplib.SMTP, password: str) -> tuple[int, float]:
        s.user, s.password = "alice", password
        started = time.monotonic()
        try:
            code = s.auth("PLAIN", s.auth_plain)[0]
        except smtplib.SMTPAuthenticationError as e:
            code = e.smtp_code
        return code, time.monotonic() - started

    with smtplib.SMTP("127.0.0.1", r.ports[1], timeout=10) as s:
        s.starttls(context=site.context())
        s.ehlo("laptop.example")
        fast = [attempt(s, "wrong") for _ in range(2)]
        assert [code for code, _ in fast] == [535, 535]
        code, took = attempt(s, "wrong")
        assert code == 535 and took >= 0.45, took
        code, _ = attempt(s, "wrong")
        assert code == 421
        with pytest.raises((smtplib.SMTPServerDisconnected, ConnectionError, OSError)):
            s.noop()
    # (logged as the relay closes the session: maybe after the client has seen it closed)
    r.waitForLog(r"sasl_username=alice failures=4")
    # The address stays blocked, even with the right password.
    with smtplib.SMTP("127.0.0.1", r.ports[1], timeout=10) as s:
        s.starttls(context=site.context())
        s.ehlo("laptop.example")
        assert attempt(s, PASSWORDS["alice"])[0] == 421


def test_an_unprintable_user_name_is_a_logged_failure(relay, site) -> None:
    """AUTH PLAIN with a user name holding a line feed, against the real relay: 535, one log
    line naming the client and the name escaped, and it counts toward the throttle."""
    import base64

    r = relay()
    with smtplib.SMTP("127.0.0.1", r.ports[1], timeout=10) as s:
        s.starttls(context=site.context())
        s.ehlo("laptop.example")
        code, _ = s.docmd("AUTH", "PLAIN " + base64.b64encode(b"\0al\nice\0pw").decode())
        assert code == 535
    r.waitForLog(r"authentication failed from 127\.0\.0\.1: sasl_method=PLAIN "
                 r"sasl_username=al\\nice failures=1 \(user name unprintable, not checked\)")


# STARTTLS injection ------------------------------------------------------------------------------


def test_starttls_injection_is_not_executed(relay, site) -> None:
    r = relay()
    sock = socket.create_connection(("127.0.0.1", r.ports[0]), timeout=10)
    f = sock.makefile("rb")
    assert f.readline().startswith(b"220 ")
    sock.sendall(b"EHLO laptop.example\r\n")
    while not f.readline().startswith(b"250 "):
        pass
    sock.sendall(b"STARTTLS\r\nRSET\r\n")
    assert f.readline() == b"220 2.0.0 Ready to start TLS\r\n"
    # The RSET is not answered in plaintext.
    sock.settimeout(0.5)
    with pytest.raises(socket.timeout):
        sock.recv(1)
    sock.settimeout(10)
    tls = site.context().wrap_socket(sock, server_hostname="relay.test")
    # Nor after the handshake: the first reply is to our own command, and the session was
    # reset (no EHLO yet).
    tls.settimeout(0.5)
    with pytest.raises(socket.timeout):
        tls.recv(1)
    tls.settimeout(10)
    tls.sendall(b"MAIL FROM:<alice@example.com>\r\n")
    assert tls.recv(1024) == b"503 5.5.1 Error: send HELO/EHLO first\r\n"
    tls.sendall(b"QUIT\r\n")
    assert tls.recv(1024) == b"221 2.0.0 Bye\r\n"
    tls.close()
    r.waitForLog(r"6 bytes sent after STARTTLS, before the TLS handshake, discarded")


# Implicit TLS ------------------------------------------------------------------------------------


def test_implicit_tls_with_smtp_ssl(relay, site) -> None:
    r = relay()
    with smtplib.SMTP_SSL("127.0.0.1", r.ports[2], timeout=10, context=site.context()) as s:
        s.ehlo("laptop.example")
        assert not s.has_extn("starttls")
        assert s.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]
        code, _ = s.mail("alice@example.com")
        assert code == 530
        s.rset()
        s.login("alice", PASSWORDS["alice"])
        s.sendmail("alice@example.com", ["carol@example.org"], b"Subject: 465\r\n\r\nhi\r\n")
    ((envelope, message),) = queued(r)
    assert RECEIVED_TLS.search(message.decode()) and "alice" not in received(message)
    assert envelope["client"]["tls"].startswith("TLSv1.3 ")
    assert re.search(r"listening on 127\.0\.0\.1:\d+ \(tcp:interface=127\.0\.0\.1:port=0; submissions, implicit TLS, AUTH\)", r.log())


def test_an_ssl_endpoint_listener_is_implicit_tls(relay, site) -> None:
    """A listener on Twisted's ssl: endpoint (TLS from the first byte, done by the
    endpoint): the handshake completes, and the session is over TLS from the start (no
    STARTTLS, AUTH offered, ESMTPSA in Received:).  Every client hung without a greeting:
    the greeting, written before the handshake, made the TLS layer pause the session's
    transport, and the client's handshake was never read."""
    config = AUTH + """
[[listeners]]
endpoint = "ssl:0:interface=127.0.0.1:privateKey=relay.key:certKey=relay.pem"
auth = true
"""
    r = relay(config, listeners=1)
    raw = socket.create_connection(("127.0.0.1", r.ports[0]), timeout=10)
    with site.context().wrap_socket(raw, server_hostname="relay.test") as tls:
        assert tls.recv(100) == b"220 relay.test ESMTP mailrelay\r\n"
    with smtplib.SMTP_SSL("127.0.0.1", r.ports[0], timeout=10, context=site.context()) as s:
        s.ehlo("laptop.example")
        assert not s.has_extn("starttls")
        assert s.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]
        assert s.docmd("STARTTLS") == (503, b"5.5.1 Error: TLS already active")
        s.login("alice", PASSWORDS["alice"])
        s.sendmail("alice@example.com", ["carol@example.org"], b"Subject: ssl\r\n\r\nhi\r\n")
    ((envelope, message),) = queued(r)
    found = RECEIVED_TLS.search(message.decode())
    assert found is not None, received(message)
    assert "alice" not in received(message)
    assert envelope["client"]["tls"] == f"{found.group(1)} {found.group(2)}"
    assert "Traceback" not in r.log()


def test_implicit_tls_refusal_at_connect_and_close_after_quit(relay, site) -> None:
    """On port 465 a client over max_connections reads its 421 over TLS (it saw its
    handshake reset: the reply was thrown away with the connection); and a TLS session ended
    by the relay (221) is closed at once, not held until idle_timeout waiting for the
    client's close_notify."""
    import socket

    config = AUTH + LISTENERS.replace(
        'mode = "submissions"', 'mode = "submissions"\nmax_connections = 1'
    )
    r = relay(config)
    first = site.context().wrap_socket(
        socket.create_connection(("127.0.0.1", r.ports[2]), timeout=10), server_hostname="relay.test"
    )
    try:
        assert first.recv(100).startswith(b"220 ")
        with socket.create_connection(("127.0.0.1", r.ports[2]), timeout=10) as raw:
            second = site.context().wrap_socket(raw, server_hostname="relay.test")
            assert second.recv(100) == b"421 4.7.0 relay.test Error: too many connections\r\n"
        first.sendall(b"QUIT\r\n")
        assert first.recv(100).startswith(b"221 ")
        # The client sends nothing more (no close_notify): the relay closes the socket.
        first.settimeout(15)
        started = time.monotonic()
        with contextlib.suppress(ssl.SSLError, OSError):
            while first.recv(100):
                pass
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and _established(r.ports[2]):
            time.sleep(0.2)
        assert not _established(r.ports[2]), "the relay still holds the connection"
        assert time.monotonic() - started < 10
    finally:
        first.close()
    log = r.log()
    assert "TLS handshake" not in log and "Traceback" not in log, log


def _established(port: int) -> bool:
    """Whether a TCP connection on local port C{port} (the relay's side) is established
    (/proc/net/tcp: state 01)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
                    return True
    return False


def test_swaks_implicit_tls(relay, site) -> None:
    swaks = requireTool("swaks")
    r = relay()
    out = subprocess.run(
        [swaks, "--server", f"127.0.0.1:{r.ports[2]}", "--tls-on-connect", "--auth", "LOGIN",
         "--auth-user", "bob", "--auth-password", PASSWORDS["bob"], "--from", "bob@bob.example",
         "--to", "carol@example.org"],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert len(r.queued()) == 1


def test_tls13_minimum_refuses_a_tls12_client(relay, site) -> None:
    config = AUTH + LISTENERS.replace('tls_key = "relay.key"\nauth = true', 'tls_key = "relay.key"\nauth = true\ntls_min_version = "TLSv1.3"', 1)
    r = relay(config)
    with smtplib.SMTP("127.0.0.1", r.ports[0], timeout=10) as s:
        with pytest.raises(ssl.SSLError):
            s.starttls(context=site.context(maximum_version=ssl.TLSVersion.TLSv1_2))
    r.waitForLog(r"TLS handshake with 127\.0\.0\.1 failed")


# Start-up checks and the password tool -----------------------------------------------------------


def startFails(site: Site, config: str) -> str:
    (site.directory / "bad.toml").write_text(config)
    out = subprocess.run(
        [TWISTD, "-n", "--pidfile=", "mailrelay", "--config", "bad.toml", "--spool", "spool",
         "--hostname", "relay.test"],
        cwd=site.directory, capture_output=True, text=True, timeout=60,
    )
    assert out.returncode != 0
    return out.stdout + out.stderr


def test_bad_certificate_or_password_file_stops_startup(site) -> None:
    import trustme

    trustme.CA().issue_cert("other.test").private_key_pem.write_to_path(str(site.directory / "other.key"))
    text = startFails(site, AUTH + LISTENERS.replace('tls_key = "relay.key"', 'tls_key = "other.key"', 1))
    assert "bad.toml: listeners[0].tls_key: the private key in" in text
    assert "does not belong to the certificate" in text
    text = startFails(site, AUTH + LISTENERS.replace('"relay.pem"', '"missing.pem"', 1))
    assert "listeners[0].tls_certificate: cannot read the certificate file" in text
    with open(site.directory / "users", "a") as f:
        f.write("carol:plaintext\n")
    text = startFails(site, AUTH + LISTENERS)
    assert re.search(r"auth\.password_file: \S+/users:3: the hash must be an argon2 hash", text), text


def test_passwd_tool_and_live_reload(relay, site) -> None:
    users = site.directory / "users"
    assert stat.S_IMODE(users.stat().st_mode) == 0o600
    r = relay()
    # A user added while the relay runs can log in at once.
    out = passwd(site.directory, "--stdin", "users", "add", "dave", password="dave pw\n")
    assert out.returncode == 0 and "dave: added" in out.stdout, out.stderr
    with smtplib.SMTP_SSL("127.0.0.1", r.ports[2], timeout=10, context=site.context()) as s:
        assert s.login("dave", "dave pw")[0] == 235
    # change, list, delete; errors.
    assert passwd(site.directory, "--stdin", "users", "change", "dave", password="new pw\n").returncode == 0
    assert passwd(site.directory, "users", "list").stdout.split() == ["alice", "bob", "dave"]
    out = passwd(site.directory, "--stdin", "users", "add", "dave", password="x\n")
    assert out.returncode == 1 and "already exists" in out.stderr
    out = passwd(site.directory, "--stdin", "users", "set", "erin", password="\n")
    assert out.returncode == 1 and "empty password refused" in out.stderr
    with smtplib.SMTP_SSL("127.0.0.1", r.ports[2], timeout=10, context=site.context()) as s:
        assert s.login("dave", "new pw")[0] == 235
    assert passwd(site.directory, "users", "delete", "dave").returncode == 0
    assert "dave" not in users.read_text()
    assert stat.S_IMODE(users.stat().st_mode) == 0o600
    assert [p.name for p in site.directory.iterdir() if p.name.startswith(".mailrelay-passwd")] == []


# SNI ---------------------------------------------------------------------------------------------


def test_sni_chooses_the_certificate(relay, site) -> None:
    """smtplib (STARTTLS) and an implicit TLS client asking for other names get the
    certificate issued for them; a client asking for none gets the default one."""
    for name in ("mail.example.org", "any.example.net"):
        leaf = site.ca.issue_cert(name if name.startswith("mail") else "*.example.net")
        stem = name.split(".", 1)[1]
        (site.directory / f"{stem}.pem").write_bytes(b"".join(p.bytes() for p in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(str(site.directory / f"{stem}.key"))
    sni = (
        'tls_certificates = [{ server_name = "mail.example.org", certificate = "example.org.pem", key = "example.org.key" },\n'
        '  { server_name = "*.example.net", certificate = "example.net.pem", key = "example.net.key" }]\n'
    )
    config = AUTH + LISTENERS.replace('tls_key = "relay.key"\n', 'tls_key = "relay.key"\n' + sni)
    r = relay(config)
    assert re.search(r"\(tcp:0:interface=127\.0\.0\.1; relay, STARTTLS \(\+2 SNI\), AUTH\)", r.log())

    def starttlsNames(serverName: str) -> list[str]:
        with smtplib.SMTP("127.0.0.1", r.ports[1], timeout=10) as s:
            s._host = serverName  # what smtplib sends as SNI and verifies the certificate for
            s.starttls(context=site.context())
            names = [v for k, v in s.sock.getpeercert()["subjectAltName"] if k == "DNS"]
            s.login("alice", PASSWORDS["alice"])
            s.sendmail("alice@example.com", ["carol@example.org"], b"Subject: SNI\r\n\r\nhi\r\n")
            return names

    assert starttlsNames("mail.example.org") == ["mail.example.org"]
    assert starttlsNames("mx1.example.net") == ["*.example.net"]
    assert starttlsNames("relay.test") == ["relay.test"]
    # A name no certificate covers: the default certificate, which the client refuses.
    with pytest.raises(ssl.SSLCertVerificationError):
        starttlsNames("unknown.example.com")
    # Implicit TLS.
    raw = socket.create_connection(("127.0.0.1", r.ports[2]), timeout=10)
    with site.context().wrap_socket(raw, server_hostname="mail.example.org") as tls:
        assert tls.recv(1024).startswith(b"220 relay.test ESMTP")
        assert [v for k, v in tls.getpeercert()["subjectAltName"] if k == "DNS"] == ["mail.example.org"]
    assert len(r.queued()) == 3


# A site credentials checker as a plugin -------------------------------------------------------------


CHECKER_MODULE = '''
"""A site checker for the tests: users and passwords from its options."""
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import fail, succeed
from zope.interface import implementer

from mailrelay.errors import ConfigError


@implementer(ICredentialsChecker)
class StaticUsers:
    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, users):
        self.users = users

    def requestAvatarId(self, credentials):
        password = self.users.get(credentials.username)
        if password is not None and credentials.checkPassword(password.encode()):
            return succeed(credentials.username)
        return fail(UnauthorizedLogin())


def build(options, context):
    users = options.get("users")
    if not isinstance(users, dict):
        raise ConfigError(f"must be a table of user = password, not {users!r}", key="users")
    return StaticUsers(users)
'''

CHECKER_DROPIN = '''
from twisted.cred.checkers import ICredentialsChecker
from mailrelay.plugins import MailRelayPlugin

staticUsers = MailRelayPlugin(
    name="test-static-users",
    provides=ICredentialsChecker,
    description="Users and passwords from the plugin's options (tests only)",
    factory="static_users:build",
)
'''


def siteCheckerRelay(site: Site, tmp_path: Path, module: str = CHECKER_MODULE) -> tuple[
        RelayProcess, str]:
    """A relay (not started) whose AUTH is checked by the site checker C{module} (a
    submission listener, with TLS), and its configuration."""
    import os

    plugins = tmp_path / "site-plugins"
    (plugins / "twisted" / "plugins").mkdir(parents=True)
    (plugins / "static_users.py").write_text(module)
    (plugins / "twisted" / "plugins" / "static_users_plugin.py").write_text(CHECKER_DROPIN)
    env = {"PYTHONPATH": os.pathsep.join([str(plugins), os.environ.get("PYTHONPATH", "")])}
    config = (
        '[relay]\nnetworks = []\n[auth]\n[auth.checker]\nplugin = "test-static-users"\ntimeout = 5\n'
        '[auth.checker.users]\nerin = "erin\'s pw"\n'
        '[[listeners]]\nendpoint = "tcp:0:interface=127.0.0.1"\nmode = "submission"\n'
        'tls_certificate = "relay.pem"\ntls_key = "relay.key"\n'
    )
    r = RelayProcess(site.directory, config, ("--spool", "spool", "--hostname", "relay.test"),
                     env=env, defaults=False, hold=True)
    return r, config


def test_site_checker_plugin(site, tmp_path: Path) -> None:
    r, config = siteCheckerRelay(site, tmp_path)
    try:
        r.start()
        with smtplib.SMTP("127.0.0.1", r.port, timeout=10) as s:
            s.starttls(context=site.context())
            s.ehlo("laptop.example")
            with pytest.raises(smtplib.SMTPAuthenticationError):
                s.login("alice", PASSWORDS["alice"])  # the password file is not used
            assert s.login("erin", "erin's pw")[0] == 235
            s.sendmail("erin@example.com", ["carol@example.org"], b"Subject: site checker\r\n\r\nhi\r\n")
        ((envelope, _),) = queued(r)
        assert envelope["client"]["authUser"] == "erin"
        assert "AUTH: users checked by plugin test-static-users" in r.log()
    finally:
        r.stop()
    # A plugin of another kind, or an unknown one, stops start-up naming the key.
    text = startFails(site, config.replace("test-static-users", "no-such-checker"))
    assert "bad.toml: auth.checker.plugin: unknown plugin 'no-such-checker'" in text, text


@pytest.mark.parametrize(
    ("fault", "logged"),
    [
        # A callback that forgot its return (None for a good password) logged the client
        # in as "None", allowed to relay; the log says what the checker answered.
        (("return succeed(credentials.username)", "return succeed(None)"),
         r"the credentials checker answered None, not a user name"),
        # A checker that raises: the line named neither the plugin nor the user
        # ("authentication check failed for 127.0.0.1"); now as the other hooks' lines.
        (("password = self.users.get(credentials.username)",
          "raise RuntimeError('the directory is down')"),
         r"AUTH checker plugin test-static-users failed for 127\.0\.0\.1 "
         r"\(sasl_username=erin\); answered 454(.|\n)*the directory is down"),
    ],
    ids=["answers-None", "raises"],
)
def test_a_failing_site_checker_does_not_log_in_and_is_named(
        site, tmp_path: Path, fault: tuple[str, str], logged: str) -> None:
    """A site checker that fails gives 454 4.7.0, the client is not logged in, and the
    log names the plugin, the user name and what went wrong."""
    r, _ = siteCheckerRelay(site, tmp_path, CHECKER_MODULE.replace(*fault))
    try:
        r.start()
        with smtplib.SMTP("127.0.0.1", r.port, timeout=10) as s:
            s.starttls(context=site.context())
            s.ehlo("laptop.example")
            with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
                s.login("erin", "erin's pw")
            assert refused.value.smtp_code == 454
            assert s.docmd("MAIL FROM:<erin@example.com>") == (530, b"5.7.0 Authentication required")
        r.waitForLog(logged)
        assert "sasl_username=None" not in r.log()
    finally:
        r.stop()

"""End-to-end: the real relay delivering to a smarthost that requires STARTTLS, verifying its
certificate (issue "TLS, AUTH and submission", client side): a good certificate delivers;
a wrong host name or an untrusted (self-signed) certificate defers with a clear log line and
never falls back to plaintext."""

from __future__ import annotations

import datetime
import smtplib
import ssl
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.harness import DNSServer, RelayProcess
from tests.test_e2e_outbound import Recorder, _TCPController
from tests.tlscerts import CA


@pytest.fixture(scope="module")
def dns(tmp_path_factory: pytest.TempPathFactory):
    server = DNSServer(tmp_path_factory.mktemp("dns"), "test",
                       [["smarthost.tls.test", "A", "127.0.0.1"], ["other.tls.test", "A", "127.0.0.1"],
                        ["under.tls.test", "MX", 10, "mx_1.tls.test"],
                        ["mx_1.tls.test", "A", "127.0.0.1"]])
    yield server
    server.stop()


@pytest.fixture
def smarthost(tmp_path: Path):
    """C{start(certifiedFor, flaw=None)} -> (Recorder, port, caFile).  C{flaw}: C{"untrusted"}
    (issued by another CA than the one trusted), C{"expired"}, C{"no intermediate"} (issued
    by an intermediate CA the server does not send), or C{"common name only"} (the name in the
    subject's CN, no DNS subjectAltName: not a flaw for SMTP)."""
    controllers: list[Any] = []

    def start(name: str | tuple[str, ...], flaw: str | None = None
              ) -> tuple[Recorder, int, Path]:
        trusted = trustme.CA()
        names = (name,) if isinstance(name, str) else name
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        if flaw == "untrusted":
            trustme.CA().issue_cert(*names).configure_cert(context)
        elif flaw == "expired":
            now = datetime.datetime.now(datetime.timezone.utc)
            trusted.issue_cert(*names, not_before=now - datetime.timedelta(days=10),
                               not_after=now - datetime.timedelta(days=1)
                               ).configure_cert(context)
        elif flaw == "no intermediate":
            cert = trusted.create_child_ca().issue_cert(*names)
            leaf, key = tmp_path / f"leaf{len(controllers)}.pem", tmp_path / f"key{len(controllers)}.pem"
            cert.cert_chain_pems[0].write_to_path(str(leaf))
            cert.private_key_pem.write_to_path(str(key))
            context.load_cert_chain(str(leaf), str(key))
        elif flaw == "common name only":
            trusted.issue_cert(common_name=names[0]).configure_cert(context)
        else:
            trusted.issue_cert(*names).configure_cert(context)
        caFile = tmp_path / f"ca{len(controllers)}.pem"
        trusted.cert_pem.write_to_path(str(caFile))
        handler = Recorder()
        controller = _TCPController(handler, hostname="127.0.0.1", port=0, ready_timeout=10,
                                    tls_context=context, require_starttls=True)
        controller.start()
        controllers.append(controller)
        return handler, controller.port, caFile

    yield start
    for c in controllers:
        c.stop()


def _relay(tmp_path: Path, dns: DNSServer, host: str, port: int, caFile: Path) -> RelayProcess:
    config = (
        f'[relay]\nsmarthost = "[{host}]:{port}"\n'
        f'[smarthost]\ntls = "required"\nca_file = "{caFile}"\n'
        f'[dns]\nreverse_lookups = false\nnameservers = ["127.0.0.1:{dns.port}"]\n'
        "[queue]\nmin_backoff = 60\n"
    )
    return RelayProcess(tmp_path / "relay", config).start()


def _send(r: RelayProcess, to: str) -> None:
    with smtplib.SMTP("127.0.0.1", r.port, timeout=10) as s:
        s.sendmail("alice@example.com", [to], b"Subject: tls\r\n\r\nsecret\r\n")


def test_verified_smarthost_delivers(tmp_path: Path, dns, smarthost) -> None:
    recorder, port, caFile = smarthost("smarthost.tls.test")
    r = _relay(tmp_path, dns, "smarthost.tls.test", port, caFile)
    try:
        _send(r, "bob@example.org")
        (message,) = recorder.waitTo("bob@example.org")
        assert b"secret" in message.content
        # Postfix's lines: the TLS connection, and the delivery with relay=host[ip]:port,
        # here with the TLS it went over.
        relay = rf"smarthost\.tls\.test\[127\.0\.0\.1\]:{port}"
        r.waitForLog(rf"Verified TLS connection established to {relay}: TLSv1\.[23] with "
                     r"cipher \S+\n")
        r.waitForLog(rf"to=<bob@example\.org>, relay={relay}, delay=[\d.]+, attempts=1, "
                     r"status=sent \(smtp; 250 [^)]*\), tls=TLSv1\.[23] \S+ verified\n")
    finally:
        r.stop()


@pytest.mark.parametrize(
    "certifiedFor,flaw,reason",
    [
        ("other.tls.test", None,
         "host name mismatch (smarthost.tls.test is not a name of the certificate, which "
         "names other.tls.test)"),
        # The log names what is wrong with the certificate, as Postfix's does.
        ("smarthost.tls.test", "untrusted",
         "not trusted (unable to get local issuer certificate at depth 0: "),
        ("smarthost.tls.test", "no intermediate",
         "not trusted (unable to get local issuer certificate at depth 0: "),
        ("smarthost.tls.test", "expired",
         "verification failed (certificate has expired at depth 0: "),
    ],
)
def test_bad_certificate_defers_and_never_downgrades(
    tmp_path: Path, dns, smarthost, certifiedFor: str, flaw: str | None, reason: str
) -> None:
    recorder, port, caFile = smarthost(certifiedFor, flaw)
    r = _relay(tmp_path, dns, "smarthost.tls.test", port, caFile)
    try:
        _send(r, "bob@example.org")
        m = r.waitForLog(r"to=<bob@example\.org>.*status=deferred \((.*)\)")
        assert f"TLS handshake with smarthost.tls.test[127.0.0.1] failed: certificate {reason}" in m.group(1)
        if flaw is not None:  # and whose certificate it is
            assert "O=trustme" in m.group(1)
        assert recorder.to("bob@example.org") == []  # nothing sent, not even in plaintext
        assert len(r.queued()) == 1  # kept for a retry
    finally:
        r.stop()


def test_a_certificate_whose_names_cannot_be_checked_is_not_verified(
    tmp_path: Path, dns, smarthost
) -> None:
    """A trusted certificate with a name service_identity refuses to read (here a wildcard
    over a whole top-level domain) besides names that are not the smarthost's: Twisted's check
    logs the error and lets the handshake go on as verified; the relay must not."""
    recorder, port, caFile = smarthost(("other.tls.test", "*.test"))
    r = _relay(tmp_path, dns, "smarthost.tls.test", port, caFile)
    try:
        _send(r, "bob@example.org")
        m = r.waitForLog(r"to=<bob@example\.org>.*status=(\w+) \((.*)\)")
        assert m.group(1) == "deferred"
        assert ("TLS handshake with smarthost.tls.test[127.0.0.1] failed: certificate host "
                "name mismatch" in m.group(2))
        assert "*.test" in m.group(2)  # what is wrong with it
        assert recorder.to("bob@example.org") == []
        assert "Verified TLS connection" not in r.log()
    finally:
        r.stop()


def test_a_certificate_naming_the_smarthost_in_its_common_name_only_is_verified(
    tmp_path: Path, dns, smarthost
) -> None:
    """No DNS subjectAltName: the subject's CN is checked, as Postfix (and OpenSSL's
    X509_check_host) do, RFC 6125 6.4.4; another host name still does not match it."""
    recorder, port, caFile = smarthost("smarthost.tls.test", "common name only")
    r = _relay(tmp_path, dns, "smarthost.tls.test", port, caFile)
    try:
        _send(r, "bob@example.org")
        m = r.waitForLog(r"to=<bob@example\.org>.*status=(\w+) \((.*)\)")
        assert m.group(1) == "sent", m.group(0)
        recorder.waitTo("bob@example.org")
        assert "Verified TLS connection established to smarthost.tls.test" in r.log()
    finally:
        r.stop()
    recorder, port, caFile = smarthost("other.tls.test", "common name only")
    r = _relay(tmp_path / "other", dns, "smarthost.tls.test", port, caFile)
    try:
        _send(r, "carol@example.org")
        m = r.waitForLog(r"to=<carol@example\.org>.*status=deferred \((.*)\)")
        assert ("certificate host name mismatch (smarthost.tls.test is not a name of the "
                "certificate, which names other.tls.test)") in m.group(1)
        assert recorder.to("carol@example.org") == []
    finally:
        r.stop()


@pytest.mark.parametrize("tls", ["required", "implicit"])
def test_an_mx_host_name_with_an_underscore_is_verified(tmp_path: Path, dns, tls: str) -> None:
    """An MX host named mx_1.tls.test (not an IDNA name, but a DNS one, as Postfix takes it)
    whose certificate names it: verified and delivered, under STARTTLS or implicit TLS."""
    ca = CA()
    certificate, key = ca.issue("mx_1.tls.test", ("mx_1.tls.test",)).writeTo(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(certificate), str(key))
    caFile = tmp_path / "ca.pem"
    caFile.write_bytes(ca.pem)
    recorder = Recorder()
    kw = {"ssl_context": context} if tls == "implicit" else {
        "tls_context": context, "require_starttls": True}
    controller = _TCPController(recorder, hostname="127.0.0.1", port=0, ready_timeout=10, **kw)
    controller.start()
    try:
        config = (
            f'[relay]\nsmarthost = "under.tls.test:{controller.port}"\n'
            f'[smarthost]\ntls = "{tls}"\nca_file = "{caFile}"\n'
            f'[dns]\nreverse_lookups = false\nnameservers = ["127.0.0.1:{dns.port}"]\n'
        )
        r = RelayProcess(tmp_path / "relay", config).start()
        try:
            _send(r, "bob@example.org")
            m = r.waitForLog(r"to=<bob@example\.org>.*status=(\w+) \((.*)\)")
            assert m.group(1) == "sent", m.group(0)
            recorder.waitTo("bob@example.org")
            assert ("Verified TLS connection established to "
                    f"mx_1.tls.test[127.0.0.1]:{controller.port}") in r.log()
        finally:
            r.stop()
    finally:
        controller.stop()

"""End-to-end: `[delivery] dane = true` (RFC 7672) with the real relay.

The test DNS server (L{tests.harness.DNSServer}) plays the local validating resolver: it
sets the AD bit on the answers about the names it is told are secure, and serves TLSA
records; the MX host is an aiosmtpd offering STARTTLS with a trustme certificate that no
trust store of the relay's knows.  Mail to a domain whose MX host's TLSA record (3 1 1)
matches that certificate is delivered over TLS logged `dane-verified`; one whose record
does not match is deferred (4.7.5, naming the host and DANE) and never sent, in the clear
or otherwise; one whose answers are not validated (no AD bit) goes with opportunistic TLS.
"""

from __future__ import annotations

import hashlib
import re
import ssl
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tests.harness import DNSServer, RelayProcess
from tests.test_e2e_outbound import message, submit, waitResult
from tests.test_e2e_requiretls_out import Controller, RequireTLSRecorder, markRequireTLS
from tests.test_e2e_route_tls import TLSRecorder


class _Recorder(TLSRecorder):
    """A L{TLSRecorder} that offers REQUIRETLS (RFC 8689) after STARTTLS."""

    offer = True
    handle_EHLO = RequireTLSRecorder.handle_EHLO


@pytest.fixture
def mx():
    """The MX host of every domain: STARTTLS offered, its certificate alone sent (not its
    CA's); C{(recorder, port, SPKI SHA-256 of its certificate, its CA's SPKI)}."""
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    leaf = ca.issue_cert("mx.dane.test", "mx.ta.test", "hosting.test")
    leaf.configure_cert(context)
    certificate = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())
    spki = _spki(certificate)
    assert len(leaf.cert_chain_pems) == 1
    anchor = _spki(x509.load_pem_x509_certificate(ca.cert_pem.bytes()))
    recorder = _Recorder()
    controller = Controller(recorder, hostname="127.0.0.1", port=0, ready_timeout=10,
                            tls_context=context, require_starttls=False)
    controller.start()
    yield recorder, controller.port, hashlib.sha256(spki).hexdigest(), anchor
    controller.stop()


def _spki(certificate: x509.Certificate) -> bytes:
    return certificate.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


@pytest.fixture
def dns(tmp_path: Path, mx: Any):
    _, port, digest, anchor = mx
    records, secure = [], []
    for domain, tlsa, ad in (("dane.test", (3, 1, 1, digest), True),
                             ("bad.test", (3, 1, 1, "00" * 32), True),
                             ("insecure.test", (3, 1, 1, "00" * 32), False),
                             ("ta.test", (2, 1, 0, anchor.hex()), True)):
        host, base = f"mx.{domain}", f"_{port}._tcp.mx.{domain}"
        records += [[domain, "MX", 10, host], [host, "A", "127.0.0.1"],
                    [base, "TLSA", *tlsa]]
        if ad:
            secure += [domain, host, base]
    # An MX host that is an alias: the TLSA records of its CNAME's end match, those of its
    # own name do not (RFC 7672 2.2.2: the expansion's are asked first).
    records += [["alias.test", "MX", 10, "mx.alias.test"],
                ["mx.alias.test", "CNAME", "mx.target.test"], ["mx.target.test", "A", "127.0.0.1"],
                [f"_{port}._tcp.mx.target.test", "TLSA", 3, 1, 1, digest],
                [f"_{port}._tcp.mx.alias.test", "TLSA", 3, 1, 1, "00" * 32]]
    secure += ["alias.test", "mx.alias.test", "mx.target.test", f"_{port}._tcp.mx.target.test",
               f"_{port}._tcp.mx.alias.test"]
    # A domain that is an alias (shop.test of hosting.test, secure; loose.test of it, not
    # validated): its MX host's certificate, vouched for by a DANE-TA record, is for the
    # alias's end, hosting.test, only (RFC 7672 3.2.3).
    records += [["shop.test", "CNAME", "hosting.test"], ["loose.test", "CNAME", "hosting.test"],
                ["hosting.test", "MX", 10, "mx.hosting.test"],
                ["mx.hosting.test", "A", "127.0.0.1"],
                [f"_{port}._tcp.mx.hosting.test", "TLSA", 2, 1, 0, anchor.hex()]]
    secure += ["shop.test", "hosting.test", "mx.hosting.test", f"_{port}._tcp.mx.hosting.test"]
    server = DNSServer(tmp_path / "dns", "test", records, ad=tuple(secure))
    yield server
    server.stop()


def _config(dns: DNSServer, port: int) -> str:
    """The configuration of a relay with DANE, its resolver C{dns}, delivering mail for the
    test domains by MX lookup to the MX hosts' C{port}."""
    return (
        "[delivery]\ndane = true\n"
        f'[dns]\nreverse_lookups = false\nnameservers = ["127.0.0.1:{dns.port}"]\n'
        "[queue]\nmin_backoff = 600\n"
    ) + "".join(  # MX lookups, to the test MX's port
        f'[[routes]]\ndomain = "{d}"\nbackend = "smtp"\nnexthop = "{d}:{port}"\n'
        for d in ("dane.test", "bad.test", "insecure.test", "ta.test", "alias.test",
                  "shop.test", "loose.test"))


@pytest.fixture
def relay(tmp_path: Path, dns: DNSServer, mx: Any):
    r = RelayProcess(tmp_path / "relay", _config(dns, mx[1])).start()
    yield r
    r.stop()


def _delivered(relay: RelayProcess, recorder: TLSRecorder, rcpt: str, marker: str) -> None:
    """Send a message to C{rcpt}: it arrives over TLS, logged C{tls=... marker}."""
    queueID = submit(relay, "alice@example.com", [rcpt], message(rcpt))
    recorder.waitTo(rcpt)
    waitResult(relay, queueID, rcpt, "sent")
    relay.waitForLog(rf"{queueID}: to=<{re.escape(rcpt)}>, [^\n]*status=sent [^\n]*, "
                     rf"tls=TLSv1\.\d \S+ {marker}\n")
    assert recorder.sessions[rcpt][1]  # (over TLS)


def test_a_matching_tlsa_record_delivers_dane_verified(relay: RelayProcess, mx: Any,
                                                       dns: DNSServer) -> None:
    recorder, port = mx[:2]
    _delivered(relay, recorder, "bob@dane.test", "dane-verified")
    assert ("_%d._tcp.mx.dane.test" % port, "52") in dns.queries()
    relay.waitForLog(r"Verified TLS connection established to mx\.dane\.test\[127\.0\.0\.1\]")
    assert "\nad\n" in dns.log()  # (the relay asks with the AD bit)


def test_a_mismatching_tlsa_record_defers_and_sends_nothing(relay: RelayProcess,
                                                            mx: Any) -> None:
    recorder, port = mx[:2]
    queueID = submit(relay, "alice@example.com", ["carol@bad.test"], message("bad"))
    line = waitResult(relay, queueID, "carol@bad.test", "deferred")
    why = ("DANE: the certificate of mx.bad.test matches no TLSA record of "
           f"_{port}._tcp.mx.bad.test: its certificate does not match the DANE-EE records")
    assert line.group("diagnostic") == (
        f"X-mailrelay; TLS handshake with mx.bad.test[127.0.0.1] failed: {why}")
    relay.waitForLog(rf"{queueID}: cannot use mx\.bad\.test\[127\.0\.0\.1\]:{port} for "
                     rf"bad\.test:{port}: 4\.7\.5 ")
    assert recorder.to("carol@bad.test") == []
    assert "carol@bad.test" not in recorder.sessions  # (not even RCPT: never in the clear)


def test_answers_not_validated_give_opportunistic_tls(relay: RelayProcess, mx: Any,
                                                      dns: DNSServer) -> None:
    recorder, port = mx[:2]
    _delivered(relay, recorder, "dave@insecure.test", "unverified")
    # (The MX records were not validated: no TLSA lookup, RFC 7672 2.2.1.)
    assert ("_%d._tcp.mx.insecure.test" % port, "52") not in dns.queries()


def test_requiretls_goes_by_dane_to_mx_hosts_found_securely(tmp_path: Path, dns: DNSServer,
                                                            mx: Any) -> None:
    """RFC 8689 section 4.2.1: a REQUIRETLS message goes to MX hosts found by DNSSEC-
    validated lookups, over TLS verified by PKIX or DANE.  With dane = true the relay's
    resolver validates: such a message goes to a secure MX host, verified by its TLSA
    record (no trust store knows the certificate), with REQUIRETLS; one to a domain whose
    answers are not validated is returned (5.7.30) and never sent.  (It was returned in
    both cases: "cannot be looked up securely here (no DNSSEC validation)".)"""
    recorder, port = mx[:2]
    config = _config(dns, port)
    r = RelayProcess(tmp_path / "relay", config.replace("[queue]\n", "[queue]\nhold = true\n"))
    try:
        r.start()
        queued = {rcpt: submit(r, "alice@example.com", [rcpt], message(rcpt))
                  for rcpt in ("bob@dane.test", "carol@insecure.test")}
        r.stop()
        markRequireTLS(r, queued.values())
        r.configText = config
        r.start()
        (got,) = recorder.waitTo("bob@dane.test")
        assert "REQUIRETLS" in got.mailOptions and recorder.sessions["bob@dane.test"][1]
        r.waitForLog(rf"{queued['bob@dane.test']}: to=<bob@dane\.test>, [^\n]*status=sent "
                     r"[^\n]*, tls=TLSv1\.\d \S+ dane-verified\n")
        line = waitResult(r, queued["carol@insecure.test"], "carol@insecure.test", "bounced")
        assert line.group("diagnostic") == (
            "X-mailrelay; REQUIRETLS support required: no MX host of insecure.test was found "
            "by DNSSEC-validated lookups")
        assert "carol@insecure.test" not in recorder.sessions
    finally:
        r.stop()


def test_a_dane_ta_bare_key_verifies_a_server_that_does_not_send_its_ca(
    relay: RelayProcess, mx: Any
) -> None:
    """RFC 7671 5.2.2: a DANE-TA(2) 1 0 record is the anchor's public key; the MX host
    sends its own certificate only (for mx.ta.test), which that key signed."""
    recorder = mx[0]
    _delivered(relay, recorder, "erin@ta.test", "dane-verified")


def test_the_tlsa_records_of_a_cname_expanded_mx_host_are_used_first(
    relay: RelayProcess, mx: Any, dns: DNSServer
) -> None:
    """RFC 7672 2.2.2, Postfix's tls_dane_resolve(): mx.alias.test is an alias of
    mx.target.test (a secure chain): the records of _port._tcp.mx.target.test, which match,
    are used, not those of the alias, which do not."""
    recorder, port = mx[:2]
    _delivered(relay, recorder, "frank@alias.test", "dane-verified")
    asked = [q for q in dns.queries() if q[1] == "52"]
    assert asked == [(f"_{port}._tcp.mx.target.test", "52")]


def _cachingRelay(tmp_path: Path, dns: DNSServer, port: int) -> RelayProcess:
    """A relay of L{_config} keeping idle connections 30 s (connection_cache_time)."""
    return RelayProcess(tmp_path / "reuse", _config(dns, port).replace(
        "[delivery]\n", "[delivery]\nconnection_cache_time = 30\n")).start()


def test_a_connection_made_for_tls_required_no_does_not_carry_the_next_message(
        tmp_path: Path, dns: DNSServer, mx: Any) -> None:
    """A message saying TLS-Required: No (RFC 8689 4.2.2: DANE ignored) goes to the MX host
    of TLSA records over TLS not verified; the next message to that domain, which DANE
    covers, gets a connection of its own, verified (Postfix keys a cached session by the TLS
    level enforced on it).  Before, the unverified connection was kept and carried it."""
    recorder, port = mx[:2]
    r = _cachingRelay(tmp_path, dns, port)
    try:
        queueID = submit(r, "alice@example.com", ["bob@dane.test"],
                         message("no", extra="TLS-Required: No\r\n"))
        recorder.waitTo("bob@dane.test")
        waitResult(r, queueID, "bob@dane.test", "sent")
        _delivered(r, recorder, "carol@dane.test", "dane-verified")
        assert recorder.sessions["bob@dane.test"][0] != recorder.sessions["carol@dane.test"][0]
    finally:
        r.stop()


def test_a_dane_verified_connection_carries_the_next_message_to_the_same_domain(
        tmp_path: Path, dns: DNSServer, mx: Any) -> None:
    """The connection DANE verified is kept for connection_cache_time and carries the next
    message to the same domain (same client port at the MX host; the TLSA records asked
    once, the handshake done once), as any other connection, as Postfix reuses a session
    under the next hop once its TLS policy was enforced (smtp_reuse_session()).  Before, it
    was cached under its DANE settings, which no delivery asks for: never reused."""
    recorder, port = mx[:2]
    r = _cachingRelay(tmp_path, dns, port)
    try:
        _delivered(r, recorder, "bob@dane.test", "dane-verified")
        _delivered(r, recorder, "carol@dane.test", "dane-verified")
        assert recorder.sessions["bob@dane.test"][0] == recorder.sessions["carol@dane.test"][0]
        assert len(re.findall(r"Verified TLS connection established", r.log())) == 1, r.log()
        assert dns.queries().count((f"_{port}._tcp.mx.dane.test", "52")) == 1
    finally:
        r.stop()


def test_a_certificate_for_the_secure_cname_end_of_the_domain_is_dane_verified(
    relay: RelayProcess, mx: Any
) -> None:
    """RFC 7672 3.2.3, as Postfix's DANE match list: shop.test is an alias of hosting.test
    (a DNSSEC-validated chain), whose MX host's certificate, vouched for by its DANE-TA
    record, names hosting.test only: it is a reference identifier, the mail is sent
    dane-verified.  (It was deferred: "... is not for mx.hosting.test or shop.test".)
    Through loose.test, an alias not validated, nothing is found securely: no DANE, the
    mail goes over TLS unverified, as to any domain not signed."""
    recorder = mx[0]
    _delivered(relay, recorder, "gina@shop.test", "dane-verified")
    _delivered(relay, recorder, "hank@loose.test", "unverified")


def test_a_name_server_not_on_this_host_is_warned_of_at_start(tmp_path: Path, dns: DNSServer,
                                                              mx: Any) -> None:
    """DANE trusts the AD bit of every name server asked: one that is not on a loopback
    address is warned of when the relay starts (and by mailrelay check); mail still goes
    by DANE through the local one."""
    local = _config(dns, mx[1])
    remote = local.replace(f'nameservers = ["127.0.0.1:{dns.port}"]',
                           f'nameservers = ["127.0.0.1:{dns.port}", "192.0.2.53"]')
    assert remote != local
    r = RelayProcess(tmp_path / "remote", remote).start()
    try:
        r.waitForLog(r"\[delivery\] dane = true trusts the AD bit of the answers of name "
                     r"servers not on this host \(\[dns\] nameservers: 192\.0\.2\.53\): ")
        _delivered(r, mx[0], "bob@dane.test", "dane-verified")
    finally:
        r.stop()


def test_no_warning_when_every_name_server_is_on_this_host(relay: RelayProcess,
                                                           mx: Any) -> None:
    _delivered(relay, mx[0], "bob@dane.test", "dane-verified")
    assert "trusts the AD bit" not in relay.log()

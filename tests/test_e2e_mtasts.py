"""End-to-end: `[delivery] mta_sts = true` (RFC 8461) with the real relay.

A DNS server publishes `_mta-sts` TXT records and MX hosts; an HTTPS server on port 443 of a
loopback address of its own (the only port RFC 8461 allows: this needs root, which CI has)
serves the policies, with a
trustme certificate the relay trusts through `SSL_CERT_FILE`; the MX host is an aiosmtpd
offering STARTTLS.  Mail to a domain whose `enforce` policy names its MX host arrives over
TLS; mail to one whose policy names another host is deferred, never sent; the policy is kept
in the spool's `mta-sts.json`.
"""

from __future__ import annotations

import json
import os
import random
import re
import socket
import ssl
import stat
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.harness import DNSServer, RelayProcess
from tests.test_e2e_dane import _Recorder
from tests.test_e2e_outbound import message, submit, waitResult
from tests.test_e2e_requiretls_out import Controller, markRequireTLS
from tests.test_e2e_route_tls import _send

POLICIES = {
    "mta-sts.sts.test": "version: STSv1\nmode: enforce\nmx: mx.sts.test\nmax_age: 86400\n",
    "mta-sts.other.test": "version: STSv1\nmode: enforce\nmx: *.elsewhere.test\nmax_age: 600\n",
    "mta-sts.trial.test": "version: STSv1\nmode: testing\nmx: mx.trial.test\nmax_age: 600\n",
}


#: The policy server's address: port 443 (RFC 8461's only one) of a loopback address of
#: its own, so that nothing else on 127.0.0.1:443 (another test run) is in the way.
POLICY_ADDRESS = f"127.{random.randint(1, 254)}.{random.randint(1, 254)}.{random.randint(1, 254)}"


def _port443Free() -> str | None:
    """Why POLICY_ADDRESS:443 cannot be had here, or None."""
    if os.geteuid() != 0:
        return "binds port 443 (RFC 8461's port for policies): needs root, as in CI"
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((POLICY_ADDRESS, 443))
        except OSError as e:
            return f"{POLICY_ADDRESS}:443 is taken here ({e.strerror})"
    return None


@pytest.fixture
def ca(tmp_path: Path) -> Any:
    authority = trustme.CA()
    authority.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    return authority


@pytest.fixture
def policyServer(ca: Any, request: pytest.FixtureRequest):
    """The HTTPS server of the policies; its certificate is for the names of the test's
    indirect parameter, else for every policy host."""
    why = _port443Free()
    if why is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*getattr(request, "param", POLICIES)).configure_cert(context)
    asked: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            host = (self.headers.get("Host") or "").split(":")[0]
            asked.append(f"{host}{self.path}")
            body = POLICIES.get(host, "").encode()
            if self.path != "/.well-known/mta-sts.txt" or not body:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    ThreadingHTTPServer.allow_reuse_address = True
    server = ThreadingHTTPServer((POLICY_ADDRESS, 443), Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield asked
    server.shutdown()
    server.server_close()
    thread.join(10)


@pytest.fixture
def mx(ca: Any):
    """The MX host of both domains: STARTTLS offered, a certificate for mx.sts.test."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("mx.sts.test", "mx.other.test", "mx.trial.test").configure_cert(context)
    recorder = _Recorder()  # (offering REQUIRETLS, RFC 8689, after STARTTLS)
    controller = Controller(recorder, hostname="127.0.0.1", port=0, ready_timeout=10,
                            tls_context=context, require_starttls=False)
    controller.start()
    yield recorder, controller.port
    controller.stop()


def _dns(tmp_path: Path) -> DNSServer:
    return DNSServer(tmp_path / "dns", "test", [
        ["sts.test", "MX", 10, "mx.sts.test"],
        ["mx.sts.test", "A", "127.0.0.1"],
        ["mta-sts.sts.test", "A", POLICY_ADDRESS],
        ["_mta-sts.sts.test", "TXT", "v=STSv1; id=20261201"],
        ["other.test", "MX", 10, "mx.other.test"],
        ["mx.other.test", "A", "127.0.0.1"],
        ["mta-sts.other.test", "A", POLICY_ADDRESS],
        ["_mta-sts.other.test", "TXT", "v=STSv1; id=1"],
        ["trial.test", "MX", 10, "mx.trial.test"],
        ["mx.trial.test", "A", "127.0.0.1"],
        ["mta-sts.trial.test", "A", POLICY_ADDRESS],
        ["_mta-sts.trial.test", "TXT", "v=STSv1; id=1"],
        # (publishes MTA-STS, but the policy server has no policy for it: 404)
        ["down.test", "MX", 10, "mx.down.test"],
        ["mx.down.test", "A", "127.0.0.1"],
        ["mta-sts.down.test", "A", POLICY_ADDRESS],
        ["_mta-sts.down.test", "TXT", "v=STSv1; id=7"],
    ])


def _relay(tmp_path: Path, dns: DNSServer, port: int, hold: bool = False) -> RelayProcess:
    caFile = tmp_path / "ca.pem"
    config = (
        f'[delivery]\nmta_sts = true\nca_file = "{caFile}"\n'
        f'[dns]\nreverse_lookups = false\nnameservers = ["127.0.0.1:{dns.port}"]\n'
        f"[queue]\nmin_backoff = 600\nhold = {str(hold).lower()}\n"
    ) + "".join(  # MX lookups, to the test MX's port
        f'[[routes]]\ndomain = "{d}"\nbackend = "smtp"\nnexthop = "{d}:{port}"\n'
        for d in ("sts.test", "other.test", "trial.test", "down.test"))
    return RelayProcess(tmp_path / "relay", config, env={"SSL_CERT_FILE": str(caFile)})


def waitCached(cache: Path, domains: list[str], timeout: float = 10.0) -> list[str]:
    """The domains of the cache file once they are C{domains} (sorted), or, after
    C{timeout} seconds, those it has then (C{[]} without the file)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            cached = sorted(p["domain"] for p in json.loads(cache.read_text())["policies"])
        except FileNotFoundError:
            cached = []
        if cached == domains or time.monotonic() > deadline:
            return cached
        time.sleep(0.05)


@pytest.fixture
def relay(tmp_path: Path, ca: Any, policyServer: list[str], mx: Any):
    """The started relay, with the MX host and the policy server: C{(recorder, relay, dns)}."""
    recorder, port = mx
    dns = _dns(tmp_path)
    r = _relay(tmp_path, dns, port)
    try:
        yield recorder, r.start(), dns
    finally:
        r.stop()
        dns.stop()


def test_mail_follows_the_domains_mta_sts_policy(relay: Any, policyServer: list[str]) -> None:
    recorder, r, dns = relay
    _send(r, "bob@sts.test")
    recorder.waitTo("bob@sts.test")
    assert recorder.sessions["bob@sts.test"][1], "sent without TLS under an enforce policy"
    r.waitForLog(r"MTA-STS: policy of sts\.test \(id 20261201\): mode enforce, mx "
                 r"mx\.sts\.test, max_age 86400")
    r.waitForLog(r"to=<bob@sts\.test>.*status=sent")
    assert "mta-sts.sts.test/.well-known/mta-sts.txt" in policyServer
    # Its address asked as an MX host's are (A), not with an ANY query many resolvers
    # refuse (RFC 8482; found by the final review).
    queries = dns.queries()
    assert ("mta-sts.sts.test", "A") in queries
    assert not [q for q in queries if q[1] in ("ALL_RECORDS", "ANY", "255")], queries

    _send(r, "carol@other.test")
    r.waitForLog(r"to=<carol@other\.test>.*status=deferred \(X-mailrelay; no MX host of "
                 r"other\.test matches its MTA-STS policy \(mx: \*\.elsewhere\.test\)\)")
    assert "carol@other.test" not in recorder.sessions

    # The cache is written in a thread after the policy is had: the deferral may be logged
    # before other.test's policy is in the file (it is replaced whole, never half written).
    cache = r.spool.parent / "spool" / "mta-sts.json"
    assert waitCached(cache, ["other.test", "sts.test"]) == ["other.test", "sts.test"]
    # The spool is searchable by all ([spool] mailq_users: anyone, by default), the domains
    # mail went to are not readable there by all.
    assert os.stat(cache.parent).st_mode & 0o011 == 0o011
    assert stat.S_IMODE(os.stat(cache).st_mode) == 0o600


@pytest.mark.parametrize("policyServer", [("mta-sts.nowhere.test", "*.test")], indirect=True)
def test_a_policy_host_whose_certificate_names_cannot_be_checked_is_not_believed(
    relay: Any
) -> None:
    """The policy host's certificate, from a trusted CA, names other hosts and a wildcard
    over a whole top-level domain, which service_identity cannot check: its policy is not
    fetched (RFC 8461 section 3.3: the certificate must be valid for the host), so mail for
    other.test goes to its MX host as without a policy, instead of being held by a policy
    nobody proved is other.test's."""
    _recorder, r, _server = relay
    _send(r, "carol@other.test")
    r.waitForLog(r"MTA-STS: cannot fetch the policy of other\.test \(id 1\): [^\n]*"
                 r"certificate host name mismatch")
    r.waitForLog(r"to=<carol@other\.test>.*status=sent")
    assert "MTA-STS: policy of other.test" not in r.log()


def test_requiretls_goes_to_the_mx_hosts_an_enforced_policy_matches(
    tmp_path: Path, policyServer: list[str], mx: Any
) -> None:
    """RFC 8689 section 4.2.1: a REQUIRETLS message's MX hosts are found by DNSSEC-validated
    lookups or match an MTA-STS policy.  This relay does not validate DNS: mail to sts.test,
    whose enforced policy names its MX host, goes to it over TLS verified for mx.sts.test,
    with REQUIRETLS; mail to trial.test, whose policy is in testing mode, is returned
    (5.7.30) and never sent; mail to down.test, whose policy cannot be fetched now, is
    deferred.  (Both were returned: "cannot be looked up securely here".)"""
    recorder, port = mx
    dns = _dns(tmp_path)
    r = _relay(tmp_path, dns, port, hold=True)
    try:
        r.start()
        queued = {rcpt: submit(r, "alice@example.com", [rcpt], message(rcpt))
                  for rcpt in ("bob@sts.test", "carol@trial.test", "dave@down.test")}
        r.stop()
        markRequireTLS(r, queued.values())
        r.configText = r.configText.replace("hold = true", "hold = false")
        r.start()
        (got,) = recorder.waitTo("bob@sts.test")
        assert "REQUIRETLS" in got.mailOptions and recorder.sessions["bob@sts.test"][1]
        waitResult(r, queued["bob@sts.test"], "bob@sts.test", "sent")
        line = waitResult(r, queued["carol@trial.test"], "carol@trial.test", "bounced")
        assert line.group("diagnostic") == (
            "X-mailrelay; REQUIRETLS support required: the MX hosts of trial.test cannot be "
            "looked up securely here (no DNSSEC validation), and its MTA-STS policy is in "
            "testing mode")
        assert "carol@trial.test" not in recorder.sessions
        # A domain that publishes MTA-STS whose policy cannot be fetched now: deferred, not
        # returned as if it had none (its policy may vouch for its MX hosts later).
        line = waitResult(r, queued["dave@down.test"], "dave@down.test", "deferred")
        assert line.group("diagnostic").startswith(
            "X-mailrelay; REQUIRETLS support required: the MX hosts of down.test cannot be "
            "looked up securely here (no DNSSEC validation), and its MTA-STS policy cannot be "
            "had now (its policy (id 7) cannot be fetched: "), line.group("diagnostic")
        assert "dave@down.test" not in recorder.sessions
    finally:
        r.stop()
        dns.stop()


def test_a_cache_that_cannot_be_written_leaves_no_temporary_file(
    tmp_path: Path, policyServer: list[str], mx: Any
) -> None:
    """A write of mta-sts.json that fails (here a directory in its place, as the spool's
    disk full would) removes its temporary file and is said once, naming the file; the
    temporary file a crashed relay left is removed when the cache is first read."""
    recorder, port = mx
    dns = _dns(tmp_path)
    r = _relay(tmp_path, dns, port)
    try:
        r.start()
        r.stop()
        crashed = subprocess.Popen(["true"])
        crashed.wait()
        leftover = r.spool / f"mta-sts.json.{crashed.pid}.tmp"
        leftover.write_text('{"policies": [')
        (r.spool / "mta-sts.json").mkdir()
        (r.spool / "mta-sts.json" / "keep").write_text("")
        r.start()
        _send(r, "bob@sts.test")
        recorder.waitTo("bob@sts.test")
        r.waitForLog(r"to=<bob@sts\.test>.*status=sent")
        r.waitForLog(rf"MTA-STS: removed {re.escape(str(leftover))}, left by an interrupted "
                     r"write")
        said = r.waitForLog(r"MTA-STS: cannot write the cache (\S+): Is a directory")
        assert said.group(1) == str(r.spool / "mta-sts.json")
        assert r.log().count("cannot write the cache") == 1
        assert sorted(p.name for p in r.spool.glob("mta-sts.json*")) == ["mta-sts.json"]
    finally:
        r.stop()
        dns.stop()

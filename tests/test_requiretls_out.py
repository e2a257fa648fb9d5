"""Tests for REQUIRETLS (RFC 8689) and C{TLS-Required: No} on the delivery side: the client
session (L{mailrelay.smtp.client}) over a C{StringTransport}, and the backends' TLS policy
per message (L{mailrelay.delivery.common.ClientBackend}), with the fakes of
L{tests.test_delivery}."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer
from twisted.logger import capturedLogs

from mailrelay.delivery.tls import clientTLSOptions
from mailrelay.envelope import Envelope, Recipient
from mailrelay.interfaces import Route, RouteOptions
from mailrelay.route.mx import MXHost
from mailrelay.smtp.clientsettings import ClientSettings
from mailrelay.smtp.errors import SMTPConnectError
from tests.test_client import PERMANENT, Peer, ehloReply, resultOf
from tests.test_delivery import (
    DANE_POLICY,
    DELIVERED,
    HOSTS,
    TRANSIENT,
    FakeSTS,
    daneBackend,
    result,
    smtpBackend,
    stsPolicy,
)

MESSAGE = b"Subject: secret\r\n\r\nbody\r\n"


@pytest.fixture
def message(tmp_path: Path) -> Path:
    path = tmp_path / "message"
    path.write_bytes(MESSAGE)
    return path


def envelope(requireTLS: bool = True, tlsRequiredNo: bool = False) -> Envelope:
    return Envelope(sender="a@example.com", recipients=[Recipient("b@example.net")],
                    queueID="Q" * 20, requireTLS=requireTLS, tlsRequiredNo=tlsRequiredNo)


def tlsConnection(extensions: list[str], tls: str = "required") -> tuple[Peer, Any]:
    """A connection set up over STARTTLS (the test completes the handshake) with the
    server then offering C{extensions}."""
    peer = Peer(ClientSettings("client.test", tls=tls))
    peer.say(b"220 hi\r\n" + ehloReply(["STARTTLS"]) + b"220 go\r\n")
    peer.protocol.handshakeCompleted()
    peer.say(ehloReply(extensions))
    peer.heard()
    return peer, resultOf(peer.ready)


# The session ----------------------------------------------------------------------------------


def test_requireTLSOverVerifiedTLSToAServerOfferingIt(message: Path) -> None:
    peer, conn = tlsConnection(["PIPELINING", "REQUIRETLS"])
    conn.send(envelope(), envelope().recipients, message)
    assert peer.heard().startswith(b"MAIL FROM:<a@example.com> REQUIRETLS\r\n")


@pytest.mark.parametrize("extensions, tls, why", [
    (["PIPELINING"], "required", "REQUIRETLS support required, but mx.test[192.0.2.25] does "
                                 "not offer REQUIRETLS"),
    (["PIPELINING", "REQUIRETLS"], "may", "the connection to mx.test[192.0.2.25] is not TLS "
                                          "with a verified certificate"),
])
def test_requireTLSRefusedAtOnce(message: Path, extensions: list[str], tls: str,
                                 why: str) -> None:
    peer, conn = tlsConnection(extensions, tls)
    (r,) = resultOf(conn.send(envelope(), envelope().recipients, message))
    assert (r.status, r.code) == (PERMANENT, "5.7.30") and why in r.diagnostic
    assert peer.heard() == b""  # not even MAIL


def test_noRequireTLSParameterOtherwise(message: Path) -> None:
    peer, conn = tlsConnection(["PIPELINING", "REQUIRETLS"])
    conn.send(envelope(False), envelope(False).recipients, message)
    assert b"REQUIRETLS" not in peer.heard()


# The backends' policy per message -------------------------------------------------------------


def deliver(backend: Any, env: Envelope, nexthop: str, path: Path,
            options: RouteOptions = RouteOptions(), name: str = "smtp") -> list[Any]:
    return result(backend.deliver(env, env.recipients, Route(name, nexthop, options), path))


def test_requireTLSUpgradesTheRoutesTLSPolicy(message: Path) -> None:
    backend, net, _, _ = smtpBackend(settings=ClientSettings("relay.test", tls="may"))
    deliver(backend, envelope(), "[relay.example]:587", message)
    ((_, _, _, settings, _),) = net.attempts
    assert settings.tls == "required"  # verified, whatever the route said
    backend, net, _, _ = smtpBackend()
    deliver(backend, envelope(), "[relay.example]:587", message, RouteOptions(tls="none"))
    assert net.attempts[0][3].tls == "required"
    backend, net, _, _ = smtpBackend()
    deliver(backend, envelope(), "[relay.example]:587", message, RouteOptions(tls="implicit"))
    assert net.attempts[0][3].tls == "implicit"
    backend, net, _, _ = smtpBackend()
    deliver(backend, envelope(False), "[relay.example]:587", message)
    assert net.attempts[0][3].tls == "may"  # the relay's default, for other mail


def test_requireTLSNotByMXLookup(message: Path) -> None:
    """The MX hosts of a domain are not looked up securely here (no DNSSEC): a REQUIRETLS
    message is returned rather than sent to hosts an attacker could have named."""
    backend, net, _, _ = smtpBackend()
    (r,) = deliver(backend, envelope(), "example.net", message)
    assert (r.status, r.code) == (PERMANENT, "5.7.30")
    assert r.diagnostic == ("X-mailrelay; REQUIRETLS support required: the MX hosts of "
                            "example.net cannot be looked up securely here (no DNSSEC "
                            "validation)")
    assert net.attempts == []


def test_requireTLSByMXLookupWithDANE(message: Path) -> None:
    """With [delivery] dane = true the resolver validates (DNSSEC, the AD bit): RFC 8689
    section 4.2.1's secure MX lookup is there.  A REQUIRETLS message goes to the MX hosts
    found securely, verified by their usable TLSA records (DANE, RFC 7672) or else by PKIX
    (never opportunistically); it is returned (5.7.30) when no MX host was found securely,
    as without DANE, and a host found insecurely is not used."""
    backend, net, _, mx = daneBackend({"mx1.example.org": DANE_POLICY})
    env = envelope()
    env.recipients = [Recipient("b@example.org")]
    (r,) = deliver(backend, env, "example.org", message)
    assert r.status is DELIVERED, r
    ((address, _, _, settings, _),) = net.attempts
    assert (address, settings.tls, settings.tlsa) == ("192.0.2.1", "required", DANE_POLICY)
    # (Not cached: a REQUIRETLS delivery reuses no connection, and one of a route's own
    # "required" TLS must not take a DANE-verified one.)
    assert backend.idleConnections() == 0 and net.connections[0].quitted

    backend, net, _, mx = daneBackend({})  # (secure, without TLSA records: PKIX)
    (r,) = deliver(backend, env, "example.org", message)
    assert r.status is DELIVERED, r
    ((address, _, _, settings, _),) = net.attempts
    assert (address, settings.tls, settings.tlsa) == ("192.0.2.1", "required", None)

    # Of the MX hosts, only those found securely; none: returned.
    backend, net, _, mx = daneBackend({})
    hosts = mx.answers["example.org"]
    mx.answers["example.org"] = [dataclasses.replace(hosts[0], secure=False), *hosts[1:]]
    (r,) = deliver(backend, env, "example.org", message)
    assert r.status is DELIVERED, r
    assert [a[0] for a in net.attempts] == ["2001:db8::1"]
    mx.answers["example.org"] = HOSTS["example.org"]  # (none secure)
    net.attempts.clear()
    (r,) = deliver(backend, env, "example.org", message)
    assert (r.status, r.code) == (PERMANENT, "5.7.30")
    assert r.diagnostic == ("X-mailrelay; REQUIRETLS support required: no MX host of "
                            "example.org was found by DNSSEC-validated lookups")
    assert net.attempts == []


def test_requireTLSByMXLookupUnderAnEnforcedMTASTSPolicy(message: Path) -> None:
    """RFC 8689 section 4.2.1: the MX hosts of a REQUIRETLS message are found by
    DNSSEC-validated lookups, I{or} match the recipient domain's MTA-STS policy (RFC 8461).
    Under a policy in enforce mode the message goes to the MX hosts it matches, over TLS
    verified for the host's name (PKIX), also without DNSSEC; a policy in testing mode, or
    none, vouches for no host: the message is returned (5.7.30) without an MX lookup."""
    env = envelope()
    env.recipients = [Recipient("b@example.org")]
    sts = FakeSTS({"example.org": stsPolicy("enforce", "mx2.example.org")})
    backend, net, _, mx = smtpBackend(mtaSTS=sts,
                                      settings=ClientSettings("relay.test", tls="may"))
    (r,) = deliver(backend, env, "example.org", message)
    assert r.status is DELIVERED, r
    ((address, _, tlsHostname, settings, _),) = net.attempts
    assert (address, tlsHostname, settings.tls, settings.tlsa) == (
        "192.0.2.2", "mx2.example.org", "required", None)
    # A second one is sent afresh, not over the idle connection left by the first.
    (r,) = deliver(backend, env, "example.org", message)
    assert r.status is DELIVERED and len(net.attempts) == 2
    for policies, why in [
        ({"example.org": stsPolicy("testing", "mx2.example.org")},
         "its MTA-STS policy is in testing mode"),
        ({}, "it has no MTA-STS policy"),
    ]:
        backend, net, _, mx = smtpBackend(mtaSTS=FakeSTS(policies))
        (r,) = deliver(backend, env, "example.org", message)
        assert (r.status, r.code) == (PERMANENT, "5.7.30"), r
        assert r.diagnostic == (
            "X-mailrelay; REQUIRETLS support required: the MX hosts of example.org cannot "
            f"be looked up securely here (no DNSSEC validation), and {why}")
        assert net.attempts == []


def test_requireTLSDeferredWhileTheMTASTSPolicyCannotBeHad(message: Path) -> None:
    """A domain that publishes MTA-STS (its TXT record) whose policy cannot be fetched now,
    none cached: the REQUIRETLS message is deferred (4.7.5), to go once the policy can be
    had -- not returned 5.7.30 as if the domain had none (RFC 8461 section 5.1 lets other
    mail go on as without MTA-STS; REQUIRETLS mail may not go without it here)."""
    from twisted.internet.error import ConnectionRefusedError
    from twisted.internet.task import Clock

    from mailrelay.route.mtasts import MTASTS
    from tests.test_mtasts import FakeResolver, Fetches

    env = envelope()
    env.recipients = [Recipient("b@example.org")]
    resolver, fetches = FakeResolver(), Fetches()
    resolver.records["_mta-sts.example.org"] = ["v=STSv1; id=one"]
    fetches.texts["example.org"] = ConnectionRefusedError("mta-sts.example.org")
    sts = MTASTS(resolver, Clock(), None, fetches)
    backend, net, _, mx = smtpBackend(mtaSTS=sts)
    with capturedLogs():
        (r,) = deliver(backend, env, "example.org", message)
    assert (r.status, r.code) == (TRANSIENT, "4.7.5"), r
    assert r.diagnostic.startswith(
        "X-mailrelay; REQUIRETLS support required: the MX hosts of example.org cannot be "
        "looked up securely here (no DNSSEC validation), and its MTA-STS policy cannot be had "
        "now (its policy (id one) cannot be fetched: "), r.diagnostic
    assert net.attempts == []


def test_requireTLSByMXLookupWithDANEAndAnEnforcedMTASTSPolicy(message: Path) -> None:
    """With DANE too, an MX host found insecurely that an enforced MTA-STS policy matches
    qualifies (RFC 8689 section 4.2.1: either way); one found securely keeps its DANE."""
    env = envelope()
    env.recipients = [Recipient("b@example.org")]
    sts = FakeSTS({"example.org": stsPolicy("enforce", "*.example.org")})
    backend, net, _, mx = daneBackend({"mx1.example.org": DANE_POLICY}, mtaSTS=sts)
    mx.answers["example.org"] = [dataclasses.replace(h, secure=False)
                                 for h in HOSTS["example.org"]]
    net.connectBehaviour["192.0.2.1"] = SMTPConnectError("4.4.1", "X-mailrelay; refused")
    net.connectBehaviour["2001:db8::1"] = SMTPConnectError("4.4.1", "X-mailrelay; refused")
    (r,) = deliver(backend, env, "example.org", message)
    assert r.status is DELIVERED, r
    assert [(a[0], a[3].tls, a[3].tlsa) for a in net.attempts] == [
        ("192.0.2.1", "required", None), ("2001:db8::1", "required", None),
        ("192.0.2.2", "required", None)]
    # Testing mode: only the hosts found securely, as without a policy.
    sts.policies["example.org"] = stsPolicy("testing", "*.example.org")
    (r,) = deliver(backend, env, "example.org", message)
    assert (r.status, r.code) == (PERMANENT, "5.7.30")
    assert r.diagnostic == ("X-mailrelay; REQUIRETLS support required: no MX host of "
                            "example.org was found by DNSSEC-validated lookups, and its "
                            "MTA-STS policy is in testing mode")


def test_requireTLSReturnedWhenNoHostGivesVerifiedTLS(message: Path) -> None:
    backend, net, _, mx = smtpBackend()
    mx.answers = dict(HOSTS, **{"[pair.example]": [MXHost("a.example", "192.0.2.50", 25),
                                                   MXHost("b.example", "192.0.2.51", 25)]})
    # One host does not offer STARTTLS (4.7.4), the other fails the handshake (4.7.5).
    net.connectBehaviour["192.0.2.50"] = SMTPConnectError(
        "4.7.5", "X-mailrelay; TLS handshake with a.example failed: certificate not trusted")
    net.connectBehaviour["192.0.2.51"] = SMTPConnectError(
        "4.7.4", "X-mailrelay; TLS is required, but b.example does not offer STARTTLS")
    (r,) = deliver(backend, envelope(), "[pair.example]", message)
    assert (r.status, r.code) == (PERMANENT, "5.7.30")
    assert r.diagnostic.endswith("does not offer STARTTLS (REQUIRETLS support required)")
    # Other mail is only deferred by the same failures; and a host that could not be reached
    # at all leaves a REQUIRETLS message deferred too (it may work later).
    (r,) = deliver(backend, envelope(False), "[pair.example]", message)
    assert r.code == "4.7.4"
    net.connectBehaviour["192.0.2.50"] = SMTPConnectError(
        "4.4.1", "X-mailrelay; connection refused by a.example")
    (r,) = deliver(backend, envelope(), "[pair.example]", message)
    assert r.code.startswith("4.")


def test_requireTLSToALocalLMTPStore(message: Path) -> None:
    from mailrelay.delivery.lmtp import LMTPBackend
    from tests.test_delivery import FakeNet

    net = FakeNet()
    sent: list[Envelope] = []
    newConnection = net.newConnection

    def recording(address: str, remoteMTA: str) -> Any:
        connection = newConnection(address, remoteMTA)
        send = connection.send

        def keep(env: Envelope, recipients: Any, path: Any, **kw: Any) -> Any:
            sent.append(env)
            return send(env, recipients, path, **kw)

        connection.send = keep
        return connection

    net.newConnection = recording  # type: ignore[method-assign]
    net.connect = _unixToo(net.connect)  # type: ignore[method-assign]
    backend = LMTPBackend(None, ClientSettings("relay.test", tls="none", lmtp=True),
                          connect=net.connect)
    (r,) = deliver(backend, envelope(), "unix:/run/lmtp", message, name="lmtp")
    assert r.status.value == "delivered"
    assert sent[0].requireTLS is False  # the store is the mailbox: no network crossed
    assert net.attempts[0][3].tls == "none"


def test_requireTLSToAnLMTPServerOverTCP(message: Path) -> None:
    """An LMTP server over TCP is not local: a REQUIRETLS message goes to it only over
    verified TLS, and one that does not offer STARTTLS (4.7.4) or fails the handshake (4.7.5)
    returns it (5.7.30), as an SMTP next hop's would."""
    from mailrelay.delivery.lmtp import LMTPBackend

    for code in ("4.7.4", "4.7.5"):
        error = SMTPConnectError(code, "X-mailrelay; TLS is required, but lmtp.example "
                                       "does not offer STARTTLS")
        settings: list[ClientSettings] = []

        def connect(reactor: Any, endpoint: Any, s: ClientSettings, error: Any = error,
                    **kw: Any) -> Any:
            settings.append(s)
            return defer.fail(error)

        backend = LMTPBackend(None, ClientSettings("relay.test", tls="may", lmtp=True),
                              connect=connect)
        (r,) = deliver(backend, envelope(), "192.0.2.40:24", message, name="lmtp")
        assert [s.tls for s in settings] == ["required"]
        assert (r.status, r.code) == (PERMANENT, "5.7.30"), code
        assert r.diagnostic.endswith("does not offer STARTTLS (REQUIRETLS support required)")


def _unixToo(connect: Any) -> Any:
    """FakeNet's connect, which reads the host of TCP endpoints, taking UNIX ones too."""

    def wrapped(reactor: Any, endpoint: Any, settings: Any, **kw: Any) -> Any:
        if hasattr(endpoint, "_path"):
            endpoint._host, endpoint._port = endpoint._path, 0
        return connect(reactor, endpoint, settings, **kw)

    return wrapped


def test_tlsRequiredNoRelaxesARequiredPolicy(tmp_path: Path) -> None:
    """The intake notes a TLS-Required: No field on the envelope (tlsRequiredNo; not for a
    REQUIRETLS message); the delivery side honours the note."""
    path = tmp_path / "m"
    path.write_bytes(b"Subject: x\r\nTLS-Required: No\r\n\r\nbody\r\n")
    required = RouteOptions(tls="required")
    backend, net, _, _ = smtpBackend()
    deliver(backend, envelope(False, tlsRequiredNo=True), "[relay.example]:587", path, required)
    assert net.attempts[0][3].tls == "may"
    # Implicit TLS cannot be left out: it stays, unverified (Postfix: "encrypt").
    backend, net, _, _ = smtpBackend()
    deliver(backend, envelope(False, tlsRequiredNo=True), "[relay.example]:587", path,
            RouteOptions(tls="implicit"))
    settings = net.attempts[0][3]
    assert (settings.tls, settings.verifiesTLS) == ("implicit", False)
    assert type(clientTLSOptions(settings, "relay.example")).__name__ == "_UnverifiedClientTLS"
    with pytest.raises(ValueError, match='tlsVerify=False goes with tls="implicit"'):
        ClientSettings("relay.test", tls="required", tlsVerify=False)
    # ... but not for a REQUIRETLS message (the header is then ignored), nor on a route that
    # logs in (its password never goes over unverified TLS), nor without the field.
    backend, net, _, _ = smtpBackend()
    deliver(backend, envelope(True, tlsRequiredNo=True), "[relay.example]:587", path, required)
    assert net.attempts[0][3].tls == "required"
    backend, net, _, _ = smtpBackend()
    deliver(backend, envelope(False, tlsRequiredNo=True), "[relay.example]:587", path,
            RouteOptions(tls="required", username="relay", password="secret"))
    assert net.attempts[0][3].tls == "required"
    backend, net, _, _ = smtpBackend()
    deliver(backend, envelope(False, tlsRequiredNo=True), "[relay.example]:587", path,
            RouteOptions(tls="implicit", username="relay", password="secret"))
    assert net.attempts[0][3].verifiesTLS
    path.write_bytes(b"Subject: x\r\nTLS-Required: Yes\r\n\r\nbody\r\n")
    backend, net, _, _ = smtpBackend()
    deliver(backend, envelope(False), "[relay.example]:587", path, required)
    assert net.attempts[0][3].tls == "required"


def test_requireTLSNoFallbackRelayToGoOnToIsReturned(message: Path) -> None:
    """A REQUIRETLS message no host of its next hop gave verified TLS is returned (5.7.30)
    when none of the route's fallback relays can carry it (found by an MX lookup that
    cannot be secured here): as without fallback relays, not deferred until it expires --
    no later attempt could go anywhere else.  A fallback relay that can carry it is still
    tried."""
    from tests.test_delivery import connectError

    for fallbacks in (None, ("example.org",)):
        backend, net, _, _ = smtpBackend(connectionCacheTime=0)
        net.connectBehaviour["192.0.2.40"] = connectError(
            "4.7.4", "X-mailrelay; TLS is required, but relay.example does not offer STARTTLS")
        options = RouteOptions(fallbackRelay=fallbacks)
        (r,) = deliver(backend, envelope(), "[relay.example]:587", message, options)
        assert (r.status, r.code) == (PERMANENT, "5.7.30"), (fallbacks, r)
        assert [a[0] for a in net.attempts] == ["192.0.2.40"]
    backend, net, _, mx = smtpBackend(connectionCacheTime=0)
    net.connectBehaviour["192.0.2.40"] = connectError(
        "4.7.4", "X-mailrelay; TLS is required, but relay.example does not offer STARTTLS")
    mx.answers = {**HOSTS, "[192.0.2.2]": [MXHost("192.0.2.2", "192.0.2.2", 25)]}
    options = RouteOptions(fallbackRelay=("example.org", "[192.0.2.2]"))
    (r,) = deliver(backend, envelope(), "[relay.example]:587", message, options)
    assert r.status is DELIVERED
    assert [(a[0], a[3].tls) for a in net.attempts] == [
        ("192.0.2.40", "required"), ("192.0.2.2", "required")]

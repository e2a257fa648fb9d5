"""DANE for SMTP (RFC 7672, RFC 6698/7671): which TLSA records are usable, how a server's
certificate is matched against them (L{mailrelay.delivery.tls}), tried with in-memory
handshakes (L{tests.tlscerts})."""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone

import pytest
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from mailrelay.delivery.tls import (
    DANEMismatch,
    clientTLSOptions,
    daneProblem,
    describeTLSFailure,
    tlsaMatches,
)
from mailrelay.smtp.clientsettings import ClientSettings, DANEPolicy, TLSARecord
from tests.tlscerts import CA, ServerCertificate, handshake


def _spki(certificate) -> bytes:
    return certificate.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def _record(usage: int, selector: int, matchingType: int, certificate) -> TLSARecord:
    selected = certificate.public_bytes(Encoding.DER) if selector == 0 else _spki(certificate)
    digest = {0: lambda b: b, 1: lambda b: hashlib.sha256(b).digest(),
              2: lambda b: hashlib.sha512(b).digest()}[matchingType](selected)
    return TLSARecord(usage, selector, matchingType, digest)


def _dane(*records: TLSARecord, names: tuple[str, ...] = ("mx.example.org", "example.org")
          ) -> object:
    settings = ClientSettings("relay.test", tls="required", tlsa=DANEPolicy(
        "_25._tcp.mx.example.org", records, names))
    return clientTLSOptions(settings, "mx.example.org")


def test_only_dane_ta_and_dane_ee_with_known_selectors_and_digests_are_usable() -> None:
    """RFC 7672 3.1.3: PKIX-TA(0) and PKIX-EE(1) are unusable for SMTP; so are unknown
    selectors and matching types, and digests of the wrong length."""
    sha256 = bytes(32)
    assert TLSARecord(3, 1, 1, sha256).usable
    assert TLSARecord(2, 0, 1, sha256).usable
    assert TLSARecord(3, 0, 2, bytes(64)).usable
    assert TLSARecord(3, 1, 0, b"spki").usable
    assert not TLSARecord(0, 1, 1, sha256).usable
    assert not TLSARecord(1, 1, 1, sha256).usable
    assert not TLSARecord(4, 1, 1, sha256).usable
    assert not TLSARecord(3, 2, 1, sha256).usable
    assert not TLSARecord(3, 1, 3, sha256).usable
    assert not TLSARecord(3, 1, 1, bytes(31)).usable
    assert not TLSARecord(3, 1, 2, sha256).usable
    assert not TLSARecord(3, 1, 0, b"").usable


@pytest.mark.parametrize("selector", [0, 1])
@pytest.mark.parametrize("matchingType", [0, 1, 2])
def test_a_record_matches_its_certificate_only(selector: int, matchingType: int) -> None:
    ca = CA()
    server, other = ca.issue("mx.example.org"), ca.issue("mx.example.org")
    record = _record(3, selector, matchingType, server.certificate)
    assert record.usable
    assert tlsaMatches(record, server.certificate)
    assert not tlsaMatches(record, other.certificate)


def test_dane_ee_checks_neither_names_nor_expiry() -> None:
    """RFC 7672 3.1.1: a DANE-EE(3) match authenticates the server, whatever names its
    certificate gives and whether it has expired; nobody need have issued it."""
    server = CA().issue("not-the-host.example.net", expired=True)
    assert handshake(_dane(_record(3, 1, 1, server.certificate)), server) is None
    assert server.serverNames == [b"mx.example.org"]


def test_a_mismatch_fails_the_handshake_naming_the_host_and_dane() -> None:
    ca = CA()
    server = ca.issue("mx.example.org")
    failure = handshake(_dane(_record(3, 1, 1, ca.issue("x").certificate)), server)
    assert failure is not None and isinstance(failure.value, DANEMismatch)
    assert describeTLSFailure(failure) == (
        "DANE: the certificate of mx.example.org matches no TLSA record of "
        "_25._tcp.mx.example.org: its certificate does not match the DANE-EE records")


@pytest.mark.parametrize("selector", [0, 1])
def test_dane_ta_takes_a_chain_to_the_anchor_for_the_mx_host_or_the_domain(
    selector: int
) -> None:
    """RFC 7672 3.1.2: the trust anchor among the certificates the server sent, its own
    certificate issued under it and for the MX host's name, or the next hop's domain
    (Postfix's DANE match list)."""
    ca = CA()
    anchor = _record(2, selector, 1, ca.certificate)
    for name in ("mx.example.org", "example.org"):
        server = ca.issue("x", (name,))
        server.chain = [ca.certificate]
        assert handshake(_dane(anchor), server) is None
    server = ca.issue("x", ("other.example.net",))
    server.chain = [ca.certificate]
    failure = handshake(_dane(anchor), server)
    assert failure is not None and isinstance(failure.value, DANEMismatch)
    assert "mx.example.org or example.org is not a name of the certificate" in str(
        failure.value)


def test_dane_ta_refuses_an_anchor_sent_beside_a_certificate_it_did_not_issue() -> None:
    """The anchor's certificate is public: sent by anyone, next to a certificate of their
    own for the host, it must not authenticate them."""
    ca = CA()
    forged = CA().issue("x", ("mx.example.org",))
    forged.chain = [ca.certificate]
    failure = handshake(_dane(_record(2, 0, 1, ca.certificate)), forged)
    assert failure is not None and isinstance(failure.value, DANEMismatch)
    assert "does not chain to a trust anchor" in str(failure.value)


def test_dane_ta_checks_expiry_below_the_anchor() -> None:
    ca = CA()
    server = ca.issue("x", ("mx.example.org",), expired=True)
    problem = daneProblem(DANEPolicy("_25._tcp.mx.example.org",
                                     (_record(2, 1, 1, ca.certificate),), ("mx.example.org",)),
                          [server.certificate, ca.certificate], _pyOpenSSL(server),
                          datetime.now(timezone.utc))
    assert problem == "certificate CN=x is expired or not yet valid"


def test_records_none_usable_give_tls_without_verification() -> None:
    """RFC 7672 2.2 (Postfix: "TLSA records unusable" makes "dane" "encrypt"): TLS is
    still mandatory, the certificate not checked."""
    settings = ClientSettings("relay.test", tls="required",
                              tlsa=DANEPolicy("_25._tcp.mx.example.org", (), ("mx.example.org",)))
    assert not settings.verifiesTLS
    assert handshake(clientTLSOptions(settings, "mx.example.org"),
                     CA().issue("elsewhere")) is None


def test_dane_records_go_with_required_tls_only() -> None:
    policy = DANEPolicy("_25._tcp.mx.example.org", (), ())
    for tls in ("none", "may", "implicit"):
        with pytest.raises(ValueError, match='DANE records go with tls="required"'):
            ClientSettings("relay.test", tls=tls, tlsa=policy)


def _pyOpenSSL(server: ServerCertificate) -> object:
    from OpenSSL import crypto

    return crypto.X509.from_cryptography(server.certificate)

"""DANE for SMTP (RFC 7672, RFC 6698/7671): which TLSA records are usable, how a server's
certificate is matched against them (L{mailrelay.delivery.tls}), tried with in-memory
handshakes (L{tests.tlscerts})."""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import NameOID
from OpenSSL import crypto

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
    return crypto.X509.from_cryptography(server.certificate)


def _issuedBy(issuerKey, subjectKey, name: str, dnsNames: tuple[str, ...] = (),
              ca: bool = False, issuer: str = "anchor"):
    """A certificate of C{subjectKey} for C{name}, signed by C{issuerKey} (any of RSA, ECDSA,
    Ed25519: Ed25519 signs without a separate digest)."""
    now = datetime.now(timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
               .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
               .public_key(subjectKey.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - timedelta(hours=1))
               .not_valid_after(now + timedelta(days=1)))
    if dnsNames:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName(n) for n in dnsNames]), critical=False)
    if ca:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None),
                                        critical=True)
    digest = None if isinstance(issuerKey, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(issuerKey, digest)


def _bareKey(key) -> TLSARecord:
    """DANE-TA(2) SPKI(1) Full(0): the anchor as a bare public key (RFC 7671 section 5.2.2)."""
    return TLSARecord(2, 1, 0, key.public_key().public_bytes(
        Encoding.DER, PublicFormat.SubjectPublicKeyInfo))


def _keyOf(kind: str):
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if kind == "ecdsa":
        return ec.generate_private_key(ec.SECP256R1())
    return ed25519.Ed25519PrivateKey.generate()


@pytest.mark.parametrize("kind", ["rsa", "ecdsa", "ed25519"])
def test_dane_ta_with_a_bare_public_key_checks_the_signature_of_the_topmost_certificate(
    kind: str
) -> None:
    """RFC 7671 section 5.2.2: a DANE-TA(2) SPKI(1) Full(0) record is the trust anchor's
    public key itself, whose certificate the server need not send: the topmost certificate
    it sent must be signed by that key (an intermediate's, or its own), and the chain below
    the anchor current and for the MX host."""
    anchorKey, intermediateKey, serverKey = _keyOf(kind), _keyOf(kind), _keyOf("ecdsa")
    intermediate = _issuedBy(anchorKey, intermediateKey, "intermediate", ca=True)
    server = _issuedBy(intermediateKey, serverKey, "x", ("mx.example.org",),
                      issuer="intermediate")
    direct = _issuedBy(anchorKey, serverKey, "x", ("mx.example.org",))
    now = datetime.now(timezone.utc)

    def problem(record: TLSARecord, chain: list) -> str | None:
        policy = DANEPolicy("_25._tcp.mx.example.org", (record,), ("mx.example.org",))
        return daneProblem(policy, chain, crypto.X509.from_cryptography(chain[0]), now)

    assert problem(_bareKey(anchorKey), [server, intermediate]) is None
    assert problem(_bareKey(anchorKey), [direct]) is None
    # Another key signed none of them; the anchor's key did not sign the server's own.
    other = _bareKey(_keyOf(kind))
    assert problem(other, [server, intermediate]) == (
        "its certificate does not match the DANE-EE records, and does not chain to a trust "
        "anchor of the DANE-TA records among the certificates it sent")
    assert problem(other, [direct]) is not None
    assert problem(_bareKey(anchorKey), [server]) is not None
    # A digest of the key cannot check a signature: the anchor's certificate must be sent.
    digested = TLSARecord(2, 1, 1, hashlib.sha256(_bareKey(anchorKey).data).digest())
    assert problem(digested, [server, intermediate]) is not None


def test_dane_ta_bare_key_still_checks_expiry_and_names_below_it() -> None:
    anchorKey, serverKey = _keyOf("ecdsa"), _keyOf("ecdsa")
    wrongName = _issuedBy(anchorKey, serverKey, "x", ("other.example.net",))
    policy = DANEPolicy("_25._tcp.mx.example.org", (_bareKey(anchorKey),), ("mx.example.org",))
    problem = daneProblem(policy, [wrongName], crypto.X509.from_cryptography(wrongName),
                          datetime.now(timezone.utc))
    assert problem is not None and "mx.example.org is not a name of the certificate" in problem
    later = datetime.now(timezone.utc).replace(year=datetime.now().year + 2)
    correct = _issuedBy(anchorKey, serverKey, "x", ("mx.example.org",))
    assert daneProblem(policy, [correct], crypto.X509.from_cryptography(correct), later) == (
        "certificate CN=x is expired or not yet valid")


def test_dane_ta_bare_key_in_a_handshake_without_the_anchor_sent() -> None:
    """On the wire: the server sends its own certificate only, issued by the CA whose bare
    key is published."""
    ca = CA()
    server = ca.issue("x", ("mx.example.org",))
    assert server.chain == []
    assert handshake(_dane(_bareKey(ca._key)), server) is None
    failure = handshake(_dane(_bareKey(CA()._key)), server)
    assert failure is not None and isinstance(failure.value, DANEMismatch)


def test_the_server_name_sent_is_the_tlsa_base_domain() -> None:
    """RFC 7672 section 8.1, as Postfix (tls_client.c): with DANE the SNI is the TLSA base
    domain -- the CNAME expansion of the MX host when its records were found there."""
    server = CA().issue("x")
    settings = ClientSettings("relay.test", tls="required", tlsa=DANEPolicy(
        "_25._tcp.mx.provider.net", (_record(3, 1, 1, server.certificate),),
        ("mx.provider.net", "example.org")))
    assert handshake(clientTLSOptions(settings, "mx.example.org"), server) is None
    assert server.serverNames == [b"mx.provider.net"]

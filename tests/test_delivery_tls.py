"""The delivery client's TLS (L{mailrelay.delivery.tls}): which server certificates the
verifying levels accept, tried with in-memory handshakes (L{tests.tlscerts})."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailrelay.delivery.tls import (
    CertificateNameMismatch,
    clientTLSOptions,
    describeTLSFailure,
    verifiedClientTLS,
)
from mailrelay.smtp.clientsettings import ClientSettings
from tests.tlscerts import CA, handshake


@pytest.fixture
def ca(tmp_path: Path) -> CA:
    """A CA, its certificate in C{tmp_path / "ca.pem"}."""
    ca = CA()
    (tmp_path / "ca.pem").write_bytes(ca.pem)
    return ca


def _verifying(tmp_path: Path, hostname: str, tls: str = "required") -> object:
    """The delivery client's TLS for C{hostname} under C{tls}, trusting C{tmp_path}'s
    C{ca.pem}."""
    settings = ClientSettings("relay.test", tls=tls, caFile=str(tmp_path / "ca.pem"))
    return clientTLSOptions(settings, hostname)


@pytest.mark.parametrize("tls", ["required", "implicit"])
def test_a_certificate_naming_the_host_only_in_its_common_name_is_accepted(
    tmp_path: Path, ca: CA, tls: str
) -> None:
    """No DNS subjectAltName: the subject's CN is the name (RFC 6125 6.4.4; OpenSSL's
    X509_check_host and Postfix's tls_client.c do the same)."""
    assert handshake(_verifying(tmp_path, "mx.test", tls), ca.issue("mx.test")) is None
    assert handshake(_verifying(tmp_path, "MX.Test", tls), ca.issue("mx.test")) is None
    # (an empty subjectAltName, as trustme issues without names, is no DNS-ID either)
    assert handshake(_verifying(tmp_path, "mx.test", tls), ca.issue("mx.test", ())) is None
    failure = handshake(_verifying(tmp_path, "other.test", tls), ca.issue("mx.test"))
    assert failure is not None and isinstance(failure.value, CertificateNameMismatch)
    assert describeTLSFailure(failure) == (
        "certificate host name mismatch (other.test is not a name of the certificate, "
        "which names mx.test)")


def test_the_common_name_does_not_count_beside_a_dns_subjectaltname(
    tmp_path: Path, ca: CA
) -> None:
    failure = handshake(_verifying(tmp_path, "mx.test"), ca.issue("mx.test", ("other.test",)))
    assert failure is not None and isinstance(failure.value, CertificateNameMismatch)
    assert "which names other.test)" in describeTLSFailure(failure)


def test_the_mta_sts_policy_fetch_does_not_take_the_common_name(ca: CA) -> None:
    """HTTPS (RFC 8461 3.3, RFC 9110 4.3.4) checks DNS-IDs only, as browsers and Python's
    ssl do: a policy host's certificate without a DNS subjectAltName is refused."""
    failure = handshake(verifiedClientTLS("mta-sts.example.org", trustRoot=ca.trustRoot),
                        ca.issue("mta-sts.example.org"))
    assert failure is not None
    assert "subjectAltName" in describeTLSFailure(failure)
    assert handshake(verifiedClientTLS("mta-sts.example.org", trustRoot=ca.trustRoot),
                     ca.issue("x", ("mta-sts.example.org",))) is None


def test_a_host_name_with_an_underscore_is_verified(tmp_path: Path, ca: CA) -> None:
    """MX host names may hold "_" (DNS allows it; Postfix's valid_hostname takes it): not an
    IDNA name, but compared as plain ASCII labels, as OpenSSL's X509_check_host and Postfix
    do; sent as it is in SNI."""
    server = ca.issue("x", ("mx_1.example.org",))
    for tls in ("required", "implicit"):
        assert handshake(_verifying(tmp_path, "mx_1.example.org", tls), server) is None
        assert handshake(_verifying(tmp_path, "MX_1.Example.Org", tls), server) is None
    assert server.serverNames[0] == b"mx_1.example.org"
    assert handshake(_verifying(tmp_path, "mx_1.example.org"),
                     ca.issue("x", ("*.example.org",))) is None
    failure = handshake(_verifying(tmp_path, "mx_2.example.org"), server)
    assert failure is not None and isinstance(failure.value, CertificateNameMismatch)
    assert "which names mx_1.example.org" in describeTLSFailure(failure)
    # Unverified (tls = "may") too, and the MTA-STS policy fetch.
    may = ClientSettings("relay.test", tls="may")
    assert handshake(clientTLSOptions(may, "mx_1.example.org"), server) is None
    assert server.serverNames[-1] == b"mx_1.example.org"
    assert handshake(verifiedClientTLS("mx_1.example.org", trustRoot=ca.trustRoot),
                     server) is None

"""PEM certificates read from bytes (L{pemCertificates}): what the delivery's TLS trusts of a
CA file (L{mailrelay.delivery.tls}), and so what the configuration's check of one loads
(L{mailrelay.config.values}).

A value module: it imports only Twisted and OpenSSL, so that a stage and the configuration
read a CA file the same way.
"""

from __future__ import annotations

from typing import Any

__all__ = ["pemCertificates"]


def pemCertificates(data: bytes) -> list[Any]:
    """The certificates (Twisted's C{Certificate}) of the PEM blocks (C{-----BEGIN
    CERTIFICATE-----}) in C{data}: what the delivery's TLS trusts of a CA file, and so what
    the configuration's check of one loads.

    @raise ValueError: one cannot be read (which, and OpenSSL's complaint).
    """
    from OpenSSL import crypto
    from twisted.internet.ssl import Certificate

    marker = b"-----END CERTIFICATE-----"
    blocks = [b + marker for b in data.split(marker) if b"-----BEGIN CERTIFICATE-----" in b]
    certificates = []
    for number, block in enumerate(blocks, 1):
        try:
            certificates.append(Certificate.loadPEM(block))
        except (crypto.Error, ValueError) as e:
            raise ValueError(
                f"certificate {number} of {len(blocks)} cannot be read: {e}"
            ) from None
    return certificates

"""PEM certificates read from bytes (L{pemCertificates}): what the delivery's TLS trusts of a
CA file (L{mailrelay.delivery.tls}), and so what the configuration's check of one loads
(L{mailrelay.config.values}).

A value module: it imports only Twisted and OpenSSL, so that a stage and the configuration
read a CA file the same way.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["pemCertificates"]


def pemCertificates(data: bytes) -> list[Any]:
    """The certificates (Twisted's C{Certificate}) of the PEM blocks (C{-----BEGIN
    CERTIFICATE-----}) in C{data}: what the delivery's TLS trusts of a CA file, and so what
    the configuration's check of one loads.

    Each BEGIN line must have its END line before the next BEGIN line (RFC 7468 section 2):
    a file cut short by a failed copy, even just before its last END line, is refused, not
    read for the certificates it still holds whole, nor for the one cut completed.

    @raise ValueError: one cannot be read (which, and why: OpenSSL's complaint, or its END
        line missing).
    """
    from OpenSSL import crypto
    from twisted.internet.ssl import Certificate

    begin, end = b"-----BEGIN CERTIFICATE-----", b"-----END CERTIFICATE-----"
    starts = [m.start() for m in re.finditer(re.escape(begin), data)]
    certificates = []
    for number, start in enumerate(starts, 1):
        following = starts[number] if number < len(starts) else len(data)
        stop = data.find(end, start, following)
        try:
            if stop < 0:
                raise ValueError(f'no "{end.decode()}" line after its BEGIN line: the file is '
                                 "cut short, or the line damaged")
            certificates.append(Certificate.loadPEM(data[start : stop + len(end)]))
        except (crypto.Error, ValueError) as e:
            raise ValueError(
                f"certificate {number} of {len(starts)} cannot be read: {e}"
            ) from None
    return certificates

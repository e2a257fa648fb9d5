"""L{mailrelay.pem.pemCertificates}: the certificates of a PEM bundle, and a bundle cut short
refused (RFC 7468 section 2: every BEGIN line has its END line)."""

from __future__ import annotations

import pytest
import trustme

from mailrelay.pem import pemCertificates

END = b"-----END CERTIFICATE-----"


def _bundle() -> bytes:
    """Two PEM certificates (a CA's and a child CA's), as a CA file holds them."""
    ca = trustme.CA()
    return ca.cert_pem.bytes() + ca.create_child_ca().cert_pem.bytes()


def test_a_whole_bundle_is_read() -> None:
    bundle = _bundle()
    first = bundle.index(END) + len(END) + 1
    assert [c.dump() for c in pemCertificates(bundle)] == [
        c.dump() for c in pemCertificates(bundle[:first]) + pemCertificates(bundle[first:])]
    assert len(pemCertificates(bundle)) == 2
    assert len(pemCertificates(bundle.rstrip(b"\n"))) == 2  # no line end after the last END
    assert pemCertificates(b"") == []


@pytest.mark.parametrize(
    "cut",
    [
        pytest.param(lambda b, end: end, id="just before the END line"),
        pytest.param(lambda b, end: end - 1, id="before the END line's line end"),
        pytest.param(lambda b, end: end + 10, id="in the END line"),
        pytest.param(lambda b, end: end + len(END) - 1, id="the END line's last dash"),
        pytest.param(lambda b, end: b.index(b"\n", b.rindex(b"-----BEGIN")) + 1,
                     id="after the BEGIN line"),
        pytest.param(lambda b, end: end - 65, id="at a line end inside the base64"),
        pytest.param(lambda b, end: end - 30, id="inside a base64 line"),
    ],
)
def test_a_bundle_cut_short_is_refused(cut: object) -> None:
    """A bundle cut in its second certificate (a failed copy), anywhere from its BEGIN line
    to its END line, is refused, naming which certificate; the first is not taken alone."""
    bundle = _bundle()
    at = cut(bundle, bundle.rindex(END))  # type: ignore[operator]
    with pytest.raises(ValueError, match="^certificate 2 of 2 cannot be read: "):
        pemCertificates(bundle[:at])


def test_a_bundle_cut_anywhere_is_read_whole_or_refused() -> None:
    """Wherever a bundle is cut, what is read is the certificates it holds whole, or an
    error: never a certificate read from part of its PEM block."""
    bundle = _bundle()
    ends = [i + len(END) for i in range(len(bundle)) if bundle.startswith(END, i)]
    begins = [i + len(b"-----BEGIN CERTIFICATE-----")
              for i in range(len(bundle)) if bundle.startswith(b"-----BEGIN CERTIFICATE-----", i)]
    for at in range(len(bundle) + 1):
        whole = sum(end <= at for end in ends)
        partial = any(begin <= at < end for begin, end in zip(begins, ends))
        if partial:
            with pytest.raises(ValueError, match=f"certificate {whole + 1} of {whole + 1} "):
                pemCertificates(bundle[:at])
        else:
            assert len(pemCertificates(bundle[:at])) == whole, at


def test_a_block_without_its_end_line_before_the_next_is_refused() -> None:
    """A certificate whose END line is missing, followed by a whole one, is refused, naming
    the first: its BEGIN line's END line never comes."""
    bundle = _bundle()
    first = bundle.index(END)
    with pytest.raises(ValueError, match='^certificate 1 of 2 cannot be read: no "-----END '):
        pemCertificates(bundle[:first] + bundle[first + len(END) + 1:])

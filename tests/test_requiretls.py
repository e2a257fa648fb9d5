"""REQUIRETLS (RFC 8689), server side: offered and taken over TLS only, recorded on the
envelope (and in the spool); a C{TLS-Required: No} field noted unless REQUIRETLS was given."""

from __future__ import annotations

import pytest
from twisted.logger import capturedLogs

from mailrelay.cleanup.intake import tlsRequiredNo
from mailrelay.envelope import Envelope
from mailrelay.testing import ServerHarness

TRANSACTION = b"RCPT TO:<c@d.example>\r\nDATA\r\nSubject: s\r\n\r\nbody\r\n.\r\n"


def overTLS(**settings: object) -> ServerHarness:
    h = ServerHarness(tlsMode="starttls", **settings)
    h.replies()
    h.send(b"EHLO x\r\nSTARTTLS\r\n")
    h.completeHandshake()
    return h


def test_offered_over_tls_only() -> None:
    h = ServerHarness(tlsMode="starttls")
    h.replies()
    ehlo = h.send(b"EHLO x\r\n")
    assert not any(b"REQUIRETLS" in line for line in ehlo) and ehlo[-1] == b"250 STARTTLS"
    h.send(b"STARTTLS\r\n")
    h.completeHandshake()
    ehlo = h.send(b"EHLO x\r\n")
    assert b"250-REQUIRETLS" in ehlo and not any(b"STARTTLS" in line for line in ehlo)
    implicit = ServerHarness(tlsMode="implicit", connect=True)
    implicit.completeHandshake()
    assert b"250-REQUIRETLS" in implicit.send(b"EHLO x\r\n")


def test_refused_without_tls() -> None:
    """Where STARTTLS is offered: 530, STARTTLS first (RFC 8689 2, RFC 3207); where there is
    no TLS at all, REQUIRETLS is a parameter not offered (555)."""
    h = ServerHarness(tlsMode="starttls")
    h.replies()
    assert h.send(b"EHLO x\r\nMAIL FROM:<a@b.example> REQUIRETLS\r\n")[-1] == (
        b"530 5.7.0 Must issue a STARTTLS command first")
    h = ServerHarness()
    h.replies()
    assert h.send(b"EHLO x\r\nMAIL FROM:<a@b.example> REQUIRETLS\r\n")[-1] == (
        b"555 5.5.4 Error: unsupported MAIL parameter REQUIRETLS")
    assert h.send(b"RSET\r\n") == [b"250 2.0.0 Ok"]


def test_recorded_on_the_envelope_over_tls() -> None:
    h = overTLS()
    h.send(b"EHLO x\r\n")
    assert h.send(b"MAIL FROM:<a@b.example> REQUIRETLS=yes\r\n") == [
        b"501 5.5.4 Error: REQUIRETLS takes no value"]
    with capturedLogs() as events:
        assert h.send(b"MAIL FROM:<a@b.example> requiretls\r\n") == [b"250 2.1.0 Ok"]
        h.send(TRANSACTION.replace(b"Subject: s", b"TLS-Required: No\r\nSubject: s"))
    ((envelope, _),) = h.spool.committed.values()
    assert envelope.requireTLS and not envelope.tlsRequiredNo  # the field is ignored then
    (line,) = [e["log_format"].format(**e) for e in events if "nrcpt" in e["log_format"]]
    assert " requiretls result=250 " in line


@pytest.mark.parametrize("field,noted", [
    (b"TLS-Required: No\r\n", True),
    (b"tls-required:no\r\n", True),
    (b"TLS-Required:\r\n  NO\r\n", True),
    (b"TLS-Required: Yes\r\n", False),
    (b"X-TLS-Required: No\r\n", False),
])
def test_tls_required_no_noted(field: bytes, noted: bool) -> None:
    h = ServerHarness()
    h.replies()
    with capturedLogs() as events:
        h.send(b"EHLO x\r\nMAIL FROM:<a@b.example>\r\n" +
               TRANSACTION.replace(b"Subject: s\r\n", b"Subject: s\r\n" + field))
    ((envelope, message),) = h.spool.committed.values()
    assert (envelope.tlsRequiredNo, envelope.requireTLS) == (noted, False)
    assert field in message  # kept for the next hops (RFC 8689 4.1)
    (line,) = [e["log_format"].format(**e) for e in events if "nrcpt" in e["log_format"]]
    assert (" tls_required=no result=" in line) is noted


def test_persisted_and_read_back() -> None:
    envelope = Envelope(sender="a@b.example", requireTLS=True, tlsRequiredNo=False)
    again = Envelope.fromJSON(envelope.toJSON())
    assert (again.requireTLS, again.tlsRequiredNo) == (True, False)
    old = envelope.toDict()
    del old["requireTLS"], old["tlsRequiredNo"]  # written before these fields existed
    assert not Envelope.fromDict(old).requireTLS
    with pytest.raises(ValueError, match="requireTLS: 'yes' is not true or false"):
        Envelope.fromDict({**envelope.toDict(), "requireTLS": "yes"})


def test_header_parsing() -> None:
    assert tlsRequiredNo([("Subject", b"Subject: x\r\n"),
                          ("TLS-Required", b"TLS-Required: No\r\n")])
    assert not tlsRequiredNo([("TLS-Required", b"TLS-Required: Not really\r\n")])
    assert not tlsRequiredNo([])


def test_submitted_envelope_keeps_its_own_setting() -> None:
    """A message made here (L{Intake.submit}) keeps the C{tlsRequiredNo} its maker gave: the
    intake only adds what the header says."""
    from twisted.internet.task import Clock

    from mailrelay.cleanup.intake import Intake
    from mailrelay.testing import MemorySpool

    spool = MemorySpool()
    intake = Intake(spool, [], Clock(), "relay.test")
    intake.submit(Envelope(sender="", tlsRequiredNo=True), b"Subject: dsn\r\n\r\nx\r\n")
    intake.submit(Envelope(sender=""), b"TLS-Required: no\r\n\r\nx\r\n")
    assert [e.tlsRequiredNo for e, _ in spool.committed.values()] == [True, True]

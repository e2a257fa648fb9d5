"""Unit tests: input that must not corrupt a message or the relay's memory (issue 7, point 4).

Through the Twisted protocol on a C{StringTransport} (L{mailrelay.testing.ServerHarness}), and
the sans-IO pieces directly.
"""

from __future__ import annotations

import pytest

from mailrelay.testing import ServerHarness

DATA_START = b"EHLO client.example\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n"


def sendMessage(h: ServerHarness, wire: bytes, cuts: tuple[int, ...] = ()) -> list[int]:
    """Send a whole transaction whose DATA part is C{wire} (as on the wire, with the final
    dot), cut into reads at C{cuts}; the reply codes."""
    h.replies()
    lines = h.send(DATA_START)
    prev = 0
    for cut in (*cuts, len(wire)):
        lines += h.send(wire[prev:cut])
        prev = cut
    return h.codes(lines)


# ---------------------------------------------------------------------------------------------
# Line length counted after un-stuffing (RFC 5321 4.5.3.1.6)


@pytest.mark.parametrize("cuts", [(), (1,), (2,), (500,), (999,), (1000,)])
@pytest.mark.parametrize("before", [b"", b"Subject: x\r\n\r\n"])
def test_998_octet_line_starting_with_a_dot_is_accepted(before: bytes, cuts: tuple[int, ...]) -> None:
    h = ServerHarness()
    line = b"." + b"x" * 997
    wire = before + b"." + line + b"\r\n.\r\n"
    assert sendMessage(h, wire, tuple(len(before) + c for c in cuts)) == [250, 250, 250, 354, 250]
    (message,) = h.spool.messages()
    assert message.endswith(b"\r\n" + line + b"\r\n")


@pytest.mark.parametrize("before", [b"", b"Subject: x\r\n\r\n"])
def test_999_octet_line_after_unstuffing_is_refused(before: bytes) -> None:
    h = ServerHarness()
    wire = before + b".." + b"x" * 998 + b"\r\n.\r\n"
    assert sendMessage(h, wire)[-1] == 500
    assert h.spool.committed == {}


def test_long_line_starting_with_a_dot_split_over_a_huge_partial_line() -> None:
    # A partial line is processed before its end when it is very long; the count carries over.
    h = ServerHarness()
    wire = b"Subject: x\r\n\r\n.." + b"x" * 70000 + b"\r\n.\r\n"
    assert sendMessage(h, wire, (30, 66000))[-1] == 500


def test_client_sends_the_998_octet_dot_line_stuffed() -> None:
    from mailrelay.smtp.client import DotStuffer

    line = b"." + b"x" * 997 + b"\r\n"
    stuffer = DotStuffer()
    assert stuffer.feed(b"a\r\n" + line + line[:500]) + stuffer.feed(line[500:]) + stuffer.finish() == (
        b"a\r\n." + line + b"." + line + b".\r\n"
    )


def test_bounce_returns_a_message_with_the_998_octet_dot_line_in_full(tmp_path) -> None:
    from mailrelay.bounce import _readOriginal

    message = b"Subject: x\r\n\r\n." + b"x" * 997 + b"\r\n"
    path = tmp_path / "m.eml"
    path.write_bytes(message)
    original = _readOriginal(path, True, 100000, "Q")
    assert (original.contentType, original.content, original.note) == ("message/rfc822", message, None)

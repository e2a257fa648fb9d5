"""Tests for L{mailrelay.smtp.data.DataReader}, the DATA content reader of the server session
(the session's own tests, test_session and test_input, drive it through L{ServerSession})."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from mailrelay.smtp import replies as R
from mailrelay.smtp.data import BARE_NEWLINE_NORMALIZE, MAX_DATA_LINE, DataReader
from mailrelay.smtp.wire import DotStuffer


def readAll(reader: DataReader, pieces: list[bytes]) -> tuple[bytes, bytes]:
    """Feed C{pieces} one after the other as a driver would (keeping what was not read);
    return the content stored and what followed the end of data."""
    buf, pos, stored = b"", 0, []
    for i, piece in enumerate(pieces):
        buf = buf[pos:] + piece
        pos = 0
        while (step := reader.read(buf, pos)) is not None:
            pos, content, ended = step
            if content is not None:
                stored.append(content)
            if ended:
                return b"".join(stored), buf[pos:] + b"".join(pieces[i + 1 :])
    raise AssertionError(f"no end of data in {pieces!r}")


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


lines = st.lists(st.sampled_from([b"", b".", b"..", b".x", b"text", b"a.b", b". ", b"x" * 70]))


@given(lines, st.lists(st.integers(min_value=0), max_size=8))
def test_unstuffsWhatTheClientStuffed(body: list[bytes], cuts: list[int]) -> None:
    """Whatever the chunking, the reader returns exactly the content the client's dot-stuffer
    was given, stops at the terminator and leaves what follows it."""
    content = b"".join(line + b"\r\n" for line in body)
    stuffer = DotStuffer()
    wire = stuffer.feed(content) + stuffer.finish() + b"QUIT\r\n"
    reader = DataReader(10**6)
    stored, rest = readAll(reader, split(wire, cuts))
    assert (stored, rest) == (content, b"QUIT\r\n")
    assert (reader.size, reader.error) == (len(content), None)


def test_refusals() -> None:
    """The first check a message fails is its error; the rest is read to the end and dropped."""
    cases = [
        (DataReader(100), b"a\0b\r\n", R.NUL_IN_DATA),
        (DataReader(100), b"a\nb\r\n", R.BARE_NEWLINE),
        (DataReader(5), b"abcdef\r\n", R.SIZE_EXCEEDED),
        (DataReader(5000), b"x" * (MAX_DATA_LINE + 1) + b"\r\n", R.DATA_LINE_TOO_LONG),
    ]
    for reader, content, error in cases:
        stored, rest = readAll(reader, [content, b"more\r\n", b".\r\nNOOP\r\n"])
        assert (stored, rest, reader.error) == (b"", b"NOOP\r\n", error)
    # A line of 998 octets after un-stuffing is legal, although 999 go over the wire.
    reader = DataReader(5000)
    stored, _ = readAll(reader, [b"." + b"." * MAX_DATA_LINE + b"\r\n.\r\n"])
    assert (len(stored), reader.error) == (MAX_DATA_LINE + 2, None)


def test_normalize() -> None:
    """With "normalize", bare newlines become CRLF and NULs go."""
    reader = DataReader(100, bareNewline=BARE_NEWLINE_NORMALIZE, nulBytes=BARE_NEWLINE_NORMALIZE)
    stored, _ = readAll(reader, [b"a\nb\rc\0d\r\n.\r\n"])
    assert (stored, reader.error) == (b"a\r\nb\r\ncd\r\n", None)

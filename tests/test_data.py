"""Tests for L{mailrelay.smtp.data.DataReader}, the DATA content reader of the server session
(the session's own tests, test_session and test_input, drive it through L{ServerSession})."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from mailrelay.smtp import replies as R
from mailrelay.smtp.data import BARE_NEWLINE_NORMALIZE, MAX_DATA_LINE, ChunkReader, DataReader
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


def test_dot_lines_cost_no_python_call_each(monkeypatch) -> None:
    """A message of dot-stuffed lines ("..", as a client sends lines starting with a dot) was
    read with one regular-expression search per line, in Python: 9 MB of them took the
    relay 1.9 s of CPU, against 0.1 s for as many empty lines, the reactor blocked meanwhile.
    The searches per read are a few, whatever the number of lines."""
    from mailrelay.smtp import data

    calls = []

    class Counting:
        def search(self, *args):
            calls.append(args[1:])
            return real.search(*args)

    real = data._DOT_LINE
    monkeypatch.setattr(data, "_DOT_LINE", Counting())
    content = b"Subject: dots\r\n" + b".\r\n.x\r\n" * 5000
    wire = b"Subject: dots\r\n" + b"..\r\n..x\r\n" * 5000
    for ending in (b".\r\nQUIT\r\n", b""):
        calls.clear()
        reader = DataReader(10**6)
        step = reader.read(wire + ending, 0)
        assert step is not None
        assert len(calls) <= 2, len(calls)
        assert step[1] == content and step[2] == bool(ending)
        assert step[0] == len(wire) + (3 if ending else 0)


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
    """With "normalize", a bare LF becomes CRLF, a bare CR a space, and NULs go."""
    reader = DataReader(100, bareNewline=BARE_NEWLINE_NORMALIZE, nulBytes=BARE_NEWLINE_NORMALIZE)
    stored, _ = readAll(reader, [b"a\nb\rc\0d\r\n.\r\n"])
    assert (stored, reader.error) == (b"a\r\nb cd\r\n", None)



def test_a_bare_cr_is_a_space_when_normalised() -> None:
    """With "normalize", a bare CR ends no line: it became CRLF, which split a header field
    in two ("Subject: a<CR>Bcc: victim" added a Bcc: field).  Postfix's smtpd reads a line
    to its LF and its cleanup replaces each stray CR with a space (cleanup_mask_stray_cr_lf
    = yes, cleanup_message.c): so does the reader, in the header section and the body alike
    (a line after a bare CR is no line, and keeps its dots).  A bare LF still ends a line
    (Postfix's smtpd_forbid_bare_newline = normalize)."""
    reader = DataReader(5000, bareNewline=BARE_NEWLINE_NORMALIZE)
    wire = b"Subject: a\rBcc: victim@example.com\r\n\r\nbody\rmore\r..x\r\r\nlf\nend\r\n.\r\n"
    stored, _ = readAll(reader, [wire])
    assert (stored, reader.error) == (
        b"Subject: a Bcc: victim@example.com\r\n\r\nbody more ..x \r\nlf\r\nend\r\n", None)
    for cut in range(1, len(wire)):
        reader = DataReader(5000, bareNewline=BARE_NEWLINE_NORMALIZE)
        assert readAll(reader, [wire[:cut], wire[cut:]])[0] == stored
    # So a line with a bare CR is one line, counted whole against the 998 octets.
    reader = DataReader(5000, bareNewline=BARE_NEWLINE_NORMALIZE)
    readAll(reader, [b"x" * 997 + b"a\rb\r\n.\r\n"])
    assert reader.error == R.DATA_LINE_TOO_LONG


def test_a_bare_cr_is_a_space_when_bare_newlines_are_refused_too() -> None:
    """bare_newline = "reject" refuses a bare LF only, as Postfix's smtpd_forbid_bare_newline
    = reject ("input lines ... that end in <LF> instead of <CR><LF>": smtp_get() flags a
    line ended by LF alone); a bare CR ends no line there (RFC 5321 2.3.8: nothing but CRLF
    is recognised as a line end) and Postfix's cleanup makes it a space whatever that
    setting (cleanup_replace_stray_cr_lf = yes).  So a bare CR is a space under either
    choice, in DATA and in BDAT, wherever the chunks split."""
    wire = b"Subject: a\rBcc: victim@example.com\r\n\r\nbody\rmore\r..x\r\r\nend\r\n.\r\n"
    want = b"Subject: a Bcc: victim@example.com\r\n\r\nbody more ..x \r\nend\r\n"
    for cut in range(len(wire)):
        reader = DataReader(5000)
        assert (readAll(reader, [wire[:cut], wire[cut:]])[0], reader.error) == (want, None)
        chunks = ChunkReader(5000)
        content = wire[:-3]
        stored = [chunks.feed(content[:cut]), chunks.feed(content[cut:]), chunks.end()]
        assert (b"".join(x for x in stored if x), chunks.error) == (want, None)
    # A bare LF is still refused (and a bare CR and a bare LF: for the LF).
    for content in (b"a\nb\r\n", b"a\rb\nc\r\n"):
        reader = DataReader(5000)
        assert readAll(reader, [content + b".\r\n"])[0] == b""
        assert reader.error == R.BARE_NEWLINE
        assert "bare LF" in R.BARE_NEWLINE.text and "bare CR" not in R.BARE_NEWLINE.text
    # A line with a bare CR is one line, counted whole against the 998 octets.
    reader = DataReader(5000)
    readAll(reader, [b"x" * 997 + b"a\rb\r\n.\r\n"])
    assert reader.error == R.DATA_LINE_TOO_LONG


# The reader against a simple reference, on random content and chunkings ----------------------

_PIECES = [b"", b".", b"..", b".x", b"text", b"a.b", b". ", b"x" * 997, b"x" * 998, b"x" * 999,
           b"." + b"x" * 998, b"a\rb", b"a\nb", b"\r", b"\n", b"\r\r", b"a\0b", b"\0.",
           b"\n.", b"\r..", b"\n..x"]


def referenceRead(wire: bytes, maxSize: int, bareNewline: str, nulBytes: str) -> tuple:
    """The content of the message at the start of C{wire}, the rest, and the errors it could
    be refused with, the obvious way: whole message, line by line."""
    if wire.startswith(b".\r\n"):
        raw, rest = b"", wire[3:]
    else:
        end = wire.index(b"\r\n.\r\n")
        raw, rest = wire[: end + 2], wire[end + 5 :]
    if bareNewline == BARE_NEWLINE_NORMALIZE:
        # A bare LF ends a line too (it becomes CRLF): the line after it is un-stuffed.
        pieces = re.split(rb"(\r\n|\n)", raw)
        content = b"".join(
            piece[1:] if n % 2 == 0 and piece.startswith(b".") else piece
            for n, piece in enumerate(pieces)
        )
    else:
        lines = raw.split(b"\r\n")
        content = b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)
    errors = set()
    if b"\0" in content:
        if nulBytes != BARE_NEWLINE_NORMALIZE:
            errors.add(R.NUL_IN_DATA)
        content = content.replace(b"\0", b"")
    content = re.sub(rb"\r(?!\n)", b" ", content)  # (a bare CR is a space)
    if any(len(line) > MAX_DATA_LINE for line in re.split(rb"\r\n|\n", content)):
        errors.add(R.DATA_LINE_TOO_LONG)
    if re.search(rb"(?<!\r)\n", content):
        if bareNewline != BARE_NEWLINE_NORMALIZE:
            errors.add(R.BARE_NEWLINE)
        content = re.sub(rb"(?<!\r)\n", b"\r\n", content)
    if len(content) > maxSize:
        errors.add(R.SIZE_EXCEEDED)
    return content, rest, errors


@given(
    st.lists(st.lists(st.sampled_from(_PIECES), max_size=3).map(b"".join), max_size=12),
    st.lists(st.integers(min_value=0), max_size=10),
    st.sampled_from(["reject", BARE_NEWLINE_NORMALIZE]),
    st.sampled_from(["reject", BARE_NEWLINE_NORMALIZE]),
    st.integers(min_value=0, max_value=5000),
)
def test_the_reader_agrees_with_a_reference(
    lines: list[bytes], cuts: list[int], bareNewline: str, nulBytes: str, maxSize: int
) -> None:
    """Content with dot-lines, NULs, bare CR and LF, lines about 998 octets long, cut
    anywhere (the end marker too): the reader stores what the reference reads (when it
    refuses the message, with one of the reference's reasons: the first a chunk fails) and
    leaves what follows the end marker."""
    content = b"".join(line + b"\r\n" for line in lines)
    stuffed = (b"." if content.startswith(b".") else b"") + content.replace(b"\r\n.", b"\r\n..")
    wire = stuffed + b".\r\nQUIT\r\n"
    expected, rest, errors = referenceRead(wire, maxSize, bareNewline, nulBytes)
    reader = DataReader(maxSize, bareNewline, nulBytes)
    stored, left = readAll(reader, split(wire, cuts))
    assert left == rest == b"QUIT\r\n"
    if errors:
        assert reader.error in errors
    else:
        assert (stored, reader.size, reader.error) == (expected, len(expected), None)


def test_lines_after_a_bare_newline_are_unstuffed_when_normalised() -> None:
    """With "normalize", a bare LF ends a line as CRLF does, so the line after it loses its
    stuffed dot, as Postfix's smtpd reads a client that ends lines with LF alone:
    "..dotline" is ".dotline" (it was stored with both dots, and delivered so).  (A bare CR
    ends no line: a space.)  Only CRLF.CRLF ends the data, whatever the mode."""
    reader = DataReader(5000, bareNewline=BARE_NEWLINE_NORMALIZE)
    wire = b"Subject: x\n\nline1\n..dotline\n...two\r..cr\n.\nend\r\n.\r\nQUIT\r\n"
    stored, rest = readAll(reader, [wire])
    assert (stored, rest, reader.error) == (
        b"Subject: x\r\n\r\nline1\r\n.dotline\r\n..two ..cr\r\n\r\nend\r\n", b"QUIT\r\n", None
    )
    # Cut anywhere, the same; and a CRLF line still loses exactly one dot.
    for cut in range(1, len(wire)):
        reader = DataReader(5000, bareNewline=BARE_NEWLINE_NORMALIZE)
        assert readAll(reader, [wire[:cut], wire[cut:]])[0] == stored
    reader = DataReader(5000, bareNewline=BARE_NEWLINE_NORMALIZE)
    assert readAll(reader, [b"a\r\n..b\nc\r\n.\r\n"])[0] == b"a\r\n.b\r\nc\r\n"


def test_a_bare_newline_ends_a_line_when_normalised() -> None:
    """With "normalize", a line of 997 octets and a bare LF, then more text, is two lines once
    normalised, neither over 998 octets: not refused as too long (it was, measured to the
    CRLF)."""
    reader = DataReader(5000, bareNewline=BARE_NEWLINE_NORMALIZE)
    line = b"x" * 997 + b"a\nb"
    stored, _ = readAll(reader, [line + b"\r\n.\r\n"])
    assert (stored, reader.error) == (b"x" * 997 + b"a\r\nb\r\n", None)
